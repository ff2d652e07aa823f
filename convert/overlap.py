"""Writing beside reading: an ordered worker lane, fenced buffers, and cache-sized pieces.

Why: a conversion sha256-hashes every source byte and every byte it writes (the manifest's
provenance and per-file hashes). On the 2-core x86 CPU this project measures on, sha256 (OpenSSL
with SHA-NI) costs about as much CPU time as everything else together for a full-size E2B (8.9 GB
read, 10 GB written by `--target m5`). So the work is split in two halves of about equal cost:
the main thread reads, hashes what it read, casts and transposes; the output lane writes and
hashes what it wrote. `pread`, `write`, hashlib and numpy's copies release the GIL on large
buffers, so the two halves run on both cores at once.

Each half hashes in pieces of `HOT_CHUNK` bytes right after copying them (the `pread` or the
`write` just moved them through this core's L2 cache): measured here, sha256 runs at 1.5-1.8
GB/s per core on such pieces and at 1.1 GB/s on a 64 MB buffer read back from memory.

A lane is one thread, so what is submitted to it runs in submission order, as a file and its
sha256 need. A buffer handed to the lane must not change until the lane is done with it: its
`Fence` holds the lane's futures still reading it, and `Buffers.get` waits on that fence before
handing the buffer out again. Two buffers of each kind (`Buffers.next`) let the main thread fill
the next block while the lane still writes the previous one.
"""

from __future__ import annotations

import mmap
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor

# Writes this large or larger go to the lane; smaller ones (norms, headers) run inline, where a
# thread hand-off would cost more than the work.
OVERLAP_MIN = 1 << 20
# Bytes copied then hashed at a time, while they are still in the core's cache (L2: 2 MB per
# core here).
HOT_CHUNK = 1 << 20
# Buffers of each kind that `Buffers.next` rotates through: one being filled, one being written.
DEPTH = 2


class Lane:
    """One worker thread, started on first use; what is submitted runs in submission order."""

    def __init__(self, name: str):
        self.name = name
        self._pool: ThreadPoolExecutor | None = None

    def submit(self, fn, *args) -> Future:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.name)
        return self._pool.submit(fn, *args)


OUTPUT_LANE = Lane("write")  # writes and hashes the bundle's shards
SYNC_LANE = Lane("fsync")  # fsync of finished shards, while the next one is written


class Fence:
    """The lane's work still reading one buffer; `wait` before the buffer is changed."""

    def __init__(self):
        self._pending: list[Future] = []

    def add(self, future: Future | None) -> None:
        if future is not None:
            self._pending.append(future)

    def wait(self) -> None:
        """Until the work is done; its first error (a full disk) is raised here. A future leaves
        the fence only once done, so a wait cut short (Ctrl-C) leaves it for `settle`."""
        while self._pending:
            first = self._pending[0]
            try:
                first.result()
            finally:
                if first.done():
                    self._pending.pop(0)

    def settle(self) -> None:
        """Until the work is done, its errors left to whoever raised first (on the way out)."""
        futures.wait(self._pending)
        self._pending.clear()


class Buffers:
    """Reused byte buffers, grown on demand, each behind a fence, so a run allocates its working
    set once and never refills a buffer the lane is still writing."""

    def __init__(self):
        self._named: dict[str, mmap.mmap] = {}
        self._fences: dict[str, Fence] = {}
        self._turn: dict[str, int] = {}

    def fence(self, name: str) -> Fence:
        return self._fences.setdefault(name, Fence())

    def get(self, name: str, nbytes: int) -> memoryview:
        """Buffer `name`, at least `nbytes` long, once nothing reads it any more."""
        self.fence(name).wait()
        buf = self._named.get(name)
        if buf is None or len(buf) < nbytes:
            # Free the old one before allocating the larger: no reference may stay, this local's
            # included, or both are resident at once (a peak the plan does not predict). Mapped,
            # not malloc'd: an outgrown buffer goes back to the system when dropped (malloc may
            # keep one of up to 32 MiB for reuse), and a mapping is page-aligned.
            buf = None
            self._named.pop(name, None)
            buf = self._named[name] = mmap.mmap(-1, max(nbytes, 1))
        return memoryview(buf)[:nbytes]

    def next(self, name: str, nbytes: int) -> tuple[memoryview, Fence]:
        """The next of `DEPTH` buffers of kind `name` in turn, and its fence."""
        turn = self._turn.get(name, 0)
        self._turn[name] = (turn + 1) % DEPTH
        slot = f"{name}{turn}"
        return self.get(slot, nbytes), self.fence(slot)

    def settle(self) -> None:
        for fence in self._fences.values():
            fence.settle()

    def release(self) -> None:
        for fence in self._fences.values():
            fence.wait()
        self._named.clear()


__all__ = ["Lane", "Fence", "Buffers", "OUTPUT_LANE", "SYNC_LANE", "OVERLAP_MIN", "HOT_CHUNK", "DEPTH"]
