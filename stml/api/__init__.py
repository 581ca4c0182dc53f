"""The STML API: the contract between the STML and its front ends, and the one
part of `stml` a front end imports. docs/contract.md is its reference.

- messages: the version, every op, the codes fields carry, pack/unpack;
- link: FrontEndLink, a front end's end of the contract, and StmlSender, the STML's;
- zmq_carrier, stream: the two carriers (ZeroMQ; a Unix stream for same-host peers);
- shm: shared memory regions and buffer pools; sizes: where data is lent, not copied;
- tap: the one place each side lets an instrument (a trace, fault injection) see its messages.
"""
from __future__ import annotations

from stml.api.link import FrontEndHandler, FrontEndLink, RegistrationRefused, StmlSender
from stml.api.messages import (CONTRACT_VERSION, MAX_NAME_LEN, MAX_PORT_NAME_LEN, MESSAGES, Cap, DataDir,
                               Detect, Lun, Op, Status, TaskAttr, Target, Tmf, TmfResponse, check, pack,
                               unpack, version_compatible)
from stml.api.shm import BufferPool, SharedRegion
from stml.api.sizes import BIG_FRAME, SHARED_READ_MIN
from stml.api.stream import Lease, StreamChannel, stream_path
from stml.api.tap import Tap, Taps
from stml.api.zmq_carrier import Channel

# Process plumbing that used to live here (scsi_runtime has it now); kept importable
# from stml.api for branches written before the move.
from scsi_runtime.curvekeys import curve_client_keys, load_key_file
from scsi_runtime.loop import run_loop
from scsi_runtime.portals import parse_portal

__all__ = [
    "BIG_FRAME", "CONTRACT_VERSION", "MAX_NAME_LEN", "MAX_PORT_NAME_LEN", "MESSAGES", "SHARED_READ_MIN",
    "BufferPool", "Cap", "Channel", "DataDir", "Detect", "FrontEndHandler", "FrontEndLink", "Lease", "Lun",
    "Op", "RegistrationRefused", "SharedRegion", "Status", "StmlSender", "StreamChannel", "TaskAttr",
    "Tap", "Taps", "Target", "Tmf", "TmfResponse", "check", "pack", "stream_path", "unpack", "version_compatible",
    "curve_client_keys", "load_key_file", "parse_portal", "run_loop",
]
