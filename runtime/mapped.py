"""An embedding table placed `mapped`: memory-mapped on the host, each token's row gathered there.

Gemma3n's per-layer embedding table is the largest tensor of E2B and E4B (262144 x layers * 256:
3.75 GiB of a bfloat16 E2B) and a token reads one row of it (15 KB). Placed `mapped`
(`convert --ple mapped`, manifests/format.py), the converter writes it to a safetensors file of
its own; here that file is mapped read-only, with MADV_RANDOM (no read-ahead), and nothing of it
is read at load: mapping is not reading. Each forward pass gathers the rows of its tokens with
numpy, so only the pages of rows ever used are read, by the kernel, on first use; the table never
enters accelerator memory.

The rows are gathered as stored: a quantized table keeps its packing (4320 bytes a row for a
4-bit E2B instead of 15360 in bfloat16), and its rows are dequantized by the very
`mx.dequantize` the resident table runs (`nn.QuantizedEmbedding`), on the same bytes, so the two
placements compute the same values bit for bit, on any device (tests/test_ple.py).

A gather needs the token ids' values, so it is the one part of a forward pass that cannot stay
lazy. It is split in two: `gather` (host: ids -> one `uint8` array `[n, row bytes]`, each row its
weight's bytes then its scales' and biases', handed to MLX as one input, one transfer) and
`values` (lazy: a view of each part, then the dequantization), which the eager forward and the
compiled decode step (runtime/fast.py) run inside their graphs.
"""

from __future__ import annotations

import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from manifests.files import open_regular_file
from manifests.records import MAPPED_EMBEDDINGS, Quantization, Storage
from manifests.safetensors_header import Entry

# Stored dtype (safetensors code) -> what a gathered part is viewed as in MLX.
MX_DTYPES = {"F32": mx.float32, "BF16": mx.bfloat16, "F16": mx.float16, "U32": mx.uint32}
MAPPABLE = ("float32", "bfloat16", "float16", "uint32")  # the same, by the manifest's names


@dataclass(frozen=True)
class Part:
    """One stored tensor of the table (weight, scales or biases), as rows of bytes."""

    name: str  # the record's part: weight, scales, biases
    rows: np.ndarray  # [num, bytes per row] uint8, a read-only view of the mapping
    start: int  # where its bytes begin in a gathered row
    dtype: mx.Dtype

    @property
    def width(self) -> int:
        return self.rows.shape[1]


class MappedTable:
    """A `[num, dims]` embedding table in a file of its own, mapped, never loaded.

    `table(ids)` is `table.values(table.gather(ids))`: what the resident module's `table(ids)`
    gives for ids inside the table; ids outside it read row 0 (as the model's resident path)."""

    def __init__(self, file: Path, record: dict, entries: dict[str, Entry], data_start: int, where: str):
        """`entries`: the file's safetensors header by key; `data_start`: where its data begins.
        The caller (runtime/loader.py) has checked the entries against the record."""
        self.file = Path(file)
        self.record = record
        storage = Storage.of(record, where)
        self.quantized: Quantization | None = storage.quantized
        self.num, self.dims = storage.dims(record["shape"])
        with open_regular_file(self.file) as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # the mapping outlives the descriptor
        if hasattr(self._map, "madvise"):  # rows are read in no order: read-ahead would read what is not used
            self._map.madvise(mmap.MADV_RANDOM)
        parts, start = [], 0
        for tensor in MAPPED_EMBEDDINGS.stored(record, where):
            entry = entries[tensor.key]
            width = entry.nbytes // self.num
            rows = np.frombuffer(self._map, np.uint8, entry.nbytes, data_start + entry.begin).reshape(self.num, width)
            parts.append(Part(tensor.part, rows, start, MX_DTYPES[entry.dtype]))
            start += width
        self.parts: tuple[Part, ...] = tuple(parts)
        self.row_bytes = start

    def gather(self, ids) -> mx.array:
        """The stored bytes of the rows of `ids` (any shape; an mx.array is evaluated here, the
        one wait of a mapped forward pass), one `uint8` row of `row_bytes` per id, `[n, row_bytes]`
        in the ids' order. Ids outside the table read row 0."""
        flat = np.asarray(ids).reshape(-1).astype(np.int64, copy=False)
        flat = np.where((flat >= 0) & (flat < self.num), flat, 0)
        if len(self.parts) == 1:
            return mx.array(self.parts[0].rows[flat])
        return mx.array(np.concatenate([p.rows[flat] for p in self.parts], axis=1))

    def values(self, rows: mx.array) -> mx.array:
        """The table's values `[n, dims]` of gathered rows (lazy: views, then the dequantization
        the resident quantized table runs, with the same arguments)."""
        parts = {p.name: rows[:, p.start : p.start + p.width].view(p.dtype) for p in self.parts}
        q = self.quantized
        if q is None:
            return parts["weight"]
        return mx.dequantize(parts["weight"], scales=parts["scales"], biases=parts.get("biases"),
                             group_size=q.group_size, bits=q.bits, mode=q.mode)

    def __call__(self, ids) -> mx.array:
        return self.values(self.gather(ids))

    @property
    def nbytes(self) -> int:
        """Bytes of the whole table as stored (none of them in MLX memory)."""
        return self.row_bytes * self.num

    def resident_pages(self) -> int | None:
        """Bytes of this mapping resident in this process now (Linux `/proc/self/smaps` Rss): the
        pages touched so far, which is all a mapped table ever costs in memory. None elsewhere."""
        try:
            text = Path("/proc/self/smaps").read_text()
        except OSError:
            return None
        target, total, inside = os.path.realpath(self.file), 0, False
        for line in text.splitlines():
            head = line.split(maxsplit=5)
            if len(head) >= 5 and "-" in head[0] and ":" in head[3]:  # a mapping's first line
                inside = len(head) == 6 and head[5] == target
            elif inside and head[:1] == ["Rss:"]:
                total += int(head[1]) * 1024
        return total

    def __repr__(self) -> str:
        what = self.quantized.describe() if self.quantized else self.parts[0].dtype
        return f"MappedTable({self.file.name}, {self.num}x{self.dims}, {what}, {math.ceil(self.nbytes / 1e6)} MB)"
