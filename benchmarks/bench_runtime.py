"""Runtime speed: our bundles next to mlx-lm's `gemma3n` on the same weights, in the same run.

    # load-to-ready vs a raw read of the same bytes vs mlx-lm loading the source checkpoint
    python3 benchmarks/bench_runtime.py load BUNDLE [--source CKPT] [--runs 5]
    # prompt and decode tok/s: each bundle and mlx-lm, alternating, medians
    python3 benchmarks/bench_runtime.py decode BUNDLE [BUNDLE ...] [--source CKPT] [--rounds 3]

Every measurement runs in a fresh child process (one model in memory at a time, nothing
carried over), and the implementations alternate within each round, their order rotating
from round to round. mlx-lm loads the bundle's source checkpoint with its own loader (`--source`,
default the manifest's `source.path`), or, given a `generic` bundle as `--source`, that
bundle's arrays (mlx-lm's strict loader wants the unused K/V of KV-shared layers, which our
converter drops: only those stay at mlx-lm's initial values). The latter is how a bundle
converted with `--dtype float32` is compared without an 18 GB float32 source on disk.

Both models run through the same greedy loop here (prefill the whole prompt in one call, then
one token per step with `mx.async_eval` overlapping graph building with evaluation), so only the
model differs. Prompt ids are random in [3, 262144) (below both vocabularies), fixed by `--seed`.

Imports only mlx, mlx-lm's model file, numpy and this repository (runtime needs pyyaml), so it
runs on a GPU machine where little more than MLX's CUDA build is installed.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from common import common_prefix, graph_env, machine_facts, median, print_facts, run_child, table  # noqa: E402

READ_BLOCK = 16 << 20
PEER = "mlx-lm gemma3n, same weights"


# --- in the child ------------------------------------------------------------------------------

def shard_paths(path: str) -> list[str]:
    return sorted(glob.glob(os.path.join(path, "model*.safetensors")))


def load_ours(bundle: str):
    import mlx.core as mx
    from runtime.loader import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a target mismatch warning is expected on CPU for m5 bundles
        model = load_model(bundle)
    mx.eval(model.parameters())
    return model


def load_mlx_lm(source: str):
    """mlx-lm's own loader when it imports (it needs huggingface_hub and transformers), else the
    same steps with mlx-lm's model file: every shard via mx.load, sanitize, strict load_weights."""
    import mlx.core as mx

    if Path(source, "manifest.yaml").exists():
        return load_mlx_lm_from_bundle(source)
    try:
        from mlx_lm.utils import load_model
    except ImportError:
        load_model = None
    if load_model is not None:
        model, _ = load_model(Path(source))  # lazy=False: parameters evaluated before return
        return model
    gemma3n = mlx_lm_gemma3n()
    config = json.loads(Path(source, "config.json").read_text())
    weights = {}
    for f in shard_paths(source):
        weights.update(mx.load(f))
    model = gemma3n.Model(gemma3n.ModelArgs.from_dict(config))
    model.load_weights(list(model.sanitize(weights).items()), strict=True)
    mx.eval(model.parameters())
    return model


def load_mlx_lm_from_bundle(bundle: str):
    """mlx-lm's gemma3n on a `generic` bundle's arrays (all `[out, in]`, same names as the hub).

    A generic bundle is written for mlx-lm (its config.json and the K/V of KV-shared layers);
    this builds the model from the bundle's config.json without mlx-lm's own loader, which
    imports transformers. Older bundles lack those K/V, which mlx-lm's strict loader wants but
    never uses with a cache; those alone may stay at mlx-lm's initial values, and nothing else.
    This saves a second copy of the weights on disk (a float32 E2B is 18 GB).
    """
    import json

    import mlx.core as mx
    from mlx.utils import tree_flatten

    gemma3n = mlx_lm_gemma3n()
    config = json.loads(Path(bundle, "config.json").read_text())
    text = config.get("text_config", config)
    weights = {}
    for f in shard_paths(bundle):
        weights.update(mx.load(f))
    model = gemma3n.Model(gemma3n.ModelArgs.from_dict({"model_type": "gemma3n", "text_config": text}))
    weights = model.sanitize(weights)
    wanted = {k for k, _ in tree_flatten(model.parameters())}
    first_shared = int(text["num_hidden_layers"]) - int(text.get("num_kv_shared_layers", 0))
    unused = {f"model.language_model.layers.{i}.self_attn.{n}.weight"
              for i in range(first_shared, int(text["num_hidden_layers"])) for n in ("k_proj", "v_proj", "k_norm")}
    missing, extra = wanted - weights.keys() - unused, weights.keys() - wanted
    if missing or extra:
        raise SystemExit(f"{bundle}: mlx-lm cannot run this bundle (a `generic` one is needed): "
                         f"missing {sorted(missing)[:2]}, extra {sorted(extra)[:2]}")
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    return model


def mlx_lm_gemma3n():
    """mlx-lm's `models/gemma3n.py`, without running `mlx_lm/__init__.py`: that imports
    huggingface_hub and transformers, which a bare benchmark machine may lack."""
    import importlib
    import importlib.util
    import types

    try:
        return importlib.import_module("mlx_lm.models.gemma3n")
    except ImportError:
        pass
    for name in [m for m in sys.modules if m == "mlx_lm" or m.startswith("mlx_lm.")]:
        del sys.modules[name]
    spec = importlib.util.find_spec("mlx_lm")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("mlx-lm is not installed")
    package = types.ModuleType("mlx_lm")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["mlx_lm"] = package
    return importlib.import_module("mlx_lm.models.gemma3n")


def read_raw(path: str) -> int:
    """Read every shard's bytes into one reused buffer: the floor any loader stands on."""
    buf = bytearray(READ_BLOCK)
    view = memoryview(buf)
    total = 0
    for f in shard_paths(path):
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(view):
                total += n
    return total


def read_raw_resident(path: str) -> int:
    """Read every shard's bytes into fresh memory that stays allocated, as a loader must: the
    floor including the page faults of 9 GB of new memory, which `read_raw` does not pay."""
    import numpy as np

    kept = []
    for f in shard_paths(path):
        size = os.path.getsize(f)
        buf = np.empty(size, dtype=np.uint8)
        view = memoryview(buf)
        with open(f, "rb", buffering=0) as fh:
            done = 0
            while done < size and (n := fh.readinto(view[done:done + READ_BLOCK])):
                done += n
        kept.append(buf)
    return sum(b.nbytes for b in kept)


def mx_load_eval(path: str) -> int:
    import mlx.core as mx

    arrays = {}
    for f in shard_paths(path):
        arrays.update(mx.load(f))
    mx.eval(list(arrays.values()))
    return sum(a.nbytes for a in arrays.values())


def worker_load(impl: str, path: str) -> dict:
    import mlx.core as mx
    import mlx.nn  # noqa: F401  (imports are not load time, for either side)

    if impl == "ours":
        import runtime.loader  # noqa: F401
    elif impl == "mlx-lm":
        mlx_lm_gemma3n()
        try:
            import mlx_lm.utils  # noqa: F401
        except ImportError:
            pass
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    if impl == "ours":
        load_ours(path)
    elif impl == "mlx-lm":
        load_mlx_lm(path)
    elif impl == "raw read":
        read_raw(path)
    elif impl == "raw read resident":
        read_raw_resident(path)
    elif impl == "mx.load+eval":
        mx_load_eval(path)
    else:
        raise SystemExit(f"unknown impl {impl}")
    return {"seconds": time.perf_counter() - t0, "mlx_peak_bytes": mx.get_peak_memory()}


def greedy(model, prompt, tokens: int, compiled: bool = False) -> tuple[float, float, list[int]]:
    """(prefill seconds, decode seconds for `tokens` tokens after the first, ids).

    `compiled`: decode through runtime.fast.CompiledDecoder (our runtime only)."""
    import mlx.core as mx

    cache = model.make_cache()

    def step(ids):
        logits = model(ids[None], cache=cache)
        return mx.argmax(logits[:, -1, :], axis=-1)

    t0 = time.perf_counter()
    y = step(prompt)
    mx.eval(y)
    prefill = time.perf_counter() - t0
    if compiled:
        from runtime.fast import CompiledDecoder

        decoder = CompiledDecoder(model, cache, capacity=prompt.shape[0] + tokens + 2)

        def step(ids):  # noqa: F811 - decode steps after the eager prefill
            return mx.argmax(decoder(ids), axis=-1)
    out = [y.item()]
    t0 = time.perf_counter()
    nxt = step(y)
    mx.async_eval(nxt)
    for i in range(tokens):
        y = nxt
        if i + 1 < tokens:
            nxt = step(y)  # built while `y` is still being computed
            mx.async_eval(nxt)
        out.append(y.item())
    decode = time.perf_counter() - t0
    return prefill, decode, out


def id_limit(path: str) -> int:
    """Prompt ids stay below both vocabularies (the per-layer one is the smaller: 262 144)."""
    manifest = Path(path, "manifest.yaml")
    if manifest.exists():
        import yaml

        text = yaml.safe_load(manifest.read_text())["model"]["text_config"]
    else:
        config = json.loads(Path(path, "config.json").read_text())
        text = config.get("text_config", config)
    return min(int(text["vocab_size"]), int(text.get("vocab_size_per_layer_input", text["vocab_size"])))


def worker_decode(impl: str, path: str, prompt_len: int, tokens: int, reps: int, warmup: int, seed: int) -> dict:
    import mlx.core as mx
    import numpy as np

    model = load_ours(path) if impl.startswith("ours") else load_mlx_lm(path)
    prompt = mx.array(np.random.default_rng(seed).integers(3, id_limit(path), prompt_len), dtype=mx.int32)
    prefill_tps, decode_tps, ids = [], [], None
    for r in range(warmup + reps):
        prefill, decode, ids = greedy(model, prompt, tokens, compiled=impl == "ours-compiled")
        if r >= warmup:
            prefill_tps.append(prompt_len / prefill)
            decode_tps.append((len(ids) - 1) / decode)
    return {"prompt_tps": prefill_tps, "decode_tps": decode_tps, "ids": ids,
            "mlx_peak_bytes": mx.get_peak_memory(), "device": str(mx.default_device()), "graph_env": graph_env(),
            "device_info": {k: str(v) for k, v in mx.device_info().items()}}


# --- in the parent -----------------------------------------------------------------------------

def child(args: list[str]) -> tuple[dict, object]:
    run = run_child([sys.executable, str(Path(__file__).resolve()), "worker", *args], sync=False,
                    capture_stdout=True)
    if run.returncode != 0:
        tail = run.stderr.strip().splitlines()[-3:]
        raise SystemExit(f"worker {' '.join(args[:3])} failed (exit {run.returncode}): {' | '.join(tail)}")
    return json.loads(run.stdout.strip().splitlines()[-1]), run


def bundle_label(bundle: str) -> str:
    import yaml

    m = yaml.safe_load(Path(bundle, "manifest.yaml").read_text())
    dtypes = sorted({p["dtype"] for p in m["projections"].values()})
    pre = sum(p["layout"] == "pretransposed" for p in m["projections"].values())
    fused = sum(bool(p.get("fused")) for p in m["projections"].values())
    return f"ours {m['target']['name']} ({'/'.join(dtypes)}, {pre} pretransposed{f', {fused} fused' if fused else ''})"


def default_source(bundle: str) -> str | None:
    import yaml

    m = yaml.safe_load(Path(bundle, "manifest.yaml").read_text())
    return m["source"].get("path")


def bench_load(a) -> None:
    source = a.source or default_source(a.bundle)
    impls = [("ours", a.bundle), ("raw read", a.bundle), ("raw read resident", a.bundle),
             ("mx.load+eval", a.bundle)]
    if source and not a.no_mlx_lm:
        impls += [("mlx-lm", source), ("raw read (source)", source)]
    nbytes = {p: sum(os.path.getsize(f) for f in shard_paths(p)) for _, p in impls}
    print(f"bundle {a.bundle}: {nbytes[a.bundle] / 1e9:.2f} GB; source {source}: "
          f"{nbytes.get(source, 0) / 1e9:.2f} GB; {a.runs} runs per group of the same files, order rotating",
          flush=True)
    # Grouped by the files they read: the bundle and the source do not fit the page cache together
    # beside a loaded model (2 x 8.9 GB + 8.9 GB > 24 GiB here), and alternating them made every
    # figure depend on what the other tree had evicted. Each group is warmed, then its members
    # alternate, order rotating.
    results: dict[str, list] = {name: [] for name, _ in impls}
    for path in dict.fromkeys(p for _, p in impls):
        group = [(name, p) for name, p in impls if p == path]
        child(["load", "raw read", path])  # warm this tree
        for r in range(a.runs):
            k = r % len(group)
            for name, _ in group[k:] + group[:k]:
                res, run = child(["load", name.split(" (")[0], path])
                res["max_rss_bytes"] = run.max_rss_bytes
                results[name].append(res)
                print(f"run {r + 1} {name:18s} {res['seconds']:7.2f} s  peak RSS {run.max_rss_bytes / 1e9:6.2f} GB",
                      flush=True)
    raw = median(x["seconds"] for x in results["raw read"])
    rows = []
    for name, path in impls:
        s = median(x["seconds"] for x in results[name])
        rows.append([name, path, nbytes[path] / 1e9, s, nbytes[path] / 1e9 / s, s / raw,
                     median(x["max_rss_bytes"] for x in results[name]) / 1e9])
    print()
    print(table(["what", "files", "GB", "seconds (median)", "GB/s", "x raw read of the bundle", "peak RSS GB"],
                rows, "llrrrrr"))
    if "mlx-lm" in results:
        ours, peer = median(x["seconds"] for x in results["ours"]), median(x["seconds"] for x in results["mlx-lm"])
        resident = median(x["seconds"] for x in results["raw read resident"])
        print(f"\nload-to-ready: ours {ours:.2f} s = {ours / raw:.2f}x raw read, {ours / resident:.2f}x raw read "
              f"into resident memory; mlx-lm {peer:.2f} s; mlx-lm / ours = {peer / ours:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"facts": machine_facts(), "results": results}, indent=2))


def bench_decode(a) -> None:
    source = a.source or default_source(a.bundles[0])
    impls = [] if a.no_eager else [(bundle_label(b), "ours", b) for b in a.bundles]
    if a.compiled or a.no_eager:
        impls += [(bundle_label(b) + " compiled", "ours-compiled", b) for b in a.bundles]
    if source and not a.no_mlx_lm:
        impls.append((PEER, "mlx-lm", source))
    print(f"prompt {a.prompt} tokens, decode {a.tokens} tokens, {a.reps} reps after {a.warmup} warm-up "
          f"per process, {a.rounds} rounds, order rotating", flush=True)
    results: dict[str, dict] = {label: {"prompt_tps": [], "decode_tps": [], "ids": None} for label, _, _ in impls}
    for r in range(a.rounds):
        k = r % len(impls)
        for label, impl, path in impls[k:] + impls[:k]:
            res, run = child(["decode", impl, path, "--prompt", str(a.prompt), "--tokens", str(a.tokens),
                              "--reps", str(a.reps), "--warmup", str(a.warmup), "--seed", str(a.seed)])
            agg = results[label]
            agg["prompt_tps"] += res["prompt_tps"]
            agg["decode_tps"] += res["decode_tps"]
            agg["ids"], agg["device"], agg["graph_env"] = res["ids"], res["device"], res.get("graph_env")
            agg["max_rss_bytes"] = max(agg.get("max_rss_bytes", 0), run.max_rss_bytes)
            agg["mlx_peak_bytes"] = res["mlx_peak_bytes"]
            print(f"round {r + 1} {label:48s} prompt {median(res['prompt_tps']):8.2f} tok/s  "
                  f"decode {median(res['decode_tps']):7.2f} tok/s", flush=True)
    peer = results.get(PEER)
    peer_decode = median(peer["decode_tps"]) if peer else float("nan")
    peer_prompt = median(peer["prompt_tps"]) if peer else float("nan")
    rows = []
    for label, _, _ in impls:
        x = results[label]
        d, p = median(x["decode_tps"]), median(x["prompt_tps"])
        same = "-" if not peer else f"{common_prefix(x['ids'], peer['ids'])}/{len(peer['ids'])}"
        rows.append([label, len(x["decode_tps"]), p, p / peer_prompt, d, min(x["decode_tps"]), max(x["decode_tps"]),
                     d / peer_decode, x["mlx_peak_bytes"] / 1e9, x["max_rss_bytes"] / 1e9, same])
    print()
    print(f"device: {results[impls[0][0]].get('device')}")
    print(table(["model", "samples", "prompt tok/s", "x mlx-lm", "decode tok/s (median)", "min", "max", "x mlx-lm",
                 "MLX peak GB", "peak RSS GB", "greedy ids equal to mlx-lm's"], rows, "lrrrrrrrrrl"))
    if a.json:
        Path(a.json).write_text(json.dumps({"facts": machine_facts(), "results": results}, indent=2))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pl = sub.add_parser("load", help="load-to-ready vs raw read vs mlx-lm's load")
    pl.add_argument("bundle")
    pl.add_argument("--source", default=None, help="checkpoint mlx-lm loads (default: the manifest's source.path)")
    pl.add_argument("--runs", type=int, default=5)
    pl.add_argument("--no-mlx-lm", action="store_true")
    pl.add_argument("--json", default=None)
    pd = sub.add_parser("decode", help="prompt and decode tok/s vs mlx-lm")
    pd.add_argument("bundles", nargs="+")
    pd.add_argument("--source", default=None, help="checkpoint mlx-lm runs (default: the first manifest's source.path)")
    pd.add_argument("--prompt", type=int, default=64)
    pd.add_argument("--tokens", type=int, default=16)
    pd.add_argument("--reps", type=int, default=2, help="timed repetitions per process")
    pd.add_argument("--warmup", type=int, default=1, help="untimed repetitions first (kernel compilation)")
    pd.add_argument("--rounds", type=int, default=3)
    pd.add_argument("--seed", type=int, default=0)
    pd.add_argument("--no-mlx-lm", action="store_true")
    pd.add_argument("--compiled", action="store_true", help="also run each bundle with the compiled decode step")
    pd.add_argument("--no-eager", action="store_true", help="only the compiled decode step of each bundle")
    pd.add_argument("--json", default=None)
    pw = sub.add_parser("worker", help=argparse.SUPPRESS)
    pw.add_argument("what", choices=["load", "decode"])
    pw.add_argument("impl")
    pw.add_argument("path")
    pw.add_argument("--prompt", type=int, default=64)
    pw.add_argument("--tokens", type=int, default=16)
    pw.add_argument("--reps", type=int, default=2)
    pw.add_argument("--warmup", type=int, default=1)
    pw.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.cmd == "worker":
        if a.what == "load":
            res = worker_load(a.impl, a.path)
        else:
            res = worker_decode(a.impl, a.path, a.prompt, a.tokens, a.reps, a.warmup, a.seed)
        print(json.dumps(res))
        return 0
    print_facts(machine_facts())
    bench_load(a) if a.cmd == "load" else bench_decode(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
