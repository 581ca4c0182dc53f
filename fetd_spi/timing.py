"""SCSI Parallel Interface timing: the bus's delays and transfer rates.

Simulated time is in integer picoseconds, so Fast-80's 12.5 ns and
Fast-160's 6.25 ns transfer periods are exact and runs are reproducible.

Sources: the "SCSI bus control timing values" tables of SPI-2 (T10/1142D)
through SPI-5 (T10/1525D), as drive manuals reproduce them (e.g. Seagate's
Parallel SCSI Interface Product Manual for Ultra160/Ultra320, 100293069;
Fujitsu MAN3xxx/MAW3xxx specifications, C141-E123/C141-C011). SCSI-2
(X3.131-1994, 5.2) gives the same values except a bus set delay of 1.8 us.
"""
from __future__ import annotations

from dataclasses import dataclass

PS = 1
NS = 1000 * PS
US = 1000 * NS
MS = 1000 * US
S = 1000 * MS

# --- bus control timing values (SPI-3/4/5) --------------------------------------
# minimum time a device waits after asserting BSY for arbitration before it looks
# at the data bus to see whether it won
ARBITRATION_DELAY = 2400 * NS
# maximum time to release every bus signal after BUS FREE is detected or SEL is
# seen during arbitration; the winner waits this plus a bus settle delay after SEL
BUS_CLEAR_DELAY = 800 * NS
# minimum time from detecting BUS FREE (BSY and SEL false for a bus settle delay)
# to asserting BSY for arbitration
BUS_FREE_DELAY = 800 * NS
# maximum time from detecting BUS FREE to asserting BSY and the own ID: a device
# that saw BUS FREE longer ago than this may not join the arbitration (SCSI-2: 1.8 us)
BUS_SET_DELAY = 1600 * NS
# time for the bus to settle after certain control signals change; BUS FREE is
# BSY and SEL false for this long
BUS_SETTLE_DELAY = 400 * NS
# maximum time for an initiator to release the data bus after I/O goes true
DATA_RELEASE_DELAY = 400 * NS
# system deskew delay: selection and reselection wait two of them at each step
DESKEW_DELAY = 45 * NS
# (the physical disconnection delay, 200 us, a target's wait before arbitrating
# again after honouring an initiator's DISCONNECT message, does not arise: in this
# model targets disconnect on their own)
# maximum time a selected device may take to answer with BSY, and the time an
# initiator whose selection timed out waits before releasing SEL
SELECTION_ABORT_TIME = 200 * US
# recommended minimum time an initiator waits for BSY before giving a selection up
SELECTION_TIMEOUT_DELAY = 250 * MS

# --- phase overheads of the model ----------------------------------------------
# BUS FREE begins when BSY and SEL go false; devices detect it a bus settle delay
# later and assert BSY a bus free delay after that
FREE_TO_ARBITRATION = BUS_SETTLE_DELAY + BUS_FREE_DELAY
# ARBITRATION: the arbitration delay, then the winner asserts SEL and waits a bus
# clear delay plus a bus settle delay before changing any signal
ARBITRATION_TIME = ARBITRATION_DELAY + BUS_CLEAR_DELAY + BUS_SETTLE_DELAY
# SELECTION: the initiator puts both IDs on the bus, waits two deskew delays,
# releases BSY, waits a bus settle delay for the target's BSY (the model's targets
# answer at once, well within the selection abort time), then waits two deskew
# delays before releasing SEL
SELECTION_TIME = 2 * DESKEW_DELAY + BUS_SETTLE_DELAY + 2 * DESKEW_DELAY
# RESELECTION: the same steps with I/O asserted, and one more: the target asserts
# BSY once the initiator answers and waits two deskew delays before releasing SEL
RESELECTION_TIME = SELECTION_TIME + 2 * DESKEW_DELAY
# a selection nobody answers: the selection time-out delay, then the selection abort
# time and two deskew delays before the initiator releases SEL (BUS FREE)
SELECTION_TIMEOUT_TIME = SELECTION_TIMEOUT_DELAY + SELECTION_ABORT_TIME + 2 * DESKEW_DELAY
# an information transfer phase begins with the target changing MSG, C/D and I/O:
# the model charges a bus settle delay, or the data release delay when I/O turns
# the data bus around from the initiator to the target
PHASE_CHANGE = BUS_SETTLE_DELAY
# COMMAND, MESSAGE and STATUS phases use asynchronous transfers, one byte per
# interlocked REQ/ACK handshake. Its speed comes from cable propagation and device
# response, not from the standard: SCSI-1 devices managed about 1.5 MB/s, SCSI-2's
# trimmed margins about 3 MB/s, and 5 MB/s is the ceiling on short cables. The
# model's default is SCSI-2's 3 MB/s (333 ns a handshake); --async-ns changes it.
ASYNC_HANDSHAKE = 333 * NS


@dataclass(frozen=True)
class TransferMode:
    """A negotiated DATA phase rate: one transfer (one byte narrow, two wide)
    per `period` picoseconds."""
    name: str
    period: int               # picoseconds per transfer
    wide_only: bool = False   # DT (double transition) clocking exists on wide buses only
    note: str = ""

    def rate(self, width: int) -> float:
        """Bytes per second on a bus `width` bits wide."""
        return (width // 8) * S / self.period

    def duration(self, nbytes: int, width: int) -> int:
        """Picoseconds to move `nbytes` in a DATA phase."""
        per = width // 8
        return -(-nbytes // per) * self.period


# SPI-2 (Fast-5 to Fast-40, ST: data latched on one REQ/ACK edge), SPI-3 (Fast-80 DT:
# on both edges, so a 25 ns REQ/ACK period moves data every 12.5 ns), SPI-4 (Fast-160
# DT with paced transfers). Fast-80 and Fast-160 are defined for wide buses only.
MODES: dict[str, TransferMode] = {m.name: m for m in (
    TransferMode("async", ASYNC_HANDSHAKE, note="asynchronous: one interlocked handshake per transfer"),
    TransferMode("fast-5", 200 * NS, note="5 MT/s, SCSI-1/SCSI-2 synchronous"),
    TransferMode("fast-10", 100 * NS, note="10 MT/s, Fast SCSI"),
    TransferMode("fast-20", 50 * NS, note="20 MT/s, Ultra"),
    TransferMode("fast-40", 25 * NS, note="40 MT/s, Ultra2"),
    TransferMode("fast-80", 12500 * PS, wide_only=True, note="80 MT/s DT, Ultra160"),
    TransferMode("fast-160", 6250 * PS, wide_only=True, note="160 MT/s DT paced, Ultra320"),
)}
ALIASES = {"ultra": "fast-20", "ultra2": "fast-40", "ultra160": "fast-80", "ultra320": "fast-160"}


def mode(name: str) -> TransferMode:
    """A transfer mode by its name or its marketing alias (ultra320 = fast-160)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in MODES:
        raise ValueError(f"{name!r} is not a transfer mode ({', '.join([*MODES, *ALIASES])})")
    return MODES[key]


def async_bytes(nbytes: int, handshake: int = ASYNC_HANDSHAKE) -> int:
    """Picoseconds for COMMAND, MESSAGE or STATUS bytes (asynchronous, narrow)."""
    return nbytes * handshake


def priority(device_id: int) -> int:
    """Arbitration priority, higher wins: 7 > 6 > ... > 0 > 15 > 14 > ... > 8
    (SPI: DB(7) is the highest; the wide bus's upper byte ranks below all of
    the lower byte, so narrow devices, which cannot see IDs 8-15, never lose
    to one they cannot see)."""
    return device_id + 8 if device_id < 8 else device_id - 8


def priority_order(width: int) -> list[int]:
    """The IDs of a `width`-bit bus, highest priority first."""
    return sorted(range(width), key=priority, reverse=True)
