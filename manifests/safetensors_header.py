"""The rules of a safetensors header, shared by the converter's reader and the runtime's checks.

Shards are part of the bundle contract, so the one strict parser lives here, below both halves,
and `convert` (reading a source) and `runtime` (loading and verifying a bundle) refuse exactly
the same defects with the same words.

The format: an 8-byte little-endian header length N, N bytes of JSON mapping each tensor name to
`{dtype, shape, data_offsets: [begin, end]}` (offsets relative to the end of the header) plus an
optional `__metadata__` of strings, then the data. The data must be covered exactly: no overlap,
no holes, nothing after the last tensor.

Every check is bounded by the file's own size: a claimed header length is compared with the file
before a byte is allocated for it, and a shape's element count is multiplied out only as far as
the file could hold it, so no header can make a reader allocate or compute more than its file.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

from manifests.files import open_regular_file

# The safetensors library refuses headers above 100 MB; a real model's header is well under 1 MB.
HEADER_LIMIT = 100 * 1024 * 1024

ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}

# Safetensors dtype -> the name the manifest (and MLX) uses.
DTYPE_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E4M3": "float8_e4m3", "F8_E5M2": "float8_e5m2",
    "I16": "int16", "U16": "uint16", "F16": "float16", "BF16": "bfloat16",
    "I32": "int32", "U32": "uint32", "F32": "float32",
    "I64": "int64", "U64": "uint64", "F64": "float64",
}

_SHOWN = 80  # characters of a hostile name or value quoted in a message, so it stays one short line


class HeaderError(ValueError):
    """A malformed safetensors header. The message names the tensor; callers prefix the file."""


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: str  # safetensors code: "BF16", "U32", ...
    shape: tuple[int, ...]
    begin: int  # byte offset of the data, relative to the end of the header
    nbytes: int


def shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "...'"


def header_length(first: bytes, size: int) -> int:
    """The header length from a file's first 8 bytes, checked against the file's `size`."""
    if size < 8 or len(first) < 8:
        raise HeaderError(f"{size} bytes, too short to hold a safetensors header")
    (n,) = struct.unpack("<Q", first[:8])
    if n > HEADER_LIMIT:
        raise HeaderError(f"header length {n} exceeds the {HEADER_LIMIT}-byte limit (corrupt file or not safetensors)")
    if 8 + n > size:
        raise HeaderError(f"header length {n} runs past the end of the {size}-byte file (truncated or not safetensors)")
    return n


def _no_duplicates(pairs: list) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise HeaderError(f"{shown(key)} is listed twice in the header")
        seen[key] = value
    return seen


def _unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _byte_count(shape: list[int], itemsize: int, cap: int) -> int | None:
    """dtype size x shape, or None once it exceeds `cap` (never multiplies out a huge claim)."""
    if 0 in shape:
        return 0
    need = itemsize
    for d in shape:
        need *= d
        if need > cap:
            return None
    return need


def parse_header(text: bytes, size: int) -> tuple[list[Entry], dict[str, str]]:
    """(entries in data order, metadata) of a header `text` from a file of `size` bytes."""
    data_start = 8 + len(text)
    try:
        doc = json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except HeaderError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, digit limits
        first = (str(e).splitlines() or [type(e).__name__])[0][:_SHOWN]
        raise HeaderError(f"header is not valid JSON ({first})") from None
    if not isinstance(doc, dict):
        raise HeaderError("header is not a JSON object")
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise HeaderError("__metadata__ must map strings to strings")
    for text_ in [*doc, *metadata, *metadata.values()]:
        # JSON lets "\ud800" stand alone; Python decodes it, the safetensors library (and UTF-8) do not
        if not _unicode(text_):
            raise HeaderError(f"{shown(text_)} is not valid Unicode (a lone surrogate escape)")

    entries = []
    for name, entry in doc.items():
        where = f"tensor {shown(name)}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise HeaderError(f"{where}: entry must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in ITEMSIZE:
            raise HeaderError(f"{where}: unknown dtype {shown(dtype)} (known: {', '.join(ITEMSIZE)})")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise HeaderError(f"{where}: shape {shown(shape)} is not a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise HeaderError(f"{where}: data_offsets {shown(offsets)} is not [begin, end] with 0 <= begin <= end")
        need = _byte_count(shape, ITEMSIZE[dtype], size)
        if need is None:
            raise HeaderError(f"{where}: {dtype} x {shown(shape)} needs more bytes than the {size}-byte file holds")
        if offsets[1] - offsets[0] != need:
            raise HeaderError(f"{where}: data_offsets span {offsets[1] - offsets[0]} bytes but "
                              f"{dtype} x {shape} needs {need}")
        entries.append(Entry(name, dtype, tuple(shape), offsets[0], need))

    entries.sort(key=lambda t: (t.begin, t.nbytes))
    cursor, previous = data_start, None
    for t in entries:
        start, end = data_start + t.begin, data_start + t.begin + t.nbytes
        if end > size:
            raise HeaderError(f"tensor {shown(t.name)}: data ends at byte {end}, past the end of the "
                              f"{size}-byte file (truncated?)")
        if start < cursor:
            raise HeaderError(f"tensor {shown(t.name)}: data overlaps tensor {shown(previous)}")
        if start > cursor:
            raise HeaderError(f"tensor {shown(t.name)}: {start - cursor} unindexed bytes before its data "
                              "(a hole in the data buffer)")
        cursor, previous = end, t.name
    if cursor != size:
        after = f"after tensor {shown(previous)}" if previous is not None else "after the header"
        raise HeaderError(f"{size - cursor} unindexed bytes {after} at the end of the file")
    return entries, dict(metadata)


def read_header_file(path) -> tuple[list[Entry], dict[str, str], int]:
    """(entries, metadata, data start) of one safetensors file, reading only its header.

    OSError from the file system passes through (manifests.files.FileRefused, an OSError, for a
    path that is not a regular file); every defect of the content is a HeaderError.
    """
    with open_regular_file(path) as f:  # a FIFO or a device is refused before any read
        size = os.fstat(f.fileno()).st_size
        n = header_length(f.read(8), size)
        text = f.read(n)
    if len(text) != n:
        raise HeaderError("unexpected end of file in the header (changed while being read)")
    entries, metadata = parse_header(text, size)
    return entries, metadata, 8 + n
