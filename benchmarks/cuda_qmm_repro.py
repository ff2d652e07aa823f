"""Standalone MLX repro: an affine-quantized matmul whose input width is 64 gives wrong, changing
answers on MLX's CUDA build when more than one row multiplies it.

    python3 benchmarks/cuda_qmm_repro.py [--rows 4] [--k 64] [--n 2048] [--bits 4] [--group-size 64]

Needs only MLX and numpy. Prints each repeat's largest difference to the dequantized product
(`mx.dequantize`, then an ordinary matmul on the same device) and exits 1 when any repeat is
wrong or differs from the first. On an H100 with MLX 0.32.4 (CUDA 13), `--rows 4 --k 64` fails
(NaN or O(1) errors, a different answer each time) and `--rows 1` or `--k 256` pass; on the CPU
everything passes. See docs/CUDA_QMM_K64.md.
"""

from __future__ import annotations

import argparse
import sys

import mlx.core as mx
import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4, help="rows of x (M)")
    ap.add_argument("--k", type=int, default=64, help="input width (K)")
    ap.add_argument("--n", type=int, default=2048, help="output width (N)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((1, args.rows, args.k)).astype(np.float32)).astype(mx.bfloat16)
    w = mx.array(rng.standard_normal((args.n, args.k)).astype(np.float32) / args.k**0.5).astype(mx.bfloat16)
    wq, scales, biases = mx.quantize(w, group_size=args.group_size, bits=args.bits)
    dense = mx.dequantize(wq, scales, biases, group_size=args.group_size, bits=args.bits)
    want = (x.astype(mx.float32) @ dense.astype(mx.float32).T)
    mx.eval(want)
    want = np.array(want)
    print(f"mlx {mx.__version__} on {mx.default_device()}: x [1, {args.rows}, {args.k}] bfloat16 @ "
          f"{args.bits}-bit [{args.n}, {args.k}] (group {args.group_size})")
    first, failed = None, False
    for r in range(args.repeats):
        y = mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=args.group_size, bits=args.bits)
        got = np.array(y.astype(mx.float32))
        err = float(np.max(np.abs(got - want))) if np.isfinite(got).all() else float("nan")
        same = first is None or np.array_equal(got, first, equal_nan=True)
        first = got if first is None else first
        bad = not (err <= 0.25 * float(np.abs(want).max())) or not same  # NaN fails the first test
        failed |= bad
        print(f"repeat {r}: largest difference {err:.4g} (answers up to {np.abs(want).max():.3g}); "
              f"{'same as' if same else 'DIFFERENT from'} repeat 0{'  <- wrong' if bad else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
