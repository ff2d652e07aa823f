"""Turn logits into the next token: greedy by default, or sampled with the usual filters.

Everything here is lazy MLX: no function forces evaluation, so the decode loop can build the
next step's graph while the current one runs. Randomness comes only from an explicit key chain
started from the seed, so a seeded run is reproducible token for token.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from runtime.inputs import check_sampling


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. `temperature == 0` is greedy and ignores the filters.

    top_k: keep the k most likely tokens (0: off). top_p: keep the smallest set of most likely
    tokens whose probability reaches p (1.0: off). min_p: drop tokens less likely than min_p
    times the most likely one (0.0: off). repetition_penalty: divide the positive logits (and
    multiply the negative ones) of tokens seen in the last `repetition_context_size` tokens, as in
    Keskar et al. 2019 and Hugging Face (1.0: off). seed: start of the key chain (None: MLX's
    global generator).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_context_size: int = 64
    seed: int | None = None

    def __post_init__(self):
        check_sampling(self)  # types and ranges, NaN and infinities, the seed's range (runtime/inputs.py)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def apply_repetition_penalty(logits: mx.array, history: mx.array | None, penalty: float) -> mx.array:
    """logits [batch, vocab]; history [batch, n] token ids already seen (any n, may be empty)."""
    if penalty == 1.0 or history is None or history.size == 0:
        return logits
    seen = mx.take_along_axis(logits, history, axis=-1)
    penalized = mx.where(seen > 0, seen / penalty, seen * penalty)
    return mx.put_along_axis(logits, history, penalized, axis=-1)


def apply_top_k(logprobs: mx.array, k: int) -> mx.array:
    """Keep the k largest entries of each row (ties at the k-th value are kept), -inf elsewhere."""
    vocab = logprobs.shape[-1]
    if k <= 0 or k >= vocab:
        return logprobs
    kth = mx.sort(logprobs, axis=-1)[..., vocab - k: vocab - k + 1]
    return mx.where(logprobs >= kth, logprobs, -mx.inf)


def apply_top_p(logprobs: mx.array, p: float) -> mx.array:
    """Nucleus filter: keep the most likely tokens until their total probability reaches p."""
    if p >= 1.0:
        return logprobs
    order = mx.argsort(-logprobs, axis=-1)
    sorted_lp = mx.take_along_axis(logprobs, order, axis=-1)
    probs = mx.softmax(sorted_lp, axis=-1)
    # A token is kept when the mass strictly before it is still short of p: the most likely one
    # always survives, and the set stops at the first token that reaches p.
    before = mx.cumsum(probs, axis=-1) - probs
    kept_sorted = mx.where(before < p, sorted_lp, -mx.inf)
    return mx.put_along_axis(mx.full(logprobs.shape, -mx.inf, logprobs.dtype), order, kept_sorted, axis=-1)


def apply_min_p(logprobs: mx.array, min_p: float) -> mx.array:
    """Drop tokens whose probability is below min_p times that of the most likely token."""
    if min_p <= 0.0:
        return logprobs
    threshold = mx.max(logprobs, axis=-1, keepdims=True) + mx.log(mx.array(min_p, logprobs.dtype))
    return mx.where(logprobs >= threshold, logprobs, -mx.inf)


def filtered_logprobs(logits: mx.array, params: SamplingParams) -> mx.array:
    """Tempered log-probabilities after top-k, top-p and min-p, in Hugging Face's order."""
    x = logits.astype(mx.float32) / params.temperature
    x = x - mx.logsumexp(x, axis=-1, keepdims=True)
    x = apply_top_k(x, params.top_k)
    x = apply_top_p(x, params.top_p)
    return apply_min_p(x, params.min_p)


class Sampler:
    """Stateful only in its key chain: call it once per step with that step's logits.

    logits: [batch, vocab]; history: [batch, n] ids seen so far (for the repetition penalty).
    Returns the chosen ids, shape [batch], lazily.
    """

    def __init__(self, params: SamplingParams | None = None):
        self.params = params or SamplingParams()
        self._key = None if self.params.seed is None else mx.random.key(self.params.seed)

    def __call__(self, logits: mx.array, history: mx.array | None = None) -> mx.array:
        p = self.params
        if p.repetition_penalty != 1.0 and history is not None:
            logits = apply_repetition_penalty(logits, history[..., -p.repetition_context_size:],
                                              p.repetition_penalty)
        if p.greedy:
            return mx.argmax(logits, axis=-1)
        logprobs = filtered_logprobs(logits, p)
        if self._key is None:
            return mx.random.categorical(logprobs, axis=-1)
        self._key, step_key = mx.random.split(self._key)
        return mx.random.categorical(logprobs, axis=-1, key=step_key)
