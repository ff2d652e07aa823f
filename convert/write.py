"""Execute a plan: stream every tensor from the source into the bundle's shards, hashing both sides.

One tensor, or one block of one, is in memory at a time, twice over: the main thread reads (and
hashes what it read), casts and transposes one block while the output lane writes (and hashes)
the one before (convert/overlap.py). A copy or cast moves `read_block` bytes per block. A
transpose of a source [R, C] into [C, R] is written in bands of output rows: for each band the
source rows are read block by block and the band's columns of each block are tile-transposed
into the band buffer, which is then cast (if asked) and written. The output is therefore written
strictly in order (so it can be hashed on the way) and never held whole; the price is one pass
over the source rows per band. The band budget (512 MB) holds two bands, one filled while the
other is written, so a full-size bfloat16 embedding table (1.07 GB) is read 4 times for its
transpose, served from the page cache after the first.

A fused item (convert/fusion.py) is its members read one after another: a copy or cast writes
them back to back (rows concatenated); a transpose fills each band's columns member by member.
"""

from __future__ import annotations

import hashlib
import os
from concurrent import futures
from pathlib import Path

import numpy as np

from convert.dtypes import STORAGE, cast, view
from convert.overlap import SYNC_LANE, Buffers
from convert.planning import (
    HASH_SCRATCH,
    Item,
    Plan,
    band_rows,
    block_bytes,
    index_text,
    rows_per_block,
)
from convert.quantize import Spills, write_quantized
from convert.safetensors_io import HashingReader, SafetensorsWriter
from convert.source import CONFIG_NAME
from convert.transpose import transpose_into
from manifests.files import open_regular_file
from manifests.format import INDEX_NAME

COPY_CHUNK = 1024 * 1024


def _write_stream(item: Item, readers: dict[str, HashingReader], writer: SafetensorsWriter, bufs: Buffers,
                  read_block: int) -> None:
    step = block_bytes(item, read_block)
    for file, src in item.parts:
        reader = readers[file]
        for offset in range(0, src.nbytes, step):
            n = min(step, src.nbytes - offset)
            buf, fence = bufs.next("read", n)
            raw = reader.read_into(src.offset + offset, buf)
            if item.transform == "copy":
                writer.write(raw, fence)
            else:
                count = n // src.itemsize
                buf, fence = bufs.next("cast", count * STORAGE[item.dtype].itemsize)
                out = np.frombuffer(buf, STORAGE[item.dtype])
                writer.write(cast(view(raw, src.dtype), src.dtype, item.dtype, out), fence)


def _write_zeros(item: Item, writer: SafetensorsWriter, bufs: Buffers, read_block: int) -> None:
    """A tensor of zeros (no source: planning.kept_for_mlx_lm), written a block at a time."""
    step = block_bytes(item, read_block)
    for offset in range(0, item.nbytes, step):
        n = min(step, item.nbytes - offset)
        block, fence = bufs.next("read", n)
        np.frombuffer(block, np.uint8).fill(0)
        writer.write(block, fence)


def _write_transposed(item: Item, readers: dict[str, HashingReader], writer: SafetensorsWriter, bufs: Buffers,
                      read_block: int, band_bytes: int) -> None:
    src = item.source  # for a fused item, the members' stack: rows is the fused output dimension
    rows, cols = src.shape
    per_row = cols * src.itemsize
    block_rows = rows_per_block(item, read_block)
    height = band_rows(item, band_bytes)
    storage = STORAGE[src.dtype]
    for c0 in range(0, cols, height):
        c1 = min(cols, c0 + height)
        buf, band_fence = bufs.next("band", (c1 - c0) * rows * src.itemsize)
        band = np.frombuffer(buf, storage).reshape(c1 - c0, rows)
        first_row = 0  # where the current member's rows start among the band's columns
        for file, part in item.parts:
            reader, part_rows = readers[file], part.shape[0]
            for r0 in range(0, part_rows, block_rows):
                r1 = min(part_rows, r0 + block_rows)
                buf, _ = bufs.next("read", (r1 - r0) * per_row)
                raw = reader.read_into(part.offset + r0 * per_row, buf)
                block = view(raw, src.dtype).reshape(r1 - r0, cols)
                transpose_into(block[:, c0:c1], band[:, first_row + r0:first_row + r1])
            first_row += part_rows
        flat = band.reshape(-1)
        if item.dtype == src.dtype:
            writer.write(flat, band_fence)
            continue
        # Cast the band in slices of about one read block, so the cast buffers stay small.
        step = max(1, block_bytes(item, read_block) // src.itemsize)
        for i in range(0, flat.size, step):
            part = flat[i:i + step]
            buf, fence = bufs.next("cast", part.size * STORAGE[item.dtype].itemsize)
            out = np.frombuffer(buf, STORAGE[item.dtype])
            writer.write(cast(part, src.dtype, item.dtype, out), fence)


def _copy_file(src: Path, dst: Path) -> tuple[str, int]:
    """Copy a small file byte for byte; the one hash serves as the source's and the bundle's."""
    sha, n = hashlib.sha256(), 0
    with open_regular_file(src) as f, open(dst, "xb") as g:
        while chunk := f.read(COPY_CHUNK):
            sha.update(chunk)
            g.write(chunk)
            n += len(chunk)
        g.flush()
        os.fsync(g.fileno())
    return sha.hexdigest(), n


def _write_small(path: Path, data: bytes) -> tuple[str, int]:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest(), len(data)


def write_bundle(plan: Plan, directory: Path, on_write=None, check_finite: bool = False) -> tuple[dict, dict]:
    """Write every shard, the index and the copied files into `directory` (which must exist).

    Returns (bundle files {name: {sha256, bytes}}, source files {name: sha256}).
    """
    source = plan.source
    files: dict[str, dict] = {}
    source_hashes: dict[str, str] = dict(source.metadata_hashes)
    bufs = Buffers()
    scratch = bytearray(HASH_SCRATCH)
    readers = {name: HashingReader(header, scratch) for name, header in source.headers.items()}
    spills = Spills(directory)  # scales and biases of --quantize, until their place in a shard
    syncing = []  # fsyncs of finished shards, waiting on the disk while the next shard is written
    try:
        for shard in plan.shards:
            writer = SafetensorsWriter(directory / shard.name, [(i.key, i.dtype, i.shape) for i in shard.items],
                                       header=shard.header, on_write=on_write, check_finite=check_finite)
            try:
                for item in shard.items:
                    writer.begin(item.key)
                    if item.transform == "transpose":
                        _write_transposed(item, readers, writer, bufs, plan.read_block, plan.band_bytes)
                    elif item.transform == "quantize":
                        write_quantized(item, readers, writer, bufs, plan.read_block, spills)
                    elif item.transform == "zeros":
                        _write_zeros(item, writer, bufs, plan.read_block)
                    else:
                        _write_stream(item, readers, writer, bufs, plan.read_block)
                sha, nbytes = writer.finish()
            except BaseException:
                writer.abort()
                raise
            syncing.append(SYNC_LANE.submit(writer.sync))
            files[shard.name] = {"sha256": sha, "bytes": nbytes}
        bufs.release()
        # Bytes of a source file no tensor needed (the header, dropped towers) are read here, once,
        # only to complete the file's hash; see HashingReader.
        for name, reader in readers.items():
            source_hashes[name] = reader.finish()
        for done in syncing:
            done.result()  # a full disk may show only now (delayed allocation): one line, OUT untouched
    finally:
        futures.wait(syncing)  # every shard closed before the caller may remove the directory
        bufs.settle()
        spills.close()
        for reader in readers.values():
            reader.close()
    if len(plan.model_shards) > 1:
        sha, nbytes = _write_small(directory / INDEX_NAME, index_text(plan))
        files[INDEX_NAME] = {"sha256": sha, "bytes": nbytes}
    for name in source.copied_files:
        if name == CONFIG_NAME and plan.config_json is not None:  # completed for mlx-lm (planning.mlx_lm_config)
            sha, nbytes = _write_small(directory / name, plan.config_json)
            files[name] = {"sha256": sha, "bytes": nbytes}
            continue
        sha, nbytes = _copy_file(source.path(name), directory / name)
        files[name] = {"sha256": sha, "bytes": nbytes}
        if name in source_hashes and source_hashes[name] != sha:
            raise OSError(f"{source.display}/{name}: changed while being converted")
        source_hashes[name] = sha
    return dict(sorted(files.items())), dict(sorted(source_hashes.items()))
