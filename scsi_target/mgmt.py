"""Management verbs: talk to a running STML over its endpoint (the contract's
`mgmt` family) and print a table, or JSON with --json. The STML is found like
`scsi-target loop` finds it: --stml ENDPOINT, --config FILE or --data-dir."""
from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import click
import zmq


class MgmtClient:
    """One request, one answer, on a DEALER socket (no event loop needed)."""

    def __init__(self, endpoint: str, curve: dict[str, bytes] | None = None, timeout: float = 10.0) -> None:
        self.endpoint, self.curve, self.timeout = endpoint, curve, timeout
        self.ids = itertools.count(1)

    def call(self, cmd: str, **args: Any) -> Any:
        from stml.api import pack, unpack
        if self.endpoint.startswith("ipc://") and not os.path.exists(self.endpoint[6:]):
            raise ConnectionError(f"no STML is serving {self.endpoint}")
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
            sock.send(pack({"op": "mgmt", "id": rid, "cmd": cmd,
                            "args": {k: v for k, v in args.items() if v is not None}}))
            while True:
                if not sock.poll(int(self.timeout * 1000)):
                    raise TimeoutError(f"no answer from the STML at {self.endpoint} "
                                       f"(not running, or it does not accept our key)")
                h = unpack(sock.recv_multipart()[0])
                if h.get("op") == "mgmt_reply" and h.get("id") == rid:
                    break
        finally:
            sock.close()
        if not h.get("ok"):
            raise RuntimeError(h.get("error", "refused"))
        return h.get("result")


def _endpoint(config_path: str | None, data_dir: str | None, stml: str | None) -> str:
    from scsi_target.cli import _endpoint as find
    return find(config_path, data_dir, stml)


def mgmt_options(f: Callable) -> Callable:
    for opt in reversed([
        click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Find the STML from this config."),
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
    curve = None
    if kw.get("stml_key") or kw.get("own_key"):
        from stml.api import curve_client_keys
        try:
            curve = curve_client_keys(kw["own_key"], kw["stml_key"])
        except (ValueError, TypeError) as e:
            click.echo(f"scsi-target: keys: {e or 'give both --key and --stml-key'}", err=True)
            sys.exit(2)
    client = MgmtClient(_endpoint(kw.get("config_path"), kw.get("data_dir"), kw.get("stml")), curve,
                        kw.get("timeout", 10.0))
    try:
        return client.call(cmd, **args)
    except (ConnectionError, TimeoutError) as e:
        click.echo(f"scsi-target: {e}", err=True)
        sys.exit(1)
    except RuntimeError as e:
        click.echo(f"scsi-target: {cmd.replace('_', ' ')} refused: {e}", err=True)
        sys.exit(1)


def _human(n: Any) -> str:
    if not isinstance(n, int) or n < 1024:
        return str(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f}{unit}"
    return f"{n:.1f}PiB"


def table(rows: list[dict[str, Any]], columns: list[str], title: str | None = None) -> str:
    if title:
        out = [title]
    else:
        out = []
    if not rows:
        return "\n".join(out + ["(none)"])
    cells = [[_fmt(c, r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    out.append("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(out)


def _fmt(col: str, v: Any) -> str:
    if v is None:
        return "-"
    if col.endswith(("bytes", "size")) and col != "block_size":
        return _human(v)
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, list):
        return ",".join(map(str, v)) or "-"
    if isinstance(v, dict):
        return "/".join(f"{x:g}" for x in v.values())
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
    """Targets of the running STML."""


@target.command("list")
@mgmt_options
def target_list(**kw: Any) -> None:
    show(kw, _call(kw, "target_list"), ["name", "alias", "luns", "sessions", "acl", "chap"])


@target.command("add")
@click.argument("name")
@click.option("--alias", default="")
@mgmt_options
def target_add(name: str, alias: str, **kw: Any) -> None:
    show(kw, _call(kw, "target_add", name=name, alias=alias))


@target.command("remove")
@click.argument("name")
@click.option("--force", is_flag=True, help="Drop its sessions.")
@mgmt_options
def target_remove(name: str, force: bool, **kw: Any) -> None:
    show(kw, _call(kw, "target_remove", name=name, force=force))


@click.group()
def lun() -> None:
    """Logical units of the running STML (changes are hot and saved)."""


LUN_COLUMNS = ["target", "lun", "backend", "size", "block_size", "ro", "path"]


@lun.command("list")
@click.option("--target", "target_name")
@mgmt_options
def lun_list(target_name: str | None, **kw: Any) -> None:
    show(kw, _call(kw, "lun_list", target=target_name), LUN_COLUMNS)


@lun.command("add")
@click.argument("spec")
@click.option("--target", "target_name", help="Target name (default: the first).")
@click.option("--lun", "number", type=int, help="LUN number (default: the lowest free).")
@mgmt_options
def lun_add(spec: str, target_name: str | None, number: int | None, **kw: Any) -> None:
    """Add a LUN: SPEC as `run --lun` takes it (ram:64MiB, file:PATH,size=1GiB,...)."""
    show(kw, _call(kw, "lun_add", spec=spec, target=target_name, lun=number))


@lun.command("remove")
@click.argument("number", type=int)
@click.option("--target", "target_name")
@mgmt_options
def lun_remove(number: int, target_name: str | None, **kw: Any) -> None:
    show(kw, _call(kw, "lun_remove", lun=number, target=target_name))


@lun.command("resize")
@click.argument("number", type=int)
@click.argument("size")
@click.option("--target", "target_name")
@mgmt_options
def lun_resize(number: int, size: str, target_name: str | None, **kw: Any) -> None:
    """Resize LUN NUMBER to SIZE (e.g. 2GiB); initiators get CAPACITY DATA HAS CHANGED."""
    show(kw, _call(kw, "lun_resize", lun=number, size=size, target=target_name))


@click.group()
def portal() -> None:
    """iSCSI portals of the STML's list (front ends started without --portal follow it)."""


@portal.command("list")
@mgmt_options
def portal_list(**kw: Any) -> None:
    show(kw, _call(kw, "portal_list"), ["portal", "host", "port", "tpgt"])


@portal.command("add")
@click.argument("portal_spec", metavar="HOST:PORT[,TPGT]")
@mgmt_options
def portal_add(portal_spec: str, **kw: Any) -> None:
    """Listen on another portal (TPGT default 1; [V6ADDR]:PORT for IPv6)."""
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
@click.option("--target", "target_name")
@mgmt_options
def acl_add(initiator: str, target_name: str | None, **kw: Any) -> None:
    show(kw, _call(kw, "acl_add", initiator=initiator, target=target_name))


@acl.command("remove")
@click.argument("initiator")
@click.option("--target", "target_name")
@mgmt_options
def acl_remove(initiator: str, target_name: str | None, **kw: Any) -> None:
    show(kw, _call(kw, "acl_remove", initiator=initiator, target=target_name))


@click.group()
def chap() -> None:
    """CHAP credentials of a target."""


@chap.command("set")
@click.option("--target", "target_name")
@click.option("--user")
@click.option("--secret", help="12 to 255 bytes; omit --user and --secret to turn CHAP off.")
@click.option("--mutual", is_flag=True, help="Set the target's own (mutual CHAP) credentials.")
@mgmt_options
def chap_set(target_name: str | None, user: str | None, secret: str | None, mutual: bool, **kw: Any) -> None:
    show(kw, _call(kw, "chap_set", target=target_name, user=user, secret=secret, mutual=mutual))


@click.group()
def session() -> None:
    """I_T nexuses (iSCSI sessions, loopback clients)."""


SESSION_COLUMNS = ["front_end", "nexus", "initiator", "target", "tpg", "commands", "read_bytes",
                   "write_bytes", "errors", "in_flight", "latency_us"]


@session.command("list")
@mgmt_options
def session_list(**kw: Any) -> None:
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
              "errors", "in_flight", "latency_us"]


@frontend.command("list")
@mgmt_options
def frontend_list(**kw: Any) -> None:
    show(kw, _call(kw, "frontend_list"), FE_COLUMNS)


@click.command()
@mgmt_options
def status(**kw: Any) -> None:
    """The STML's LUNs, sessions and front ends with their counters
    (latency_us: p50/p90/p99 of recent commands)."""
    snap = _call(kw, "status")
    if kw.get("as_json"):
        click.echo(json.dumps(snap, indent=2, sort_keys=True))
        return
    click.echo(f"STML {snap['stml']} up {snap['uptime_s']}s on {', '.join(snap['endpoints'])}"
               f"; config {snap['config'] or '(none)'}")
    click.echo(table(snap["luns"], ["target", "lun", "backend", "blocks", "commands", "read_bytes",
                                    "write_bytes", "errors", "in_flight", "latency_us"], "\nLUNs"))
    click.echo(table(snap["sessions"], SESSION_COLUMNS, "\nSessions"))
    click.echo(table(snap["front_ends"], FE_COLUMNS, "\nFront ends"))
    gw = snap.get("gateway")
    if gw and gw["role"] != "standalone":   # RBD LUNs: this STML's role and who holds each lock
        click.echo(f"\nGateway: {gw['role']} for {gw['for_s']}s, {gw['takeovers']} takeover(s)")
        click.echo(table(gw["images"], ["target", "lun", "image", "lock_owner", "mine"]))


@click.group()
def config() -> None:
    """The config file: print it or validate it (no STML needed)."""


@config.command("show")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False, exists=True))
@click.option("--json", "as_json", is_flag=True)
def config_show(config_path: str, as_json: bool) -> None:
    """Print the config file as the STML reads it."""
    import tomllib
    text = Path(config_path).read_text()
    if as_json:
        click.echo(json.dumps(tomllib.loads(text), indent=2))
    else:
        click.echo(text.rstrip())


@config.command("check")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
def config_check(config_path: str) -> None:
    """Validate the config file: exit 0 and a summary, or exit 2 and the error."""
    from stml.config import ConfigError, load
    try:
        c = load(config_path)
    except ConfigError as e:
        click.echo(f"scsi-target: config error: {e}", err=True)
        sys.exit(2)
    luns = sum(len(t.luns) for t in c.targets)
    click.echo(f"{config_path}: OK ({len(c.targets)} target(s), {luns} LUN(s), endpoint {c.stml_endpoint}"
               + (f", also {', '.join(c.stml.listen)}" if c.stml.listen else "") + ")")


def register(main: click.Group) -> None:
    for cmd in (target, lun, portal, acl, chap, session, frontend, status, config):
        main.add_command(cmd)
