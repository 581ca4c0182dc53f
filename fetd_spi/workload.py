"""Workload generators: what each simulated initiator asks of the target."""
from __future__ import annotations

import random
import struct
from dataclasses import dataclass

from fetd_spi.bus import MAX_LUN, Command, Initiator, SimGen
from stml.api import Status, TaskAttr

READ_10, WRITE_10 = 0x28, 0x2A
_HEADER = struct.Struct(">4sBxxxQ")   # magic, initiator ID, LBA: the first 16 bytes of a block
MAGIC = b"SPI!"


def block_pattern(initiator: int, lba: int, block_size: int) -> bytes:
    """What an initiator writes to one block: who wrote it and where, so a
    read (through the bus or iSCSI) tells whether the right data landed."""
    return _HEADER.pack(MAGIC, initiator, lba) + bytes([0x40 + initiator]) * (block_size - _HEADER.size)


def block_writer(block: bytes) -> tuple[int, int] | None:
    """(initiator ID, LBA) a block_pattern block names; None for other data."""
    magic, initiator, lba = _HEADER.unpack_from(block)
    return (initiator, lba) if magic == MAGIC else None


@dataclass
class Workload:
    """One initiator's load: `queue_depth` commands kept in flight, each of
    `blocks` blocks, in its own region of the LUN."""
    queue_depth: int = 1
    blocks: int = 8
    read_fraction: float = 1.0        # 1.0 reads only, 0.0 writes only
    region_start: int = 0             # first LBA of the initiator's region
    region_blocks: int = 8192
    sequential: bool = False
    attr: TaskAttr = TaskAttr.SIMPLE
    think: int = 0                    # ps between a command's completion and the next in its slot
    lun: int = 0

    def check(self) -> None:
        if not 0 <= self.lun <= MAX_LUN:
            raise ValueError(f"LUN {self.lun} does not fit the IDENTIFY message (0-{MAX_LUN})")
        if not 1 <= self.queue_depth <= 256:
            raise ValueError(f"queue depth {self.queue_depth} is not 1-256 (a queue tag is one byte)")
        if not 1 <= self.blocks <= min(self.region_blocks, 0xFFFF):
            raise ValueError(f"{self.blocks} blocks per command do not fit the region or READ(10)")
        if not 0.0 <= self.read_fraction <= 1.0:
            raise ValueError(f"read fraction {self.read_fraction} is not 0-1")


class Generator:
    """Drives one Initiator: fills its queue depth, and after each completion
    issues the next command in the freed slot (the slot is the queue tag)."""

    def __init__(self, initiator: Initiator, workload: Workload, block_size: int, seed: int = 0) -> None:
        workload.check()
        self.initiator = initiator
        self.workload = workload
        self.block_size = block_size
        self.rng = random.Random(seed * 1000 + initiator.id)
        self.next_lba = workload.region_start
        self.running = False
        self.bad_reads = 0               # reads that returned blocks another LBA or initiator wrote
        initiator.on_done = self._done

    def start(self) -> None:
        self.running = True
        for tag in range(self.workload.queue_depth):
            self.initiator.issue(self._command(tag))

    def stop(self) -> None:
        """Issue nothing more; what is in flight completes."""
        self.running = False

    def _command(self, tag: int) -> Command:
        w = self.workload
        if w.sequential:
            lba = self.next_lba
            self.next_lba += w.blocks
            if self.next_lba + w.blocks > w.region_start + w.region_blocks:
                self.next_lba = w.region_start
        else:
            lba = w.region_start + self.rng.randrange(w.region_blocks - w.blocks + 1)
        read = self.rng.random() < w.read_fraction
        cdb = struct.pack(">BBIBHB", READ_10 if read else WRITE_10, 0, lba, 0, w.blocks, 0)
        nbytes = w.blocks * self.block_size
        data = b"" if read else b"".join(block_pattern(self.initiator.id, lba + i, self.block_size)
                                         for i in range(w.blocks))
        return Command(self.initiator.id, tag, w.lun, cdb, w.attr, data, nbytes if read else 0, lba)

    def _done(self, cmd: Command) -> None:
        if cmd.status == Status.GOOD and cmd.data_in:
            self._check_read(cmd)
        if not self.running:
            return
        if self.workload.think:
            self.initiator.bus.env.process(self._later(cmd.tag))
        else:
            self.initiator.issue(self._command(cmd.tag))

    def _later(self, tag: int) -> SimGen:
        yield self.initiator.bus.env.timeout(self.workload.think)
        if self.running:
            self.initiator.issue(self._command(tag))

    def _check_read(self, cmd: Command) -> None:
        """Blocks this initiator wrote must come back where it wrote them."""
        bs = self.block_size
        for i in range(len(cmd.data_in) // bs):
            who = block_writer(cmd.data_in[i * bs:(i + 1) * bs])
            if who is not None and who[1] != cmd.lba + i:
                self.bad_reads += 1
