"""`convert --quantize`: MLX affine quantization of a float checkpoint, while streaming.

Which tensors: the linear projections and the two embedding tables whose last dimension is a
multiple of the group size. Never norms (1-D), nor what the architecture never quantizes
(NEVER_QUANTIZED: Gemma3n's AltUp coefficient matrices and modality router, which are tiny (4x4,
16x4, 4 x hidden), shape every plane's mixture, and run in float32 on purpose, so quantizing
them saves nothing and costs accuracy).

What is written is what `mx.quantize` makes of the whole tensor (cast to the output dtype first,
so scales and biases have the source dtype or `--dtype`): `<module>.weight` packed uint32,
`<module>.scales`, `<module>.biases`, the layout mlx-lm and nn.QuantizedLinear use. Quantization
works per group of `group_size` consecutive elements of one row, so quantizing a block of rows
gives exactly those rows of the whole tensor's result (tests/test_quantize.py checks it bit for
bit); the writer therefore reads, quantizes and writes one block of rows at a time.

One source tensor becomes three bundle tensors. The packed weight is written as its rows are
quantized; the scales and biases of those rows are appended to two spill files in the bundle's
temporary directory and copied into their own place in the shard when the writer gets there
(a shard holds its 4-byte tensors first, so that may be after other tensors, or in the next
shard). Memory stays one block of rows whatever the tensor size; the disk holds the spills
(1/8 of the packed weight at 4 bits, group 64, bfloat16) until they are copied.

Why no `quantization` block is added to the bundle's config.json: the runtime builds every
module from the manifest, which records `{bits, group_size, mode}` for each quantized projection
and embedding, so a second record could only drift from the first. config.json stays the
source's file byte for byte (its hash in the manifest is the source's), and a bundle is not an
mlx-lm checkpoint in general (pretransposed keys), so it should not pretend to be one.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from convert.dtypes import STORAGE, cast, view
from convert.errors import ConvertError
from convert.safetensors_io import DTYPE_CODES, DTYPE_NAMES, ITEMSIZE
from manifests.records import Quantization, Storage

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
MODES = ("affine",)
DEFAULT_GROUP_SIZE = 64

# Source bytes quantized at once: mx.quantize runs as fast on 16 MB as on 64 MB here (0.3-0.4 GB/s
# of bfloat16 on this CPU), and MLX holds a copy of the block plus its outputs beside the read
# buffer, so a smaller block keeps the working set small.
QUANT_BLOCK = 16 * 1024 * 1024

# The options of `--quantize` as a spec: bits, group size, mode, and what the manifest records.
QuantSpec = Quantization


def quant_spec(bits: int | None, group_size: int | None = None, mode: str | None = None) -> QuantSpec | None:
    """The --quantize options as a spec (None without --quantize); a bad combination is refused."""
    if bits is None:
        if group_size is not None or mode is not None:
            given = "--group-size" if group_size is not None else "--quant-mode"
            raise ConvertError(f"{given} applies only with --quantize 4 or --quantize 8")
        return None
    try:
        bits, group_size, mode = int(bits), int(group_size or DEFAULT_GROUP_SIZE), mode or "affine"
    except (TypeError, ValueError):
        raise ConvertError(f"--quantize {bits!r} --group-size {group_size!r}: use integers, --quantize one of "
                           f"{', '.join(map(str, BITS))}") from None
    if bits not in BITS:
        raise ConvertError(f"--quantize {bits}: use one of {', '.join(map(str, BITS))}")
    if group_size not in GROUP_SIZES:
        raise ConvertError(f"--group-size {group_size}: use one of {', '.join(map(str, GROUP_SIZES))}")
    if mode not in MODES:
        raise ConvertError(f"--quant-mode {mode!r}: use one of {', '.join(MODES)}")
    return QuantSpec(bits, group_size, mode)


def not_quantized_because(arch, module: str, shape: tuple[int, ...], spec: QuantSpec) -> str | None:
    """None if the weight of `module` (decoder-relative, of architecture module `arch`:
    convert/architectures.py) is quantized under `spec`, else why not."""
    role = arch.projection_role(module)
    if module not in arch.EMBEDDINGS and role is None:
        return "not a linear projection or embedding"
    if role in arch.NEVER_QUANTIZED:
        return arch.NEVER_QUANTIZED_BECAUSE
    if len(shape) != 2:
        return "not a matrix"
    if shape[-1] % spec.group_size:
        return f"last dimension not a multiple of the group size {spec.group_size}"
    return None


def rows_per_block(cols: int, itemsize: int, read_block: int) -> int:
    return max(1, min(read_block, QUANT_BLOCK) // max(cols * itemsize, 1))


def buffers(item, read_block: int) -> dict[str, int]:
    """Bytes the writer holds for one quantize item, by the writer's buffer name (the plan's
    memory bound): `read`, `cast` and `spill` are convert/write.py's buffers, kept from item to
    item; `mlx` is what MLX holds while the item is written (freed after it, mx.clear_cache).

    The packed weight pass holds the read block, its cast (if --dtype changes it), MLX's copy of
    the block, mx.quantize's float32 temporaries and its outputs (manifests/records.py), and as
    much again in MLX's buffer cache; the scales and biases passes hold one spill buffer.
    """
    src = item.source
    if item.part != "weight":
        return {"spill": max(1, min(read_block, item.nbytes))}
    rows, cols = src.shape
    block_rows = min(rows, rows_per_block(cols, src.itemsize, read_block))
    n = block_rows * cols
    out_size = ITEMSIZE[item.quant_dtype]
    read = n * src.itemsize
    cast_buf = 0 if item.quant_dtype == src.dtype else n * out_size
    made = Storage(quantized=item.quant).tensors("", block_rows, cols, DTYPE_NAMES[item.quant_dtype])
    mlx = n * out_size + n * 4 + sum(math.prod(t.shape) * ITEMSIZE[DTYPE_CODES[t.dtype]] for t in made)
    return {"read": read, "cast": cast_buf, "mlx": 2 * mlx}


class Spills:
    """Scales and biases of quantized tensors waiting for their place in a shard, on disk."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._paths: dict[str, Path] = {}
        self._count = 0

    def create(self, key: str):
        self._count += 1
        path = self.directory / f".spill-{self._count}"
        self._paths[key] = path
        return open(path, "xb")

    def take(self, key: str) -> Path:
        if key not in self._paths:
            raise RuntimeError(f"{key}: written before the weight it belongs to was quantized")
        return self._paths.pop(key)

    def close(self) -> None:
        for path in self._paths.values():
            path.unlink(missing_ok=True)
        self._paths.clear()


def quantize_rows(block: np.ndarray, src_dtype: str, out_dtype: str, spec: QuantSpec, cast_buf=None):
    """mx.quantize of a [rows, cols] block of source storage, after casting to `out_dtype`."""
    import mlx.core as mx

    rows, cols = block.shape
    flat = block.reshape(-1)
    if out_dtype != src_dtype:
        out = np.frombuffer(cast_buf, STORAGE[out_dtype]) if cast_buf is not None else \
            np.empty(flat.size, STORAGE[out_dtype])
        flat = cast(flat, src_dtype, out_dtype, out[: flat.size])
    array = mx.array(flat.reshape(rows, cols))
    if out_dtype == "BF16":
        array = array.view(mx.bfloat16)
    parts = mx.quantize(array, group_size=spec.group_size, bits=spec.bits, mode=spec.mode)
    mx.eval(*parts)
    return parts


def write_quantized(item, readers, writer, bufs, read_block: int, spills: Spills) -> None:
    """Write one quantize item: the packed weight (quantizing, and spilling scales and biases),
    or the scales or biases (copied from their spill). `readers`: source file -> HashingReader.

    A fused item (convert/fusion.py) quantizes its members one after another into the same
    packed tensor and spills: groups run along a row, so that equals quantizing their stack."""
    if item.part == "weight":
        _write_weight(item, readers, writer, bufs, read_block, spills)
    else:
        _write_spilled(item, writer, bufs, read_block, spills)


def _write_weight(item, readers, writer, bufs, read_block: int, spills: Spills) -> None:
    import mlx.core as mx

    spec, out_dtype = item.quant, item.quant_dtype
    cols = item.source.shape[1]
    step = rows_per_block(cols, item.source.itemsize, read_block)
    # The tensors stored beside the packed weight (manifests/records.py), in mx.quantize's order.
    beside = Storage(quantized=spec).tensors(item.key.rpartition(".")[0], *item.source.shape)[1:]
    files = [spills.create(t.key) for t in beside]
    try:
        for file, src in item.parts:
            reader, rows, per_row = readers[file], src.shape[0], cols * src.itemsize
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                raw = reader.read_into(src.offset + r0 * per_row, bufs.next("read", (r1 - r0) * per_row)[0])
                block = view(raw, src.dtype).reshape(r1 - r0, cols)
                cast_buf = None
                if out_dtype != src.dtype:
                    cast_buf = bufs.next("cast", (r1 - r0) * cols * ITEMSIZE[out_dtype])[0]
                packed, *rest = quantize_rows(block, src.dtype, out_dtype, spec, cast_buf)
                # --check-finite: packed integers hold no NaN, and mx.quantize turns a group's NaN
                # into finite scales; so count the values quantized (after any narrowing cast).
                writer.count_values(block if cast_buf is None else cast_buf, out_dtype)
                writer.write(memoryview(packed))
                for f, part in zip(files, rest, strict=True):
                    f.write(memoryview(part))
                del packed, rest
    finally:
        for f in files:
            f.close()
    mx.clear_cache()


def _write_spilled(item, writer, bufs, read_block: int, spills: Spills) -> None:
    path = spills.take(item.key)
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size != item.nbytes:
                raise RuntimeError(f"{item.key}: spill holds {os.fstat(f.fileno()).st_size} bytes, "
                                   f"{item.nbytes} expected")
            step = max(1, min(read_block, item.nbytes))
            left = item.nbytes
            while left:
                # Not the "read" buffer: the source hash may still be reading it on its thread.
                buf = bufs.get("spill", min(step, left))
                got = f.readinto(buf)
                if not got:
                    raise RuntimeError(f"{item.key}: spill ended early")
                writer.write(buf[:got])
                left -= got
    finally:
        path.unlink(missing_ok=True)


def spill_bytes(items) -> int:
    """Disk the spills need at most (all of them at once, the worst order)."""
    return sum(math.prod(i.shape) * ITEMSIZE[i.dtype] for i in items
               if i.transform == "quantize" and i.part != "weight")


__all__ = ["QuantSpec", "quant_spec", "not_quantized_because", "write_quantized", "Spills", "BITS",
           "GROUP_SIZES", "MODES", "DEFAULT_GROUP_SIZE"]
