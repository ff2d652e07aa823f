"""Find where a quantized model's prefill stops being deterministic (MLX's CUDA build, 4-bit).

    python3 benchmarks/cuda_q4_probe.py BUNDLE [--mlx-lm] [--json OUT.json] [--repeats 8]

Phases, each printed as it ends (and all of it in the JSON):

1. `repeat`: the same prompt's prefill repeated in one process (fresh cache each time), for
   prompt lengths 1, 4, 7, 8, 16, 64: the largest logit difference to the first repeat, NaN
   counts, how many distinct top tokens. With `--mlx-lm`, mlx-lm's gemma3n on the same arrays too.
2. `stages`: the embedding stage (embeddings, per-layer inputs, AltUp planes) and every layer's
   output, evaluated stage by stage, repeated: the first stage whose output differs.
3. `ops`: every module's output inside the model tapped (evaluated as it is produced), repeated:
   the first module call whose output differs while all of its inputs were equal.
4. `memory`: phase 1 at 4 and 8 tokens again under three allocator conditions: MLX's buffer cache
   off (`mx.set_cache_limit(0)`), and the cache filled with NaN-holding buffers before each run
   (a kernel that reads memory nothing wrote then turns NaN or changes with it).
5. `isolate`: the culprit module of phase 3, alone, on its recorded input, repeated fresh and
   after poisoning; its inputs are saved (`--save-npz`) for a standalone repro.

Nothing here is specific to CUDA, so it also runs (and should find nothing) on the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from common import machine_facts  # noqa: E402

LENGTHS = (1, 4, 7, 8, 16, 64)


def load_ours(bundle: str):
    from runtime.loader import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(bundle)
    mx.eval(model.parameters())
    return model


LIMIT = {"ids": 262_144}  # set from our model's config: both models get the same ids


def prompt_of(model, n: int, seed: int = 7) -> mx.array:
    limit = LIMIT["ids"]
    return mx.array(np.random.default_rng(seed + n).integers(3, limit, n), dtype=mx.int32)


def prefill_logits(model, ids: mx.array) -> np.ndarray:
    cache = model.make_cache()
    logits = model(ids[None], cache=cache)[0, -1].astype(mx.float32)
    mx.eval(logits)
    return np.array(logits)


def compare(runs: list[np.ndarray]) -> dict:
    first = runs[0]
    diffs = [float(np.nanmax(np.abs(r - first))) if np.isfinite(r).all() and np.isfinite(first).all()
             else float("nan") for r in runs[1:]]
    return {"max_diff": max(diffs) if diffs else 0.0, "diffs": diffs,
            "identical": sum(bool(np.array_equal(r, first)) for r in runs[1:]),
            "nan_runs": sum(bool(np.isnan(r).any()) for r in runs),
            "top_tokens": sorted({int(np.nanargmax(r)) if not np.isnan(r).all() else -1 for r in runs}),
            "std": float(np.nanstd(first))}


def phase_repeat(models: dict, repeats: int, lengths=LENGTHS, before=None) -> dict:
    out = {}
    for name, model in models.items():
        for n in lengths:
            ids = prompt_of(model, n)
            runs = []
            for _ in range(repeats):
                if before:
                    before()
                runs.append(prefill_logits(model, ids))
            out[f"{name}/{n}"] = r = compare(runs)
            print(f"  {name:8s} len {n:3d}: identical {r['identical']}/{repeats - 1}, max diff {r['max_diff']:.4g} "
                  f"(logit std {r['std']:.3g}), NaN runs {r['nan_runs']}, top tokens {r['top_tokens']}", flush=True)
    return out


# --- stage by stage (our model) ----------------------------------------------------------------

def stages(model, ids: mx.array) -> list[tuple[str, np.ndarray]]:
    """The embedding stage and every layer's output, each evaluated before the next is built."""
    lm = model.model.language_model
    c = lm.config
    ids = ids[None]
    got = []

    def keep(name, x):
        mx.eval(x)
        got.append((name, np.array(x.astype(mx.float32))))
        return x

    embeds = lm.embed_tokens(ids)
    embeds = keep("embed_tokens", embeds * mx.array(c.hidden_size**0.5, embeds.dtype))
    per_layer = keep("per_layer_inputs", lm.per_layer_inputs(ids, embeds))
    planes = keep("altup_planes", lm.altup_planes(embeds))
    cache = model.make_cache()
    producers = c.kv_producers()
    kv = {}
    for i, layer in enumerate(lm.layers):
        shared = kv[producers[i]] if i in producers else None
        layer_cache = None if shared is not None else cache[i]
        planes, kv[i] = layer(planes, per_layer[:, :, i : i + 1, :], lm.plane_mask.astype(embeds.dtype), 0,
                              layer_cache, shared)
        keep(f"layer {i}", planes)
    keep("final_norm", lm.unembed(planes))
    return got


def first_difference(runs: list[list[tuple[str, np.ndarray]]]) -> dict | None:
    for j, (name, first) in enumerate(runs[0]):
        for r, run in enumerate(runs[1:], 1):
            other = run[j][1]
            if first.shape != other.shape or not np.array_equal(first, other, equal_nan=True):
                diff = np.abs(first - other)
                return {"stage": name, "index": j, "repeat": r,
                        "max_diff": float(np.nanmax(diff)) if diff.size else 0.0,
                        "differing": int(np.count_nonzero(~np.isclose(first, other, rtol=0, atol=0, equal_nan=True))),
                        "size": int(first.size), "nan": [int(np.isnan(first).sum()), int(np.isnan(other).sum())]}
    return None


# --- every module call tapped --------------------------------------------------------------------

class Taps:
    """Wraps every submodule of `root` so each call records its inputs' and output's values."""

    def __init__(self, root: nn.Module):
        self.records: list[tuple[str, list[np.ndarray], np.ndarray]] = []
        self.modules: dict[str, nn.Module] = {}
        self.inputs: dict[int, list[mx.array]] = {}
        self.original: dict[str, type] = {}
        for path, module in root.named_modules():
            if module is root or not path:
                continue
            self.modules[path] = module
            self._wrap(path, module)

    def _wrap(self, path: str, module: nn.Module) -> None:
        cls = type(module)
        self.original[path] = cls
        taps = self

        def call(this, *args, **kwargs):
            arrays = [a for a in args if isinstance(a, mx.array)]
            mx.eval(arrays)
            out = cls.__call__(this, *args, **kwargs)
            first = out[0] if isinstance(out, tuple) else out
            if isinstance(first, mx.array):
                mx.eval(first)
                taps.records.append((path, [np.array(a.astype(mx.float32)) for a in arrays],
                                     np.array(first.astype(mx.float32))))
                taps.inputs[len(taps.records) - 1] = arrays
            return out

        module.__class__ = type(cls.__name__, (cls,), {"__call__": call})

    def unwrap(self):
        for path, module in self.modules.items():
            module.__class__ = self.original[path]

    def reset(self):
        self.records, self.inputs = [], {}


def first_op_difference(runs: list[list[tuple[str, list, np.ndarray]]]) -> dict | None:
    for j, (path, inputs, first) in enumerate(runs[0]):
        for r, run in enumerate(runs[1:], 1):
            path2, inputs2, other = run[j]
            if path2 != path:
                return {"module": path, "call": j, "note": f"call order differs ({path2})"}
            same_inputs = all(np.array_equal(a, b, equal_nan=True) for a, b in zip(inputs, inputs2))
            if not np.array_equal(first, other, equal_nan=True):
                return {"module": path, "call": j, "repeat": r, "inputs_equal": same_inputs,
                        "max_diff": float(np.nanmax(np.abs(first - other))),
                        "differing": int(np.count_nonzero(first != other)), "size": int(first.size),
                        "nan": [int(np.isnan(first).sum()), int(np.isnan(other).sum())],
                        "input_shapes": [list(a.shape) for a in inputs], "output_shape": list(first.shape)}
    return None


def poison(gigabytes: float = 4.0) -> None:
    """Leave MLX's buffer cache full of NaN-holding buffers of many sizes."""
    bufs = []
    size = 1 << 10
    total = 0
    while total < gigabytes * 2**30:
        bufs.append(mx.full((size,), mx.nan, mx.float32))
        total += size * 4
        size = min(size * 2, 1 << 28)
    mx.eval(bufs)
    del bufs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--mlx-lm", action="store_true", help="also mlx-lm's gemma3n on the same arrays (generic bundle)")
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--json")
    ap.add_argument("--save-npz", help="where to save the culprit module's inputs and weights")
    ap.add_argument("--phases", default="repeat,stages,ops,memory,isolate")
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="prompt lengths of the repeat phase")
    args = ap.parse_args()
    phases = args.phases.split(",")
    print(f"mlx {mx.__version__} on {mx.default_device()} {mx.device_info().get('device_name', '')}", flush=True)
    report: dict = {"facts": machine_facts(), "bundle": args.bundle}

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1, default=str))

    model = load_ours(args.bundle)
    LIMIT["ids"] = min(model.config.vocab_size, model.config.vocab_size_per_layer_input)
    models = {"ours": model}
    if args.mlx_lm:
        try:
            from bench_quantized import load_mlx_lm_quantized

            models["mlx-lm"] = load_mlx_lm_quantized(args.bundle)
        except BaseException as e:  # noqa: BLE001 - a probe reports and goes on
            print(f"mlx-lm not loaded: {e}", flush=True)

    def phase(name, fn):
        if name not in phases:
            return None
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            report[name] = fn()
        except BaseException as e:  # noqa: BLE001
            report[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
            print(report[name]["error"], flush=True)
        report[f"{name}_seconds"] = time.perf_counter() - t0
        save()
        return report[name]

    lengths = tuple(int(n) for n in args.lengths.split(","))
    phase("repeat", lambda: phase_repeat(models, args.repeats, lengths))

    def run_stages():
        out = {}
        for n in (4, 8, 16):
            ids = prompt_of(model, n)
            runs = [stages(model, ids) for _ in range(max(4, args.repeats // 2))]
            out[n] = first_difference(runs)
            print(f"  len {n}: first differing stage: {out[n]}", flush=True)
        return out

    phase("stages", run_stages)

    culprit = {}

    def run_ops():
        taps = Taps(model)
        out = {}
        for n in (4, 8):
            ids = prompt_of(model, n)
            runs = []
            for _ in range(max(4, args.repeats // 2)):
                taps.reset()
                prefill_logits(model, ids)
                runs.append(taps.records)
            out[n] = first_op_difference(runs)
            print(f"  len {n}: first differing module call: {out[n]}", flush=True)
            if out[n] and out[n].get("inputs_equal") and not culprit:
                culprit.update(module=out[n]["module"], inputs=taps.inputs[out[n]["call"]])
        culprit["taps"] = taps
        taps.unwrap()
        return out

    phase("ops", run_ops)

    def run_memory():
        out = {}
        mx.clear_cache()
        limit = mx.set_cache_limit(0)
        out["cache_off"] = phase_repeat({"ours": model}, args.repeats, (4, 8), before=mx.clear_cache)
        mx.set_cache_limit(limit)
        out["poisoned"] = phase_repeat({"ours": model}, args.repeats, (4, 8), before=poison)
        return out

    phase("memory", run_memory)

    def run_isolate():
        if "module" not in culprit:
            return {"note": "no module call differed with equal inputs"}
        path, inputs = culprit["module"], culprit["inputs"]
        module = culprit["taps"].modules[path]
        base = type(module)
        out = {"module": path, "class": base.__name__,
               "input": [[list(a.shape), str(a.dtype)] for a in inputs]}
        for cond, before in (("fresh", mx.clear_cache), ("poisoned", poison)):
            runs = []
            for _ in range(args.repeats):
                before()
                y = base.__call__(module, *inputs)
                mx.eval(y)
                runs.append(np.array(y.astype(mx.float32)))
            out[cond] = compare([r.reshape(-1) for r in runs])
            print(f"  {path} alone, {cond}: {out[cond]}", flush=True)
        if args.save_npz:
            from mlx.utils import tree_flatten

            params = dict(tree_flatten(module.parameters()))
            mx.savez(args.save_npz, **{f"input_{i}": a for i, a in enumerate(inputs)},
                     **{f"param_{k}": v for k, v in params.items()})
            out["saved"] = args.save_npz
            out["attrs"] = {k: getattr(module, k) for k in ("bits", "group_size", "mode") if hasattr(module, k)}
        return out

    phase("isolate", run_isolate)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
