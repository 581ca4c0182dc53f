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

import itertools
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from fetd_tcp import pdu as P
from fetd_tcp.keys import ConnectionParams, SessionParams
from stml.api import DataDir, TaskAttr

TASK_SET_FULL = 0x28

log = logging.getLogger("fetd_tcp")

SN_MOD = 1 << 32
Out = Callable[[Any, bytes | memoryview], None]   # (PDU header object, data segment)

# plain ints on the per-command path (enum arithmetic costs microseconds)
ATTRS = {P.ATTR_UNTAGGED: int(TaskAttr.SIMPLE), P.ATTR_SIMPLE: int(TaskAttr.SIMPLE),
         P.ATTR_ORDERED: int(TaskAttr.ORDERED), P.ATTR_HEAD_OF_QUEUE: int(TaskAttr.HEAD_OF_QUEUE),
         P.ATTR_ACA: int(TaskAttr.ACA)}
_WRITE, _READ = int(DataDir.WRITE), int(DataDir.READ)


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
    def register_nexus(self, nexus: int, initiator: str, target: str, tpg: int) -> None: ...
    def scsi_release(self, nexus: int) -> None: ...


class Tags:
    """Front-end-wide task tags: the STML knows tasks by these, not by ITT,
    because ITTs are only unique within one session."""

    def __init__(self) -> None:
        self.new: Callable[[], int] = itertools.count(1).__next__   # a C call per command
        self.tasks: dict[int, Task] = {}
        self.tmfs: dict[int, tuple[Connection, int, int]] = {}  # tag -> (conn, itt, function)


class Task:
    __slots__ = ("conn", "itt", "tag", "lun", "edtl", "write", "unsol_end", "next_offset",
                 "r2t_sn", "data_sn", "bursts", "r2ts", "unsol_data_sn", "failed", "held")

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
        self.bursts: list[tuple[int, int]] = []        # solicited ranges not yet asked for
        self.r2ts: dict[int, list[int]] = {}   # TTT -> [offset, end, next DataSN] outstanding
        self.unsol_data_sn = 0
        self.failed = False         # its data went wrong; the STML has been told
        self.held = 0               # write data counted against conn.write_limit until answered


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
    connections: dict[int, Connection] = field(default_factory=dict)
    itts: dict[int, Task] = field(default_factory=dict)
    queued: dict[int, tuple[Connection, Any, Any]] = field(default_factory=dict)  # CmdSN -> PDU
    last_max: int = -1      # MaxCmdSN as last computed; held there while writes are over their bound

    @property
    def max_cmd_sn(self) -> int:
        """ExpCmdSN + window - 1; but while a connection holds more write data than its
        bound (Connection.write_limit) MaxCmdSN stays put, so the window closes as
        commands arrive and reopens as the STML answers them."""
        if self.last_max >= 0:
            for c in self.connections.values():
                if c.write_held >= c.write_limit:
                    return self.last_max
        self.last_max = (self.exp_cmd_sn + self.window - 1) % SN_MOD
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
                 write_limit: int = 64 << 20) -> None:
        self.session = session
        self.cid = cid
        self.params = params
        self.stat_sn = stat_sn
        self.out = out
        self.link = link
        self.tags = tags
        self.close = close
        self.text = text
        self.ttts = itertools.count(1)
        self.text_pending: bytes = b""   # a Text response continued over several PDUs
        self.closing = False
        self.idle = True                 # no PDU since the last NOP interval
        self.local_addr: tuple[str, int] | None = None   # where the initiator reached us
        self.ping_ttt: int | None = None
        # write data handed (or solicited) for the STML and not yet answered: past
        # write_limit, R2Ts wait (but the oldest task waiting for them) and MaxCmdSN stops
        self.write_held = 0
        self.write_limit = write_limit
        self.waiting: dict[Task, None] = {}   # tasks with bursts not yet solicited, oldest first
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

    def reject(self, reason: int, header: bytes | memoryview) -> None:
        exp, mx = self._sns()
        self.out(P.Reject(reason, self._next_stat_sn(), exp, mx), bytes(header[:P.BHS_LEN]))

    # ------------------------------------------------------------ input
    def receive(self, pdu: Any, data: bytes | memoryview) -> None:
        """One PDU from the initiator. Raises P.PDUError for a protocol error
        the caller answers with Reject (the PDU is otherwise ignored)."""
        handler = self._dispatch.get(type(pdu))
        if handler is None:
            raise P.PDUError(f"{type(pdu).__name__} not allowed in full feature phase",
                             P.REJECT_PROTOCOL_ERROR)
        handler(pdu, data)

    def _ordered(self, pdu: Any, data: Any) -> None:
        """Deliver non-immediate PDUs in CmdSN order; immediate ones at once."""
        s = self.session
        if pdu.immediate:
            self._run[type(pdu)](pdu, data)
            return
        sn = pdu.cmd_sn
        if sn == s.exp_cmd_sn and sn_le(sn, s.max_cmd_sn):
            s.exp_cmd_sn = (sn + 1) % SN_MOD
            self._run[type(pdu)](pdu, data)
            while s.queued and s.exp_cmd_sn in s.queued:
                conn, qpdu, qdata = s.queued.pop(s.exp_cmd_sn)
                s.exp_cmd_sn = (s.exp_cmd_sn + 1) % SN_MOD
                if qpdu is not None:   # None: aborted before it arrived
                    conn._run[type(qpdu)](qpdu, qdata)
        elif sn_lt(s.exp_cmd_sn, sn) and sn_le(sn, s.max_cmd_sn) and sn not in s.queued:
            s.queued[sn] = (self, pdu, bytes(data))   # a gap: wait for the missing CmdSN
        else:
            log.debug("CmdSN %d outside window [%d, %d]: discarded", sn, s.exp_cmd_sn, s.max_cmd_sn)

    # ------------------------------------------------------------ SCSI commands
    def _scsi_command(self, cmd: P.ScsiCommand, data: Any) -> None:
        s = self.session
        itt, edtl, write, n = cmd.itt, cmd.expected_length, cmd.write, len(data)
        if s.discovery:
            self.reject(P.REJECT_PROTOCOL_ERROR, cmd.encode())  # no SCSI in discovery sessions
            return
        if itt in s.itts:
            self.reject(P.REJECT_TASK_IN_PROGRESS, cmd.encode())
            return
        if n and (n > self.params.max_recv_data_segment_length or not write
                  or not s.params.immediate_data or n > edtl or n > s.params.first_burst_length):
            self.reject(P.REJECT_PROTOCOL_ERROR, cmd.encode())
            return
        if write and cmd.immediate and self.write_held >= self.write_limit:
            # immediate commands bypass the CmdSN window: refuse a write while over the bound
            exp, mx = self._sns()
            self.out(P.ScsiResponse(itt, TASK_SET_FULL, self._next_stat_sn(), exp, mx), b"")
            return
        tags = self.tags
        tag = tags.new()
        task = Task(self, itt, tag, cmd.lun, edtl, write)
        s.itts[itt] = task
        tags.tasks[tag] = task
        unsol = n
        if write:
            direction = (_WRITE | _READ) if cmd.read else _WRITE
            if not cmd.final and not s.params.initial_r2t:
                unsol = min(s.params.first_burst_length, edtl)
            if unsol:
                task.unsol_end = task.held = unsol
                task.next_offset = n
                self.write_held += unsol
        else:
            direction = _READ if cmd.read else 0
        lun = P.lun_to_int(cmd.lun)
        self.link.rx_cmnd(tag, s.nexus, 0xFFFF if lun is None else lun, bytes(cmd.cdb),
                          ATTRS.get(cmd.attr, 0), direction, edtl, unsol, [data] if n else ())

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

    # ------------------------------------------------------------ from the STML
    def rdy_to_xfer(self, task: Task, offset: int, length: int) -> None:
        """Solicit [offset, offset+length) in bursts of MaxBurstLength."""
        mbl = self.session.params.max_burst_length
        end = offset + length
        while offset < end:
            n = min(mbl, end - offset)
            task.bursts.append((offset, offset + n))
            offset += n
        if task.bursts:
            self.waiting[task] = None
        self._send_r2ts(task)

    def _send_r2ts(self, task: Task) -> None:
        """R2Ts within MaxOutstandingR2T and write_limit; those past the bound wait for
        _resume_r2ts (when the STML answers a task), but see _may_exceed."""
        limit = self.session.params.max_outstanding_r2t
        while task.bursts and len(task.r2ts) < limit:
            start, end = task.bursts[0]
            if self.write_held + end - start > self.write_limit and not self._may_exceed(task):
                return
            task.bursts.pop(0)
            task.held += end - start
            self.write_held += end - start
            ttt = next(self.ttts) & 0x7FFFFFFF
            task.r2ts[ttt] = [start, end, 0]
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
        """The STML answered (or aborted) the task: its write data no longer counts."""
        if task.held:
            self.write_held -= task.held
            task.held = 0
        if task.bursts:
            task.bursts.clear()
        if self.waiting:
            self.waiting.pop(task, None)
            self._resume_r2ts()

    def xmit_response(self, task: Task, status: int, sense: bytes | None, resid: int,
                      data: memoryview | None) -> None:
        """Data-In PDUs and the status; the status rides in the last Data-In
        when there is no sense to send (phase collapse)."""
        s = self.session
        s.itts.pop(task.itt, None)
        if task.held or self.waiting:
            self.release(task)
        count, over, under = abs(resid), resid < 0, resid > 0
        if data is not None and len(data):
            collapse = status == 0 and not sense
            self._data_in(task, data, status if collapse else None, count, over, under)
            if collapse:
                return
        seg = P.sense_segment(sense) if sense else b""
        # every field, in order (P.new_pdu: no Python-level __new__, per command):
        # response 0, ExpDataSN, residual, no bidi residual, SNACK Tag 0, DataSegmentLength
        self.out(P.new_pdu(P.ScsiResponse, (task.itt, status, self._next_stat_sn(), s.exp_cmd_sn,
                                            s.max_cmd_sn, 0, task.data_sn + task.r2t_sn, count,
                                            over, under, 0, False, False, 0, len(seg))), seg)

    def _data_in(self, task: Task, data: memoryview, status: int | None, count: int,
                 over: bool, under: bool) -> None:
        """Data-In PDUs of at most MaxSendDataSegmentLength bytes, F set at the
        end of each MaxBurstLength sequence; ``status`` (unless None) rides in
        the last one. Nothing here moves ExpCmdSN or MaxCmdSN, so they are
        read once."""
        s = self.session
        seg_max = self.params.max_send_data_segment_length
        burst = s.params.max_burst_length
        itt, lun, exp, mx = task.itt, task.lun, s.exp_cmd_sn, s.max_cmd_sn
        total = len(data)
        offset = 0
        while offset < total:
            end = min(offset + seg_max, total, offset - offset % burst + burst)
            # every field, as in xmit_response: ... final, status, StatSN, residual (count,
            # overflow, underflow), A bit, TTT, LUN, DataSegmentLength
            if end == total and status is not None:
                pdu = P.new_pdu(P.DataIn, (itt, task.data_sn, offset, exp, mx, True, status,
                                           self._next_stat_sn(), count, over, under, False,
                                           P.RESERVED_TAG, lun, end - offset))
            else:
                pdu = P.new_pdu(P.DataIn, (itt, task.data_sn, offset, exp, mx,
                                           end == total or end % burst == 0, None, 0, 0, False,
                                           False, False, P.RESERVED_TAG, lun, end - offset))
            self.out(pdu, data if end - offset == total else data[offset:end])
            task.data_sn += 1
            offset = end

    # ------------------------------------------------------------ task management
    def _task_mgmt(self, t: P.TaskMgmtRequest, data: Any) -> None:
        s = self.session
        fn = t.function
        lun_n = P.lun_to_int(t.lun)
        lun = 0xFFFF if lun_n is None else lun_n
        exp, mx = self._sns()
        if fn == P.TMF_ABORT_TASK:
            task = s.itts.get(t.rtt)
            if task is None:
                self._abort_undelivered(t)
                return
            ref = task.tag
        elif fn == P.TMF_TASK_REASSIGN:
            self.out(P.TaskMgmtResponse(t.itt, P.TMF_RESP_NO_REASSIGN, self._next_stat_sn(), exp, mx), b"")
            return
        elif fn not in (P.TMF_ABORT_TASK_SET, P.TMF_CLEAR_ACA, P.TMF_CLEAR_TASK_SET,
                        P.TMF_LOGICAL_UNIT_RESET, P.TMF_TARGET_WARM_RESET, P.TMF_TARGET_COLD_RESET):
            self.out(P.TaskMgmtResponse(t.itt, P.TMF_RESP_NOT_SUPPORTED, self._next_stat_sn(), exp, mx), b"")
            return
        else:
            ref = None
        tag = self.tags.new()
        self.tags.tmfs[tag] = (self, t.itt, fn)
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
            s.queued[ref_sn] = (self, None, b"")   # consumes the CmdSN, runs nothing
        exp, mx = self._sns()
        resp = P.TMF_RESP_COMPLETE if ref_sn is not None else P.TMF_RESP_NO_TASK
        self.out(P.TaskMgmtResponse(t.itt, resp, self._next_stat_sn(), exp, mx), b"")

    def task_mgmt_fn_done(self, itt: int, fn: int, response: int, aborted: list[Task]) -> None:
        for task in aborted:
            task.conn.session.itts.pop(task.itt, None)
            task.conn.release(task)
        exp, mx = self._sns()
        self.out(P.TaskMgmtResponse(itt, response if response <= 255 else P.TMF_RESP_REJECTED,
                                    self._next_stat_sn(), exp, mx), b"")
        if fn == P.TMF_TARGET_COLD_RESET and response == P.TMF_RESP_COMPLETE:
            self.close()   # a cold reset ends the connections (RFC 7143 11.5.1)

    # ------------------------------------------------------------ NOP, Text, Logout, SNACK
    def _nop_out(self, n: P.NopOut, data: Any) -> None:
        if n.itt == P.RESERVED_TAG:
            if n.ttt == self.ping_ttt:
                self.ping_ttt = None  # the initiator answered our ping
            return
        exp, mx = self._sns()
        self.out(P.NopIn(n.itt, P.RESERVED_TAG, self._next_stat_sn(), exp, mx, n.lun,
                         data_length=len(data)), bytes(data))

    def ping(self) -> bool:
        """Send a NOP-In ping; False when the previous one was never answered."""
        if self.ping_ttt is not None:
            return False
        self.ping_ttt = next(self.ttts) & 0x7FFFFFFF
        exp, mx = self._sns()
        self.out(P.NopIn(P.RESERVED_TAG, self.ping_ttt, self.stat_sn, exp, mx), b"")
        return True

    def _text(self, t: P.TextRequest, data: Any) -> None:
        exp, mx = self._sns()
        if t.ttt != P.RESERVED_TAG and self.text_pending:
            body = self.text_pending     # the initiator asks for the rest of a long answer
        else:
            try:
                pairs = P.decode_text(data)
            except P.PDUError:
                self.reject(P.REJECT_PROTOCOL_ERROR, t.encode())
                return
            body = P.encode_text(self.text(self, pairs))
        seg_max = self.params.max_send_data_segment_length
        chunk, self.text_pending = body[:seg_max], body[seg_max:]
        more = bool(self.text_pending)
        self.out(P.TextResponse(t.itt, (next(self.ttts) & 0x7FFFFFFF) if more else P.RESERVED_TAG,
                                self._next_stat_sn(), exp, mx, final=not more, cont=more,
                                data_length=len(chunk)), chunk)

    def _logout(self, lo: P.LogoutRequest, data: Any) -> None:
        if lo.reason > 2:
            raise P.PDUError(f"reserved logout reason {lo.reason}", P.REJECT_INVALID_PDU_FIELD)
        exp, mx = self._sns()
        response = 0
        if lo.reason == 2:
            response = 2  # connection recovery is not supported (ErrorRecoveryLevel 0)
        elif lo.reason == 1 and lo.cid not in self.session.connections:
            response = 1  # CID not found
        self.out(P.LogoutResponse(lo.itt, response, self._next_stat_sn(), exp, mx,
                                  self.session.params.default_time2wait,
                                  self.session.params.default_time2retain), b"")
        if response == 0:
            if lo.reason == 0:
                for conn in list(self.session.connections.values()):
                    conn.closing = True
                    conn.close()
            else:
                target = self.session.connections[lo.cid]
                target.closing = True
                target.close()

    def _snack(self, s: P.Snack, data: Any) -> None:
        self.reject(P.REJECT_COMMAND_NOT_SUPPORTED, s.encode())  # ErrorRecoveryLevel 0

    def async_event(self, event: int, lun: bytes = P.LUN0, sense: bytes = b"", param3: int = 0) -> None:
        exp, mx = self._sns()
        seg = P.sense_segment(sense) if sense else b""
        self.out(P.AsyncMessage(event, self.stat_sn, exp, mx, lun, parameter3=param3,
                                data_length=len(seg)), seg)
