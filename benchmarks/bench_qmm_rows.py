"""A quantized product over several rows, handed to MLX as batch entries of one row each (as the
runtime's eager model holds a prefill's tokens, `[1, tokens, 1, in]`) or as one `[tokens, in]`
matrix (what runtime/projections.py's `quantized_product` passes since the H100 showed the
first costing 3.4x the device time: docs/BENCHMARKS.md, the 4-bit prefill).

    python3 benchmarks/bench_qmm_rows.py [--rows 64] [--out 8192] [--in 2048] [--bits 4] [--repeats 5]

One weight (random, quantized with group size 64), each dtype, each layout: one warm-up, then
`--repeats` timed evaluations; the table gives the medians and their ratio, and checks that both
layouts give the same answers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import machine_facts, median, print_facts, table  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--out", type=int, default=8192)
    ap.add_argument("--in", dest="in_dims", type=int, default=2048)
    ap.add_argument("--bits", type=int, choices=[4, 8], default=4)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    if min(a.rows, a.out, a.repeats) < 1 or a.in_dims < 64 or a.in_dims % 64:
        ap.error("--rows, --out and --repeats at least 1; --in a multiple of 64")
    import mlx.core as mx

    print_facts(machine_facts())
    rows = []
    for dtype in (mx.float32, mx.bfloat16):
        w = mx.random.normal((a.out, a.in_dims), key=mx.random.key(0)).astype(dtype)
        wq, scales, biases = mx.quantize(w, group_size=64, bits=a.bits)
        x = mx.random.normal((1, a.rows, 1, a.in_dims), key=mx.random.key(1)).astype(dtype)
        mx.eval(wq, scales, biases, x)

        def product(v, wq=wq, scales=scales, biases=biases):
            return mx.quantized_matmul(v, wq, scales, biases, transpose=True, group_size=64, bits=a.bits)

        ms, answers = {}, {}
        for name, v in (("batched", x), ("one matrix", x.reshape(a.rows, a.in_dims))):
            answers[name] = product(v)
            mx.eval(answers[name])
            times = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                mx.eval(product(v))
                times.append((time.perf_counter() - t0) * 1e3)
            ms[name] = median(times)
        same = mx.allclose(answers["batched"].reshape(a.rows, a.out), answers["one matrix"], atol=1e-2).item()
        rows.append([str(dtype).rsplit(".", 1)[-1], ms["batched"], ms["one matrix"], ms["batched"] / ms["one matrix"],
                     "yes" if same else "NO"])
    print(f"{a.rows} rows x [{a.out}, {a.in_dims}] {a.bits}-bit, group 64, median of {a.repeats}, "
          f"device {mx.default_device()}")
    print(table(["dtype", f"batched [1, {a.rows}, 1, in] ms", f"one matrix [{a.rows}, in] ms", "batched / one",
                 "same answers"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
