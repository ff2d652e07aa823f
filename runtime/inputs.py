"""The runtime's doors for values a caller passes in: one checking function per kind of value.

Generation reads tables by token id and loops by the counts it is given, so a bad value does not
fail cleanly on its own: an id past the embedding table reads whatever memory follows it (a
different text on each run, or a segfault), `prefill_step_size=0` never ends, a NaN temperature
samples garbage. So every public entry (generate, stream_generate, ChatSession, generate_step,
SamplingParams, the CLI) calls the function for each value it takes, once, where the value
enters, and code past it trusts the value:

- `check_token_ids`: integers in [0, vocab_size), whatever container they come in;
  `check_prompt_ids`: the same for one sequence (a generation's prompt);
- `check_model`: a loaded model (callable, with `make_cache`);
- `check_text`: a str that is valid Unicode (no lone surrogates: what a non-UTF-8 argument
  becomes), and `decode_text` for bytes read from stdin;
- `check_count`: an integer (not a bool) with a lower bound;
- `check_option`: True, False or None;
- `check_sampling`: every SamplingParams field's type and range (finite numbers, a seed the
  generator takes).

API errors are TypeError (wrong type) or ValueError (out of range), one line saying what is
wrong: BadType and BadValue, so the CLI can print exactly these as one line and exit 2 while any
other error stays visible as the bug it is.
"""

from __future__ import annotations

import math
import numbers
import operator

import mlx.core as mx


class BadValue(ValueError):
    """A value refused at a door: out of range (a ValueError, so callers need not know this type)."""


class BadType(TypeError):
    """A value refused at a door: of the wrong type."""


# mx.random.key takes a seed in [0, 2^64).
SEED_MAX = 2**64 - 1
INDEX_MAX = 2**31 - 1  # the largest slice bound MLX takes

_SHOWN = 40


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


def _config_int(model, name: str) -> int | None:
    """An integer of the model's config: this runtime's `config`, or an mlx-lm model's `args` (its
    text config for multimodal ones); None if the model does not say."""
    config = getattr(model, "config", None)
    size = getattr(config, name, None)
    if size is None:
        args = getattr(model, "args", None)
        size = getattr(args, name, None)
        text = getattr(args, "text_config", None)
        if size is None and isinstance(text, dict):
            size = text.get(name)
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def check_model(model) -> None:
    """A model the generation functions can run: this runtime's (runtime.load) or mlx-lm's, which
    is called on ids and makes its own cache. TypeError otherwise (None, a path, a tokenizer)."""
    if not callable(model) or not callable(getattr(model, "make_cache", None)):
        raise BadType(f"model must be a loaded model (runtime.load, or mlx-lm's load), not {type(model).__name__}")


def vocab_size_of(model) -> int | None:
    """The number of rows of the model's embedding table, or None if the model does not say."""
    return _config_int(model, "vocab_size")


def context_length_of(model) -> int | None:
    """The positions the model was trained for (`max_position_embeddings`), or None."""
    return _config_int(model, "max_position_embeddings")


def _index(value, position: int) -> int:
    if isinstance(value, bool):
        raise BadType(f"token ids must be integers; position {position} holds a bool ({value!r})")
    try:
        return operator.index(value)  # int and numpy integers; refuses floats, strings, None
    except TypeError:
        raise BadType(f"token ids must be integers; position {position} holds {type(value).__name__} "
                        f"{_shown(value)}") from None


def check_prompt_ids(ids, vocab_size: int | None):
    """One sequence's token ids, checked like `check_token_ids`: a list of ints, or an integer
    mx.array `[n]` or `[1, n]` (given back as `[n]`). A `[batch, n]` array with batch > 1 is
    refused: generation decodes one sequence, and joining the rows would silently decode
    something nobody asked for."""
    ids = check_token_ids(ids, vocab_size)
    if isinstance(ids, mx.array) and ids.ndim == 2:
        if ids.shape[0] != 1:
            raise BadValue(f"a prompt is one sequence of token ids ([n] or [1, n]); got a batch of shape "
                           f"{tuple(ids.shape)}: generate each row on its own")
        ids = ids.reshape(-1)
    return ids


def _out_of_range(value: int, position: int, vocab_size: int | None) -> BadValue:
    if vocab_size is None:
        return BadValue(f"token id {value} at position {position} is negative")
    return BadValue(f"token id {value} at position {position} is outside the model's vocabulary "
                      f"[0, {vocab_size})")


def check_token_ids(ids, vocab_size: int | None):
    """`ids` as given when every one is an integer in [0, vocab_size) (a list or tuple of ints, or
    an integer mx.array of one or two dimensions), a list of ints for any other iterable;
    TypeError/ValueError naming the first bad one otherwise. `vocab_size` None checks >= 0 only."""
    if isinstance(ids, (str, bytes, bytearray)):
        raise BadType(f"token ids must be a sequence of integers, not {type(ids).__name__}")
    high = math.inf if vocab_size is None else vocab_size
    if isinstance(ids, mx.array):
        if not mx.issubdtype(ids.dtype, mx.integer):
            raise BadType(f"token ids must be integers, not an array of {ids.dtype}")
        if ids.ndim not in (1, 2):
            raise BadValue(f"token ids must be an array [n] or [batch, n], not one of shape {ids.shape}")
        if ids.size:
            flat = ids.reshape(-1)
            low_at, high_at = int(mx.argmin(flat).item()), int(mx.argmax(flat).item())
            for at in (low_at, high_at):
                value = int(flat[at].item())
                if not 0 <= value < high:
                    raise _out_of_range(value, at, vocab_size)
        return ids
    try:
        values = list(ids)
    except TypeError:
        raise BadType(f"token ids must be a sequence of integers, not {type(ids).__name__}") from None
    checked = [_index(v, i) for i, v in enumerate(values)]
    for i, v in enumerate(checked):
        if not 0 <= v < high:
            raise _out_of_range(v, i, vocab_size)
    return checked


def check_text(text, what: str = "prompt") -> str:
    """`text` if it is a str that can be encoded as UTF-8 (what a tokenizer reads)."""
    if not isinstance(text, str):
        raise BadType(f"{what} must be a str, not {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start:e.end]
        raw = bad.encode("utf-8", "surrogateescape").hex() if all("\udc80" <= c <= "\udcff" for c in bad) else None
        why = f"byte 0x{raw}" if raw else f"lone surrogate {bad.encode('unicode_escape').decode()}"
        raise BadValue(f"{what} is not valid UTF-8 ({why} at character {e.start})") from None
    return text


def decode_text(data: bytes, what: str) -> str:
    """Bytes read from stdin as UTF-8; ValueError naming the first invalid byte otherwise."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadValue(f"{what} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def check_count(value, name: str, low: int) -> int:
    """An integer >= `low` (not a bool, not a float)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise BadType(f"{name} must be an integer, not {type(value).__name__} {_shown(value)}")
    if value < low:
        raise BadValue(f"{name} must be >= {low}, got {value}")
    return int(value)


def check_option(value, name: str) -> bool | None:
    """True, False or None (an option whose default depends on the call)."""
    if value is not None and not isinstance(value, bool):
        raise BadType(f"{name} must be True, False or None (the default), not {type(value).__name__} {_shown(value)}")
    return value


def _real(params, name: str) -> float:
    value = getattr(params, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BadType(f"{name} must be a number, not {type(value).__name__} {_shown(value)}")
    if not math.isfinite(value):
        raise BadValue(f"{name} must be a finite number, got {value}")
    return value


def check_sampling(params) -> None:
    """Every field of a SamplingParams: its type, then its range."""
    temperature, top_p, min_p = _real(params, "temperature"), _real(params, "top_p"), _real(params, "min_p")
    penalty = _real(params, "repetition_penalty")
    if temperature < 0:
        raise BadValue(f"temperature must be >= 0, got {temperature}")
    check_count(params.top_k, "top_k", 0)
    if not 0.0 < top_p <= 1.0:
        raise BadValue(f"top_p must be in (0, 1], got {top_p}")
    if not 0.0 <= min_p <= 1.0:
        raise BadValue(f"min_p must be in [0, 1], got {min_p}")
    if penalty <= 0:
        raise BadValue(f"repetition_penalty must be > 0, got {penalty}")
    context = check_count(params.repetition_context_size, "repetition_context_size", 1)
    if context > INDEX_MAX:  # a slice bound MLX casts to int32: 10**30 was a C++ bad_cast
        raise BadValue(f"repetition_context_size must be at most {INDEX_MAX}, got {context}")
    if params.seed is not None:
        seed = check_count(params.seed, "seed", 0)
        if seed > SEED_MAX:
            raise BadValue(f"seed must be in [0, 2^64), got {seed}")
