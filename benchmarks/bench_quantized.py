"""Quantized bundles: size and conversion cost next to mlx_lm.convert -q, decode next to mlx-lm.

    # convert --quantize (generic) vs mlx_lm.convert -q on the same float source; sizes and make-up
    python3 benchmarks/bench_quantized.py convert SOURCE --work DIR [--bits 4] [--group-size 64]
        [--dtype keep|float32] [--runs 1] [--keep]
    # decode tok/s: our runtime on a quantized bundle vs mlx-lm's gemma3n on the same arrays
    python3 benchmarks/bench_quantized.py decode BUNDLE [--mlx-lm-dir DIR] [--rounds 3]

`convert`: each tool is a child process (wall, +sync, peak RSS from os.wait4), order rotating per
run; outputs are deleted after each run unless `--keep` (then they stay at WORK/ours and
WORK/mlx-lm for `decode`). The make-up table splits a bundle's bytes into packed weights,
scales + biases, and float tensors.

`decode`: mlx-lm runs the bundle's very arrays: its `gemma3n.Model` is quantized with
`nn.quantize` where the manifest records a quantized module (what mlx-lm's own loader does where
a `.scales` tensor exists), then loaded strictly but for the K/V of KV-shared layers (dropped by
our converter, never used with a cache). So both sides read the same bytes and must give the
same greedy ids. `--mlx-lm-dir` adds mlx-lm on its own `mlx_lm.convert -q` output (its loader,
its weights: the router is quantized there too) as a third model. Each measurement runs in a
fresh child, the implementations alternate, the order rotates per round, figures are medians.

On this CPU, quantized_matmul is fast only in float32 (a bfloat16 4-bit GEMV of 8192 x 2048 took
175 ms, float32 23 ms, dense bfloat16 19 ms: measured here), so the CPU figures use bundles
converted with `--dtype float32` (float32 scales, biases and float tensors).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from bench_runtime import greedy, id_limit, load_ours, mlx_lm_gemma3n, shard_paths  # noqa: E402
from common import dir_bytes, graph_env, json_child, machine_facts, median, print_facts, run_child, table  # noqa: E402

PEER_SAME = "mlx-lm gemma3n, same arrays"
PEER_OWN = "mlx-lm, its own convert -q"


# --- in the child ------------------------------------------------------------------------------

def load_mlx_lm_quantized(bundle: str):
    """mlx-lm's gemma3n on a generic quantized bundle's arrays (see the module docstring)."""
    import mlx.core as mx
    import mlx.nn as nn
    import yaml
    from mlx.utils import tree_flatten

    gemma3n = mlx_lm_gemma3n()
    manifest = yaml.safe_load(Path(bundle, "manifest.yaml").read_text())
    config = json.loads(Path(bundle, "config.json").read_text())  # a generic bundle's: written for mlx-lm
    text = config.get("text_config", config)
    weights = {}
    for f in shard_paths(bundle):
        weights.update(mx.load(f))
    model = gemma3n.Model(gemma3n.ModelArgs.from_dict({"model_type": "gemma3n", "text_config": text}))
    records = {**manifest["projections"], **manifest["embeddings"]}

    def quantized(path, module):
        q = (records.get(path) or {}).get("quantized")
        if not q or not hasattr(module, "to_quantized"):
            return False
        return {"group_size": q["group_size"], "bits": q["bits"], "mode": q["mode"]}

    nn.quantize(model, class_predicate=quantized)
    weights = model.sanitize(weights)
    wanted = {k for k, _ in tree_flatten(model.parameters())}
    first_shared = int(text["num_hidden_layers"]) - int(text.get("num_kv_shared_layers", 0))
    unused = {f"model.language_model.layers.{i}.self_attn.{n}.{leaf}"
              for i in range(first_shared, int(text["num_hidden_layers"]))
              for n in ("k_proj", "v_proj", "k_norm") for leaf in ("weight", "scales", "biases")}
    missing, extra = wanted - weights.keys() - unused, weights.keys() - wanted
    if missing or extra:
        raise SystemExit(f"{bundle}: mlx-lm cannot run this bundle (a `generic` one is needed): "
                         f"missing {sorted(missing)[:2]}, extra {sorted(extra)[:2]}")
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    return model


def load_mlx_lm_own(directory: str):
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(directory))
    return model


def worker_decode(impl: str, path: str, prompt_len: int, tokens: int, reps: int, warmup: int, seed: int) -> dict:
    import mlx.core as mx
    import numpy as np

    loaders = {"ours": load_ours, "ours-compiled": load_ours, "mlx-lm": load_mlx_lm_quantized,
               "mlx-lm-own": load_mlx_lm_own}
    model = loaders[impl](path)
    prompt = mx.array(np.random.default_rng(seed).integers(3, id_limit(path), prompt_len), dtype=mx.int32)
    prefill_tps, decode_tps, ids = [], [], None
    for r in range(warmup + reps):
        prefill, decode, ids = greedy(model, prompt, tokens, compiled=impl == "ours-compiled")
        if r >= warmup:
            prefill_tps.append(prompt_len / prefill)
            decode_tps.append((len(ids) - 1) / decode)
    return {"prompt_tps": prefill_tps, "decode_tps": decode_tps, "ids": ids,
            "mlx_peak_bytes": mx.get_peak_memory(), "device": str(mx.default_device()), "graph_env": graph_env()}


# --- in the parent -----------------------------------------------------------------------------

def child(args: list[str]) -> tuple[dict, object]:
    return json_child(__file__, args)


def make_up(bundle: Path) -> dict:
    """Bytes of a bundle's tensors: packed quantized weights, scales + biases, float tensors."""
    import mlx.core as mx

    arrays = {}
    for f in shard_paths(str(bundle)):
        arrays.update(mx.load(f))  # lazy: nbytes without reading
    packed = sum(a.nbytes for k, a in arrays.items() if a.dtype == mx.uint32)
    groups = sum(a.nbytes for k, a in arrays.items() if k.endswith((".scales", ".biases")))
    return {"packed": packed, "scales+biases": groups, "float": sum(a.nbytes for a in arrays.values()) - packed - groups,
            "files": dir_bytes(bundle, "*.safetensors")}


def bench_convert(a) -> None:
    src = Path(a.source).resolve()
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    q = ["--quantize", str(a.bits), "--group-size", str(a.group_size)]
    dtype = [] if a.dtype == "keep" else ["--dtype", a.dtype]
    tools = {
        "convert --quantize (generic)": [sys.executable, "-m", "convert", "--target", "generic", "--quiet", *q,
                                         *dtype],
        "mlx_lm.convert -q": [sys.executable, "-m", "mlx_lm", "convert", "-q", "--q-bits", str(a.bits),
                              "--q-group-size", str(a.group_size), "--dtype",
                              "bfloat16" if a.dtype == "keep" else a.dtype, "--hf-path"],
    }
    outs = {"convert --quantize (generic)": work / "ours", "mlx_lm.convert -q": work / "mlx-lm"}
    src_bytes = dir_bytes(src, "*.safetensors")
    print(f"source {src}: {src_bytes / 1e9:.2f} GB; {a.bits}-bit, group {a.group_size}, dtype {a.dtype}; "
          f"{a.runs} runs", flush=True)
    run_child(["cat", *map(str, sorted(src.glob("*.safetensors")))], sync=False)
    runs: dict[str, list] = {t: [] for t in tools}
    names = list(tools)
    for r in range(a.runs):
        for tool in names[r % 2:] + names[: r % 2]:
            out = outs[tool]
            if out.exists():
                shutil.rmtree(out)
            argv = tools[tool] + ([str(src), "--mlx-path", str(out)] if "mlx_lm" in tool else [str(src), str(out)])
            res = run_child(argv)
            if res.returncode != 0:
                print(f"{tool}: exit {res.returncode}: {res.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                continue
            runs[tool].append({"wall_s": res.wall_s, "synced_s": res.synced_s, "max_rss_bytes": res.max_rss_bytes,
                               **make_up(out)})
            x = runs[tool][-1]
            print(f"run {r + 1} {tool:30s} wall {res.wall_s:7.1f} s  +sync {res.synced_s:7.1f} s  "
                  f"peak RSS {res.max_rss_bytes / 1e9:5.2f} GB  out {x['files'] / 1e9:5.2f} GB", flush=True)
            if not (a.keep and r == a.runs - 1):
                shutil.rmtree(out)
    rows = []
    for tool in names:
        ok = runs[tool]
        if not ok:
            continue
        rows.append([tool, len(ok), median(x["wall_s"] for x in ok), median(x["synced_s"] for x in ok),
                     median(x["max_rss_bytes"] for x in ok) / 1e9, ok[-1]["files"] / 1e9, ok[-1]["packed"] / 1e9,
                     ok[-1]["scales+biases"] / 1e9, ok[-1]["float"] / 1e9, src_bytes / ok[-1]["files"]])
    print()
    print(table(["tool", "runs", "wall s", "+sync s", "peak RSS GB", "bundle GB", "packed GB", "scales+biases GB",
                 "float GB", "x smaller than source"], rows))
    if a.json:
        Path(a.json).write_text(json.dumps({"facts": machine_facts(), "runs": runs}, indent=2))


def bench_decode(a) -> None:
    ours = "ours-compiled" if a.compiled else "ours"
    suffix = ", compiled" if a.compiled else ""
    impls = [(f"ours ({Path(b).name}{suffix})", ours, b) for b in (a.ours or [a.bundle])]
    impls.append((PEER_SAME, "mlx-lm", a.bundle))
    if a.mlx_lm_dir:
        impls.append((PEER_OWN, "mlx-lm-own", a.mlx_lm_dir))
    print(f"prompt {a.prompt} tokens, decode {a.tokens} tokens, {a.reps} reps after {a.warmup} warm-up per "
          f"process, {a.rounds} rounds, order rotating", flush=True)
    results = {label: {"prompt_tps": [], "decode_tps": [], "ids": None, "max_rss_bytes": 0} for label, _, _ in impls}
    for r in range(a.rounds):
        k = r % len(impls)
        for label, impl, path in impls[k:] + impls[:k]:
            res, run = child(["decode", impl, path, "--prompt", str(a.prompt), "--tokens", str(a.tokens),
                              "--reps", str(a.reps), "--warmup", str(a.warmup), "--seed", str(a.seed)])
            agg = results[label]
            agg["prompt_tps"] += res["prompt_tps"]
            agg["decode_tps"] += res["decode_tps"]
            agg["ids"], agg["device"], agg["mlx_peak_bytes"] = res["ids"], res["device"], res["mlx_peak_bytes"]
            agg["graph_env"] = res.get("graph_env")  # MLX's CUDA graph settings it ran with (None: default)
            agg["max_rss_bytes"] = max(agg["max_rss_bytes"], run.max_rss_bytes)
            print(f"round {r + 1} {label:40s} prompt {median(res['prompt_tps']):8.2f} tok/s  "
                  f"decode {median(res['decode_tps']):7.3f} tok/s", flush=True)
    peer = results[PEER_SAME]
    rows = []
    for label, _, path in impls:
        x = results[label]
        d = median(x["decode_tps"])
        rows.append([label, dir_bytes(Path(path), "*.safetensors") / 1e9, len(x["decode_tps"]),
                     median(x["prompt_tps"]), d, min(x["decode_tps"]), max(x["decode_tps"]),
                     d / median(peer["decode_tps"]), x["max_rss_bytes"] / 1e9,
                     "yes" if x["ids"] == peer["ids"] else "no"])
    print()
    print(f"device: {results[impls[0][0]].get('device')}")
    print(table(["model", "weights GB", "samples", "prompt tok/s", "decode tok/s (median)", "min", "max",
                 "x mlx-lm same arrays", "peak RSS GB", "same greedy ids"], rows, "lrrrrrrrrl"))
    if a.json:
        Path(a.json).write_text(json.dumps({"facts": machine_facts(), "results": results}, indent=2))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pc = sub.add_parser("convert", help="convert --quantize vs mlx_lm.convert -q: time, memory, size")
    pc.add_argument("source")
    pc.add_argument("--work", required=True, help="where outputs go (your own folder: it is emptied per run)")
    pc.add_argument("--bits", type=int, default=4)
    pc.add_argument("--group-size", type=int, default=64)
    pc.add_argument("--dtype", default="keep", choices=["keep", "bfloat16", "float16", "float32"])
    pc.add_argument("--runs", type=int, default=1)
    pc.add_argument("--keep", action="store_true", help="keep the last run's outputs (WORK/ours, WORK/mlx-lm)")
    pc.add_argument("--json", default=None)
    pd = sub.add_parser("decode", help="decode tok/s: ours vs mlx-lm on the same quantized arrays")
    pd.add_argument("bundle")
    pd.add_argument("--mlx-lm-dir", default=None, help="also run mlx-lm on its own mlx_lm.convert -q output")
    pd.add_argument("--ours", action="append", default=None,
                    help="run our runtime on this bundle instead (repeatable; e.g. a --target cuda one made from "
                         "the same source with the same --quantize, which mlx-lm cannot load when fused)")
    pd.add_argument("--compiled", action="store_true", help="our runtime with its compiled decode step")
    pd.add_argument("--prompt", type=int, default=16)
    pd.add_argument("--tokens", type=int, default=8)
    pd.add_argument("--reps", type=int, default=1)
    pd.add_argument("--warmup", type=int, default=1)
    pd.add_argument("--rounds", type=int, default=3)
    pd.add_argument("--seed", type=int, default=0)
    pd.add_argument("--json", default=None)
    pw = sub.add_parser("worker", help=argparse.SUPPRESS)
    pw.add_argument("what", choices=["decode"])
    pw.add_argument("impl")
    pw.add_argument("path")
    pw.add_argument("--prompt", type=int, default=16)
    pw.add_argument("--tokens", type=int, default=8)
    pw.add_argument("--reps", type=int, default=1)
    pw.add_argument("--warmup", type=int, default=1)
    pw.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.cmd == "worker":
        print(json.dumps(worker_decode(a.impl, a.path, a.prompt, a.tokens, a.reps, a.warmup, a.seed)))
        return 0
    print_facts(machine_facts())
    bench_convert(a) if a.cmd == "convert" else bench_decode(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
