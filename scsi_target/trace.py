"""`scsi-target trace`: record the contract of a running STML, replay a trace
into a fresh one, export its commands as CSV, print their statistics
(stml.trace; docs/research.md, "Trace and replay")."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

import click

from scsi_target.mgmt import _call, mgmt_options

POLL_S = 0.5     # how often `trace record` asks how far the trace got
LEASE_S = 10.0   # the STML stops a trace whose `trace record` has been silent this long


@click.group("trace")
def trace() -> None:
    """Record, replay, export and summarise traces of the contract."""


class _Stop(Exception):
    """SIGTERM: stop recording as Ctrl-C does."""


def _on_term(signum: int, frame: Any) -> None:
    raise _Stop()


@trace.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--with-data", is_flag=True, help="Keep read data, not only its digest (write data is always kept).")
@click.option("--max", "max_size", metavar="SIZE", default="256MiB", show_default=True,
              help="Stop before the file passes SIZE (an end record says so).")
@click.option("--count", type=click.IntRange(1),
              help="Stop after N front-end messages (management messages are recorded, not counted).")
@click.option("--seconds", type=click.FloatRange(0, min_open=True), help="Stop after S seconds.")
@click.option("--force", is_flag=True, help="Replace FILE if it exists.")
@mgmt_options
def record(file: str, with_data: bool, max_size: str, count: int | None, seconds: float | None,
           force: bool, **kw: Any) -> None:
    """Record a running STML's contract messages into FILE (written by the
    STML, on its host; FILE.gz is gzipped) until Ctrl-C, SIGTERM, --count or
    --seconds. Exit 0 when the trace is whole, 1 when writing it failed."""
    from stml.config import ConfigError, parse_size
    try:
        cap = parse_size(max_size, "--max")
    except ConfigError as e:
        click.echo(f"scsi-target: {e}", err=True)
        sys.exit(2)
    path = os.path.abspath(file)
    status = _call(kw, "trace_start", path=path, with_data=with_data, max_bytes=cap, count=count,
                   force=force, lease_s=LEASE_S)
    click.echo(f"recording to {path}; Ctrl-C stops", err=True)
    deadline = None if seconds is None else time.monotonic() + seconds
    old = signal.signal(signal.SIGTERM, _on_term)
    try:
        while status.get("recording"):
            wait = POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - time.monotonic()))
            time.sleep(wait)
            if deadline is not None and time.monotonic() >= deadline:
                break
            status = _call(kw, "trace_status")
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        signal.signal(signal.SIGTERM, old)
    status = _call(kw, "trace_stop")   # the answer comes once the file is closed
    if kw.get("as_json"):
        click.echo(json.dumps(status, indent=2, sort_keys=True))
    else:
        click.echo(f"trace {status['path']}: {status['records']} records, {status['bytes']} bytes; "
                   f"stopped: {status['reason']}")
    if status.get("lost"):
        click.echo(f"scsi-target: warning: {status['lost']} records were lost (the disk fell behind); "
                   f"replay stops at the gap", err=True)
    if status.get("error"):
        click.echo(f"scsi-target: {status['error']}", err=True)
        sys.exit(1)


def _lun_data(values: tuple[str, ...]) -> dict[int, str]:
    out = {}
    for v in values:
        lun, sep, path = v.partition("=")
        if not sep or not lun.isdigit() or not path:
            raise click.BadParameter(f"{v!r} is not LUN=PATH", param_hint="--lun-data")
        out[int(lun)] = path
    return out


def _describe_answer(a: dict[str, Any] | None) -> str:
    from scsi_target.sensetext import describe
    from stml.trace.report import STATUS_NAMES, sense_fields
    if a is None:
        return "nothing"
    parts = []
    for k, v in a.items():
        if k == "status" and isinstance(v, int):
            parts.append(f"status 0x{v:02x} {STATUS_NAMES.get(v, '')}".rstrip())
        elif k == "sense":
            f = sense_fields(v)
            parts.append("no sense" if f is None else f"sense {v.hex(' ')} ({describe(*f)})")
        elif k == "data_crc32c":
            parts.append(f"data crc32c 0x{v:08x}")
        else:
            parts.append(f"{k.replace('_', ' ')} {v}")
    return ", ".join(parts)


def _describe_command(m: Any) -> str:
    from stml.trace.report import command_name, lba_blocks
    h = m.header
    if h.get("op") == "rx_task_mgmt_fn":
        from stml.api import Tmf
        fn = h.get("fn")
        try:
            name = Tmf(fn).name
        except ValueError:
            name = f"TMF {fn}"
        return f"record {m.index}: {name} nexus {h.get('nexus')} LUN {h.get('lun')} ref {h.get('ref')}"
    cdb = h.get("cdb") or b""
    lba, blocks = lba_blocks(cdb)
    where = f" LBA {lba} blocks {blocks}" if lba is not None else ""
    return (f"record {m.index}: {command_name(cdb)}{where} (CDB {cdb.hex()}), nexus {h.get('nexus')} "
            f"LUN {h.get('lun')} tag {h.get('tag')}, {h.get('len', 0)} bytes expected")


@trace.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--lun-data", "lun_data", multiple=True, metavar="LUN=PATH",
              help="The LUN's content when the trace began (e.g. a copy of a file LUN's image): "
                   "reads of data the trace did not write are then checked too. Repeatable.")
def replay(file: str, lun_data: tuple[str, ...]) -> None:
    """Feed FILE's front-end messages into a fresh in-process STML and compare
    every answer (status, sense, residual, data digest) with the recorded one.
    Exit 0 when none differs, 1 at the first that does (printed with its
    command), 2 for a trace replay cannot use."""
    from stml.trace.format import TraceError
    from stml.trace.replay import Divergence, Replayer
    try:
        result = Replayer(file, _lun_data(lun_data)).run()
    except TraceError as e:
        click.echo(f"scsi-target: {e}", err=True)
        sys.exit(2)
    except Divergence as d:
        click.echo(f"replay {file}: DIVERGENCE at {d}")
        if d.command is not None:
            click.echo(f"  command:  {_describe_command(d.command)}")
        click.echo(f"  expected: {_describe_answer(d.expected)}")
        click.echo(f"  got:      {_describe_answer(d.got)}")
        sys.exit(1)
    for change in result.mgmt_changes:
        click.echo(f"scsi-target: warning: management change not replayed ({change})", err=True)
    unknown = (f"; {result.data_unknown} read data not compared (data the trace did not write: "
               f"--lun-data gives it)" if result.data_unknown else "")
    cut = "" if result.complete else " (the trace has no end record: it was cut short)"
    click.echo(f"replay {file}: 0 divergences; {result.fed} messages fed, {result.compared} answers "
               f"compared ({result.data_compared} read data digests){unknown}{cut}")


@trace.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False, allow_dash=True), default="-")
@click.option("--csv", "as_csv", is_flag=True, help="CSV, one row per command (the one format).")
def export(file: str, out: str, as_csv: bool) -> None:
    """Write FILE's commands to OUT (default: standard output) as CSV: times,
    LUN, command, LBA and blocks, status, sense, latency."""
    from stml.trace.format import TraceError
    from stml.trace.report import export_csv
    if not as_csv:
        click.echo("scsi-target: give --csv (the one export format)", err=True)
        sys.exit(2)
    try:
        if out == "-":
            n = export_csv(file, sys.stdout)
        else:
            with open(out, "w", newline="") as f:
                n = export_csv(file, f)
    except TraceError as e:
        click.echo(f"scsi-target: {e}", err=True)
        sys.exit(2)
    except OSError as e:
        click.echo(f"scsi-target: {out}: {e.strerror or e}", err=True)
        sys.exit(1)
    if out != "-":
        click.echo(f"{n} commands to {out}", err=True)


@trace.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--plot", "png", type=click.Path(dir_okay=False), help="Also draw the latencies into this PNG.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def stats(file: str, png: str | None, as_json: bool) -> None:
    """Per command: how many, their statuses, and latency percentiles in the
    STML (rx_cmnd received to xmit_response sent); with the stamps of a
    `run --timing` trace, the same per stage."""
    from stml.trace.format import TraceError
    from stml.trace.report import stats as compute
    try:
        s = compute(file)
    except TraceError as e:
        click.echo(f"scsi-target: {e}", err=True)
        sys.exit(2)
    if as_json:
        click.echo(json.dumps(s, indent=2, sort_keys=True))
    else:
        click.echo(f"{s['commands']} commands over {s['span_s']:.3f} s")
        click.echo(f"{'COMMAND':32s} {'COUNT':>7s} {'P50_US':>9s} {'P90_US':>9s} {'P99_US':>9s} "
                   f"{'MAX_US':>9s}  STATUSES")
        for name, c in s["by_command"].items():
            lat = c["latency_us"]
            cells = " ".join(f"{lat[k]:9.1f}" if k in lat else f"{'-':>9s}" for k in ("p50", "p90", "p99", "max"))
            statuses = ", ".join(f"{k} {v}" for k, v in sorted(c["statuses"].items()))
            others = {k: v for k, v in c["outcomes"].items() if k != "done"}
            if others:
                statuses += "".join(f", {k} {v}" for k, v in sorted(others.items()))
            click.echo(f"{name[:32]:32s} {c['count']:7d} {cells}  {statuses}")
        if s.get("stages"):   # a trace of `run --timing`
            click.echo(f"\n{'STAGE':32s} {'COUNT':>7s} {'P50_US':>9s} {'P90_US':>9s} {'P99_US':>9s}")
            for name, st in s["stages"].items():
                cells = " ".join(f"{st[k]:9.1f}" for k in ("p50", "p90", "p99"))
                click.echo(f"{name:32s} {st['count']:7d} {cells}")
    if png:
        from stml.trace.report import plot
        try:
            plot(file, png)
        except ImportError:
            click.echo("scsi-target: --plot needs matplotlib (pip install 'scsi-target[trace]')", err=True)
            sys.exit(1)
        click.echo(f"plot: {png}", err=True)
