"""The contract's vocabulary: its version, every message's op, the codes its
fields carry, and the header encoding (msgpack). docs/contract.md is the
reference; nothing here knows about sockets."""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable

import msgspec
import msgspec.structs

CONTRACT_VERSION = (1, 10)
# an iSCSI name is at most 223 bytes (RFC 7143 4.2.7.1): initiator and target names
# in register_nexus are held to it (an initiator port name adds ",i,0x" and 12 hex digits)
MAX_NAME_LEN = 223
MAX_PORT_NAME_LEN = MAX_NAME_LEN + len(",i,0x") + 12


class Op(enum.StrEnum):
    # front end -> STML
    REGISTER = "register_target_front_end"
    DEREGISTER = "deregister_target_front_end"
    REGISTER_NEXUS = "register_nexus"
    RELEASE_NEXUS = "scsi_release"
    RX_CMND = "rx_cmnd"
    RX_DATA = "scsi_rx_data"
    RX_TMF = "rx_task_mgmt_fn"
    DONE = "scsi_target_done"
    HEARTBEAT = "heartbeat"
    PORTAL_STATE = "portal_state"
    # STML -> front end
    DETECT = "detect"
    NEXUS_READY = "nexus_ready"
    RELEASE = "release"
    RDY_TO_XFER = "rdy_to_xfer"
    XMIT_RESPONSE = "xmit_response"
    TMF_DONE = "task_mgmt_fn_done"
    REPORT_AEN = "report_aen"
    DROP_NEXUS = "drop_nexus"
    # management: any admitted peer -> STML, and the answer
    MGMT = "mgmt"
    MGMT_REPLY = "mgmt_reply"
    # the ZeroMQ carrier: several messages in one
    BATCH = "batch"


class Cap(enum.StrEnum):
    """Capabilities (1.4): offered in register_target_front_end, granted in
    detect; either side uses one only when the other granted or offered it."""
    # the front end lends the STML a shared region for write data (stream carrier):
    # it sends the region after a detect that grants this
    WRITE_REGION = "write_region"
    # (1.7) stage timing: the front end stamps its commands (rx_cmnd and
    # scsi_target_done `ts`) and answers the STML's heartbeat `t` with `echo`;
    # granted only while the STML times commands (`scsi-target run --timing`)
    TIMING = "timing"


class DataDir(enum.IntFlag):
    NONE = 0
    WRITE = 1   # initiator -> target
    READ = 2    # target -> initiator


class TaskAttr(enum.IntEnum):
    SIMPLE = 0
    ORDERED = 1
    HEAD_OF_QUEUE = 2
    ACA = 3


class Status(enum.IntEnum):
    """SCSI status codes (SAM-5) of xmit_response."""
    GOOD = 0x00
    CHECK_CONDITION = 0x02
    CONDITION_MET = 0x04
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28
    ACA_ACTIVE = 0x30
    TASK_ABORTED = 0x40


class Tmf(enum.IntEnum):
    """Task management functions (values follow iSCSI's TMF function codes)."""
    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LUN_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    TASK_REASSIGN = 8
    QUERY_TASK = 9
    QUERY_TASK_SET = 10
    I_T_NEXUS_RESET = 11
    QUERY_ASYNC_EVENT = 12


class TmfResponse(enum.IntEnum):
    """TMF service responses (values follow iSCSI's TMF response codes)."""
    COMPLETE = 0
    NO_TASK = 1
    NO_LUN = 2
    TASK_ALLEGIANT = 3
    NO_REASSIGN = 4
    NOT_SUPPORTED = 5
    NOT_AUTHORIZED = 6   # "function authorization failed": e.g. a target reset the target refuses
    SUCCEEDED = 7   # QUERY TASK/TASK SET/ASYNC EVENT: "function succeeded" (RFC 7144)
    REJECTED = 255


# msgspec's MessagePack codec: the wire format msgpack's Packer(use_bin_type=True)
# writes, byte for byte, at a third of the cost per header both ways (its
# decoder reads map keys through a cache of short strings; msgpack's makes and
# interns a new str per key). Its bound methods themselves: a Python function
# around them cost a frame per message. Shared by threads safely: msgspec made
# every Encoder/Decoder method threadsafe in 0.15.0 (its changelog; PR #402,
# issue #401); pyproject asks for >= 0.18.
pack: Callable[[dict[str, Any]], bytes] = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


# xmit_response with no sense data (GOOD, and every status without it) in one
# fixed msgpack layout, packed by a precompiled Struct from (tag, status, resid):
# the map StmlSender writes from a dict (same keys, same order), but the tag a
# uint32, the status a uint8 and the residual an int64 whatever their values;
# every msgpack decoder reads it back as that dict. The STML writes one per
# command, and the dict and its packing cost several times as much; a front end
# may read it with the same Struct. A response with sense data, or a value
# past the layout (struct.error), is packed from the dict.
_key = msgspec.msgpack.encode
_XMIT_PREFIX = b"\x85" + _key("op") + _key("xmit_response") + _key("tag") + b"\xce"   # map of 5; uint32
_XMIT_STATUS = _key("status") + b"\xcc"                                 # uint8
_XMIT_RESID = _key("sense") + b"\xc0" + _key("resid") + b"\xd3"         # nil; int64
XMIT_RESPONSE_FIXED = struct.Struct(
    f">{len(_XMIT_PREFIX)}sI{len(_XMIT_STATUS)}sB{len(_XMIT_RESID)}sq")
# the layout's constant parts, in the order its Struct unpacks them between the values
XMIT_RESPONSE_PARTS = (_XMIT_PREFIX, _XMIT_STATUS, _XMIT_RESID)


def pack_xmit_response(tag: int, status: int, resid: int) -> bytes:
    """An xmit_response header without sense data in the fixed layout
    (raises struct.error for a value that does not fit it)."""
    return XMIT_RESPONSE_FIXED.pack(_XMIT_PREFIX, tag, _XMIT_STATUS, status, _XMIT_RESID, resid)


def unpack(frame: bytes | memoryview) -> dict[str, Any]:
    """Decode a header; raises ValueError for anything that is not a map with an op.
    msgspec decodes some input msgpack's decoder refused or kept opaque: an
    array as a map key (a tuple), Ext types (msgspec.msgpack.Ext), the
    Timestamp ext (a datetime). They pass here; the table's check (check,
    Message.verdict) refuses them where a field belongs, and a key beside the
    fields is ignored like any the table does not name."""
    try:
        header = _decode(frame)
    except Exception as e:  # msgspec.DecodeError (malformed, unhashable key), RecursionError (deep)
        raise ValueError(f"undecodable header: {e}") from None
    if not isinstance(header, dict) or not isinstance(header.get("op"), str):
        raise ValueError("header is not a map with an 'op'")
    return header


_Count = Annotated[int, msgspec.Meta(ge=0)]


class RxCmnd(msgspec.Struct, tag_field="op", tag="rx_cmnd", gc=False):
    """rx_cmnd as the STML's command path takes it: decoded straight from
    msgpack (decode_rx_cmnd), typed and checked in C, read as attributes.
    It takes only headers that fit the table (tests/test_stml_hot_path.py
    holds it to MESSAGES) and carry what the emulator runs: counts not
    negative, an attr that is a TaskAttr, a CDB that is not empty. Any other
    header raises, and goes the dict's way: refused by the table, or answered,
    with the reason."""
    tag: int
    nexus: int
    lun: _Count
    cdb: Annotated[bytes, msgspec.Meta(min_length=1)]
    attr: Annotated[int, msgspec.Meta(ge=0, le=int(max(TaskAttr)))] = 0
    dir: _Count = 0
    len: _Count = 0
    unsol: _Count = 0


# (msgspec.DecodeError or msgspec.ValidationError for any header it does not take)
decode_rx_cmnd: Callable[[bytes | memoryview], RxCmnd] = msgspec.msgpack.Decoder(RxCmnd).decode
# an RxCmnd's fields in one tuple, in RxCmnd's order (RX_CMND_FIELDS): one call in
# C where reading the attributes one by one cost a generic lookup each in the
# compiled build (msgspec's Struct is not a class mypyc knows)
RX_CMND_FIELDS = ("tag", "nexus", "lun", "cdb", "attr", "dir", "len", "unsol")
rx_cmnd_fields: Callable[[RxCmnd], tuple[Any, ...]] = msgspec.structs.astuple
DecodeError = msgspec.DecodeError
# what a header that starts with its op (as every FrontEndLink writes it) has after
# its map's first byte, when it is an rx_cmnd: the STML tries decode_rx_cmnd on those
RX_CMND_OP = _key("op") + _key("rx_cmnd")


def version_compatible(version: Any) -> str | None:
    """None when a front end's contract version can talk to us, else the reason."""
    if (not isinstance(version, (list, tuple)) or len(version) != 2
            or not all(isinstance(v, int) for v in version)):
        return "missing or malformed contract version"
    if version[0] != CONTRACT_VERSION[0]:
        return (f"contract version {version[0]}.{version[1]} is not compatible with "
                f"the STML's {CONTRACT_VERSION[0]}.{CONTRACT_VERSION[1]} (major differs)")
    return None


@dataclass(frozen=True, slots=True)
class Lun:
    lun: int
    block_size: int
    blocks: int
    ro: bool = False
    removable: bool = False


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    luns: tuple[Lun, ...]
    alias: str = ""
    access: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Detect:
    """What the STML offers a front end, decoded from a `detect` message."""
    stml: str
    targets: tuple[Target, ...]
    limits: dict[str, Any]
    discovery: dict[str, Any] = field(default_factory=dict)
    portals: tuple[tuple[str, int, int], ...] = ()   # (host, port, tpgt) the STML's config names
    instance: str = ""   # (1.9) the STML process's id; "" from an older STML

    @classmethod
    def from_header(cls, h: dict[str, Any]) -> Detect:
        targets = tuple(
            Target(t["name"], tuple(Lun(**lun) for lun in t["luns"]), t.get("alias", ""),
                   t.get("access") or {})
            for t in h.get("targets", ()))
        portals = tuple((str(p["host"]), int(p["port"]), int(p.get("tpgt", 1)))
                        for p in h.get("portals") or ())
        return cls(h.get("stml", ""), targets, h.get("limits", {}), h.get("discovery") or {}, portals,
                   str(h.get("instance") or ""))

    def target(self, name: str) -> Target | None:
        return next((t for t in self.targets if t.name == name), None)


# ---------------------------------------------------------------- the message table

NoneType = type(None)


@dataclass(frozen=True, slots=True)
class Kind:
    """A field's type: its name in docs/contract.md, the Python types a decoded
    value may have (exactly: a bool is no int; none listed: anything), and
    for a list the types of its items."""
    name: str
    types: tuple[type, ...]
    items: tuple[type, ...] | None = None

    def accepts(self, value: Any) -> bool:
        if not self.types:
            return True
        if type(value) not in self.types:
            return False
        return self.items is None or type(value) is not list or all(type(v) in self.items for v in value)


INT = Kind("int", (int,))
STR = Kind("str", (str,))
BYTES = Kind("bytes", (bytes,))
BOOL = Kind("bool", (bool,))
MAP = Kind("map", (dict,))
ANY = Kind("any", ())
INT_OR_NONE = Kind("int|nil", (int, NoneType))
BYTES_OR_NONE = Kind("bytes|nil", (bytes, NoneType))
INTS = Kind("[int]", (list,), (int,))
STRS = Kind("[str]", (list,), (str,))
MAPS = Kind("[map]", (list,), (dict,))
VERSION = Kind("[int, int]", (list,), (int,))


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    kind: Kind
    doc: str
    required: bool = True
    since: tuple[int, int] = (1, 0)
    # False: the check (Message.check, its compiled verdict) leaves the field to
    # the code that reads it, which reads it only when it is on (stage timing):
    # a command without it then costs its check nothing more
    checked: bool = True


class Direction(enum.Enum):
    TO_STML = "to the STML"
    FROM_STML = "from the STML"




@dataclass(frozen=True)
class Message:
    """One message of the contract: who sends it, its header fields, what
    data frames follow the header, and the contract version it appeared in.
    check() validates a decoded header against it."""
    op: Op
    direction: Direction
    group: str          # "front end", "management" or "carrier": where docs/contract.md lists it
    doc: str
    fields: tuple[Field, ...] = ()
    frames: str = ""    # the data frames after the header; "" for none
    since: tuple[int, int] = (1, 0)
    # None when a header fits, else why it is refused: the table compiled (stml.api.messages.check)
    verdict: Callable[[dict[str, Any]], str | None] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "verdict", _compile_verdict(self))

    def refusal(self, header: dict[str, Any]) -> str | None:
        """check() as a line for the log, naming the message."""
        error = self.check(header)
        return None if error is None else f"malformed {self.op.value}: {error}"

    def check(self, header: dict[str, Any]) -> str | None:
        """None when the header fits, else what is wrong with it. Fields the
        table does not name are ignored (a newer peer may send more)."""
        for f in self.fields:
            if not f.checked:
                continue
            value = header.get(f.name, _MISSING)
            if value is _MISSING:
                if f.required:
                    return f"{f.name} is missing"
            elif not f.kind.accepts(value):
                if type(value) in f.kind.types:
                    return f"{f.name} is not {f.kind.name} (an item is of another type)"
                return f"{f.name} is {type(value).__name__}, not {f.kind.name}"
        return None


class _Missing:
    """The type of what the compiled check sees for an absent optional field."""


def _compile_verdict(m: Message) -> Callable[[dict[str, Any]], str | None]:
    """The message's check as one expression compiled from the table, which
    reads the table (refusal) only for a header that does not fit: rx_cmnd
    and xmit_response pass it once per command, and a loop over the fields
    cost several times as much. A message with an optional list or a field
    of any type reads the table every time (none is sent per command)."""
    fields = tuple(f for f in m.fields if f.checked)
    if not fields or any(not f.kind.types or (f.kind.items is not None and not f.required) for f in fields):
        return m.refusal
    tests: list[str] = []
    namespace: dict[str, Any] = {"M": _MISSING, "refusal": m.refusal}
    for i, f in enumerate(fields):
        value = f"h[{f.name!r}]" if f.required else f"h.get({f.name!r}, M)"
        types = f.kind.types if f.required else (*f.kind.types, _Missing)
        namespace[f"t{i}"] = types[0] if len(types) == 1 else types
        tests.append(f"type({value}) {'is' if len(types) == 1 else 'in'} t{i}")
        if f.kind.items is not None:   # a list: the types of its items, in one pass in C
            namespace[f"i{i}"] = frozenset(f.kind.items)
            tests.append(f"i{i}.issuperset(map(type, {value}))")
    names = ", ".join(f"{n}={n}" for n in namespace)   # locals: the fastest lookups
    exec(f"def verdict(h, type=type, {names}):\n    try:\n        if {' and '.join(tests)}:\n"
         f"            return None\n    except KeyError:\n        pass\n    return refusal(h)\n", namespace)
    return namespace["verdict"]


_MISSING = _Missing()
_TO, _FROM = Direction.TO_STML, Direction.FROM_STML
_TAG = Field("tag", INT, "the front end's task id, unique among its live tasks")
_NEXUS = Field("nexus", INT, "the I_T nexus, numbered by the front end (unique within it)")

MESSAGES: tuple[Message, ...] = (
    # ------------------------------------------------------------ front end -> STML
    Message(Op.REGISTER, _TO, "front end",
            "Announce a front end. The STML answers `detect`; with `error` when the major "
            "version differs or the header is malformed (the front end must not go on).", (
                Field("version", VERSION, "the contract version the front end speaks: [major, minor]"),
                Field("kind", STR, "what it is, e.g. \"iscsi\", \"loopback\""),
                Field("name", STR, "unique among the STML's front ends; shown by `status`"),
                Field("heartbeat_ms", INT, "its heartbeat interval (default 1000)", False),
                Field("aen", BOOL, "it wants `report_aen` (default false)", False),
                Field("caps", STRS, "the capabilities (Cap) it offers; `detect` grants those the "
                      "STML has too", False, (1, 4)),
                Field("boot_id", STR, "with the `timing` capability: the host's boot id "
                      "(/proc/sys/kernel/random/boot_id); the same as the STML's means the same "
                      "CLOCK_MONOTONIC, else the clock offset is estimated from heartbeats", False, (1, 7)),
            )),
    Message(Op.DEREGISTER, _TO, "front end",
            "Orderly goodbye: the STML releases every nexus of this front end, as their "
            "initiators chose (nothing is remembered: release them `lost` first to have them "
            "told). A front end whose connection ends, or that goes silent, loses them "
            "(decisions/0234)."),
    Message(Op.REGISTER_NEXUS, _TO, "front end",
            "A new I_T nexus (iSCSI: a session). Answered by `nexus_ready`. A target name "
            "over 223 bytes (MAX_NAME_LEN), or an initiator over MAX_PORT_NAME_LEN, is refused; so "
            "is an initiator the target's ACL does not name (whatever the front end checked), a tpg "
            "outside 0..65535, and one past the STML's caps (nexuses per front end and per target: "
            "docs/decisions/0263). The same I_T nexus lost before (`scsi_release` `lost`, a "
            "front end gone without `deregister`, management's ends) hears I_T NEXUS LOSS "
            "OCCURRED on every LU of the target, set before `nexus_ready` (1.10, "
            "decisions/0234).", (
                _NEXUS,
                Field("initiator", STR, "the initiator port (iSCSI: \"IQN,i,0xISID\")"),
                Field("target", STR, "a target `detect` listed"),
                Field("tpg", INT, "the target portal group tag it came through"),
                Field("resumed", BOOL, "the front end registered this I_T nexus (the same initiator "
                      "port, target and tpg) with another STML instance (`detect` `instance`), "
                      "e.g. one that restarted: the STML reports POWER ON OCCURRED to it on every "
                      "LU of the target (decisions/0247); absent or false: a new nexus, which gets "
                      "no unit attention (0006)", False, (1, 9)),
            )),
    Message(Op.RELEASE_NEXUS, _TO, "front end",
            "The nexus is gone: the STML frees its state and aborts its tasks (I_T nexus loss).", (
                _NEXUS,
                Field("lost", BOOL, "its initiator did not end it (iSCSI: a connection failed at "
                      "ERL 0, a login reinstated the session, Time2Retain ran out, the front end "
                      "stopped): the STML remembers the I_T nexus, and it hears I_T NEXUS LOSS "
                      "OCCURRED on every LU of its target when registered again (decisions/0234); "
                      "absent or false: its initiator ended it (a Logout) or never had it (iSCSI: "
                      "its final Login Response never went out, 0236), nothing is kept", False,
                      (1, 10)),
            )),
    Message(Op.RX_CMND, _TO, "front end",
            "A new SCSI command. A header that names a command (tag, nexus, cdb) but has a bad "
            "count field, or an attr that is no TaskAttr, is answered with CHECK CONDITION (lun: "
            "LOGICAL UNIT NOT SUPPORTED, else INVALID FIELD IN COMMAND INFORMATION UNIT: a "
            "transport field, not the CDB); other malformed ones are refused.", (
                _TAG, _NEXUS,
                Field("lun", INT, "the logical unit number"),
                Field("cdb", BYTES, "the CDB, as the initiator sent it (not empty)"),
                Field("attr", INT, "a TaskAttr (default SIMPLE)", False),
                Field("dir", INT, "a DataDir bit set (default NONE)", False),
                Field("len", INT, "the initiator's expected data transfer length (default 0)", False),
                Field("unsol", INT, "bytes of write data that arrive without `rdy_to_xfer` "
                      "(immediate + unsolicited; default 0)", False),
                Field("ts", INTS, "stage timing (`timing` granted): [front end received the "
                      "command, rx_cmnd sent], CLOCK_MONOTONIC ns of the front end's host; "
                      "checked where read", False, (1, 7), checked=False),
            ), "immediate data"),
    Message(Op.RX_DATA, _TO, "front end",
            "Write data: unsolicited data, or data that `rdy_to_xfer` asked for.", (
                _TAG,
                Field("offset", INT, "where the data goes in the command's data-out buffer"),
                Field("error", STR, "the transport could not deliver the data (e.g. an iSCSI "
                      "DataSN error): the STML ends the command with ABORTED COMMAND", False),
            ), "write data at offset"),
    Message(Op.RX_TMF, _TO, "front end",
            "A task management function.", (
                _TAG, _NEXUS,
                Field("fn", INT, "a Tmf"),
                Field("lun", INT, "the LUN it concerns (default 0)", False),
                Field("ref", INT_OR_NONE, "the tag of the task for ABORT TASK and QUERY TASK", False),
            )),
    Message(Op.DONE, _TO, "front end",
            "These responses are on the wire: the front end no longer uses their data. Sent "
            "while the STML grants `timing` (since 1.8; before, for every `xmit_response`), "
            "batched: its stamps are what the STML takes from it. The read data's shared "
            "memory goes back through the carrier (`free`) whether or not it is sent.", (
                Field("tags", INTS, "the tasks whose responses were delivered"),
                Field("ts", INTS, "stage timing (`timing` granted): when each response was "
                      "delivered (on the wire), in the order of `tags`, CLOCK_MONOTONIC ns of the "
                      "front end's host; checked where read", False, (1, 7), checked=False),
            )),
    Message(Op.HEARTBEAT, _TO, "front end",
            "Liveness: a front end silent for three heartbeat intervals is released.", (
                Field("usage", MAP, "what the front end buffers ({str: int} bytes: limit, used, "
                      "peak, and by kind), shown by `status`; a front end that sends it sends a "
                      "heartbeat every interval, busy or not", False, (1, 3)),
                Field("echo", INTS, "stage timing: the answer to an STML heartbeat's `t`, sent at "
                      "once: [t, when it arrived, when this leaves] (front end ns); the STML "
                      "estimates the clock offset from the round trip (NTP's way)", False, (1, 7)),
            )),
    Message(Op.PORTAL_STATE, _TO, "front end",
            "(optional) An iSCSI front end that follows the STML's portal list says, after "
            "each change of it, which portals it listens on and why not the others; `portal "
            "add` waits for it, `portal list` and `status` show it.", (
                Field("follows", BOOL, "it listens on the STML's portal list"),
                Field("portals", MAPS, "{host, port, tpgt, listening: bool, bound_port?: int, "
                      "error?: str} per portal of the list"),
            ), since=(1, 3)),
    # ------------------------------------------------------------ STML -> front end
    Message(Op.DETECT, _FROM, "front end",
            "What the STML offers; sent again, unasked, when targets, LUNs or portals change. "
            "Target = {name, alias, luns: [Lun], access: {acl: [iqn], chap: {user, secret}|nil, "
            "mutual: {...}|nil, erl: int (1.5: its ErrorRecoveryLevel, 0-2), cmdsn_depth: int "
            "(1.5: its CmdSN window)}}; Lun = {lun, block_size, blocks, ro, removable}. CHAP "
            "credentials (`chap`, `mutual`, discovery's `chap`) go only to front ends of kind "
            "`iscsi`: others authenticate no one, and see nil.", (
                Field("version", VERSION, "the STML's contract version"),
                Field("error", STR, "the registration is refused (nothing else is sent)", False),
                Field("standby", BOOL, "with `error`: a standby gateway refused it for now; a link "
                      "given several STML endpoints asks the next one", False, (1, 5)),
                Field("stml", STR, "the STML's name", False),
                Field("targets", MAPS, "the targets", False),
                Field("limits", MAP, "{max_transfer, queue_depth}", False),
                Field("discovery", MAP, "{chap: {user, secret}|nil, slp: [scope]|nil, slp_da: [\"HOST[:PORT]\"]}: "
                      "discovery session access; the SLP scopes to answer in (nil: no SLP) and "
                      "directory agents (1.5)", False),
                Field("heartbeat_ms", INT, "the STML's heartbeat interval", False),
                Field("portals", MAPS, "[{host, port, tpgt}]: the STML's configured portal list; "
                      "an iSCSI front end started without portals of its own listens on exactly "
                      "these (port 0: any free port)", False, (1, 1)),
                Field("caps", STRS, "the offered capabilities (Cap) the STML grants; absent "
                      "from an older STML: none", False, (1, 4)),
                Field("instance", STR, "this STML process's random id, new at each start: a front "
                      "end whose link comes back to another instance registers its nexuses again "
                      "with `resumed` (absent from an older STML: no such nexus is told)",
                      False, (1, 9)),
            )),
    Message(Op.NEXUS_READY, _FROM, "front end",
            "The answer to `register_nexus`. A nexus refused that the front end registered again "
            "(after an STML restart) has no I_T nexus in the STML: the front end ends its session "
            "(fetd_tcp: decision 0266; the loopback library raises NexusGone).", (
                _NEXUS,
                Field("error", STR, "the nexus was refused (e.g. no such target, the target's nexus cap)",
                      False),
            )),
    Message(Op.RELEASE, _FROM, "front end",
            "The STML is going away or no longer knows this front end: register again.", (
                Field("reason", STR, "why"),
            )),
    Message(Op.RDY_TO_XFER, _FROM, "front end",
            "Send this much write data now (iSCSI: R2Ts).", (
                _TAG,
                Field("offset", INT, "the first byte wanted"),
                Field("length", INT, "how many bytes"),
            )),
    Message(Op.XMIT_RESPONSE, _FROM, "front end",
            "The command is done. Its read data is valid until the response is on the wire; "
            "the front end then gives the data's shared memory back (and, timed, reports "
            "`scsi_target_done`).", (
                _TAG,
                Field("status", INT, "a Status"),
                Field("sense", BYTES_OR_NONE, "sense data (CHECK CONDITION)", False),
                Field("resid", INT, "> 0: underflow, < 0: overflow, in bytes (default 0)", False),
                Field("ts", INTS, "stage timing (the STML times commands): [STML received, queued "
                      "in the task set, dispatched, backend start, backend end, xmit_response "
                      "sent], STML CLOCK_MONOTONIC ns; 0 for a stage the command did not reach",
                      False, (1, 7), checked=False),
            ), "read data"),
    Message(Op.TMF_DONE, _FROM, "front end",
            "Sent only after every task the TMF affects is gone; aborted tasks get no "
            "`xmit_response` at all.", (
                _TAG,
                Field("response", INT, "a TmfResponse"),
                Field("aborted", INTS, "the tags of the front end's tasks it aborted", False),
                Field("info", BYTES, "QUERY ASYNCHRONOUS EVENT answered SUCCEEDED: the additional "
                      "response information, 3 bytes (UADE depth << 4 | sense key, ASC, ASCQ)",
                      False, since=(1, 6)),
            )),
    Message(Op.REPORT_AEN, _FROM, "front end",
            "An asynchronous event (a unit attention), for front ends that registered with aen.", (
                Field("nexus", INT_OR_NONE, "the nexus (nil: every nexus of the front end)", False),
                Field("lun", INT, "the LUN"),
                Field("sense", BYTES, "the unit attention's sense data"),
            )),
    Message(Op.DROP_NEXUS, _FROM, "front end",
            "End this I_T nexus (management `session drop`, or `target remove --force` for each "
            "session of the target): the front end ends the session "
            "(iSCSI: an Async Message \"dropping all connections\", then the connections close) "
            "and sends `scsi_release`. The STML has already released the nexus.", (
                _NEXUS,
                Field("reason", STR, "why", False),
            ), since=(1, 1)),
    Message(Op.HEARTBEAT, _FROM, "front end",
            "Liveness: an STML silent for three heartbeat intervals is given up (register again).", (
                Field("t", INT, "stage timing, to a front end granted `timing`: when this left "
                      "(STML ns); the front end answers with a heartbeat `echo`", False, (1, 7)),
            )),
    # ------------------------------------------------------------ management
    Message(Op.MGMT, _TO, "management",
            "A management request (no registration needed) from a peer that did not register as "
            "a front end; over CURVE, only from a key in `[stml] allowed_managers` (decision 0242). "
            "`cmd` names one of stml.mgmt's commands (status, target_add, lun_add, portal_add, "
            "session_drop, ...). Changes are hot and saved to the config file.", (
                Field("id", INT, "echoed in the reply"),
                Field("cmd", STR, "the command"),
                Field("args", MAP, "its arguments", False),
            )),
    Message(Op.MGMT_REPLY, _FROM, "management",
            "The answer to `mgmt`, to the requester.", (
                Field("id", INT, "the request's id"),
                Field("ok", BOOL, "it succeeded"),
                Field("result", ANY, "what the command returns", False),
                Field("error", STR, "why it failed", False),
            )),
    # ------------------------------------------------------------ carrier
    Message(Op.BATCH, _TO, "carrier",
            "ZeroMQ only, either way: several messages in one ZeroMQ message (those sent in "
            "one loop iteration to one peer). The receiver splits it and handles them in order.", (
                Field("n", INTS, "the frame count of each message (header included)"),
            ), "each message's frames, header first"),
)

# what each side receives, by op (batch is split by the ZeroMQ carrier before anyone looks)
TO_STML: dict[str, Message] = {m.op.value: m for m in MESSAGES if m.direction is _TO and m.op is not Op.BATCH}
FROM_STML: dict[str, Message] = {m.op.value: m for m in MESSAGES if m.direction is _FROM}


def check(header: dict[str, Any], received: dict[str, Message]) -> str | None:
    """None when a decoded header is one of the `received` messages (TO_STML or
    FROM_STML) and fits the table, else the reason to refuse it (for the log)."""
    spec = received.get(header["op"])
    if spec is None:
        return f"unknown op {header['op']!r}"
    return spec.verdict(header)
