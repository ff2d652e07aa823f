"""Which shapes of MLX's quantized matmul give wrong or changing answers on this device?

    python3 benchmarks/cuda_qmm_sweep.py [--repeats 4] [--json OUT]

MLX alone. For each (M, K, N) and bits/group size, a random bfloat16 `x [1, M, K]` and a random
weight quantized by `mx.quantize`; the answer on the default device is compared with the same
product on the CPU (`mx.dequantize`, then a float32 matmul): the error relative to the largest
|answer| (bfloat16 accumulation stays under 0.12; 0.25 and more marks a wrong answer), NaN, and
whether repeats give the same bytes (fresh, and after filling MLX's buffer cache with NaN buffers).
A shape that raises says so. Prints one row per shape, the broken ones marked.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_facts  # noqa: E402

MS = (1, 2, 4, 7, 8, 16, 64)
KS = (64, 256, 512, 2048, 8192)
NS = (256, 2048, 7680)


def poison(gigabytes: float = 1.0) -> None:
    bufs, size, total = [], 1 << 10, 0
    while total < gigabytes * 2**30:
        bufs.append(mx.full((size,), mx.nan, mx.float32))
        total += size * 4
        size = min(size * 2, 1 << 26)
    mx.eval(bufs)
    del bufs


def check(m: int, k: int, n: int, bits: int, group: int, repeats: int, rng) -> dict:
    x = mx.array(rng.standard_normal((1, m, k)).astype(np.float32)).astype(mx.bfloat16)
    w = mx.array((rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)).astype(mx.bfloat16)
    wq, scales, biases = mx.quantize(w, group_size=group, bits=bits)
    mx.eval(x, wq, scales, biases)
    with mx.stream(mx.cpu):
        dense = mx.dequantize(wq, scales, biases, group_size=group, bits=bits).astype(mx.float32)
        ref = np.array(x.astype(mx.float32) @ dense.T)
    row = {"M": m, "K": k, "N": n, "bits": bits, "group": group}
    outs = {}
    for cond in ("fresh", "poisoned"):
        runs = []
        for _ in range(repeats):
            if cond == "poisoned":
                poison()
            try:
                y = mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=group, bits=bits)
                mx.eval(y)
            except (RuntimeError, ValueError) as e:
                row["error"] = str(e).splitlines()[0][:160]
                return row
            runs.append(np.array(y.astype(mx.float32)))
        outs[cond] = runs
    scale = float(np.abs(ref).max()) or 1.0
    allruns = outs["fresh"] + outs["poisoned"]
    row["rel_err"] = max(float(np.nanmax(np.abs(r - ref))) / scale if np.isfinite(r).all() else float("inf")
                         for r in allruns)
    row["nan"] = sum(bool(np.isnan(r).any()) for r in allruns)
    row["same_fresh"] = all(np.array_equal(r, outs["fresh"][0], equal_nan=True) for r in outs["fresh"])
    row["same_poisoned"] = all(np.array_equal(r, outs["poisoned"][0], equal_nan=True) for r in outs["poisoned"])
    row["ok"] = row["rel_err"] < 0.25 and not row["nan"] and row["same_fresh"] and row["same_poisoned"]
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bits", default="4,8")
    ap.add_argument("--group", default="64")
    ap.add_argument("--json")
    args = ap.parse_args()
    print(f"mlx {mx.__version__} on {mx.default_device()} {mx.device_info().get('device_name', '')}", flush=True)
    rng = np.random.default_rng(0)
    rows = []
    for bits in (int(b) for b in args.bits.split(",")):
        for group in (int(g) for g in args.group.split(",")):
            for k in KS:
                for n in NS:
                    for m in MS:
                        r = check(m, k, n, bits, group, args.repeats, rng)
                        rows.append(r)
                        mark = "ERROR" if "error" in r else ("ok" if r["ok"] else "BROKEN")
                        detail = r.get("error") or (f"rel err {r['rel_err']:.3g}, NaN runs {r['nan']}, "
                                                    f"repeats same: fresh {r['same_fresh']}, poisoned {r['same_poisoned']}")
                        print(f"{mark:6s} bits {bits} group {group} M {m:3d} K {k:5d} N {n:5d}: {detail}", flush=True)
    bad = [r for r in rows if not r.get("ok")]
    print(f"{len(bad)} of {len(rows)} shapes wrong, changing or refused")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"facts": machine_facts(), "rows": rows}, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
