"""The STML process's command line (`python -m stml`, `scsi-target stml`)."""
from __future__ import annotations

import sys
from typing import Any, Callable, NoReturn

import click

from scsi_runtime.logs import setup_logging
from stml.config import MAX_POLL_US, Config, ConfigError, StartupError, check_data_dir, data_dir_of
from stml.persist import load_or_create


def config_options(f: Callable) -> Callable:
    """The flags every process that reads the config shares."""
    for opt in reversed([
        click.option("--config", "config_path", type=click.Path(dir_okay=False),
                     help="TOML config file (targets, LUNs, portals, STML endpoint)."),
        click.option("--data-dir", type=click.Path(file_okay=False),
                     help="Where default disks, sockets and state live (default: XDG data dir)."),
        click.option("--iqn", help="Name of the target the --lun flags define."),
        click.option("--lun", "luns", multiple=True, metavar="SPEC",
                     help="LUN spec, repeatable: ram:256MiB, file:PATH, file:PATH,size=1GiB[,ro][,removable] "
                          "(\\, is a comma in a path)."),
        click.option("--stml-endpoint", help="ZeroMQ endpoint of the STML (ipc://PATH or tcp://HOST:PORT)."),
        click.option("--log-level", default="info", show_default=True,
                     type=click.Choice(["debug", "info", "warning", "error"])),
        click.option("--log-format", default="text", show_default=True, type=click.Choice(["text", "json"]),
                     help="text: one line per record; json: one JSON object per line."),
    ]):
        f = opt(f)
    return f


def config_exit(e: ConfigError) -> NoReturn:
    """A start that cannot succeed as configured: one line, exit 2."""
    click.echo(f"scsi-target: {'' if isinstance(e, StartupError) else 'config error: '}{e}", err=True)
    sys.exit(2)


def load_or_exit(config_path: str | None, data_dir: str | None, iqn: str | None,
                 luns: tuple[str, ...], stml_endpoint: str | None, portals: tuple[str, ...] = ()) -> Config:
    """The config this start serves; its file is written first if it is new
    (stml.persist.load_or_create)."""
    try:
        return load_or_create(config_path, data_dir, iqn, luns, stml_endpoint, portals)
    except ConfigError as e:
        config_exit(e)


def stml_options(f: Callable) -> Callable:
    """Flags of the STML process beyond the config file's."""
    for opt in reversed([
        click.option("--listen", multiple=True, metavar="ENDPOINT",
                     help="Another endpoint to bind, repeatable (tcp://HOST:PORT for remote front ends)."),
        click.option("--insecure", is_flag=True,
                     help="Allow a plain-TCP STML endpoint (no CURVE; on loopback too, which any local user can reach)."),
        click.option("--metrics", metavar="HOST:PORT", help="Serve Prometheus metrics here."),
        click.option("--poll-us", type=click.IntRange(0, MAX_POLL_US), metavar="US",
                     help="After traffic, poll for this long before sleeping (0: never; default 0, "
                          "or 200 under `run` when it gave the STML CPUs of its own)."),
        click.option("--timing", is_flag=True,
                     help="Time every command stage by stage (`status --latency`, Prometheus "
                          "histograms, trace stamps); the config's [stml] timing = true does too."),
    ]):
        f = opt(f)
    return f


def trace_options(f: Callable) -> Callable:
    """Record a trace of the contract from the start (stml.trace)."""
    for opt in reversed([
        click.option("--trace", "trace_path", type=click.Path(dir_okay=False), metavar="FILE",
                     help="Record every contract message to FILE from the start (a trace for "
                          "`scsi-target trace replay/export/stats`; FILE.gz is gzipped). Replaces FILE."),
        click.option("--trace-max", "trace_max", metavar="SIZE", default="256MiB", show_default=True,
                     help="Stop recording (an end record says so) before the file passes SIZE."),
        click.option("--trace-with-data", is_flag=True,
                     help="Keep read data in the trace, not only its digest (write data is always kept)."),
    ]):
        f = opt(f)
    return f


def inject_options(f: Callable) -> Callable:
    """Fault injection at the contract (stml.api.inject; off unless asked)."""
    for opt in reversed([
        click.option("--inject", "inject", multiple=True, metavar="RULE",
                     help="A fault-injection rule, repeatable: 'SIDE:KIND OP [at=N|p=P seed=S] [ms=..] "
                          "[lun=.. s=..]' (docs/research.md, \"Fault injection\")."),
        click.option("--inject-file", "inject_files", multiple=True, type=click.Path(dir_okay=False),
                     metavar="FILE", help="Fault-injection rules, one a line (# comments), repeatable."),
    ]):
        f = opt(f)
    return f


def inject_rules(texts: tuple[str, ...], files: tuple[str, ...], sides: tuple[str, ...]) -> list[Any]:
    """The rules the flags give; a wrong one (or one for a side this command
    does not run) exits 2 with one line."""
    from stml.api.inject import RuleError, load_rules
    try:
        rules = load_rules(texts, files)
        for r in rules:
            if r.side not in sides:
                raise RuleError(f"inject rule {r.text!r}: this command runs no {r.side} side")
    except RuleError as e:
        click.echo(f"scsi-target: {e}", err=True)
        sys.exit(2)
    return rules


def trace_settings(path: str | None, size: str, with_data: bool) -> Any:
    """The TraceOptions the flags ask for (None without --trace); a bad size exits 2."""
    if path is None:
        return None
    import os
    from stml.config import parse_size
    from stml.server import TraceOptions
    try:
        cap = parse_size(size, "--trace-max")
    except ConfigError as e:
        config_exit(e)
    return TraceOptions(os.path.abspath(path), cap, with_data)


def apply_stml_options(config: Config, listen: tuple[str, ...] = (), insecure: bool = False,
                       metrics: str | None = None, poll_us: int | None = None,
                       timing: bool = False) -> None:
    for ep in listen:
        if ep not in config.stml.listen:
            config.stml.listen.append(ep)
    config.stml.insecure = config.stml.insecure or insecure
    config.stml.metrics = metrics or config.stml.metrics
    if poll_us is not None:
        config.stml.poll_us = poll_us
    config.stml.timing = config.stml.timing or timing


@click.command("stml")
@config_options
@stml_options
@click.option("--portal", "portals", multiple=True, metavar="HOST:PORT[,TPGT]",
              help="iSCSI portal for front ends that follow the STML's list, repeatable "
                   "(replaces the config's `portals` for this run).")
@trace_options
@inject_options
def main(log_level: str, log_format: str, listen: tuple[str, ...], insecure: bool, metrics: str | None,
         poll_us: int | None, timing: bool, trace_path: str | None, trace_max: str, trace_with_data: bool,
         inject: tuple[str, ...], inject_files: tuple[str, ...], **kw: Any) -> None:
    """Run the STML alone: it owns the LUNs and waits for front ends."""
    setup_logging(log_level, "stml", log_format)
    trace = trace_settings(trace_path, trace_max, trace_with_data)
    rules = inject_rules(inject, inject_files, ("stml",))
    try:
        check_data_dir(data_dir_of(kw.get("config_path"), kw.get("data_dir")))
    except ConfigError as e:
        config_exit(e)
    config = load_or_exit(**kw)
    apply_stml_options(config, listen, insecure, metrics, poll_us, timing)
    from scsi_runtime.loop import run_loop
    from stml.server import run_stml
    try:
        run_loop(run_stml(config, trace, rules))
    except ConfigError as e:
        config_exit(e)
