"""Time to the first token from a process start, with MLX's kernel caches empty or warm.

    python3 benchmarks/bench_coldstart.py OURS_BUNDLE MLX_LM_BUNDLE [--rounds 2] [--tokens 16] [--json OUT]

Each measurement is a fresh process of its own (`worker`), started by this script, which notes
the moment it spawned it. The worker imports MLX, loads the model (ours: `runtime.load` and
`runtime.stream_generate` with compiled decode; mlx-lm: its `gemma3n` on the generic bundle's
arrays, quantized as its manifest records where its config.json says so (bench_quantized.py), and
`mlx_lm.generate.generate_step`), prefills a fixed 64-token prompt and decodes; it
reports, as seconds after the spawn, when the model was ready, when the first token came out
(time to first token) and when the first and the tenth decoded token came out.

A "fresh machine" is emulated on this one: MLX compiles its fused kernels at first use and
keeps them on disk, on CUDA in `MLX_PTX_CACHE_DIR` (default: /tmp/mlx/<version>/ptx; the driver
keeps its own compilation cache, which `CUDA_CACHE_DISABLE=1` turns off), on the CPU (built by
the system's C++ compiler) under `$TMPDIR/mlx/<version>/cpu`. A `cold` run gets a new, empty
directory for both and the driver cache off; the `warm` run after it reuses that directory. The
number of kernels a run compiled is the number of modules (CUDA) or libraries (CPU: one per
contiguous or strided variant) it left there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from common import machine_facts, median, print_facts, table  # noqa: E402

IMPLS = ("ours", "ours-foreground", "mlx-lm")


def watch_child_memory(pid: int, marks: dict) -> None:
    """Sample the child's own peak resident memory (`VmHWM` of /proc/PID/status, Linux) every 0.2 s
    until it exits, into marks["child_peak_rss_gb"]. Not getrusage: a child started by fork and
    exec is charged its parent's peak at the exec (the parent here holds the whole model)."""
    import threading

    def watch():
        while True:
            try:
                with open(f"/proc/{pid}/status") as f:
                    kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
            except (OSError, StopIteration, ValueError):
                return
            marks["child_peak_rss_gb"] = max(marks.get("child_peak_rss_gb", 0.0), kib * 1024 / 1e9)
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()


def worker(impl: str, bundle: str, spawned: float, tokens: int, prompt_len: int) -> dict:
    import mlx.core as mx
    import numpy as np

    marks = {"imported": time.time() - spawned}
    config = json.loads(Path(bundle, "config.json").read_text())
    job = None
    if impl.startswith("ours"):
        import warnings

        import runtime

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, _ = runtime.load(bundle)
        if impl == "ours":  # as `runtime generate`: a cold machine's kernels compile in a child meanwhile
            from runtime import precompile

            job = precompile.start(model)
            if job is not None:
                watch_child_memory(job.child.pid, marks)
        marks["background_compile"] = job is not None
    elif "quantization" in config:  # mlx-lm's own test: a generic bundle's config.json is written for it
        from bench_quantized import load_mlx_lm_quantized

        model = load_mlx_lm_quantized(bundle)
    else:
        from bench_runtime import load_mlx_lm

        model = load_mlx_lm(bundle)
    marks["ready"] = time.time() - spawned
    text = config.get("text_config", config)
    limit = min(int(text["vocab_size"]), int(text.get("vocab_size_per_layer_input", text["vocab_size"])))
    prompt = np.random.default_rng(0).integers(3, limit, prompt_len).tolist()
    times = []
    if impl.startswith("ours"):
        from runtime import stream_generate

        for _ in stream_generate(model, None, prompt, max_tokens=tokens, eos_token_ids=[]):
            times.append(time.time() - spawned)
    else:
        from mlx_lm.generate import generate_step

        for _, _ in zip(range(tokens), generate_step(mx.array(prompt), model), strict=False):
            times.append(time.time() - spawned)
    marks["first_token"] = times[0]
    marks["second_token"] = times[1] if len(times) > 1 else float("nan")
    marks["tenth_token"] = times[10] if len(times) > 10 else float("nan")
    marks["last_token"] = times[-1]
    marks["steady_tok_s"] = (len(times) - 2) / (times[-1] - times[1]) if len(times) > 2 else float("nan")
    marks["peak_gb"] = mx.get_peak_memory() / 1e9
    if job is not None:  # `runtime generate` waits for it before exiting, so that the next run is warm
        job.finish()
        marks["child_done"] = time.time() - spawned
        marks["child_failure"] = job.failure

    return marks


def measure(impl: str, bundle: str, ptx_dir: str, tokens: int, prompt_len: int) -> dict:
    # CUDA keeps its PTX in MLX_PTX_CACHE_DIR; the CPU its compiled libraries under $TMPDIR/mlx.
    env = dict(os.environ, MLX_PTX_CACHE_DIR=ptx_dir, CUDA_CACHE_DISABLE="1", TMPDIR=ptx_dir)
    spawned = time.time()
    run = subprocess.run([sys.executable, str(Path(__file__).resolve()), "worker", impl, bundle, repr(spawned),
                          str(tokens), str(prompt_len)], capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise SystemExit(f"worker {impl} failed ({run.returncode}):\n{run.stderr[-3000:]}")
    result = json.loads(run.stdout.strip().splitlines()[-1])
    result["exit"] = time.time() - spawned
    result["kernels_cached"] = sum(1 for p in Path(ptx_dir).rglob("*") if p.is_file() and p.suffix in (".ptx", ".so"))
    return result


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        impl, bundle, spawned, tokens, prompt_len = sys.argv[2:7]
        print(json.dumps(worker(impl, bundle, float(spawned), int(tokens), int(prompt_len))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ours", help="our bundle")
    ap.add_argument("mlx_lm", help="a generic bundle (or a checkpoint) for mlx-lm")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--impls", default=",".join(IMPLS),
                    help="ours (a cold machine's kernels compiled by a child while decoding eagerly, as `runtime "
                         "generate` does), ours-foreground (compiled in the process, at its first compiled step), "
                         "mlx-lm")
    ap.add_argument("--json")
    args = ap.parse_args()
    unknown = [i for i in args.impls.split(",") if i not in IMPLS]
    if unknown or not args.impls:
        ap.error(f"--impls: {', '.join(unknown) or 'none given'}: not one of {', '.join(IMPLS)}")
    facts = machine_facts()
    print_facts(facts)
    runs: dict[str, list] = {}
    impls = args.impls.split(",")
    for r in range(args.rounds):
        order = impls if r % 2 == 0 else impls[::-1]
        for impl in order:
            path = args.ours if impl.startswith("ours") else args.mlx_lm
            with tempfile.TemporaryDirectory(prefix="ptx-") as ptx:
                for state in ("cold", "warm"):
                    res = measure(impl, path, ptx, args.tokens, args.prompt)
                    runs.setdefault(f"{impl} {state}", []).append(res)
                    child = (f", child done at {res['child_done']:.1f} s, its peak RSS "
                             f"{res.get('child_peak_rss_gb', float('nan')):.2f} GB" if "child_done" in res else "")
                    print(f"round {r} {impl:15s} {state}: ready {res['ready']:.1f} s, first token "
                          f"{res['first_token']:.1f} s, tenth {res['tenth_token']:.1f} s, last "
                          f"{res['last_token']:.1f} s, exit {res['exit']:.1f} s, kernels cached "
                          f"{res['kernels_cached']}{child}", flush=True)
    rows = []
    for key, values in runs.items():
        rows.append([key, median(v["ready"] for v in values), median(v["first_token"] for v in values),
                     median(v["second_token"] for v in values), median(v["tenth_token"] for v in values),
                     median(v["last_token"] for v in values), median(v["exit"] for v in values),
                     median(v["kernels_cached"] for v in values), len(values)])
    print(f"{args.tokens} tokens after a {args.prompt}-token prompt; seconds from the process's start")
    print(table(["impl, caches", "ready s", "first token s", "2nd token s", "10th token s", "last token s", "exit s",
                 "kernels", "runs"], rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"facts": facts, "args": vars(args), "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
