"""runtime.model.Model against transformers' Gemma3nForCausalLM in float32.

Metric everywhere: max |ours - ref| / max |ref| over the compared logits, bound 1e-4.
The tiny config has a sliding window (8) shorter than the 20-token sequence, KV-shared layers
(the last 4 of 10) and sparse MLPs (the first 5); the ids include one beyond the per-layer
table (300 >= 256). Weights come straight from tests/checkpoints.py here, laid out as a
`generic` and an `m5` bundle store them; bundles written by the converter are covered in
test_loader.py.
"""

import numpy as np
import pytest

import mlx.core as mx

from runtime.model import FULL, SLIDING, Model, TextConfig
from runtime.projections import Pretransposed, Standard
from tests.checkpoints import checkpoint_tensors, tiny_text_config
from tests.runtime_helpers import layout_records, reference_logits, reference_model, relative_error

pytest.importorskip("transformers")

BOUND = 1e-4
LENGTH, PREFILL = 20, 12


@pytest.fixture(scope="module")
def checkpoint():
    cfg = tiny_text_config()
    return cfg, checkpoint_tensors(cfg, "mlx-lm", kv_shared_extras=False, seed=0)


@pytest.fixture(scope="module")
def reference(checkpoint):
    cfg, tensors = checkpoint
    ids = np.random.default_rng(7).integers(0, cfg["vocab_size"], (2, LENGTH))
    ids[0, 3] = 300  # beyond vocab_size_per_layer_input: reads per-layer row 0
    ids[1, 15] = cfg["vocab_size"] - 1
    return ids, reference_logits(reference_model(cfg, tensors), ids)


def build(checkpoint, target):
    cfg, tensors = checkpoint
    stored, projections, embeddings = layout_records(tensors, target)
    model = Model(cfg, projections, embeddings)
    model.load_weights(list(stored.items()), strict=True)
    return model


@pytest.fixture(scope="module", params=["generic", "m5"])
def model(request, checkpoint):
    return build(checkpoint, request.param)


def test_layouts_come_from_the_records(checkpoint):
    generic, m5 = build(checkpoint, "generic"), build(checkpoint, "m5")
    mlp = lambda m: m.model.language_model.layers[0].mlp  # noqa: E731
    assert isinstance(mlp(generic).gate_proj, Standard) and isinstance(mlp(m5).gate_proj, Pretransposed)
    assert isinstance(mlp(m5).down_proj, Standard)
    assert generic.tied_head and not m5.tied_head and isinstance(m5.lm_head, Pretransposed)


def test_forward_without_cache(model, reference):
    ids, ref = reference
    assert relative_error(model(mx.array(ids)), ref) < BOUND


def test_prefill_with_cache(model, reference):
    ids, ref = reference
    assert relative_error(model(mx.array(ids), cache=model.make_cache()), ref) < BOUND


def test_every_step_of_cached_decoding(model, reference):
    """Prefill 12 tokens, then feed the fixed continuation one token at a time, past the window."""
    ids, ref = reference
    cache = model.make_cache()
    assert relative_error(model(mx.array(ids[:, :PREFILL]), cache=cache), ref[:, :PREFILL]) < BOUND
    for t in range(PREFILL, LENGTH):
        step = model(mx.array(ids[:, t : t + 1]), cache=cache)
        assert relative_error(step, ref[:, t : t + 1]) < BOUND, f"decode step at position {t}"
    assert cache[0].offset == LENGTH


def test_decoding_from_the_first_token(model, reference):
    ids, ref = reference
    cache = model.make_cache()
    for t in range(LENGTH):
        assert relative_error(model(mx.array(ids[:, t : t + 1]), cache=cache), ref[:, t : t + 1]) < BOUND, t


@pytest.mark.parametrize("chunks", [(5, 6, 1, 8), (9, 11), (1, 1, 18)])
def test_chunked_prefill_across_the_window(model, reference, chunks):
    ids, ref = reference
    cache, start, outs = model.make_cache(), 0, []
    for n in chunks:
        outs.append(model(mx.array(ids[:, start : start + n]), cache=cache))
        start += n
    assert relative_error(mx.concatenate(outs, axis=1), ref) < BOUND


def test_the_window_matters_here(checkpoint, reference):
    """Control: the test sequence is long enough that ignoring the window breaks parity."""
    ids, ref = reference
    model = build(checkpoint, "generic")
    for layer in model.layers:
        layer.self_attn.window = None
    assert relative_error(model(mx.array(ids)), ref) > 10 * BOUND


def test_kv_sharing_matters_here(checkpoint, reference):
    """Control: shared layers that attended to their producer's K/V of the wrong type break parity."""
    ids, ref = reference
    model = build(checkpoint, "generic")
    lm = model.model.language_model
    wrong = {i: (p - 1 if p > 0 else p + 1) for i, p in lm._kv_producers.items()}
    lm._kv_producers.update(wrong)
    assert relative_error(model(mx.array(ids)), ref) > 10 * BOUND


def test_shared_layers_reuse_their_producers_cache(model):
    cache = model.make_cache()
    cfg = model.config
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
