"""fetd_spi's link to the STML: the simulated target's logical units are the
STML's, reached through the contract (stml.api) like any front end's.

Each initiator ID is an I_T nexus (its port name from the scenario; the
target's ACL applies, as fetd_vhost applies it). A command goes to the STML
when the simulated target takes it off the bus, with a write's data as
immediate data; its status, sense and read data come back as the outcome.

Simulated time and the STML's time are kept apart so a run is reproducible:
the target's service time is the scenario's model, and the simulation
stops its clock whenever it needs an outcome the STML has not sent yet (it
waits on the event loop, then goes on from the same simulated instant).
The STML's speed decides how long a run takes, never what it measures.
"""
from __future__ import annotations

import asyncio
import logging
import simpy

from fetd_spi.bus import Command, Outcome
from fetd_spi.report import Results, collect
from fetd_spi.sim import Scenario, Simulation
from stml.api import DataDir, Detect, FrontEndLink

log = logging.getLogger("fetd_spi")

ANSWER_TIMEOUT = 30.0     # seconds the STML may take to answer one command
YIELD_EVERY = 1000        # simulation steps between turns of the event loop


class LinkFailed(RuntimeError):
    """The STML went away or stopped answering: the run cannot go on."""


class StmlExecutor:
    """The simulated target's executor: commands through the contract."""

    def __init__(self, endpoint: str, target: str | None = None, heartbeat_ms: int = 1000) -> None:
        self.link = FrontEndLink(endpoint, "spi", self, heartbeat_ms=heartbeat_ms)
        self.target_name = target
        self.info: Detect | None = None
        self.env: simpy.Environment | None = None
        self._answers: dict[int, Outcome] = {}         # arrived before the simulation asked
        self._waiting: dict[int, simpy.Event] = {}     # asked before they arrived (the clock stops)
        self._commands: dict[int, Command] = {}        # in the STML, by contract tag
        self._ready: dict[int, asyncio.Future] = {}
        self._changed = asyncio.Event()
        self._failed: str | None = None

    # ---------------------------------------------------------------- setup
    async def open(self, names: dict[int, str], timeout: float = 15.0) -> Detect:
        """Register with the STML and one nexus per initiator ID (`names`:
        ID -> initiator port name); refuses names the target's ACL does not hold."""
        self.link.start()
        detect = await self.link.wait_ready(timeout)
        if self.target_name is None:
            if not detect.targets:
                raise LookupError("the STML has no targets")
            self.target_name = detect.targets[0].name
        target = detect.target(self.target_name)
        if target is None:
            raise LookupError(f"the STML has no target {self.target_name}")
        acl = [a.lower() for a in target.access.get("acl") or ()]
        for name in names.values():
            if acl and name.lower() not in acl:
                raise PermissionError(f"initiator {name} is not in the ACL of {self.target_name}")
        loop = asyncio.get_running_loop()
        for device_id, name in names.items():
            self._ready[device_id] = loop.create_future()
            self.link.register_nexus(device_id, name, self.target_name, 1)
        await asyncio.wait_for(asyncio.gather(*self._ready.values()), timeout)
        self.info = detect
        return detect

    def lun(self, lun: int) -> tuple[int, int]:
        """(block size, blocks) of one of the target's LUNs."""
        assert self.info is not None and self.target_name is not None   # open() first
        target = self.info.target(self.target_name)
        for x in target.luns if target else ():
            if x.lun == lun:
                return x.block_size, x.blocks
        raise LookupError(f"target {self.target_name} has no LUN {lun}")

    async def close(self) -> None:
        for device_id in list(self.link.nexuses):
            self.link.scsi_release(device_id)
        await self.link.close()

    # ---------------------------------------------------------------- Executor
    @staticmethod
    def tag(cmd: Command) -> int:
        """The contract's tag: unique among the live commands of this front end."""
        return cmd.initiator << 8 | cmd.tag

    def submit(self, cmd: Command) -> None:
        tag = self.tag(cmd)
        self._commands[tag] = cmd
        direction = (DataDir.WRITE if cmd.data_out else 0) | (DataDir.READ if cmd.data_in_len else 0)
        length = len(cmd.data_out) or cmd.data_in_len
        self.link.rx_cmnd(tag, cmd.initiator, cmd.lun, cmd.cdb, int(cmd.attr), int(direction), length,
                          len(cmd.data_out), [cmd.data_out] if cmd.data_out else ())

    def outcome(self, cmd: Command) -> simpy.Event:
        assert self.env is not None   # run() sets it
        event = self.env.event()
        tag = self.tag(cmd)
        answer = self._answers.pop(tag, None)
        if answer is not None:
            event.succeed(answer)
        else:
            self._waiting[tag] = event
        return event

    # ---------------------------------------------------------------- running
    async def advance(self, env: simpy.Environment, until: int | None) -> None:
        """Step the simulation up to `until` ps (None: until nothing is left to
        do), stopping its clock while it waits for an outcome."""
        self.env = env
        steps = 0
        while True:
            if self._failed:
                raise LinkFailed(self._failed)
            if self._waiting:
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), ANSWER_TIMEOUT)
                except TimeoutError:
                    tags = ", ".join(str(t) for t in self._waiting)
                    raise LinkFailed(f"the STML did not answer command(s) {tags} "
                                     f"in {ANSWER_TIMEOUT:.0f}s") from None
                continue
            if env.peek() == float("inf") or until is not None and env.peek() > until:
                break
            env.step()
            steps += 1
            if steps % YIELD_EVERY == 0:
                await asyncio.sleep(0)    # the link's heartbeats and sends
        if until is not None and env.now < until:
            env.run(until=until)

    # ---------------------------------------------------------------- STML calls
    def detect(self, detect: Detect) -> None:
        self.info = detect

    def nexus_ready(self, nexus: int, error: str | None) -> None:
        fut = self._ready.get(nexus)
        if fut is not None and not fut.done():
            if error:
                fut.set_exception(LookupError(f"nexus of initiator ID {nexus}: {error}"))
            else:
                fut.set_result(None)
        elif error:   # registered again by the link after a restart, and refused: as a drop
            self.drop_nexus(nexus, f"refused when registered again: {error}")

    def rdy_to_xfer(self, tag: int, offset: int, length: int) -> None:
        cmd = self._commands.get(tag)    # all of a write's data went with it; should more be asked
        if cmd is not None:
            self.link.scsi_rx_data(tag, offset, [cmd.data_out[offset:offset + length]])

    def xmit_response(self, tag: int, status: int, sense: bytes | None, resid: int, data: list) -> None:
        known = self._commands.pop(tag, None) is not None
        answer = Outcome(status, sense, b"".join(bytes(d) for d in data)) if known else None
        self.link.scsi_target_done([tag])   # the data is copied (or unwanted): the STML's again
        if answer is None:
            log.warning("response for unknown command tag %d ignored", tag)
            return
        event = self._waiting.pop(tag, None)
        if event is None:
            self._answers[tag] = answer
        else:
            event.succeed(answer)         # the clock stands still: same instant as asked
            self._changed.set()

    def task_mgmt_fn_done(self, tag: int, response: int, aborted: list[int], info: bytes = b"") -> None:
        pass   # fetd_spi sends no task management

    def report_aen(self, nexus: int | None, lun: int, sense: bytes) -> None:
        pass   # unit attentions also come back as CHECK CONDITION, as on a real bus

    def link_lost(self) -> None:
        if self._commands:
            self._failed = f"the STML went away with {len(self._commands)} command(s) in flight"
            self._changed.set()

    def drop_nexus(self, nexus: int, reason: str) -> None:
        self._failed = f"the STML dropped initiator ID {nexus}: {reason}"
        self._changed.set()


async def run_scenario(scenario: Scenario, endpoint: str, target: str | None = None,
                       trace: bool = False) -> tuple[Simulation, Results]:
    """Run one scenario against the STML at `endpoint`: the Results of the
    measured time (the scenario's duration), after which the initiators stop
    issuing and what is in flight completes (its data lands, unmeasured)."""
    executor = StmlExecutor(endpoint, target)
    await executor.open({s.id: scenario.initiator_name(s) for s in scenario.initiators})
    try:
        luns = {s.workload.lun for s in scenario.initiators}
        sizes = {executor.lun(n) for n in luns}
        if len(sizes) != 1:
            raise ValueError("the initiators' LUNs differ in size; give each its region")
        block_size, blocks = sizes.pop()
        sim = Simulation(scenario, executor, block_size, blocks, trace)
        sim.start()
        await executor.advance(sim.env, scenario.duration)
        results = collect(sim, scenario.duration)
        sim.stop()
        await executor.advance(sim.env, None)
    finally:
        await executor.close()
    return sim, results
