"""Where a compiled decode step's (or a prefill's) time goes on a CUDA GPU, by kernel class.

    # the step's wall time (no profiler): ms per token over --steps compiled steps
    python3 benchmarks/profile_step.py time BUNDLE [--steps 64]
    # the kernels of --steps steps under Nsight Compute (only those steps are profiled)
    ncu --profile-from-start off --metrics gpu__time_duration.sum --csv --log-file K.csv \
        python3 benchmarks/profile_step.py kernels BUNDLE --steps 1
    python3 benchmarks/profile_step.py parse K.csv [--wall-ms MS] [--steps 1]
    # a prefill of --prompt tokens: wall ms (median of 5 after 2 warm-ups) of our runtime, of a
    # variant of it, or of mlx-lm's gemma3n on a generic 4-bit bundle's arrays (bench_quantized.py)
    python3 benchmarks/profile_step.py prefill-time PATH [--impl ours|mlx-lm] [--variant V] [--prompt 64]
    # its kernels under Nsight Compute, as `kernels` (--steps 1: one prefill)
    ncu ... python3 benchmarks/profile_step.py prefill-kernels PATH [--impl ...] [--variant ...]

Variants of our prefill (timing only, to find what costs): `kernel` takes MLX's quantized
matmul for several rows of a 64-wide input where the runtime's probe found it wrong
(runtime/quirks.py: fast but wrong answers), `whole` multiplies a fused quantized module in one
product instead of member by member (runtime/model.py, `project`).

`kernels` warms the compiled decoder up (so compilation stays out), then brackets the profiled
steps with cudaProfilerStart/Stop. `parse` sums the kernels' device time per class (GEMV and
quantized matmuls, attention, fused element-wise chains, reductions and norms, copies and
updates, other) and per kernel name; with the step's wall time it says how much of a step the
device is busy and how much is left to the host (graph building, launches, gaps).
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import re
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

CLASSES = [  # first match wins
    # the runtime's own (runtime/cuda_blocks.py; "gemma3n" would match "gemm" below)
    ("block kernels (ours)", r"custom_kernel"),
    ("quantized matmul", r"qmv|qmm|quantized|affine_dequant|dequant"),
    ("gemv / gemm", r"gemv|gemm|cutlass|cublas|sm90_xmma|ampere|matmul|Matmul"),
    ("attention", r"sdpa|attention|softmax|Softmax"),
    ("norm / reduction", r"rms|RMS|norm|reduce|Reduce|all_reduce|row_reduce|col_reduce"),
    ("copy / update / gather", r"copy|Copy|scatter|Scatter|gather|Gather|slice|Slice|concat|update"),
    ("fused element-wise",
     r"Compiled|compiled|fused|Fused|Multiply|Add|Tanh|Exp|Sigmoid|binary|unary|ternary|Binary|Unary"),
]


def classify(name: str) -> str:
    for label, pattern in CLASSES:
        if re.search(pattern, name):
            return label
    return "other"


def decoder_for(bundle: str):
    import mlx.core as mx
    import numpy as np

    from runtime.fast import CompiledDecoder
    from runtime.loader import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(bundle)
    c = model.config
    prompt = mx.array(np.random.default_rng(0).integers(3, min(c.vocab_size, c.vocab_size_per_layer_input), 64),
                      dtype=mx.int32)
    cache = model.make_cache()
    logits = model(prompt[None], cache=cache)[:, -1, :]
    token = mx.argmax(logits, axis=-1)
    mx.eval(token)
    decoder = CompiledDecoder(model, cache, capacity=1024)
    return decoder, token


def run_steps(decoder, token, steps: int):
    import mlx.core as mx

    for _ in range(steps):
        token = mx.argmax(decoder(token), axis=-1)
        mx.async_eval(token)
    mx.eval(token)
    return token


def cmd_time(bundle: str, steps: int) -> None:
    decoder, token = decoder_for(bundle)
    token = run_steps(decoder, token, 8)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        token = run_steps(decoder, token, steps)
        times.append((time.perf_counter() - t0) / steps * 1e3)
    print(f"wall ms per step: {sorted(times)[1]:.3f} (runs: {', '.join(f'{t:.3f}' for t in times)})")


def profiler(start: bool) -> None:
    for lib, fn in (("libcudart.so.13", "cudaProfilerStart" if start else "cudaProfilerStop"),
                    ("libcudart.so", "cudaProfilerStart" if start else "cudaProfilerStop"),
                    ("libcuda.so.1", "cuProfilerStart" if start else "cuProfilerStop")):
        try:
            getattr(ctypes.CDLL(lib), fn)()
            return
        except OSError:
            continue
    raise SystemExit("no CUDA runtime or driver library to start the profiler with")


def cmd_kernels(bundle: str, steps: int) -> None:
    import mlx.core as mx

    decoder, token = decoder_for(bundle)
    token = run_steps(decoder, token, 8)
    mx.synchronize()
    profiler(True)
    token = run_steps(decoder, token, steps)
    mx.synchronize()
    profiler(False)
    print(f"profiled {steps} step(s)")


def prefill_model(path: str, impl: str, variant: str):
    """The model a prefill runs: ours (as loaded, or with `variant` patched in) or mlx-lm's."""
    if impl == "mlx-lm":
        from bench_quantized import load_mlx_lm_quantized

        return load_mlx_lm_quantized(path)
    from bench_runtime import load_ours

    if variant == "kernel":
        import runtime.projections

        runtime.projections.wrong_multirow = lambda *a: False
    elif variant == "whole":
        import runtime.model

        class Never:  # no module is this: project() never takes the member-by-member path
            pass

        runtime.model.QuantizedStandard = Never
    return load_ours(path)


def prefill_once(model, prompt) -> None:
    import mlx.core as mx

    logits = model(prompt[None], cache=model.make_cache())
    mx.eval(mx.argmax(logits[:, -1, :], axis=-1))


def prefill_setup(path: str, impl: str, variant: str, prompt_len: int):
    import mlx.core as mx
    import numpy as np

    from bench_runtime import id_limit

    model = prefill_model(path, impl, variant)
    prompt = mx.array(np.random.default_rng(0).integers(3, id_limit(path), prompt_len), dtype=mx.int32)
    for _ in range(2):
        prefill_once(model, prompt)
    return model, prompt


def cmd_prefill_time(path: str, impl: str, variant: str, prompt_len: int) -> None:
    model, prompt = prefill_setup(path, impl, variant, prompt_len)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        prefill_once(model, prompt)
        times.append((time.perf_counter() - t0) * 1e3)
    ms = sorted(times)[2]
    print(f"prefill {impl} {variant} {prompt_len} tokens: wall ms {ms:.3f} ({prompt_len / ms * 1e3:.0f} tok/s; "
          f"runs: {', '.join(f'{t:.2f}' for t in times)})")


def cmd_prefill_kernels(path: str, impl: str, variant: str, prompt_len: int) -> None:
    import mlx.core as mx

    model, prompt = prefill_setup(path, impl, variant, prompt_len)
    mx.synchronize()
    profiler(True)
    prefill_once(model, prompt)
    mx.synchronize()
    profiler(False)
    print(f"profiled one prefill of {prompt_len} tokens")


def cmd_parse(path: str, wall_ms: float | None, steps: int, top: int) -> None:
    rows = []
    with open(path, newline="") as f:
        lines = [line for line in f if line.startswith('"')]  # ncu's CSV rows; skip its log lines
    for row in csv.DictReader(lines):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        value = float(row["Metric Value"].replace(",", ""))
        unit = row.get("Metric Unit", "nsecond")
        scale = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0}.get(unit, 1e-6)
        rows.append((row["Kernel Name"], value * scale))
    if not rows:
        raise SystemExit(f"{path}: no gpu__time_duration.sum rows")
    per_class, per_name, count = defaultdict(float), defaultdict(float), defaultdict(int)
    for name, ms in rows:
        per_class[classify(name)] += ms
        short = name.split("(")[0][:90]
        per_name[short] += ms
        count[short] += 1
    total = sum(ms for _, ms in rows)
    print(f"{len(rows) / steps:.0f} kernels per step, {total / steps:.3f} ms of device time per step")
    if wall_ms:
        print(f"wall {wall_ms:.3f} ms per step: the device is busy {100 * total / steps / wall_ms:.0f} % of it")
    print("| kernel class | ms per step | share | kernels per step |")
    print("| --- | ---: | ---: | ---: |")
    n_class = defaultdict(int)
    for name, _ in rows:
        n_class[classify(name)] += 1
    for label, ms in sorted(per_class.items(), key=lambda kv: -kv[1]):
        print(f"| {label} | {ms / steps:.3f} | {100 * ms / total:.1f} % | {n_class[label] / steps:.0f} |")
    print(f"\ntop {top} kernels by device time:")
    for name, ms in sorted(per_name.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {ms / steps:8.3f} ms  x{count[name] / steps:5.0f}  {name}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["time", "kernels", "parse", "prefill-time", "prefill-kernels"])
    ap.add_argument("path")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--wall-ms", type=float)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--impl", choices=["ours", "mlx-lm"], default="ours")
    ap.add_argument("--variant", choices=["default", "kernel", "whole"], default="default")
    ap.add_argument("--prompt", type=int, default=64)
    args = ap.parse_args()
    if args.prompt < 1:
        ap.error(f"--prompt {args.prompt}: a prefill needs at least one token")
    if args.command == "time":
        cmd_time(args.path, args.steps or 64)
    elif args.command == "kernels":
        cmd_kernels(args.path, args.steps or 1)
    elif args.command == "prefill-time":
        cmd_prefill_time(args.path, args.impl, args.variant, args.prompt)
    elif args.command == "prefill-kernels":
        cmd_prefill_kernels(args.path, args.impl, args.variant, args.prompt)
    else:
        cmd_parse(args.path, args.wall_ms, args.steps or 1, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
