"""Faults of the MLX build at hand that the runtime detects and works around.

**A quantized matmul over several rows of a narrow input.** On MLX's CUDA build (seen with MLX
0.32.4 on an H100), `mx.quantized_matmul` with an input width of 64 gives wrong answers, NaN or
a different answer each time, whenever more than one row multiplies the weight (a prefill); one
row (a decode step) is right, and so is every width from 256 up (docs/CUDA_QMM_K64.md). Gemma3n
has one such projection per layer, LAuReL's `linear_right` (rank 64), so a quantized prefill on
that build answered differently on every run.

Which builds have the fault is not something a version number says for sure, so the runtime
asks the device: the first time a quantized projection with an input narrower than 256 (where the
fault was measured; every width from 256 up was right for every row count, 4 and 8 bits)
multiplies more than one row, `wrong_multirow(...)` runs the same kernel on a small fixed input
(two rows, the same input width, bits, group size, mode and dtype) and compares it with the
dequantized product on the same device. Where they disagree, such calls multiply by the dequantized weight instead
(`x @ dequantize(W).T`: a weight this narrow is a few kilobytes per layer, dequantized per call,
never stored). One-row calls, and therefore compiled decoding, keep the quantized kernel. The
answer is cached per process; the probe costs two tiny kernels once per shape class.
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx
import numpy as np

# Rows and output width of the probe: two rows, as small as the fault shows, and an output width
# every kernel takes (a multiple of 128).
_PROBE_ROWS, _PROBE_OUT = 2, 256
# Inputs at least this wide are never probed: measured right (benchmarks/cuda_qmm_sweep.py), and
# there bfloat16 accumulation alone can stray by a fifth of the largest answer, which a probe
# could not tell from a fault.
NARROW = 256


@cache
def wrong_multirow(in_dims: int, bits: int, group_size: int, mode: str, dtype: str) -> bool:
    """Whether this device's quantized matmul gets a several-row product of this shape class
    wrong (see the module docstring). Cached: asked once per process and shape class."""
    if in_dims >= NARROW:
        return False
    rng = np.random.default_rng(in_dims)
    x = mx.array(rng.standard_normal((1, _PROBE_ROWS, in_dims)).astype(np.float32)).astype(getattr(mx, dtype))
    w = mx.array((rng.standard_normal((_PROBE_OUT, in_dims)) / in_dims**0.5).astype(np.float32))
    w = w.astype(getattr(mx, dtype))
    packed = mx.quantize(w, group_size=group_size, bits=bits, mode=mode)
    weight, scales, biases = packed[0], packed[1], packed[2] if len(packed) > 2 else None
    dense = mx.dequantize(weight, scales, biases, group_size=group_size, bits=bits, mode=mode)
    want = x.astype(mx.float32) @ dense.astype(mx.float32).T
    got = [mx.quantized_matmul(x, weight, scales, biases, transpose=True, group_size=group_size, bits=bits,
                               mode=mode) for _ in range(2)]
    mx.eval(want, *got)
    want = np.array(want)
    # bfloat16 rounding of a 2-row product this narrow stays under a twentieth of the largest
    # answer; the fault gives NaN or errors as large as the answers themselves.
    bound = 0.1 * float(np.abs(want).max())
    return not all(np.isfinite(np.array(g.astype(mx.float32))).all()
                   and float(np.abs(np.array(g.astype(mx.float32)) - want).max()) <= bound for g in got)


def rows(x: mx.array) -> int:
    """How many rows of `x` multiply a weight (everything but the last dimension)."""
    return x.size // x.shape[-1] if x.shape[-1] else 0
