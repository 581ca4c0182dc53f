"""The contract's vocabulary: its version, every message's op, the codes its
fields carry, and the header encoding (msgpack). docs/contract.md is the
reference; nothing here knows about sockets."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import msgpack

CONTRACT_VERSION = (1, 3)
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


# One Packer for every header: msgpack.packb makes a Packer (and its buffer) per
# call, half the cost of packing a command's header. Shared by threads safely:
# pack() runs whole under the GIL (headers hold no type that calls Python code).
_PACKER = msgpack.Packer(use_bin_type=True)


def pack(header: dict[str, Any]) -> bytes:
    return _PACKER.pack(header)


def unpack(frame: bytes | memoryview) -> dict[str, Any]:
    """Decode a header; raises ValueError for anything that is not a map with an op."""
    try:
        header = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types
        raise ValueError(f"undecodable header: {e}") from None
    if not isinstance(header, dict) or not isinstance(header.get("op"), str):
        raise ValueError("header is not a map with an 'op'")
    return header


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

    @classmethod
    def from_header(cls, h: dict[str, Any]) -> Detect:
        targets = tuple(
            Target(t["name"], tuple(Lun(**lun) for lun in t["luns"]), t.get("alias", ""),
                   t.get("access") or {})
            for t in h.get("targets", ()))
        portals = tuple((str(p["host"]), int(p["port"]), int(p.get("tpgt", 1)))
                        for p in h.get("portals") or ())
        return cls(h.get("stml", ""), targets, h.get("limits", {}), h.get("discovery") or {}, portals)

    def target(self, name: str) -> Target | None:
        return next((t for t in self.targets if t.name == name), None)
