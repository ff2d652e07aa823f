"""Text generation: chunked prefill, then a decode loop that keeps the device busy.

The decode loop overlaps graph building with evaluation: while step n is being evaluated
(`mx.async_eval`), Python already builds step n + 1 on the lazily sampled token of step n, and
only then waits for step n's token to hand it out. The price is one step computed past a stop
token, which is fed to the cache (what a chat turn wants anyway: <end_of_turn> stays in context).

Works with any model shaped like mlx-lm's: `model(ids[batch, len], cache=...) -> logits
[batch, len, vocab]` and `model.make_cache()`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import mlx.core as mx

from runtime.fast import CompiledDecoder
from runtime.inputs import BadType, check_count, check_option, check_text, check_token_ids, vocab_size_of
from runtime.model import Model
from runtime.sampling import Sampler, SamplingParams
from runtime.tokenizer import END_OF_TURN, Tokenizer, chat_turn

DEFAULT_MAX_TOKENS = 256
DEFAULT_PREFILL_STEP = 512

CAPTURE_ENABLE_ENV = "MTL_CAPTURE_ENABLED"
CAPTURE_PATH_ENV = "MLX_PREPARED_CAPTURE_DECODE"


class CaptureError(RuntimeError):
    """The decode capture was asked for but cannot happen here."""


@dataclass
class DecodeCapture:
    """Capture one warm decode step (by default the second, after kernels are compiled) to a
    Metal .gputrace, then stop generating. `start` and `stop` default to MLX's Metal capture."""

    path: str
    step: int = 2
    start: Callable[[str], None] | None = None
    stop: Callable[[], None] | None = None

    @classmethod
    def from_env(cls, environ=None, *, start=None, stop=None) -> DecodeCapture | None:
        """The capture asked for by `MTL_CAPTURE_ENABLED=1` and `MLX_PREPARED_CAPTURE_DECODE=<path>`,
        or None unless both are set. Raises CaptureError where it cannot work."""
        env = os.environ if environ is None else environ
        path = env.get(CAPTURE_PATH_ENV, "")
        if env.get(CAPTURE_ENABLE_ENV) != "1" or not path:
            return None
        if not path.endswith(".gputrace"):
            path += ".gputrace"
        if Path(path).exists():
            raise CaptureError(f"{CAPTURE_PATH_ENV}: {path} already exists; Metal will not overwrite a capture")
        if start is None or stop is None:
            if not mx.metal.is_available():
                raise CaptureError(
                    f"{CAPTURE_PATH_ENV} is set but Metal is not available on this machine "
                    f"(device: {mx.default_device()}); GPU capture needs Apple silicon with Metal")
            start, stop = start or mx.metal.start_capture, stop or mx.metal.stop_capture
        return cls(path=path, start=start, stop=stop)


@dataclass
class GenerationResponse:
    """One generated token and the text it completed (possibly empty: half a character)."""

    text: str
    token: int
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float      # decode rate, tokens after the first over their time
    peak_memory_gb: float
    finish_reason: str | None  # None while generating; "stop", "length" or "capture" at the end
    cached: bool               # whether this token was fed to the cache already


def _cache_arrays(cache) -> list:
    arrays = []
    for entry in cache:
        state = getattr(entry, "state", None)
        if state is None:
            continue
        arrays.extend(a for a in (state if isinstance(state, (list, tuple)) else [state]) if isinstance(a, mx.array))
    return arrays


def prefill(model, tokens: mx.array, cache, step_size: int = DEFAULT_PREFILL_STEP) -> mx.array:
    """Run the prompt through the model in chunks of `step_size` and return the logits of its
    last position, [batch, vocab], lazily. Chunks bound the attention scores' memory."""
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.shape[1] == 0:
        raise ValueError("empty prompt: nothing to condition on")
    while tokens.shape[1] > step_size:
        model(tokens[:, :step_size], cache=cache)
        mx.eval(_cache_arrays(cache))
        tokens = tokens[:, step_size:]
        mx.clear_cache()
    return model(tokens, cache=cache)[:, -1, :]


def generate_step(prompt: Sequence[int] | mx.array, model, *, cache=None, sampler: Sampler | None = None,
                  max_tokens: int = DEFAULT_MAX_TOKENS, prefill_step_size: int = DEFAULT_PREFILL_STEP,
                  capture: DecodeCapture | None = None, compiled: bool | None = None) -> Iterator[tuple[int, bool]]:
    """Yield (token id, fed to the cache) for up to `max_tokens` new tokens. No stop logic here:
    the caller stops iterating. The last token of a `max_tokens` run is not fed to the cache.

    `compiled` (default: on for this runtime's model) decodes through one compiled step over
    fixed-shape caches (runtime/fast.py); the eager caches are brought up to date at the end.
    `compiled=False` decodes eagerly, through the model itself.

    Every id must lie in [0, vocab_size): the model reads its tables by id (TypeError/ValueError
    otherwise, runtime/inputs.py), as must `max_tokens` >= 0 and `prefill_step_size` >= 1."""
    max_tokens = check_count(max_tokens, "max_tokens", 0)
    prefill_step_size = check_count(prefill_step_size, "prefill_step_size", 1)
    prompt = check_token_ids(prompt, vocab_size_of(model))
    compiled = check_option(compiled, "compiled")
    if compiled is None:
        compiled = isinstance(model, Model)
    elif compiled and not isinstance(model, Model):
        raise ValueError("compiled decoding needs this runtime's model (runtime.load); pass compiled=False")
    if max_tokens < 1:
        return
    cache = model.make_cache() if cache is None else cache
    sampler = sampler or Sampler()
    prompt = mx.array(prompt, dtype=mx.int32) if not isinstance(prompt, mx.array) else prompt.astype(mx.int32)
    use_history = sampler.params.repetition_penalty != 1.0
    history = prompt.reshape(1, -1) if use_history else None
    decoder = None

    def decode(token: mx.array):
        nonlocal history, decoder
        if use_history:
            history = mx.concatenate([history, token.reshape(1, 1).astype(mx.int32)], axis=1)
        if compiled:
            if decoder is None:
                decoder = CompiledDecoder(model, cache, capacity=cache[0].offset + max_tokens + 1)
            logits = decoder(token)
        else:
            logits = model(token.reshape(1, 1), cache=cache)[:, -1, :]
        return sampler(logits, history)

    try:
        yield from _decode_loop(model, prompt, cache, sampler, history, decode, max_tokens, prefill_step_size, capture)
    finally:
        if decoder is not None:
            decoder.to_eager()


def _decode_loop(model, prompt, cache, sampler, history, decode, max_tokens, prefill_step_size, capture):
    """Prefill, then decode with the next step's graph built while the current token computes."""
    y = sampler(prefill(model, prompt, cache, prefill_step_size), history)
    mx.async_eval(y)
    for n in range(max_tokens):
        decode_step = n + 1  # feeding generated token n + 1 to the cache
        last = n + 1 == max_tokens
        if last:
            yield int(y.item()), False
            return
        if capture is not None and decode_step == capture.step:
            mx.eval(y)  # nothing of earlier steps may run inside the capture
            capture.start(capture.path)
            try:
                next_y = decode(y)
                mx.eval(next_y)
            finally:
                capture.stop()
            yield int(y.item()), True
            return
        next_y = decode(y)
        mx.async_eval(next_y)
        yield int(y.item()), True
        y = next_y


def _sampling(sampling: SamplingParams | None, kwargs: dict) -> SamplingParams:
    if sampling is not None and kwargs:
        raise TypeError("pass either sampling= or sampling keyword arguments, not both")
    if sampling is not None and not isinstance(sampling, SamplingParams):
        raise BadType(f"sampling must be a SamplingParams, not {type(sampling).__name__}")
    return sampling if sampling is not None else SamplingParams(**kwargs)


def stream_generate(model, tokenizer: Tokenizer | None, prompt: str | Sequence[int], *,
                    max_tokens: int = DEFAULT_MAX_TOKENS, sampling: SamplingParams | None = None,
                    eos_token_ids: Sequence[int] | None = None, chat: bool = False, cache=None,
                    prefill_step_size: int = DEFAULT_PREFILL_STEP, capture: DecodeCapture | None = None,
                    compiled: bool | None = None, **sampling_kwargs) -> Iterator[GenerationResponse]:
    """Generate from `prompt` (text, or token ids), yielding one response per new token.

    Stops at any EOS id (by default the tokenizer's: every one the bundle declares; with `chat`,
    also <end_of_turn>) without yielding its text, or after `max_tokens`. `chat` wraps a text
    prompt in Gemma's turn format. `cache` continues an existing cache (a chat session); without
    one a fresh cache is made. Sampling: `sampling=SamplingParams(...)` or its fields as keywords
    (temperature, top_k, top_p, min_p, repetition_penalty, seed). The decode capture is taken
    from the environment unless `capture` is given (see DecodeCapture.from_env). `compiled`: see
    generate_step (`compiled=False` decodes eagerly).
    """
    params = _sampling(sampling, sampling_kwargs)
    if capture is None:
        capture = DecodeCapture.from_env()
    if isinstance(prompt, str):
        check_text(prompt)
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer; this bundle has none (pass token ids)")
        ids = tokenizer.encode(chat_turn(prompt) if chat else prompt)
    else:
        ids = check_token_ids(prompt, vocab_size_of(model))
        ids = ids.reshape(-1).tolist() if isinstance(ids, mx.array) else ids
    if eos_token_ids is None:
        eos_token_ids = [] if tokenizer is None else (tokenizer.chat_stop_ids() if chat else tokenizer.eos_token_ids)
    stop = set(check_token_ids(eos_token_ids, None))
    detok = tokenizer.detokenizer() if tokenizer is not None else None

    tic = time.perf_counter()
    first_at = None
    prompt_tps = 0.0
    n = 0
    for token, cached in generate_step(ids, model, cache=cache, sampler=Sampler(params), max_tokens=max_tokens,
                                       prefill_step_size=prefill_step_size, capture=capture, compiled=compiled):
        now = time.perf_counter()
        n += 1
        if first_at is None:
            first_at = now
            prompt_tps = len(ids) / (now - tic)
        generation_tps = (n - 1) / (now - first_at) if n > 1 else 0.0
        is_stop = token in stop
        if is_stop:
            finish = "stop"
        elif not cached:
            finish = "length"
        elif capture is not None and n == capture.step:
            finish = "capture"
        else:
            finish = None
        text = ""
        if detok is not None and not is_stop:
            text = detok.add_token(token)
        if finish is not None and detok is not None:
            text += detok.finalize()
        yield GenerationResponse(text=text, token=token, prompt_tokens=len(ids), prompt_tps=prompt_tps,
                                 generation_tokens=n, generation_tps=generation_tps,
                                 peak_memory_gb=mx.get_peak_memory() / 1e9, finish_reason=finish, cached=cached)
        if finish is not None:
            return


def generate(model, tokenizer: Tokenizer | None, prompt: str | Sequence[int], **kwargs) -> str:
    """The whole generated text (without the prompt and the stop token); see stream_generate."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))


class ChatSession:
    """A conversation whose cache lives across turns: each turn prefills only the new text.

    Gemma's format: `<bos><start_of_turn>user\\n...<end_of_turn>\\n<start_of_turn>model\\n`, the
    reply, `<end_of_turn>\\n`, the next user turn. The reply's closing <end_of_turn> is already in
    the cache when generation stopped on it (the decode loop runs one step ahead).
    """

    def __init__(self, model, tokenizer: Tokenizer, *, max_tokens: int = DEFAULT_MAX_TOKENS,
                 sampling: SamplingParams | None = None, prefill_step_size: int = DEFAULT_PREFILL_STEP):
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer; this bundle has none")
        self.model, self.tokenizer = model, tokenizer
        self.max_tokens = check_count(max_tokens, "max_tokens", 0)
        self.prefill_step_size = check_count(prefill_step_size, "prefill_step_size", 1)
        self.sampling = _sampling(sampling, {}) if sampling is not None else None
        self.cache = model.make_cache()
        self._turns = 0
        self._last_token: int | None = None
        self._last_cached = True

    def _turn_ids(self, message: str) -> list[int]:
        text = chat_turn(message)
        if self._turns == 0:
            return self.tokenizer.encode(text)
        pending = [] if self._last_cached or self._last_token is None else [self._last_token]
        closed = self._last_token is not None and self._last_token == self.tokenizer.end_of_turn_id
        prefix = "\n" if closed else END_OF_TURN + "\n"
        return pending + self.tokenizer.encode(prefix + text, add_special_tokens=False)

    def send(self, message: str, **kwargs) -> Iterator[GenerationResponse]:
        """Stream the reply to `message`; the session is ready for the next turn once exhausted."""
        ids = check_token_ids(self._turn_ids(check_text(message, "message")), vocab_size_of(self.model))
        self._turns += 1
        kwargs.setdefault("max_tokens", self.max_tokens)
        kwargs.setdefault("prefill_step_size", self.prefill_step_size)
        if self.sampling is not None:
            kwargs.setdefault("sampling", self.sampling)
        self._last_token, self._last_cached = None, True
        for response in stream_generate(self.model, self.tokenizer, ids, cache=self.cache,
                                        eos_token_ids=self.tokenizer.chat_stop_ids(), **kwargs):
            self._last_token, self._last_cached = response.token, response.cached
            yield response
