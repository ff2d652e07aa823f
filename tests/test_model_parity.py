"""Bundles loaded by runtime.load against transformers' Gemma3nForCausalLM in float32.

Build a checkpoint, convert it with the real CLI (`python -m convert --target T --dtype float32`),
load it, compare with the reference. Bundles: `generic` and `m5` from Hugging Face naming, and
`m5` from a sharded mlx-vlm checkpoint written back as several shards.

Metric everywhere: max |ours - ref| / max |ref| over the compared logits, bound 1e-4. The tiny
config has a sliding window (8) shorter than the 20-token sequence, KV-shared layers (the last 4
of 10) and sparse MLPs (the first 5); the ids include one beyond the per-layer table (300 >= 256).
"""

import json

import numpy as np
import pytest

import mlx.core as mx

from runtime.model import FULL, SLIDING, TextConfig
from runtime.projections import Pretransposed, Standard
from tests.checkpoints import tiny_text_config
from tests.runtime_helpers import (
    check_compiled_steps,
    convert,
    load_quietly,
    make_sources,
    reference_logits,
    reference_model,
    relative_error,
    source_tensors,
)

pytest.importorskip("transformers")

BOUND = 1e-4
LENGTH, PREFILL = 20, 12
BUNDLES = [("generic", "hf"), ("m5", "hf"), ("m5", "mlx-vlm")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    sources = make_sources(root)
    bundles = {}
    for target, naming in BUNDLES:
        extra = ("--max-shard-size", "600KB") if naming == "mlx-vlm" else ()
        bundles[target, naming] = convert(sources[naming], root / f"{target}-{naming}", target, *extra)
    return sources, bundles


@pytest.fixture(scope="module")
def ids():
    cfg = tiny_text_config()
    ids = np.random.default_rng(7).integers(0, cfg["vocab_size"], (2, LENGTH))
    ids[0, 3] = 300  # beyond vocab_size_per_layer_input: reads per-layer row 0
    ids[1, 15] = cfg["vocab_size"] - 1
    return ids


@pytest.fixture(scope="module")
def references(workdir, ids):
    sources, _ = workdir
    out = {}
    for naming, src in sources.items():
        text_config = json.loads((src / "config.json").read_text())["text_config"]
        out[naming] = reference_logits(reference_model(text_config, source_tensors(src, naming)), ids)
    return out


@pytest.fixture(scope="module", params=BUNDLES, ids=lambda b: f"{b[0]}-from-{b[1]}")
def case(request, workdir, references, ids):
    _, bundles = workdir
    model, _ = load_quietly(bundles[request.param])
    return model, ids, references[request.param[1]]


def test_bundles_are_what_they_claim(workdir):
    _, bundles = workdir
    generic, _ = load_quietly(bundles["generic", "hf"])
    m5, _ = load_quietly(bundles["m5", "hf"])
    mlp = lambda m: m.model.language_model.layers[0].mlp  # noqa: E731
    assert isinstance(mlp(generic).gate_proj, Standard) and isinstance(mlp(m5).gate_proj, Pretransposed)
    assert isinstance(mlp(m5).up_proj, Pretransposed) and isinstance(mlp(m5).down_proj, Standard)
    assert generic.tied_head and not m5.tied_head and isinstance(m5.lm_head, Pretransposed)
    assert len(list(bundles["m5", "mlx-vlm"].glob("model-*.safetensors"))) > 1


def test_forward_without_cache(case):
    model, ids, ref = case
    assert relative_error(model(mx.array(ids)), ref) < BOUND


def test_prefill_with_cache(case):
    model, ids, ref = case
    assert relative_error(model(mx.array(ids), cache=model.make_cache()), ref) < BOUND


def test_every_step_of_cached_decoding(case):
    """Prefill 12 tokens, then feed the fixed continuation one token at a time, past the window."""
    model, ids, ref = case
    cache = model.make_cache()
    assert relative_error(model(mx.array(ids[:, :PREFILL]), cache=cache), ref[:, :PREFILL]) < BOUND
    for t in range(PREFILL, LENGTH):
        step = model(mx.array(ids[:, t : t + 1]), cache=cache)
        assert relative_error(step, ref[:, t : t + 1]) < BOUND, f"decode step at position {t}"
    assert cache[0].offset == LENGTH


def test_decoding_from_the_first_token(case):
    model, ids, ref = case
    cache = model.make_cache()
    for t in range(LENGTH):
        assert relative_error(model(mx.array(ids[:, t : t + 1]), cache=cache), ref[:, t : t + 1]) < BOUND, t


@pytest.mark.parametrize("chunks", [(5, 6, 1, 8), (9, 11), (1, 1, 18)])
def test_chunked_prefill_across_the_window(case, chunks):
    model, ids, ref = case
    cache, start, outs = model.make_cache(), 0, []
    for n in chunks:
        outs.append(model(mx.array(ids[:, start : start + n]), cache=cache))
        start += n
    assert relative_error(mx.concatenate(outs, axis=1), ref) < BOUND


def test_the_window_matters_here(workdir, references, ids):
    """Control: the sequence is long enough that ignoring the sliding window breaks parity."""
    model, _ = load_quietly(workdir[1]["generic", "hf"])
    for layer in model.layers:
        layer.self_attn.window = None
    assert relative_error(model(mx.array(ids)), references["hf"]) > 10 * BOUND


def test_kv_sharing_matters_here(workdir, references, ids):
    """Control: shared layers reading another layer's K/V break parity."""
    model, _ = load_quietly(workdir[1]["generic", "hf"])
    producers = model.model.language_model._kv_producers
    producers.update({i: p - 1 for i, p in producers.items()})
    assert relative_error(model(mx.array(ids)), references["hf"]) > 10 * BOUND


def test_shared_layers_reuse_their_producers_cache(case):
    model = case[0]
    cache, cfg = model.make_cache(), model.config
    first = cfg.first_kv_shared_layer
    for i in range(first, cfg.num_hidden_layers):
        producer = max(j for j in range(first) if cfg.layer_types[j] == cfg.layer_types[i])
        assert cache[i] is cache[producer]
    assert len({id(c) for c in cache}) == first


def test_old_and_new_rope_configs_agree():
    new = TextConfig.from_dict(tiny_text_config())
    old_cfg = tiny_text_config(rope_theta=1e6, rope_local_base_freq=1e4)
    del old_cfg["rope_parameters"]
    old = TextConfig.from_dict(old_cfg)
    assert new.rope_thetas == old.rope_thetas == {FULL: 1e6, SLIDING: 1e4}
    odd = tiny_text_config(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 5e5},
                                            "sliding_attention": {"rope_type": "default", "rope_theta": 2e4}})
    assert TextConfig.from_dict(odd).rope_thetas == {FULL: 5e5, SLIDING: 2e4}


def test_unsupported_rope_type_is_refused():
    cfg = tiny_text_config(rope_parameters={"full_attention": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 8}})
    with pytest.raises(ValueError, match="yarn"):
        TextConfig.from_dict(cfg)


def test_mlx_quantized_bundle_matches_the_reference_on_dequantized_weights(tmp_path, ids):
    """MLX-quantized weights pass through the converter; the runtime's quantized projections and
    embeddings (with the recorded bits and group size) must compute what the dequantized
    weights compute in transformers."""
    from convert.gemma3n import EMBEDDINGS, projection_role
    from manifests import PREFIX
    from tests.checkpoints import checkpoint_tensors, full_config, write_tensors

    cfg = tiny_text_config()
    tensors = checkpoint_tensors(cfg, "mlx-lm", kv_shared_extras=False, seed=4)
    stored, dequantized = {}, {}
    for key, w in tensors.items():
        module = key[len(PREFIX): -len(".weight")] if key.endswith(".weight") else None
        if module and (projection_role(module) or module in EMBEDDINGS) and w.shape[-1] % 32 == 0:
            q, scales, biases = mx.quantize(w, group_size=32, bits=4)
            stored.update({key: q, key[:-len("weight")] + "scales": scales, key[:-len("weight")] + "biases": biases})
            w = mx.dequantize(q, scales, biases, group_size=32, bits=4)
        else:
            stored[key] = w
        dequantized[key[len(PREFIX):]] = np.array(w)
    src = tmp_path / "quantized"
    src.mkdir()
    config = dict(full_config(cfg, "mlx-lm"), quantization={"group_size": 32, "bits": 4})
    (src / "config.json").write_text(json.dumps(config))
    write_tensors(src, stored)

    model, _ = load_quietly(convert(src, tmp_path / "bundle", "m5"))
    quantized = [p for p, r in model.manifest["projections"].items() if r["quantized"]]
    assert "lm_head" in quantized and len(quantized) > 60
    ref = reference_logits(reference_model(cfg, dequantized), ids)
    assert relative_error(model(mx.array(ids)), ref) < BOUND
    cache = model.make_cache()
    model(mx.array(ids[:, :PREFILL]), cache=cache)
    for t in range(PREFILL, LENGTH):
        assert relative_error(model(mx.array(ids[:, t : t + 1]), cache=cache), ref[:, t : t + 1]) < BOUND, t


def test_long_decoding_past_the_cache_growth_step(workdir):
    """300 positions: the full-attention cache grows past its first 256-slot buffer while the
    sliding caches rotate dozens of times; chunked prefill, then one token at a time.

    The cached path must equal our own uncached forward (1e-4; it is ~2e-5 here: only the
    order of summation differs, and a window off by one position would be ~1e-1).
    Against transformers the bound is looser at this length (1e-3): float32 RoPE angles near
    position 300 carry ~3e-5 rad of rounding, which mx.fast.rope and torch round differently,
    and this random network amplifies it (with torch's RoPE formula the gap halves)."""
    from runtime.cache import KVCache

    sources, bundles = workdir
    text_config = json.loads((sources["hf"] / "config.json").read_text())["text_config"]
    long_ids = np.random.default_rng(11).integers(0, text_config["vocab_size"], (1, 300))
    ref = reference_logits(reference_model(text_config, source_tensors(sources["hf"], "hf")), long_ids)
    model, _ = load_quietly(bundles["generic", "hf"])
    uncached = np.array(model(mx.array(long_ids)))
    cache = model.make_cache()
    outs = [model(mx.array(long_ids[:, :100]), cache=cache), model(mx.array(long_ids[:, 100:250]), cache=cache)]
    for t in range(250, 300):
        outs.append(model(mx.array(long_ids[:, t : t + 1]), cache=cache))
    assert relative_error(mx.concatenate(outs, axis=1), uncached) < BOUND
    assert relative_error(uncached, ref) < 1e-3
    assert max(c.keys.shape[2] for c in cache if isinstance(c, KVCache)) > KVCache.step


def test_a_bfloat16_bundle_stays_bfloat16(tmp_path, ids):
    """No silent float32 promotion on the main path (it would double the decode traffic); only
    the AltUp router and coefficients run in float32, and they are cast back."""
    from tests.checkpoints import make_checkpoint

    src = make_checkpoint(tmp_path / "src", "hf", dtype=mx.bfloat16)
    model, _ = load_quietly(convert(src, tmp_path / "bundle", "m5", "--dtype", "bfloat16"))
    cache = model.make_cache()
    assert model(mx.array(ids), cache=cache).dtype == mx.bfloat16
    assert {a.dtype for c in cache for a in c.state} == {mx.bfloat16}
    assert model(mx.array(ids[:, :1]), cache=cache).dtype == mx.bfloat16


@pytest.mark.parametrize("capacity", [4, 64], ids=["buffers-grow", "room-to-spare"])
def test_every_step_of_compiled_decoding(workdir, references, ids, capacity):
    """The compiled decode step (fixed-shape caches, runtime/fast.py) against the reference at
    every position past the window; then the eager caches it hands back carry on correctly.
    The step decodes one sequence (as generation does), so each row is its own run. One bundle:
    on every kind of bundle the compiled step equals the eager forward (test_fast.py), which
    every bundle here matches to the reference."""
    model, ref = load_quietly(workdir[1]["generic", "hf"])[0], references["hf"]
    handover = LENGTH - 3
    for row in range(ids.shape[0]):
        seq, want = ids[row : row + 1], ref[row : row + 1]
        decoder = check_compiled_steps(model, seq, want, PREFILL, handover, BOUND, capacity, f"row {row}: ")
        cache = decoder.to_eager()
        assert cache[0].offset == handover
        for t in range(handover, LENGTH):
            step = model(mx.array(seq[:, t : t + 1]), cache=cache)
            assert relative_error(step, want[:, t : t + 1]) < BOUND, f"row {row}: eager step after hand-over at {t}"


def test_the_compiled_decoder_refuses_a_batch(case):
    from runtime.fast import CompiledDecoder

    model, ids, _ = case
    cache = model.make_cache()
    model(mx.array(ids[:, :PREFILL]), cache=cache)
    with pytest.raises(ValueError, match="one sequence"):
        CompiledDecoder(model, cache)


@pytest.mark.parametrize("target", ["generic", "cuda"])
def test_grouped_query_attention_with_two_kv_heads(tmp_path, ids, target):
    """The tiny config has one KV head; Gemma3n has two (8 query heads share 2 E2B/E4B). With 4
    query heads on 2 KV heads, a mix-up of which queries read which keys, or of k and v heads in
    the compiled step's shared K/V buffer and its per-head RoPE table, shows here: eager forward
    and every compiled decode step against transformers (`cuda` stores q/k/v fused)."""
    from tests.checkpoints import make_checkpoint

    text_config = tiny_text_config(num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    src = make_checkpoint(tmp_path / "src", "hf", text_config=text_config, seed=3)
    ref = reference_logits(reference_model(text_config, source_tensors(src, "hf")), ids)
    model, _ = load_quietly(convert(src, tmp_path / target, target))
    assert model.model.language_model.layers[0].self_attn.n_kv_heads == 2
    assert relative_error(model(mx.array(ids)), ref) < BOUND
    for row in range(ids.shape[0]):
        check_compiled_steps(model, ids[row : row + 1], ref[row : row + 1], PREFILL, LENGTH, BOUND, 16, f"row {row}: ")
