"""The trace file: a stream of msgpack records (docs/research.md, "Trace
format", is the reference; this module is the one reader and writer of it).

- The first record is a map: {"trace": MAGIC, "format": [major, minor], ...}
  with the STML's configuration and state when recording began.
- A message record is an array [t_ns, direction, peer, header, data]:
  CLOCK_MONOTONIC nanoseconds, TO_STML (0) or FROM_STML (1), the front end's
  routing id (bytes), the header as it crossed the link (bin: a msgpack map),
  and the data frames: nil (none), the bytes themselves, or [length, crc32c]
  (a digest).
- A note is a map {"note": kind, ...}: "gap" (records lost: the writer fell
  behind), "end" (why recording stopped; the last record of a whole trace).

Versioning: a reader refuses a trace of another major format; a minor
version adds fields or note kinds that older readers skip.
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from typing import IO, Any, Iterator

import crc32c
import msgpack

from stml.api.messages import unpack

MAGIC = "scsi-target trace"
FORMAT = (1, 0)
GZIP_MAGIC = b"\x1f\x8b"
# a record bigger than this is not one the recorder writes (a command moves at most
# the STML's max_transfer, 8 MiB by default): the reader stops there
MAX_RECORD = 64 << 20


class TraceError(ValueError):
    """The file is not a trace this reader can use; str() is one line."""


@dataclass(frozen=True, slots=True)
class Message:
    """One contract message as recorded."""
    index: int            # its position in the file (the first record is 0)
    t: int                # CLOCK_MONOTONIC, ns
    direction: int        # stml.api.tap.TO_STML or FROM_STML
    peer: bytes
    header: dict[str, Any]
    data: bytes | tuple[int, int] | None   # the data, (length, crc32c), or None

    @property
    def op(self) -> str:
        return str(self.header.get("op"))


@dataclass(frozen=True, slots=True)
class Note:
    index: int
    fields: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.fields.get("note"))


def digest(frames: list | tuple) -> tuple[int, int]:
    """(length, crc32c) of data frames taken as one byte string."""
    crc = n = 0
    for f in frames:
        crc = crc32c.crc32c(f, crc)
        n += len(f)
    return n, crc


def data_digest(data: bytes | tuple[int, int] | None) -> tuple[int, int]:
    """A record's data as (length, crc32c), whichever way it was recorded."""
    if data is None:
        return 0, 0
    if isinstance(data, tuple):
        return data
    return digest([data])


def open_trace(path: str) -> IO[bytes] | gzip.GzipFile:
    """The file's bytes, gunzipped when it is gzip (by its first bytes, not its name)."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise TraceError(f"{path}: {e.strerror or e}") from None
    if f.read(2) == GZIP_MAGIC:
        f.close()
        return gzip.open(path, "rb")
    f.seek(0)
    return f


class TraceReader:
    """Iterate a trace: `first` is its first record (checked), then Message
    and Note records in order. A file cut short (a killed STML) ends at its
    last whole record: `complete` tells whether an "end" note was seen."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._f = open_trace(path)
        self._unpacker = msgpack.Unpacker(self._f, raw=False, strict_map_key=False,
                                          max_buffer_size=MAX_RECORD)
        self.complete = False
        self.cut_short = False
        try:
            first = next(self._unpacker)
        except (StopIteration, ValueError, msgpack.UnpackException, OSError, EOFError) as e:
            self._f.close()
            raise TraceError(f"{path}: not a trace ({type(e).__name__}: no readable first record)") from None
        if not isinstance(first, dict) or first.get("trace") != MAGIC:
            self._f.close()
            raise TraceError(f"{path}: not a scsi-target trace (its first record does not say so)")
        version = first.get("format")
        if not isinstance(version, list) or len(version) != 2 or version[0] != FORMAT[0]:
            self._f.close()
            raise TraceError(f"{path}: trace format {version} is not {FORMAT[0]}.x, which this reader reads")
        self.first: dict[str, Any] = first

    def __enter__(self) -> TraceReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    def __iter__(self) -> Iterator[Message | Note]:
        index = 0
        while True:
            try:
                raw = next(self._unpacker)
            except StopIteration:
                try:   # the unpacker stops quietly before a partial record: is one there?
                    self.cut_short = self._unpacker.read_bytes(1) != b""
                except ValueError:
                    self.cut_short = True
                return
            except (ValueError, msgpack.UnpackException, OSError, EOFError):
                self.cut_short = True   # a partial last record, or a damaged file
                return
            index += 1
            yield self._record(index, raw)

    def _record(self, index: int, raw: Any) -> Message | Note:
        if isinstance(raw, dict) and isinstance(raw.get("note"), str):
            if raw["note"] == "end":
                self.complete = True
            return Note(index, raw)
        if (isinstance(raw, list) and len(raw) == 5 and type(raw[0]) is int and raw[1] in (0, 1)
                and isinstance(raw[2], bytes) and isinstance(raw[3], bytes)):
            try:
                header = unpack(raw[3])
            except ValueError as e:
                raise TraceError(f"{self.path}: record {index}: {e}") from None
            data = raw[4]
            if isinstance(data, list):
                if len(data) != 2 or not all(type(v) is int for v in data):
                    raise TraceError(f"{self.path}: record {index}: malformed data digest")
                data = (data[0], data[1])
            elif data is not None and not isinstance(data, bytes):
                raise TraceError(f"{self.path}: record {index}: malformed data")
            return Message(index, raw[0], raw[1], raw[2], header, data)
        raise TraceError(f"{self.path}: record {index} is neither a message nor a note")
