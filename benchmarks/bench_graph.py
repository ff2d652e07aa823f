"""Graph nodes per decoded token: what one decode step asks MLX to run, ours next to mlx-lm's.

    python3 benchmarks/bench_graph.py BUNDLE [--no-mlx-lm] [--top 12]

At batch 1 a decode step on a big GPU is launch-bound, not bandwidth-bound: MLX spends host time
on every node of the graph it evaluates (allocating, encoding a kernel or setting up a view), and
Gemma3n's step has thousands of them. This counts them, per primitive, for one step after a
short prefill: our eager step, our compiled step (`runtime/fast.py`; the nodes of the graph MLX
evaluates after `mx.compile` simplified and fused it, read back from `mx.export_to_dot`) and
mlx-lm's eager step on the same arrays (it needs a `generic` bundle; see bench_runtime.py).

`views` are primitives that only describe memory (transpose, reshape of a contiguous array,
slice, broadcast, ...): no kernel, but still a node to schedule. Counts depend on the device:
on the CPU the `mx.fast` norms, RoPE and attention expand into their fallback ops, on a GPU
each is one node. `--as-gpu` counts our compiled step on any machine as a GPU would run it:
the norms and RoPE are replaced by one-node stand-ins (a scan of the same shape) while the
graph is traced, so the result is a node count and nothing else (the logits are wrong). Use
`--size e2b-narrow` checkpoints (benchmarks/make_checkpoint.py) to count at the real layer
structure without full-size weights: the count depends on structure only.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from bench_runtime import load_mlx_lm_from_bundle, load_ours  # noqa: E402
from common import machine_facts, table  # noqa: E402

VIEWS = {"Transpose", "Reshape", "Slice", "Split", "Squeeze", "ExpandDims", "Broadcast", "AsStrided",
         "Flatten", "Unflatten", "StopGradient", "Depends"}


def graph_nodes(*outputs) -> Counter:
    """Primitive name -> count over the graph that evaluating `outputs` would run."""
    import mlx.core as mx

    dot = io.StringIO()
    mx.export_to_dot(dot, *outputs)
    return Counter(m.group(1).split()[0] for m in re.finditer(r'\[label ="([^"]+)", shape=rectangle\]', dot.getvalue()))


def prefilled(model, prompt_len: int):
    import mlx.core as mx

    cache = model.make_cache()
    ids = mx.arange(3, 3 + prompt_len, dtype=mx.int32)[None]
    logits = model(ids, cache=cache)
    mx.eval(logits, [c.state for c in cache])
    return cache


def compiled_step_nodes(model, prompt_len: int) -> Counter:
    """The nodes of one compiled decode step after a `prompt_len`-token prefill (and one step that
    traces it, so the KV buffers going in are the step's own evaluated outputs)."""
    import mlx.core as mx

    from runtime.fast import CompiledDecoder

    token = mx.array([[5]], dtype=mx.int32)
    decoder = CompiledDecoder(model, prefilled(model, prompt_len))
    mx.eval(decoder(token[0]))
    return graph_nodes(*decoder._step(token, mx.array(decoder.position, mx.int32), *decoder.buffers))


def fused_modules(model, prompt_len: int) -> list[str]:
    """The fused kernels a fresh machine compiles for our compiled decode step, by name.

    MLX compiles each fused element-wise kernel the first time it runs and keeps it on disk,
    named after what it computes (its ops, their dtypes, its scalar constants; not its shapes):
    on CUDA one NVRTC module per name (several seconds each on an H100, docs/BENCHMARKS.md), on
    the CPU one library per name and memory layout under `$TMPDIR/mlx`. This runs the step on
    the CPU with a new, empty `$TMPDIR` and reads the names back, without the layout suffix:
    the modules CUDA would compile for the same graph (`--as-gpu` makes the graph the GPU's)."""
    import os
    import tempfile

    import mlx.core as mx

    from runtime.fast import CompiledDecoder
    from runtime.kernels import compiled_kernel_names

    cache = prefilled(model, prompt_len)
    before = os.environ.get("TMPDIR")
    with tempfile.TemporaryDirectory(prefix="modules-") as tmp:
        os.environ["TMPDIR"] = tmp
        try:
            decoder = CompiledDecoder(model, cache)
            for token in (5, 6):
                mx.eval(decoder(mx.array([token], dtype=mx.int32)))
        finally:
            if before is None:
                del os.environ["TMPDIR"]
            else:
                os.environ["TMPDIR"] = before
        return sorted(compiled_kernel_names(Path(tmp)))


def step_graphs(bundle: str, prompt_len: int, mlx_lm: bool, eager: bool = True) -> dict[str, Counter]:
    import mlx.core as mx

    token = mx.array([[5]], dtype=mx.int32)
    model = load_ours(bundle)
    out = {}
    if eager:
        out["ours eager"] = graph_nodes(model(token, cache=prefilled(model, prompt_len)))
    out["ours compiled"] = compiled_step_nodes(model, prompt_len)
    if mlx_lm:
        peer = load_mlx_lm_from_bundle(bundle)
        out["mlx-lm eager"] = graph_nodes(peer(token, cache=prefilled(peer, prompt_len)))
    return out


def _scan_norm(x, weight, eps):
    import mlx.core as mx

    return mx.cummax(x, axis=-1)


def _scan_rope(x, dims, **kwargs):
    import mlx.core as mx

    return mx.cummax(x, axis=-1)


# One node where a GPU runs one kernel: mx.fast.rms_norm and mx.fast.rope as a scan of the same
# shape (counting only: the values are wrong).
FAST_STAND_INS = {"rms_norm": _scan_norm, "rope": _scan_rope}


def stand_in_fast_ops() -> None:
    import mlx.core as mx

    for name, fn in FAST_STAND_INS.items():
        setattr(mx.fast, name, fn)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle")
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--no-mlx-lm", action="store_true")
    p.add_argument("--top", type=int, default=12, help="primitives listed per implementation")
    p.add_argument("--as-gpu", action="store_true",
                   help="our compiled step only, mx.fast norms and RoPE counted as one node each")
    p.add_argument("--modules", action="store_true",
                   help="also count the fused kernels a fresh machine compiles for our compiled step (on the CPU)")
    p.add_argument("--json", default=None, help="also write the counts per step and primitive to this file")
    a = p.parse_args(argv)
    import mlx.core as mx

    if a.as_gpu:
        stand_in_fast_ops()
    if a.modules:
        mx.set_default_device(mx.cpu)  # counted as the CPU builds them; the graph is the same
    # first: a kernel this process has compiled is never compiled (nor written) again
    modules = fused_modules(load_ours(a.bundle), a.prompt) if a.modules else None
    graphs = step_graphs(a.bundle, a.prompt, not (a.no_mlx_lm or a.as_gpu), eager=not a.as_gpu)
    print(f"device: {mx.default_device()}, bundle: {a.bundle}")
    rows = []
    for name, counts in graphs.items():
        total = sum(counts.values())
        views = sum(n for k, n in counts.items() if k in VIEWS)
        rows.append([name, total, total - views, views, counts.get("Matmul", 0) + counts.get("QuantizedMatmul", 0),
                     sum(n for k, n in counts.items() if k.startswith("Compiled"))])
    print(table(["step", "nodes", "not views", "views", "matmuls", "fused kernels"], rows, "lrrrrr"))
    for name, counts in graphs.items():
        print(f"\n{name}: " + ", ".join(f"{k} {n}" for k, n in counts.most_common(a.top)))
    if modules is not None:
        print(f"\nfused kernels a fresh machine compiles for our compiled step: {len(modules)}")
    if a.json:
        Path(a.json).write_text(json.dumps({"facts": machine_facts(), "as_gpu": a.as_gpu, "views": sorted(VIEWS),
                                            "steps": graphs, "modules": modules}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
