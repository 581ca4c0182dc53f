"""Issue 25 prototype measurement: 1 MiB seq read QD8, proto off (A) vs on (B), alternating."""
import os, sys, resource, json, statistics, tempfile, subprocess, re, time
from pathlib import Path
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench
from bench import Ours, filled_image, processes, usage, per_io

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
count = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
args = ["-d", "8", "-s", "1M"]
work = Path(tempfile.mkdtemp(prefix="sf-", dir="/tmp"))
targets = {}
try:
    MODES = {"A": "0", "B": "1", "C": "2"}
    for name, on in MODES.items():
        img = filled_image(Path(f"/dev/shm/sf-{name}.img"))
        os.environ["SCSI_TARGET_SF_PROTO"] = on
        os.environ["SCSI_TARGET_SF_IMAGE"] = str(img)
        targets[name] = Ours(work, img, thin=False, name=f"ours{name}")
    for name, t in targets.items():
        pids = processes(t)
        maps = {p: sum(1 for l in open(f"/proc/{pid}/maps") if "accel-SF" in l) for p, pid in pids.items()}
        print(name, pids, "accel maps:", maps, flush=True)
    res = {n: [] for n in targets}
    for r in range(rounds):
        for name in (("A", "B", "C") if r % 2 == 0 else ("C", "B", "A")):
            t = targets[name]
            pids = processes(t)
            before = {p: usage(pid) for p, pid in pids.items()}
            ch0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            secs = bench.qemu_bench(t.url, args, count)
            ch1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            after = {p: usage(pid) for p, pid in pids.items()}
            cpu = per_io(before, after, count)
            cpu["qemu-img"] = {"user_us": (ch1.ru_utime - ch0.ru_utime) / count * 1e6,
                               "system_us": (ch1.ru_stime - ch0.ru_stime) / count * 1e6}
            iops = count / secs
            res[name].append({"iops": iops, "cpu": cpu})
            print(f"round {r} {name} iops={iops:.0f} " + " ".join(
                f"{p}:u{c['user_us']:.0f}/s{c['system_us']:.0f}" for p, c in cpu.items()), flush=True)
    for name in res:
        print(name, "median iops", statistics.median(x["iops"] for x in res[name]))
    print("ratios B/A per round", [round(b["iops"] / a["iops"], 2) for a, b in zip(res["A"], res["B"])])
    print("ratios C/A per round", [round(c["iops"] / a["iops"], 2) for a, c in zip(res["A"], res["C"])])
    json.dump(res, open(f"/tmp/sfproto-result-{int(time.time())}.json", "w"), indent=1)
finally:
    for t in targets.values():
        t.stop()
