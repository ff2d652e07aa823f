"""Floating-point casts on raw tensor bytes, in numpy, without torch.

bfloat16 is the upper half of a float32: widening shifts it left by 16 bits; narrowing rounds the
dropped half to nearest, ties to even (what torch and MLX do), and keeps NaNs NaN. float16 uses
numpy's own conversion, which also rounds to nearest even.
"""

from __future__ import annotations

import numpy as np

# Safetensors dtype code -> numpy dtype holding its bytes (bfloat16 as its raw uint16 bits).
STORAGE = {
    "BF16": np.dtype(np.uint16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "I16": np.dtype(np.int16),
    "I32": np.dtype(np.int32),
    "I64": np.dtype(np.int64),
    "U64": np.dtype(np.uint64),
    "F64": np.dtype(np.float64),
    "BOOL": np.dtype(np.uint8),
}

FLOATS = ("BF16", "F16", "F32")
CODE_FOR_OPTION = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}

# Casts run over sub-chunks this many elements long so their temporaries stay in cache and small.
_CHUNK = 1 << 18


def view(raw, dtype: str) -> np.ndarray:
    """A flat numpy view of raw bytes holding `dtype` elements (no copy)."""
    return np.frombuffer(raw, dtype=STORAGE[dtype])


def bf16_to_f32(src: np.ndarray, out: np.ndarray) -> None:
    # In place: `src.astype(np.uint32) << 16` makes two temporaries and ran 25x slower here.
    bits = out.view(np.uint32)
    bits[:] = src
    bits <<= 16


def f32_to_bf16(src: np.ndarray, out: np.ndarray) -> None:
    bits = src.view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))
    rounded >>= 16
    nan = np.isnan(src)
    if nan.any():
        # Rounding could carry a NaN's payload into the exponent (and turn it into inf): keep the
        # sign and exponent, force a quiet-NaN mantissa bit.
        rounded[nan] = (bits[nan] >> 16) | np.uint32(0x0040)
    out[:] = rounded


def cast(src: np.ndarray, src_dtype: str, dst_dtype: str, out: np.ndarray) -> np.ndarray:
    """Cast flat `src` (storage view of `src_dtype`) into flat `out` (storage of `dst_dtype`)."""
    if src_dtype == dst_dtype:
        out[:] = src
        return out
    if src_dtype not in FLOATS or dst_dtype not in FLOATS:
        raise ValueError(f"cannot cast {src_dtype} to {dst_dtype}")
    with np.errstate(over="ignore"):  # out of float16's range becomes inf, as in torch and MLX
        for i in range(0, src.size, _CHUNK):
            _cast_chunk(src[i:i + _CHUNK], src_dtype, dst_dtype, out[i:i + _CHUNK])
    return out


def _cast_chunk(s: np.ndarray, src_dtype: str, dst_dtype: str, o: np.ndarray) -> None:
    if src_dtype == "BF16":
        f32 = o if dst_dtype == "F32" else np.empty(s.size, np.float32)
        bf16_to_f32(s, f32)
        if dst_dtype == "F16":
            o[:] = f32
    elif src_dtype == "F16":
        if dst_dtype == "F32":
            o[:] = s
        else:
            f32_to_bf16(s.astype(np.float32), o)
    elif dst_dtype == "F16":  # from F32
        o[:] = s
    else:
        f32_to_bf16(s, o)


def count_nonfinite(raw, dtype: str) -> tuple[int, int]:
    """(NaN count, infinity count) of raw bytes holding `dtype` elements; (0, 0) for non-floats.

    Runs over sub-chunks so its temporaries stay small (`--check-finite` must stay streaming).
    """
    if dtype not in ("BF16", "F16", "F32", "F64"):
        return 0, 0
    values = np.frombuffer(memoryview(raw).cast("B"), dtype=np.float64 if dtype == "F64" else STORAGE[dtype])
    nan = inf = 0
    for i in range(0, values.size, _CHUNK):
        part = values[i:i + _CHUNK]
        if dtype == "BF16":  # exponent all ones: infinity if the mantissa is zero, else NaN
            special = part[(part & 0x7F80) == 0x7F80]
            if special.size:
                mantissa = special & 0x7F
                inf += int(np.count_nonzero(mantissa == 0))
                nan += int(np.count_nonzero(mantissa))
        elif not np.isfinite(part).all():
            nan += int(np.count_nonzero(np.isnan(part)))
            inf += int(np.count_nonzero(np.isinf(part)))
    return nan, inf
