"""`scsi-target`: one command for every process and for local SCSI access.

This package sits above the others: it starts the STML and the front ends
as processes (`run`), or one of them alone, and drives the loopback client.

Exit codes: 0 success; 1 a runtime failure (no target running, a SCSI
command failed, an I/O error); 2 bad input or a refusal (a bad flag or
config value, a management request the STML refused, a start that cannot
succeed as configured).
"""
from __future__ import annotations

import fcntl
import functools
import logging
import os
import socket
import stat
import struct
import sys
import time
from pathlib import Path
from typing import Any, Callable

import click

from fetd_tcp.cli import main as fetd_tcp_main
from fetd_vhost.cli import main as fetd_vhost_main, vhost_children, vhost_option
from scsi_runtime import accel
from scsi_runtime.logs import setup_logging
from scsi_target.endpoint import NotRunning, find_endpoint, inherited, require_running
from scsi_target.supervise import Supervisor, sd_notify
from stml.api.inject import for_side, rule_args
from stml.cli import (apply_stml_options, config_exit, config_options, inject_options, inject_rules,
                      load_or_exit, main as stml_main, stml_options, trace_options, trace_settings)
from stml.config import (CONFIG_NAME, DEFAULT_PORTAL, Config, ConfigError, StartupError, check_data_dir,
                         data_dir_of, default_data_dir, parse_size)
from stml.lu import missing_file
from stml.portals import GATEWAY_STATE

CHUNK = 1 << 20  # copy-in/out transfer size
POLL_US = 200    # the STML's busy-poll window when it has CPUs of its own: a QD1 round trip
                 # through the front end and the initiator takes 100-150 us on a 2-vCPU VM
VHOST_POLL_US = 300   # a vhost front end's poll after its last answer, on CPUs apart from the VMs':
                      # longer than a TCG guest takes from its interrupt to its next QD1 request (0312)
DEPTH = 4        # commands in flight during copies
BANNER_LUNS = 16  # LUNs `run`'s banner lists; `lun list` shows them all
RUN_LOCK = "run.lock"   # in the data dir: held by its `run`, which writes its PID there
CONTEXT = {"max_content_width": 100, "help_option_names": ["-h", "--help"]}

__all__ = ["Supervisor", "cpu_list", "cpu_split", "main", "placement"]


class Size(click.ParamType):
    """A size as LUN specs take it: 64MiB, 1GiB, 1048576."""
    name = "size"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        try:
            return value if isinstance(value, int) else parse_size(value, "size")
        except ConfigError:
            self.fail(f"{value!r} is not a size (examples: 64MiB, 1GiB, 1048576)", param, ctx)


SIZE = Size()


def where_options(f: Callable) -> Callable:
    """How a client finds the STML; accepted before the verb (on `scsi-target`)
    and after it alike."""
    for opt in reversed([
        click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Find the STML from this config."),
        click.option("--data-dir", type=click.Path(file_okay=False), help="Find the STML of this data dir."),
        click.option("--stml", help="STML endpoint (ipc://PATH or tcp://HOST:PORT)."),
    ]):
        f = opt(f)
    return f


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="scsi-target")
@where_options
@click.pass_context
def main(ctx: click.Context, config_path: str | None, data_dir: str | None, stml: str | None) -> None:
    """A user-space SCSI target: the STML (SCSI logic) and its front ends
    (iSCSI over TCP, local loopback) as separate processes.

    Start with `scsi-target run`; manage the running target with the other
    verbs (`ls`, `status`, `lun add`, ...). Exit codes: 0 success, 1 runtime
    failure, 2 bad input or a refused request."""
    ctx.obj = {"config_path": config_path, "data_dir": data_dir, "stml": stml}


main.add_command(stml_main, "stml")
main.add_command(fetd_tcp_main, "fetd-tcp")
main.add_command(fetd_vhost_main, "fetd-vhost")
from scsi_target.keys import keys as _keys  # noqa: E402  (verbs defined in their own modules)
from scsi_target.mgmt import register as _register_mgmt  # noqa: E402
from scsi_target.trace import trace as _trace  # noqa: E402
main.add_command(_keys, "keys")
main.add_command(_trace, "trace")
_register_mgmt(main)


# ------------------------------------------------------------------ run

def _config_args(kw: dict[str, Any]) -> list[str]:
    args = []
    for flag, key in (("--config", "config_path"), ("--data-dir", "data_dir"), ("--iqn", "iqn"),
                      ("--stml-endpoint", "stml_endpoint")):
        if kw.get(key):
            args += [flag, str(kw[key])]
    for spec in kw.get("luns", ()):
        args += ["--lun", spec]
    return args


def cpu_split(names: list[str], allowed: set[int]) -> dict[str, set[int]]:
    """Disjoint sets of the CPUs we may use, one per child, in order: the STML
    and a front end then never take turns on one CPU while the other idles
    (README, Performance: 4 KiB QD16 and 64 KiB +0.05 to +0.12 of tgtd on two
    vCPUs). Nothing to split for one child or fewer CPUs than children."""
    cpus = sorted(allowed)
    if len(names) < 2 or len(cpus) < len(names):
        return {}
    share = len(cpus) // len(names)
    return {name: set(cpus[i * share:(i + 1) * share] if i < len(names) - 1 else cpus[i * share:])
            for i, name in enumerate(names)}


def placement(names: list[str], vhosts: list[str], allowed: set[int]) -> dict[str, set[int]]:
    """`--cpu-affinity split`: the STML and fetd_tcp on shares of their own
    (cpu_split). vhost front ends run on the STML's share and the first share
    is left to the VMs' vCPU threads: at QD1 a vhost front end and the STML
    take turns per command, and handing over on one CPU wakes no idle CPU
    while the vCPU goes on with its own work (decision 0312). When the CPUs
    do not go round for that, the split is as without vhost front ends."""
    if vhosts:
        split = cpu_split(["(vms)", *names], allowed)
        if split:
            del split["(vms)"]
            return split | {name: split["stml"] for name in vhosts}
    return cpu_split(names, allowed)


def cpu_list(cpus: set[int]) -> str:
    """As Linux writes CPU sets (Cpus_allowed_list): 0-3,8."""
    runs: list[list[int]] = []
    for c in sorted(cpus):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def human(n: int | float) -> str:
    """1073741824 -> "1 GiB", 1536 -> "1.5 KiB": sizes as people read them."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if float(n).is_integer() else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


# ------------------------------------------------------------------ run: before anything starts

def lock_data_dir(ddir: Path) -> int:
    """One `run` per data dir: a lock held for our lifetime (closed on exec,
    so children do not inherit it; released by the kernel however we die).
    The file holds our PID, and `ready` once we serve (mark_serving)."""
    path = ddir / RUN_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        words = os.pread(fd, 32, 0).decode(errors="replace").split()   # (its PID, maybe `ready`)
        other = words[0] if words else ""
        os.close(fd)
        raise StartupError(f"data dir {ddir}", f"another target is running in it"
                           f"{f' (pid {other})' if other else ''}: stop it first, or use another "
                           f"--data-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def mark_serving(lock: int) -> None:
    """`run` serves (its banner, READY=1): said in its lock file, where
    wait-ready reads it (run_serves). The front end of a gateway reports its
    listeners to no STML (0414), so only `run` knows when it takes logins."""
    os.pwrite(lock, f"{os.getpid()} ready\n".encode(), 0)


class RunLockUnreadable(Exception):
    """The data dir's run.lock exists but this user may not read it: whether
    its `run` serves cannot be told (0707)."""


def run_serves(ddir: Path) -> bool | None:
    """Whether the `run` of this data dir serves yet; None when no live
    `run` holds it (an STML started alone, or a `run` that died: its PID is
    gone, and each start writes the file anew). A file this user may not
    read (0600: another user's `run`) is RunLockUnreadable, not "no run"."""
    path = ddir / RUN_LOCK
    try:
        words = path.read_text(errors="replace").split()
    except PermissionError as e:
        raise RunLockUnreadable(f"cannot read {path} ({e.strerror}): its `run` is another user's; "
                                f"run wait-ready as that user, or with --stml to ask the STML alone") from None
    except OSError:   # (none yet)
        return None
    try:
        pid = int(words[0])
    except (ValueError, IndexError):   # (empty: a `run` starting or gone)
        return None
    try:
        os.kill(pid, 0)
    except PermissionError:   # (alive, another user's)
        pass
    except OSError:
        return None
    return words[1:] == ["ready"]


def check_portals(portals: list[str]) -> None:
    """Every portal with a fixed port can be listened on (as asyncio will:
    SO_REUSEADDR), so a taken port stops the start here, before any banner;
    fetd_tcp exits 2 too if it loses a race for one."""
    from scsi_runtime.portals import parse_portal
    for p in portals:
        host, port, _ = parse_portal(p)
        if port == 0:
            continue
        try:
            infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as e:
            raise StartupError(f"portal {p}", f"cannot resolve {host}: {e.strerror}") from None
        for family, kind, proto, _, addr in infos:
            with socket.socket(family, kind, proto) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(addr)
                except OSError as e:
                    raise StartupError(f"portal {p}", f"cannot listen: {e.strerror}"
                                       + (" (another iSCSI target? `ss -ltnp` shows who)"
                                          if e.errno == 98 else "")) from None


def lun_size(o: Any) -> int | None:
    """The size a LUN is served at: an existing file's own (`size` only makes
    a new or empty one), in whole blocks, as the STML serves it."""
    size = None
    if o.kind == "file" and o.path:
        try:
            st = os.stat(o.path)
            size = st.st_size or None
            if stat.S_ISBLK(st.st_mode):   # (its st_size is 0: its end is its size)
                fd = os.open(o.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    size = os.lseek(fd, 0, os.SEEK_END) or None
                finally:
                    os.close(fd)
        except OSError:
            pass
    if size is None and o.size:
        size = int(o.size)
    return None if size is None else size - size % o.block_size


def served_sizes(endpoint: str) -> dict[tuple[str, int], int]:
    """What the STML serves each LUN at, for the LUNs whose size only it
    knows (an RBD image's, which any gateway may have resized: 0208); empty
    when it does not answer at once (the banner then says `?`)."""
    import zmq

    from scsi_target.mgmt import MgmtClient
    try:
        rows = MgmtClient(endpoint, timeout=2.0).call("lun_list")
    except (ConnectionError, TimeoutError, RuntimeError, OSError, zmq.ZMQError):
        return {}
    return {(r["target"], r["lun"]): r["size"] for r in rows if r.get("offline") is None}


def url_host(portal: str) -> str:
    """A portal as initiators reach it: a wildcard address names this host."""
    host, _, port = portal.rpartition(":")
    if host in ("0.0.0.0", "[::]", "::"):
        host = socket.getfqdn()
    return f"{host}:{port}"


class Plan:
    """What run is about to serve; the banner once it serves it."""

    def __init__(self, config: Config, cpus: dict[str, set[int]], poll_us: int | None, iscsi: bool,
                 vhosts: tuple[str, ...] = (), serving: Callable[[], None] = lambda: None) -> None:
        self.config, self.cpus, self.poll_us, self.iscsi = config, cpus, poll_us, iscsi
        self.serving = serving   # told once, with the banner
        self.stml_ready = False
        self.attached = not iscsi
        self.listening: list[str] = []
        self.vhosts_waiting = set(vhosts)   # fetd_vhost children not yet listening and attached
        self.vhost_state: dict[str, set[str]] = {}
        self.printed = False

    def line(self, name: str, text: str) -> None:
        """A child's machine-readable line (supervise.MARKER)."""
        if name == "stml" and text.startswith("listening on"):
            self.stml_ready = True
        elif name == "fetd_tcp" and text.startswith("attached to STML"):
            self.attached = True
        elif name == "fetd_tcp" and text.startswith("listening on "):
            self.listening.append(text.split()[2])
        elif name in self.vhosts_waiting and text.startswith(("listening on", "attached to STML")):
            seen = self.vhost_state.setdefault(name, set())
            seen.add(text.split()[0])
            if seen == {"listening", "attached"}:
                self.vhosts_waiting.discard(name)
        if not self.printed and self.ready():
            self.printed = True
            self.banner()

    def ready(self) -> bool:
        return self.stml_ready and self.attached and not self.vhosts_waiting and (
            not self.iscsi or len(self.listening) >= len(self.config.portals))

    def banner(self) -> None:
        c = self.config
        luns = sum(len(t.luns) for t in c.targets)
        out = [f"scsi-target: serving {len(c.targets)} target(s), {luns} LUN(s); "
               f"data dir {c.data_dir}, config {c.path}"]
        portal = url_host(self.listening[0]) if self.listening else None
        shown = 0
        # an image's size is the STML's to tell (one call, only when the banner has one)
        served = served_sizes(c.stml_endpoint) if any(
            lc.options.kind == "rbd" for t in c.targets for lc in t.luns[:BANNER_LUNS]) else {}
        for t in c.targets:
            if shown >= BANNER_LUNS:   # one start's lines in the journal do not grow with the LUNs
                break
            out.append(f"  target {t.name}" + (f" ({t.alias})" if t.alias else ""))
            for lc in t.luns[:BANNER_LUNS - shown]:
                shown += 1
                o = lc.options
                size = served.get((t.name, lc.lun)) or lun_size(o)
                what = "RAM" if o.kind == "ram" else f"{o.kind} {o.path}"
                missing = missing_file(o)   # the STML serves it offline (0280)
                out.append(f"    LUN {lc.lun}: {f'OFFLINE ({missing})' if missing else human(size) if size else '?'}"
                           f" {what}{' (read-only)' if o.ro else ''}")
                if portal:
                    out.append(f"      iscsi://{portal}/{t.name}/{lc.lun}")
        if shown < luns:
            out.append(f"  ... and {luns - shown} more LUN(s): `scsi-target lun list`")
        if self.iscsi:
            out.append("  iSCSI portals: " + ", ".join(self.listening))
        out.append(f"  STML endpoint: {c.stml_endpoint}")
        if self.cpus:
            out.append("CPUs: " + ", ".join(f"{name} {cpu_list(cs)}" for name, cs in self.cpus.items())
                       + (f"; the STML polls {self.poll_us} us before sleeping" if self.poll_us else ""))
        dd = f" --data-dir {c.data_dir}" if c.data_dir != default_data_dir() else ""
        out.append(f"Ready. Manage it with `scsi-target ls{dd}`; Ctrl-C (or kill -TERM {os.getpid()}) stops it.")
        click.echo("\n".join(out))
        sd_notify(f"READY=1\nSTATUS=serving {luns} LUN(s)\nMAINPID={os.getpid()}")
        self.serving()


@main.command()
@config_options
@stml_options
@click.option("--portal", "portals", multiple=True, metavar="HOST:PORT[,TPGT]",
              help="iSCSI portal to listen on, repeatable (default: the config's, else "
                   "127.0.0.1:3260); replaces the config's list, and a save keeps it.")
@click.option("--no-iscsi", is_flag=True, help="Run the STML alone, without the iSCSI front end.")
@click.option("--cpu-affinity", type=click.Choice(["split", "none"]), default="split", show_default=True,
              help="split: the STML and the front end each on their own share of the CPUs this "
                   "command may use (taskset narrows them), vhost front ends on the STML's, the "
                   "first share left to the VMs; none: wherever the scheduler puts them.")
@vhost_option
@trace_options
@inject_options
def run(log_level: str, log_format: str, portals: tuple[str, ...], no_iscsi: bool, cpu_affinity: str,
        listen: tuple[str, ...], insecure: bool, metrics: str | None, poll_us: int | None,
        timing: bool, vhost: tuple[str, ...], trace_path: str | None, trace_max: str, trace_with_data: bool,
        inject: tuple[str, ...], inject_files: tuple[str, ...], **kw: Any) -> None:
    """Run the target: the STML and the iSCSI front end (Ctrl-C stops all).

    Without --config it serves DATA_DIR/scsi-target.toml, written on first
    start from --iqn/--lun (or the built-in default) and saved on every
    change; once it exists, --lun/--iqn may only repeat what it says."""
    setup_logging(log_level, "run", log_format)
    accel_used = accel.for_children(os.environ)   # the children's compiled build, if fresh (0830)
    if accel_used is not None:
        logging.getLogger("scsi-target").log(logging.INFO if accel_used[0] else logging.WARNING, accel_used[1])
    kw = inherited(kw)
    trace = trace_settings(trace_path, trace_max, trace_with_data)
    # `stml` rules go to the STML, `fetd` rules to every front end it starts (fetd_tcp, fetd_vhost)
    rules = inject_rules(inject, inject_files, ("stml",) if no_iscsi and not vhost else ("stml", "fetd"))
    try:
        ddir = data_dir_of(kw.get("config_path"), kw.get("data_dir"))
        check_data_dir(ddir)
        # held until we exit, however we exit; taken before a first start writes
        # the config, so of two first starts only one writes it
        lock = lock_data_dir(ddir)
        if kw.get("config_path") and kw.get("data_dir"):   # F alone finds this target again (0215)
            from stml.persist import name_data_dir
            try:
                name_data_dir(Path(kw["config_path"]).absolute(), ddir)
            except OSError as e:   # (a read-only file still serves; only --config F cannot find it)
                click.echo(f"scsi-target: warning: {kw['config_path']}: cannot record data_dir: "
                           f"{e.strerror or e}", err=True)
        # a first start writes its file and LUN files: check its portals before, or a
        # start that never served would leave a file its next --lun flags must match
        first = not (Path(kw["config_path"]) if kw.get("config_path") else ddir / CONFIG_NAME).exists()
        if first and not no_iscsi:
            try:
                check_portals(list(portals) or [DEFAULT_PORTAL])
            except StartupError:
                raise
            except ValueError:   # a malformed --portal: the config's parser below says it in one line
                pass
        config = load_or_exit(portals=portals, **kw)   # (a first start checks its LUNs' paths)
        if not no_iscsi and not first:
            check_portals(config.portals)
    except ConfigError as e:
        config_exit(e)
    kw["config_path"] = str(config.path)     # the children serve the very file resolved here
    apply_stml_options(config, listen, insecure, metrics, poll_us, timing)
    names = ["stml"] if no_iscsi else ["stml", "fetd_tcp"]
    # librbd's threads run in the STML: pinned to its share they would queue
    # behind its event loop (and its polling), so RBD LUNs leave the CPUs whole
    rbd = any(lc.options.kind == "rbd" for t in config.targets for lc in t.luns)
    vhosts = vhost_children(config, vhost, log_level)
    cpus = placement(names, list(vhosts), os.sched_getaffinity(0)) if cpu_affinity == "split" and not rbd else {}
    if config.stml.poll_us is None and cpus and not any(name in cpus for name in vhosts):
        # the STML has CPUs of its own: polling them costs the front end nothing (a vhost
        # front end on them would wait for each poll to end: decision 0312)
        config.stml.poll_us = POLL_US
    poll_us = config.stml.poll_us
    logs = ["--log-level", log_level, "--log-format", log_format]
    base = _config_args(kw) + logs
    for p in portals:   # the STML keeps the portal list; fetd_tcp follows it (detect)
        base += ["--portal", p]
    for ep in listen:
        base += ["--listen", ep]
    if insecure:
        base.append("--insecure")
    if metrics:
        base += ["--metrics", metrics]
    if poll_us is not None:
        base += ["--poll-us", str(poll_us)]
    stml_args = list(base)
    if timing:   # (the front ends stamp when the STML grants it: no flag of theirs)
        stml_args.append("--timing")
    if trace is not None:   # the STML records: it sees every front end's messages
        stml_args += ["--trace", trace.path, "--trace-max", str(trace.max_bytes)]
        stml_args += ["--trace-with-data"] if trace.with_data else []
    stml_args += rule_args(for_side(rules, "stml"))
    children = {"stml": [sys.executable, "-m", "stml", *stml_args]}
    fetd_rules = rule_args(for_side(rules, "fetd"))
    if not no_iscsi:
        tcp = [sys.executable, "-m", "fetd_tcp", "--stml", config.stml_endpoint, *logs, *fetd_rules]
        tcp += _gateway_args(config)
        if config.isns:
            tcp += ["--isns", config.isns]
        children["fetd_tcp"] = tcp
    for name, argv in vhosts.items():   # on the CPUs placement kept from the VMs, it polls unless told (0312)
        poll = ["--poll-us", str(VHOST_POLL_US)] if name in cpus and "--poll-us" not in argv else []
        children[name] = argv + poll + fetd_rules
    plan = Plan(config, cpus, poll_us, not no_iscsi, tuple(vhosts), functools.partial(mark_serving, lock))
    status = Supervisor(children, cpus, log_format, plan.line, lambda: plan.printed).run()
    if plan.printed or status != 2:   # a child that could not start said why, in its one line
        logging.getLogger("scsi-target").info("stopped" if status == 0 else f"stopped (exit {status})")
    os.ftruncate(lock, 0)   # (no longer serving)
    os.close(lock)
    sys.exit(status)


def _gateway_args(config: Any) -> list[str]:
    """A gateway's front end (stml.gateway) also lists the other gateways'
    STMLs, and listens on this host's portals whichever STML serves."""
    s = config.stml
    if not s.peers:
        return []
    args = [a for peer in s.peers for a in ("--stml", peer)]
    args += [a for p in config.portals for a in ("--portal", p)]
    if s.front_end_key and s.curve_secret_key_file:
        public = s.curve_secret_key_file.removesuffix("_secret")
        args += ["--key", s.front_end_key, "--stml-key", public]
    return args


# ------------------------------------------------------------------ loop

def loop_options(f: Callable) -> Callable:
    """The loopback verbs take these before or after the verb (`loop
    --data-dir D capacity` and `loop capacity --data-dir D`)."""
    for opt in reversed([
        click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Find the STML from this config."),
        click.option("--data-dir", type=click.Path(file_okay=False), help="Find the STML of this data dir."),
        click.option("--stml", help="STML endpoint (ipc://PATH or tcp://HOST:PORT)."),
        click.option("--target", help="Target name (default: the first)."),
        click.option("--lun", type=int, help="LUN number (default 0)."),
        click.option("--initiator", help="Our initiator name (default: one of this host and process; "
                                         "a target with an ACL admits only the names it lists)."),
        click.option("--timeout", type=float, help="Seconds to wait for an answer (default 30)."),
    ]):
        f = opt(f)
    return f


@main.group()
@loop_options
@click.pass_context
def loop(ctx: click.Context, **kw: Any) -> None:
    """Issue SCSI commands to a LUN through the loopback front end."""
    ctx.obj = kw


def _client(kw: dict[str, Any]) -> tuple[Any, int]:
    """The loopback client the verb's options (or the group's, or the root's) name."""
    ctx = click.get_current_context()
    group = ctx.parent.obj if ctx.parent is not None and isinstance(ctx.parent.obj, dict) else {}
    opts = {k: v if v is not None else group.get(k) for k, v in kw.items()}
    opts = inherited(opts)
    from fetd_loopback import LoopbackClient, NexusRefused
    endpoint = find_endpoint(opts.get("config_path"), opts.get("data_dir"), opts.get("stml"))
    try:
        require_running(endpoint)
    except NotRunning as e:
        click.echo(f"scsi-target loop: {e}", err=True)
        sys.exit(1)
    client = LoopbackClient(endpoint, opts.get("target"), initiator=opts.get("initiator"),
                            timeout=opts["timeout"] if opts.get("timeout") is not None else 30.0)
    try:
        client.open()
    except (TimeoutError, LookupError, ConnectionError) as e:
        hint = ": pass --initiator with a name it lists" if isinstance(e, NexusRefused) else ""
        click.echo(f"scsi-target loop: {e or type(e).__name__}{hint}", err=True)
        sys.exit(1)
    ctx.call_on_close(client.close)
    return client, opts["lun"] if opts.get("lun") is not None else 0


def _scsi(fn: Any, *args: Any) -> Any:
    from fetd_loopback import ScsiError
    try:
        return fn(*args)
    except ScsiError as e:
        click.echo(f"scsi-target loop: {sense_line(e.result)}", err=True)
        sys.exit(1)


def sense_line(result: Any) -> str:
    """A failed command, decoded (key, ASC/ASCQ text) and raw."""
    from scsi_target.sensetext import describe
    if result.sense:
        key = result.sense_key
        asc, ascq = result.asc_ascq
        return f"status 0x{result.status:02x}, {describe(key, asc, ascq)}"
    return result.describe()


@loop.command()
@loop_options
def inquiry(**kw: Any) -> None:
    """Print the LUN's identity (standard INQUIRY, serial number, NAA id)."""
    client, lun = _client(kw)
    std = _scsi(client.inquiry, lun)
    serial = _scsi(client.inquiry, lun, 0x80)
    devid = _scsi(client.inquiry, lun, 0x83)
    click.echo(f"vendor:   {std[8:16].decode().strip()}")
    click.echo(f"product:  {std[16:32].decode().strip()}")
    click.echo(f"revision: {std[32:36].decode().strip()}")
    click.echo(f"type:     0x{std[0] & 0x1F:02x}{' removable' if std[1] & 0x80 else ''}")
    click.echo(f"serial:   {serial[4:4 + serial[3]].decode()}")
    pos = 4
    while pos + 4 <= len(devid):
        dlen = devid[pos + 3]
        if devid[pos + 1] & 0x0F == 3:
            click.echo(f"naa:      0x{devid[pos + 4:pos + 4 + dlen].hex()}")
        pos += 4 + dlen


@loop.command()
@loop_options
def capacity(**kw: Any) -> None:
    """Print the LUN's size."""
    client, lun = _client(kw)
    blocks, bs = _scsi(client.capacity, lun)
    click.echo(f"blocks: {blocks}\nblock size: {bs}\nbytes: {blocks * bs} ({blocks * bs / 2**20:.1f} MiB)")


@loop.command()
@click.argument("lba", type=int)
@click.argument("count", type=int)
@click.option("--out", type=click.File("wb"), help="Write the data here instead of a hex dump.")
@loop_options
def read(lba: int, count: int, out: Any, **kw: Any) -> None:
    """Read COUNT blocks at LBA."""
    client, lun = _client(kw)
    _, bs = _scsi(client.capacity, lun)
    data = _scsi(client.read, lun, lba, count, bs)
    if out:
        out.write(data)
    else:
        for off in range(0, len(data), 16):
            click.echo(f"{off:08x}  {data[off:off + 16].hex(' ')}")


@loop.command()
@click.argument("lba", type=int)
@click.argument("source", type=click.File("rb"))
@loop_options
def write(lba: int, source: Any, **kw: Any) -> None:
    """Write SOURCE's bytes at LBA (the last block is padded with zeros)."""
    client, lun = _client(kw)
    _, bs = _scsi(client.capacity, lun)
    data = source.read()
    data += bytes(-len(data) % bs)
    _scsi(client.write, lun, lba, data, bs)
    click.echo(f"wrote {len(data) // bs} blocks at LBA {lba}")


class Progress:
    """Bytes done, rate and ETA, on stderr; how far a copy got when it stops."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.done = total, label, 0
        self.start = time.monotonic()

    def text(self, _: Any = None) -> str:
        rate = self.done / max(time.monotonic() - self.start, 1e-6)
        return f"{human(self.done)} of {human(self.total)}, {human(rate)}/s"


def _copy(client: Any, total: int, submit: Any, finish: Any, label: str) -> float:
    """Move `total` bytes in CHUNK pieces with DEPTH commands in flight;
    `finish` sees each piece's result in order. Returns the seconds it took;
    an interrupt prints how far it got and exits 130."""
    from collections import deque
    inflight: deque = deque()
    progress = Progress(total, label)

    def retire() -> None:
        off, n, fut = inflight.popleft()
        result = _scsi(lambda: fut.result(client.timeout).check())
        finish(off, n, result)
        progress.done += n
        bar.update(n)

    try:
        with click.progressbar(length=total, label=label, file=sys.stderr, show_eta=True,
                               item_show_func=progress.text) as bar:
            for off in range(0, total, CHUNK):
                n = min(CHUNK, total - off)
                inflight.append((off, n, submit(off, n)))
                if len(inflight) >= DEPTH:
                    retire()
            while inflight:
                retire()
    except KeyboardInterrupt:
        done = f"bytes 0-{progress.done - 1} are done" if progress.done else "no byte is done yet"
        click.echo(f"\nscsi-target loop: {label} interrupted after {progress.done} of {total} bytes "
                   f"({progress.text()}); {done}", err=True)
        sys.exit(130)
    return time.monotonic() - progress.start


@loop.command("copy-in")
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@loop_options
def copy_in(image: str, **kw: Any) -> None:
    """Write a whole image file into the LUN, from LBA 0."""
    client, lun = _client(kw)
    blocks, bs = _scsi(client.capacity, lun)
    size = os.path.getsize(image)
    if size > blocks * bs:
        click.echo(f"scsi-target loop: {image} ({size} bytes) is larger than the LUN ({blocks * bs})", err=True)
        sys.exit(2)
    with open(image, "rb") as f:
        def submit(off: int, n: int) -> Any:
            data = f.read(n)
            data += bytes(-len(data) % bs)
            cdb = struct.pack(">BBQIBB", 0x8A, 0, off // bs, len(data) // bs, 0, 0)
            return client.submit(lun, cdb, data_out=data)
        took = _copy(client, size, submit, lambda off, n, r: None, "copy-in")
    _scsi(client.synchronize_cache, lun)
    click.echo(f"copied {size} bytes ({human(size)}) into LUN {lun} in {took:.1f} s "
               f"({human(size / max(took, 1e-6))}/s)")


@loop.command("copy-out")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--size", type=SIZE, help="Bytes to copy, e.g. 32MiB (default: the whole LUN).")
@loop_options
def copy_out(image: str, size: int | None, **kw: Any) -> None:
    """Read the LUN (or its first --size bytes) into an image file."""
    client, lun = _client(kw)
    blocks, bs = _scsi(client.capacity, lun)
    total = min(size, blocks * bs) if size else blocks * bs
    # a new image is the owner's alone, as LUN files are: it holds the LUN's data
    with open(os.open(image, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        def submit(off: int, n: int) -> Any:
            nb = -(-n // bs)
            cdb = struct.pack(">BBQIBB", 0x88, 0, off // bs, nb, 0, 0)
            return client.submit(lun, cdb, data_in=nb * bs)
        took = _copy(client, total, submit, lambda off, n, r: f.write(r.data[:n]), "copy-out")
    click.echo(f"copied {total} bytes ({human(total)}) out of LUN {lun} in {took:.1f} s "
               f"({human(total / max(took, 1e-6))}/s)")


# ------------------------------------------------------------------ scripts and shells

@main.command("wait-ready")
@where_options
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds to wait at most.")
@click.option("--iscsi/--no-iscsi", default=True, show_default=True,
              help="Also wait for an iSCSI front end listening on every portal.")
def wait_ready(timeout: float, iscsi: bool, **kw: Any) -> None:
    """Wait until the target serves (for scripts: `run &` then `wait-ready`).
    Exit 0 when ready, 1 on timeout, 2 when it cannot tell (the data dir's
    run.lock is another user's)."""
    from scsi_target.mgmt import MgmtClient
    kw = inherited(kw)
    endpoint = find_endpoint(kw.get("config_path"), kw.get("data_dir"), kw.get("stml"))
    # the `run` of a local data dir says when it serves (a gateway's front end tells no STML: 0237)
    ddir = None if kw.get("stml") or not iscsi else data_dir_of(kw.get("config_path"), kw.get("data_dir"))
    deadline = time.monotonic() + timeout
    why = "not started"
    while True:
        try:
            # asked first: another user's STML may not answer us either, and this says why
            serving = run_serves(ddir) if ddir is not None else None
        except RunLockUnreadable as e:
            click.echo(f"scsi-target: wait-ready: {e}", err=True)
            sys.exit(2)
        try:
            require_running(endpoint)
            snap = MgmtClient(endpoint, timeout=max(0.2, min(2.0, deadline - time.monotonic()))).call("status")
            portals = snap.get("portals") or []
            # no portal (`portals = []`): ready once an iSCSI front end is attached, as `run` says
            iscsi_fe = any(fe.get("kind") == "iscsi" for fe in snap.get("front_ends") or [])
            # a gateway's portals are its front end's own, reported to no STML (decisions/0414)
            reported = (all(str(p.get("state")).startswith("listening") or p.get("state") == GATEWAY_STATE
                            for p in portals) and (portals or iscsi_fe))
            if not iscsi or (reported and serving is not False):
                click.echo(f"ready: {endpoint}")
                return
            why = ("portals: " + ", ".join(f"{p.get('portal')} {p.get('state')}" for p in portals)
                   if not reported and portals else "no iSCSI front end attached" if not reported
                   else "`run` does not serve yet: its iSCSI front end is not attached, or not listening "
                        "on every portal")
        except (NotRunning, TimeoutError, ConnectionError) as e:
            why = str(e)
        except RuntimeError as e:
            why = str(e)
        if time.monotonic() >= deadline:
            click.echo(f"scsi-target: not ready after {timeout:g}s: {why}", err=True)
            sys.exit(1)
        time.sleep(0.1)


@main.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script, e.g. `eval "$(scsi-target completion bash)"`."""
    from click.shell_completion import get_completion_class
    cls = get_completion_class(shell)
    assert cls is not None   # click ships all three
    click.echo(cls(main, {}, "scsi-target", "_SCSI_TARGET_COMPLETE").source())


from scsi_target.service import service as _service  # noqa: E402
main.add_command(_service, "service")


# one line per verb in `--help` listings: a docstring's first sentence can be
# too long for them, and click then cuts it off with "..."
SHORT_HELP = {
    "stml": "Run the STML alone (it owns the LUNs).",
    "fetd-tcp": "Run the iSCSI front end alone, attached to an STML.",
    "keys": "CURVE key pairs for remote front ends and managers.",
    "keys generate": "Write a key pair: NAME.key and NAME.key_secret.",
    "target add": "Add a target (then LUNs with `lun add`).",
    "lun": "Logical units (changes are live and saved).",
    "lun add": "Add a LUN from a spec (ram:64MiB, file:PATH, ...).",
    "portal": "iSCSI portals the front end listens on.",
    "portal add": "Listen on another portal: HOST:PORT[,TPGT].",
    "portal remove": "Stop listening on a portal.",
    "acl": "Initiators allowed to log in (empty: any).",
    "acl add": "Allow an initiator, by its IQN, to log in.",
    "chap set": "Require CHAP, or turn it off.",
    "session drop": "End a session, by its NEXUS number.",
    "status": "Portals, LUNs, sessions and front ends, with rates.",
    "ls": "The running configuration as a tree.",
    "config": "Show, diff, save, reload or check the configuration.",
    "config show": "Print the running configuration.",
    "config save": "Save the running configuration (or a copy of it).",
    "config diff": "Show how the file differs from what runs.",
    "config reload": "Apply an edited file live (as SIGHUP does).",
    "config check": "Validate a config file (no target needed).",
    "run": "Run the target: the STML and the iSCSI front end.",
    "loop inquiry": "Print the LUN's identity (INQUIRY, serial, NAA).",
    "loop write": "Write a file's bytes at an LBA.",
    "wait-ready": "Wait until the target serves (for scripts).",
    "service install": "Create the user, install, enable and start the unit.",
    "completion": "Print the completion script for bash, zsh or fish.",
    "trace": "Record, replay, export and summarise contract traces.",
    "trace record": "Record a running STML's messages into a file.",
    "trace replay": "Replay a trace into a fresh STML; compare answers.",
    "trace export": "A trace's commands as CSV.",
    "trace stats": "Per-command counts and latency percentiles.",
}
for _path, _text in SHORT_HELP.items():
    _cmd: click.Command = main
    for _word in _path.split():
        assert isinstance(_cmd, click.Group)
        _cmd = _cmd.commands[_word]
    _cmd.short_help = _text
