"""Generic bundles load in mlx-lm's own loader, unchanged, and compute what our runtime computes.

The `generic` target promises it (`mlx_lm: true` in its profile): its bundles keep the K/V of
KV-shared layers, which mlx-lm's gemma3n builds in every layer (zeros where the source has none:
newer transformers saves none, and the demo has none), and a config.json completed with what
mlx-lm reads (`rope_theta` and `rope_local_base_freq` beside `rope_parameters`; the
`quantization` block of `--quantize`). Each bundle is loaded by mlx-lm 0.32.2's `load_model` /
`load`, exactly as a user would; mlx-lm is given its cache (`make_cache()`), without which its
KV-shared layers compute K/V of their own and its logits are wrong.

Float32 bundles (plain and 4-bit with float32 scales) must agree within 1e-4 at every position;
bfloat16 rounds in different places in the two implementations (a tiny random model amplifies
that to 5-70 %), so there the trained demo must decode the same greedy tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from manifests import read_manifest
from manifests.profiles import ProfileError, _from_text
from runtime.generate import generate_step
from tests.checkpoints import make_checkpoint
from tests.runtime_helpers import convert, load_quietly, relative_error

mlx_lm_utils = pytest.importorskip("mlx_lm.utils")

DEMO = Path(__file__).resolve().parent.parent / "examples" / "zen-gemma3n"
BOUND = 1e-4
LENGTH, PREFILL = 20, 12


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("mlx-lm")


@pytest.fixture(scope="module", params=[True, False], ids=["source-with-shared-kv", "source-without"])
def source(request, root):
    return make_checkpoint(root / f"src-{request.param}", "hf", seed=21, kv_shared_extras=request.param)


@pytest.mark.parametrize("quantize", [(), ("--quantize", "4", "--group-size", "32")], ids=["float32", "4-bit"])
def test_mlx_lm_loads_a_generic_bundle_and_computes_our_logits(source, quantize):
    bundle = convert(source, source.parent / f"{source.name}-generic{len(quantize)}", "generic", *quantize)
    peer, config = mlx_lm_utils.load_model(bundle)
    ours, _ = load_quietly(bundle)
    assert bool(quantize) == ("quantization" in config)
    ids = np.random.default_rng(5).integers(0, 256, (1, LENGTH))  # within the per-layer table, as mlx-lm needs
    peer_cache, our_cache = peer.make_cache(), ours.make_cache()
    want = ours(mx.array(ids[:, :PREFILL]), cache=our_cache)
    assert relative_error(peer(mx.array(ids[:, :PREFILL]), cache=peer_cache), np.array(want)) < BOUND
    for t in range(PREFILL, LENGTH):  # past the sliding window, through the KV-shared layers
        want = ours(mx.array(ids[:, t:t + 1]), cache=our_cache)
        assert relative_error(peer(mx.array(ids[:, t:t + 1]), cache=peer_cache), np.array(want)) < BOUND, t

    unread = read_manifest(bundle)["unread"]
    assert len(unread) == 3 * ours.config.num_kv_shared_layers
    has_shared_kv = source.name == "src-True"  # else written as zeros
    assert {e["source_key"] is not None for e in unread.values()} == {has_shared_kv}


@pytest.mark.parametrize("extra", [("--dtype", "bfloat16"), ("--dtype", "bfloat16", "--quantize", "4"),
                                   ("--dtype", "bfloat16", "--quantize", "8")], ids=["bfloat16", "4-bit", "8-bit"])
def test_mlx_lm_decodes_the_demo_as_we_do(root, extra):
    """mlx_lm.load (model and tokenizer) on the demo's generic bundle; greedy decoding picks the
    tokens our runtime picks."""
    import mlx_lm

    bundle = convert(DEMO, root / f"demo-{'-'.join(extra)}", "generic", *extra)
    peer, tokenizer = mlx_lm.load(str(bundle))
    ours, _ = load_quietly(bundle)
    prompt = tokenizer.encode("Beautiful is better than")
    want = [t for t, _ in generate_step(prompt, ours, max_tokens=40)]
    got = [r.token for r in mlx_lm.stream_generate(peer, tokenizer, prompt, max_tokens=40)][:len(want)]
    assert got == want


def test_the_bundle_config_is_the_source_config_completed(source):
    """config.json: the source's, plus what mlx-lm reads; the manifest still records the
    source's own hash."""
    bundle = convert(source, source.parent / f"{source.name}-config", "generic", "--quantize", "8")
    src, out = (json.loads((p / "config.json").read_text()) for p in (source, bundle))
    assert out.pop("quantization") == {"bits": 8, "group_size": 64, "mode": "affine"}
    added = {k: out["text_config"].pop(k) for k in ("rope_theta", "rope_local_base_freq")}
    assert out == src and added == {"rope_theta": 1e6, "rope_local_base_freq": 1e4}
    import hashlib
    assert read_manifest(bundle)["source"]["files"]["config.json"] == hashlib.sha256(
        (source / "config.json").read_bytes()).hexdigest()


def test_other_targets_and_fused_generic_bundles_drop_the_shared_kv(source):
    m5 = read_manifest(convert(source, source.parent / f"{source.name}-m5", "m5"))
    fused = read_manifest(convert(source, source.parent / f"{source.name}-fused", "generic", "--fuse"))
    for manifest in (m5, fused):
        assert "unread" not in manifest


@pytest.mark.parametrize("text,message", [
    ("name: x\nmlx_lm: true\nlayouts: {mlp.gate_proj: pretransposed}\n", "mlp.gate_proj is laid out otherwise"),
    ("name: x\nmlx_lm: true\nlayouts: {lm_head: {float32: pretransposed, default: standard}}\n", "lm_head"),
    ("name: x\nmlx_lm: true\nfuse: [qkv]\n", "reads no fused projection"),
    ("name: x\nmlx_lm: yes please\n", "must be true or false"),
])
def test_a_profile_cannot_promise_mlx_lm_and_layouts_it_cannot_read(text, message):
    with pytest.raises(ProfileError, match=message):
        _from_text(text, "p.yaml")
