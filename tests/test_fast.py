"""The compiled decode path (runtime/fast.py) inside generation: same tokens as the eager path.

Per-position logits against transformers are checked in test_model_parity.py; here, whole
generations: sampled and greedy, one prompt and a chat that prefills eagerly after a compiled turn.
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
