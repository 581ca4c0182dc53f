"""Stage timing (`scsi-target run --timing`, stml.timing): stamps through real
processes, `status --latency`, the Prometheus histograms, the clock offset
estimator, and that timing off adds nothing to the messages. Counts and
order only: no durations are asserted."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from stml.timing import (BOUNDS, DELIVERED, FE_RECEIVED, POINTS, RX_SENT, STAGES, STML_RECEIVED,
                         ClockOffset, Timing, stages)
from stml.trace.format import Message, TraceReader
from support.procs import free_port
from support.rawiscsi import RawInitiator
from support.target import IQN, Target

WRITES = READS = 8


def cli(data_dir: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scsi_target", "status", "--data-dir", data_dir, *args],
                          capture_output=True, text=True, timeout=60)


def io(t: Target, name: str) -> None:
    """WRITES writes of 4 KiB, then READS reads of them, read back whole."""
    host, p = t.portal.rsplit(":", 1)
    ini = RawInitiator(host, int(p), initiator=f"iqn.2026-11.org.test:{name}")
    ini.login(IQN)
    for lba in range(0, 8 * WRITES, 8):
        ini.write16(lba, bytes([lba + 1]) * 4096)
    for lba in range(0, 8 * READS, 8):
        assert ini.read16(lba, 8) == bytes([lba + 1]) * 4096
    ini.close()


def trace_commands(path: Path) -> dict[int, list[int]]:
    """tag -> the nine stamps of its command, from the headers the trace kept."""
    stamps: dict[int, list[int]] = {}
    with TraceReader(str(path)) as reader:
        for m in reader:
            if not isinstance(m, Message):
                continue
            h = m.header
            if m.op == "rx_cmnd":
                stamps[h["tag"]] = [*h["ts"], 0, 0, 0, 0, 0, 0, 0]
            elif m.op == "xmit_response":
                stamps[h["tag"]][STML_RECEIVED:DELIVERED] = h["ts"]
            elif m.op == "scsi_target_done":
                for tag, t in zip(h["tags"], h["ts"], strict=True):
                    stamps[tag][DELIVERED] = t
    return stamps


def test_stages_through_real_processes(tmp_path):
    """scsi-target run --timing and an iSCSI initiator: every command's nine
    stamps are in order, status --latency counts each stage of each command,
    Prometheus has the histograms with as many commands, and so does `trace
    stats` of the trace recorded meanwhile, which replays without divergence."""
    port, trace = free_port(), tmp_path / "timed.trace"
    with Target("--lun", "ram:16MiB", "--timing", "--metrics", f"127.0.0.1:{port}",
                "--trace", str(trace)) as t:
        io(t, "timing")
        sent = WRITES + READS
        deadline = time.monotonic() + 20   # scsi_target_done of the last one rides a 20 ms timer
        while True:
            p = cli(t.data_dir, "--latency", "--json")
            assert p.returncode == 0, p.stderr
            report = json.loads(p.stdout)
            if report["commands"] >= sent or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert report["commands"] == sent and report["in_flight"] == 0
        [lun] = report["luns"]
        [fe] = report["front_ends"]
        assert fe["clock"] == "same host" and fe["offset_ns"] == 0
        for row in (lun, fe):
            assert {s: row["stages"][s]["count"] for s in STAGES} == {s: sent for s in STAGES}

        text = cli(t.data_dir, "--latency").stdout
        assert f"LUN {IQN} 0" in text and f"Front end {fe['name']}" in text
        for s in STAGES:
            assert sum(line.split()[:2] == [s, str(sent)] for line in text.splitlines()) == 2, s

        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        for s in STAGES:
            assert (f'scsi_target_lun_stage_seconds_count{{lun="0",stage="{s}",target="{IQN}"}} '
                    f'{float(sent)}') in metrics
            assert (f'scsi_target_lun_stage_seconds_bucket{{le="+Inf",lun="0",stage="{s}",'
                    f'target="{IQN}"}} {float(sent)}') in metrics
            assert (f'scsi_target_front_end_stage_seconds_count{{front_end="{fe["name"]}",'
                    f'stage="{s}"}} {float(sent)}') in metrics
    stamps = trace_commands(trace)
    assert len(stamps) == sent
    p = subprocess.run([sys.executable, "-m", "scsi_target", "trace", "stats", str(trace), "--json"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert {s: v["count"] for s, v in json.loads(p.stdout)["stages"].items()} == {s: sent for s in STAGES}
    # the stamps change no answer: the trace replays clean, `latency` queries included
    p = subprocess.run([sys.executable, "-m", "scsi_target", "trace", "replay", str(trace)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and " 0 divergences" in p.stdout and "not replayed" not in p.stderr, p
    for tag, st in stamps.items():
        assert all(st), (tag, st)                               # every stage reached
        assert st == sorted(st), (tag, dict(zip(POINTS, st)))   # each stamp >= the one before


def test_timing_off_adds_no_fields_and_status_says_so(tmp_path):
    """Without --timing the front end offers the capability, the STML does not
    grant it, no message carries a stamp and no scsi_target_done is sent; `status --latency` says why it
    has nothing (exit 2, one line)."""
    trace = tmp_path / "plain.trace"
    with Target("--lun", "ram:16MiB", "--trace", str(trace)) as t:
        io(t, "untimed")
        p = cli(t.data_dir, "--latency")
        assert p.returncode == 2 and "stage timing is off" in p.stderr
    offered = granted = None
    ops = set()
    with TraceReader(str(trace)) as reader:
        for m in reader:
            if not isinstance(m, Message):
                continue
            ops.add(m.op)
            assert not {"ts", "t", "echo", "boot_id"} & set(m.header) or m.op == "register_target_front_end", m
            if m.op == "register_target_front_end":
                offered = m.header["caps"]
            elif m.op == "detect":
                granted = m.header["caps"]
    assert {"rx_cmnd", "xmit_response"} <= ops
    assert "scsi_target_done" not in ops   # untimed, nothing takes it: not sent (decisions/0603)
    assert "timing" in offered and "timing" not in granted


# ---------------------------------------------------------------- stml.timing alone

def test_offset_estimator_recovers_a_known_offset_within_its_bound():
    """Synthetic round trips with a known offset and uneven delays each way:
    the estimate is within its error bound, and the bound is half the best
    round trip kept."""
    rng = random.Random(7)
    for offset in (0, 12_345_678, -987_654_321_000):
        est = ClockOffset()
        t = 10 ** 12
        for _ in range(20):
            there, back = rng.randrange(50_000, 5_000_000), rng.randrange(50_000, 5_000_000)
            held = rng.randrange(0, 100_000)
            t1 = t
            t2 = t1 + there + offset
            t3 = t2 + held
            t4 = t3 - offset + back
            assert est.sample(t1, t2, t3, t4)
            t += 1_000_000_000
        found, error = est.best()
        best_rtt = min(rtt for rtt, _ in est.samples)
        assert error == (best_rtt + 1) // 2 and abs(found - offset) <= error
        assert len(est.samples) == 8   # only the last N round trips are kept
    assert not ClockOffset().sample(100, 50, 40, 200)      # answered before it arrived: refused


def test_a_remote_front_ends_stamps_are_corrected_by_its_offset():
    """A front end on another host (another boot id) with its clock OFFSET
    ahead: before a round trip the stages that cross clocks are not counted;
    after, they are, on the STML's clock."""
    OFFSET = 5_000_000_000
    timing = Timing("host-a")
    timing.front_end(b"fe", "remote", "host-b")
    lun = ("iqn.t", 0)

    def command(tag: int) -> None:
        stamps = timing.received(b"fe", tag, lun, [0, 0])   # (overwritten below: known stamps)
        base = stamps[STML_RECEIVED]
        stamps[FE_RECEIVED], stamps[RX_SENT] = base - 2000 + OFFSET, base - 1000 + OFFSET
        for i in range(3, 7):
            stamps[i] = base + (i - 2) * 1000
        timing.responded(b"fe", tag)
        timing.delivered(b"fe", [tag], [stamps[7] + 1000 + OFFSET])

    command(1)
    row = timing.by_front_end["remote"]
    assert row[STAGES.index("to_stml")].count == 0 and row[STAGES.index("delivery")].count == 0
    assert row[STAGES.index("front_end")].count == 1 and row[STAGES.index("total")].count == 1
    t1 = 10 ** 9
    timing.echo(b"fe", [t1, t1 + 100 + OFFSET, t1 + 150 + OFFSET], t1 + 250)
    assert timing.report()["front_ends"][0]["offset_ns"] == OFFSET
    command(2)
    for name in ("to_stml", "delivery"):
        h = row[STAGES.index(name)]
        assert h.count == 1 and sum(h.buckets[:BOUNDS.index(next(b for b in BOUNDS if b >= 1000)) + 1]) == 1


def test_malformed_stamps_are_ignored_and_memory_is_capped(monkeypatch):
    """A front end's bad `ts` or `echo` costs nothing but its stamps; the table
    of commands in flight keeps at most MAX_PENDING; a front end that goes
    takes its histograms along."""
    import stml.timing as T
    monkeypatch.setattr(T, "MAX_PENDING", 4)
    timing = Timing("a")
    timing.front_end(b"fe", "f", "b")
    stamps = timing.received(b"fe", 1, None, "not a list")
    assert stamps[FE_RECEIVED] == 0 and stamps[STML_RECEIVED] > 0
    timing.echo(b"fe", ["x", 1, 2], 5)
    timing.echo(b"fe", [1, 2], 5)
    assert timing.front_ends[b"fe"].offset.best() is None
    timing.delivered(b"fe", "tags", None)
    for tag in range(2, 10):
        timing.received(b"fe", tag, None, None)
    assert len(timing.pending) == 4
    timing.count([0, 0, 1, 2, 0, 0, 0, 0, 0], None, timing.front_ends[b"fe"])
    assert list(timing.by_front_end) == ["f"]
    timing.front_end_gone(b"fe")
    assert not timing.pending and not timing.front_ends and not timing.by_front_end


def test_histogram_buckets_and_quantiles():
    """Fixed buckets whatever the samples; a quantile falls in its sample's
    bucket. (Commands whose only stage is to_queue, of known lengths.)"""
    timing = Timing("a")
    lun = ("iqn.t", 0)

    def sample(ns: int) -> None:
        stamps = [0] * len(POINTS)
        stamps[STML_RECEIVED], stamps[STML_RECEIVED + 1] = 10 ** 9, 10 ** 9 + ns
        timing.count(stamps, lun, None)
    for ns in [3_000] * 50 + [40_000] * 40 + [2_000_000] * 10:
        sample(ns)
    row = timing.by_lun[lun]
    h = row[STAGES.index("to_queue")]
    assert h.count == 100 and len(h.buckets) == len(BOUNDS) + 1
    assert sum(r.count for r in row) == 100   # no other stage
    for q, ns in ((0.5, 3_000), (0.9, 40_000), (0.99, 2_000_000)):
        i = next(i for i, b in enumerate(BOUNDS) if b >= ns)
        assert BOUNDS[i - 1] <= h.quantile(q) <= BOUNDS[i]
    sample(10 ** 15)   # beyond the last bound: the last bucket
    assert h.buckets[-1] == 1


def test_stages_are_measured_from_the_latest_stamp_reached():
    """A command with no backend call of its own ends its to_response stage
    at its dispatch; with no front-end stamps, total is the STML's part."""
    st = [0, 0, 100, 150, 200, 0, 0, 400, 0]
    got = dict(stages(st, 0))
    assert got == {STAGES.index("ordering"): 50, STAGES.index("to_queue"): 50,
                   STAGES.index("to_response"): 200, STAGES.index("total"): 300}


def test_a_front_end_on_another_host_gets_its_offset_from_heartbeats(stml_factory, client_factory,
                                                                      monkeypatch):
    """A loopback front end that reports another boot id is a remote one to a
    --timing STML: the STML's heartbeats ask for echoes, the offset comes with
    an error bound (both clocks are really this host's, so the true offset, 0,
    is within it), and then the stages that cross hosts are counted too."""
    import stml.api.link as link_mod
    from scsi_target.mgmt import MgmtClient
    monkeypatch.setattr(link_mod, "boot_id", lambda: "another-host")
    stml = stml_factory("ram:16MiB", extra=("--timing",))
    c = client_factory(stml.endpoint)
    mgmt = MgmtClient(stml.endpoint)
    deadline = time.monotonic() + 30
    while True:
        [fe] = mgmt.call("latency")["front_ends"] or [{}]
        if fe.get("error_ns") is not None or time.monotonic() > deadline:
            break
        c.capacity(0)   # a command, so the front end is listed
        time.sleep(0.2)
    assert fe["clock"] == "remote" and abs(fe["offset_ns"]) <= fe["error_ns"]
    while mgmt.call("latency")["in_flight"] and time.monotonic() < deadline + 10:
        time.sleep(0.05)   # the last command's scsi_target_done (a 20 ms timer)
    report = mgmt.call("latency")
    assert report["in_flight"] == 0
    before = report["front_ends"][0]["stages"]["to_stml"]["count"]
    for lba in range(4):
        c.write(0, lba, bytes([lba]) * 512)
    deadline = time.monotonic() + 20
    while mgmt.call("latency")["front_ends"][0]["stages"]["to_stml"]["count"] < before + 4 \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    stages_ = mgmt.call("latency")["front_ends"][0]["stages"]
    assert stages_["to_stml"]["count"] == stages_["delivery"]["count"] == before + 4


def test_a_front_end_not_granted_timing_leaves_nothing_in_flight(stml_factory):
    """A front end that offers no `timing` (a raw one) is not granted it and
    sends no scsi_target_done (contract 1.8): the STML does not time its
    commands, so none of them waits in the table for a delivery (review 4:
    20 commands stayed in flight and would have filled the table)."""
    from scsi_target.mgmt import MgmtClient
    from support.rawfe import RawFrontEnd
    stml = stml_factory("ram:4MiB", extra=("--timing",))
    fe = RawFrontEnd(stml.endpoint)
    try:
        assert "timing" not in fe.register().get("caps", [])
        fe.nexus()
        for tag in range(1, 21):
            assert fe.command(tag, bytes(6))[0]["status"] == 0   # TEST UNIT READY
    finally:
        fe.close()
    report = MgmtClient(stml.endpoint).call("latency")
    assert report["in_flight"] == 0 and report["commands"] == 0
