#!/usr/bin/env python3
"""Parallel SCSI bus scenarios on fetd_spi, against a real STML.

    scripts/spi_sim.py                       # every scenario; an STML of its own
    scripts/spi_sim.py --scenario saturated --scenario saturated-fair
    scripts/spi_sim.py --stml ipc://DIR/stml.sock   # a running STML (its first target's LUN 0)
    scripts/spi_sim.py --duration-ms 20      # shorter runs (the smoke test's)

Scenarios:
- saturated: a wide Ultra (Fast-20, 40 MB/s) bus; the target at ID 7;
  seven initiators at IDs 6, 4, 2, 0, 15, 12 and 8, each reading and writing
  64 KiB (half each, at random) at queue depth 2. Together they ask for more
  than the bus carries, and plain priority arbitration gives it to the
  highest ID that wants it: throughput falls with priority, low IDs starve.
- saturated-fair: the same bus with SPI's arbitration fairness algorithm on
  every device: each ID gets its turn.
- rates: one initiator alone, 64 KiB sequential reads at queue depth 4, on
  each transfer mode from asynchronous to Fast-160, narrow and wide: what
  the bus's phases leave of each DATA rate.

The commands run on the STML (a 256 MiB file LUN in a temporary directory
unless --stml is given); the simulation's clock stops while it waits for
the STML, so the numbers are the model's, the same on every machine. Prints
a table per scenario and writes JSON and a PNG into --out.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fetd_spi import timing as T  # noqa: E402
from fetd_spi.frontend import run_scenario  # noqa: E402
from fetd_spi.report import Results, plot, table  # noqa: E402
from fetd_spi.sim import Scenario, scenario_from_dict  # noqa: E402

SATURATED = {
    "width": 16, "mode": "fast-20", "duration_ms": 400,
    "target": {"id": 7, "service_us": 200, "media_mb_s": 200, "slots": 4},
    "initiator": [{"id": i, "queue_depth": 2, "blocks": 128, "read_fraction": 0.5}
                  for i in (6, 4, 2, 0, 15, 12, 8)],
}


def saturated(fair: bool) -> dict:
    sc = json.loads(json.dumps(SATURATED))
    sc["name"] = "saturated-fair" if fair else "saturated"
    sc["description"] = ("every device runs SPI's arbitration fairness algorithm" if fair else
                         "plain priority arbitration: the highest ID that wants the bus gets it")
    if fair:
        sc["target"]["fair"] = True
        for i in sc["initiator"]:
            i["fair"] = True
    return sc


def rates() -> list[dict]:
    out = []
    for width in (8, 16):
        for m in T.MODES.values():
            if m.wide_only and width == 8:
                continue
            # long enough for about 100 commands of 64 KiB at the DATA rate
            ms = max(20.0, 100 * 65536 / m.rate(width) * 1000)
            out.append({"name": f"rates-{m.name}-{'wide' if width == 16 else 'narrow'}", "width": width,
                        "mode": m.name, "duration_ms": ms,
                        "target": {"id": 7, "service_us": 20, "media_mb_s": 0, "slots": 4},
                        "initiator": [{"id": 6, "queue_depth": 4, "blocks": 128, "sequential": True}]})
    return out


SCENARIOS = {"saturated": lambda: [saturated(False)], "saturated-fair": lambda: [saturated(True)],
             "rates": rates}


class OwnStml:
    """An STML of our own: a 256 MiB file LUN in a temporary directory."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="spisim", dir="/tmp"))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stml", "--data-dir", str(self.dir), "--lun",
             f"file:{self.dir / 'lun.img'},size=256MiB", "--log-level", "warning"],
            stdout=subprocess.PIPE, text=True, cwd=ROOT)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if "listening on" not in line:
            self.stop()
            sys.exit(f"spi_sim: the STML did not start: {line.strip()}")
        self.endpoint = line.split("listening on", 1)[1].strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def rates_table(runs: list[Results]) -> str:
    lines = ["transfer rates: one initiator, 64 KiB sequential reads at queue depth 4",
             f"{'mode':>9} {'width':>6} {'DATA rate':>10} {'achieved':>9} {'share':>6}  (MB/s)"]
    for r in runs:
        lines.append(f"{r.mode:>9} {r.width:>6} {r.bus_mb_s:>10.1f} {r.data_mb_s:>9.1f} "
                     f"{r.data_mb_s / r.bus_mb_s:>6.0%}")
    return "\n".join(lines)


async def run_all(scenarios: list[Scenario], endpoint: str) -> list[Results]:
    runs = []
    for sc in scenarios:
        _, results = await run_scenario(sc, endpoint)
        runs.append(results)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", action="append", choices=sorted(SCENARIOS),
                    help="run this scenario (repeatable; default: all)")
    ap.add_argument("--stml", help="a running STML's endpoint (default: start one)")
    ap.add_argument("--duration-ms", type=float, help="simulated time per scenario (default: each one's)")
    ap.add_argument("--out", help="directory for results.json and spi.png (default: spi-sim-TIME)")
    args = ap.parse_args()
    raw = [sc for name in (args.scenario or list(SCENARIOS)) for sc in SCENARIOS[name]()]
    if args.duration_ms:
        for sc in raw:
            sc["duration_ms"] = args.duration_ms
    scenarios = [scenario_from_dict(sc) for sc in raw]
    own = None if args.stml else OwnStml()
    try:
        from scsi_runtime.loop import run_loop
        runs = run_loop(run_all(scenarios, args.stml if own is None else own.endpoint))
    finally:
        if own is not None:
            own.stop()
    main_runs = [r for r in runs if not r.scenario.startswith("rates-")]
    rate_runs = [r for r in runs if r.scenario.startswith("rates-")]
    for r in main_runs:
        print(table(r) + "\n")
    if rate_runs:
        print(rates_table(rate_runs))
    out = Path(args.out or f"spi-sim-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps([r.as_dict() for r in runs], indent=2))
    if main_runs:
        try:
            plot(main_runs, out / "spi.png")
        except ImportError:
            print("spi_sim: no matplotlib, no PNG (pip install -e '.[bench]')", file=sys.stderr)
    print(f"\nresults in {out}/", file=sys.stderr)


if __name__ == "__main__":
    main()
