"""How many kernels one compiled decode step asks for: the launch-bound cost on a big GPU.

On an H100 a batch-1 Gemma3n step is paid per graph node, not per byte (docs/BENCHMARKS.md), so
a change that quietly adds kernels to `runtime/fast.DecodeStep` (a 3-D matmul input, a view that
splits a fused element-wise chain, an attention fallback) is a speed regression these tests
catch on any machine. Counted as a GPU would run the step: `mx.fast` norms and RoPE are single
nodes there but expand into their fallback on the CPU, so they get one-node stand-ins while the
step is traced (benchmarks/bench_graph.py --as-gpu, which matched the H100's own count).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.checkpoints import make_checkpoint
from tests.runtime_helpers import convert, load_quietly

BENCH_GRAPH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_graph.py"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("graph")
    src = make_checkpoint(root / "src", "hf", seed=5)
    return {t: convert(src, root / t, t) for t in ("generic", "cuda")}


@pytest.fixture(scope="module")
def step_counts(bundles, tmp_path_factory):
    """Per bundle, the primitives of one compiled step as a GPU would run it, counted by the
    benchmark itself (`bench_graph.py --as-gpu`, a fresh process), and the set of view primitives."""
    out = {}
    for name, bundle in bundles.items():
        report = tmp_path_factory.mktemp("counts") / f"{name}.json"
        modules = ["--modules"] if name == "generic" else []
        done = subprocess.run([sys.executable, str(BENCH_GRAPH), str(bundle), "--as-gpu", "--prompt", "6", *modules,
                               "--json", str(report)],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        data = json.loads(report.read_text())
        out[name] = Counter(data["steps"]["ours compiled"]), set(data["views"])
        out[f"{name} modules"] = data["modules"]
    return out


def step_kernels(step_counts, name) -> tuple[int, Counter]:
    counts, views = step_counts[name]
    return sum(n for k, n in counts.items() if k not in views), counts


def test_decode_step_stays_within_its_kernel_budget(bundles, step_counts):
    layers = load_quietly(bundles["generic"])[0].config.num_hidden_layers
    kernels, counts = step_kernels(step_counts, "generic")
    # 441 when written (10 layers, 6 with a KV cache of their own: ~44 kernels a layer); 435 since
    # the sparse layers' threshold joined their GELU kernel (gelu_tanh's operand order), 429 since
    # AltUp's projections are rescaled stacked. Undoing one of the fusions in DecodeStep (1 kernel
    # a layer; the one q/k/v norm, the scale-and-RoPE kernel or the one K/V update of each of the
    # 6 layers with a KV cache; the sparse layers' dot-product variance or threshold) or the
    # stacked rescaling (5) breaks the budget; MLX upgrades may move it.
    budget = 433
    assert kernels <= budget, f"{kernels} kernels per step (budget {budget}): {counts.most_common(12)}"
    # Views cost host time too (a node each, no kernel, far less than a kernel): 170 when written
    # (the RoPE kernel reads each head's halves through views), down from 340 before the weights'
    # transposes were taken once outside the step and the planes kept 2-D; 166, then 218 since
    # LAuReL's right and the down projection read row-major views (model.row_major: 4 views a
    # layer, 2 more in each activation-sparse one, that spare MLX's matmul a copy kernel each,
    # tests/test_fused.py). A transpose per projection per token (~12 a layer) breaks this at once.
    view_names = step_counts["generic"][1]
    views = sum(n for k, n in counts.items() if k in view_names)
    view_counts = [(k, n) for k, n in counts.items() if k in view_names]
    assert views <= 220, f"{views} views per step (budget 220): {view_counts}"
    # No 3-D matmul inputs (each would add a Flatten/Unflatten pair) and no attention fallback.
    assert counts.get("Flatten", 0) + counts.get("Unflatten", 0) <= 4
    assert counts.get("ScaledDotProductAttention", 0) == 0 and counts["Softmax"] == layers


def test_fused_bundle_saves_one_matmul_per_merged_projection(bundles, step_counts):
    model, _ = load_quietly(bundles["cuda"])
    c = model.config
    owners = c.num_hidden_layers - c.num_kv_shared_layers
    shared = c.num_hidden_layers - owners
    plain, fused = step_counts["generic"][0], step_counts["cuda"][0]
    # q/k/v + laurel's left: 4 GEMVs -> 1 where a layer has its own KV, q + laurel's left 2 -> 1
    # in KV-shared layers, gate/up 2 -> 1 everywhere.
    assert plain["Matmul"] - fused["Matmul"] == 3 * owners + shared + c.num_hidden_layers


def test_decode_step_compiles_few_distinct_kernels(step_counts):
    """What a fresh machine waits for: MLX compiles each distinct fused kernel of the step once
    per machine (kept on disk after), an NVRTC module of several seconds on an H100 and a C++
    library of about half a second on this CPU (docs/BENCHMARKS.md, cold start), whatever the
    model's size. Layers of one kind share their kernels; what adds one is a chain that no other
    shares: e.g. a scaling moved out of an existing chain (the per-layer table's scale before its
    reshape, 1 more), an operand order that sends a fused chain past MLX's fusion depth (gelu's
    `0.5 * x` first: the sparse layers' threshold becomes a kernel of its own, 1 more), or a
    scalar constant where the step multiplies by an array (DecodeStep.scales, 1 more each), or
    a reshape between the embeddings' RMS and the rescaling that uses it (1 more).
    19 before those four, 14 now."""
    modules = step_counts["generic modules"]
    assert len(modules) >= 5, modules  # the count itself works (none found would pass the budget)
    assert len(modules) <= 14, f"{len(modules)} distinct fused kernels (budget 14):\n" + "\n".join(modules)
