"""Safetensors by hand: a strict header parser, a hashing `pread` reader, a streaming writer.

Why not the `safetensors` package or `mx.load`: both memory-map or materialize whole tensors, and
a memory-mapped source counts in the process's resident size page by page (docs/GEMMA3N.md, pitfalls).
Reading byte ranges with `pread` into one reused buffer keeps the converter's footprint small and
honest, and parsing the header ourselves lets every defect be reported as one line naming the
file and the tensor.

The header rules (what a valid header is, and how each defect is worded) are
`manifests.safetensors_header`'s, shared with the runtime's loader and `verify`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from concurrent import futures
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from convert.dtypes import count_nonfinite
from convert.errors import ConvertError
from convert.overlap import HOT_CHUNK, OUTPUT_LANE, OVERLAP_MIN, Fence
from convert.shardfile import ShardFile
from manifests.files import FileRefused, open_regular
from manifests.safetensors_header import (
    DTYPE_NAMES,
    HEADER_LIMIT,  # noqa: F401  (re-exported: the limit readers share)
    ITEMSIZE,
    HeaderError,
    header_length,
)
from manifests.safetensors_header import parse_header as parse_header_text

DTYPE_CODES = {v: k for k, v in DTYPE_NAMES.items()}


class SafetensorsError(ConvertError):
    """A malformed or truncated safetensors file; the message names the file and the tensor."""


class NonFiniteError(SafetensorsError):
    """`check_finite`: a tensor being written holds NaN or infinite values (counts attached)."""

    def __init__(self, path: Path, tensor: str, nan: int, inf: int):
        super().__init__(f"{path}: tensor {tensor!r}: {nan} NaN and {inf} infinite values")
        self.tensor, self.nan, self.inf = tensor, nan, inf


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors code: "BF16", "U32", ...
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class Header:
    path: Path
    display: str  # how error messages name the file
    size: int  # bytes in the file
    data_start: int  # 8 + header length
    tensors: dict[str, TensorInfo]  # in file order
    metadata: dict[str, str]


def _pread_into(fd: int, view: memoryview, offset: int, display: str) -> None:
    done, n = 0, len(view)
    while done < n:
        if hasattr(os, "preadv"):
            got = os.preadv(fd, [view[done:]], offset + done)
        else:  # platforms without preadv: one copy, still no growing allocation
            chunk = os.pread(fd, n - done, offset + done)
            got = len(chunk)
            view[done:done + got] = chunk
        if got == 0:
            raise SafetensorsError(f"{display}: unexpected end of file at byte {offset + done} "
                                   "(truncated, or changed while being read)")
        done += got


def read_header(path: str | os.PathLike, display: str | None = None) -> Header:
    """Parse and validate the header of one safetensors file without reading its data."""
    path = Path(path)
    display = display or str(path)
    try:
        fd = open_regular(path)  # a FIFO or a device is refused before any read
    except FileRefused as e:
        raise SafetensorsError(f"{display}: {e.strerror}") from None
    except OSError as e:
        raise SafetensorsError(f"{display}: cannot open ({e.strerror})") from None
    try:
        size = os.fstat(fd).st_size
        raw = bytearray(8)
        if size >= 8:
            _pread_into(fd, memoryview(raw), 0, display)
        try:
            n = header_length(bytes(raw), size)  # refused before anything of that length is allocated
        except HeaderError as e:
            raise SafetensorsError(f"{display}: {e}") from None
        text = bytearray(n)
        _pread_into(fd, memoryview(text), 8, display)
    finally:
        os.close(fd)
    return parse_header(bytes(text), size, path, display)


def parse_header(text: bytes, size: int, path: Path, display: str) -> Header:
    """Validate a header (the rules are manifests.safetensors_header's) and locate every tensor."""
    try:
        entries, metadata = parse_header_text(text, size)
    except HeaderError as e:
        raise SafetensorsError(f"{display}: {e}") from None
    data_start = 8 + len(text)
    infos = {e.name: TensorInfo(e.name, e.dtype, e.shape, data_start + e.begin, e.nbytes) for e in entries}
    return Header(path, display, size, data_start, infos, metadata)


class HashingReader:
    """Reads byte ranges of one source file with `pread` and hashes the whole file on the way.

    sha256 needs the bytes in order. Reads that arrive in file order extend the hashed prefix as
    they go. A read that starts beyond the hashed prefix first reads the gap (the header, tensors
    that are dropped) through the scratch buffer just to hash it. A read behind the prefix (another
    pass over a tensor being transposed) is not hashed twice. `finish()` hashes whatever remains up
    to the end, so every source file gets a full sha256 while each byte is read for hashing once.
    """

    def __init__(self, header: Header, scratch: bytearray):
        self.header = header
        self._scratch = scratch
        self._sha = hashlib.sha256()
        self._hashed = 0
        try:
            self._fd = open_regular(header.path)
        except OSError as e:
            raise SafetensorsError(f"{header.display}: cannot open ({e.strerror})") from None
        if os.fstat(self._fd).st_size != header.size:
            raise SafetensorsError(f"{header.display}: file changed size since its header was read")
        if hasattr(os, "posix_fadvise"):  # a cold source: let the kernel read ahead further
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def _read_hashing(self, view: memoryview, offset: int) -> None:
        """pread `view` piece by piece, hashing each piece while it is in this core's cache."""
        for i in range(0, len(view), HOT_CHUNK):
            part = view[i:i + HOT_CHUNK]
            _pread_into(self._fd, part, offset + i, self.header.display)
            self._sha.update(part)

    def _catch_up(self, offset: int) -> None:
        scratch = memoryview(self._scratch)[:HOT_CHUNK]
        while self._hashed < offset:
            n = min(len(scratch), offset - self._hashed)
            self._read_hashing(scratch[:n], self._hashed)
            self._hashed += n

    def read_into(self, offset: int, view: memoryview) -> memoryview:
        """Fill `view` from `offset`, hashing what extends the hashed prefix."""
        if offset > self._hashed:
            self._catch_up(offset)
        end = offset + len(view)
        if offset <= self._hashed < end:
            behind = self._hashed - offset  # read before (another pass of a transpose): not hashed twice
            if behind:
                _pread_into(self._fd, view[:behind], offset, self.header.display)
            self._read_hashing(view[behind:], self._hashed)
            self._hashed = end
        else:
            _pread_into(self._fd, view, offset, self.header.display)
        return view

    def finish(self) -> str:
        self._catch_up(self.header.size)
        return self._sha.hexdigest()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def build_header(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length plus JSON header for tensors written back to back in `entries` order.

    Padded with spaces to a multiple of 8 bytes, as the safetensors library does, so the data of
    tensors sorted by decreasing item size stays aligned.
    """
    doc: dict = {"__metadata__": dict(metadata)} if metadata else {}
    cursor = 0
    for name, dtype, shape in entries:
        n = math.prod(shape) * ITEMSIZE[dtype]
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [cursor, cursor + n]}
        cursor += n
    text = json.dumps(doc, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text


class SafetensorsWriter:
    """Streams one safetensors file: the header first (the plan knows every size), then the data.

    A small state machine: `begin(name)` must name the next tensor of the header and may only come
    once the previous one is complete; `write` refuses more bytes than the tensor holds; `close`
    refuses a file with an incomplete tensor. Everything written is hashed on the way out, so the
    file is never read back to be hashed.
    """

    def __init__(self, path: str | os.PathLike, entries: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None, on_write=None, header: bytes | None = None,
                 check_finite: bool = False):
        self.path = Path(path)
        self._entries = [(n, math.prod(s) * ITEMSIZE[d]) for n, d, s in entries]
        self._dtypes = [d for _, d, _ in entries]
        # Counted block by block as the bytes go out: checking costs no extra read or memory.
        self._check_finite = check_finite
        self._nonfinite = [0, 0]
        self._next = 0
        self._left = 0
        self._sha = hashlib.sha256()
        self._bytes = 0
        self._on_write = on_write
        self._last: Future | None = None  # the lane's latest write of this file
        self._error: OSError | None = None  # the write that failed; the file takes no more
        self._file = ShardFile(self.path, self._failed)
        try:
            self._emit(header if header is not None else build_header(entries, metadata), count=False)
        except BaseException:  # no writer is returned to abort: close the file here
            self._file.close()
            raise

    def _what(self) -> str:
        return f"tensor {self._entries[self._next - 1][0]!r}" if self._next else "the header"

    def _failed(self, e: OSError, what: str | None = None, doing: str = "writing") -> OSError:
        """The OS error of a write, naming this file and the tensor being written (a full disk)."""
        return OSError(e.errno, f"{e.strerror or e} while {doing} {what or self._what()}", str(self.path))

    def _put(self, view: memoryview, what: str) -> None:
        """Write `view` and hash it, piece by piece while each is in this core's cache (on the
        output lane for a large buffer). The file names its errors (`_failed`)."""
        if self._error is not None:
            raise self._error
        try:
            for i in range(0, view.nbytes, HOT_CHUNK):
                part = view[i:i + HOT_CHUNK]
                self._file.write(part, what)
                self._sha.update(part)
        except OSError as e:
            self._error = e
            raise

    def _settle(self) -> None:
        """Until the lane has written everything submitted (the lane runs in order); its error here.
        `_last` is forgotten only once done: a wait cut short (Ctrl-C, SIGTERM) leaves it for
        `abort`, which must not close the file under a write still running on the lane."""
        if self._last is not None:
            self._last.result()
            self._last = None

    def _emit(self, data, count: bool = True, fence: Fence | None = None) -> None:
        view = memoryview(data).cast("B")
        if view.nbytes >= OVERLAP_MIN:
            # Written and hashed on the output lane while this thread reads and transforms the
            # next block. Without a fence, wait before returning, as the caller may reuse the
            # buffer at once; with one, the caller waits on it before reusing the buffer.
            self._last = OUTPUT_LANE.submit(self._put, view, self._what())
            if fence is None:
                self._settle()
            else:
                fence.add(self._last)
        else:
            self._settle()
            self._put(view, self._what())
        self._bytes += view.nbytes
        if count and self._on_write:
            self._on_write(view.nbytes)

    def begin(self, name: str) -> None:
        if self._left:
            raise RuntimeError(f"{self.path.name}: {name} begun with {self._left} bytes of "
                               f"{self._entries[self._next - 1][0]} unwritten")
        if self._next >= len(self._entries) or self._entries[self._next][0] != name:
            expected = self._entries[self._next][0] if self._next < len(self._entries) else "nothing"
            raise RuntimeError(f"{self.path.name}: {name} written out of order (expected {expected})")
        self._left = self._entries[self._next][1]
        self._next += 1
        self._nonfinite = [0, 0]

    def count_values(self, data, dtype: str) -> None:
        """`check_finite` for a tensor whose stored bytes cannot hold NaN (a packed quantized weight):
        count the float values it is made of instead, before the write that completes it."""
        if self._check_finite:
            nan, inf = count_nonfinite(data, dtype)
            self._nonfinite[0] += nan
            self._nonfinite[1] += inf

    def write(self, data, fence: Fence | None = None) -> None:
        """Append `data` to the current tensor. With a `fence`, `data` may still be being written
        on return: the caller waits on the fence before changing it."""
        n = memoryview(data).nbytes
        if n > self._left:
            raise RuntimeError(f"{self.path.name}: {n} bytes written where {self._left} remain in "
                               f"{self._entries[self._next - 1][0]}")
        if self._check_finite:
            nan, inf = count_nonfinite(data, self._dtypes[self._next - 1])
            self._nonfinite[0] += nan
            self._nonfinite[1] += inf
        self._left -= n
        self._emit(data, fence=fence)
        if self._check_finite and not self._left and any(self._nonfinite):
            raise NonFiniteError(self.path, self._entries[self._next - 1][0], *self._nonfinite)

    def finish(self) -> tuple[str, int]:
        """Every tensor written and flushed to the kernel; return the file's sha256 and size. The
        file is not durable until `sync()` (which may run on another thread meanwhile)."""
        if self._left or self._next != len(self._entries):
            self.abort()
            raise RuntimeError(f"{self.path.name}: closed before every tensor was written")
        self._settle()
        self._file.finish(self._what())
        return self._sha.hexdigest(), self._bytes

    def sync(self) -> None:
        """fsync and close the finished file (a full disk may only show here, on delayed allocation)."""
        try:
            self._file.sync()
        except OSError as e:
            raise self._failed(e, doing="finishing") from None

    def close(self) -> tuple[str, int]:
        """Finish the file (flushed and fsynced); return its sha256 and size."""
        done = self.finish()
        self.sync()
        return done

    def abort(self) -> None:
        if self._last is not None:  # the lane is done with the file before it is closed
            futures.wait([self._last])
            self._last = None
        try:
            self._file.close()
        except OSError:  # the unwritten buffer of a full disk fails again; the file is discarded
            pass
