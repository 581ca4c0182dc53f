"""Full feature phase: sessions, connections and tasks, without sockets.

A Connection takes decoded PDUs (`receive`) and STML calls (`rdy_to_xfer`,
`xmit_response`, `task_mgmt_fn_done` ...) and emits PDUs through its `out`
callable and STML calls through the front end's link. It holds the iSCSI
rules: the CmdSN window and command ordering, R2T generation within
MaxBurstLength / MaxOutstandingR2T, Data-Out checks, Data-In split at the
initiator's MaxRecvDataSegmentLength, StatSN, NOP, Text, TMF and Logout.
No SCSI logic lives here: CDBs go to the STML untouched.
"""
from __future__ import annotations

import functools
import itertools
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Final, Protocol

from fetd_tcp import pdu as P
# (by name, for the per-command path: the compiled build reads P.x as an attribute of a module)
from fetd_tcp.pdu import (SCSI_COMMAND_TYPE, DataIn, encode_data_in, encode_data_in_status,
                          encode_read_done, encode_scsi_status, new_pdu)
from fetd_tcp import budget as B
from fetd_tcp.budget import Account, Grant, unlimited
from fetd_tcp.keys import ConnectionParams, SessionParams
from fetd_tcp.retain import announced
from stml.api import DataDir, Status, TaskAttr

TASK_SET_FULL = int(Status.TASK_SET_FULL)

# What one session or connection may make us hold beyond the command window
OOO_LIMIT = 1 << 20           # data of PDUs waiting for an earlier CmdSN, per session
MAX_TMFS = 16                 # task management requests the STML has not answered, per session
MAX_TEXT_REQUEST = 64 << 10   # a Text request continued over several PDUs (C bit)
MAX_TEXT_RESPONSE = 1 << 20   # one Text response (SendTargets); longer ones are cut (server)
# ErrorRecoveryLevel >= 1 keeps numbered responses until ExpStatSN acknowledges them (for
# status SNACK); those of no task (NOP-In, Text, Reject, TMF...) within these bounds
MAX_KEPT_OTHER = 32
MAX_KEPT_OTHER_BYTES = 256 << 10

log = logging.getLogger("fetd_tcp")

# (Final, these and the tables below: the compiled build uses them in place, not
# through the module's dict, per command)
SN_MOD: Final = 1 << 32
# responses that take a StatSN of their own (RFC 7143 4.2.2.2), kept for a status SNACK
_NUMBERED = frozenset((P.Reject, P.ScsiResponse, P.TaskMgmtResponse, P.NopIn, P.TextResponse,
                       P.LogoutResponse, P.AsyncMessage))
_PDU_OVERHEAD: Final = 64   # a Data-In or response header with its digests and padding, rounded up
Out = Callable[[Any, bytes | memoryview], None]   # (PDU header object, data segment)

# plain ints on the per-command path (enum arithmetic costs microseconds)
ATTRS: Final = {P.ATTR_UNTAGGED: int(TaskAttr.SIMPLE), P.ATTR_SIMPLE: int(TaskAttr.SIMPLE),
         P.ATTR_ORDERED: int(TaskAttr.ORDERED), P.ATTR_HEAD_OF_QUEUE: int(TaskAttr.HEAD_OF_QUEUE),
         P.ATTR_ACA: int(TaskAttr.ACA)}
_WRITE: Final = int(DataDir.WRITE)
_READ: Final = int(DataDir.READ)
# the LUN field of the first 256 LUNs (peripheral addressing, as initiators send
# them) -> the LUN: a lookup instead of a call to P.lun_to_int, per command
_LUNS: Final = {P.int_to_lun(n): n for n in range(256)}
# the task management functions the STML carries out (ABORT TASK and QUERY TASK name a
# task, TASK REASSIGN is iSCSI's own); the STML's responses are iSCSI's codes, RFC 7144's
# "function succeeded" (7) included
_FORWARDED = frozenset((P.TMF_ABORT_TASK_SET, P.TMF_CLEAR_ACA, P.TMF_CLEAR_TASK_SET,
                        P.TMF_LOGICAL_UNIT_RESET, P.TMF_TARGET_WARM_RESET,
                        P.TMF_TARGET_COLD_RESET, P.TMF_QUERY_TASK_SET, P.TMF_I_T_NEXUS_RESET,
                        P.TMF_QUERY_ASYNC_EVENT))


def sn_lt(a: int, b: int) -> bool:
    """Serial number arithmetic (RFC 1982) on 32-bit sequence numbers."""
    return a != b and ((b - a) % SN_MOD) < (1 << 31)


def sn_le(a: int, b: int) -> bool:
    return ((b - a) % SN_MOD) < (1 << 31)   # sn_lt or equal, in one test (per command)


class Link(Protocol):
    """The calls a session makes toward the STML (stml.api.FrontEndLink)."""

    def rx_cmnd(self, tag: int, nexus: int, lun: int, cdb: bytes, attr: int, direction: int,
                length: int, unsol: int = 0, data: list | tuple = ()) -> None: ...
    def scsi_rx_data(self, tag: int, offset: int, data: list | tuple,
                     error: str | None = None) -> None: ...
    def rx_task_mgmt_fn(self, tag: int, nexus: int, fn: int, lun: int, ref: int | None) -> None: ...
    def hold(self) -> None: ...
    def flush(self) -> None: ...
    def register_nexus(self, nexus: int, initiator: str, target: str, tpg: int,
                       held_by: str | None = None) -> None: ...
    def scsi_release(self, nexus: int, lost: bool = False) -> None: ...


class Tags:
    """Front-end-wide task tags: the STML knows tasks by these, not by ITT,
    because ITTs are only unique within one session."""

    def __init__(self) -> None:
        self.new: Callable[[], int] = itertools.count(1).__next__   # a C call per command
        self.tasks: dict[int, Task] = {}
        # an initiator's TMF sent to the STML: tag -> (conn, itt, function, the referenced
        # task's tag or None)
        self.tmfs: dict[int, tuple[Connection, int, int, int | None]] = {}


class Task:
    __slots__ = ("conn", "itt", "tag", "lun", "edtl", "write", "unsol_end", "next_offset",
                 "r2t_sn", "data_sn", "bursts", "r2ts", "unsol_data_sn", "failed", "held",
                 "res_read", "res_write", "grant", "status", "stat_sn", "rdata", "kept",
                 "acked_dsn", "ack_ttt", "progress", "expired")

    def __init__(self, conn: Connection, itt: int, tag: int, lun: bytes, edtl: int, write: bool) -> None:
        self.conn = conn
        self.itt = itt
        self.tag = tag
        self.lun = lun
        self.edtl = edtl
        self.write = write
        self.unsol_end = 0          # unsolicited data ends here
        self.next_offset = 0        # in-order write data received so far
        self.r2t_sn = 0
        self.data_sn = 0            # Data-In PDUs sent
        # solicited ranges [offset, end] not yet asked for: cut into bursts as R2Ts go out,
        # so a small MaxBurstLength costs no memory per burst
        self.bursts: list[list[int]] = []
        self.r2ts: dict[int, list[int]] = {}   # TTT -> [offset, end, next DataSN, R2TSN] outstanding
        self.unsol_data_sn = 0
        self.failed = False         # its data went wrong; the STML has been told
        self.held = 0               # write data counted against conn.write_limit until answered
        self.res_read = 0           # reserved in the budget for its read data, until answered
        self.res_write = 0          # reserved in the budget for its write data, until answered
        self.grant: Grant | None = None   # its solicited data waits for room in the budget
        # ErrorRecoveryLevel >= 1: what a SNACK or a TASK REASSIGN may ask for again, kept
        # (counted in the budget as "keep") until the initiator acknowledges it
        # (status, sense, residual count, overflow, underflow, the PDU that carried it or
        # None, that PDU's data segment)
        self.status: tuple[Any, ...] | None = None
        self.stat_sn = 0
        self.rdata: bytes | None = None   # its read data
        self.kept = 0                     # bytes counted as "keep" for it
        self.acked_dsn = 0                # Data-In below this DataSN acknowledged (DataACK)
        self.ack_ttt = P.RESERVED_TAG     # the TTT of its Data-In with the A bit
        self.progress = 0                 # Data-Out PDUs received (a stalled burst is recovered)
        self.expired = False              # its connection's Time2Retain ran out


@dataclass(eq=False)
class Session:
    tsih: int
    isid: bytes
    initiator: str
    target: str
    tpgt: int
    params: SessionParams
    nexus: int
    exp_cmd_sn: int
    window: int
    discovery: bool = False
    max_transfer: int = 8 << 20   # the most data one command moves (the STML's limit)
    # ERL 2: the most seconds a failed connection's tasks are kept (fetd_tcp.retain);
    # by default Time2Wait + Time2Retain at their largest, i.e. as negotiated
    max_retain: float = 2 * 3600
    connections: dict[int, Connection] = field(default_factory=dict)
    itts: dict[int, Task] = field(default_factory=dict)
    # CmdSN -> (connection, PDU, data); data None: it did not fit (answered TASK SET FULL)
    queued: dict[int, tuple[Connection, Any, Any]] = field(default_factory=dict)
    queued_bytes: int = 0   # data held in `queued`, within OOO_LIMIT
    tmfs: int = 0           # TMFs the STML has not answered
    last_max: int = -1      # MaxCmdSN as last computed; it never goes back
    # ErrorRecoveryLevel >= 1: tasks answered whose status is not yet acknowledged (ExpStatSN)
    kept: dict[int, Task] = field(default_factory=dict)
    # ErrorRecoveryLevel 2: connections that failed with tasks that a TASK REASSIGN may
    # still claim, by CID, until Time2Wait + Time2Retain pass
    failed: dict[int, Connection] = field(default_factory=dict)
    # a Logout closed the session (reason 0): what failed connections kept goes
    # with it, and its initiator ended it (no I_T NEXUS LOSS later: 0234)
    logged_out: bool = False
    # its initiator was told of it (a final Login Response went out): until
    # then its end is no I_T nexus loss to anyone (0236)
    answered: bool = False

    @property
    def erl(self) -> int:
        return self.params.error_recovery_level

    @property
    def max_cmd_sn(self) -> int:
        """A window of `window` commands the STML has not answered: ExpCmdSN +
        window - 1 - tasks in flight, so MaxCmdSN advances as commands complete
        (the task table stays within the window). While a connection is over one
        of its bounds (write_limit, read_limit) it stays put. Never lower than it
        was: the initiator may already send up to it."""
        last = self.last_max
        if last >= 0:
            if len(self.kept) >= self.window:
                return last     # the initiator does not acknowledge status: hold it to that
            for c in self.connections.values():   # (per command: no calls)
                kinds = c.account.kinds
                if c.write_held >= c.write_limit or kinds[B.READ] + kinds[B.OUT] + kinds[B.KEEP] >= c.read_limit:
                    return last
        new = (self.exp_cmd_sn + self.window - 1 - len(self.itts)) % SN_MOD
        if last < 0 or 0 < (new - last) % SN_MOD < (1 << 31):
            self.last_max = new
        return self.last_max

    @property
    def initiator_port(self) -> str:
        """SCSI initiator port name for iSCSI (RFC 7143 10.2.1.8)."""
        return f"{self.initiator},i,0x{self.isid.hex()}"


class Connection:
    """One TCP connection in full feature phase."""

    def __init__(self, session: Session, cid: int, params: ConnectionParams, stat_sn: int,
                 out: Out, link: Link, tags: Tags, close: Callable[[], None],
                 text: Callable[[Connection, list[tuple[str, str]]], list[tuple[str, str]]],
                 write_limit: int = 64 << 20, read_limit: int = 64 << 20,
                 account: Account | None = None) -> None:
        self.session = session
        self.cid = cid
        self.params = params
        # what every command reads of the negotiation (fetd_tcp.keys is not compiled: each
        # read of its dataclasses is a generic attribute lookup): the largest Data-In
        # segment, MaxBurstLength, and the largest immediate data (0: none allowed)
        sp = session.params
        self.seg_max = params.max_send_data_segment_length
        self.burst = sp.max_burst_length
        self.immediate_max = (min(params.max_recv_data_segment_length, sp.first_burst_length)
                              if sp.immediate_data else 0)
        self.stat_sn = stat_sn
        self.out = out
        self.send = out      # output as it is (self.out may keep what it sends first)
        # output that takes a header already encoded (PduWriter.encoded): the usual
        # response is packed from its fields, without a PDU tuple (per command)
        self.encoded: Callable[[bytes, bytes | memoryview], None] | None = getattr(out, "encoded", None)
        self.link = link
        # bound once: each command reaches the link without a method lookup on a protocol
        self.rx_cmnd: Callable[[int, int, int, bytes, int, int, int, int, list | tuple], None] = link.rx_cmnd
        self.tags = tags
        self.close = close
        self.text = text
        self.ttts = itertools.count(1)
        self.text_in = bytearray()       # a Text request continued over several PDUs
        self.text_out: memoryview | None = None   # a Text response continued over several PDUs
        self.text_pos = 0                # how much of text_out has been sent
        self.text_ttt: int | None = None   # the TTT that continues either
        self.closing = False
        self.idle = True                 # no PDU since the last NOP interval
        self.local_addr: tuple[str, int] | None = None   # where the initiator reached us
        self.ping_ttt: int | None = None
        # write data handed (or solicited) for the STML and not yet answered: past
        # write_limit, R2Ts wait (but the oldest task waiting for them) and MaxCmdSN stops
        self.write_held = 0
        self.write_limit = write_limit
        self.waiting: dict[Task, None] = {}   # tasks with bursts not yet solicited, oldest first
        # read data reserved for commands and output not yet taken by the socket: past
        # read_limit, reads get TASK SET FULL and MaxCmdSN stops (a non-reading initiator)
        self.read_limit = read_limit
        # every byte the connection makes us hold, in the front end's budget; its output
        # ("out") is counted only when there is one: its writer samples the socket then
        self.account = account if account is not None else unlimited()
        self.count_out = account is not None
        # ErrorRecoveryLevel >= 1: numbered responses not yet acknowledged, in StatSN order
        # (a Task for its status, else the PDU and its data), and a failed connection (ERL 2)
        self.erl = session.params.error_recovery_level
        self.unacked: dict[int, Task | tuple[Any, bytes]] = {}
        self.other_bytes = 0            # data of the non-task responses kept
        self.exp_stat_sn = stat_sn      # the initiator's acknowledgement so far
        self.failed = False             # ERL 2: dead, its tasks wait for TASK REASSIGN
        self.gone = False               # the front end has dropped it
        self.aborting = 0               # its expired tasks the STML is still aborting
        self.bad_headers = 0            # header digest errors in a row
        # the front end's part when a connection fails at ERL 2 (times Time2Retain)
        self.on_failed: Callable[[Connection], None] = lambda conn: None
        if self.erl:
            self.out = self._out_keeping
        self._dispatch: dict[type, Callable[[Any, Any], None]] = {
            P.ScsiCommand: self._ordered, P.TaskMgmtRequest: self._ordered,
            P.TextRequest: self._ordered, P.LogoutRequest: self._ordered,
            P.NopOut: self._ordered, P.DataOut: self._data_out, P.Snack: self._snack,
        }
        self._run: dict[type, Callable[[Any, Any], None]] = {
            P.ScsiCommand: self._scsi_command, P.TaskMgmtRequest: self._task_mgmt,
            P.TextRequest: self._text, P.LogoutRequest: self._logout, P.NopOut: self._nop_out,
        }

    # ------------------------------------------------------------ numbers
    def _sns(self) -> tuple[int, int]:
        s = self.session
        return s.exp_cmd_sn, s.max_cmd_sn

    def _next_stat_sn(self) -> int:
        sn = self.stat_sn
        self.stat_sn = (sn + 1) % SN_MOD
        return sn

    # ------------------------------------------------------------ ERL >= 1: what is kept
    def _out_keeping(self, pdu: Any, data: bytes | memoryview) -> None:
        """Output at ErrorRecoveryLevel >= 1: a numbered response of no task is
        kept (within MAX_KEPT_OTHER and MAX_KEPT_OTHER_BYTES, the oldest going
        first) until ExpStatSN acknowledges it, for a status SNACK."""
        if type(pdu) in _NUMBERED and not (type(pdu) is P.NopIn and pdu.itt == P.RESERVED_TAG) \
                and pdu.stat_sn not in self.unacked:
            n = len(data)
            if n <= MAX_KEPT_OTHER_BYTES and self.account.take(B.KEEP, n, force=True):
                self.unacked[pdu.stat_sn] = (pdu, bytes(data))
                self.other_bytes += n
                self._trim_other()
        self.send(pdu, data)

    def _trim_other(self) -> None:
        others = [sn for sn, e in self.unacked.items() if not isinstance(e, Task)]
        while others and (len(others) > MAX_KEPT_OTHER or self.other_bytes > MAX_KEPT_OTHER_BYTES):
            entry = self.unacked.pop(others.pop(0))
            assert not isinstance(entry, Task)
            self.other_bytes -= len(entry[1])
            self.account.give(B.KEEP, len(entry[1]))

    def acknowledge(self, exp_stat_sn: int) -> None:
        """ExpStatSN from the initiator: every response before it arrived, so
        what was kept for it goes (a task whose status is acknowledged is over)."""
        if exp_stat_sn == self.exp_stat_sn or not sn_le(exp_stat_sn, self.stat_sn) \
                or not sn_lt(self.exp_stat_sn, exp_stat_sn):
            return
        self.exp_stat_sn = exp_stat_sn
        unacked = self.unacked
        s = self.session
        opened = len(s.kept) >= s.window
        while unacked:
            sn = next(iter(unacked))
            if not sn_lt(sn, exp_stat_sn):
                break
            entry = unacked.pop(sn)
            if isinstance(entry, Task):
                self._forget(entry)
            else:
                self.other_bytes -= len(entry[1])
                self.account.give(B.KEEP, len(entry[1]))
        if opened and len(s.kept) < s.window:
            self.window_update()

    def _forget(self, task: Task) -> None:
        """A task whose status was acknowledged (or that expired): its data goes."""
        if self.session.kept.get(task.itt) is task:
            del self.session.kept[task.itt]
        if task.kept:
            task.conn.account.give(B.KEEP, task.kept)
            task.kept = 0
        task.rdata = task.status = None

    def _keep(self, task: Task, n: int) -> None:
        task.kept += n
        self.account.take(B.KEEP, n, force=True)   # already in memory: counted, and it
        # holds the window shut past read_limit (Session.max_cmd_sn)

    def reject(self, reason: int, header: bytes | memoryview) -> None:
        exp, mx = self._sns()
        self.out(P.Reject(reason, self._next_stat_sn(), exp, mx), bytes(header[:P.BHS_LEN]))

    # ------------------------------------------------------------ input
    def receive(self, pdu: Any, data: bytes | memoryview) -> None:
        """One PDU from the initiator. Raises P.PDUError for a protocol error
        the caller answers with Reject (the PDU is otherwise ignored)."""
        command = type(pdu) is SCSI_COMMAND_TYPE   # the usual PDU: called directly, not by the table
        handler = None if command else self._dispatch.get(type(pdu))
        if handler is None and not command:
            raise P.PDUError(f"{type(pdu).__name__} not allowed in full feature phase",
                             P.REJECT_PROTOCOL_ERROR)
        if self.erl:
            self.bad_headers = 0
            self.acknowledge(pdu.exp_stat_sn)
        if handler is None:
            self._ordered(pdu, data)
        else:
            handler(pdu, data)

    def _ordered(self, pdu: Any, data: Any) -> None:
        """Deliver non-immediate PDUs in CmdSN order; immediate ones at once."""
        s = self.session
        if pdu.immediate:
            self._run[type(pdu)](pdu, data)
            return
        sn: int = pdu.cmd_sn   # (declared: native arithmetic in the compiled build)
        # within MaxCmdSN as last advertised (it never goes back: no need to compute it again)
        if sn == s.exp_cmd_sn and ((s.last_max - sn) % SN_MOD < (1 << 31) or sn_le(sn, s.max_cmd_sn)):
            s.exp_cmd_sn = (sn + 1) % SN_MOD
            if type(pdu) is SCSI_COMMAND_TYPE:   # (as in receive)
                self._scsi_command(pdu, data)
            else:
                self._run[type(pdu)](pdu, data)
            while s.queued and s.exp_cmd_sn in s.queued:
                conn, qpdu, qdata = s.queued.pop(s.exp_cmd_sn)
                s.exp_cmd_sn = (s.exp_cmd_sn + 1) % SN_MOD
                if qdata:
                    s.queued_bytes -= len(qdata)
                    conn.account.give(B.OOO, len(qdata))
                if qpdu is None:       # aborted before it arrived
                    continue
                if qdata is None:      # its data was not kept
                    conn._no_room(qpdu)
                else:
                    conn._run[type(qpdu)](qpdu, qdata)
        elif sn_lt(s.exp_cmd_sn, sn) and sn_le(sn, s.max_cmd_sn) and sn not in s.queued:
            self._queue(sn, pdu, data)   # a gap: wait for the missing CmdSN
        else:
            log.debug("CmdSN %d outside window [%d, %d]: discarded", sn, s.exp_cmd_sn, s.max_cmd_sn)

    def _queue(self, sn: int, pdu: Any, data: Any) -> None:
        """Keep a PDU that came before its turn. Its data counts in the budget
        and within OOO_LIMIT per session; when it does not fit, the PDU is kept
        without it and refused in its turn (_no_room): the initiator learns at
        once instead of waiting for an answer that never comes."""
        s = self.session
        n = len(data)
        if n and (s.queued_bytes + n > OOO_LIMIT or not self.account.take(B.OOO, n)):
            s.queued[sn] = (self, pdu, None)
            return
        s.queued_bytes += n
        s.queued[sn] = (self, pdu, bytes(data))

    def _no_room(self, pdu: Any) -> None:
        if isinstance(pdu, P.ScsiCommand):
            self._task_set_full(pdu.itt)
        else:
            self.reject(P.REJECT_OUT_OF_RESOURCES, pdu.encode())

    def _task_set_full(self, itt: int) -> None:
        exp, mx = self._sns()
        self.out(P.ScsiResponse(itt, TASK_SET_FULL, self._next_stat_sn(), exp, mx), b"")

    # ------------------------------------------------------------ SCSI commands
    def _scsi_command(self, cmd: P.ScsiCommand, data: Any) -> None:
        """A command goes to the STML only when what it may make us hold fits:
        its immediate and unsolicited data and its read data are reserved now.
        Otherwise TASK SET FULL (the initiator retries): nothing is held for it."""
        s = self.session
        # every field in one unpack: a NamedTuple field read is a descriptor call (per command)
        itt, lun_b, cdb, edtl, _, _, read, write, attr, final, immediate, _, _ = cmd
        n = len(data)
        if s.discovery:
            self.reject(P.REJECT_PROTOCOL_ERROR, cmd.encode())  # no SCSI in discovery sessions
            return
        if itt in s.itts:
            self.reject(P.REJECT_TASK_IN_PROGRESS, cmd.encode())
            return
        if n and (n > self.immediate_max or not write or n > edtl):
            self.reject(P.REJECT_PROTOCOL_ERROR, cmd.encode())
            return
        unsol = n
        if write and not final and not s.params.initial_r2t:
            unsol = min(s.params.first_burst_length, edtl)
        need = read_held = 0
        account = self.account
        if read and edtl:
            # its data (min() costs a builtin call: per command), a header per Data-In, a status
            need = edtl if edtl < s.max_transfer else s.max_transfer
            need += (need // self.seg_max + need // self.burst + 2) * _PDU_OVERHEAD
            kinds = account.kinds
            read_held = kinds[B.READ] + kinds[B.OUT]   # reserved, and output not yet sent
        if ((write and immediate and self.write_held >= self.write_limit)
                or (need and read_held and read_held + need > self.read_limit)):
            # immediate writes bypass the window that holds other writes back; a read
            # past read_limit (unless it is the connection's only one)
            self._task_set_full(itt)
            return
        if immediate and len(s.itts) >= s.window:
            # immediate commands bypass the CmdSN window, not the bound on tasks in flight
            self.reject(P.REJECT_IMMEDIATE_COMMAND_REJECT, cmd.encode())
            return
        if (unsol or need) and not account.take(B.WRITE if unsol else B.READ, unsol + need):
            self._task_set_full(itt)    # no room in the budget
            return
        tags = self.tags
        tag = tags.new()
        task = Task(self, itt, tag, lun_b, edtl, write)
        s.itts[itt] = task
        tags.tasks[tag] = task
        if write:
            direction = (_WRITE | _READ) if read else _WRITE
            if unsol:
                task.unsol_end = task.held = task.res_write = unsol
                task.next_offset = n
                self.write_held += unsol
                if need:   # taken with the write data above, as "write": now apart
                    account.move(B.WRITE, B.READ, need, need)
            account.budget.hold(tag)   # its R2Ts may wait for room: Budget's progress rule
        else:
            direction = _READ if read else 0
        if need:
            task.res_read = need
        lun = _LUNS.get(lun_b)
        if lun is None:
            lun = P.lun_to_int(lun_b)
        self.rx_cmnd(tag, s.nexus, 0xFFFF if lun is None else lun, cdb,
                     ATTRS.get(attr, 0), direction, edtl, unsol, [data] if n else ())

    def _data_out(self, d: P.DataOut, data: Any) -> None:
        task = self.session.itts.get(d.itt)
        if task is None or not task.write or task.failed:
            log.debug("Data-Out for unknown or failed ITT 0x%x: discarded", d.itt)
            return
        end = d.buffer_offset + len(data)
        if d.ttt == P.RESERVED_TAG:
            ok = end <= task.unsol_end and d.data_sn == task.unsol_data_sn
            task.unsol_data_sn += 1
        else:
            burst = task.r2ts.get(d.ttt)
            ok = (burst is not None and burst[0] <= d.buffer_offset and end <= burst[1]
                  and d.data_sn == burst[2])
            if burst is not None:
                burst[2] += 1
        task.progress += 1
        if (not ok or d.buffer_offset != task.next_offset) and self.erl:
            self._recover_data(task, d)    # a PDU before it was lost: ask again from there
            return
        if not ok or d.buffer_offset != task.next_offset:  # DataPDUInOrder=Yes
            # the command fails (the STML answers CHECK CONDITION); the session lives on
            task.failed = True
            task.bursts.clear()
            self.waiting.pop(task, None)
            self.link.scsi_rx_data(task.tag, d.buffer_offset, (),
                                   error=f"DataSN {d.data_sn} / offset {d.buffer_offset} out of sequence")
            return
        task.next_offset = end
        if len(data):
            self.link.scsi_rx_data(task.tag, d.buffer_offset, [data])
        if d.ttt != P.RESERVED_TAG and end == task.r2ts[d.ttt][1]:
            del task.r2ts[d.ttt]
            self._send_r2ts(task)
            if self.waiting and not task.bursts:
                self._resume_r2ts()     # the next oldest task may go past the bound now

    def _recover_data(self, task: Task, d: P.DataOut | None) -> None:
        """ERL >= 1: write data was lost (a digest error, or a gap in DataSN or
        offset). Data is handed on in order and nothing past a hole is held, so
        the burst it belongs to (or the unsolicited data) is asked for again
        from the first byte missing, by a recovery R2T (the next R2TSN, a new
        TTT); the old TTT's later PDUs are discarded. A PDU outside every range
        we asked for is a protocol error: the task fails as at ERL 0."""
        start = task.next_offset
        if d is None or d.ttt == P.RESERVED_TAG:
            end = task.unsol_end
            if d is not None and not start <= d.buffer_offset < end:
                end = start          # not ours to recover
            task.unsol_end = start   # the rest comes solicited now
        else:
            burst = task.r2ts.pop(d.ttt, None)
            end = burst[1] if burst is not None and burst[0] <= start < burst[1] else start
        if end <= start:
            if d is not None:
                log.debug("Data-Out ITT 0x%x offset %d outside what was asked for: discarded",
                          d.itt, d.buffer_offset)
            return
        self._recovery_r2t(task, start, end)

    def _recovery_r2t(self, task: Task, start: int, end: int) -> None:
        ttt = next(self.ttts) & 0x7FFFFFFF
        task.r2ts[ttt] = [start, end, 0, task.r2t_sn]
        exp, mx = self._sns()
        self.send(P.R2T(task.itt, ttt, self.stat_sn, exp, mx, task.r2t_sn, start, end - start,
                        task.lun), b"")
        task.r2t_sn += 1

    def data_digest_error(self, header: bytes) -> None:
        """ERL >= 1: a PDU whose data digest failed is discarded with a Reject
        (RFC 7143 7.8.2); lost Data-Out is asked for again. A command's CmdSN
        is not taken: the initiator retries it (7.2.1)."""
        self.reject(P.REJECT_DATA_DIGEST_ERROR, header)
        try:
            pdu = P.decode_pdu(header[:P.BHS_LEN], b"") if header[4] == 0 else None
        except P.PDUError:
            return
        if isinstance(pdu, P.DataOut):
            task = self.session.itts.get(pdu.itt)
            if task is not None and task.write and not task.failed and task.conn is self:
                task.progress += 1
                self._recover_data(task, pdu)

    def check_stalled(self) -> None:
        """ERL >= 1, called every few seconds: a burst that got no Data-Out since
        the last call lost its last PDU (nothing after it shows the gap): ask for
        the rest again (sequence reception timeout, RFC 7143 7.1.2)."""
        for task in list(self.session.itts.values()):
            if task.conn is not self or not task.r2ts or task.failed:
                continue
            if task.progress == -1:
                task.progress = 0
                for ttt in list(task.r2ts):
                    burst = task.r2ts[ttt]
                    if burst[0] <= task.next_offset < burst[1]:
                        del task.r2ts[ttt]
                        self._recovery_r2t(task, task.next_offset, burst[1])
            else:
                task.progress = -1   # seen now; unless a Data-Out comes, recovered next time

    # ------------------------------------------------------------ from the STML
    def rdy_to_xfer(self, task: Task, offset: int, length: int) -> None:
        """Solicit [offset, offset+length) in bursts of MaxBurstLength, once the
        budget has room for all of it (Budget.wait: a granted task never needs
        more room to finish)."""
        end = min(offset + length, task.edtl)
        if task.failed or offset >= end or self.session.itts.get(task.itt) is not task:
            return
        task.bursts.append([offset, end])
        self.waiting[task] = None
        n, account = end - offset, self.account
        if account.budget.take_now(account, B.WRITE, n):
            self._granted(task, n)
            return
        grant = account.budget.wait(account, B.WRITE, n, task.tag,
                                    functools.partial(self._granted, task, n))
        if grant.live:   # else it was granted at once (and _granted has run)
            task.grant = grant

    def _granted(self, task: Task, n: int) -> None:
        task.grant = None
        task.res_write += n
        self._send_r2ts(task)

    def _send_r2ts(self, task: Task) -> None:
        """R2Ts within MaxOutstandingR2T and write_limit; those past the bound wait for
        _resume_r2ts (when the STML answers a task), but see _may_exceed."""
        if task.grant is not None:
            return     # not yet granted: _granted sends them
        limit = self.session.params.max_outstanding_r2t
        mbl = self.burst
        while task.bursts and len(task.r2ts) < limit:
            first = task.bursts[0]
            start = first[0]
            end = min(first[1], start + mbl)
            if self.write_held + end - start > self.write_limit and not self._may_exceed(task):
                return
            if end == first[1]:
                task.bursts.pop(0)
            else:
                first[0] = end
            task.held += end - start
            self.write_held += end - start
            ttt = next(self.ttts) & 0x7FFFFFFF
            task.r2ts[ttt] = [start, end, 0, task.r2t_sn]
            exp, mx = self._sns()
            self.out(P.R2T(task.itt, ttt, self.stat_sn, exp, mx, task.r2t_sn, start, end - start,
                           task.lun), b"")
            task.r2t_sn += 1
        if not task.bursts:
            self.waiting.pop(task, None)

    def _may_exceed(self, task: Task) -> bool:
        """Past the bound, the oldest task waiting for R2Ts still gets them when no older
        task holds write data: every task holding data is then newer and may wait for it
        (ORDERED), so withholding could deadlock. Otherwise an older task will complete
        by itself and free room. This lets at most one task's transfer past the bound."""
        if next(iter(self.waiting)) is not task:
            return False
        for t in self.session.itts.values():
            if t.held and t.tag < task.tag and t.conn is self and t not in self.waiting:
                return False
        return True

    def _resume_r2ts(self) -> None:
        for task in list(self.waiting):
            self._send_r2ts(task)

    def release(self, task: Task) -> None:
        """The STML answered (or aborted) the task: its data no longer counts."""
        if task.held:
            self.write_held -= task.held
            task.held = 0
        if task.bursts:
            task.bursts.clear()
        if task.grant is not None:
            task.grant.cancel()
            task.grant = None
        account = self.account
        if task.res_read:
            account.give(B.READ, task.res_read)
            task.res_read = 0
        if task.res_write:
            account.give(B.WRITE, task.res_write)
            task.res_write = 0
        if task.write:   # as _scsi_command held it
            account.budget.unhold(task.tag)
        if self.waiting:
            self.waiting.pop(task, None)
            self._resume_r2ts()

    def xmit_response(self, task: Task, status: int, sense: bytes | None, resid: int,
                      data: bytes | memoryview | None) -> None:
        """Data-In PDUs and the status; the status rides in the last Data-In
        when there is no sense to send (phase collapse). The read data counts as
        output (until the socket takes it) before its reservation goes. A
        memoryview of the data is made only to cut it into several Data-In."""
        s = self.session
        itts = s.itts
        if task.itt in itts:   # (pop(itt, None) is a generic method call: per command)
            del itts[task.itt]
        if self.erl:
            self._respond_keeping(task, status, sense, resid, data)
            return
        n = len(data) if data is not None else 0
        if n and self.count_out and not task.write and not self.waiting:
            # the usual read: its data is output now, its reservation goes (one call)
            self.account.answered(n, task.res_read)
            task.res_read = 0
        else:
            if n and self.count_out:
                self.account.move(B.READ, B.OUT, n, task.res_read)
                left = task.res_read - n
                task.res_read = left if left > 0 else 0
            if task.write or self.waiting:
                self.release(task)
            elif task.res_read:            # a read: only its reservation (per command: no call)
                self.account.give(B.READ, task.res_read)
                task.res_read = 0
        count, over, under = abs(resid), resid < 0, resid > 0
        if n:
            assert data is not None   # n is its length
            collapse = status == 0 and not sense
            if collapse and n <= self.seg_max and n <= self.burst:
                # the usual small read: one Data-In with the status, as _data_in sends
                # it, without its call, loop and cases (per command)
                sn = self.stat_sn
                self.stat_sn = (sn + 1) % SN_MOD
                encoded = self.encoded
                if encoded is not None:
                    if count == 0 and task.data_sn == 0:   # (collapse: GOOD) the usual read
                        encoded(encode_read_done(task.itt, s.exp_cmd_sn, s.max_cmd_sn, sn, task.lun, n),
                                data)
                    else:
                        encoded(encode_data_in_status(task.itt, task.data_sn, s.exp_cmd_sn, s.max_cmd_sn,
                                                      status, sn, count, over, under, task.lun, n), data)
                else:
                    self.send(new_pdu(DataIn, (task.itt, task.data_sn, 0, s.exp_cmd_sn, s.max_cmd_sn,
                                               True, status, sn, count, over, under, False,
                                               P.RESERVED_TAG, task.lun, n)), data)
                task.data_sn += 1
                return
            self._data_in(task, memoryview(data), status if collapse else None, count, over, under)
            if collapse:
                return
        encoded = self.encoded
        if not sense and encoded is not None:   # the usual status alone (a write's)
            encoded(encode_scsi_status(task.itt, status, self._next_stat_sn(), s.exp_cmd_sn,
                                       s.max_cmd_sn, task.data_sn + task.r2t_sn, count, over,
                                       under), b"")
            return
        seg = P.sense_segment(sense) if sense else b""
        # every field, in order (P.new_pdu: no Python-level __new__, per command):
        # response 0, ExpDataSN, residual, no bidi residual, SNACK Tag 0, DataSegmentLength
        self.out(P.new_pdu(P.ScsiResponse, (task.itt, status, self._next_stat_sn(), s.exp_cmd_sn,
                                            s.max_cmd_sn, 0, task.data_sn + task.r2t_sn, count,
                                            over, under, 0, False, False, 0, len(seg))), seg)

    def _respond_keeping(self, task: Task, status: int, sense: bytes | None, resid: int,
                         data: bytes | memoryview | None) -> None:
        """xmit_response at ErrorRecoveryLevel >= 1: the read data is copied (the
        STML's shared slots go back once the response is sent) and kept with
        the status until ExpStatSN acknowledges it; a task expired with its
        connection is dropped; one on a failed connection is kept for TASK
        REASSIGN."""
        s = self.session
        self.release(task)
        if task.expired:
            return
        if data is not None and len(data):
            task.rdata = bytes(data)
            self._keep(task, len(task.rdata))
        count, over, under = abs(resid), resid < 0, resid > 0
        task.status = (status, sense or b"", count, over, under, None, b"")
        s.kept[task.itt] = task
        self._send_status(task, 0)

    def _send_status(self, task: Task, first_dsn: int) -> None:
        """The kept task's Data-In from DataSN `first_dsn`, and its status with a
        new StatSN (the first time, and after a TASK REASSIGN)."""
        assert task.status is not None   # set before it is sent
        status, sense, count, over, under = task.status[:5]
        rdata = task.rdata
        collapse = status == 0 and not sense and rdata is not None
        if rdata is not None:
            self._data_in(task, memoryview(rdata), status if collapse else None, count, over,
                          under, first_dsn)
        if not collapse:
            s = self.session
            seg = P.sense_segment(sense) if sense else b""
            task.stat_sn = self._next_stat_sn()
            pdu = P.ScsiResponse(task.itt, status, task.stat_sn, s.exp_cmd_sn, s.max_cmd_sn, 0,
                                 task.data_sn + task.r2t_sn, count, over, under,
                                 data_length=len(seg))
            self.unacked[task.stat_sn] = task
            task.status = (status, sense, count, over, under, pdu, seg)
            self.send(pdu, seg)

    def _data_in(self, task: Task, data: memoryview, status: int | None, count: int,
                 over: bool, under: bool, first_dsn: int = 0) -> None:
        """Data-In PDUs of at most MaxSendDataSegmentLength bytes, F set at the
        end of each MaxBurstLength sequence; ``status`` (unless None) rides in
        the last one. Nothing here moves ExpCmdSN or MaxCmdSN, so they are
        read once."""
        s = self.session
        seg_max, burst = self.seg_max, self.burst
        itt, lun, exp, mx = task.itt, task.lun, s.exp_cmd_sn, s.max_cmd_sn
        total = len(data)
        offset = 0
        if first_dsn:   # a resend from DataSN first_dsn: the same layout, from its offset
            dsn = 0
            while offset < total and dsn < first_dsn:
                offset = min(offset + seg_max, total, offset - offset % burst + burst)
                dsn += 1
            task.data_sn = dsn
        elif self.erl:
            task.data_sn = 0
        ack = self.erl > 0 and total > burst    # ERL >= 1: a DataACK asked for every burst
        # ERL 0 (no PDU kept, no DataACK): each header packed from its fields (per PDU)
        encoded = self.encoded if not self.erl else None
        while offset < total:
            # min(offset + seg_max, total, the burst's end), without the builtin's call (per PDU)
            end = offset - offset % burst + burst
            if offset + seg_max < end:
                end = offset + seg_max
            if total < end:
                end = total
            if encoded is not None:
                n = end - offset
                if end == total and status is not None:
                    hdr = encode_data_in_status(itt, task.data_sn, exp, mx, status, self._next_stat_sn(),
                                                count, over, under, lun, n, offset)
                else:
                    hdr = encode_data_in(itt, task.data_sn, offset, exp, mx,
                                         end == total or end % burst == 0, lun, n)
                encoded(hdr, data if n == total else data[offset:end])
                task.data_sn += 1
                offset = end
                continue
            # every field, as in xmit_response: ... final, status, StatSN, residual (count,
            # overflow, underflow), A bit, TTT, LUN, DataSegmentLength
            if end == total and status is not None:
                sn = self._next_stat_sn()
                pdu = P.new_pdu(P.DataIn, (itt, task.data_sn, offset, exp, mx, True, status,
                                           sn, count, over, under, False,
                                           P.RESERVED_TAG, lun, end - offset))
                if self.erl:
                    task.stat_sn = sn
                    self.unacked[sn] = task
                    assert task.status is not None
                    task.status = task.status[:5] + (pdu, b"")
            elif ack and end % burst == 0:
                if task.ack_ttt == P.RESERVED_TAG:
                    task.ack_ttt = next(self.ttts) & 0x7FFFFFFF
                pdu = P.new_pdu(P.DataIn, (itt, task.data_sn, offset, exp, mx, True, None, 0, 0,
                                           False, False, True, task.ack_ttt, lun, end - offset))
            else:
                pdu = P.new_pdu(P.DataIn, (itt, task.data_sn, offset, exp, mx,
                                           end == total or end % burst == 0, None, 0, 0, False,
                                           False, False, P.RESERVED_TAG, lun, end - offset))
            self.send(pdu, data if end - offset == total else data[offset:end])
            task.data_sn += 1
            offset = end

    # ------------------------------------------------------------ task management
    def _task_mgmt(self, t: P.TaskMgmtRequest, data: Any) -> None:
        s = self.session
        fn = t.function
        lun_n = P.lun_to_int(t.lun)
        lun = 0xFFFF if lun_n is None else lun_n
        exp, mx = self._sns()
        if fn in (P.TMF_ABORT_TASK, P.TMF_QUERY_TASK):
            task = s.itts.get(t.rtt)
            if task is None:
                if fn == P.TMF_ABORT_TASK:
                    self._abort_undelivered(t)
                else:   # not in the task set (never arrived, or over): RFC 7144 4.1
                    self.out(P.TaskMgmtResponse(t.itt, P.TMF_RESP_COMPLETE, self._next_stat_sn(),
                                                exp, mx), b"")
                return
            ref = task.tag
        elif fn == P.TMF_TASK_REASSIGN:
            self._reassign(t)
            return
        elif fn not in _FORWARDED:
            self.out(P.TaskMgmtResponse(t.itt, P.TMF_RESP_NOT_SUPPORTED, self._next_stat_sn(), exp, mx), b"")
            return
        else:
            ref = None
        if s.tmfs >= MAX_TMFS:   # immediate TMFs bypass the window: bound those in flight
            self.out(P.TaskMgmtResponse(t.itt, P.TMF_RESP_REJECTED, self._next_stat_sn(), exp, mx), b"")
            return
        s.tmfs += 1
        tag = self.tags.new()
        self.tags.tmfs[tag] = (self, t.itt, fn, ref)
        self.link.rx_task_mgmt_fn(tag, s.nexus, fn, lun, ref)

    def _abort_undelivered(self, t: P.TaskMgmtRequest) -> None:
        """ABORT TASK for a command the STML never saw (RFC 7143 11.6.1): one
        still waiting for its CmdSN, or one not yet arrived whose RefCmdSN is
        in the window, is dropped here; anything else does not exist."""
        s = self.session
        ref_sn = next((sn for sn, (_, q, _) in s.queued.items()
                       if isinstance(q, P.ScsiCommand) and q.itt == t.rtt), None)
        if ref_sn is None and sn_le(s.exp_cmd_sn, t.ref_cmd_sn) and sn_le(t.ref_cmd_sn, s.max_cmd_sn) \
                and sn_lt(t.ref_cmd_sn, t.cmd_sn):
            ref_sn = t.ref_cmd_sn
        if ref_sn is not None:
            old = s.queued.get(ref_sn)
            if old is not None and old[2]:
                s.queued_bytes -= len(old[2])
                old[0].account.give(B.OOO, len(old[2]))
            s.queued[ref_sn] = (self, None, b"")   # consumes the CmdSN, runs nothing
        exp, mx = self._sns()
        resp = P.TMF_RESP_COMPLETE if ref_sn is not None else P.TMF_RESP_NO_TASK
        self.out(P.TaskMgmtResponse(t.itt, resp, self._next_stat_sn(), exp, mx), b"")

    def task_mgmt_fn_done(self, itt: int, fn: int, response: int, aborted: list[Task],
                          info: bytes = b"") -> None:
        self.session.tmfs -= 1
        for task in aborted:
            task.conn.session.itts.pop(task.itt, None)
            task.conn.release(task)
        exp, mx = self._sns()
        self.out(P.TaskMgmtResponse(itt, response if response <= 255 else P.TMF_RESP_REJECTED,
                                    self._next_stat_sn(), exp, mx, info), b"")
        if fn == P.TMF_TARGET_COLD_RESET and response == P.TMF_RESP_COMPLETE:
            self.close()   # a cold reset ends the connections (RFC 7143 11.5.1)
        # (an I_T NEXUS RESET leaves the session: the unit attention it sets is for it)

    def _reassign(self, t: P.TaskMgmtRequest) -> None:
        """TASK REASSIGN (RFC 7143 11.5.1, 7.2.2): a task of a failed connection
        (ERL 2) continues on this one. Read data not acknowledged is sent again
        from ExpDataSN, the status with a new StatSN; write data not received is
        asked for by new R2Ts. A task whose connection lives is still allegiant."""
        s = self.session
        exp, mx = self._sns()
        task = s.itts.get(t.rtt) or s.kept.get(t.rtt)
        if s.erl < 2:
            resp = P.TMF_RESP_NO_REASSIGN
        elif task is None or task.expired:
            resp = P.TMF_RESP_NO_TASK
        elif not task.conn.failed:
            resp = P.TMF_RESP_TASK_ALLEGIANT
        else:
            resp = P.TMF_RESP_COMPLETE
        self.out(P.TaskMgmtResponse(t.itt, resp, self._next_stat_sn(), exp, mx), b"")
        if resp != P.TMF_RESP_COMPLETE:
            return
        assert task is not None
        old = task.conn
        self._adopt(task)
        if task.status is not None:          # answered: what the initiator may not have
            old.unacked.pop(task.stat_sn, None)
            first = t.exp_data_sn or task.acked_dsn
            if task.rdata is not None and not sn_le(first, task.data_sn):
                first = task.acked_dsn          # a value out of range is ignored (11.5.1)
            self._send_status(task, first)
        elif task.write:
            ranges = sorted((b[0], b[1]) for b in task.r2ts.values())
            task.r2ts.clear()
            if task.next_offset < task.unsol_end:
                ranges.insert(0, (task.next_offset, task.unsol_end))
                task.unsol_end = task.next_offset
            for start, end in ranges:
                self._recovery_r2t(task, max(start, task.next_offset), end)
            self._send_r2ts(task)
        old.orphan_gone()

    def _adopt(self, task: Task) -> None:
        """Move a task, and what it holds in the budget, from its failed connection to this one."""
        old = task.conn
        for kind, n in ((B.READ, task.res_read), (B.WRITE, task.res_write), (B.KEEP, task.kept)):
            if n:
                old.account.give(kind, n)
                self.account.take(kind, n, force=True)
        old.write_held -= task.held
        self.write_held += task.held
        old.waiting.pop(task, None)
        task.conn = self

    def orphans(self) -> list[Task]:
        s = self.session
        return [t for t in (*s.itts.values(), *s.kept.values()) if t.conn is self]

    def orphan_gone(self) -> None:
        """A task left this failed connection: when none is left, it is over."""
        if self.failed and not self.orphans():
            s = self.session
            if s.failed.get(self.cid) is self:
                del s.failed[self.cid]
            self.account.close()

    def fail(self) -> None:
        """ERL 2: the connection died (not by a Logout that closes it): its tasks
        wait for a TASK REASSIGN on another connection until expire() (the
        caller times Time2Wait + Time2Retain, and expires an earlier failed
        connection of the same CID, which this one replaces here)."""
        self.failed = True
        self.session.failed[self.cid] = self

    def expire(self) -> list[Task]:
        """Time2Wait + Time2Retain passed: the tasks no one reassigned are dropped
        (those the STML still runs are aborted by the caller). Returns those."""
        s = self.session
        gone = self.orphans()
        for task in gone:
            task.expired = True
            if s.kept.get(task.itt) is task:
                self._forget(task)
        for sn in [sn for sn, e in self.unacked.items()]:
            entry = self.unacked.pop(sn)
            if not isinstance(entry, Task):
                self.account.give(B.KEEP, len(entry[1]))
        if s.failed.get(self.cid) is self:
            del s.failed[self.cid]
        return [t for t in gone if s.itts.get(t.itt) is t]

    # ------------------------------------------------------------ NOP, Text, Logout, SNACK
    def _nop_out(self, n: P.NopOut, data: Any) -> None:
        if n.itt == P.RESERVED_TAG:
            if n.ttt == self.ping_ttt:
                self.ping_ttt = None  # the initiator answered our ping
            return
        if len(data) and self.count_out and not self.account.take(B.OUT, len(data)):
            self.reject(P.REJECT_OUT_OF_RESOURCES, n.encode())   # no room for the echo
            return
        exp, mx = self._sns()
        self.out(P.NopIn(n.itt, P.RESERVED_TAG, self._next_stat_sn(), exp, mx, n.lun,
                         data_length=len(data)), bytes(data))

    def window_update(self) -> None:
        """The connection's output drained: when that opens a window it held shut
        (read_limit), tell the initiator with a NOP-In that asks nothing (RFC
        7143 11.19): no response may be on its way to carry the news."""
        s = self.session
        before = s.last_max
        if (before + 1) % SN_MOD != s.exp_cmd_sn:
            return          # not shut: the initiator can still send
        mx = s.max_cmd_sn
        if mx != before:
            self.out(P.NopIn(P.RESERVED_TAG, P.RESERVED_TAG, self.stat_sn, s.exp_cmd_sn, mx), b"")

    def ping(self) -> bool:
        """Send a NOP-In ping; False when the previous one was never answered."""
        if self.ping_ttt is not None:
            return False
        self.ping_ttt = next(self.ttts) & 0x7FFFFFFF
        exp, mx = self._sns()
        self.out(P.NopIn(P.RESERVED_TAG, self.ping_ttt, self.stat_sn, exp, mx), b"")
        return True

    def _text(self, t: P.TextRequest, data: Any) -> None:
        """Text requests (RFC 7143 6.1, 11.10): a request continued over several
        PDUs (C bit) is gathered up to MAX_TEXT_REQUEST, each part acknowledged by
        an empty response; the answer is built once, and a long one is sent a
        segment at a time as the initiator asks for more (by our TTT), from an
        offset into it. A key given twice in one request is a protocol error:
        a key is negotiated or declared once (6.2), and answering each copy is
        what let one PDU cost megabytes."""
        if t.ttt == P.RESERVED_TAG:
            self._text_reset()            # a new exchange: whatever was pending is dropped
        elif t.ttt != self.text_ttt:
            self._text_reset()
            self.reject(P.REJECT_PROTOCOL_ERROR, t.encode())
            return
        if self.text_out is not None:     # the initiator asks for the rest of our answer
            self._text_send(t)
            return
        n = len(data)
        if len(self.text_in) + n > MAX_TEXT_REQUEST or not self.account.take(B.TEXT, n):
            self._text_reset()
            self.reject(P.REJECT_OUT_OF_RESOURCES, t.encode())
            return
        self.text_in += data
        if t.cont:                        # more of the request follows
            self.text_ttt = next(self.ttts) & 0x7FFFFFFF
            exp, mx = self._sns()
            self.out(P.TextResponse(t.itt, self.text_ttt, self._next_stat_sn(), exp, mx,
                                    final=False), b"")
            return
        text = bytes(self.text_in)
        self._text_reset()
        try:
            pairs = P.decode_text(text)
        except P.PDUError:
            self.reject(P.REJECT_PROTOCOL_ERROR, t.encode())
            return
        if len({k for k, _ in pairs}) != len(pairs):
            self.reject(P.REJECT_PROTOCOL_ERROR, t.encode())
            return
        body = P.encode_text(self.text(self, pairs))
        if not self.account.take(B.TEXT, len(body)):
            self.reject(P.REJECT_OUT_OF_RESOURCES, t.encode())
            return
        self.text_out = memoryview(body)
        self._text_send(t)

    def _text_send(self, t: P.TextRequest) -> None:
        """The next segment of the pending answer (continued while more is left)."""
        body = self.text_out
        assert body is not None   # callers check
        start = self.text_pos
        chunk = body[start:start + self.seg_max]
        self.text_pos = start + len(chunk)
        more = self.text_pos < len(body)
        ttt = P.RESERVED_TAG
        if more:
            ttt = self.text_ttt = next(self.ttts) & 0x7FFFFFFF
        else:
            self._text_reset()
        exp, mx = self._sns()
        self.out(P.TextResponse(t.itt, ttt, self._next_stat_sn(), exp, mx, final=not more,
                                cont=more, data_length=len(chunk)), chunk)

    def _text_reset(self) -> None:
        """Forget a pending Text exchange; its memory leaves the budget."""
        held = len(self.text_in) + (len(self.text_out) if self.text_out is not None else 0)
        if held:
            self.account.give(B.TEXT, held)
        self.text_in = bytearray()
        self.text_out = None
        self.text_pos = 0
        self.text_ttt = None

    def _logout(self, lo: P.LogoutRequest, data: Any) -> None:
        if lo.reason > 2:
            raise P.PDUError(f"reserved logout reason {lo.reason}", P.REJECT_INVALID_PDU_FIELD)
        exp, mx = self._sns()
        s = self.session
        response = 0
        if lo.reason == 2 and s.erl < 2:
            response = 2  # connection recovery is not supported (ErrorRecoveryLevel < 2)
        elif lo.reason == 2 and lo.cid == self.cid:
            response = 1  # a connection cannot be removed for recovery over itself
        elif lo.reason == 2 and lo.cid not in s.connections and lo.cid not in s.failed:
            response = 1  # CID not found
        elif lo.reason == 1 and lo.cid not in s.connections:
            response = 1  # CID not found
        wait, retain = announced(s.params.default_time2wait, s.params.default_time2retain, s.max_retain)
        self.out(P.LogoutResponse(lo.itt, response, self._next_stat_sn(), exp, mx, wait, retain), b"")
        if response == 0 and lo.reason == 2:
            # its tasks are prepared for a new allegiance (RFC 7143 11.14.1): it fails now
            target = s.connections.get(lo.cid)
            if target is not None:
                target.close()
                self.on_failed(target)
        elif response == 0:
            if lo.reason == 0:
                self.session.logged_out = True
                for conn in list(self.session.connections.values()):
                    conn.closing = True
                    conn.close()
            else:
                target = self.session.connections[lo.cid]
                target.closing = True
                target.close()

    def _snack(self, sn: P.Snack, data: Any) -> None:
        """SNACK (RFC 7143 11.16), ErrorRecoveryLevel >= 1: Data-In or R2Ts of a
        task, numbered responses, or a DataACK that frees read data kept.
        R-Data (resegmenting) is never needed: MaxRecvDataSegmentLength is not
        renegotiated in the full feature phase here."""
        if not self.erl:
            self.reject(P.REJECT_COMMAND_NOT_SUPPORTED, sn.encode())   # ErrorRecoveryLevel 0
            return
        handler = {0: self._snack_data, 1: self._snack_status, 2: self._snack_ack}.get(sn.snack_type)
        if handler is None:
            self.reject(P.REJECT_COMMAND_NOT_SUPPORTED, sn.encode())
        elif not handler(sn):
            self.reject(P.REJECT_SNACK_REJECT, sn.encode())

    def _snack_task(self, itt: int) -> Task | None:
        s = self.session
        task = s.itts.get(itt) or s.kept.get(itt)
        return task if task is not None and task.conn is self else None

    def _snack_data(self, sn: P.Snack) -> bool:
        """Data-In (a read) or R2Ts (a write) with numbers BegRun.. again, as they were."""
        task = self._snack_task(sn.itt)
        if task is None:
            return False
        beg, run = sn.beg_run, sn.run_length
        inside = (lambda n: sn_le(beg, n)) if run == 0 else (lambda n: sn_le(beg, n) and sn_lt(n, beg + run))
        if task.write:
            r2ts = [(b[3], ttt, b) for ttt, b in task.r2ts.items() if inside(b[3])]
            for r2t_sn, ttt, b in sorted(r2ts):
                exp, mx = self._sns()
                self.send(P.R2T(task.itt, ttt, self.stat_sn, exp, mx, r2t_sn, b[0], b[1] - b[0],
                                task.lun), b"")
            return bool(r2ts)
        if task.rdata is None or not sn_le(task.acked_dsn, beg) or not sn_lt(beg, task.data_sn):
            return False
        self._resend_data(task, beg, task.data_sn if run == 0 else min(beg + run, task.data_sn))
        return True

    def _resend_data(self, task: Task, first: int, stop: int) -> None:
        """Data-In DataSN first..stop-1 as first sent (the status PDU with its StatSN)."""
        assert task.rdata is not None and task.status is not None
        s = self.session
        data = memoryview(task.rdata)
        seg_max, burst = self.seg_max, self.burst
        total, offset, dsn = len(data), 0, 0
        exp, mx = self._sns()
        while offset < total and dsn < stop:
            end = min(offset + seg_max, total, offset - offset % burst + burst)
            if dsn >= first:
                last = task.status[5]
                if end == total and isinstance(last, P.DataIn):
                    pdu = last._replace(exp_cmd_sn=exp, max_cmd_sn=mx)
                else:
                    ack = total > burst and end % burst == 0 and end != total
                    pdu = P.DataIn(task.itt, dsn, offset, exp, mx, end == total or end % burst == 0,
                                   ack=ack, ttt=task.ack_ttt if ack else P.RESERVED_TAG,
                                   lun=task.lun, data_length=end - offset)
                self.send(pdu, data[offset:end])
            offset, dsn = end, dsn + 1

    def _snack_status(self, sn: P.Snack) -> bool:
        """Numbered responses StatSN BegRun.. again, as they were (those kept)."""
        beg, run = sn.beg_run, sn.run_length
        found = False
        exp, mx = self._sns()
        for stat_sn, entry in list(self.unacked.items()):
            if not sn_le(beg, stat_sn) or (run and not sn_lt(stat_sn, beg + run)):
                continue
            if isinstance(entry, Task):
                assert entry.status is not None
                pdu, seg = entry.status[5], entry.status[6]
                if isinstance(pdu, P.DataIn):   # status in the last Data-In: it, with its data
                    assert entry.rdata is not None
                    seg = memoryview(entry.rdata)[pdu.buffer_offset:]
            else:
                pdu, seg = entry
            self.send(pdu._replace(exp_cmd_sn=exp, max_cmd_sn=mx), seg)
            found = True
        return found

    def _snack_ack(self, sn: P.Snack) -> bool:
        """DataACK: Data-In before BegRun arrived; the kept data before it goes."""
        task = next((t for t in self.session.kept.values()
                     if t.ack_ttt == sn.ttt and t.conn is self), None)
        if task is None or sn.ttt == P.RESERVED_TAG:
            self.reject(P.REJECT_INVALID_DATA_ACK, sn.encode())
            return True
        if sn_lt(task.acked_dsn, sn.beg_run) and sn_le(sn.beg_run, task.data_sn):
            task.acked_dsn = sn.beg_run
        return True

    def async_event(self, event: int, lun: bytes = P.LUN0, sense: bytes = b"", param3: int = 0) -> None:
        """An Async Message takes a StatSN of its own, as every status does (RFC 7143
        4.2.2.2; LIO, open-iscsi: decision 0213)."""
        exp, mx = self._sns()
        seg = P.sense_segment(sense) if sense else b""
        self.out(P.AsyncMessage(event, self._next_stat_sn(), exp, mx, lun, parameter3=param3,
                                data_length=len(seg)), seg)
