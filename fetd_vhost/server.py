"""The vhost-user-scsi front end process: a Unix socket a VM's QEMU
connects to, the sans-I/O protocol and device around it, and the STML link
(stml.api, the only STML module a front end uses).

One socket serves one VM at a time; the VM is one I_T nexus to one target.
QEMU 7.2 cannot reconnect to a restarted back end (that came in 8.2): when
the connection ends the guest has lost the device, and the socket is ready
for the next VM at once."""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import signal
import socket
import stat
import struct
import time
from typing import Any, Callable, Final

from stml.api import Detect, FrontEndLink, Target

from fetd_vhost.protocol import MAX_FDS, Feature, Framer, Message, ProtocolError, ProtocolFeature, Session, bits
from fetd_vhost.scsi import EVENT_Q, S, VirtioScsiDevice
from fetd_vhost.virtqueue import Virtqueue

log = logging.getLogger("fetd_vhost")

MAX_QUEUES = 2 + 64        # control, event and up to 64 request queues (num_queues)
FEATURES = bits(Feature.VERSION_1, Feature.INDIRECT_DESC, Feature.EVENT_IDX,
                Feature.SCSI_HOTPLUG, Feature.SCSI_CHANGE)
PROTOCOL_FEATURES = bits(ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK)
REPLY_TIMEOUT = 5.0
_FD_SPACE = socket.CMSG_SPACE(MAX_FDS * struct.calcsize("i"))
YIELDED_NS: Final = 50_000    # a look at the rings this much apart: another task had the CPU


def initiator_name(socket_path: str) -> str:
    """The guest's initiator port name, from the socket it comes through:
    the same VM socket means the same initiator across restarts, so
    persistent reservations and ACL entries keep meaning something."""
    host = re.sub(r"[^a-z0-9.-]", "-", os.uname().nodename.lower())
    path = re.sub(r"[^a-z0-9.-]+", "-", os.path.abspath(socket_path).lower()).strip("-")
    return f"iqn.2026-01.org.scsi-target.vhost:{host}:{path}"


class _Port:
    """The device's contract calls, on behalf of one nexus."""

    def __init__(self, link: FrontEndLink, nexus: int) -> None:
        self.link, self.nexus = link, nexus

    def rx_cmnd(self, tag: int, lun: int, cdb: bytes, attr: int, direction: int, length: int,
                unsol: int, data: list) -> None:
        self.link.rx_cmnd(tag, self.nexus, lun, cdb, attr, direction, length, unsol, data)

    def rx_data(self, tag: int, offset: int, data: list) -> None:
        self.link.scsi_rx_data(tag, offset, data)

    def rx_tmf(self, tag: int, fn: int, lun: int, ref: int | None) -> None:
        self.link.rx_task_mgmt_fn(tag, self.nexus, fn, lun, ref)

    def buffer(self, size: int) -> memoryview | None:
        return self.link.shared_buffer(size)

    def release(self, buf: memoryview) -> None:
        self.link.release_buffer(buf)


class Connection:
    """One master (QEMU) connection: its session, device and descriptors."""

    def __init__(self, fe: VhostFrontEnd, sock: socket.socket, nexus: int) -> None:
        self.fe = fe
        self.sock = sock
        self.nexus = nexus
        self.loop = asyncio.get_running_loop()
        self.framer = Framer()
        self.device = VirtioScsiDevice(_Port(fe.link, nexus), on_error=fe.guest_error, tags=fe.tags)
        self.session = Session(FEATURES, PROTOCOL_FEATURES, MAX_QUEUES, self, self.send)
        self.device.rings = self.session.rings
        self.watched: dict[int, int] = {}        # ring index -> kick fd we read
        self.closed = False
        self._scheduled: set[int] = set()        # rings a _process call is queued for
        self.rescan = False          # the guest was let in: tell it to scan once the nexus is ready
        # the poll (Connection.poll) only while it pays: the guest's last request came
        # within the window of the answer before it (measured at the kick when not polling)
        self.poll_next = True
        self.idle_since = 0          # monotonic ns of the last answer that left nothing in flight
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._readable)

    # ---------------------------------------------------------------- master messages
    def _readable(self) -> None:
        while not self.closed:
            try:
                data, anc, _, _ = self.sock.recvmsg(self.framer.want(), _FD_SPACE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                log.warning("vhost-user connection: %s", e)
                self.close()
                return
            fds = _fds(anc)
            if not data:
                for fd in fds:
                    os.close(fd)
                self.close()
                return
            try:
                msg = self.framer.feed(data, fds)
                if msg is not None:
                    self._handle(msg)
            except ProtocolError as bad:
                log.error("vhost-user protocol error: %s; closing the connection", bad)
                self.close()
                return
        self.fe.schedule_signals()

    def _handle(self, msg: Message) -> None:
        reply = self.session.handle(msg)
        if reply is not None:
            self.send(reply)

    def send(self, reply: bytes) -> None:
        if self.closed:
            return
        try:
            # replies are small and the master waits for each: the socket has room,
            # and a master that stops reading loses its connection, not our loop
            self.sock.settimeout(REPLY_TIMEOUT)
            self.sock.sendall(reply)
        except OSError as e:
            log.warning("vhost-user reply lost: %s", e)
            self.close()
        finally:
            if not self.closed:
                self.sock.setblocking(False)

    # ---------------------------------------------------------------- RingObserver
    def ring_changed(self, ring: Virtqueue) -> None:
        if self.watched.get(ring.index) != ring.kick_fd:
            self._unwatch(ring.index)
            if ring.kick_fd is not None:
                with contextlib.suppress(OSError):
                    os.set_blocking(ring.kick_fd, False)
                self.loop.add_reader(ring.kick_fd, self._kicked, ring)
                self.watched[ring.index] = ring.kick_fd
        # a kick may have come before the ring was enabled: look now, not only on kicks
        self._schedule(ring)

    def ring_stopping(self, ring: Virtqueue, done: Callable[[], None]) -> None:
        self._unwatch(ring.index)
        self.device.ring_stopping(ring, done)

    def features_changed(self, features: int) -> None:
        self.device.set_features(features)

    def _unwatch(self, index: int) -> None:
        fd = self.watched.pop(index, None)
        if fd is not None:
            self.loop.remove_reader(fd)

    def _kicked(self, ring: Virtqueue) -> None:
        if self.idle_since:
            self.poll_next = time.monotonic_ns() - self.idle_since <= self.fe.poll_ns
            self.idle_since = 0
        fd = ring.kick_fd
        if fd is not None:
            try:    # (not contextlib.suppress: compiled, that is a Python object per kick)
                os.eventfd_read(fd)
            except OSError:
                pass
        self._process(ring)

    def _process(self, ring: Virtqueue) -> None:
        self._process_rings([ring])

    def _process_rings(self, rings: list[Virtqueue]) -> None:
        if self.closed:
            return
        link = self.fe.link
        link.hold()     # the commands leave in the flush below: no flush of their own scheduled
        try:
            for ring in rings:
                self.device.process(ring)
            self.resume()
        finally:
            # the commands a kick brought leave now, not at the end of the loop iteration
            link.flush()
        if self.device.to_signal:     # answered at once (errors): a request in flight has nothing to signal
            self.fe.schedule_signals()

    def resume(self) -> None:
        """Rings the device stopped taking from (a ring's worth per call, or
        full of requests in flight until answers freed a place) are looked at
        again on a later turn of the loop, after the other work in it."""
        for ring in self.device.take_to_process():
            self._schedule(ring)

    def _schedule(self, ring: Virtqueue) -> None:
        if ring.index not in self._scheduled:
            self._scheduled.add(ring.index)
            self.loop.call_soon(self._scheduled_process, ring)

    def _scheduled_process(self, ring: Virtqueue) -> None:
        self._scheduled.discard(ring.index)
        self._process(ring)

    def signal(self) -> None:
        for ring in self.device.take_signals():
            fd = ring.call_fd
            if fd is not None:
                try:
                    os.eventfd_write(fd, 1)
                except OSError:
                    pass

    def answered(self) -> bool:
        """Answers on a request queue are to be signalled: a poll may pay (an
        event, a detect or a task management answer brings no request after it)."""
        for index in self.device.to_signal:
            if index > EVENT_Q:
                return True
        return False

    def idle_rings(self) -> list[Virtqueue]:
        """The request rings, when all of them are answered (none otherwise: the
        STML has something to answer that a poll would delay)."""
        if self.closed or not self.device.online:
            return []
        rings = [ring for ring in self.device.rings[EVENT_Q + 1:] if ring.ready]
        for ring in rings:
            if ring.in_flight:
                return []
        return rings

    def poll(self, rings: list[Virtqueue], window_ns: int) -> None:
        """Watch quieted rings for the guest's next request for up to
        `window_ns`. At QD1 the next request then needs neither the guest's
        notification (under TCG an exit of the vCPU and a system call) nor
        our wake-up on an idle CPU (decision 0312). Each look yields the CPU
        to whatever else is runnable on it (a VM's thread the scheduler moved
        here), and a look that came back late (another task ran) ends the
        poll, and the next: the spin takes only a CPU nobody else wants."""
        start = now = time.monotonic_ns()
        deadline = start + window_ns
        wanted = False
        while not _any_request(rings) and now < deadline and not wanted:
            os.sched_yield()
            last, now = now, time.monotonic_ns()
            wanted = now - last > YIELDED_NS
        self.poll_next = _any_request(rings)
        if not self.poll_next:      # the kick tells how long the guest took after all (not when
            self.idle_since = 0 if wanted else start     # the CPU was wanted: skip one poll)
        for ring in rings:
            ring.kick_me_after()        # notifications on again, whatever process() does
        self._process_rings(rings)      # then what came

    # ---------------------------------------------------------------- STML state
    def set_online(self, online: bool) -> None:
        was, self.device.online = self.device.online, online
        if online and not was:
            self._process_rings(self.device.rings)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.sock.fileno())
        for index in list(self.watched):
            self._unwatch(index)
        self.session.close()
        self.framer.close()
        self.sock.close()
        self.fe.connection_closed(self)


class VhostFrontEnd:
    """The front end: the listening socket, the connection of the VM, and
    the STML link. STML calls arrive here and go to the VM's device."""

    def __init__(self, stml_endpoint: str, socket_path: str, target: str,
                 initiator: str | None = None, curve: dict[str, bytes] | None = None,
                 group: int | None = None, poll_us: int = 0) -> None:
        self.socket_path = socket_path
        self.poll_ns = poll_us * 1000   # after the last answer: watch the rings this long (Connection.poll)
        self.group = group       # a gid: the socket is 0660 in that group (QEMU as another user)
        self.target_name = target
        self.initiator = initiator or initiator_name(socket_path)
        self.link = FrontEndLink(stml_endpoint, "vhost", self, curve=curve,
                                 name=f"vhost-{os.uname().nodename}-{os.getpid()}")
        self.conn: Connection | None = None
        self.listener: socket.socket | None = None
        self.detect_info: Detect | None = None
        self.luns: set[int] | None = None   # the target's LUNs as last seen
        self._nexus_ids = itertools.count(1)
        self.tags = itertools.count(1)      # task tags, unique across the VMs this process serves
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signal: asyncio.Handle | None = None    # signal_now, scheduled
        self.refused: str | None = None

    # ---------------------------------------------------------------- the socket
    def listen(self) -> None:
        """Bind the socket, readable and writable by our user only (0600), or
        also by the group given (0660): whoever can connect can read and write
        the target's LUNs."""
        path = self.socket_path
        parent = os.path.dirname(path) or "."
        if not os.path.isdir(parent):
            raise OSError(f"its directory {parent} does not exist")
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise OSError(f"{path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
                raise OSError(f"{path} is in use by a running back end")
            except ConnectionRefusedError:
                os.unlink(path)      # a dead back end's socket
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(path)
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old)
        if self.group is not None:
            try:
                os.chown(path, -1, self.group)
            except OSError as e:
                sock.close()
                os.unlink(path)
                raise OSError(f"cannot give it to group {self.group}: {e.strerror} (this user must be "
                              f"a member of the group)") from None
        os.chmod(path, 0o600 if self.group is None else 0o660)
        sock.listen(4)
        sock.setblocking(False)
        self.listener = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept)
        print(f"fetd_vhost: listening on {path}", flush=True)

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.warning("vhost-user socket: %s", e)
            return
        if self.conn is not None:
            log.warning("a second master connected to %s while a VM is attached: refused",
                        self.socket_path)
            sock.close()
            return
        nexus = next(self._nexus_ids)
        self.conn = Connection(self, sock, nexus)
        # a status line only: `run` relays it in the log format (a log line too would say it twice)
        print(f"fetd_vhost: a VM connected to {self.socket_path} (nexus {nexus}, initiator {self.initiator})",
              flush=True)
        self._register(self.conn)

    def connection_closed(self, conn: Connection) -> None:
        if self.conn is conn:
            self.conn = None
            self.link.scsi_release(conn.nexus)
            print(f"fetd_vhost: the VM on {self.socket_path} disconnected", flush=True)

    def _register(self, conn: Connection) -> None:
        """Register the VM's nexus when the STML has our target and lets us in;
        while it does not, every request gets BAD_TARGET (the guest sees no
        disk). Being let in or out later reaches the guest as events: a rescan
        of the target, or the removal of its LUNs."""
        target = self.detect_info.target(self.target_name) if self.detect_info else None
        refused, was = self._refusal(target), self.refused
        conn.device.refused = refused
        self.refused = refused
        if refused is not None:
            if refused != was:
                log.error("%s: the VM sees no disk", refused)
            if conn.nexus in self.link.nexuses:
                conn.device.fail_all(S.BAD_TARGET)
                self.link.scsi_release(conn.nexus)
                for lun in sorted(self.luns or ()):
                    conn.device.lun_removed(lun)
            conn.set_online(True)
            return
        if conn.nexus not in self.link.nexuses and self.link.connected.is_set():
            conn.rescan = conn.rescan or was is not None
            conn.set_online(False)
            self.link.register_nexus(conn.nexus, self.initiator, self.target_name, 1)

    def _refusal(self, target: Target | None) -> str | None:
        if self.detect_info is None:
            return None
        if target is None:
            return f"the STML has no target {self.target_name}"
        acl = [a.lower() for a in target.access.get("acl") or ()]
        if acl and self.initiator.lower() not in acl:
            return f"initiator {self.initiator} is not in the ACL of {self.target_name}"
        return None

    def guest_error(self, message: str) -> None:
        log.warning("guest: %s", message)

    # ---------------------------------------------------------------- signals
    def schedule_signals(self) -> None:
        """Interrupt the guest once per loop iteration, for everything answered in it."""
        if self._signal is None:
            loop = self._loop
            if loop is None:   # (kept: get_running_loop costs a getpid system call each time)
                loop = self._loop = asyncio.get_running_loop()
            self._signal = loop.call_soon(self.signal_now)

    def signal_now(self) -> None:
        self._signal = None
        conn = self.conn
        if conn is not None:
            conn.resume()     # answers may have freed places in a held ring
            rings = conn.idle_rings() if self.poll_ns and conn.answered() else []
            if rings and conn.poll_next:
                for ring in rings:    # before the interrupt, so that the driver it wakes does not kick
                    ring.quiet()
                conn.signal()
                conn.poll(rings, self.poll_ns)
                return
            conn.idle_since = time.monotonic_ns() if rings else 0
            conn.signal()

    # ---------------------------------------------------------------- STML -> us
    def detect(self, detect: Detect) -> None:
        if self.detect_info is None:
            print(f"fetd_vhost: attached to STML at {self.link.endpoint}", flush=True)
        self.detect_info = detect
        target = detect.target(self.target_name)
        luns = {lun.lun for lun in target.luns} if target else set()
        conn = self.conn
        max_transfer = detect.limits.get("max_transfer")
        if conn is not None and isinstance(max_transfer, int) and max_transfer > 0:
            conn.device.max_unsol = max_transfer
        if conn is not None and self.luns is not None:
            for lun in sorted(luns - self.luns):
                conn.device.lun_added(lun)
            for lun in sorted(self.luns - luns):
                conn.device.lun_removed(lun)
        self.luns = luns
        if conn is not None:
            self._register(conn)
        else:   # no VM yet: say now why one would see no disk (a mistyped --target, the ACL)
            refused = self._refusal(target)
            if refused is not None and refused != self.refused:
                log.error("%s: a VM on %s would see no disk", refused, self.socket_path)
            self.refused = refused
        self.schedule_signals()

    def nexus_ready(self, nexus: int, error: str | None) -> None:
        conn = self.conn
        if conn is None or conn.nexus != nexus:
            return
        if error:
            log.error("the STML refused the VM's nexus: %s", error)
            conn.device.refused = error
        conn.set_online(True)
        if conn.rescan and not error:
            conn.rescan = False
            conn.device.lun_added(0)    # LUN 0: the guest scans the whole target
            self.schedule_signals()

    def rdy_to_xfer(self, tag: int, offset: int, length: int) -> None:
        if self.conn is not None:
            self.conn.device.rdy_to_xfer(tag, offset, length)

    def xmit_response(self, tag: int, status: int, sense: bytes | None, resid: int, data: list) -> None:
        link = self.link
        if self.conn is not None:
            self.conn.device.xmit_response(tag, status, sense, resid, data)
            if not link.delivering:    # else messages_handled signals, after the last message
                self.schedule_signals()
        # the read data is in guest memory now (or nobody wants it): the STML's again
        # (only a lent slot or a timed command needs saying so: FrontEndLink)
        if link.timing or tag in link.lent:
            link.scsi_target_done([tag])

    def task_mgmt_fn_done(self, tag: int, response: int, aborted: list[int], info: bytes = b"") -> None:
        if self.conn is not None:
            self.conn.device.task_mgmt_fn_done(tag, response, aborted)
            self.schedule_signals()

    def report_aen(self, nexus: int | None, lun: int, sense: bytes) -> None:
        conn = self.conn
        if conn is None or (nexus is not None and nexus != conn.nexus) or len(sense) < 14:
            return
        if sense[0] & 0x7F in (0x72, 0x73):
            asc, ascq = sense[2], sense[3]
        else:
            asc, ascq = sense[12], sense[13]
        conn.device.unit_attention(lun, asc, ascq)
        self.schedule_signals()

    def drop_nexus(self, nexus: int, reason: str) -> None:
        """Management dropped the VM's nexus (its tasks are aborted): the guest
        sees its commands reset, and comes back as a new nexus at once (a VM
        cannot log in again by itself)."""
        conn = self.conn
        if conn is None or conn.nexus != nexus:
            return
        log.info("the VM's nexus %d was dropped: %s", nexus, reason or "by the STML")
        conn.device.fail_all(S.RESET)
        self.link.scsi_release(nexus)
        conn.set_online(False)
        conn.nexus = next(self._nexus_ids)
        conn.device.port = _Port(self.link, conn.nexus)
        self._register(conn)
        self.schedule_signals()

    def messages_handled(self) -> None:
        """What one read from the STML brought is answered: interrupt the guest now
        (the answers scheduled nothing while delivered)."""
        handle = self._signal
        if handle is not None:
            handle.cancel()      # done here: no second pass later in this loop iteration
        self.signal_now()

    def link_lost(self) -> None:
        """The STML is gone: commands in flight fail with BUSY (the guest
        retries them); new ones wait in the rings until it is back."""
        conn = self.conn
        if conn is not None:
            conn.set_online(False)
            conn.device.fail_all(S.BUSY)
            self.schedule_signals()

    # ---------------------------------------------------------------- life
    async def run(self, stop: asyncio.Event) -> None:
        self.listen()
        self.link.start()
        stopped = asyncio.ensure_future(stop.wait())
        ended: BaseException | None = None
        try:
            await asyncio.wait([stopped, self.link.ended], return_when=asyncio.FIRST_COMPLETED)
            if self.link.ended.done():
                self.link.ended.result()   # raises RegistrationRefused: exit 2 (fetd_vhost.cli)
        except BaseException as e:
            ended = e
        # the cleanup awaits, so it is not a finally block: compiled, a
        # suspension there loses or corrupts the exception (decisions/0840)
        stopped.cancel()
        if self.conn is not None:
            self.conn.close()
        await self.link.close()
        if self.listener is not None:
            asyncio.get_running_loop().remove_reader(self.listener.fileno())
            self.listener.close()
            with contextlib.suppress(OSError):
                os.unlink(self.socket_path)
        if ended is not None:
            raise ended


def _any_request(rings: list[Virtqueue]) -> bool:
    for ring in rings:
        if ring.avail_idx() != ring.last_avail:
            return True
    return False


def _fds(ancillary: list[Any]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            n = len(data) // struct.calcsize("i")
            fds += struct.unpack(f"{n}i", data[:n * struct.calcsize("i")])
    return fds


async def run_fetd_vhost(stml_endpoint: str, socket_path: str, target: str,
                         initiator: str | None = None, curve: dict[str, bytes] | None = None,
                         inject: list[Any] | None = None, group: int | None = None, poll_us: int = 0) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    fe = VhostFrontEnd(stml_endpoint, socket_path, target, initiator, curve, group, poll_us)
    if inject:   # fault injection: off, and no tap, unless asked
        from stml.api.inject import tap_link
        tap_link(inject, fe.link, "fetd_vhost")
    await fe.run(stop)
