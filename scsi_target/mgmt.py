"""Management verbs: talk to a running STML over its endpoint (the contract's
`mgmt` family) and print a table, or JSON with --json. The STML is found like
`scsi-target loop` finds it: --stml ENDPOINT, --config FILE or --data-dir,
given before the verb or after it. A refusal exits 2; a target that is not
running or does not answer, or a change applied but not saved, exits 1."""
from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import click
import zmq

from scsi_target.endpoint import NotRunning, find_endpoint, inherited, require_running


class MgmtClient:
    """One request, one answer, on a DEALER socket (no event loop needed)."""

    def __init__(self, endpoint: str, curve: dict[str, bytes] | None = None, timeout: float = 10.0) -> None:
        self.endpoint, self.curve, self.timeout = endpoint, curve, timeout
        self.ids = itertools.count(1)

    def call(self, cmd: str, **args: Any) -> Any:
        from stml.api import unpack
        from stml.api.link import mgmt_request
        from stml.api.messages import FROM_STML, Op, check
        require_running(self.endpoint)      # a stale socket is answered at once
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.curve:
            sock.curve_secretkey = self.curve["secret"]
            sock.curve_publickey = self.curve["public"]
            sock.curve_serverkey = self.curve["server"]
        try:
            sock.connect(self.endpoint)
            rid = next(self.ids)
            sock.send(mgmt_request(rid, cmd, {k: v for k, v in args.items() if v is not None}))
            while True:
                if not sock.poll(int(self.timeout * 1000)):
                    raise TimeoutError(f"no answer from the STML at {self.endpoint} in {self.timeout:g}s"
                                       + self._silence_hint())
                h = unpack(sock.recv_multipart()[0])
                if h["op"] == Op.MGMT_REPLY and check(h, FROM_STML) is None and h["id"] == rid:
                    break
        finally:
            sock.close()
        if not h.get("ok"):
            raise RuntimeError(h.get("error", "refused"))
        return h.get("result")

    def _silence_hint(self) -> str:
        """A CURVE STML drops a keyless client's handshake without a word, so
        on tcp:// silence may mean missing keys rather than a stuck STML."""
        if self.curve:
            return " (does it accept our key?)"
        if self.endpoint.startswith("tcp://"):
            return " (busy or stuck; or it takes CURVE clients only: give --stml-key and --key)"
        return " (busy or stuck)"


def mgmt_options(f: Callable) -> Callable:
    for opt in reversed([
        click.option("--config", "config_path", type=click.Path(dir_okay=False),
                     help="Find the STML from this config."),
        click.option("--data-dir", type=click.Path(file_okay=False), help="Find the STML of this data dir."),
        click.option("--stml", help="STML endpoint (ipc://PATH or tcp://HOST:PORT)."),
        click.option("--stml-key", type=click.Path(dir_okay=False), help="The STML's public key file (tcp://)."),
        click.option("--key", "own_key", type=click.Path(dir_okay=False), help="Our key pair (tcp://)."),
        click.option("--timeout", type=float, default=10.0, show_default=True),
        click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table."),
    ]):
        f = opt(f)
    return f


def _call(kw: dict[str, Any], cmd: str, **args: Any) -> Any:
    kw = inherited(kw)
    curve = None
    if kw.get("stml_key") or kw.get("own_key"):
        from scsi_runtime.curvekeys import curve_client_keys
        try:
            curve = curve_client_keys(kw["own_key"], kw["stml_key"])
        except (ValueError, TypeError) as e:
            click.echo(f"scsi-target: keys: {e or 'give both --key and --stml-key'}", err=True)
            sys.exit(2)
    client = MgmtClient(find_endpoint(kw.get("config_path"), kw.get("data_dir"), kw.get("stml")), curve,
                        kw.get("timeout", 10.0))
    try:
        result = client.call(cmd, **args)
    except (ConnectionError, TimeoutError) as e:
        click.echo(f"scsi-target: {e}", err=True)
        sys.exit(1)
    except RuntimeError as e:
        click.echo(f"scsi-target: {cmd.replace('_', ' ')} refused: {e}", err=True)
        sys.exit(2)
    if isinstance(result, dict) and result.get("save_error"):   # live, but a restart would lose it
        if kw.get("as_json"):
            click.echo(json.dumps(result, indent=2, sort_keys=True))
        click.echo(f"scsi-target: {cmd.replace('_', ' ')}: {result['save_error']}", err=True)
        sys.exit(1)
    return result


WIDTH = 100   # what `status` and `ls` fit in, unless --wide


def _human(n: Any) -> str:
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return str(n)
    if n < 1024:
        return f"{n:.0f}"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f}{unit}"
    return f"{n:.1f}PiB"


def squeeze(text: str, width: int) -> str:
    """Shorten in the middle, where long names (IQNs, paths) differ least."""
    if len(text) <= width:
        return text
    if width < 5:
        return text[:width]
    keep = width - 1
    return text[:keep // 2] + "~" + text[len(text) - (keep - keep // 2):]


def table(rows: list[dict[str, Any]], columns: list[str], title: str | None = None,
          width: int | None = None, headers: dict[str, str] | None = None) -> str:
    """Rows as aligned columns; with `width`, the widest columns are squeezed
    until a line fits it."""
    out = [title] if title else []
    if not rows:
        return "\n".join(out + ["(none)"])
    heads = [(headers or {}).get(c, c).upper() for c in columns]
    cells = [[_fmt(c, r.get(c)) for c in columns] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(heads)]
    if width is not None:
        while sum(widths) + 2 * (len(widths) - 1) > width:
            i = max(range(len(widths)), key=lambda k: widths[k])
            if widths[i] <= max(8, len(heads[i])):
                break
            widths[i] -= 1
        cells = [[squeeze(v, w) for v, w in zip(row, widths)] for row in cells]
    out.append("  ".join(h.ljust(w) for h, w in zip(heads, widths)).rstrip())
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(out)


def _fmt(col: str, v: Any) -> str:
    if v is None:
        return "-"
    if col.endswith(("bytes", "size", "/s")) and col != "block_size":
        return _human(v)
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.0f}"
    if isinstance(v, list):
        return ",".join(map(str, v)) or "-"
    if isinstance(v, dict):   # latency percentiles, in whole microseconds
        return "/".join(f"{x:.0f}" for x in v.values())
    return str(v)


def show(kw: dict[str, Any], result: Any, columns: list[str] | None = None) -> None:
    if kw.get("as_json"):
        click.echo(json.dumps(result, indent=2, sort_keys=True))
    elif isinstance(result, list):
        click.echo(table(result, columns or sorted({k for r in result for k in r})))
    elif isinstance(result, dict):
        click.echo(table([result], columns or list(result)))


# ------------------------------------------------------------------ verbs

@click.group()
def target() -> None:
    """Targets of the running STML (add, remove, list)."""


@target.command("list")
@mgmt_options
def target_list(**kw: Any) -> None:
    """List the targets with their LUN and session counts."""
    show(kw, _call(kw, "target_list"), ["name", "alias", "luns", "sessions", "acl", "chap"])


@target.command("add")
@click.argument("name")
@click.option("--alias", default="", help="A human name sent to initiators (TargetAlias).")
@mgmt_options
def target_add(name: str, alias: str, **kw: Any) -> None:
    """Add a target NAME (an iqn.YYYY-MM.reversed.domain:id); add LUNs with `lun add`."""
    show(kw, _call(kw, "target_add", name=name, alias=alias))


@target.command("remove")
@click.argument("name")
@click.option("--force", is_flag=True, help="Drop its sessions.")
@mgmt_options
def target_remove(name: str, force: bool, **kw: Any) -> None:
    """Remove a target and its LUNs (their backing files stay)."""
    show(kw, _call(kw, "target_remove", name=name, force=force))


@click.group()
def lun() -> None:
    """Logical units of the running STML (changes are live and saved)."""


LUN_COLUMNS = ["target", "lun", "backend", "size", "block_size", "ro", "sync_error", "offline", "path"]


@lun.command("list")
@click.option("--target", "target_name", help="Only this target's LUNs.")
@mgmt_options
def lun_list(target_name: str | None, **kw: Any) -> None:
    """List the LUNs with size, backend and path."""
    show(kw, _call(kw, "lun_list", target=target_name), LUN_COLUMNS)


@lun.command("add")
@click.argument("spec")
@click.option("--target", "target_name", help="Target name (default: the first).")
@click.option("--lun", "number", type=int, help="LUN number (default: the lowest free).")
@mgmt_options
def lun_add(spec: str, target_name: str | None, number: int | None, **kw: Any) -> None:
    """Add a LUN: SPEC as `run --lun` takes it (ram:64MiB, file:PATH,size=1GiB,...; \\, is a comma in a path)."""
    show(kw, _call(kw, "lun_add", spec=spec, target=target_name, lun=number))


@lun.command("remove")
@click.argument("number", type=int)
@click.option("--target", "target_name", help="Target name (default: the first).")
@mgmt_options
def lun_remove(number: int, target_name: str | None, **kw: Any) -> None:
    """Remove LUN NUMBER (its backing file stays)."""
    show(kw, _call(kw, "lun_remove", lun=number, target=target_name))


@lun.command("resize")
@click.argument("number", type=int)
@click.argument("size")
@click.option("--target", "target_name", help="Target name (default: the first).")
@click.option("--force", is_flag=True, help="Allow shrinking (the data past the new end is lost).")
@mgmt_options
def lun_resize(number: int, size: str, target_name: str | None, force: bool, **kw: Any) -> None:
    """Resize LUN NUMBER to SIZE (e.g. 2GiB); initiators get CAPACITY DATA HAS CHANGED."""
    show(kw, _call(kw, "lun_resize", lun=number, size=size, target=target_name, force=force or None))


@lun.command("reset-error")
@click.argument("number", type=int)
@click.option("--target", "target_name", help="Target name (default: the first).")
@mgmt_options
def lun_reset_error(number: int, target_name: str | None, **kw: Any) -> None:
    """Let LUN NUMBER sync again after a failed sync.

    Its SYNC_ERROR in `lun list` says why. Writes acknowledged before the
    failure may be lost: check or restore the data first. Until then every
    sync, FUA and write-through write fails."""
    show(kw, _call(kw, "lun_reset_error", lun=number, target=target_name))


@click.group()
def portal() -> None:
    """iSCSI portals of the STML's list (front ends started without --portal follow it)."""


@portal.command("list")
@mgmt_options
def portal_list(**kw: Any) -> None:
    """List the portals and whether the front end listens on each."""
    show(kw, _call(kw, "portal_list"), ["portal", "host", "port", "tpgt", "state"])


@portal.command("add")
@click.argument("portal_spec", metavar="HOST:PORT[,TPGT]")
@mgmt_options
def portal_add(portal_spec: str, **kw: Any) -> None:
    """Listen on another portal (TPGT default 1; [V6ADDR]:PORT for IPv6); refused if it cannot be opened."""
    show(kw, _call(kw, "portal_add", portal=portal_spec), ["portal", "tpgt", "saved"])


@portal.command("remove")
@click.argument("portal_spec", metavar="HOST:PORT[,TPGT]")
@mgmt_options
def portal_remove(portal_spec: str, **kw: Any) -> None:
    """Stop listening on a portal (its open sessions go on until they end)."""
    show(kw, _call(kw, "portal_remove", portal=portal_spec), ["portal", "saved"])


@click.group()
def acl() -> None:
    """Initiators allowed to log in to a target (an empty ACL allows all)."""


@acl.command("add")
@click.argument("initiator")
@click.option("--target", "target_name", help="Target name (default: the first).")
@mgmt_options
def acl_add(initiator: str, target_name: str | None, **kw: Any) -> None:
    """Allow INITIATOR (its IQN) to log in; once the ACL has an entry, others are refused
    and their sessions end."""
    show(kw, _call(kw, "acl_add", initiator=initiator, target=target_name))


@acl.command("remove")
@click.argument("initiator")
@click.option("--target", "target_name", help="Target name (default: the first).")
@click.option("--allow-any", is_flag=True,
              help="Allow removing the last entry: an empty ACL lets any initiator log in.")
@mgmt_options
def acl_remove(initiator: str, target_name: str | None, allow_any: bool, **kw: Any) -> None:
    """Take INITIATOR out of the ACL; its sessions end.

    An empty ACL admits any initiator: removing the last entry takes --allow-any."""
    show(kw, _call(kw, "acl_remove", initiator=initiator, target=target_name, allow_any=allow_any))


@click.group()
def chap() -> None:
    """CHAP credentials of a target."""


@chap.command("set")
@click.option("--target", "target_name", help="Target name (default: the first).")
@click.option("--user", help="The CHAP user name.")
@click.option("--secret", help="12 to 255 bytes; omit --user and --secret to turn CHAP off. Every local "
              "user can read a command line (ps): prefer --secret-file.")
@click.option("--secret-file", metavar="FILE",
              help="Read the secret from this file's first line (- for standard input).")
@click.option("--mutual", is_flag=True, help="Set the target's own (mutual CHAP) credentials; CHAP must be set first.")
@mgmt_options
def chap_set(target_name: str | None, user: str | None, secret: str | None, secret_file: str | None,
             mutual: bool, **kw: Any) -> None:
    """Require CHAP (--user and --secret or --secret-file), or turn it off (neither)."""
    if secret_file is not None:
        if secret is not None:
            click.echo("scsi-target: give --secret or --secret-file, not both", err=True)
            sys.exit(2)
        try:
            with click.open_file(secret_file) as f:
                secret = f.readline(1024).rstrip("\r\n")   # a secret is at most 255 bytes
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
            click.echo(f"scsi-target: --secret-file {secret_file}: {why}", err=True)
            sys.exit(2)
    show(kw, _call(kw, "chap_set", target=target_name, user=user, secret=secret, mutual=mutual))


@click.group()
def session() -> None:
    """I_T nexuses (iSCSI sessions, loopback clients)."""


SESSION_COLUMNS = ["front_end", "nexus", "initiator", "target", "tpg", "commands", "read_bytes",
                   "write_bytes", "errors", "in_flight", "latency_us"]


@session.command("list")
@mgmt_options
def session_list(**kw: Any) -> None:
    """List the sessions with their counters."""
    show(kw, _call(kw, "session_list"), SESSION_COLUMNS)


@session.command("drop")
@click.argument("nexus", type=int)
@click.option("--front-end", "front_end", help="The front end's name (when NEXUS is on several).")
@mgmt_options
def session_drop(nexus: int, front_end: str | None, **kw: Any) -> None:
    """End session NEXUS (the NEXUS column of `session list`): its commands are
    aborted and the front end closes its connections."""
    show(kw, _call(kw, "session_drop", nexus=nexus, front_end=front_end),
         ["front_end", "nexus", "initiator", "target"])


@click.group()
def frontend() -> None:
    """Front ends attached to the STML."""


FE_COLUMNS = ["name", "kind", "nexuses", "last_seen_s", "commands", "read_bytes", "write_bytes",
              "errors", "in_flight", "latency_us", "buffered_bytes", "buffer_limit_bytes"]


@frontend.command("list")
@mgmt_options
def frontend_list(**kw: Any) -> None:
    """List the front ends with their counters."""
    show(kw, _call(kw, "frontend_list"), FE_COLUMNS)


# ------------------------------------------------------------------ status and ls

RATE_KEYS = ("commands", "read_bytes", "write_bytes")


def with_rates(before: dict[str, Any], after: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Per-second rates of the counters between two snapshots, per row."""
    def key(scope: str, r: dict[str, Any]) -> Any:
        return (r.get("target"), r.get("lun")) if scope == "luns" else \
            (r.get("front_end"), r.get("nexus")) if scope == "sessions" else r.get("name")
    for scope in ("luns", "sessions", "front_ends"):
        old = {key(scope, r): r for r in before.get(scope, [])}
        for r in after.get(scope, []):
            o = old.get(key(scope, r))
            for k in RATE_KEYS:
                if o is not None and seconds > 0:
                    r[f"{k.replace('_bytes', '').replace('commands', 'iops')}/s"] = \
                        max(0, r.get(k, 0) - o.get(k, 0)) / seconds
    return after


def _uptime(s: float) -> str:
    s = int(s)
    return f"{s // 86400}d{s % 86400 // 3600}h" if s >= 86400 else \
        f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def render_status(snap: dict[str, Any], wide: bool) -> str:
    width = None if wide else WIDTH
    for r in snap["luns"]:
        r["size"] = r["blocks"] * r["block_size"]
    head = [f"STML {snap['stml']} up {_uptime(snap['uptime_s'])}; data dir {snap.get('data_dir', '-')}",
            f"config {snap['config'] or '(none)'}; endpoint {', '.join(snap['endpoints'])}"]
    head = [squeeze(h, WIDTH) if not wide else h for h in head]
    portals = snap.get("portals") or []
    rated = "iops/s" in (snap["luns"][0] if snap["luns"] else {})
    rates = ["iops/s", "read/s", "write/s"] if rated else []
    totals = ["read_bytes", "write_bytes", "errors"]
    lun_cols = ["target", "lun", "size", "backend", *rates, *totals, "latency_us"]
    ses_cols = ["initiator", "target", "tpg", *rates, *totals, "latency_us"]
    fe_cols = ["name", "kind", "nexuses", *rates, *totals]
    if wide:
        lun_cols = ["target", "lun", "size", "backend", "path", *rates, "commands", "read_bytes",
                    "write_bytes", "errors", "in_flight", "latency_us"]
        ses_cols = SESSION_COLUMNS + rates
        fe_cols = FE_COLUMNS + rates
    heads = {"latency_us": "lat us", "in_flight": "queued", "iops/s": "iops", "read_bytes": "read",
             "write_bytes": "written", "errors": "err"}
    # a failed sync first: the acknowledged writes it covered may be lost (decision 0256)
    head += [f"LUN {r['lun']} of {r['target']}: SYNC FAILED ({r['sync_error']}); writes acknowledged "
             f"before it may be lost; syncs fail until `scsi-target lun reset-error`"
             for r in snap["luns"] if r.get("sync_error")]
    # an offline LU: its store could not open; commands that need it get 02/04/03 (0280)
    head += [f"LUN {r['lun']} of {r['target']}: OFFLINE ({r['offline']}); `scsi-target config reload` "
             f"tries again" for r in snap["luns"] if r.get("offline")]
    # its file deleted or replaced under it: served from the open file, which no restart finds
    head += [f"LUN {r['lun']} of {r['target']}: its file {r['path']} was deleted or replaced since it "
             f"opened; it still serves the old file, which a restart will not find"
             for r in snap["luns"] if r.get("unlinked")]
    out = head + [table(portals, ["portal", "tpgt", "state"], "\nPortals", width)]
    if wide:
        out.append(table(snap["luns"], lun_cols, "\nLUNs", width, heads))
        out.append(table(snap["sessions"], ses_cols, "\nSessions", width, heads))
    else:   # a heading per target: its name once, in full, rather than squeezed on every row
        names = list(dict.fromkeys([r["target"] for r in snap["luns"]] + [r["target"] for r in snap["sessions"]]))
        for name in names or ["-"]:
            out.append(f"\nTarget {name}")
            luns = [r for r in snap["luns"] if r["target"] == name]
            sessions = [r for r in snap["sessions"] if r["target"] == name]
            out.append(table(luns, [c for c in lun_cols if c != "target"], "LUNs", width, heads))
            if sessions:
                out.append(table(sessions, [c for c in ses_cols if c != "target"], "Sessions", width, heads))
    gw = snap.get("gateway")
    out.append(table(snap["front_ends"], fe_cols, "\nFront ends", width, heads))
    if gw and gw["role"] == "standby" and not snap["front_ends"]:   # its host's front end is elsewhere
        out[-1] = out[-1].replace("(none)", "(none: a standby's front ends attach to the active gateway)")
    if gw and gw["role"] != "standalone":   # RBD LUNs: this STML's role and who holds each lock
        out.append(f"\nGateway: {gw['role']} for {gw['for_s']}s, {gw['takeovers']} takeover(s)")
        out.append(table(gw["images"], ["target", "lun", "image", "lock_owner", "mine"], None, width))
    return "\n".join(out)


@click.command()
@mgmt_options
@click.option("--watch", is_flag=True, help="Refresh every --interval seconds until Ctrl-C.")
@click.option("--interval", type=float, default=1.0, show_default=True,
              help="Seconds between the two samples rates come from (0: counters only, at once).")
@click.option("--wide", is_flag=True, help="Every column, whatever the width.")
@click.option("--latency", is_flag=True,
              help="Stage timing instead (a target run with --timing): per LUN and front end, "
                   "each stage's commands and p50/p90/p99 in microseconds.")
def status(watch: bool, interval: float, wide: bool, latency: bool, **kw: Any) -> None:
    """The STML's portals, LUNs, sessions and front ends, with sizes, rates
    (iops, bytes/s over --interval), totals read and written, errors and
    latency (LAT US: p50/p90/p99 of recent commands, in microseconds)."""
    if latency:
        while True:
            report = _call(kw, "latency")
            if kw.get("as_json"):
                click.echo(json.dumps(report, indent=2, sort_keys=True))
            else:
                if watch:
                    click.clear()
                click.echo(render_latency(report))
            if not watch:
                return
            time.sleep(max(interval, 0.1))
    snap = _call(kw, "status")
    while True:
        if interval > 0:
            t0 = time.monotonic()
            time.sleep(interval)
            nxt = _call(kw, "status")
            snap = with_rates(snap, nxt, time.monotonic() - t0)
        if kw.get("as_json"):
            click.echo(json.dumps(snap, indent=2, sort_keys=True))
        else:
            if watch:
                click.clear()
            click.echo(render_status(snap, wide))
        if not watch:
            return
        if interval <= 0:
            time.sleep(1.0)
            snap = _call(kw, "status")


def render_latency(report: dict[str, Any]) -> str:
    """`status --latency`: one table per LUN and per front end, a row per stage."""
    out = [f"Stage timing: {report['commands']} command(s) counted, {report['in_flight']} in flight"
           + (f", {report['untracked']} past the table caps" if report.get("untracked") else "")]
    cols = ["stage", "count", "p50", "p90", "p99"]

    def stage_rows(stages: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"stage": name, **stages[name]} for name in report["stages"] if name in stages]
    for r in report["luns"]:
        out.append(f"\nLUN {r['target']} {r['lun']} (us)")
        out.append(table(stage_rows(r["stages"]), cols, None, WIDTH))
    for r in report["front_ends"]:
        clock = r.get("clock", "?")
        if r.get("error_ns") is not None and clock != "same host":
            clock += f", offset {r['offset_ns'] / 1000:+.1f} us +/- {r['error_ns'] / 1000:.1f} us"
        out.append(f"\nFront end {r['name']} (us; clock: {clock})")
        out.append(table(stage_rows(r["stages"]), cols, None, WIDTH))
    return "\n".join(out)


def render_tree(targets: list[dict[str, Any]], snap: dict[str, Any], wide: bool) -> str:
    """targets -> portal groups -> LUNs -> ACLs -> sessions, as targetcli's `ls`."""
    lines: list[str] = []
    luns = snap["luns"]
    portals = snap.get("portals") or []

    def add(depth: int, text: str) -> None:
        line = "  " * depth + "o- " + text
        lines.append(line if wide else squeeze(line, WIDTH))

    add(0, f"/ (STML {snap['stml']}, data dir {snap.get('data_dir', '-')})")
    for t in targets:
        name = t["name"]
        add(1, f"{name}" + (f" ({t['alias']})" if t.get("alias") else "")
            + f" [{t['luns']} LUN(s), {t['sessions']} session(s)]")
        add(2, "tpgs")
        for tag in sorted({p["tpgt"] for p in portals}):
            add(3, f"tpg {tag}")
            for p in portals:
                if p["tpgt"] == tag:
                    add(4, f"{p['host']}:{p['port']} [{p['state']}]")
        add(2, "luns")
        for r in luns:
            if r["target"] == name:
                size = r["blocks"] * r["block_size"]
                where = r.get("path") or "RAM"
                if r.get("offline"):   # its store could not open (0280): why, at the end
                    add(3, f"lun {r['lun']} [OFFLINE, {r['backend']}, {where}]: {r['offline']}")
                else:
                    add(3, f"lun {r['lun']} [{_human(size)}, {r['backend']}, {where}]")
        acl = t.get("acl") or []
        add(2, "acls" + ("" if acl else " [empty: any initiator may log in]"))
        for a in acl:
            add(3, a)
        add(2, f"chap [{'on' if t.get('chap') else 'off'}]")
        ses = [s for s in snap["sessions"] if s["target"] == name]
        add(2, "sessions")
        for s in ses:
            add(3, f"{s['initiator']} [nexus {s['nexus']}, tpg {s['tpg']}, {s['front_end']}]")
    return "\n".join(lines)


@click.command("ls")
@mgmt_options
@click.option("--wide", is_flag=True, help="Do not shorten long names to fit 100 columns.")
def ls(wide: bool, **kw: Any) -> None:
    """The running configuration as a tree: targets, portal groups, LUNs
    (size, backend, path), ACLs and sessions."""
    targets = _call(kw, "target_list")
    snap = _call(kw, "status")
    if kw.get("as_json"):
        click.echo(json.dumps({"targets": targets, "status": snap}, indent=2, sort_keys=True))
        return
    click.echo(render_tree(targets, snap, wide))


# ------------------------------------------------------------------ config

@click.group()
def config() -> None:
    """The configuration: the running one (show, diff, save, reload) and files (check)."""


@config.command("show")
@mgmt_options
@click.option("--file", "file_only", is_flag=True, help="Print the file as it is on disk instead.")
def config_show(file_only: bool, **kw: Any) -> None:
    """Print the running configuration, as a save would write it (with the file's comments)."""
    kw = inherited(kw)
    if file_only:
        import tomlkit
        from stml.config import CONFIG_NAME
        from stml.persist import hide_secrets
        path = kw.get("config_path") or _served_file(kw) or str(_data_dir(kw) / CONFIG_NAME)
        try:
            text = hide_secrets(Path(path).read_text())
        except OSError as e:
            click.echo(f"scsi-target: {path}: {e.strerror}", err=True)
            sys.exit(1)
        except tomlkit.exceptions.ParseError as e:   # shown as it is, it could print a secret
            click.echo(f"scsi-target: {path}: not valid TOML: {e}", err=True)
            sys.exit(2)
        if kw.get("as_json"):
            import tomllib
            click.echo(json.dumps(tomllib.loads(text), indent=2))
        else:
            click.echo(text.rstrip())
        return
    try:
        require_running(find_endpoint(kw.get("config_path"), kw.get("data_dir"), kw.get("stml")))
    except NotRunning as e:
        click.echo(f"scsi-target: {e}; the file on disk follows", err=True)
        config_show.callback(file_only=True, **kw)   # type: ignore[misc]
        return
    r = _call(kw, "config_show")
    if kw.get("as_json"):
        import tomllib
        click.echo(json.dumps(tomllib.loads(r["text"]), indent=2))
    else:
        click.echo(r["text"].rstrip())


def _served_file(kw: dict[str, Any]) -> str | None:
    """The file the running target of these options serves (`run --config F
    --data-dir D` serves F, not D's own file: decision 0215); None when no
    target runs or it serves none."""
    try:
        require_running(find_endpoint(None, kw.get("data_dir"), kw.get("stml")))
    except NotRunning:
        return None
    path = _call(kw, "config_show").get("path")
    return str(path) if path else None


def _data_dir(kw: dict[str, Any]) -> Path:
    from stml.config import default_data_dir
    return Path(kw["data_dir"]).absolute() if kw.get("data_dir") else default_data_dir()


@config.command("save")
@click.argument("file", required=False, type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Overwrite the config file even if it was edited by hand.")
@mgmt_options
def config_save(file: str | None, force: bool, **kw: Any) -> None:
    """Save the running configuration to its file (every change already does), or to FILE."""
    r = _call(kw, "config_save", path=str(Path(file).absolute()) if file else None, force=force or None)
    show(kw, r, ["saved"])


@config.command("diff")
@mgmt_options
def config_diff(**kw: Any) -> None:
    """Show how the file on disk differs from the running configuration
    (exit 0: the same, 1: they differ)."""
    r = _call(kw, "config_diff")
    if kw.get("as_json"):
        click.echo(json.dumps(r, indent=2, sort_keys=True))
    elif r["same"]:
        click.echo(f"{r['path']} holds the running configuration")
    else:
        click.echo(r["diff"].rstrip())
    sys.exit(0 if r["same"] else 1)


@config.command("reload")
@mgmt_options
def config_reload(**kw: Any) -> None:
    """Apply the hand-edited file to the running target (as SIGHUP does); say
    what needs a restart or a forced command instead."""
    r = _call(kw, "config_reload")
    if kw.get("as_json"):
        click.echo(json.dumps(r, indent=2, sort_keys=True))
        return
    click.echo(f"reloaded {r['path']}: {len(r['applied'])} change(s) applied")
    for line in r["applied"]:
        click.echo(f"  applied: {line}")
    for line in r["not_applied"]:
        click.echo(f"  NOT applied: {line}")


@config.command("check")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="The file to check (default: the data dir's).")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Check this data dir's config file.")
def config_check(config_path: str | None, data_dir: str | None) -> None:
    """Validate the config file: exit 0 and a summary, or exit 2 and the error."""
    from fetd_vhost.cli import vhost_specs
    from stml.config import CONFIG_NAME, ConfigError, load
    if config_path is None:   # the file a data dir owns, as `run --data-dir` reads it
        config_path = str(_data_dir({"data_dir": data_dir}) / CONFIG_NAME)
    try:
        c = load(config_path, data_dir)
        vhost_specs(c, ())     # [[vhost]]: read by `run`, not the STML
    except (ConfigError, ValueError) as e:
        click.echo(f"scsi-target: config error: {e}", err=True)
        sys.exit(2)
    luns = sum(len(t.luns) for t in c.targets)
    click.echo(f"{config_path}: OK ({len(c.targets)} target(s), {luns} LUN(s), endpoint {c.stml_endpoint}"
               + (f", also {', '.join(c.stml.listen)}" if c.stml.listen else "") + ")")
    # valid, yet every start refuses a plain-TCP endpoint (0246): say so before it does
    if not (c.stml.curve_secret_key_file or c.stml.insecure):
        for ep in dict.fromkeys([c.stml_endpoint, *c.stml.listen]):
            if ep.startswith("tcp://"):
                click.echo(f"scsi-target: warning: {ep} is plain TCP: a start refuses it unless [stml] "
                           "curve_secret_key_file is set, or `insecure = true` in [stml] (or --insecure)",
                           err=True)
    # valid, yet a start would serve these offline (0280): say so before it does
    from stml.lu import missing_file
    for t in c.targets:
        for lc in t.luns:
            why = missing_file(lc.options)
            if why:
                click.echo(f"scsi-target: warning: target {t.name} LUN {lc.lun} ({lc.options.path}): {why}: "
                           f"a start serves it offline", err=True)


def register(main: click.Group) -> None:
    for cmd in (target, lun, portal, acl, chap, session, frontend, status, ls, config):
        main.add_command(cmd)
