"""Text generation: chunked prefill, then a decode loop that keeps the device busy.

The decode loop overlaps graph building with evaluation: while step n is being evaluated
(`mx.async_eval`), Python already builds step n + 1 on the lazily sampled token of step n, and
only then waits for step n's token to hand it out. The price is one step computed past a stop
token, which is fed to the cache (what a chat turn wants anyway: <end_of_turn> stays in context).

With the per-layer embedding table placed `mapped` (runtime/mapped.py), step n + 1 needs the
row of step n's token, gathered on the host, so it cannot be built before that token exists:
building it waits for step n (inside the gather), gathers (a few microseconds), then builds and
dispatches it, and only then hands token n out, so the caller's work on it (detokenizing,
streaming) still overlaps step n + 1. Everything else stays lazy. The row is first used at the end
of the first layer and every later layer depends on it, so at most the embedding and the first
layer (about 1/30 of a step) could run ahead of the gather; what mapped decoding costs is the
host's build and dispatch of a step no longer hiding behind the device
(`benchmarks/bench_ple.py` measures both).

Works with any model shaped like mlx-lm's: `model(ids[batch, len], cache=...) -> logits
[batch, len, vocab]` and `model.make_cache()`.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import mlx.core as mx

from runtime.chat import chat_turn, render_messages, user_and_system
from runtime.compat import from_mlx_lm
from runtime.fast import DEFAULT_CAPACITY, CompiledDecoder
from runtime.inputs import (
    BadType,
    BadValue,
    check_count,
    check_model,
    check_option,
    check_prompt_ids,
    check_text,
    check_token_ids,
    context_length_of,
    vocab_size_of,
)
from runtime.kernels import check_kernel_cache
from runtime.model import Model
from runtime.precompile import pending
from runtime.sampling import Sampler, SamplingParams, apply_repetition_penalty
from runtime.tokenizer import END_OF_TURN, Tokenizer

# mlx-lm's hook: `processor(tokens [n], logits [1, vocab]) -> logits`, tokens being every id so far.
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]

DEFAULT_MAX_TOKENS = 256
DEFAULT_PREFILL_STEP = 512

CAPTURE_ENABLE_ENV = "MTL_CAPTURE_ENABLED"
CAPTURE_PATH_ENV = "MLX_PREPARED_CAPTURE_DECODE"


class ContextLengthWarning(UserWarning):
    """The prompt plus the tokens asked for run past the model's context (max_position_embeddings),
    where its text is unreliable. `warnings.simplefilter("error", ContextLengthWarning)` refuses instead."""


def warn_past_context(model, cached: int, prompt: int, max_tokens: int, stacklevel: int = 3) -> None:
    """A ContextLengthWarning when `cached` + `prompt` + `max_tokens` tokens exceed the model's context."""
    context = context_length_of(model)
    total = cached + prompt + max_tokens
    if context is None or total <= context:
        return
    after = f" after {cached} in the cache" if cached else ""
    warnings.warn(f"a prompt of {prompt} tokens{after} plus up to {max_tokens} generated is {total} tokens, past "
                  f"the model's context of {context} (max_position_embeddings), where its text is unreliable",
                  ContextLengthWarning, stacklevel=stacklevel)


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
    """One generated token and the text it completed (possibly empty: half a character).

    `logits` are the step's, after the repetition penalty and any logits processors, before
    temperature and filters: what the token was drawn from. `logprobs` (mlx-lm's name) is their
    log-softmax, computed only when read, so decoding pays nothing for it.
    """

    text: str
    token: int
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float      # decode rate, tokens after the first over their time
    peak_memory_gb: float
    finish_reason: str | None  # None while generating; "stop", "length" or "capture" at the end
    cached: bool               # whether this token was fed to the cache already
    logits: mx.array | None = field(default=None, repr=False)  # [vocab]
    from_draft: bool = False   # mlx-lm's field; no speculative decoding here

    @property
    def logprobs(self) -> mx.array | None:
        """Log-probabilities over the vocabulary, float32 `[vocab]` (lazy: evaluate to use)."""
        if self.logits is None:
            return None
        x = self.logits.astype(mx.float32)
        return x - mx.logsumexp(x, axis=-1, keepdims=True)

    @property
    def peak_memory(self) -> float:
        """mlx-lm's name for `peak_memory_gb`."""
        return self.peak_memory_gb


def _cache_arrays(cache) -> list:
    arrays = []
    for entry in cache:
        state = getattr(entry, "state", None)
        if state is None:
            continue
        arrays.extend(a for a in (state if isinstance(state, (list, tuple)) else [state]) if isinstance(a, mx.array))
    return arrays


def prefill(model, tokens: mx.array, cache, step_size: int = DEFAULT_PREFILL_STEP,
            progress: Callable[[int, int], None] | None = None) -> mx.array:
    """Run the prompt through the model in chunks of `step_size` and return the logits of its
    last position, [batch, vocab], lazily. Chunks bound the attention scores' memory.
    `progress(done, total)` (mlx-lm's prompt_progress_callback) hears of every evaluated chunk."""
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.shape[1] == 0:
        raise ValueError("empty prompt: nothing to condition on")
    total, done = tokens.shape[1], 0
    if progress is not None:
        progress(0, total)
    while tokens.shape[1] > step_size:
        model(tokens[:, :step_size], cache=cache)
        mx.eval(_cache_arrays(cache))
        tokens = tokens[:, step_size:]
        mx.clear_cache()
        done += step_size
        if progress is not None:
            progress(done, total)
    return model(tokens, cache=cache)[:, -1, :]


class _Picker:
    """Logits to the next token: repetition penalty, logits processors, then the sampler.

    `sampler` is this runtime's `Sampler` (called on the logits) or mlx-lm's kind, any callable
    `sampler(logprobs [1, vocab]) -> ids [1]`. Keeps the ids seen so far when something reads them.

    A caller's sampler is a door (runtime/inputs.py's rule: the model never reads a table with an
    unchecked id): what it returns must be one integer id, and the id must be in the vocabulary.
    The range can only be read once the id is computed, and the next step is built before that
    (the decode loop's look-ahead), so `safe` puts 0 in place of an id out of range for everything
    the model reads (the embedding tables, the repetition history), and `token`, which hands the
    id out, refuses it there with a ValueError.
    """

    def __init__(self, sampler, processors: Sequence[LogitsProcessor] | None, prompt: mx.array,
                 vocab_size: int | None = None):
        self.sampler = sampler or Sampler()
        if not callable(self.sampler):
            raise BadType(f"sampler must be callable (logprobs [1, vocab]) -> token ids, not "
                          f"{type(self.sampler).__name__}")
        self.ours = isinstance(self.sampler, Sampler)
        self.vocab_size = vocab_size
        self.params = self.sampler.params if self.ours else SamplingParams()
        self.processors = list(processors or [])
        if not all(callable(p) for p in self.processors):
            raise BadType("logits_processors must be callables (token ids, logits) -> logits")
        # The ids to check: any a caller's code could choose (a sampler's; ours, on logits a
        # caller's processor may have widened past the vocabulary).
        self.checked = (not self.ours or bool(self.processors)) and vocab_size is not None
        needs_history = self.params.repetition_penalty != 1.0 or bool(self.processors)
        self.history = prompt.reshape(1, -1) if needs_history else None

    def feed(self, token: mx.array) -> None:
        if self.history is not None:
            self.history = mx.concatenate([self.history, token.reshape(1, 1).astype(mx.int32)], axis=1)

    def __call__(self, logits: mx.array) -> tuple[mx.array, mx.array]:
        """(ids [1], processed logits [vocab]), lazily."""
        p = self.params
        if p.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, self.history[..., -p.repetition_context_size:],
                                              p.repetition_penalty)
        for processor in self.processors:
            logits = processor(self.history[0], logits)
            if not isinstance(logits, mx.array) or logits.ndim != 2 or logits.shape[0] != 1:
                what = (f"an array of shape {tuple(logits.shape)}" if isinstance(logits, mx.array)
                        else type(logits).__name__)
                raise BadType(f"logits_processors: {getattr(processor, '__name__', type(processor).__name__)} "
                              f"must return an mx.array of logits [1, vocab], not {what}")
        if self.ours:
            return self.sampler(logits), logits[0]
        x = logits.astype(mx.float32)
        ids = self.sampler(x - mx.logsumexp(x, axis=-1, keepdims=True))
        if not isinstance(ids, mx.array) or not mx.issubdtype(ids.dtype, mx.integer):
            what = f"an array of {ids.dtype}" if isinstance(ids, mx.array) else type(ids).__name__
            raise BadType(f"sampler must return an integer mx.array of token ids, not {what}")
        if ids.size != 1:
            raise BadValue(f"sampler must return one token id for the one sequence, not an array of shape "
                           f"{tuple(ids.shape)}")
        return ids, logits[0]

    def safe(self, ids: mx.array) -> mx.array:
        """`ids` for the model to read: a caller's sampler's id out of the vocabulary becomes 0
        (`token` refuses it when it is handed out)."""
        if not self.checked:
            return ids
        return mx.where((ids >= 0) & (ids < self.vocab_size), ids, 0).astype(ids.dtype)

    def token(self, ids: mx.array) -> int:
        """The id as an int, refused (ValueError) if a caller's sampler chose it outside the vocabulary."""
        token = int(ids.item())
        if self.checked and not 0 <= token < self.vocab_size:
            raise BadValue(f"the sampler returned token id {token}, outside the model's vocabulary "
                           f"[0, {self.vocab_size})")
        return token


def generate_step(prompt: Sequence[int] | mx.array, model, *, cache=None, sampler=None,
                  max_tokens: int = DEFAULT_MAX_TOKENS, prefill_step_size: int = DEFAULT_PREFILL_STEP,
                  capture: DecodeCapture | None = None, compiled: bool | None = None,
                  logits_processors: Sequence[LogitsProcessor] | None = None,
                  prompt_progress_callback: Callable[[int, int], None] | None = None) -> Iterator[tuple[int, bool]]:
    """Yield (token id, fed to the cache) for up to `max_tokens` new tokens. No stop logic here:
    the caller stops iterating. The last token of a `max_tokens` run is not fed to the cache.

    `compiled` (default: on for this runtime's model) decodes through one compiled step over
    fixed-shape caches (runtime/fast.py); the eager caches are brought up to date at the end.
    `compiled=False` decodes eagerly, through the model itself. `sampler`: a `Sampler`, or
    mlx-lm's kind (`sampler(logprobs) -> ids`); `logits_processors`: mlx-lm's hook,
    `processor(ids so far, logits) -> logits`, applied in order before sampling.

    Every id must lie in [0, vocab_size): the model reads its tables by id (TypeError/ValueError
    otherwise, runtime/inputs.py), as must `max_tokens` >= 0 and `prefill_step_size` >= 1."""
    max_tokens = check_count(max_tokens, "max_tokens", 0)
    check_model(model)
    prefill_step_size = check_count(prefill_step_size, "prefill_step_size", 1)
    prompt = check_prompt_ids(prompt, vocab_size_of(model))
    _check_cache_and_capture(cache, capture, model)
    steps = _steps(prompt, model, cache=cache, sampler=sampler, max_tokens=max_tokens,
                   prefill_step_size=prefill_step_size, capture=capture, compiled=_compiled(compiled, model),
                   logits_processors=logits_processors, progress=prompt_progress_callback)
    try:
        for token, cached, _ in steps:
            yield token, cached
    finally:
        steps.close()


def _check_cache_and_capture(cache, capture, model) -> None:
    """`cache` as `model.make_cache()` makes it (a list of per-layer caches), `capture` a
    DecodeCapture: a str or a list of ints was an AttributeError deep in the decode loop."""
    if cache is not None:
        if not isinstance(cache, list) or not cache or not all(isinstance(getattr(c, "offset", None), int)
                                                                for c in cache):
            raise BadType(f"cache must be a list of per-layer caches from model.make_cache(), not "
                          f"{type(cache).__name__} {cache!r:.40}")
        layers = getattr(model, "layers", None) if isinstance(model, Model) else None
        if layers is not None and len(cache) != len(layers):
            raise BadValue(f"cache holds {len(cache)} layer caches, but this model has {len(layers)} layers; "
                           "make it with model.make_cache()")
    if capture is not None and not isinstance(capture, DecodeCapture):
        raise BadType(f"capture must be a DecodeCapture, not {type(capture).__name__}")


def _compiled(compiled, model) -> bool:
    """Whether to decode through the compiled step: `compiled` (True, False or None: on for this
    runtime's model), checked where it enters."""
    compiled = check_option(compiled, "compiled")
    if compiled is None:
        compiled = isinstance(model, Model)
    elif compiled and not isinstance(model, Model):
        raise ValueError("compiled decoding needs this runtime's model (runtime.load); pass compiled=False")
    if compiled:
        check_kernel_cache()
    return compiled


def decode_capacity(model, start: int, max_tokens: int) -> int:
    """The KV slots the compiled decoder starts with, after `start` cached positions: room for
    `max_tokens` more, but not past the model's context (or DEFAULT_CAPACITY past `start`, when
    that is further): `max_tokens` is only a bound, and a caller's "until EOS" of 10**9 allocated
    buffers of that length (a segfault; 2**31 or more an OverflowError, 10**30 a C++ bad_cast).
    Past this the decoder doubles its buffers as it goes (runtime/fast.py)."""
    limit = max(context_length_of(model) or DEFAULT_CAPACITY, start + DEFAULT_CAPACITY)
    return min(start + max_tokens + 1, limit)


def _steps(prompt, model, *, cache, sampler, max_tokens, prefill_step_size, capture, compiled: bool,
           logits_processors, progress) -> Iterator[tuple[int, bool, mx.array]]:
    """generate_step's loop, also yielding each token's processed logits `[vocab]` (lazy); its
    callers have checked the ids and counts."""
    if progress is not None and not callable(progress):
        raise BadType(f"prompt_progress_callback must be callable, not {type(progress).__name__}")
    if max_tokens < 1:
        return
    cache = model.make_cache() if cache is None else cache
    prompt = mx.array(prompt, dtype=mx.int32) if not isinstance(prompt, mx.array) else prompt.astype(mx.int32)
    pick = _Picker(sampler, logits_processors, prompt, vocab_size_of(model))
    decoder = None

    def decode(token: mx.array):
        nonlocal decoder
        token = pick.safe(token)
        pick.feed(token)
        # While a child compiles the step's kernels (runtime/precompile.py), steps run eagerly.
        if compiled and (decoder is not None or not pending(model)):
            if decoder is None:
                decoder = CompiledDecoder(model, cache, capacity=decode_capacity(model, cache[0].offset, max_tokens))
            logits = decoder(token)
        else:
            logits = model(token.reshape(1, 1), cache=cache)[:, -1, :]
        return pick(logits)

    try:
        yield from _decode_loop(model, prompt, cache, pick, decode, max_tokens, prefill_step_size, capture, progress)
    finally:
        if decoder is not None:
            decoder.to_eager()


def _decode_loop(model, prompt, cache, pick, decode, max_tokens, prefill_step_size, capture, progress):
    """Prefill, then decode with the next step's graph built while the current token computes.

    The prompt's own token goes out before the first decode step is built: that build is the
    dearest a step ever is (the compiled decoder starts, and where its kernels were never
    compiled on this machine, MLX compiles them: over a minute on CUDA), and the first token need
    not wait for it. It is still handed out as fed to the cache: should the caller stop there,
    it is fed on the way out (one eager step, what decoding it would have cost anyway)."""
    y, logits = pick(prefill(model, prompt, cache, prefill_step_size, progress))
    mx.async_eval(y)
    for n in range(max_tokens):
        decode_step = n + 1  # feeding generated token n + 1 to the cache
        last = n + 1 == max_tokens
        if last:
            yield _first(pick, y, n, prompt, progress), False, logits
            return
        if capture is not None and decode_step == capture.step:
            mx.eval(y)  # nothing of earlier steps may run inside the capture
            capture.start(capture.path)
            try:
                next_y, next_logits = decode(y)
                mx.eval(next_y)
            finally:
                capture.stop()
            yield pick.token(y), True, logits
            return
        if n == 0:  # out before the first decode step is built (see above)
            try:
                yield _first(pick, y, n, prompt, progress), True, logits
            except GeneratorExit:
                model(pick.safe(y).reshape(1, 1), cache=cache)  # fed, as promised
                mx.eval(_cache_arrays(cache))
                raise
            y, logits = decode(y)
            mx.async_eval(y)
            continue
        next_y, next_logits = decode(y)
        mx.async_eval(next_y)
        yield _first(pick, y, n, prompt, progress), True, logits
        y, logits = next_y, next_logits


def _first(pick: _Picker, y: mx.array, n: int, prompt: mx.array, progress) -> int:
    """The token id; after the first one, the prompt is done (mlx-lm's last progress call)."""
    token = pick.token(y)
    if n == 0 and progress is not None:
        progress(prompt.size, prompt.size)
    return token


def _sampling(sampling: SamplingParams | None, kwargs: dict) -> SamplingParams:
    if sampling is not None and kwargs:
        raise TypeError("pass either sampling= or sampling keyword arguments, not both")
    if sampling is not None and not isinstance(sampling, SamplingParams):
        raise BadType(f"sampling must be a SamplingParams, not {type(sampling).__name__}")
    return sampling if sampling is not None else SamplingParams(**kwargs)


def _sampler(sampling: SamplingParams | None, sampler, kwargs: dict, where: str):
    """One way of choosing tokens: `sampling=`, its fields as keywords, or a `sampler=` callable."""
    known = {f.name for f in fields(SamplingParams)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"{where}() got an unexpected keyword argument {unknown[0]!r}")
    if sum(x for x in (sampling is not None, sampler is not None, bool(kwargs))) > 1:
        raise TypeError(f"{where}(): pass one of sampling=, sampler= or sampling keywords "
                        f"({', '.join(sorted(kwargs)) or 'temperature, top_p, ...'}), not several")
    if sampler is not None:
        if not callable(sampler):
            raise TypeError(f"{where}(): sampler must be callable (logprobs -> token ids), "
                            f"not {type(sampler).__name__}")
        return sampler
    return Sampler(_sampling(sampling, kwargs))


def _prompt_ids(model, tokenizer: Tokenizer | None, prompt, messages, chat: bool,
                where: str) -> tuple[list[int], bool]:
    """The prompt's token ids (checked against the vocabulary), and whether it is a chat (whose
    replies end at <end_of_turn>)."""
    if (prompt is None) == (messages is None):
        raise TypeError(f"{where}(): pass either prompt or messages")
    if messages is not None and chat:
        raise TypeError(f"{where}(): messages are always a chat; chat=True is for a text prompt")
    if messages is not None or isinstance(prompt, str):
        text = check_text(render_messages(messages) if messages is not None else prompt,
                          "messages" if messages is not None else "prompt")
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer; this bundle has none (pass token ids)")
        return tokenizer.encode(chat_turn(text) if chat else text), chat or messages is not None
    ids = check_prompt_ids(prompt, vocab_size_of(model))
    return (ids.tolist() if isinstance(ids, mx.array) else ids), chat


def stream_generate(model, tokenizer: Tokenizer | None, prompt: str | Sequence[int] | None = None, *,
                    messages: Sequence[dict] | None = None, max_tokens: int = DEFAULT_MAX_TOKENS,
                    sampling: SamplingParams | None = None, sampler=None,
                    logits_processors: Sequence[LogitsProcessor] | None = None,
                    eos_token_ids: Sequence[int] | None = None, chat: bool = False, cache=None,
                    prefill_step_size: int = DEFAULT_PREFILL_STEP, capture: DecodeCapture | None = None,
                    prompt_progress_callback: Callable[[int, int], None] | None = None,
                    compiled: bool | None = None, **kwargs) -> Iterator[GenerationResponse]:
    """Generate from `prompt` (text, or token ids) or `messages`, yielding one response per new token.

    `messages`: a conversation (`[{"role": "system" | "user" | "assistant", "content": ...}]`),
    rendered by Gemma's rules (runtime/chat.py). `chat` wraps a text prompt in Gemma's turn
    format. Stops at any EOS id (by default the tokenizer's: every one the bundle declares; in a
    chat, also <end_of_turn>) without yielding its text, or after `max_tokens`. `cache`
    continues an existing cache (a chat session); without one a fresh cache is made.

    Sampling: `sampling=SamplingParams(...)`, or its fields as keywords (temperature, top_k,
    top_p, min_p, repetition_penalty, seed), or mlx-lm's `sampler=`; `logits_processors` run
    before it. mlx-lm's keywords are accepted under their names (`temp`, `prompt_cache`) or
    refused with ours (runtime/compat.py). The decode capture is taken from the environment
    unless `capture` is given (see DecodeCapture.from_env). `compiled`: see generate_step
    (`compiled=False` decodes eagerly).
    """
    check_model(model)
    kwargs = from_mlx_lm(kwargs, "stream_generate")
    if "cache" in kwargs:
        if cache is not None:
            raise TypeError("stream_generate(): pass cache= or mlx-lm's prompt_cache=, not both")
        cache = kwargs.pop("cache")
    choose = _sampler(sampling, sampler, kwargs, "stream_generate")
    if capture is None:
        capture = DecodeCapture.from_env()
    max_tokens = check_count(max_tokens, "max_tokens", 0)
    prefill_step_size = check_count(prefill_step_size, "prefill_step_size", 1)
    compiled = _compiled(compiled, model)
    ids, chat = _prompt_ids(model, tokenizer, prompt, messages, chat, "stream_generate")
    if eos_token_ids is None:
        eos_token_ids = [] if tokenizer is None else (tokenizer.chat_stop_ids() if chat else tokenizer.eos_token_ids)
    stop = set(check_token_ids(eos_token_ids, None))
    _check_cache_and_capture(cache, capture, model)
    warn_past_context(model, cache[0].offset if cache else 0, len(ids), max_tokens)
    detok = tokenizer.detokenizer() if tokenizer is not None else None

    tic = time.perf_counter()
    first_at = None
    prompt_tps = 0.0
    n = 0
    steps = _steps(ids, model, cache=cache, sampler=choose, max_tokens=max_tokens, prefill_step_size=prefill_step_size,
                   capture=capture, compiled=compiled, logits_processors=logits_processors,
                   progress=prompt_progress_callback)
    try:
        for token, cached, logits in steps:
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
                                     peak_memory_gb=mx.get_peak_memory() / 1e9, finish_reason=finish, cached=cached,
                                     logits=logits)
            if finish is not None:
                return
    finally:
        steps.close()  # the compiled decoder hands the cache back now, even when the caller stops early


def generate(model, tokenizer: Tokenizer | None, prompt: str | Sequence[int] | None = None, *,
             verbose: bool = False, **kwargs) -> str:
    """The whole generated text (without the prompt and the stop token); see stream_generate.
    `verbose` (mlx-lm's) also prints the text as it comes and the speeds at the end."""
    text, last = "", None
    for last in stream_generate(model, tokenizer, prompt, **kwargs):
        text += last.text
        if verbose:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        print()
        print(f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens-per-sec")
        print(f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.3f} tokens-per-sec")
        print(f"Peak memory: {last.peak_memory_gb:.3f} GB")
    return text


WARM_UP_PROMPT = 8  # tokens: more than one, so the prefill's masked attention runs too


def warm_up(model) -> float:
    """Prefill a few tokens and run the compiled decode step once on a throwaway cache, so that
    MLX has compiled every kernel a generation needs before a first real request (on a machine
    that never ran this model, that is minutes on a GPU: runtime/kernels.py); seconds taken.
    Kernels are named after what they compute, not their shapes, so later traces of the step
    (other capacities) compile nothing new. Nothing of the warm-up stays but the compiled
    kernels and the traced step. On a warm machine it costs two forward passes (on a 2-core CPU
    and full-size E2B bf16, a few seconds; `serve --no-warmup` skips it)."""
    started = time.perf_counter()
    for _ in stream_generate(model, None, [0] * WARM_UP_PROMPT, max_tokens=2, eos_token_ids=[], compiled=True):
        pass
    return time.perf_counter() - started


class ChatSession:
    """A conversation whose cache lives across turns: each turn prefills only the new text.

    Gemma's format: `<bos><start_of_turn>user\\n...<end_of_turn>\\n<start_of_turn>model\\n`, the
    reply, `<end_of_turn>\\n`, the next user turn; a `system` prompt opens the first user turn.
    The reply's closing <end_of_turn> is already in the cache when generation stopped on it (the
    decode loop runs one step ahead).
    """

    def __init__(self, model, tokenizer: Tokenizer, *, max_tokens: int = DEFAULT_MAX_TOKENS,
                 sampling: SamplingParams | None = None, prefill_step_size: int = DEFAULT_PREFILL_STEP,
                 system: str | None = None):
        check_model(model)
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer; this bundle has none")
        if system is not None:
            check_text(system, "system")
        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.max_tokens = check_count(max_tokens, "max_tokens", 0)
        self.prefill_step_size = check_count(prefill_step_size, "prefill_step_size", 1)
        self.sampling = _sampling(sampling, {}) if sampling is not None else None
        self.cache = model.make_cache()
        self._turns = 0
        self._last_token: int | None = None
        self._last_cached = True

    def _turn_ids(self, message: str) -> list[int]:
        if self._turns == 0:  # the system prompt opens the first user turn (Gemma has no system role)
            return self.tokenizer.encode(render_messages(user_and_system(message, self.system)))
        text = chat_turn(message)
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
        before = self.cache[0].offset if self.cache else 0
        last = self._last_token, self._last_cached
        self._last_token, self._last_cached = None, True
        try:
            for response in stream_generate(self.model, self.tokenizer, ids, cache=self.cache,
                                            eos_token_ids=self.tokenizer.chat_stop_ids(), **kwargs):
                self._last_token, self._last_cached = response.token, response.cached
                yield response
        except BaseException:
            # Refused before anything reached the cache (a bad keyword): this turn did not
            # happen, so the next one must open the conversation as this one would have.
            if (self.cache[0].offset if self.cache else 0) == before:
                self._turns -= 1
                self._last_token, self._last_cached = last
            raise
