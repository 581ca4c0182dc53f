"""A parallel SCSI bus as a discrete-event simulation (simpy).

Up to 8 devices on a narrow bus, 16 on a wide one. Devices with something
to do arbitrate when the bus goes free; the highest priority ID wins
(timing.priority) and runs one connection while the others wait for the
next BUS FREE. A connection is an initiator's selection, which carries a
command (MESSAGE OUT with IDENTIFY and a queue tag message, COMMAND, DATA
OUT for writes) and ends with the target disconnecting, or a target's
reselection, which returns the outcome (MESSAGE IN with IDENTIFY and the
tag, DATA IN for reads, STATUS, COMMAND COMPLETE). This is SPI's
non-packetized protocol with tagged queuing and disconnect/reselect.

Devices may run SPI's arbitration fairness algorithm (SPI-3 to SPI-5,
annex "Arbitration fairness"): a device that wins notes the lower-priority
IDs that arbitrated and lost, and stays out of arbitration until each of
them has won or stopped arbitrating. Without it, high IDs can hold a
saturated bus and low IDs starve.

What the target does with a command (the logical unit) is an Executor: the
real STML over the contract (fetd_spi.frontend), or anything else that
answers. The target's own service time (a disk's mechanics, a controller)
is a model parameter, not SPI's: the bus waits for neither.

Not modelled: SPI-4's information units (packetized transfers, which
Fast-160 requires in practice, with fewer phases per command), QAS,
REQUEST SENSE after CHECK CONDITION (the executor's sense data is kept as
autosense), parity and CRC errors, bus resets.
"""
from __future__ import annotations

import collections
import enum
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Protocol

import simpy

from fetd_spi import timing as T
from stml.api import TaskAttr

SimGen = Generator[simpy.Event, Any, Any]


class Phase(enum.StrEnum):
    BUS_FREE = "BUS FREE"
    ARBITRATION = "ARBITRATION"
    SELECTION = "SELECTION"
    RESELECTION = "RESELECTION"
    MESSAGE_OUT = "MESSAGE OUT"
    MESSAGE_IN = "MESSAGE IN"
    COMMAND = "COMMAND"
    DATA_OUT = "DATA OUT"
    DATA_IN = "DATA IN"
    STATUS = "STATUS"


# phases that move data from the initiator to the target (I/O false)
_OUTBOUND = {Phase.MESSAGE_OUT, Phase.COMMAND, Phase.DATA_OUT}

# what may follow each phase in the connections this model makes (SPI-5 figure
# "Phase sequences", non-packetized): a selection with ATN goes to MESSAGE OUT,
# a reselection to MESSAGE IN; the information phases follow the target's choice;
# MESSAGE IN (DISCONNECT, COMMAND COMPLETE) ends in BUS FREE
NEXT_PHASE: dict[Phase, frozenset[Phase]] = {
    Phase.BUS_FREE: frozenset({Phase.ARBITRATION}),
    Phase.ARBITRATION: frozenset({Phase.SELECTION, Phase.RESELECTION}),
    Phase.SELECTION: frozenset({Phase.MESSAGE_OUT, Phase.BUS_FREE}),   # BUS FREE: timed out
    Phase.RESELECTION: frozenset({Phase.MESSAGE_IN}),
    Phase.MESSAGE_OUT: frozenset({Phase.COMMAND, Phase.MESSAGE_IN}),
    Phase.COMMAND: frozenset({Phase.DATA_OUT, Phase.DATA_IN, Phase.STATUS, Phase.MESSAGE_IN}),
    Phase.DATA_OUT: frozenset({Phase.MESSAGE_IN, Phase.STATUS}),
    Phase.DATA_IN: frozenset({Phase.MESSAGE_IN, Phase.STATUS}),
    Phase.STATUS: frozenset({Phase.MESSAGE_IN}),
    Phase.MESSAGE_IN: frozenset({Phase.BUS_FREE, Phase.DATA_IN, Phase.DATA_OUT, Phase.STATUS}),
}

# messages (SPI-5 clause "SCSI messages")
COMMAND_COMPLETE = 0x00
SAVE_DATA_POINTER = 0x02
DISCONNECT = 0x04
IDENTIFY = 0x80
DISC_PRIV = 0x40            # IDENTIFY from the initiator: the target may disconnect
TAG_MESSAGES = {TaskAttr.SIMPLE: 0x20, TaskAttr.HEAD_OF_QUEUE: 0x21, TaskAttr.ORDERED: 0x22}
MAX_LUN = 7                 # the IDENTIFY message's LUN field as this model writes it


@dataclass(eq=False)
class Command:
    """One SCSI command of an initiator, from issue to COMMAND COMPLETE."""
    initiator: int
    tag: int                      # the queue tag (QUEUE TAG message), 0-255
    lun: int
    cdb: bytes
    attr: TaskAttr = TaskAttr.SIMPLE
    data_out: bytes = b""         # a write's data
    data_in_len: int = 0          # a read's expected length
    lba: int = 0                  # what the workload addressed (reports, read-back checks)
    issued: int = 0               # ps: the initiator had it ready
    sent: int | None = None       # ps: the target disconnected after taking it
    done: int | None = None       # ps: COMMAND COMPLETE
    status: int | None = None
    sense: bytes | None = None
    data_in: bytes = b""
    error: str | None = None      # no status: e.g. "selection timeout"


@dataclass(frozen=True)
class Outcome:
    status: int
    sense: bytes | None = None
    data: bytes = b""


class Executor(Protocol):
    """The logical unit behind the simulated target."""

    def submit(self, cmd: Command) -> None:
        """The target took the command off the bus: it starts now."""

    def outcome(self, cmd: Command) -> simpy.Event:
        """An event whose value is the command's Outcome (it may trigger later)."""
        ...


@dataclass
class Connection:
    """One connection's phases, as (phase, start ps, bytes moved or their count)."""
    kind: str                     # "selection" or "reselection"
    initiator: int
    target: int
    tag: int
    phases: list[tuple[Phase, int, bytes | int]] = field(default_factory=list)
    outbound: bool = True         # the last phase drove the data bus from the initiator


@dataclass
class Arbitration:
    """One arbitration, for traces: when it began, who took part, who won."""
    start: int
    contenders: tuple[int, ...]
    winner: int


class Device:
    """A device on the bus: it asks for the bus when it has something to do,
    and runs one connection each time it wins."""

    def __init__(self, bus: Bus, device_id: int, fair: bool = False) -> None:
        self.bus = bus
        self.id = device_id
        self.fair = fair
        self.register: set[int] = set()    # fairness: lower IDs that must win first
        self.waits: list[int] = []          # ps from asking for the bus to winning it
        self.lost = 0                       # arbitrations it took part in and lost
        bus.attach(self)

    def has_work(self) -> bool:
        raise NotImplementedError

    def connect(self) -> SimGen:
        raise NotImplementedError

    def may_arbitrate(self) -> bool:
        return not (self.fair and self.register)


class Bus:
    """The bus: its devices, its arbitration, and what its time went to."""

    def __init__(self, env: simpy.Environment, width: int = 8, mode: str = "fast-10",
                 async_handshake: int = T.ASYNC_HANDSHAKE, trace: bool = False) -> None:
        if width not in (8, 16):
            raise ValueError(f"a bus is 8 or 16 bits wide, not {width}")
        self.env = env
        self.width = width
        self.mode = T.mode(mode)
        if self.mode.wide_only and width != 16:
            raise ValueError(f"{self.mode.name} is defined for wide (16-bit) buses only")
        self.async_handshake = async_handshake
        self.devices: dict[int, Device] = {}
        self.requests: dict[int, int] = {}   # ID -> when it asked for the bus (arbitration order is by ID)
        self.phase_time: dict[Phase, int] = collections.Counter()
        self.connections: list[Connection] | None = [] if trace else None
        self.arbitrations: list[Arbitration] | None = [] if trace else None
        self._free_at = 0                    # BSY and SEL went false
        self._wake: simpy.Event | None = None
        env.process(self._arbiter())

    @property
    def now(self) -> int:
        """Simulated time in picoseconds (every delay is whole picoseconds)."""
        return int(self.env.now)

    def attach(self, device: Device) -> None:
        if not 0 <= device.id < self.width:
            raise ValueError(f"ID {device.id} is not on a {self.width}-bit bus (0-{self.width - 1})")
        if device.id in self.devices:
            raise ValueError(f"ID {device.id} is taken")
        self.devices[device.id] = device

    def request(self, device: Device) -> None:
        """The device wants the bus (again): it arbitrates at the next chance."""
        if device.id not in self.requests:
            self.requests[device.id] = self.now
            if self._wake is not None and not self._wake.triggered:
                self._wake.succeed()

    # ------------------------------------------------------------ arbitration
    def _arbiter(self) -> SimGen:
        env = self.env
        while True:
            while not self.requests:
                self._wake = env.event()
                yield self._wake
            begin = max(self.now, self._free_at + T.FREE_TO_ARBITRATION)
            if begin > self.now:
                yield env.timeout(begin - self.now)
            if not any(self.devices[i].may_arbitrate() for i in self.requests):
                # everyone with work waits for IDs that stopped arbitrating: nobody asserts
                # BSY within a bus set delay, and the waiting devices clear their fairness
                # registers (the annex's lockout, so such IDs cannot deadlock the bus)
                yield env.timeout(T.BUS_SET_DELAY)
                for i in self.requests:
                    self.devices[i].register.clear()
                continue
            begin = self.now
            yield env.timeout(T.ARBITRATION_DELAY)
            # those that asked within a bus set delay of the start assert BSY and their ID
            window = begin + T.BUS_SET_DELAY
            contenders = [i for i, asked in self.requests.items()
                          if asked <= window and self.devices[i].may_arbitrate()]
            winner = max(contenders, key=T.priority)
            yield env.timeout(T.BUS_CLEAR_DELAY + T.BUS_SETTLE_DELAY)
            self.phase_time[Phase.BUS_FREE] += begin - self._free_at
            self.phase_time[Phase.ARBITRATION] += self.now - begin
            self._fairness(contenders, winner)
            if self.arbitrations is not None:
                self.arbitrations.append(Arbitration(begin, tuple(sorted(contenders)), winner))
            device = self.devices[winner]
            device.waits.append(self.now - self.requests.pop(winner))
            yield from device.connect()
            self._free_at = self.now
            if device.has_work():
                self.request(device)

    def _fairness(self, contenders: list[int], winner: int) -> None:
        """Every fair device watches the arbitration: the winner notes those
        that lost (all lower than it); the others strike the winner and any
        ID that did not arbitrate this time off their registers."""
        took_part = set(contenders)
        for d in self.devices.values():
            if d.id == winner:
                d.register = took_part - {winner} if d.fair else set()
            else:
                if d.id in took_part:
                    d.lost += 1
                if d.fair:
                    d.register &= took_part
                    d.register.discard(winner)

    # ------------------------------------------------------------ phases
    def open(self, kind: str, initiator: int, target: int, tag: int) -> Connection:
        conn = Connection(kind, initiator, target, tag)
        if self.connections is not None:
            self.connections.append(conn)
        return conn

    def hold(self, conn: Connection, phase: Phase, what: bytes | int, duration: int) -> SimGen:
        """The bus spends `duration` in `phase` for this connection."""
        conn.phases.append((phase, self.now, what))
        yield self.env.timeout(duration)
        self.phase_time[phase] += duration

    def _change(self, conn: Connection, phase: Phase) -> int:
        outbound = phase in _OUTBOUND
        turn = conn.outbound and not outbound
        conn.outbound = outbound
        return T.DATA_RELEASE_DELAY if turn else T.PHASE_CHANGE

    def info(self, conn: Connection, phase: Phase, data: bytes) -> SimGen:
        """A COMMAND, MESSAGE or STATUS phase: asynchronous bytes."""
        yield from self.hold(conn, phase, data, self._change(conn, phase)
                             + T.async_bytes(len(data), self.async_handshake))

    def data(self, conn: Connection, phase: Phase, nbytes: int) -> SimGen:
        """A DATA phase at the negotiated rate and width."""
        yield from self.hold(conn, phase, nbytes, self._change(conn, phase)
                             + self.mode.duration(nbytes, self.width))


class Target(Device):
    """The simulated target: it takes commands off the bus, has the executor
    run them, holds each for its service time on its media (FIFO, `slots` at
    once), then reselects the initiator, in the order they finish."""

    def __init__(self, bus: Bus, device_id: int, executor: Executor, service: Callable[[Command], int],
                 slots: int = 1, fair: bool = False) -> None:
        super().__init__(bus, device_id, fair)
        self.executor = executor
        self.service = service
        self.media = simpy.Resource(bus.env, capacity=slots)
        self.ready: collections.deque[Command] = collections.deque()

    def has_work(self) -> bool:
        return bool(self.ready)

    def accept(self, cmd: Command) -> None:
        self.executor.submit(cmd)
        self.bus.env.process(self._serve(cmd))

    def _serve(self, cmd: Command) -> SimGen:
        with self.media.request() as slot:
            yield slot
            yield self.bus.env.timeout(self.service(cmd))
        out: Outcome = yield self.executor.outcome(cmd)
        cmd.status, cmd.sense, cmd.data_in = out.status, out.sense, out.data
        self.ready.append(cmd)
        self.bus.request(self)

    def connect(self) -> SimGen:
        bus = self.bus
        cmd = self.ready.popleft()
        conn = bus.open("reselection", cmd.initiator, self.id, cmd.tag)
        yield from bus.hold(conn, Phase.RESELECTION, b"", T.RESELECTION_TIME)
        conn.outbound = False
        yield from bus.info(conn, Phase.MESSAGE_IN, bytes([IDENTIFY | cmd.lun, TAG_MESSAGES[cmd.attr], cmd.tag]))
        if cmd.data_in:
            yield from bus.data(conn, Phase.DATA_IN, len(cmd.data_in))
        assert cmd.status is not None   # _serve set it
        yield from bus.info(conn, Phase.STATUS, bytes([cmd.status]))
        yield from bus.info(conn, Phase.MESSAGE_IN, bytes([COMMAND_COMPLETE]))
        initiator = bus.devices[cmd.initiator]
        assert isinstance(initiator, Initiator)
        initiator.finish(cmd)


class Initiator(Device):
    """An initiator: commands queue until it wins the bus; each connection
    selects the target and hands over the oldest one."""

    def __init__(self, bus: Bus, device_id: int, target_id: int, fair: bool = False) -> None:
        super().__init__(bus, device_id, fair)
        self.target_id = target_id
        self.unsent: collections.deque[Command] = collections.deque()
        self.completed: list[Command] = []
        self.on_done: Callable[[Command], None] = lambda cmd: None

    def issue(self, cmd: Command) -> None:
        if not 0 <= cmd.lun <= MAX_LUN:
            raise ValueError(f"LUN {cmd.lun} does not fit the IDENTIFY message (0-{MAX_LUN})")
        cmd.issued = self.bus.now
        self.unsent.append(cmd)
        self.bus.request(self)

    def has_work(self) -> bool:
        return bool(self.unsent)

    def finish(self, cmd: Command) -> None:
        cmd.done = self.bus.now
        self.completed.append(cmd)
        self.on_done(cmd)

    def connect(self) -> SimGen:
        bus = self.bus
        cmd = self.unsent.popleft()
        conn = bus.open("selection", self.id, self.target_id, cmd.tag)
        target = bus.devices.get(self.target_id)
        if not isinstance(target, Target):
            yield from bus.hold(conn, Phase.SELECTION, b"", T.SELECTION_TIMEOUT_TIME)
            cmd.error = "selection timeout"
            self.finish(cmd)
            return
        yield from bus.hold(conn, Phase.SELECTION, b"", T.SELECTION_TIME)
        yield from bus.info(conn, Phase.MESSAGE_OUT,
                            bytes([IDENTIFY | DISC_PRIV | cmd.lun, TAG_MESSAGES[cmd.attr], cmd.tag]))
        yield from bus.info(conn, Phase.COMMAND, cmd.cdb)
        if cmd.data_out:
            yield from bus.data(conn, Phase.DATA_OUT, len(cmd.data_out))
            yield from bus.info(conn, Phase.MESSAGE_IN, bytes([SAVE_DATA_POINTER, DISCONNECT]))
        else:
            yield from bus.info(conn, Phase.MESSAGE_IN, bytes([DISCONNECT]))
        cmd.sent = bus.now
        target.accept(cmd)
