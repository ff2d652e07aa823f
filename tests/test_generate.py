"""The decode loop: greedy equals a no-cache reference, stop ids, max tokens, seeds, the
look-ahead pipelining, chat sessions that keep their cache, and the capture hook's gating.

The model is the runtime's own, loaded from the tiny random checkpoint of tests/checkpoints.py
converted by the real converter, and again mlx-lm's gemma3n on the same weights: generation only
relies on the interface both share (`model(ids, cache=...)`, `model.make_cache()`). The reference
never uses a cache across steps: it runs the whole sequence through a fresh cache each step
(mlx-lm's gemma3n needs a cache to be right).
"""

import subprocess
import sys
import warnings

import mlx.core as mx
import pytest

from runtime import load
from runtime.generate import (
    CaptureError,
    ChatSession,
    DecodeCapture,
    generate,
    generate_step,
    prefill,
    stream_generate,
)
from runtime.sampling import Sampler, SamplingParams
from runtime.tokenizer import Tokenizer
from tests.checkpoints import checkpoint_tensors, make_checkpoint, tiny_text_config

gemma3n = pytest.importorskip("mlx_lm.models.gemma3n")

PROMPT = [2, 17, 33, 5, 61, 80, 99, 140, 7, 250, 31, 12]  # longer than the sliding window (8)


@pytest.fixture(scope="module", params=["bundle", "mlx-lm"])
def model(request, tmp_path_factory):
    """The runtime's own model from a converted bundle, and mlx-lm's gemma3n on the same weights."""
    if request.param == "bundle":
        root = tmp_path_factory.mktemp("gen")
        make_checkpoint(root / "src", "mlx-lm")
        r = subprocess.run([sys.executable, "-m", "convert", "--target", "generic", str(root / "src"),
                            str(root / "bundle")], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m, _ = load(root / "bundle")
        return m
    cfg = tiny_text_config(rope_theta=1_000_000.0, rope_local_base_freq=10_000.0)
    m = gemma3n.Model(gemma3n.ModelArgs(model_type="gemma3n", text_config=cfg))
    m.load_weights(list(checkpoint_tensors(cfg, "mlx-lm", towers=False).items()), strict=True)
    mx.eval(m.parameters())
    return m


@pytest.fixture(scope="module")
def tokenizer():
    from tests.test_tokenizer import byte_level_tokenizer
    return Tokenizer(byte_level_tokenizer(), eos_token_ids=[1], bos_token="<bos>", add_bos_token=True)


def reference_greedy(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        logits = model(mx.array([ids]), cache=model.make_cache())[0, -1]
        ids.append(int(mx.argmax(logits).item()))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def greedy(model):
    return reference_greedy(model, PROMPT, 10)


class CallLog:
    """Wraps a model and records each call's input length and how many tokens the consumer had
    received at that moment."""

    def __init__(self, model):
        self.model, self.calls, self.received = model, [], 0

    def __call__(self, ids, cache=None):
        self.calls.append((ids.shape[1], self.received))
        return self.model(ids, cache=cache)

    def make_cache(self):
        return self.model.make_cache()


@pytest.mark.parametrize("step_size", [3, 512])
def test_greedy_matches_reference_with_chunked_prefill(model, greedy, step_size):
    out = [t for t, _ in generate_step(PROMPT, model, max_tokens=10, prefill_step_size=step_size)]
    assert out == greedy


def test_prefill_chunks_feed_the_whole_prompt(model):
    log = CallLog(model)
    prefill(log, mx.array(PROMPT), log.make_cache(), step_size=5)
    assert [n for n, _ in log.calls] == [5, 5, 2]


def test_decode_builds_next_step_before_handing_out_a_token(model):
    log = CallLog(model)
    for _ in generate_step(PROMPT, log, max_tokens=6):
        log.received += 1
    # One prefill call, then a one-token step per token but the last. The first token goes out
    # before any step is built (building the first one may compile kernels); after that, the step
    # that feeds token k is built before the consumer receives token k (look-ahead of one).
    assert log.calls[0] == (len(PROMPT), 0)
    decode_calls = log.calls[1:]
    assert [n for n, _ in decode_calls] == [1] * 5
    assert [received for _, received in decode_calls] == [1, 1, 2, 3, 4]


@pytest.mark.parametrize("max_tokens", [2**40, 10**30])
def test_a_huge_max_tokens_is_a_bound_not_an_allocation(model, greedy, max_tokens):
    """"Until EOS" as mlx-lm callers write it: the compiled decoder sized its KV buffers by
    max_tokens (10**9 a segfault, 2**40 an OverflowError, 10**30 a C++ bad_cast); now by the
    model's context at most, and the tokens are the same."""
    out = []
    for token, _ in generate_step(PROMPT, model, max_tokens=max_tokens):
        out.append(token)
        if len(out) == 10:
            break
    assert out == greedy


@pytest.mark.parametrize("compiled", [False, None])
def test_the_first_token_is_fed_even_when_the_caller_stops_there(model, greedy, compiled):
    """It goes out as fed before its step is built: stopping at it must still leave it in the
    cache, so that the cache holds the prompt and the token, as after any other token."""
    cache = model.make_cache()
    steps = generate_step(PROMPT, model, cache=cache, max_tokens=5, compiled=compiled)
    token, fed = next(steps)
    steps.close()
    assert (token, fed) == (greedy[0], True)
    assert cache[0].offset == len(PROMPT) + 1
    following = model(mx.array([[greedy[1]]]), cache=cache)[0, -1]
    whole = model(mx.array([PROMPT + greedy[:2]]), cache=model.make_cache())[0, -1]
    assert mx.allclose(following, whole, atol=1e-4).item()


def test_the_first_token_comes_before_the_compiled_decoder_starts(monkeypatch, model, greedy):
    """The compiled decoder (and, on a fresh machine, MLX's kernel compilation) comes after the
    first token is out, not before it."""
    import importlib

    generation = importlib.import_module("runtime.generate")  # the module: `runtime.generate` is the function
    if not isinstance(model, generation.Model):
        pytest.skip("the compiled decoder is this runtime's")
    events = []
    real = generation.CompiledDecoder

    def starting(*args, **kwargs):
        events.append("decoder")
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "CompiledDecoder", starting)
    for token, _ in generate_step(PROMPT, model, max_tokens=3):
        events.append(token)
    assert events == [greedy[0], "decoder", greedy[1], greedy[2]]


@pytest.mark.parametrize("compiled", [False, True, None])
def test_generate_decodes_eagerly_with_compiled_false(model, tokenizer, compiled, monkeypatch):
    """`compiled` passes through generate and stream_generate: False decodes through the model
    itself (no compiled decoder is made), True and the default through runtime/fast.py for the
    runtime's model; the greedy text is the same. mlx-lm's model decodes eagerly by default and
    cannot be compiled."""
    from runtime.model import Model

    gen = sys.modules["runtime.generate"]  # the module (`runtime.generate` is also the function)

    made = []

    class Recorded(gen.CompiledDecoder):
        def __init__(self, *args, **kwargs):
            made.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(gen, "CompiledDecoder", Recorded)
    ours = isinstance(model, Model)
    if compiled and not ours:
        with pytest.raises(ValueError, match="compiled decoding needs this runtime's model"):
            generate(model, tokenizer, PROMPT, max_tokens=6, compiled=compiled)
        return
    text = generate(model, tokenizer, PROMPT, max_tokens=6, eos_token_ids=[], compiled=compiled)
    assert text == generate(model, tokenizer, PROMPT, max_tokens=6, eos_token_ids=[], compiled=False) != ""
    assert len(made) == (1 if ours and compiled is not False else 0)  # the compiled=False run made none


@pytest.mark.parametrize("compiled", ["no", 0, 1])
def test_compiled_takes_a_bool(model, compiled):
    with pytest.raises(TypeError, match="compiled must be True, False or None"):
        generate(model, None, PROMPT, max_tokens=2, compiled=compiled)


def test_stop_on_any_eos_id(model, greedy):
    stop_at = 3
    eos = greedy[stop_at]
    assert eos not in greedy[:stop_at]
    responses = list(stream_generate(model, None, PROMPT, max_tokens=10, eos_token_ids=[9999, eos]))
    assert [r.token for r in responses] == greedy[:stop_at + 1]
    assert responses[-1].finish_reason == "stop"
    assert all(r.finish_reason is None for r in responses[:-1])


def test_max_tokens_and_last_token_not_cached(model, greedy):
    responses = list(stream_generate(model, None, PROMPT, max_tokens=4, eos_token_ids=[]))
    assert [r.token for r in responses] == greedy[:4]
    assert responses[-1].finish_reason == "length"
    assert [r.cached for r in responses] == [True, True, True, False]
    assert responses[-1].prompt_tokens == len(PROMPT) and responses[-1].generation_tokens == 4


def test_text_excludes_stop_token_and_matches_decode(model, tokenizer):
    prompt = "Beautiful is"
    tokens = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=8, eos_token_ids=[])]
    text = generate(model, tokenizer, prompt, max_tokens=8, eos_token_ids=[])
    assert text == tokenizer.decode(tokens)
    stop = tokens[2]
    cut = tokens[:tokens.index(stop)]
    assert generate(model, tokenizer, prompt, max_tokens=8, eos_token_ids=[stop]) == tokenizer.decode(cut)


def test_seeded_sampling_is_reproducible_and_seed_dependent(model):
    def run(seed):
        return [t for t, _ in generate_step(PROMPT, model, max_tokens=8,
                                            sampler=Sampler(SamplingParams(temperature=5.0, seed=seed)))]
    a, b, c = run(7), run(7), run(8)
    assert a == b
    assert a != c


def test_repetition_penalty_changes_greedy_choice(model):
    # A huge penalty on every token seen makes greedy avoid the prompt and its own output.
    sampler = Sampler(SamplingParams(repetition_penalty=1e6, repetition_context_size=1000))
    out = [t for t, _ in generate_step(PROMPT, model, max_tokens=6, sampler=sampler)]
    assert not set(out) & set(PROMPT)
    assert len(set(out)) == len(out)


def test_chat_session_keeps_cache_across_turns(model, tokenizer):
    """The second reply equals greedy decoding of the whole conversation from scratch."""
    session = ChatSession(model, tokenizer, max_tokens=5)
    first = list(session.send("Simple is better"))
    second = [r.token for r in session.send("than complex")]
    eot = tokenizer.end_of_turn_id
    history = tokenizer.encode("<start_of_turn>user\nSimple is better<end_of_turn>\n<start_of_turn>model\n")
    history += [r.token for r in first]
    closing = "\n" if first[-1].token == eot else "<end_of_turn>\n"
    history += tokenizer.encode(closing + "<start_of_turn>user\nthan complex<end_of_turn>\n<start_of_turn>model\n",
                                add_special_tokens=False)
    expected = reference_greedy(model, history, len(second))
    stop_ids = tokenizer.chat_stop_ids()
    assert second == expected[:len(second)]
    assert len(second) == 5 or second[-1] in stop_ids


class FakeMetal:
    def __init__(self, log):
        self.log, self.events = log, []

    def start(self, path):
        self.events.append(("start", path, len(self.log.calls)))

    def stop(self):
        self.events.append(("stop", len(self.log.calls)))


def test_capture_takes_exactly_the_second_decode_step_then_stops(model, tmp_path):
    log = CallLog(model)
    metal = FakeMetal(log)
    env = {"MTL_CAPTURE_ENABLED": "1", "MLX_PREPARED_CAPTURE_DECODE": str(tmp_path / "decode.gputrace")}
    capture = DecodeCapture.from_env(env, start=metal.start, stop=metal.stop)
    responses = list(stream_generate(log, None, PROMPT, max_tokens=20, eos_token_ids=[], capture=capture))
    # calls: prefill, decode step 1 (feeds token 1), decode step 2 (feeds token 2) inside capture
    assert metal.events == [("start", str(tmp_path / "decode.gputrace"), 2), ("stop", 3)]
    assert [n for n, _ in log.calls] == [len(PROMPT), 1, 1]
    assert [r.finish_reason for r in responses] == [None, "capture"]


@pytest.mark.parametrize("env", [
    {},
    {"MTL_CAPTURE_ENABLED": "1"},
    {"MLX_PREPARED_CAPTURE_DECODE": "x.gputrace"},
    {"MTL_CAPTURE_ENABLED": "0", "MLX_PREPARED_CAPTURE_DECODE": "x.gputrace"},
])
def test_capture_is_inert_unless_both_variables_are_set(model, env, monkeypatch):
    for name in ("MTL_CAPTURE_ENABLED", "MLX_PREPARED_CAPTURE_DECODE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    calls = []
    assert DecodeCapture.from_env(start=calls.append, stop=lambda: calls.append("stop")) is None
    responses = list(stream_generate(model, None, PROMPT, max_tokens=4, eos_token_ids=[]))
    assert len(responses) == 4 and responses[-1].finish_reason == "length"
    assert calls == []


def test_capture_without_metal_is_a_clear_error(tmp_path):
    if mx.metal.is_available():
        pytest.skip("this machine has Metal")
    env = {"MTL_CAPTURE_ENABLED": "1", "MLX_PREPARED_CAPTURE_DECODE": str(tmp_path / "t.gputrace")}
    with pytest.raises(CaptureError, match="Metal is not available"):
        DecodeCapture.from_env(env)


def test_capture_refuses_to_overwrite(tmp_path):
    (tmp_path / "t.gputrace").mkdir()
    env = {"MTL_CAPTURE_ENABLED": "1", "MLX_PREPARED_CAPTURE_DECODE": str(tmp_path / "t.gputrace")}
    with pytest.raises(CaptureError, match="already exists"):
        DecodeCapture.from_env(env, start=lambda p: None, stop=lambda: None)
