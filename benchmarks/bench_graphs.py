"""MLX's CUDA graph settings, for both implementations, alternating in fresh processes.

    # bf16: our compiled decode on a cuda bundle vs mlx-lm on the generic bundle's arrays
    python3 benchmarks/bench_graphs.py OURS_BUNDLE GENERIC_BUNDLE [--rounds 3] [--reps 3]
    # 4-bit: the same with quantized bundles (mlx-lm quantized as the manifest says)
    python3 benchmarks/bench_graphs.py OURS_Q4 GENERIC_Q4 --quantized
    # other settings: OPS/CACHE for both, ours:OPS/CACHE for our runtime only (repeatable);
    # `nographs`: MLX_USE_CUDA_GRAPHS=0, every kernel launched on the stream as encoded
    python3 benchmarks/bench_graphs.py ... --try 2000/2000 --try ours:2000/2000 --try 20/2000 --try nographs

MLX's CUDA build records kernels into CUDA graphs: it closes a graph every
MLX_MAX_OPS_PER_BUFFER kernels (default 20) and keeps MLX_CUDA_GRAPH_CACHE_SIZE instantiated
graphs (default 100), dropping all of them when the cache overflows. Each row is one setting:
`MLX defaults` (neither variable set: what both ship with; the runtime sets nothing), then each
`--try` (default: ours:2000/2000 and 2000/2000, a whole decode step in one graph). Every worker
reports the settings it ran with (`graph_env`), printed in the table. Settings rotate per round,
the two implementations alternate within each; medians of all samples, and each round's ratio of
the two processes' medians. The workers are bench_runtime.py's and bench_quantized.py's
(`worker decode`). Results: docs/BENCHMARKS.md (a whole step in one graph made our decode slower
and mlx-lm's faster; MLX's defaults stay).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from common import CUDA_GRAPH_VARS, common_prefix, machine_facts, median, print_facts, run_child, table  # noqa: E402

DEFAULT_TRIES = ["ours:2000/2000", "2000/2000"]


def parse_try(text: str) -> tuple[str, dict, dict]:
    """`[ours:]OPS/CACHE` or `[ours:]nographs` -> (row name, ours' variables, mlx-lm's variables)."""
    only_ours = text.startswith("ours:")
    body = text.removeprefix("ours:")
    if body == "nographs":
        env = {"MLX_USE_CUDA_GRAPHS": "0"}
    else:
        try:
            ops, cache = (str(int(v)) for v in body.split("/"))
        except ValueError:
            raise SystemExit(f"--try {text!r}: expected [ours:]OPS/CACHE (e.g. 2000/2000) or [ours:]nographs") from None
        env = dict(zip(CUDA_GRAPH_VARS[:2], (ops, cache), strict=True))
    body = "no CUDA graphs" if body == "nographs" else body
    return (f"{body} for ours only" if only_ours else f"{body} for both"), env, ({} if only_ours else env)


def environment(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CUDA_GRAPH_VARS}
    env.update(extra)
    return env


def run_worker(script: str, impl: str, path: str, a, env: dict) -> dict:
    argv = [sys.executable, str(ROOT / "benchmarks" / script), "worker", "decode", impl, path, "--prompt",
            str(a.prompt), "--tokens", str(a.tokens), "--reps", str(a.reps), "--warmup", str(a.warmup)]
    run = run_child(argv, sync=False, env=env, capture_stdout=True)
    if run.returncode != 0:
        tail = run.stderr.strip().splitlines()[-3:]
        raise SystemExit(f"worker {impl} {path} failed (exit {run.returncode}): {' | '.join(tail)}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def short(env: dict) -> str:
    if env.get("MLX_USE_CUDA_GRAPHS") == "0":
        return "no CUDA graphs"
    values = [env.get(k) for k in CUDA_GRAPH_VARS[:2]]
    return "MLX defaults" if values == [None, None] else "/".join(v or "default" for v in values)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ours", help="our bundle (decoded with the compiled step)")
    p.add_argument("peer", help="the generic bundle whose arrays mlx-lm runs")
    p.add_argument("--quantized", action="store_true", help="4-bit bundles (bench_quantized.py's workers)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per process")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--try", dest="tries", action="append", default=None, metavar="[ours:]OPS/CACHE|[ours:]nographs",
                   help=f"a setting besides MLX's defaults (default: {' and '.join(DEFAULT_TRIES)})")
    p.add_argument("--json", default=None)
    p.add_argument("--dry-run", action="store_true",
                   help="print, per setting, the graph variables each side's workers would get, and stop")
    a = p.parse_args(argv)
    settings = {"MLX defaults": ({}, {})}
    for text in a.tries or DEFAULT_TRIES:
        name, ours_env, peer_env = parse_try(text)
        settings[name] = (ours_env, peer_env)
    if a.dry_run:
        print(json.dumps({name: {side: {k: v for k, v in environment(env).items() if k in CUDA_GRAPH_VARS}
                                 for side, env in zip(("ours", "mlx-lm"), envs, strict=True)}
                          for name, envs in settings.items()}))
        return 0
    script = "bench_quantized.py" if a.quantized else "bench_runtime.py"
    impls = [("ours", "ours-compiled", a.ours), ("mlx-lm", "mlx-lm", a.peer)]
    names = list(settings)
    facts = machine_facts()
    print_facts(facts)
    print(f"{script} workers, prompt {a.prompt}, {a.tokens} tokens, {a.reps} reps after {a.warmup} warm-up per "
          f"process, {a.rounds} rounds", flush=True)
    results = {n: {label: {"decode_tps": [], "graph_env": None, "ids": None} for label, _, _ in impls} for n in names}
    rounds = {n: [] for n in names}
    for r in range(a.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            pair = impls if r % 2 == 0 else impls[::-1]
            medians = {}
            for label, impl, path in pair:
                res = run_worker(script, impl, path, a, environment(settings[n][label != "ours"]))
                agg = results[n][label]
                agg["decode_tps"] += res["decode_tps"]
                agg["graph_env"], agg["ids"] = res.get("graph_env"), res["ids"]
                medians[label] = median(res["decode_tps"])
            rounds[n].append(medians["ours"] / medians["mlx-lm"])
            print(f"round {r + 1} {n:26s} ours {medians['ours']:7.1f} tok/s  mlx-lm {medians['mlx-lm']:7.1f} tok/s  "
                  f"ratio {rounds[n][-1]:.2f}", flush=True)
    rows = []
    for n in names:
        ours, peer = results[n]["ours"], results[n]["mlx-lm"]
        d, pd = median(ours["decode_tps"]), median(peer["decode_tps"])
        rows.append([n, short(ours["graph_env"] or {}), short(peer["graph_env"] or {}), d, min(ours["decode_tps"]),
                     max(ours["decode_tps"]), pd, min(peer["decode_tps"]), max(peer["decode_tps"]), d / pd,
                     " ".join(f"{x:.2f}" for x in rounds[n]),
                     f"{common_prefix(ours['ids'], peer['ids'])}/{len(peer['ids'])}"])
    print()
    print(table(["settings", "ours ran with", "mlx-lm ran with", "ours tok/s", "min", "max", "mlx-lm tok/s", "min",
                 "max", "ratio", "ratio per round", "greedy ids equal to mlx-lm's"], rows, "lllrrrrrrrll"))
    if a.json:
        Path(a.json).write_text(json.dumps({"facts": facts, "settings": settings, "results": results,
                                            "round_ratios": rounds}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
