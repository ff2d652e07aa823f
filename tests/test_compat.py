"""Parity with mlx-lm's generation API: its keywords (accepted under its names or refused with
ours), its `sampler` and `logits_processors` hooks (driven here by mlx-lm's own
`make_sampler` / `make_logits_processors`), and log-probabilities in every GenerationResponse,
checked against a log-softmax of the model's logits computed without a cache, in numpy."""

import io
import contextlib

import mlx.core as mx
import numpy as np
import pytest

from runtime.compat import REFUSED
from runtime.generate import GenerationResponse, generate, stream_generate
from runtime.sampling import SamplingParams
from tests.runtime_helpers import demo_bundle, load_quietly

sample_utils = pytest.importorskip("mlx_lm.sample_utils")

PROMPT = "Beautiful is better than"


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_quietly(demo_bundle(tmp_path_factory.mktemp("compat")))


def test_temp_is_mlx_lms_name_for_temperature(loaded):
    model, tokenizer = loaded
    ours = generate(model, tokenizer, PROMPT, max_tokens=16, temperature=1.5, seed=3)
    assert generate(model, tokenizer, PROMPT, max_tokens=16, temp=1.5, seed=3) == ours
    assert ours != generate(model, tokenizer, PROMPT, max_tokens=16)  # it did sample
    with pytest.raises(TypeError, match="temp is mlx-lm's name for temperature"):
        generate(model, tokenizer, PROMPT, temperature=1.0, temp=1.0)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_keywords_say_so_and_none_passes(loaded, name):
    model, tokenizer = loaded
    with pytest.raises(TypeError) as caught:
        generate(model, tokenizer, PROMPT, max_tokens=2, **{name: 1})
    assert name in str(caught.value) and "not supported" in str(caught.value)
    assert generate(model, tokenizer, PROMPT, max_tokens=4, **{name: None}) == \
        generate(model, tokenizer, PROMPT, max_tokens=4)


def test_unknown_keyword_is_a_type_error(loaded):
    model, tokenizer = loaded
    with pytest.raises(TypeError, match="unexpected keyword argument 'temprature'"):
        generate(model, tokenizer, PROMPT, temprature=0.5)


def test_mlx_lm_sampler(loaded):
    model, tokenizer = loaded
    greedy = [r.token for r in stream_generate(model, tokenizer, PROMPT, max_tokens=12)]
    assert [r.token for r in stream_generate(model, tokenizer, PROMPT, max_tokens=12,
                                             sampler=sample_utils.make_sampler(0.0))] == greedy
    seen = []

    def always_seven(logprobs):
        seen.append(logprobs.shape)
        return mx.array([7])

    tokens = [r.token for r in stream_generate(model, tokenizer, PROMPT, max_tokens=5, sampler=always_seven)]
    assert tokens == [7] * 5 and seen[0] == (1, model.config.vocab_size)
    with pytest.raises(TypeError, match="not several"):
        generate(model, tokenizer, PROMPT, sampler=always_seven, temperature=0.5)


def test_mlx_lm_logits_processors(loaded):
    model, tokenizer = loaded
    # mlx-lm's own repetition penalty as a processor decodes what ours does
    processors = sample_utils.make_logits_processors(repetition_penalty=20.0, repetition_context_size=20)
    theirs = [r.token for r in stream_generate(model, tokenizer, PROMPT, max_tokens=24, logits_processors=processors)]
    ours = [r.token for r in stream_generate(model, tokenizer, PROMPT, max_tokens=24,
                                             sampling=SamplingParams(repetition_penalty=20.0,
                                                                     repetition_context_size=20))]
    assert theirs == ours
    assert ours != [r.token for r in stream_generate(model, tokenizer, PROMPT, max_tokens=24)]
    # a processor sees every id so far (prompt, then each token fed), and its logits are reported
    lengths = []

    def force(tokens, logits):
        lengths.append(tokens.size)
        return logits + mx.where(mx.arange(logits.shape[-1]) == 9, 1e4, 0.0)

    responses = list(stream_generate(model, tokenizer, PROMPT, max_tokens=4, logits_processors=[force]))
    prompt_len = len(tokenizer.encode(PROMPT))
    assert [r.token for r in responses] == [9] * 4
    assert lengths == [prompt_len, prompt_len + 1, prompt_len + 2, prompt_len + 3]
    assert responses[0].logprobs[9].item() == pytest.approx(0.0, abs=1e-3)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_logprobs_are_the_models_log_softmax(loaded):
    model, tokenizer = loaded
    ids = tokenizer.encode(PROMPT)
    responses = list(stream_generate(model, tokenizer, ids, max_tokens=10, eos_token_ids=[]))
    tokens = [r.token for r in responses]
    # reference: the whole sequence at once, no cache carried between steps, softmax in numpy
    logits = np.array(model(mx.array([ids + tokens]), cache=model.make_cache())[0].astype(mx.float32))
    reference = log_softmax(logits[len(ids) - 1: len(ids) - 1 + len(tokens)])
    for step, r in enumerate(responses):
        got = np.array(r.logprobs)
        assert got.shape == (model.config.vocab_size,)
        np.testing.assert_allclose(got, reference[step], atol=1e-4)
        assert int(np.argmax(got)) == r.token  # greedy picks the most likely token


def test_prompt_cache_progress_verbose_and_response_fields(loaded):
    model, tokenizer = loaded
    cache = model.make_cache()
    calls = []
    text = generate(model, tokenizer, PROMPT, max_tokens=6, prompt_cache=cache, prefill_step_size=2,
                    prompt_progress_callback=lambda done, total: calls.append((done, total)))
    n = len(tokenizer.encode(PROMPT))
    assert cache[0].offset == n + 5  # the prompt and every generated token but the last
    assert calls[0] == (0, n) and calls[-1] == (n, n) and calls == sorted(calls)
    with pytest.raises(TypeError, match="not both"):
        generate(model, tokenizer, PROMPT, cache=model.make_cache(), prompt_cache=model.make_cache())
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert generate(model, tokenizer, PROMPT, max_tokens=6, verbose=True) == text
    assert out.getvalue().startswith(text) and "tokens-per-sec" in out.getvalue()
    last = list(stream_generate(model, tokenizer, PROMPT, max_tokens=2))[-1]
    assert isinstance(last, GenerationResponse) and last.peak_memory == last.peak_memory_gb
    assert last.from_draft is False
