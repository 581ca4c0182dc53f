"""The running configuration as TOML: what every save writes, and how it goes
into the file without losing what an administrator wrote there.

A save always records the whole running configuration (portals, every
target with its settings, every LUN), built generically from the Config
model's dataclass fields, so a setting added to TargetConfig or LunOptions
is saved without a change here. It is written by editing the parsed file in
place with tomlkit: keys that did not change keep their spelling ("16MiB"
stays "16MiB"), comments and key order survive, and keys this module does
not model (data_dir, [stml], a key a newer version added) are left alone.
While the file holds edits a reload could not apply, a save keeps them
(merge3, docs/decisions/0231).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import secrets
import stat
from pathlib import Path
from typing import Any, Callable

import tomlkit
from tomlkit.items import AoT, Array, Comment, Null, Table, Whitespace

from scsi_runtime.files import atomic_write
from stml.config import (CONFIG_NAME, Config, ConfigError, LunConfig, StartupError, TargetConfig, check_flags_agree,
                         check_lun_paths, default_data_dir, first_identity, holds_secrets, load, parse_size,
                         size_text)
from stml.lu import CannotOpen, LunOptions, legacy_id, open_store

HEADER = """\
# scsi-target configuration. `scsi-target run` wrote it on first start, and every
# management change (lun add, acl add, portal add, ...) saves the whole running
# configuration here. Edit it by hand if you like: comments and key order are kept.
# Apply an edit to the running target with `scsi-target config reload` (or SIGHUP).
"""

# above `first_start_flags`, written by a first start given --iqn/--lun (0282)
FIRST_START_NOTE = "the flags that wrote this file: `run` with the same flags serves it as it is now"
# beside `legacy_ids = false`, which every save writes (docs/decisions/0281)
LEGACY_IDS_NOTE = "a LUN entry without `id` is a new disk: the STML gives it one"
Tree = dict[Any, Any]   # the file's shape: tables by key, leaves (value, default) as _sync_keys takes them
_LUN_KEYS = {"kind": "backend"}          # LunOptions field -> TOML key, where they differ


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _rel(path: str, data_dir: Path) -> str:
    """Paths under the data dir are written relative to it (it can move)."""
    try:
        return str(Path(path).relative_to(data_dir))
    except ValueError:
        return path


def lun_table(lc: LunConfig, data_dir: Path) -> dict[str, tuple[Any, Any]]:
    """key -> (running value, default) of one LUN; None: the key is absent."""
    out: dict[str, tuple[Any, Any]] = {"lun": (lc.lun, dataclasses.MISSING)}
    for f in dataclasses.fields(LunOptions):
        v = getattr(lc.options, f.name)
        if f.name == "path" and v:
            v = _rel(v, data_dir)
        elif f.name == "size" and v:
            v = size_text(v)
        out[_LUN_KEYS.get(f.name, f.name)] = (v, _default(f))
    return out


def target_table(tc: TargetConfig) -> dict[str, tuple[Any, Any]]:
    """key -> (running value, default) of one target, LUNs aside."""
    return {f.name: (getattr(tc, f.name), _default(f)) for f in dataclasses.fields(TargetConfig)
            if f.name != "luns"}


def _same(key: str, old: Any, new: Any, data_dir: Path) -> bool:
    """Whether the file's value means the running one ("16MiB" == 16777216)."""
    if old == new:
        return True
    try:
        if key == "size":
            return parse_size(old, key) == parse_size(new, key)
        if key == "path":
            return os.path.join(data_dir, str(old)) == os.path.join(data_dir, str(new))
        if key == "name":
            return str(old).lower() == str(new).lower()
        if key == "acl":
            return [str(a).lower() for a in old] == [str(a).lower() for a in new]
    except (ConfigError, TypeError):
        return False
    return False


def _item(v: Any) -> Any:
    """Tables inside a [[target]] are written inline: a `[target.chap]` header
    placed after the LUN tables would not read well."""
    if isinstance(v, dict):
        t = tomlkit.inline_table()
        t.update(v)
        return t
    return v


def _new_table() -> Any:
    """A table to append to an array of tables, a blank line before it."""
    t = tomlkit.table()
    t.trivia.indent = "\n"
    return t


def _sync_keys(table: Any, want: dict[str, tuple[Any, Any]], data_dir: Path) -> None:
    for key, (v, default) in want.items():
        present = key in table
        if v is None or (default is not dataclasses.MISSING and v == default):
            # the default applies: an explicit `ro = false` stays, a stale value goes
            if present and not _same(key, _plain(table[key]), v if v is not None else default, data_dir):
                del table[key]
        elif not present:
            _add_key(table, key, _item(v))
        elif not _same(key, _plain(table[key]), v, data_dir) and not _edit_list(table[key], v):
            table[key] = _item(v)


# Comments belong to what follows them, but tomlkit keeps the comment lines
# before a table header (`# LUN 1: logs` above `[[target.lun]]`) at the end
# of the table before it. So a key is added before those lines, and removing
# a table of an array hands the lines that preceded it over to the lines that
# preceded the next one (0274).

def _body(table: Any) -> list[tuple[Any, Any]]:
    return table.body if hasattr(table, "body") else table.value.body


def _tail(table: Any) -> list[tuple[Any, Any]]:
    """The body the lines after `table` end: its own, or, when it ends with
    tables of its own (a target's LUNs), its last one's."""
    body = _body(table)
    last = next((item for k, item in reversed(body) if not isinstance(item, Null)), None)
    if isinstance(last, AoT) and len(last):
        return _tail(last[-1])
    return body


def _comment_run(body: list[tuple[Any, Any]], end: int) -> tuple[int, str]:
    """The comment and blank lines just before body[end]: (where they start, their text)."""
    start = end
    while start > 0 and body[start - 1][0] is None and isinstance(body[start - 1][1], (Comment, Whitespace, Null)):
        start -= 1
    return start, "".join(item.as_string() for _, item in body[start:end] if not isinstance(item, Null))


def _first_table(body: list[tuple[Any, Any]]) -> int:
    return next((i for i, (k, item) in enumerate(body) if k is not None and isinstance(item, (Table, AoT))),
                len(body))


def _add_key(table: Any, key: str, item: Any) -> None:
    """A new key, after the table's keys but before the comment lines that
    end it (they describe the table header that follows)."""
    body = _body(table)
    start, text = _comment_run(body, _first_table(body))
    if not text.strip() or start == 0 or start == len(body):
        table[key] = item
    else:
        (table if hasattr(table, "body") else table.value)._insert_at(start, key, item)


def _replace_comments(body: list[tuple[Any, Any]], end: int, text: str) -> bool:
    """Make the comment lines before body[end] say `text`: they go, and
    `text` follows the key before them. False when there is none."""
    start, _ = _comment_run(body, end)
    item = body[start - 1][1] if start else None
    if item is None or isinstance(item, (Table, AoT)) or not hasattr(item, "trivia"):
        return False    # nothing to hang the text on: the lines stay as they were
    for i in range(start, end):
        body[i] = (None, Null())
    trail = item.trivia.trail
    item.trivia.trail = (trail if trail.endswith("\n") else trail + "\n") + text
    return True


def _drop_entry(container: Any, key: str, aot: Any, i: int) -> None:
    """Remove aot[i], the comment lines before it replaced by those before
    the next entry (or after the array)."""
    body = _tail(aot[i])
    _, text = _comment_run(body, len(body))
    if i > 0:
        before = _tail(aot[i - 1])
        _replace_comments(before, len(before), text)
    else:
        outer = _body(container)
        where = next((j for j, (k, _) in enumerate(outer) if k is not None and k.key == key), None)
        if where is not None:
            _replace_comments(outer, where, text)
    del aot[i]


def _edit_list(old: Any, new: Any) -> bool:
    """Edit a list of strings in place (an ACL: each line keeps its comment):
    drop what went, append what came. False when that would not give `new`'s
    order (then the caller writes it anew)."""
    if not isinstance(old, Array) or not isinstance(new, list) or not all(isinstance(a, str) for a in new):
        return False
    want = [a.lower() for a in new]
    keep = [str(a).lower() for a in old if str(a).lower() in want]
    if keep != want[:len(keep)]:
        return False
    for i in reversed(range(len(old))):
        if str(old[i]).lower() not in want:
            del old[i]
    for a in new[len(keep):]:
        old.append(a)
    return True


def _plain(item: Any) -> Any:
    return item.unwrap() if hasattr(item, "unwrap") else item


def _lun_number(entry: Any, index: int) -> Any:
    return _plain(entry.get("lun", index))


def _sync_aot(container: Any, key: str, wanted: dict[Any, Any], ident: Callable[[Any, int], Any],
              sync: Callable[[Any, Any], None], empty: Any) -> None:
    """Make the array of tables `container[key]` hold one entry per item of
    `wanted` (by identity), editing kept entries in place and appending new
    ones. tomlkit turns an emptied array of tables into an inline array that
    cannot take tables again, so an array that would be emptied is replaced
    by a fresh one (or by `empty`, when nothing is wanted: None drops the key)."""
    aot = container.get(key)
    if aot is not None and not isinstance(aot, AoT):   # e.g. `target = []`
        del container[key]
        aot = None
    kept: dict[Any, Any] = {}
    if aot is not None:
        idents = [ident(e, i) for i, e in enumerate(aot)]
        keep = [i for i, x in enumerate(idents) if x in wanted and idents.index(x) == i]
        if not keep:
            # its first entry's lines go with it; the lines after the array (the next
            # table's) take their place (0274)
            for i in reversed(range(1, len(aot))):
                _drop_entry(container, key, aot, i)
            _drop_entry(container, key, aot, 0)
            del container[key]
            aot = None
        else:
            for i in reversed(range(len(aot))):
                if i not in keep:
                    _drop_entry(container, key, aot, i)
            for i, entry in zip(keep, aot):
                kept[idents[i]] = entry
    for x, entry in kept.items():
        sync(entry, wanted[x])
    new = []
    for x, item in wanted.items():
        if x not in kept:
            entry = _new_table()
            sync(entry, item)
            new.append(entry)
    if aot is None:
        if new:
            fresh = tomlkit.aot()
            for entry in new:
                fresh.append(entry)
            container[key] = fresh
        elif empty is not None:
            container[key] = empty
    else:
        for entry in new:   # the lines after the array stay after it
            last = _tail(aot[-1])
            _, text = _comment_run(last, len(last))
            aot.append(entry)
            if text.strip() and _replace_comments(last, len(last), ""):
                _replace_comments(_tail(entry), len(_tail(entry)), text)


def _sync_luns(table: Any, luns: dict[int, Tree], data_dir: Path) -> None:
    def sync(entry: Any, lun: Tree) -> None:
        if "lun" not in entry:      # removals shift the positions implicit numbers come from
            entry["lun"] = lun["lun"][0]
        _sync_keys(entry, lun, data_dir)
    _sync_aot(table, "lun", luns, _lun_number, sync, None)


def model(config: Config) -> Tree:
    """The running configuration in the file's shape: targets by name, their
    LUNs by number (a copy: later changes do not reach it)."""
    def values(table: dict[str, tuple[Any, Any]]) -> Tree:
        return {k: (copy.deepcopy(v), default) for k, (v, default) in table.items()}
    return {
        "portals": (list(config.portals), dataclasses.MISSING),
        "legacy_ids": (config.legacy_ids, True),
        "discovery_chap": (copy.deepcopy(config.discovery_chap), None),
        "target": {t.name: {**values(target_table(t)),
                            "lun": {lc.lun: lun_table(lc, config.data_dir) for lc in t.luns}}
                   for t in config.targets}}


_ABSENT = object()


def merge3(base: Any, file: Any, running: Any) -> Any:
    """What a save writes while the file holds edits a reload could not apply
    (docs/decisions/0231): where the running configuration did not change
    since that reload (`base`), the file's value, edit and all; where it did,
    the running one. Tables merge key by key; _ABSENT is a missing key."""
    if running == base:
        return file
    if isinstance(running, dict) and isinstance(base, dict) and isinstance(file, dict):
        out = {}
        for key in [*file, *(k for k in running if k not in file)]:
            value = merge3(base.get(key, _ABSENT), file.get(key, _ABSENT), running.get(key, _ABSENT))
            if value is not _ABSENT:
                out[key] = value
        return out
    return running


def sync_document(doc: Any, tree: Tree, data_dir: Path) -> None:
    """Make `doc` (a parsed file) say what `tree` holds, editing it in place."""
    portals, want = doc.get("portals"), tree["portals"][0]
    if portals is None:
        _add_key(doc, "portals", want)   # above the note of the table that follows
    elif _plain(portals) != want and not _edit_list(portals, want):
        doc["portals"] = list(want)      # (in place: each portal keeps its comment)
    _sync_keys(doc, {"discovery_chap": tree["discovery_chap"]}, data_dir)
    if not tree["legacy_ids"][0] and "legacy_ids" not in doc:
        item = tomlkit.item(False).comment(LEGACY_IDS_NOTE)
        item.trivia.comment_ws = "  "
        _add_key(doc, "legacy_ids", item)
    else:
        _sync_keys(doc, {"legacy_ids": tree["legacy_ids"]}, data_dir)

    def sync(entry: Any, target: Tree) -> None:
        if "name" not in entry:
            entry["name"] = target["name"][0]
        _sync_keys(entry, {k: v for k, v in target.items() if k != "lun"}, data_dir)
        _sync_luns(entry, target["lun"], data_dir)
    # no targets is written as `target = []`: without the key the built-in default would serve
    _sync_aot(doc, "target", tree["target"], lambda e, i: str(_plain(e.get("name", ""))).lower(), sync,
              tomlkit.array())


def render(config: Config, doc: Any | None = None) -> str:
    """The running configuration as the file would hold it (`config show`):
    written into a copy of `doc` when given, else into a fresh document."""
    doc = tomlkit.parse(tomlkit.dumps(doc)) if doc is not None else new_document(config)
    sync_document(doc, model(config), config.data_dir)
    return tomlkit.dumps(doc)


HIDDEN = "(hidden)"
SECRET_DIFFERS = "a CHAP secret differs between the file and the running configuration (not shown)\n"


def hide_secrets(text: str) -> str:
    """A config's text with every CHAP secret replaced by HIDDEN: `config
    show` and `config diff` print the configuration to whoever manages the
    target, and secrets are never shown (the file, mode 0600, keeps them)."""
    doc = tomlkit.parse(text)
    targets = doc.get("target")
    tables = [doc.get("discovery_chap"), *(t.get(k) for t in (targets if isinstance(targets, list) else [])
                                           if isinstance(t, dict) for k in ("chap", "mutual_chap"))]
    for table in tables:
        if isinstance(table, dict) and "secret" in table:
            table["secret"] = HIDDEN
    return tomlkit.dumps(doc)


def new_document(config: Config, path: Path | None = None) -> Any:
    """A fresh file (at `path`, default the config's own): the header, and
    the settings outside the running model a start needs to find the same
    target again (the data dir, when the file is not in it; the endpoint)."""
    doc = tomlkit.document()
    for line in HEADER.splitlines():
        doc.add(tomlkit.comment(line.lstrip("# ")))
    doc.add(tomlkit.nl())
    path = path or config.path
    if path is not None and path != config.data_dir / CONFIG_NAME:   # its own file names it (config.load)
        doc["data_dir"] = str(config.data_dir)
    if config.stml_endpoint != f"ipc://{config.data_dir / 'stml.sock'}":
        doc["stml_endpoint"] = config.stml_endpoint
    doc["portals"] = list(config.portals)
    if config.first_start_flags:
        doc.add(tomlkit.comment(FIRST_START_NOTE))
        doc["first_start_flags"] = list(config.first_start_flags)
    return doc


def name_data_dir(path: Path, data_dir: Path) -> bool:
    """Record `data_dir` in the file a start serves from another data dir
    (`run --config F --data-dir D`, F naming none), so F alone finds the
    target again: `status --config F`, `lun add --config F` (decision 0215;
    0233 names it in a file written anew). True when written."""
    if path == data_dir / CONFIG_NAME:
        return False       # its own file: its directory is its data dir (0233)
    doc = read_document(path)
    if doc is None or "data_dir" in doc:
        return False
    body = tomlkit.document()
    body["data_dir"] = str(data_dir)
    atomic_write(path, (tomlkit.dumps(body) + tomlkit.dumps(doc)).encode(), holds_secrets(doc.unwrap()))
    return True


def read_document(path: Path) -> Any:
    try:
        return tomlkit.parse(path.read_text())
    except FileNotFoundError:
        return None
    except tomlkit.exceptions.ParseError as e:
        raise ConfigError(str(path), f"not valid TOML: {e}") from None


class EditedError(Exception):
    """The file changed on disk since it was loaded or last saved."""


def save(config: Config, path: Path | None = None) -> Path:
    """Write the whole running configuration to `path` (default: the config's
    own file), atomically, keeping the file's comments. The config's own file
    is not overwritten when it was edited by hand since it was loaded or last
    saved: the edit would be lost (EditedError; `config reload` applies it).
    Edits a reload left unapplied (config.held) stay in the own file."""
    target = path or config.path
    assert target is not None   # callers pass a path when the config has none
    own = config.path is not None and target == config.path
    text_now = _read_text(target)
    if own and text_now is not None and config.digest is not None and digest(text_now) != config.digest:
        raise EditedError(f"{target} was edited since the STML loaded it")
    doc = tomlkit.parse(text_now) if text_now is not None else new_document(config, target)
    running = model(config)
    tree = merge3(*config.held, running) if own and config.held is not None else running
    sync_document(doc, tree, config.data_dir)
    text = tomlkit.dumps(doc)
    atomic_write(target, text.encode(), holds_secrets(doc.unwrap()))
    if own:
        config.digest = digest(text)
        hold(config, tree)
    return target


def hold(config: Config, file: Tree) -> None:
    """The own file now says `file`: what of it differs from the running
    configuration is held there (a reload could not apply it) until a
    restart, a forced save, or changes that make the two agree."""
    running = model(config)
    config.held = None if file == running else (running, file)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def load_or_create(config_path: str | None = None, data_dir: str | None = None, iqn: str | None = None,
                   luns: tuple[str, ...] = (), endpoint: str | None = None,
                   portals: tuple[str, ...] = ()) -> Config:
    """The config a starting STML serves, whose file always exists: --config,
    else DATA_DIR/scsi-target.toml. A missing file is written with what this
    start runs (the built-in default, or what the flags say), each LUN with an
    identity of its own. Once a file defines targets it wins: --iqn/--lun must
    agree with it, so a restart with the same command line works, and anything
    else is refused with a pointer to `lun add` (docs/decisions/0200)."""
    if config_path is None:
        ddir = Path(data_dir).expanduser().absolute() if data_dir else default_data_dir()
        path = ddir / CONFIG_NAME
    else:
        path = Path(config_path).expanduser().absolute()
    flags = [*(["--iqn", iqn] if iqn else []), *(a for spec in luns for a in ("--lun", spec))]
    if path.exists():
        config = load(str(path), data_dir, None, (), endpoint, portals)
        if not flags or flags == config.first_start_flags:
            return config      # (the flags that wrote it: a restart, after any changes since)
        if not config.raw.get("target"):    # the file names no target: the flags define them
            return load(str(path), data_dir, iqn, luns, endpoint, portals)
        check_flags_agree(config, iqn, luns)
        return config
    config = load(None, data_dir, iqn, luns, endpoint, portals)
    config.path = path
    config.first_start_flags = flags or None
    check_lun_paths(config)     # a first start that cannot serve writes no file
    for t in config.targets:        # LUNs first served now: an identity of their own
        for lc in t.luns:           # (an RBD LU's is its image's: the same on every gateway)
            if not lc.options.id and lc.options.kind != "rbd":
                lc.options.id = first_identity(config.data_dir, t.name, lc)
    config.legacy_ids = False   # every LUN now has its id: one added later without is new
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _open_files(config)
        save(config, path)
    except OSError as e:
        raise StartupError(f"cannot write {path}", e.strerror or str(e)) from None
    return load(str(path), data_dir, None, (), endpoint, portals)


def give_ids(config: Config) -> bool:
    """Give every LUN entry without `id` (added by hand) one, as `lun add`
    does: its designators then name this disk only, and 0280's "a file
    served before is never created blank" covers it. In a file no id-giving
    STML wrote yet (no `legacy_ids = false`: an upgrade), its LUNs were
    served under the legacy identity of their target and number, which they
    keep (first_identity); in one it wrote, an entry without `id` was added
    since, and a disk added at a number another had before gets an identity
    of its own. A new LUN's missing file with a size is created first (the
    id says "served"); one that cannot be created, and a new entry's missing
    file without a size, are left without an id (served offline; the reload
    that opens it gives it one). A served one's missing file is never created
    (0280). RBD LUNs take theirs from the image. True when the file must be
    saved. Blocking (stats, creates): at the STML's start, before it serves
    (docs/decisions/0281)."""
    changed = config.legacy_ids
    for t in config.targets:
        for lc in t.luns:
            o = lc.options
            if o.id or o.kind == "rbd":
                continue
            legacy = legacy_id(t.name, lc.lun)
            served = config.legacy_ids and first_identity(config.data_dir, t.name, lc) == legacy
            if o.kind == "file" and o.path is not None and not served and not os.path.exists(o.path):
                if o.size is None:
                    continue    # a new disk whose file is not there: its id once it opens
                try:
                    open_store(o, create=True).close()
                except CannotOpen:
                    continue    # build_targets says why, and serves it offline
            # derived once the file exists (its inode is part of it): the same at the
            # next start, should this one's save fail
            o.id = legacy if served else new_id(t.name, lc.lun, o)
            changed = True
    config.legacy_ids = False
    return changed


def new_id(target: str, lun: int, o: LunOptions) -> str:
    """A hand-added disk's id. Saved, it is the LU's for good; derived from
    its target, number, path and (a file) inode, a config file the STML
    cannot keep it in (mode 0444, or rewritten from a template by
    configuration management) still gives the same disk the same identity at
    every start, and another file, even at that path, another one. A RAM
    LUN's contents do not outlive the STML: each is a new disk. Blocking (a
    stat)."""
    if o.kind == "ram" or o.path is None:
        return secrets.token_hex(16)
    try:
        st = os.stat(o.path)
        inode = st.st_ino if stat.S_ISREG(st.st_mode) else 0
    except OSError:
        inode = 0
    return hashlib.sha256(f"{target}\0{lun}\0{o.kind}\0{o.path}\0{inode}".encode()).hexdigest()[:32]


def _open_files(config: Config) -> None:
    """A first start opens its file and RBD LUNs, creating missing files, before
    the config that gives them ids: a saved LUN with an id was served, so its
    missing file is a disk lost or not mounted, which the STML never creates
    anew (0280). A LUN that cannot be served (a file that cannot be created,
    a directory, /dev/zero, a mounted block device, an image, pool, user or
    ceph.conf that is not there) fails this start, in one line, while the
    admin is at the terminal: served offline, its typo would be saved as a
    LUN (0272)."""
    for t in config.targets:
        for lc in t.luns:
            o = lc.options
            if o.kind not in ("file", "rbd") or o.path is None:
                continue
            try:
                open_store(o, create=True).close()
            except CannotOpen as e:
                raise StartupError(f"target {t.name} LUN {lc.lun}", str(e)) from None
