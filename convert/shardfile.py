"""A bundle shard written with O_DIRECT: the bytes go from this process to the disk, not through
freshly allocated page-cache pages.

Why: measured with `perf` on this project's 2-core VM, copying written bytes into new page-cache
pages (`copy_folio_from_iter_atomic`) took 35 % of a full-size conversion's CPU time: a buffered
write into a new file costs 2-3 CPU seconds per GB here, an O_DIRECT write of the same bytes
0.02-0.04 s per GB, at 1.7-1.9 GB/s of the disk. The cost of the buffered write is the kernel's
page allocation and the first touch of each page, not the copy itself (overwriting pages already
cached costs 0.15 s per GB).

O_DIRECT needs the memory, the file offset and the length aligned to the device's block. The
bytes are therefore gathered in page-aligned staging buffers of `STAGE` bytes, each written at an
aligned offset by the disk lane while the next one fills; the last one is written padded to a
whole block and the file truncated to its size. Where O_DIRECT is refused (a file system without
it, a platform without the flag) or a write comes back short (a file-size limit), the file goes
on buffered from that point, so every error a buffered write reports is still reported.

The price: the finished bundle is not in the page cache, so the first load after a conversion
reads it from the disk (the source, read through the cache, stays there).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from concurrent import futures

import numpy as np

from convert.overlap import Lane

ALIGN = 4096  # the largest logical block size of common disks; a multiple of the smaller ones
STAGE = 4 << 20  # bytes per O_DIRECT write: 1.7 GB/s here (8 MB: 1.9, 64 MB: 1.4), far ahead of the rest
DEPTH = 2  # staging buffers: one filling while the disk lane writes the other
DISK_LANE = Lane("disk")  # the O_DIRECT writes, in order

_DIRECT = getattr(os, "O_DIRECT", 0)


class ShardFile:
    """An append-only file: `write` bytes in order, then `finish`, then `sync` (fsync and close).

    `failed(error, what)` turns an OSError into the one the caller raises (naming the file and
    the tensor `what` that was being written).
    """

    def __init__(self, path, failed, direct: bool = True):
        self._failed = failed
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            # `_staged` is fixed here: bytes go through the staging buffers in order. `_direct` may be
            # turned off later by the disk lane (a short write), which then writes the stages buffered.
            self._direct = self._staged = bool(direct and _DIRECT) and self._set_direct(True)
            self._stages = [mmap.mmap(-1, STAGE) for _ in range(DEPTH)] if self._staged else []
        except BaseException:
            os.close(self._fd)
            raise
        self._turn = 0
        self._fill = 0  # bytes in the current staging buffer
        self._offset = 0  # where the current staging buffer goes in the file
        self._pending: list[futures.Future | None] = [None] * DEPTH
        self._size = 0
        self._error: OSError | None = None

    @property
    def direct(self) -> bool:
        """Whether the file is being written with O_DIRECT (the file system took it)."""
        return self._direct

    def _set_direct(self, on: bool) -> bool:
        """Whether O_DIRECT is now on: the file system may refuse it (EINVAL)."""
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        try:
            fcntl.fcntl(self._fd, fcntl.F_SETFL, (flags | _DIRECT) if on else (flags & ~_DIRECT))
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return False
            raise
        return on

    def write(self, view: memoryview, what: str) -> None:
        """Append `view` (bytes). Errors of earlier writes of the disk lane are raised here."""
        if self._error is not None:
            raise self._error
        self._size += view.nbytes
        if not self._staged:
            self._write_all(view, self._size - view.nbytes, what)
            return
        src = np.frombuffer(view, np.uint8)
        done = 0
        while done < src.size:
            stage = np.frombuffer(self._stages[self._turn], np.uint8)
            n = min(src.size - done, STAGE - self._fill)
            np.copyto(stage[self._fill:self._fill + n], src[done:done + n])  # releases the GIL
            self._fill += n
            done += n
            if self._fill == STAGE:
                self._flush(what)

    def _flush(self, what: str, final: bool = False) -> None:
        """Hand the current staging buffer to the disk lane and wait until the next one is free."""
        length = self._fill if not final else -(-self._fill // ALIGN) * ALIGN
        stage = self._stages[self._turn]
        if length > self._fill:
            stage[self._fill:length] = bytes(length - self._fill)  # the padding `finish` truncates away
        if length:
            job = DISK_LANE.submit(self._write_stage, memoryview(stage)[:length], self._offset, what)
            self._pending[self._turn] = job
        self._offset += self._fill
        self._fill = 0
        self._turn = (self._turn + 1) % DEPTH
        self._wait(self._turn)

    def _wait(self, turn: int) -> None:
        job, self._pending[turn] = self._pending[turn], None
        if job is not None:
            try:
                job.result()
            except OSError as e:
                self._error = e
                raise

    def _write_stage(self, view: memoryview, offset: int, what: str) -> None:
        """On the disk lane: one aligned O_DIRECT write; a short write or a refusal goes on buffered."""
        if self._direct:
            try:
                n = os.pwrite(self._fd, view, offset)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise self._failed(e, what) from None
                n = 0  # O_DIRECT refused after all: write this and the rest buffered
            if n == view.nbytes:
                return
            self._direct = self._set_direct(False)
            view, offset = view[n:], offset + n
        self._write_all(view, offset, what)

    def _write_all(self, view: memoryview, offset: int, what: str) -> None:
        try:
            while view.nbytes:
                n = os.pwrite(self._fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as e:
            raise self._failed(e, what) from None

    def finish(self, what: str) -> int:
        """Write what is staged, wait for the disk lane, cut the padding; return the file's size."""
        if self._staged:
            self._flush(what, final=True)
            for turn in range(DEPTH):
                self._wait(turn)
            try:
                os.ftruncate(self._fd, self._size)
            except OSError as e:
                raise self._failed(e, what) from None
        elif self._error is not None:
            raise self._error
        return self._size

    def sync(self) -> None:
        """fsync, then close (also when the fsync fails: a full disk on delayed allocation)."""
        try:
            os.fsync(self._fd)
        finally:
            self.close()

    def close(self) -> None:
        """Close the file once the disk lane is done with it (also after a failure)."""
        futures.wait([job for job in self._pending if job is not None])
        self._pending = [None] * DEPTH
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
        for stage in self._stages:
            try:
                stage.close()
            except BufferError:  # a view still alive somewhere: the garbage collector unmaps it
                pass
        self._stages = []


__all__ = ["ShardFile", "ALIGN", "STAGE", "DEPTH", "DISK_LANE"]
