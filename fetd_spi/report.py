"""What a run measured: per initiator ID and per bus phase; a table and a PNG."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fetd_spi import timing as T
from fetd_spi.bus import Phase
from fetd_spi.sim import Simulation
from stml.api import Status


def percentile(values: list[int], p: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return float(ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)])


@dataclass
class InitiatorStats:
    id: int
    rank: int                  # 1 = the highest arbitration priority on this bus
    fair: bool
    commands: int              # completed within the measured time
    not_good: int              # of them, with a status other than GOOD or none
    mb_s: float
    iops: float
    latency_p50_us: float
    latency_p99_us: float
    latency_max_us: float
    arb_wins: int
    arb_lost: int
    arb_wait_mean_us: float    # asking for the bus to winning it; a wait still on at the end counts
    arb_wait_p99_us: float
    bad_reads: int             # blocks read back that another LBA's write put there


@dataclass
class Results:
    scenario: str
    description: str
    width: int
    mode: str
    bus_mb_s: float            # the DATA phase rate
    duration_ms: float
    target_id: int
    target_fair: bool
    initiators: list[InitiatorStats]
    phases: dict[str, float]   # share of the measured time per phase
    data_mb_s: float           # what all initiators moved

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def collect(sim: Simulation, until: int) -> Results:
    """The statistics of everything that completed by `until` (ps)."""
    sc = sim.scenario
    order = T.priority_order(sc.width)
    seconds = until / T.S
    rows = []
    for g in sim.generators:
        ini = g.initiator
        done = [c for c in ini.completed if c.done is not None and c.done <= until]
        lat = [c.done - c.issued for c in done if c.done is not None]
        moved = sum(len(c.data_out) or len(c.data_in) for c in done if c.status == Status.GOOD)
        waits = list(ini.waits)
        asked = sim.bus.requests.get(ini.id)
        if asked is not None:        # still waiting at the end: a starved ID's wait is the run
            waits.append(until - asked)
        rows.append(InitiatorStats(
            ini.id, order.index(ini.id) + 1, ini.fair, len(done),
            sum(1 for c in done if c.status != Status.GOOD), moved / seconds / 1e6, len(done) / seconds,
            percentile(lat, 50) / T.US, percentile(lat, 99) / T.US, max(lat, default=0) / T.US,
            len(ini.waits), ini.lost, (sum(waits) / len(waits) if waits else 0) / T.US,
            percentile(waits, 99) / T.US, g.bad_reads))
    rows.sort(key=lambda r: r.rank)
    spent = {str(p): sim.bus.phase_time.get(p, 0) for p in Phase if p != Phase.BUS_FREE}
    busy = sum(spent.values())
    phases = {str(Phase.BUS_FREE): max(0, until - busy) / until,
              **{p: v / until for p, v in spent.items()}}
    return Results(sc.name, sc.description, sc.width, sim.bus.mode.name, sim.bus.mode.rate(sc.width) / 1e6,
                   until / T.MS, sc.target.id, sc.target.fair, rows, phases,
                   sum(r.mb_s for r in rows))


def table(r: Results) -> str:
    """The run as text: one line per initiator, highest priority first, then the phases."""
    lines = [f"{r.scenario}: {r.width}-bit {r.mode} bus ({r.bus_mb_s:.0f} MB/s), target ID {r.target_id}, "
             f"{r.duration_ms:.0f} ms simulated; initiators moved {r.data_mb_s:.2f} MB/s",
             f"{'ID':>3} {'rank':>4} {'fair':>4} {'cmds':>6} {'MB/s':>7} {'IOPS':>7} {'lat p50':>9} "
             f"{'lat p99':>9} {'wins':>6} {'lost':>6} {'arb wait':>9} {'wait p99':>9}  (times in us)"]
    for s in r.initiators:
        lines.append(f"{s.id:>3} {s.rank:>4} {'yes' if s.fair else 'no':>4} {s.commands:>6} {s.mb_s:>7.2f} "
                     f"{s.iops:>7.0f} {s.latency_p50_us:>9.0f} {s.latency_p99_us:>9.0f} {s.arb_wins:>6} "
                     f"{s.arb_lost:>6} {s.arb_wait_mean_us:>9.0f} {s.arb_wait_p99_us:>9.0f}"
                     + (f"  {s.not_good} not GOOD" if s.not_good else "")
                     + (f"  {s.bad_reads} BAD READS" if s.bad_reads else ""))
    lines.append("bus time: " + ", ".join(f"{p} {share:.1%}" for p, share in r.phases.items() if share >= 0.0005))
    return "\n".join(lines)


def plot(runs: list[Results], path: Path) -> None:
    """Per scenario (columns): MB/s and mean arbitration wait per initiator ID,
    in priority order, and the bus time per phase. Needs matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(3, len(runs), figsize=(5 * len(runs), 10), squeeze=False)
    for col, r in enumerate(runs):
        ids = [str(s.id) for s in r.initiators]
        top, mid, low = axes[0][col], axes[1][col], axes[2][col]
        top.bar(ids, [s.mb_s for s in r.initiators], color="tab:blue")
        top.set_title(f"{r.scenario}\n{r.width}-bit {r.mode}, target ID {r.target_id}", fontsize=10)
        top.set_ylabel("MB/s")
        mid.bar(ids, [s.arb_wait_mean_us for s in r.initiators], color="tab:orange")
        mid.set_ylabel("mean wait to win arbitration (us)")
        mid.set_xlabel("initiator ID, highest priority first")
        names = [p for p, share in r.phases.items() if share > 0]
        low.barh(names, [r.phases[p] * 100 for p in names], color="tab:green")
        low.set_xlabel("% of bus time")
        low.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
