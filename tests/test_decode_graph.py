"""How many kernels one compiled decode step asks for: the launch-bound cost on a big GPU.

On an H100 a batch-1 Gemma3n step is paid per graph node, not per byte (docs/BENCHMARKS.md), so
a change that quietly adds kernels to `runtime/fast.DecodeStep` (a 3-D matmul input, a view that
splits a fused element-wise chain, an attention fallback) is a speed regression these tests
catch on any machine. Counted as a GPU would run the step: `mx.fast` norms and RoPE are single
nodes there but expand into their fallback on the CPU, so they get one-node stand-ins while the
step is traced (benchmarks/bench_graph.py --as-gpu, which matched the H100's own count).
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import pytest

from tests.checkpoints import make_checkpoint
from tests.runtime_helpers import convert, load_quietly

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_graph import FAST_STAND_INS, VIEWS, compiled_step_nodes  # noqa: E402


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("graph")
    src = make_checkpoint(root / "src", "hf", seed=5)
    return {t: convert(src, root / t, t) for t in ("generic", "cuda")}


def step_kernels(bundle, monkeypatch) -> tuple[int, dict]:
    for name, stand_in in FAST_STAND_INS.items():
        monkeypatch.setattr(mx.fast, name, stand_in)
    model, _ = load_quietly(bundle)  # a fresh model: its compiled step is traced with the stand-ins
    counts = compiled_step_nodes(model, prompt_len=6)
    return sum(n for k, n in counts.items() if k not in VIEWS), counts


def test_decode_step_stays_within_its_kernel_budget(bundles, monkeypatch):
    layers = load_quietly(bundles["generic"])[0].config.num_hidden_layers
    kernels, counts = step_kernels(bundles["generic"], monkeypatch)
    # 441 when written (10 layers, 6 with a KV cache of their own: ~44 kernels a layer). Undoing
    # one of the fusions in DecodeStep (1 kernel a layer; the one q/k/v norm, the scale-and-RoPE
    # kernel or the one K/V update of each of the 6 layers with a KV cache; the sparse layers'
    # dot-product variance) breaks the budget; MLX upgrades may move it.
    budget = 445
    assert kernels <= budget, f"{kernels} kernels per step (budget {budget}): {counts.most_common(12)}"
    # Views cost host time too (a node each, no kernel, far less than a kernel): 170 when written
    # (the RoPE kernel reads each head's halves through views), down from 340 before the weights'
    # transposes were taken once outside the step and the planes kept 2-D. A transpose per
    # projection per token (~12 a layer) breaks this at once.
    views = sum(n for k, n in counts.items() if k in VIEWS)
    assert views <= 175, f"{views} views per step (budget 175): {[(k, n) for k, n in counts.items() if k in VIEWS]}"
    # No 3-D matmul inputs (each would add a Flatten/Unflatten pair) and no attention fallback.
    assert counts.get("Flatten", 0) + counts.get("Unflatten", 0) <= 4
    assert counts.get("ScaledDotProductAttention", 0) == 0 and counts["Softmax"] == layers


def test_fused_bundle_saves_one_matmul_per_merged_projection(bundles, monkeypatch):
    model, _ = load_quietly(bundles["cuda"])
    c = model.config
    owners = c.num_hidden_layers - c.num_kv_shared_layers
    shared = c.num_hidden_layers - owners
    plain = step_kernels(bundles["generic"], monkeypatch)[1]
    fused = step_kernels(bundles["cuda"], monkeypatch)[1]
    # q/k/v + laurel's left: 4 GEMVs -> 1 where a layer has its own KV, q + laurel's left 2 -> 1
    # in KV-shared layers, gate/up 2 -> 1 everywhere.
    assert plain["Matmul"] - fused["Matmul"] == 3 * owners + shared + c.num_hidden_layers
