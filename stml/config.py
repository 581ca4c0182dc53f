"""Configuration: a TOML file and command-line LUN specs, validated into one
Config. Every error names the field it is about, in one line."""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import hmac
import os
import re
import secrets
import socket
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from stml.lu import RECORDED, LunOptions, legacy_id
from stml.sched import DEFAULT_POLICY, POLICIES

# the default target's name before 0207, the same on every host: kept where it was served
LEGACY_IQN = "iqn.2026-11.org.scsi-target:disk0"
_MACHINE_IDS = ("/etc/machine-id", "/var/lib/dbus/machine-id")
DEFAULT_SIZE = 1 << 30
DEFAULT_PORTAL = "127.0.0.1:3260"
DEFAULT_CMDSN_DEPTH = 128   # commands a session may have outstanding (LIO: 64), the STML's queue depth
MAX_CMDSN_DEPTH = 512       # as LIO's default_cmdsn_depth allows
CONFIG_NAME = "scsi-target.toml"    # the config file a data dir owns (it sits in it)

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 1000, "m": 1 << 20, "mib": 1 << 20,
          "mb": 10**6, "g": 1 << 30, "gib": 1 << 30, "gb": 10**9, "t": 1 << 40, "tib": 1 << 40,
          "tb": 10**12, "p": 1 << 50, "pib": 1 << 50, "pb": 10**15}
_LU_ID = re.compile(r"[0-9A-Fa-f]{32}")
MAX_ISCSI_NAME = 223   # bytes of UTF-8
_IQN = re.compile(r"^(iqn\.\d{4}-\d{2}\.[^\s,]+|eui\.[0-9a-f]{16}|naa\.[0-9a-f]{16,32})$", re.IGNORECASE)


class ConfigError(ValueError):
    """A bad config value; str() is the one line a user sees."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")


def parse_size(value: Any, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise ConfigError(where, f"{value!r} is not a size (examples: 64MiB, 1GiB, 1048576)")
        n = int(m.group(1)) * _UNITS[m.group(2).lower()]
    if n <= 0:
        raise ConfigError(where, "size must be positive")
    return n


_TEXT_UNITS = ((1 << 50, "PiB"), (1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB"))


def size_text(n: int) -> str | int:
    """64 MiB as "64MiB": what a person would have written (parse_size reads it)."""
    for unit, name in _TEXT_UNITS:
        if n % unit == 0:
            return f"{n // unit}{name}"
    return n


@dataclass
class LunConfig:
    lun: int
    options: LunOptions


@dataclass
class TargetConfig:
    name: str
    luns: list[LunConfig]
    alias: str = ""
    acl: list[str] = field(default_factory=list)
    chap: dict[str, str] | None = None
    mutual_chap: dict[str, str] | None = None
    # TARGET WARM/COLD RESET from its initiators: off by default, since one
    # initiator's reset aborts every initiator's commands (docs/decisions/0140)
    target_reset: bool = False
    # iSCSI: the highest ErrorRecoveryLevel its sessions may negotiate (0: session
    # recovery only, the default; docs/decisions/0500) and its CmdSN window
    error_recovery_level: int = 0
    cmdsn_depth: int = DEFAULT_CMDSN_DEPTH

    def access(self) -> dict[str, Any]:
        """Transport-facing access rules, as the contract's `detect` carries them
        (with the iSCSI session settings a front end applies at login)."""
        return {"acl": self.acl, "chap": self.chap, "mutual": self.mutual_chap,
                "erl": self.error_recovery_level, "cmdsn_depth": self.cmdsn_depth}


@dataclass
class Config:
    data_dir: Path
    targets: list[TargetConfig]
    stml_endpoint: str
    portals: list[str]
    discovery_chap: dict[str, str] | None = None
    path: Path | None = None
    stml: StmlSettings = field(default_factory=lambda: StmlSettings())
    isns: str | None = None          # "HOST:PORT" of an iSNS server the front ends register with
    slp: list[str] | None = None     # SLP scopes the iSCSI front end answers in; None: no SLP
    slp_da: list[str] = field(default_factory=list)   # directory agents ("HOST[:PORT]") to register with
    raw: dict[str, Any] = field(default_factory=dict)   # the file as loaded (management edits it)
    digest: str | None = None        # sha256 of the file as loaded: hand edits since are detected
    # while the file holds edits a reload could not apply: the running and the
    # file's configuration then, in the file's shape (stml.persist.hold)
    held: tuple[dict[Any, Any], dict[Any, Any]] | None = None
    # SLP also lists targets with an ACL, with who may log in (auth-name) and the CHAP user
    slp_auth: bool = False
    # iSNS also registers targets with an ACL, and all of them behind discovery CHAP (0287)
    isns_auth: bool = False
    # whether a LUN entry without `id` may take the legacy identity of its
    # target and number: only in a file no id-giving STML wrote, whose LUNs
    # were served under it (`legacy_ids = false` once one did; 0281)
    legacy_ids: bool = True
    # the --iqn/--lun flags of the first start that wrote the file: a start
    # with the same flags is a restart, whatever changed since (0282)
    first_start_flags: list[str] | None = None

    def discovery(self) -> dict[str, Any]:
        """Discovery settings for the front ends, as `detect` carries them."""
        return {"chap": self.discovery_chap, "slp": self.slp, "slp_da": self.slp_da, "slp_auth": self.slp_auth,
                "isns_auth": self.isns_auth}


MAX_POLL_US = 10_000


class CurveKey(NamedTuple):
    """An entry of allowed_front_ends / allowed_managers: a public key written
    out (Z85) or the file that holds one (resolved against the config file's
    directory). Which of the two is decided once, where the config is read
    (is_z85_key): whoever reads the key later has another working directory,
    and a file may have come or gone since."""
    text: str
    is_file: bool


@dataclass
class StmlSettings:
    """The `[stml]` table: extra endpoints and how remote peers are admitted."""
    listen: list[str] = field(default_factory=list)      # more endpoints to bind (tcp:// for remote)
    curve_secret_key_file: str | None = None             # the STML's CURVE key pair (secret file)
    allowed_front_ends: list[CurveKey] = field(default_factory=list)   # Z85 public keys or key files
    allowed_managers: list[CurveKey] = field(default_factory=list)     # the same forms: remote management (0242)
    insecure: bool = False           # allow plain TCP (no CURVE), loopback included
    heartbeat_ms: int = 1000
    metrics: str | None = None       # "HOST:PORT": serve Prometheus metrics there
    poll_us: int | None = None       # busy-poll window; None: 0 alone, `run` picks it when it split the CPUs
    # gateways sharing RBD images (stml.gateway): the other gateways' STML
    # endpoints, which this host's front end also lists, and the key pair it
    # proves itself with to them (their STMLs share this one's key pair)
    peers: list[str] = field(default_factory=list)
    front_end_key: str | None = None
    timing: bool = False             # stage timing (stml.timing), as `--timing`

    def endpoints(self, main: str) -> list[str]:
        return [main] + [e for e in self.listen if e != main]


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "scsi-target"


def host_iqn() -> str:
    """The default target's name on this host: its short host name and a
    tag derived from its machine id (keyed, so the id itself is not shown),
    stable across restarts and different between hosts, as LIO's are. A part
    that cannot be had is left out; with neither, the legacy name (0207)."""
    host = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().split(".")[0].lower()).strip("-")
    parts = [host] if host and host != "localhost" else []
    for path in _MACHINE_IDS:
        try:
            with open(path, "rb") as f:
                machine = f.read().strip()
        except OSError:
            continue
        if machine:
            parts.append(hmac.new(machine, b"scsi-target default target", hashlib.sha256).hexdigest()[:8])
            break
    return f"iqn.2026-11.org.scsi-target:{'.'.join(parts)}" if parts else LEGACY_IQN


def default_iqn(data_dir: Path) -> str:
    """The name of the built-in default target: the legacy one in a data dir
    that served it (its `disk0.img`, or reservations kept under that name:
    initiators know the target by it), else this host's (0207). Blocking (stats)."""
    served = (data_dir / "disk0.img").exists() or any(
        p.name.startswith(f"{LEGACY_IQN}_") for p in _listed(data_dir / "pr"))
    return LEGACY_IQN if served else host_iqn()


def _listed(directory: Path) -> list[Path]:
    try:
        return list(directory.iterdir())
    except OSError:   # none yet (or unreadable: the start says so when it needs it)
        return []


def default_endpoint(data_dir: Path) -> str:
    return f"ipc://{data_dir / 'stml.sock'}"


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(where, f"{value!r} is not true or false")
    return value


def lun_options(raw: dict[str, Any], where: str, data_dir: Path, given: bool = True) -> LunOptions:
    """Validate one LUN's settings (from TOML or a parsed spec). `given`: a
    LUN given now (a flag, `lun add`), whose missing file without a size is
    refused here; one of a saved config is served offline instead (0280)."""
    known = {"lun", "backend", "path", "size", "ro", "removable", "block_size", "write_cache", "thin",
             "physical_block_exp", "id", "image_identity", "scheduler", *_CEPH_KEYS}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{where}.{key}", f"unknown setting (known: {', '.join(sorted(known))})")
    kind = raw.get("backend")
    if kind not in ("file", "ram", "rbd"):
        raise ConfigError(f"{where}.backend", f"{kind!r} is not a backend (file, ram, rbd)")
    size = parse_size(raw["size"], f"{where}.size") if "size" in raw else None
    path = raw.get("path")
    if kind == "ram" and size is None:
        raise ConfigError(f"{where}.size", "a ram LUN needs a size")
    if kind == "file":
        if not path or not isinstance(path, str):
            raise ConfigError(f"{where}.path", "a file LUN needs a path")
        path = str(data_dir / path) if not os.path.isabs(path) else path
        if given and size is None and not os.path.exists(path):
            raise ConfigError(f"{where}.path", f"{path} does not exist; give a size to create it")
        if given and size is not None and _block_device(path):   # a saved one is the size served (0284, 0217)
            raise ConfigError(f"{where}.size", f"{path} is a block device, served whole: leave out size "
                              f"(to change it, grow the device, then `lun resize`)")
    ceph = _ceph_options(raw, kind, where)
    if kind == "rbd" and (not isinstance(path, str) or not re.fullmatch(r"[^/\s]+(/[^/\s]+){1,2}", path)):
        raise ConfigError(f"{where}.path", f"{path!r} is not POOL/IMAGE or POOL/NAMESPACE/IMAGE")
    bs = raw.get("block_size", 512)
    if bs not in (512, 4096):
        raise ConfigError(f"{where}.block_size", f"{bs!r} is not 512 or 4096")
    if size is not None and size % bs:
        raise ConfigError(f"{where}.size", f"{size} is not a multiple of the block size {bs}")
    pbe = raw.get("physical_block_exp", 0)
    if not isinstance(pbe, int) or isinstance(pbe, bool) or not 0 <= pbe <= 15:
        raise ConfigError(f"{where}.physical_block_exp", f"{pbe!r} is not 0-15 (log2 of logical blocks per physical block)")
    ident = raw.get("id")
    if ident is not None and (not isinstance(ident, str) or not _LU_ID.fullmatch(ident)):
        raise ConfigError(f"{where}.id", f"{ident!r} is not 32 hexadecimal digits (the LU's identity)")
    image_identity = raw.get("image_identity")
    if image_identity is not None:
        if kind != "rbd":
            raise ConfigError(f"{where}.image_identity", "only an rbd LUN has an image")
        if not isinstance(image_identity, str) or not _LU_ID.fullmatch(image_identity):
            raise ConfigError(f"{where}.image_identity", f"{image_identity!r} is not 32 hexadecimal digits "
                              f"(the identity of the RBD image)")
    scheduler = raw.get("scheduler", DEFAULT_POLICY)
    if not isinstance(scheduler, str) or scheduler not in POLICIES:
        raise ConfigError(f"{where}.scheduler", f"{scheduler!r} is not a task scheduling policy "
                          f"({', '.join(POLICIES)})")
    return LunOptions(kind=kind, size=size, path=path,
                      ro=_bool(raw.get("ro", False), f"{where}.ro"),
                      removable=_bool(raw.get("removable", False), f"{where}.removable"),
                      block_size=bs,
                      write_cache=_bool(raw.get("write_cache", False), f"{where}.write_cache"),
                      thin=_bool(raw.get("thin", True), f"{where}.thin"),
                      physical_block_exp=pbe or None, id=ident.lower() if ident else None,
                      image_identity=image_identity.lower() if image_identity else None,
                      scheduler=scheduler, **ceph)


def _block_device(path: str) -> bool:
    """Blocking (a stat)."""
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


# an rbd LUN's connection settings (LunOptions fields of the same names)
_CEPH_KEYS = ("ceph_conf", "ceph_user", "ceph_keyring")


def _ceph_options(raw: dict[str, Any], kind: str, where: str) -> dict[str, str]:
    given = {k: raw[k] for k in _CEPH_KEYS if k in raw}
    if kind != "rbd" and given:
        raise ConfigError(f"{where}.{next(iter(given))}", "only an rbd LUN connects to Ceph")
    for key, value in given.items():
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}.{key}", f"{value!r} is not a name or a path")
    return given


def _spec_fields(rest: str) -> list[str]:
    """A spec's comma-separated fields: `\\,` is a comma inside one (a path
    `/a,b.img` is written `file:/a\\,b.img`) and `\\\\` a backslash; any other
    backslash is itself (0209)."""
    fields: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(rest):
        ch = rest[i]
        if ch == "\\" and rest[i + 1:i + 2] in (",", "\\"):
            cur.append(rest[i + 1])
            i += 2
            continue
        if ch == ",":
            fields.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    fields.append("".join(cur))
    return fields


def parse_lun_spec(spec: str, where: str = "--lun") -> dict[str, Any]:
    """`ram:256MiB`, `file:PATH`, `file:PATH,size=1GiB,ro,removable,block_size=4096`,
    `...,scheduler=fair`, `rbd:POOL/IMAGE[,conf=PATH,id=USER,keyring=PATH]`;
    `\\,` is a comma in a path or value."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise ConfigError(where, f"{spec!r} is not KIND:ARG[,OPTION...] (e.g. ram:64MiB, file:disk.img,size=1GiB)")
    first, *opts = _spec_fields(rest)
    raw: dict[str, Any] = {"backend": kind}
    if kind == "ram":
        raw["size"] = first
    elif kind in ("file", "rbd"):
        raw["path"] = first
    else:
        raise ConfigError(where, f"{kind!r} is not a backend (file, ram, rbd)")
    flags = {"ro", "removable", "write_cache", "thin", "thick"}
    for opt in opts:
        key, eq, value = opt.partition("=")
        key = {"bs": "block_size", "wc": "write_cache"}.get(key, key)
        if not eq:
            if key not in flags:
                raise ConfigError(where, f"unknown option {opt!r} in {spec!r}")
            raw["thin" if key == "thick" else key] = key != "thick"
        elif key in ("size", "scheduler"):
            raw[key] = value
        elif kind == "rbd" and key in ("conf", "id", "keyring"):
            raw[{"conf": "ceph_conf", "id": "ceph_user", "keyring": "ceph_keyring"}[key]] = value
        elif key in ("block_size", "physical_block_exp"):
            if not value.isdigit():
                raise ConfigError(where, f"{key} {value!r} is not a number")
            raw[key] = int(value)
        else:
            raise ConfigError(where, f"unknown option {key!r} in {spec!r}")
    return raw


def check_iqn(name: Any, where: str) -> str:
    if not isinstance(name, str) or not _IQN.match(name):
        raise ConfigError(where, f"{name!r} is not an iSCSI name (iqn.YYYY-MM.reversed.domain[:id])")
    # initiators keep no longer names (open-iscsi, libiscsi): a longer target is listed but unreachable
    if len(name.encode()) > MAX_ISCSI_NAME:
        raise ConfigError(where, f"{name[:40]}... is {len(name.encode())} bytes long; an iSCSI name is at "
                                 f"most {MAX_ISCSI_NAME} (RFC 7143 4.2.7.1)")
    return name.lower()


def host_memory() -> int:
    """Bytes of physical memory on this host."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def ram_overcommit(total: int) -> str | None:
    """Why RAM LUNs totalling `total` bytes cannot be served, or None. Their
    pages are allocated as initiators write: past the host's memory a write
    gets the STML killed, and every LUN with it (0279)."""
    memory = host_memory()
    if total <= memory:
        return None
    return (f"RAM LUNs would total {total >> 20} MiB, more than this host's memory ({memory >> 20} MiB): "
            f"filling them would get the STML killed; use a file LUN (on tmpfs for RAM speed)")


# mutual CHAP alone authenticates no initiator: a target with only it admitted any
MUTUAL_NEEDS_CHAP = ("needs `chap` too: mutual CHAP is the target proving itself to initiators "
                     "that CHAP authenticated; alone it lets any initiator in")


def parse_chap(raw: Any, where: str) -> dict[str, str] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != {"user", "secret"}:
        raise ConfigError(where, "needs exactly `user` and `secret`")
    if not isinstance(raw["secret"], str) or not 12 <= len(raw["secret"].encode()) <= 255:
        raise ConfigError(f"{where}.secret", "must be 12 to 255 bytes (RFC 7143 12.1.3)")
    return {"user": str(raw["user"]), "secret": raw["secret"]}


def holds_secrets(raw: dict[str, Any]) -> bool:
    """Whether a config's TOML holds CHAP secrets (it must then be mode 0600)."""
    targets = raw.get("target")
    if not isinstance(targets, list):
        targets = []
    return "discovery_chap" in raw or any(
        isinstance(t, dict) and ("chap" in t or "mutual_chap" in t) for t in targets)


def _warn_if_secrets_readable(path: Path, raw: dict[str, Any]) -> None:
    """A config holding CHAP secrets that group or others can read draws a warning."""
    secret = holds_secrets(raw)
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if secret and mode & 0o044:
        import sys
        print(f"scsi-target: warning: {path} holds CHAP secrets and is readable by "
              f"{'group and others' if mode & 0o044 == 0o044 else 'group' if mode & 0o040 else 'others'}"
              f" (mode {mode & 0o777:03o}); chmod 600 it", file=sys.stderr, flush=True)


def load(config_path: str | None = None, data_dir: str | None = None, iqn: str | None = None,
         luns: tuple[str, ...] = (), endpoint: str | None = None,
         portals: tuple[str, ...] = ()) -> Config:
    """The effective config: the file (if any), overridden by command-line flags,
    with defaults for what neither says."""
    raw: dict[str, Any] = {}
    path = None
    if config_path:
        path = Path(config_path).absolute()
        try:
            text = path.read_text()
            raw = tomllib.loads(text)
        except FileNotFoundError:
            raise ConfigError(str(path), "no such file") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(str(path), f"not valid TOML: {e}") from None
        _warn_if_secrets_readable(path, raw)
    known = {"data_dir", "stml_endpoint", "portals", "target", "discovery_chap", "stml", "isns",
             "slp", "slp_da", "slp_auth", "isns_auth", "legacy_ids", "first_start_flags",
             "vhost"}   # [[vhost]]: VM sockets `run` serves (fetd_vhost.cli checks them)
    for key in raw:
        if key not in known:
            raise ConfigError(key, f"unknown setting (known: {', '.join(sorted(known))})")
    ddir = Path(data_dir or raw.get("data_dir") or _own_data_dir(path)).expanduser().absolute()
    targets: list[TargetConfig] = []
    target_keys = {"name", "alias", "acl", "chap", "mutual_chap", "lun", "target_reset",
                   "error_recovery_level", "cmdsn_depth"}
    for i, t in enumerate(raw.get("target", [])):
        where = f"target[{i}]"
        for key in t:
            if key not in target_keys:
                raise ConfigError(f"{where}.{key}", f"unknown setting (known: {', '.join(sorted(target_keys))})")
        name = check_iqn(t.get("name"), f"{where}.name")
        tl = []
        for j, lr in enumerate(t.get("lun", [])):
            lwhere = f"{where}.lun[{j}]"
            number = lr.get("lun", j)
            if not isinstance(number, int) or not 0 <= number < 16384:
                raise ConfigError(f"{lwhere}.lun", f"{number!r} is not a LUN number (0-16383)")
            tl.append(LunConfig(number, lun_options(lr, lwhere, ddir, given=False)))
        acl = t.get("acl", [])
        if not isinstance(acl, list):
            raise ConfigError(f"{where}.acl", "must be a list of initiator names")
        chap = parse_chap(t.get("chap"), f"{where}.chap")
        mutual = parse_chap(t.get("mutual_chap"), f"{where}.mutual_chap")
        if mutual and not chap:
            raise ConfigError(f"{where}.mutual_chap", MUTUAL_NEEDS_CHAP)
        targets.append(TargetConfig(name, tl, str(t.get("alias", "")),
                                    [check_iqn(a, f"{where}.acl") for a in acl], chap, mutual,
                                    _bool(t.get("target_reset", False), f"{where}.target_reset"),
                                    _int_in(t.get("error_recovery_level", 0), 0, 2,
                                            f"{where}.error_recovery_level"),
                                    _int_in(t.get("cmdsn_depth", DEFAULT_CMDSN_DEPTH), 1,
                                            MAX_CMDSN_DEPTH, f"{where}.cmdsn_depth")))
    # no `target` at all: the built-in default; `target = []` (every target removed) is a choice
    if iqn or luns or (not targets and "target" not in raw):
        name = check_iqn(iqn or (targets[0].name if targets else default_iqn(ddir)), "--iqn")
        specs = luns or (f"file:{ddir / 'disk0.img'},size={DEFAULT_SIZE}",)
        tl = [LunConfig(n, lun_options(parse_lun_spec(s), f"--lun {s}", ddir)) for n, s in enumerate(specs)]
        existing = next((t for t in targets if t.name == name), None)
        if existing:
            existing.luns = tl
        else:
            targets.insert(0, TargetConfig(name, tl))
    names = [t.name for t in targets]
    for t in targets:
        if names.count(t.name) > 1:
            raise ConfigError("target", f"{t.name} is defined twice")
        numbers = [lc.lun for lc in t.luns]
        twice = sorted(n for n, k in collections.Counter(numbers).items() if k > 1)
        if twice:
            raise ConfigError(f"target {t.name}", f"LUN {twice[0]} is defined twice")
    why = ram_overcommit(sum(lc.options.size or 0 for t in targets for lc in t.luns if lc.options.kind == "ram"))
    if why:
        raise ConfigError("target", why)
    # one store, one LU: two would be two disks on one medium (0277); two
    # handles of one RBD image in one STML would also contend for its lock
    stores: dict[Any, str] = {}
    for t in targets:
        for lc in t.luns:
            store = lc.options.store()
            if store is None:
                continue
            here = f"target {t.name} LUN {lc.lun}"
            if store in stores:
                raise ConfigError(f"{here} path", f"{lc.options.path} backs two LUNs: "
                                                  f"it is the store of {stores[store]} already")
            stores[store] = here
    owners: dict[str, str] = {}
    for t in targets:
        for lc in t.luns:
            ident = lc.options.id
            if ident is None:
                continue
            if ident in owners:
                raise ConfigError(f"target {t.name} LUN {lc.lun} id",
                                  f"{ident} is already the id of {owners[ident]} (an id names one LU)")
            owners[ident] = f"target {t.name} LUN {lc.lun}"
    ep = endpoint or raw.get("stml_endpoint") or default_endpoint(ddir)
    if not re.match(r"^(ipc|tcp)://.+", ep):
        raise ConfigError("stml_endpoint", f"{ep!r} is not ipc://PATH or tcp://HOST:PORT")
    # an empty list is a choice (no portal: `portal remove` of the last one), not a gap
    plist = list(portals) or (raw["portals"] if "portals" in raw else [DEFAULT_PORTAL])
    if not isinstance(plist, list) or not all(isinstance(p, str) for p in plist):
        raise ConfigError("portals", "must be a list of \"HOST:PORT\" strings")
    from scsi_runtime.portals import parse_portal
    for p in plist:
        try:
            parse_portal(p)
        except ValueError as e:
            raise ConfigError("portals", str(e)) from None
    isns = raw.get("isns")
    if isns is not None and (not isinstance(isns, str) or not re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^:\[\]]+)(:\d+)?", isns)):
        raise ConfigError("isns", f"{isns!r} is not \"HOST:PORT\"")
    slp_da = raw.get("slp_da", [])
    if not isinstance(slp_da, list) or not all(
            isinstance(d, str) and re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^:\[\]]+)(:\d+)?", d) for d in slp_da):
        raise ConfigError("slp_da", "must be a list of \"HOST[:PORT]\" directory agents")
    slp_auth, isns_auth = (raw.get(key, False) for key in ("slp_auth", "isns_auth"))
    for key, value in (("slp_auth", slp_auth), ("isns_auth", isns_auth)):
        if not isinstance(value, bool):
            raise ConfigError(key, f"{value!r} is not true or false")
    seed = raw.get("first_start_flags")
    if seed is not None and (not isinstance(seed, list) or not all(isinstance(a, str) for a in seed)):
        raise ConfigError("first_start_flags", "must be a list of strings (the flags of the first start)")
    return Config(ddir, targets, ep, plist, parse_chap(raw.get("discovery_chap"), "discovery_chap"), path,
                  stml_settings(raw.get("stml", {}), path), isns, _slp(raw.get("slp")), slp_da, raw,
                  file_digest(path) if path else None, slp_auth=slp_auth, isns_auth=isns_auth,
                  legacy_ids=_bool(raw.get("legacy_ids", True), "legacy_ids"), first_start_flags=seed)


_SLP_SCOPE = re.compile(r"[^(),\\!<=>~;*+\x00-\x1f]{1,255}")   # RFC 2608 2.1: no reserved characters


def _slp(raw: Any) -> list[str] | None:
    """`slp = true` (scope DEFAULT), `false`, or a list of scopes."""
    if raw is None or raw is False:
        return None
    if raw is True:
        return ["DEFAULT"]
    if not isinstance(raw, list) or not raw or not all(isinstance(x, str) and _SLP_SCOPE.fullmatch(x)
                                                       for x in raw):
        raise ConfigError("slp", f"{raw!r} is not true, false or a list of SLP scope names")
    return list(raw)


def _int_in(value: Any, lo: int, hi: int, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(where, f"{value!r} is not a whole number from {lo} to {hi}")
    return value


def _own_data_dir(path: Path | None) -> Path:
    """A data dir's own file (CONFIG_NAME) leaves `data_dir` out, so the dir can
    move: it names the directory it sits in. Other files default to the XDG dir."""
    if path is not None and path.name == CONFIG_NAME:
        return path.parent
    return default_data_dir()


def data_dir_of(config_path: str | None, data_dir: str | None) -> Path:
    """The data dir a start with these flags serves, known before its config
    file is written (`run` locks it first)."""
    if data_dir:
        return Path(data_dir).expanduser().absolute()
    if config_path and os.path.exists(config_path):
        return load(config_path).data_dir
    return default_data_dir()


def check_data_dir(ddir: Path) -> None:
    """The data dir exists (made if not), takes files, and is ours alone to
    write: whoever else can write in it can plant the config, a LUN's file (a
    symlink to a disk) or the sockets before we do. Else StartupError (one
    line, exit 2). `run` and a standalone `stml` check it before they read or
    write anything there."""
    try:
        ddir.mkdir(mode=0o700, parents=True, exist_ok=True)
        probe = ddir / f".write-test.{os.getpid()}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.close(fd)
        os.unlink(probe)
        st = ddir.stat()
    except OSError as e:
        raise StartupError(f"data dir {ddir}", f"not usable: {e.strerror or e}") from None
    if st.st_uid not in (os.geteuid(), 0):
        raise StartupError(f"data dir {ddir}", f"owned by uid {st.st_uid}, who can replace what is in it: "
                           f"use a directory of your own")
    if st.st_mode & 0o022:
        who = "group and others" if st.st_mode & 0o022 == 0o022 else "group" if st.st_mode & 0o020 else "others"
        raise StartupError(f"data dir {ddir}", f"writable by {who} (mode {st.st_mode & 0o777:03o}), who could "
                           f"plant its config, LUN files or sockets: chmod go-w it")


def file_digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def _key_path(value: str, config_path: Path | None) -> str:
    """Key files named relative to the config file's directory."""
    if os.path.isabs(value) or config_path is None:
        return os.path.abspath(value)
    return str(config_path.parent / value)


# ZeroMQ's Z85 alphabet (RFC 32): "/" is one of its characters
_Z85 = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#")


def is_z85_key(value: str, path: str | None = None) -> bool:
    """A CURVE public key written out (40 Z85 characters), not a key file's
    name. A key may hold "/", so a value that could be either is the file
    when one exists at `path` (the value resolved; the value itself by default)."""
    return len(value) == 40 and _Z85.issuperset(value) and not value.endswith((".key", ".key_secret")) \
        and not os.path.exists(value if path is None else path)


def stml_settings(raw: Any, config_path: Path | None) -> StmlSettings:
    if not isinstance(raw, dict):
        raise ConfigError("stml", "must be a table")
    known = {"listen", "curve_secret_key_file", "allowed_front_ends", "allowed_managers", "insecure",
             "heartbeat_ms", "metrics", "poll_us", "peers", "front_end_key", "timing"}
    for key in raw:
        if key not in known:
            raise ConfigError(f"stml.{key}", f"unknown setting (known: {', '.join(sorted(known))})")
    listen = raw.get("listen", [])
    if not isinstance(listen, list) or not all(isinstance(e, str) and re.match(r"^(ipc|tcp)://.+", e)
                                               for e in listen):
        raise ConfigError("stml.listen", "must be a list of ipc://PATH or tcp://HOST:PORT endpoints")
    secret = raw.get("curve_secret_key_file")
    if secret is not None:
        if not isinstance(secret, str):
            raise ConfigError("stml.curve_secret_key_file", "must be a file name")
        secret = _key_path(secret, config_path)
    allowed, managers = (_key_list(raw, key, config_path) for key in ("allowed_front_ends", "allowed_managers"))
    hb = raw.get("heartbeat_ms", 1000)
    if not isinstance(hb, int) or not 50 <= hb <= 60000:
        raise ConfigError("stml.heartbeat_ms", f"{hb!r} is not a number of milliseconds (50-60000)")
    metrics = raw.get("metrics")
    if metrics is not None and not isinstance(metrics, str):
        raise ConfigError("stml.metrics", "must be \"HOST:PORT\"")
    poll_us = raw.get("poll_us")
    if poll_us is not None and (not isinstance(poll_us, int) or isinstance(poll_us, bool)
                                or not 0 <= poll_us <= MAX_POLL_US):
        raise ConfigError("stml.poll_us", f"{poll_us!r} is not a number of microseconds (0-{MAX_POLL_US})")
    peers = raw.get("peers", [])
    if not isinstance(peers, list) or not all(isinstance(e, str) and re.match(r"^tcp://.+", e) for e in peers):
        raise ConfigError("stml.peers", "must be a list of the other gateways' tcp://HOST:PORT STML endpoints")
    fe_key = raw.get("front_end_key")
    if fe_key is not None:
        if not isinstance(fe_key, str):
            raise ConfigError("stml.front_end_key", "must be a key file")
        fe_key = _key_path(fe_key, config_path)
    return StmlSettings(listen, secret, allowed, managers, _bool(raw.get("insecure", False), "stml.insecure"),
                        hb, metrics, poll_us, peers, fe_key,
                        _bool(raw.get("timing", False), "stml.timing"))


def _key_list(raw: dict[str, Any], key: str, config_path: Path | None) -> list[CurveKey]:
    """allowed_front_ends / allowed_managers: Z85 keys as they are, key files
    relative to the config file. (A key in both lists is refused when the
    files are read, stml.roles: two names may hold one key.)"""
    keys = raw.get(key, [])
    if not isinstance(keys, list) or not all(isinstance(a, str) for a in keys):
        raise ConfigError(f"stml.{key}", "must be a list of public keys (Z85) or key files")
    paths = [_key_path(a, config_path) for a in keys]
    return [CurveKey(a, False) if is_z85_key(a, p) else CurveKey(p, True) for a, p in zip(keys, paths)]


class StartupError(ConfigError):
    """The data dir or a file the start needs cannot be used: one line, exit 2."""


def first_identity(data_dir: Path, target: str, lc: LunConfig) -> str:
    """The id a LUN's first save gives it. A LUN served before this data dir had
    a config file (its backing file exists, or its persistent reservations
    file does) keeps the identity its NAA and serial came from (legacy_id):
    an upgrade must not rename disks that multipath and udev know. So does a
    file LUN whose file is missing and has no size to be created with: it is
    not new, but a disk not mounted now (0281). A LUN first served now gets
    a random one (docs/decisions/0230). Blocking (stats)."""
    from stml.pr import state_path
    o = lc.options
    existed = (o.kind == "file" and o.path is not None and (os.path.exists(o.path) or o.size is None)) \
        or state_path(data_dir, target, lc.lun).exists()
    return legacy_id(target, lc.lun) if existed else secrets.token_hex(16)


def check_lun_paths(config: Config) -> None:
    """A file LUN a first start creates needs its directory: said before
    anything starts, in one line, rather than by the STML once it runs. (A
    saved config's LUN is served offline instead, 0280.)"""
    for t in config.targets:
        for lc in t.luns:
            o = lc.options
            if o.kind == "file" and o.path and not os.path.exists(o.path):
                parent = Path(o.path).parent
                if parent != config.data_dir and not parent.is_dir():
                    raise StartupError(f"target {t.name} LUN {lc.lun}",
                                       f"cannot create {o.path}: directory {parent} does not exist")


def describe_lun(o: LunOptions | None) -> str:
    if o is None:
        return "none"
    what = f"{o.kind} {size_text(o.size) if o.size else ''}".rstrip() if o.kind == "ram" else f"{o.kind} {o.path}"
    return what + (" (read-only)" if o.ro else "")


def _same_lun(flag: LunOptions, have: LunOptions) -> bool:
    """A --lun that repeats what the file says (its identity aside)."""
    for f in dataclasses.fields(LunOptions):
        a, b = getattr(flag, f.name), getattr(have, f.name)
        if f.name == "id" or f.name in RECORDED or a == b:
            continue
        if f.name == "size" and a is None:
            continue
        if f.name == "size" and b is None and have.path and os.path.exists(have.path):
            if os.path.getsize(have.path) == a:
                continue
        return False
    return True


def check_flags_agree(config: Config, iqn: str | None, luns: tuple[str, ...]) -> None:
    name = check_iqn(iqn, "--iqn") if iqn else config.targets[0].name
    t = next((t for t in config.targets if t.name == name), None)
    if t is None:
        raise ConfigError("--iqn", f"{name} is not a target of {config.path}, which defines the targets "
                          f"once it exists: add it with `scsi-target target add {name}`")
    have = {lc.lun: lc.options for lc in t.luns}
    for n, spec in enumerate(luns):
        # (a flag that repeats the file's LUN: its file may be missing now, as the file's may)
        o = lun_options(parse_lun_spec(spec), f"--lun {spec}", config.data_dir, given=False)
        if n not in have or not _same_lun(o, have[n]):
            raise ConfigError(f"--lun {spec}", f"{config.path} already defines the LUNs (LUN {n} of {name}: "
                              f"{describe_lun(have.get(n))}); start without --lun to serve it, or change "
                              f"LUNs with `scsi-target lun add|remove|resize`")
