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
from typing import Any, Callable, Protocol

from fetd_tcp import pdu as P
from fetd_tcp.budget import Account, Grant, unlimited
from fetd_tcp.keys import ConnectionParams, SessionParams
from stml.api import DataDir, Status, TaskAttr

TASK_SET_FULL = int(Status.TASK_SET_FULL)

# What one session or connection may make us hold beyond the command window
OOO_LIMIT = 1 << 20           # data of PDUs waiting for an earlier CmdSN, per session
MAX_TMFS = 16                 # task management requests the STML has not answered, per session
MAX_TEXT_REQUEST = 64 << 10   # a Text request continued over several PDUs (C bit)
MAX_TEXT_RESPONSE = 1 << 20   # one Text response (SendTargets); longer ones are cut (server)

log = logging.getLogger("fetd_tcp")

SN_MOD = 1 << 32
_PDU_OVERHEAD = 64   # a Data-In or response header with its digests and padding, rounded up
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
                 "r2t_sn", "data_sn", "bursts", "r2ts", "unsol_data_sn", "failed", "held",
                 "res_read", "res_write", "grant")

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
        self.r2ts: dict[int, list[int]] = {}   # TTT -> [offset, end, next DataSN] outstanding
        self.unsol_data_sn = 0
        self.failed = False         # its data went wrong; the STML has been told
        self.held = 0               # write data counted against conn.write_limit until answered
        self.res_read = 0           # reserved in the budget for its read data, until answered
        self.res_write = 0          # reserved in the budget for its write data, until answered
        self.grant: Grant | None = None   # its solicited data waits for room in the budget


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
    connections: dict[int, Connection] = field(default_factory=dict)
    itts: dict[int, Task] = field(default_factory=dict)
    # CmdSN -> (connection, PDU, data); data None: it did not fit (answered TASK SET FULL)
    queued: dict[int, tuple[Connection, Any, Any]] = field(default_factory=dict)
    queued_bytes: int = 0   # data held in `queued`, within OOO_LIMIT
    tmfs: int = 0           # TMFs the STML has not answered
    last_max: int = -1      # MaxCmdSN as last computed; it never goes back

    @property
    def max_cmd_sn(self) -> int:
        """A window of `window` commands the STML has not answered: ExpCmdSN +
        window - 1 - tasks in flight, so MaxCmdSN advances as commands complete
        (the task table stays within the window). While a connection is over one
        of its bounds (write_limit, read_limit) it stays put. Never lower than it
        was: the initiator may already send up to it."""
        last = self.last_max
        if last >= 0:
            for c in self.connections.values():   # (per command: no calls)
                kinds = c.account.kinds
                if c.write_held >= c.write_limit or kinds["read"] + kinds["out"] >= c.read_limit:
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
        self.stat_sn = stat_sn
        self.out = out
        self.link = link
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
        # within MaxCmdSN as last advertised (it never goes back: no need to compute it again)
        if sn == s.exp_cmd_sn and ((s.last_max - sn) % SN_MOD < (1 << 31) or sn_le(sn, s.max_cmd_sn)):
            s.exp_cmd_sn = (sn + 1) % SN_MOD
            self._run[type(pdu)](pdu, data)
            while s.queued and s.exp_cmd_sn in s.queued:
                conn, qpdu, qdata = s.queued.pop(s.exp_cmd_sn)
                s.exp_cmd_sn = (s.exp_cmd_sn + 1) % SN_MOD
                if qdata:
                    s.queued_bytes -= len(qdata)
                    conn.account.give("ooo", len(qdata))
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
        if n and (s.queued_bytes + n > OOO_LIMIT or not self.account.take("ooo", n)):
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
        unsol = n
        if write and not cmd.final and not s.params.initial_r2t:
            unsol = min(s.params.first_burst_length, edtl)
        need = read_held = 0
        if cmd.read and edtl:
            need = min(edtl, s.max_transfer)    # its data, a header per Data-In, a status
            need += (need // self.params.max_send_data_segment_length
                     + need // s.params.max_burst_length + 2) * _PDU_OVERHEAD
            kinds = self.account.kinds
            read_held = kinds["read"] + kinds["out"]   # reserved, and output not yet sent
        if ((write and cmd.immediate and self.write_held >= self.write_limit)
                or (need and read_held and read_held + need > self.read_limit)):
            # immediate writes bypass the window that holds other writes back; a read
            # past read_limit (unless it is the connection's only one)
            self._task_set_full(itt)
            return
        if cmd.immediate and len(s.itts) >= s.window:
            # immediate commands bypass the CmdSN window, not the bound on tasks in flight
            self.reject(P.REJECT_IMMEDIATE_COMMAND_REJECT, cmd.encode())
            return
        account = self.account
        if (unsol or need) and not account.take("write" if unsol else "read", unsol + need):
            self._task_set_full(itt)    # no room in the budget
            return
        tags = self.tags
        tag = tags.new()
        task = Task(self, itt, tag, cmd.lun, edtl, write)
        s.itts[itt] = task
        tags.tasks[tag] = task
        if write:
            direction = (_WRITE | _READ) if cmd.read else _WRITE
            if unsol:
                task.unsol_end = task.held = task.res_write = unsol
                task.next_offset = n
                self.write_held += unsol
                if need:   # taken with the write data above, as "write": now apart
                    account.move("write", "read", need, need)
        else:
            direction = _READ if cmd.read else 0
        if need:
            task.res_read = need
        if write:
            account.budget.hold(tag)   # its R2Ts may wait for room: Budget's progress rule
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
        """Solicit [offset, offset+length) in bursts of MaxBurstLength, once the
        budget has room for all of it (Budget.wait: a granted task never needs
        more room to finish)."""
        end = min(offset + length, task.edtl)
        if task.failed or offset >= end or self.session.itts.get(task.itt) is not task:
            return
        task.bursts.append([offset, end])
        self.waiting[task] = None
        n, account = end - offset, self.account
        if account.budget.take_now(account, "write", n):
            self._granted(task, n)
            return
        grant = account.budget.wait(account, "write", n, task.tag,
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
        mbl = self.session.params.max_burst_length
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
            account.give("read", task.res_read)
            task.res_read = 0
        if task.res_write:
            account.give("write", task.res_write)
            task.res_write = 0
        if task.write:   # as _scsi_command held it
            account.budget.unhold(task.tag)
        if self.waiting:
            self.waiting.pop(task, None)
            self._resume_r2ts()

    def xmit_response(self, task: Task, status: int, sense: bytes | None, resid: int,
                      data: memoryview | None) -> None:
        """Data-In PDUs and the status; the status rides in the last Data-In
        when there is no sense to send (phase collapse). The read data counts as
        output (until the socket takes it) before its reservation goes."""
        s = self.session
        s.itts.pop(task.itt, None)
        n = len(data) if data is not None else 0
        if n and self.count_out:
            self.account.move("read", "out", n, task.res_read)
            task.res_read = max(0, task.res_read - n)
        if task.write or self.waiting:
            self.release(task)
        elif task.res_read:            # a read: only its reservation (per command: no call)
            self.account.give("read", task.res_read)
            task.res_read = 0
        count, over, under = abs(resid), resid < 0, resid > 0
        if n:
            assert data is not None   # n is its length
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
        if s.tmfs >= MAX_TMFS:   # immediate TMFs bypass the window: bound those in flight
            self.out(P.TaskMgmtResponse(t.itt, P.TMF_RESP_REJECTED, self._next_stat_sn(), exp, mx), b"")
            return
        s.tmfs += 1
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
            old = s.queued.get(ref_sn)
            if old is not None and old[2]:
                s.queued_bytes -= len(old[2])
                old[0].account.give("ooo", len(old[2]))
            s.queued[ref_sn] = (self, None, b"")   # consumes the CmdSN, runs nothing
        exp, mx = self._sns()
        resp = P.TMF_RESP_COMPLETE if ref_sn is not None else P.TMF_RESP_NO_TASK
        self.out(P.TaskMgmtResponse(t.itt, resp, self._next_stat_sn(), exp, mx), b"")

    def task_mgmt_fn_done(self, itt: int, fn: int, response: int, aborted: list[Task]) -> None:
        self.session.tmfs -= 1
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
        if len(data) and self.count_out and not self.account.take("out", len(data)):
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
        if len(self.text_in) + n > MAX_TEXT_REQUEST or not self.account.take("text", n):
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
        if not self.account.take("text", len(body)):
            self.reject(P.REJECT_OUT_OF_RESOURCES, t.encode())
            return
        self.text_out = memoryview(body)
        self._text_send(t)

    def _text_send(self, t: P.TextRequest) -> None:
        """The next segment of the pending answer (continued while more is left)."""
        body = self.text_out
        assert body is not None   # callers check
        start = self.text_pos
        chunk = body[start:start + self.params.max_send_data_segment_length]
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
            self.account.give("text", held)
        self.text_in = bytearray()
        self.text_out = None
        self.text_pos = 0
        self.text_ttt = None

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
