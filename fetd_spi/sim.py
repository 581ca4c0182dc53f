"""Scenarios: a bus, a target, initiators with workloads; built and run."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import simpy

from fetd_spi import timing as T
from fetd_spi.bus import Bus, Command, Executor, Initiator, Target
from fetd_spi.workload import Generator, Workload
from stml.api import TaskAttr

_ATTRS = {"simple": TaskAttr.SIMPLE, "ordered": TaskAttr.ORDERED, "head_of_queue": TaskAttr.HEAD_OF_QUEUE}


@dataclass
class InitiatorSpec:
    id: int
    workload: Workload
    fair: bool = False
    name: str | None = None       # initiator port name; None: derived from the bus and ID


@dataclass
class TargetSpec:
    id: int = 7
    fair: bool = False
    service_us: float = 100.0     # per command, before the media moves data
    media_mb_s: float = 100.0     # the media's rate (MB/s); 0: no per-byte time
    slots: int = 1                # commands the media serves at once

    def service(self, cmd: Command) -> int:
        nbytes = len(cmd.data_out) or cmd.data_in_len
        per_byte = T.S / (self.media_mb_s * 1e6) if self.media_mb_s else 0.0
        return int(self.service_us * T.US + nbytes * per_byte)


@dataclass
class Scenario:
    name: str
    initiators: list[InitiatorSpec]
    width: int = 8
    mode: str = "fast-10"
    duration: int = 200 * T.MS
    target: TargetSpec = field(default_factory=TargetSpec)
    async_handshake: int = T.ASYNC_HANDSHAKE
    seed: int = 0
    description: str = ""

    def initiator_name(self, spec: InitiatorSpec) -> str:
        return spec.name or f"iqn.2026-11.org.scsi-target.spi:{self.name}.id{spec.id}"


def scenario_from_dict(raw: dict[str, Any]) -> Scenario:
    """A scenario from a TOML table or a dict (scripts/spi_sim.py); errors name the key.

    name, width (8|16), mode (async, fast-5 ... fast-160, ultra ... ultra320),
    duration_ms, async_ns, seed, description;
    target = {id, fair, service_us, media_mb_s, slots};
    [[initiator]] id, fair, name, queue_depth, blocks, read_fraction,
    region_start, region_blocks, sequential, attr (simple|ordered|head_of_queue), think_us, lun.
    """
    def get(table: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any, where: str) -> Any:
        value = table.get(key, default)
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise ValueError(f"{where}{key}: {value!r} is not {getattr(kind, '__name__', kind)}")
        return value

    known = {"name", "width", "mode", "duration_ms", "async_ns", "seed", "description", "target", "initiator"}
    for key in raw:
        if key not in known:
            raise ValueError(f"{key}: unknown setting (known: {', '.join(sorted(known))})")
    t = get(raw, "target", dict, {}, "")
    target = TargetSpec(get(t, "id", int, 7, "target."), get(t, "fair", bool, False, "target."),
                        float(get(t, "service_us", (int, float), 100.0, "target.")),
                        float(get(t, "media_mb_s", (int, float), 100.0, "target.")),
                        get(t, "slots", int, 1, "target."))
    specs = []
    for n, i in enumerate(get(raw, "initiator", list, [], "")):
        where = f"initiator[{n}]."
        attr = get(i, "attr", str, "simple", where)
        if attr not in _ATTRS:
            raise ValueError(f"{where}attr: {attr!r} is not one of {', '.join(_ATTRS)}")
        w = Workload(queue_depth=get(i, "queue_depth", int, 1, where), blocks=get(i, "blocks", int, 8, where),
                     read_fraction=float(get(i, "read_fraction", (int, float), 1.0, where)),
                     region_start=get(i, "region_start", int, -1, where),
                     region_blocks=get(i, "region_blocks", int, 0, where),
                     sequential=get(i, "sequential", bool, False, where), attr=_ATTRS[attr],
                     think=int(float(get(i, "think_us", (int, float), 0, where)) * T.US),
                     lun=get(i, "lun", int, 0, where))
        specs.append(InitiatorSpec(get(i, "id", int, None, where), w, get(i, "fair", bool, False, where),
                                   get(i, "name", (str, type(None)), None, where)))
    if not specs:
        raise ValueError("initiator: a scenario needs at least one")
    return Scenario(get(raw, "name", str, "scenario", ""), specs, get(raw, "width", int, 8, ""),
                    get(raw, "mode", str, "fast-10", ""),
                    int(float(get(raw, "duration_ms", (int, float), 200, "")) * T.MS), target,
                    int(float(get(raw, "async_ns", (int, float), T.ASYNC_HANDSHAKE / T.NS, "")) * T.NS),
                    get(raw, "seed", int, 0, ""), get(raw, "description", str, "", ""))


class Simulation:
    """One scenario's bus, target and initiators, on one simpy environment."""

    def __init__(self, scenario: Scenario, executor: Executor, block_size: int, lun_blocks: int,
                 trace: bool = False) -> None:
        self.scenario = scenario
        self.env = simpy.Environment()
        self.bus = Bus(self.env, scenario.width, scenario.mode, scenario.async_handshake, trace)
        ts = scenario.target
        self.target = Target(self.bus, ts.id, executor, ts.service, ts.slots, ts.fair)
        self.block_size = block_size
        self.generators: list[Generator] = []
        share = lun_blocks // len(scenario.initiators)
        for n, spec in enumerate(scenario.initiators):
            w = spec.workload
            if w.region_start < 0:            # unset: an equal share of the LUN each
                w.region_start = n * share
            if w.region_blocks <= 0:
                w.region_blocks = share
            if w.region_start + w.region_blocks > lun_blocks:
                raise ValueError(f"initiator {spec.id}: region {w.region_start}+{w.region_blocks} "
                                 f"is past the LUN's {lun_blocks} blocks")
            initiator = Initiator(self.bus, spec.id, ts.id, spec.fair)
            self.generators.append(Generator(initiator, w, block_size, scenario.seed))

    def start(self) -> None:
        for g in self.generators:
            g.start()

    def stop(self) -> None:
        for g in self.generators:
            g.stop()

    def run(self, until: int | None = None) -> None:
        """Run with an executor that answers inside the simulation (tests)."""
        self.env.run(until=until)
