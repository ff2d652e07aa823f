"""The compiled decode path (runtime/fast.py) against the eager model (runtime/model.py).

One test per kind of bundle the converter writes: the compiled step's logits equal the eager
forward's, step by step (the two share DecoderLayer.forward; the compiled step's attention, RoPE
and fused kernels are its own). Per-position logits against transformers are checked in
test_model_parity.py (eager on every bundle, the compiled step on one); here also whole
generations, sampled and greedy, and a chat that prefills eagerly after a compiled turn.
"""

import pytest

from runtime.generate import generate_step
from runtime.sampling import Sampler, SamplingParams
from tests.checkpoints import make_checkpoint
from tests.runtime_helpers import convert, load_quietly


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast")
    bundle = convert(make_checkpoint(root / "src", "hf", seed=3), root / "m5", "m5")
    model, _ = load_quietly(bundle)
    return model


PROMPT = [5, 17, 33, 2, 9, 100, 200, 31, 7, 8, 44]


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.8, top_k=20, seed=4)],
                         ids=["greedy", "sampled"])
def test_compiled_generation_matches_eager(model, params):
    # 40 tokens: past the sliding window (8) many times over, and past the initial capacity.
    run = lambda compiled: [t for t, _ in generate_step(PROMPT, model, sampler=Sampler(params),  # noqa: E731
                                                        max_tokens=40, compiled=compiled)]
    eager, compiled = run(False), run(True)
    assert len(eager) == 40
    assert compiled == eager


def test_cache_handed_back_after_compiled_turn(model):
    """A second turn prefills eagerly on the cache the compiled first turn filled."""
    def two_turns(compiled):
        cache = model.make_cache()
        first = [t for t, _ in generate_step(PROMPT, model, cache=cache, max_tokens=12, compiled=compiled)]
        offset = cache[0].offset
        second = [t for t, _ in generate_step([3, 4, 5], model, cache=cache, max_tokens=12, compiled=compiled)]
        return first, offset, second

    assert two_turns(True) == two_turns(False)
    assert two_turns(True)[1] == len(PROMPT) + 11  # the last token of a max_tokens run is not fed


@pytest.mark.parametrize("written", [3, 8, 13, 21])
def test_ring_layout_round_trip(written):
    """to_ring puts position p in slot p % window; from_ring hands that back to the eager cache,
    which then continues exactly like one that never left."""
    import mlx.core as mx

    from runtime.cache import RotatingKVCache

    window = 8
    keys = mx.arange(32, dtype=mx.float32).reshape(1, 1, 32, 1) + 1  # position p carries p + 1

    def filled(n):
        cache = RotatingKVCache(window)
        cache.update_and_fetch(keys[:, :, :2], keys[:, :, :2])  # a prefill, then single tokens
        for p in range(2, n):
            cache.update_and_fetch(keys[:, :, p : p + 1], keys[:, :, p : p + 1])
        return cache

    ring, _ = filled(written).to_ring()
    slots = ring.reshape(-1).tolist()
    for p in range(max(0, written - window), written):
        assert slots[p % window] == p + 1
    assert slots.count(0) == max(0, window - written)

    back = RotatingKVCache(window)
    back.from_ring(*filled(written).to_ring(), written)
    same = filled(written)
    for p in range(written, written + 10):
        got = back.update_and_fetch(keys[:, :, p : p + 1], keys[:, :, p : p + 1])
        want = same.update_and_fetch(keys[:, :, p : p + 1], keys[:, :, p : p + 1])
        assert got[2] == want[2]
        assert sorted(got[0].reshape(-1).tolist()) == sorted(want[0].reshape(-1).tolist())


# Every kind of bundle the converter writes, by its `convert` arguments (after SOURCE's target):
# layouts (standard, m5's and cpu-x86_64's float32 pretransposed), fused groups (qkv and gate_up on
# cpu-x86_64, qkv_laurel, q_laurel and gate_up on cuda), quantization (4- and 8-bit, fused too) and
# dtypes (float32, bfloat16).
KINDS = {
    "generic": ("generic",),
    "m5": ("m5",),
    "cpu-x86_64": ("cpu-x86_64",),
    "cuda": ("cuda",),
    "generic-4bit": ("generic", "--quantize", "4", "--group-size", "32"),
    "cuda-8bit": ("cuda", "--quantize", "8", "--group-size", "32"),
    "generic-bf16": ("generic", "--dtype", "bfloat16"),
    "m5-bf16": ("m5", "--dtype", "bfloat16"),
    "cpu-x86_64-bf16": ("cpu-x86_64", "--dtype", "bfloat16"),
    "cuda-4bit-bf16": ("cuda", "--dtype", "bfloat16", "--quantize", "4", "--group-size", "32"),
}


def kind_of(model) -> tuple[set, set, set]:
    """(layouts, fused modules, quantized bits) the loaded model is built of: that a kind is what it says."""
    from runtime.projections import Pretransposed, QuantizedStandard

    modules = [m for layer in model.layers for _, m in layer.named_modules()]
    layouts = {"pretransposed" if isinstance(m, Pretransposed) else "standard" for m in modules if "weight" in m
               or "weight_t" in m}
    fused = {name for layer in model.layers for name in layer.fused}
    bits = {m.bits for m in modules if isinstance(m, QuantizedStandard)}
    return layouts, fused, bits


@pytest.mark.parametrize("kind", KINDS)
def test_the_compiled_step_computes_what_the_eager_forward_computes(kind, tmp_path):
    """The two forward passes (runtime/model.py, runtime/fast.py) on every kind of bundle: after
    an eager prefill, each compiled step's logits against the eager model's on the same cache,
    past the sliding window (16) and through one growth of the compiled K/V buffers; then the
    caches handed back carry on eagerly. Both run DecoderLayer.forward; attention, RoPE and the
    fused kernels are the compiled step's own, so float32 agrees to rounding (1e-5; about 5e-7
    measured) and bfloat16 to its own (3e-2; 1.4e-2 measured), with the same argmax at every step."""
    import mlx.core as mx
    import numpy as np
    from tokenizers import Tokenizer

    from runtime.fast import CompiledDecoder
    from tests.runtime_helpers import DEMO, relative_error, zen_of_python

    target, *extra = KINDS[kind]
    dtype = "float32" if "--dtype" not in extra else None
    model, _ = load_quietly(convert(DEMO, tmp_path / kind, target, *extra, *(("--dtype", dtype) if dtype else ())))
    layouts, fused, bits = kind_of(model)
    assert ("pretransposed" in layouts) == (target == "m5" or kind == "cpu-x86_64")
    assert fused == {"cuda": {"qkv_laurel_proj", "q_laurel_proj", "mlp.gate_up_proj"},
                     "cpu-x86_64": {"self_attn.qkv_proj", "mlp.gate_up_proj"}}.get(target, set())
    assert bits == ({int(extra[extra.index("--quantize") + 1])} if "--quantize" in extra else set())
    bf16 = "bfloat16" in extra

    ids = Tokenizer.from_file(str(DEMO / "tokenizer.json")).encode(zen_of_python()).ids
    prefill, handover, end = 8, 28, 32
    eager_cache, compiled_cache = model.make_cache(), model.make_cache()
    for cache in (eager_cache, compiled_cache):
        model(mx.array([ids[:prefill]]), cache=cache)
    decoder = CompiledDecoder(model, compiled_cache, capacity=12)  # grows once, to 24, then 48
    for t in range(prefill, handover):
        want = model(mx.array([[ids[t]]]), cache=eager_cache)[:, -1, :]
        got = decoder(mx.array([ids[t]]))
        assert got.dtype == want.dtype == (mx.bfloat16 if bf16 else mx.float32)
        assert relative_error(got.astype(mx.float32), np.array(want.astype(mx.float32))) < (3e-2 if bf16 else 1e-5), t
        assert mx.argmax(got).item() == mx.argmax(want).item(), t
    handed = decoder.to_eager()
    for t in range(handover, end):
        want = model(mx.array([[ids[t]]]), cache=eager_cache)
        got = model(mx.array([[ids[t]]]), cache=handed)
        assert relative_error(got.astype(mx.float32), np.array(want.astype(mx.float32))) < (3e-2 if bf16 else 1e-5), t
