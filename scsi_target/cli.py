"""`scsi-target`: one command for every process and for local SCSI access.

This package sits above the others: it starts the STML and the front ends
as processes (`run`), or one of them alone, and drives the loopback client.
"""
from __future__ import annotations

import functools
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from fetd_tcp.cli import main as fetd_tcp_main
from stml.cli import apply_stml_options, config_options, load_or_exit, main as stml_main, stml_options
from stml.config import default_data_dir, default_endpoint, load, ConfigError

CHUNK = 1 << 20  # copy-in/out transfer size
POLL_US = 200    # the STML's busy-poll window when it has CPUs of its own: a QD1 round trip
                 # through the front end and the initiator takes 100-150 us on a 2-vCPU VM
DEPTH = 4        # commands in flight during copies


@click.group()
@click.version_option(package_name="scsi-target")
def main() -> None:
    """A user-space SCSI target: the STML (SCSI logic) and its front ends
    (iSCSI over TCP, local loopback) as separate processes."""


main.add_command(stml_main, "stml")
main.add_command(fetd_tcp_main, "fetd-tcp")
from scsi_target.keys import keys as _keys  # noqa: E402  (verbs defined in their own modules)
from scsi_target.mgmt import register as _register_mgmt  # noqa: E402
main.add_command(_keys, "keys")
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


def cpu_list(cpus: set[int]) -> str:
    """As Linux writes CPU sets (Cpus_allowed_list): 0-3,8."""
    runs: list[list[int]] = []
    for c in sorted(cpus):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _pin(cpus: set[int]) -> None:
    try:
        os.sched_setaffinity(0, cpus)
    except OSError:   # a CPU taken away meanwhile (hotplug, cpuset): run unpinned rather than not at all
        pass


class Supervisor:
    """Starts child processes (each on its CPU set, if given), restarts one
    that dies, stops all on a signal."""

    def __init__(self, children: dict[str, list[str]], cpus: dict[str, set[int]] | None = None) -> None:
        self.children = children
        self.cpus = cpus or {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.stopping = False

    def start(self, name: str) -> None:
        cpus = self.cpus.get(name)
        # set in the child before it runs anything, so its threads inherit the set
        # (the supervisor has no threads of its own, as preexec_fn requires)
        pin = None if cpus is None else functools.partial(_pin, cpus)
        self.procs[name] = subprocess.Popen(self.children[name], preexec_fn=pin)

    def stop(self, *_: Any) -> None:
        self.stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        for name in self.children:
            self.start(name)
        restarts: dict[str, list[float]] = {n: [] for n in self.children}
        status = 0
        while not self.stopping:
            time.sleep(0.2)
            for name, proc in list(self.procs.items()):
                rc = proc.poll()
                if rc is None or self.stopping:
                    continue
                if rc == 2:  # a config error: restarting cannot help
                    click.echo(f"scsi-target: {name} refused its configuration; stopping", err=True)
                    self.stopping, status = True, 2
                    break
                recent = [t for t in restarts[name] if time.monotonic() - t < 60]
                if len(recent) >= 5:
                    click.echo(f"scsi-target: {name} keeps failing (exit {rc}); stopping", err=True)
                    self.stopping, status = True, 1
                    break
                click.echo(f"scsi-target: {name} exited with {rc}; restarting", err=True)
                restarts[name] = recent + [time.monotonic()]
                self.start(name)
        # front ends first (they ask initiators to log out), the STML last
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        return status


@main.command()
@config_options
@stml_options
@click.option("--portal", "portals", multiple=True, metavar="HOST:PORT",
              help="iSCSI portal to listen on, repeatable (default 127.0.0.1:3260).")
@click.option("--no-iscsi", is_flag=True, help="Run the STML alone, without the iSCSI front end.")
@click.option("--cpu-affinity", type=click.Choice(["split", "none"]), default="split", show_default=True,
              help="split: the STML and the front end each on their own share of the CPUs this "
                   "command may use (taskset narrows them); none: wherever the scheduler puts them.")
def run(log_level: str, portals: tuple[str, ...], no_iscsi: bool, cpu_affinity: str, listen: tuple[str, ...],
        insecure: bool, metrics: str | None, poll_us: int | None, **kw: Any) -> None:
    """Run the STML and the iSCSI front end under one supervisor (Ctrl-C stops all)."""
    config = load_or_exit(portals=portals, **kw)
    apply_stml_options(config, listen, insecure, metrics, poll_us)
    names = ["stml"] if no_iscsi else ["stml", "fetd_tcp"]
    # librbd's threads run in the STML: pinned to its share they would queue
    # behind its event loop (and its polling), so RBD LUNs leave the CPUs whole
    rbd = any(lc.options.kind == "rbd" for t in config.targets for lc in t.luns)
    cpus = cpu_split(names, os.sched_getaffinity(0)) if cpu_affinity == "split" and not rbd else {}
    if config.stml.poll_us is None and cpus:
        config.stml.poll_us = POLL_US   # the STML has CPUs of its own: polling them costs the front end nothing
    poll_us = config.stml.poll_us
    base = _config_args(kw) + ["--log-level", log_level]
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
    children = {"stml": [sys.executable, "-m", "stml", *base]}
    if not no_iscsi:
        tcp = [sys.executable, "-m", "fetd_tcp", "--stml", config.stml_endpoint, "--log-level", log_level]
        tcp += _gateway_args(config)
        if config.isns:
            tcp += ["--isns", config.isns]
        children["fetd_tcp"] = tcp
    for t in config.targets:
        for lc in t.luns:
            o = lc.options
            where = o.path if o.kind in ("file", "rbd") else f"{o.size} bytes of RAM"
            click.echo(f"target {t.name} LUN {lc.lun}: {o.kind} {where}{' (read-only)' if o.ro else ''}")
    click.echo(f"STML endpoint: {config.stml_endpoint}")
    if not no_iscsi:
        click.echo("iSCSI portals: " + ", ".join(config.portals))
    if cpus:
        click.echo("CPUs: " + ", ".join(f"{name} {cpu_list(c)}" for name, c in cpus.items())
                   + (f"; the STML polls {poll_us} us before sleeping" if poll_us else ""))
    sys.exit(Supervisor(children, cpus).run())


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

def _endpoint(config_path: str | None, data_dir: str | None, stml: str | None) -> str:
    if stml:
        return stml
    if config_path:
        try:
            return load(config_path, data_dir).stml_endpoint
        except ConfigError as e:
            click.echo(f"scsi-target: config error: {e}", err=True)
            sys.exit(2)
    return default_endpoint(Path(data_dir).absolute() if data_dir else default_data_dir())


@main.group()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Find the STML from this config.")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Find the STML of this data dir.")
@click.option("--stml", help="STML endpoint (ipc://PATH or tcp://HOST:PORT).")
@click.option("--target", help="Target name (default: the first).")
@click.option("--lun", type=int, default=0, show_default=True)
@click.option("--timeout", type=float, default=30.0, show_default=True)
@click.pass_context
def loop(ctx: click.Context, config_path: str | None, data_dir: str | None, stml: str | None,
         target: str | None, lun: int, timeout: float) -> None:
    """Issue SCSI commands to a LUN through the loopback front end."""
    from fetd_loopback import LoopbackClient
    client = LoopbackClient(_endpoint(config_path, data_dir, stml), target, timeout=timeout)
    try:
        client.open()
    except (TimeoutError, LookupError, ConnectionError) as e:
        click.echo(f"scsi-target loop: {e}", err=True)
        sys.exit(1)
    ctx.call_on_close(client.close)
    ctx.obj = (client, lun)


def _scsi(fn: Any, *args: Any) -> Any:
    from fetd_loopback import ScsiError
    try:
        return fn(*args)
    except ScsiError as e:
        click.echo(f"scsi-target loop: {e}", err=True)
        sys.exit(1)


@loop.command()
@click.pass_obj
def inquiry(obj: Any) -> None:
    """Print the LUN's identity (standard INQUIRY, serial number, NAA id)."""
    client, lun = obj
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
@click.pass_obj
def capacity(obj: Any) -> None:
    """Print the LUN's size."""
    client, lun = obj
    blocks, bs = _scsi(client.capacity, lun)
    click.echo(f"blocks: {blocks}\nblock size: {bs}\nbytes: {blocks * bs} ({blocks * bs / 2**20:.1f} MiB)")


@loop.command()
@click.argument("lba", type=int)
@click.argument("count", type=int)
@click.option("--out", type=click.File("wb"), help="Write the data here instead of a hex dump.")
@click.pass_obj
def read(obj: Any, lba: int, count: int, out: Any) -> None:
    """Read COUNT blocks at LBA."""
    client, lun = obj
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
@click.pass_obj
def write(obj: Any, lba: int, source: Any) -> None:
    """Write SOURCE's bytes at LBA (the last block is padded with zeros)."""
    client, lun = obj
    _, bs = _scsi(client.capacity, lun)
    data = source.read()
    data += bytes(-len(data) % bs)
    _scsi(client.write, lun, lba, data, bs)
    click.echo(f"wrote {len(data) // bs} blocks at LBA {lba}")


def _copy(client: Any, total: int, submit: Any, finish: Any, label: str) -> None:
    """Move `total` bytes in CHUNK pieces with DEPTH commands in flight;
    `finish` sees each piece's result in order."""
    from collections import deque
    inflight: deque = deque()

    def retire() -> None:
        off, n, fut = inflight.popleft()
        result = _scsi(lambda: fut.result(client.timeout).check())
        finish(off, n, result)
        bar.update(n)

    with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
        for off in range(0, total, CHUNK):
            n = min(CHUNK, total - off)
            inflight.append((off, n, submit(off, n)))
            if len(inflight) >= DEPTH:
                retire()
        while inflight:
            retire()


@loop.command("copy-in")
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.pass_obj
def copy_in(obj: Any, image: str) -> None:
    """Write a whole image file into the LUN, from LBA 0."""
    client, lun = obj
    blocks, bs = _scsi(client.capacity, lun)
    size = os.path.getsize(image)
    if size > blocks * bs:
        click.echo(f"scsi-target loop: {image} ({size} bytes) is larger than the LUN ({blocks * bs})", err=True)
        sys.exit(1)
    with open(image, "rb") as f:
        def submit(off: int, n: int) -> Any:
            data = f.read(n)
            data += bytes(-len(data) % bs)
            cdb = struct.pack(">BBQIBB", 0x8A, 0, off // bs, len(data) // bs, 0, 0)
            return client.submit(lun, cdb, data_out=data)
        _copy(client, size, submit, lambda off, n, r: None, "copy-in")
    _scsi(client.synchronize_cache, lun)
    click.echo(f"copied {size} bytes into LUN {lun}")


@loop.command("copy-out")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--size", type=int, help="Bytes to copy (default: the whole LUN).")
@click.pass_obj
def copy_out(obj: Any, image: str, size: int | None) -> None:
    """Read the LUN (or its first --size bytes) into an image file."""
    client, lun = obj
    blocks, bs = _scsi(client.capacity, lun)
    total = min(size, blocks * bs) if size else blocks * bs
    with open(image, "wb") as f:
        def submit(off: int, n: int) -> Any:
            nb = -(-n // bs)
            cdb = struct.pack(">BBQIBB", 0x88, 0, off // bs, nb, 0, 0)
            return client.submit(lun, cdb, data_in=nb * bs)
        _copy(client, total, submit, lambda off, n, r: f.write(r.data[:n]), "copy-out")
    click.echo(f"copied {total} bytes out of LUN {lun}")
