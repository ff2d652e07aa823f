"""The OpenAI-compatible request schemas, checked at the door, and the JSON the server answers.

One function per endpoint (`chat_request`, `completion_request`) reads a request body and
either returns a `Request` the engine can run as is, or raises `ApiError`: a 4xx with the body
OpenAI's clients expect, `{"error": {"message", "type", "param", "code"}}`, naming the field.
Every field is checked here, once: types (a bool is not a number), ranges, the model's name, the
roles and shape of messages, token ids against the vocabulary, and the prompt against the
context. Null means "the default", as in OpenAI's API. A field this server does not implement is
refused by name unless it is at its neutral value (`n: 1`, `echo: false`, ...); a field OpenAI
does not define either is refused as unrecognized. mlx-lm's and llama-server's extensions
`top_k`, `min_p` and `repetition_penalty` are accepted.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field

import mlx.core as mx

from manifests.files import NotParsed, parse_json
from runtime.chat import MessageError, render_messages
from runtime.inputs import BadValue, check_text
from runtime.sampling import SamplingParams

MAX_STOP_STRINGS = 4          # OpenAI's limit
MAX_TOP_LOGPROBS = {"chat": 20, "completion": 5}
MAX_LOGIT_BIAS = 100.0


class ApiError(Exception):
    """A request refused: HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Served:
    """What the door checks requests against."""

    model_id: str
    tokenizer: object            # runtime.tokenizer.Tokenizer
    vocab_size: int
    context_length: int
    default_max_tokens: int


@dataclass
class Request:
    """A checked request: everything the engine needs, nothing left to validate."""

    kind: str                     # "chat" or "completion"
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    eos_ids: list[int]
    stop: list[str] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None   # None: no log-probabilities; k: the chosen token's and the top k
    id: str = ""
    created: int = 0


# Fields each endpoint knows. Accepted and used, accepted only at their neutral value, accepted
# and ignored (bookkeeping that does not change the output), refused by name.
COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "n",
          "presence_penalty", "frequency_penalty", "logit_bias", "user", "top_k", "min_p", "repetition_penalty"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "metadata", "store",
                        "service_tier", "safety_identifier", "prompt_cache_key", "modalities",
                        "parallel_tool_calls", "response_format"}
COMPLETION_FIELDS = COMMON | {"prompt", "logprobs", "echo", "best_of", "suffix"}
REFUSED = {
    "tools": "tool calls are not supported", "tool_choice": "tool calls are not supported",
    "functions": "function calls are not supported", "function_call": "function calls are not supported",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported", "reasoning_effort": "this model does not reason",
    "verbosity": "not supported", "web_search_options": "web search is not supported",
    "prompt_cache_retention": "not supported", "prompt_cache_options": "not supported",
    "moderation": "not supported",
}
IGNORED = {"user": str, "metadata": dict, "store": bool, "service_tier": str, "safety_identifier": str,
           "prompt_cache_key": str, "parallel_tool_calls": bool}  # and the type each must have


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


def parse_body(raw: bytes) -> dict:
    """The JSON object of a request body."""
    try:
        body = parse_json(raw)
    except NotParsed as e:  # also nesting that exhausts the stack, an integer past the digit limit
        raise bad(f"the body is {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad(f"the body must be a JSON object, not {type(body).__name__}", code="invalid_json")
    return body


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


class Fields:
    """Typed reads of a body's fields; null reads as the default."""

    def __init__(self, body: dict, known: set[str]):
        self.body = body
        for name in body:
            if name in REFUSED and body[name] is not None:
                raise bad(f"{name}: {REFUSED[name]} by this server", param=name, code="unsupported_parameter")
            if name not in known and name not in REFUSED:
                raise bad(f"unrecognized request argument: {name}", param=name, code="unknown_parameter")

    def get(self, name, default=None):
        value = self.body.get(name)
        return default if value is None else value

    def integer(self, name, default, low=None, high=None) -> int | None:
        v = self.get(name, default)
        if v is None:
            return None
        if not _is_int(v):
            raise bad(f"{name}: expected an integer, got {json.dumps(v)}", param=name, code="invalid_type")
        if (low is not None and v < low) or (high is not None and v > high):
            raise bad(f"{name}: {v} is out of range ({_range(low, high)})", param=name, code="invalid_value")
        return v

    def number(self, name, default, low=None, high=None, low_open=False) -> float:
        v = self.get(name, default)
        if not _is_number(v):
            raise bad(f"{name}: expected a number, got {json.dumps(v)}", param=name, code="invalid_type")
        if (low is not None and (v < low or (low_open and v == low))) or (high is not None and v > high):
            raise bad(f"{name}: {v} is out of range ({_range(low, high, low_open)})", param=name, code="invalid_value")
        return float(v)

    def boolean(self, name, default) -> bool:
        v = self.get(name, default)
        if not isinstance(v, bool):
            raise bad(f"{name}: expected true or false, got {json.dumps(v)}", param=name, code="invalid_type")
        return v

    def neutral(self, name, value) -> None:
        """A field this server implements only at `value`."""
        v = self.get(name, value)
        if v != value or type(v) is not type(value):
            raise bad(f"{name}: only {json.dumps(value)} is supported by this server", param=name,
                      code="unsupported_value")


def _is_decimal(text: str, most: int) -> bool:
    """Whether `text` is 1 to `most` ASCII digits (what int() reads, and nothing longer)."""
    return 0 < len(text) <= most and text.isascii() and text.isdigit()


def _range(low, high, low_open=False) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low}"
    if low is None:
        return f"<= {high}"
    return f"{'above ' if low_open else ''}{low} to {high}"


def _model(f: Fields, served: Served) -> None:
    model = f.get("model")
    if model is None:
        return
    if not isinstance(model, str):
        raise bad(f"model: expected a string, got {json.dumps(model)}", param="model", code="invalid_type")
    if model != served.model_id:
        raise ApiError(404, f"model {model!r} does not exist; this server serves {served.model_id!r}",
                       param="model", code="model_not_found")


def _stop(f: Fields) -> list[str]:
    stop = f.get("stop", [])
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad("stop: expected a string or a list of strings", param="stop", code="invalid_type")
    if len(stop) > MAX_STOP_STRINGS:
        raise bad(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}", param="stop",
                  code="invalid_value")
    if any(not s for s in stop):
        raise bad("stop: an empty stop string would stop at once", param="stop", code="invalid_value")
    for s in stop:
        _unicode(s, "stop")
    return stop


def _unicode(text: str, param: str) -> str:
    """A string field's text, refused unless valid Unicode: JSON lets "\\ud800" stand alone, and
    the tokenizer raised a TypeError on it (the handler died without an answer)."""
    try:
        return check_text(text, param)
    except BadValue as e:
        raise bad(str(e), param=param, code="invalid_value") from None


def _logit_bias(f: Fields, served: Served) -> dict[int, float]:
    bias = f.get("logit_bias", {})
    if not isinstance(bias, dict):
        raise bad("logit_bias: expected an object of token id -> bias", param="logit_bias", code="invalid_type")
    out = {}
    for key, value in bias.items():
        # ASCII digits only, and few of them: str.isdigit() takes "²" (which int() refuses) and
        # "٣"; int() refuses 5000 digits (both were a ValueError that killed the handler)
        if not _is_decimal(key, len(str(served.vocab_size))) or int(key) >= served.vocab_size:
            raise bad(f"logit_bias: {key!r} is not a token id in [0, {served.vocab_size})", param="logit_bias",
                      code="invalid_value")
        if not _is_number(value) or abs(value) > MAX_LOGIT_BIAS:
            raise bad(f"logit_bias[{key}]: expected a number from -100 to 100", param="logit_bias",
                      code="invalid_value")
        out[int(key)] = float(value)
    return out


def _sampling(f: Fields) -> SamplingParams:
    seed = f.integer("seed", None, 0, 2**64 - 1)
    try:
        return SamplingParams(
            temperature=f.number("temperature", 0.0, 0.0),
            top_p=f.number("top_p", 1.0, 0.0, 1.0, low_open=True),
            top_k=f.integer("top_k", 0, 0),
            min_p=f.number("min_p", 0.0, 0.0, 1.0),
            repetition_penalty=f.number("repetition_penalty", 1.0, 0.0, low_open=True),
            seed=seed,
        )
    except ValueError as e:  # the sampler's own check, should a rule above miss one
        raise bad(str(e), code="invalid_value") from None


def _stream(f: Fields) -> tuple[bool, bool]:
    stream = f.boolean("stream", False)
    options = f.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise bad("stream_options: only with stream: true", param="stream_options", code="invalid_value")
    if not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"}:
        raise bad("stream_options: expected {\"include_usage\": bool}", param="stream_options", code="invalid_value")
    usage = options.get("include_usage", False)
    if not isinstance(usage, bool):
        raise bad("stream_options.include_usage: expected true or false", param="stream_options.include_usage",
                  code="invalid_type")
    return stream, usage


def _max_tokens(f: Fields, served: Served, prompt_tokens: int, names: tuple[str, ...], prompt_field: str) -> int:
    """The requested budget (at least 1), cut to what the context has room for; a prompt that
    leaves no room is refused."""
    given = [n for n in names if f.get(n) is not None]
    wanted = served.default_max_tokens
    for name in given:
        wanted = f.integer(name, None, 1)
    if prompt_tokens >= served.context_length:
        raise bad(f"the prompt is {prompt_tokens} tokens; this model's context is {served.context_length} tokens "
                  f"and generating needs room for at least one more", param=prompt_field,
                  code="context_length_exceeded")
    return min(wanted, served.context_length - prompt_tokens)


_TYPE_NAMES = {str: "a string", dict: "an object", bool: "true or false"}


def _common(f: Fields, served: Served):
    """The fields both endpoints share, and the IGNORED ones (checked for type, then unused)."""
    for name, kind in IGNORED.items():
        value = f.get(name)
        if value is not None and not isinstance(value, kind):
            raise bad(f"{name}: expected {_TYPE_NAMES[kind]}, got {json.dumps(value)}", param=name, code="invalid_type")
    _model(f, served)
    f.neutral("n", 1)
    for name in ("presence_penalty", "frequency_penalty"):
        if f.number(name, 0.0, -2.0, 2.0) != 0.0:
            raise bad(f"{name}: only 0 is supported by this server (repetition_penalty is)", param=name,
                      code="unsupported_value")
    return _sampling(f), _stop(f), _logit_bias(f, served), _stream(f)


def chat_request(raw: bytes, served: Served) -> Request:
    """A /v1/chat/completions body, checked."""
    f = Fields(parse_body(raw), CHAT_FIELDS)
    sampling, stop, bias, (stream, usage) = _common(f, served)
    modalities = f.get("modalities", ["text"])
    if modalities != ["text"]:
        raise bad("modalities: only [\"text\"] is supported", param="modalities", code="unsupported_value")
    f.neutral("response_format", {"type": "text"})  # plain text, what every reply is; no structured output
    logprobs = f.boolean("logprobs", False)
    top = f.integer("top_logprobs", None, 0, MAX_TOP_LOGPROBS["chat"])
    if top is not None and not logprobs:
        raise bad("top_logprobs: needs logprobs: true", param="top_logprobs", code="invalid_value")
    if "messages" not in f.body:
        raise bad("messages: missing", param="messages", code="missing_required_parameter")
    try:
        text = render_messages(f.body["messages"])
    except MessageError as e:
        raise bad(str(e), param=e.param, code="invalid_value") from None
    ids = served.tokenizer.encode(text)
    max_tokens = _max_tokens(f, served, len(ids), ("max_tokens", "max_completion_tokens"), "messages")
    return Request(kind="chat", prompt_ids=ids, max_tokens=max_tokens, sampling=sampling,
                   eos_ids=served.tokenizer.chat_stop_ids(), stop=stop, logit_bias=bias, stream=stream,
                   include_usage=usage, logprobs=(top or 0) if logprobs else None,
                   id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()))


def _prompt_ids(f: Fields, served: Served) -> list[int]:
    if "prompt" not in f.body or f.body["prompt"] is None:
        raise bad("prompt: missing", param="prompt", code="missing_required_parameter")
    prompt = f.body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise bad("prompt: empty; there is nothing to continue", param="prompt", code="invalid_value")
        return served.tokenizer.encode(_unicode(prompt, "prompt"))
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        wrong = next((t for t in prompt if not 0 <= t < served.vocab_size), None)
        if wrong is not None:
            raise bad(f"prompt: token id {wrong} is outside the vocabulary [0, {served.vocab_size})",
                      param="prompt", code="invalid_value")
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise bad("prompt: one prompt per request (this server does not batch)", param="prompt",
                  code="unsupported_value")
    raise bad("prompt: expected a string or a list of token ids", param="prompt", code="invalid_type")


def completion_request(raw: bytes, served: Served) -> Request:
    """A /v1/completions body, checked."""
    f = Fields(parse_body(raw), COMPLETION_FIELDS)
    sampling, stop, bias, (stream, usage) = _common(f, served)
    f.neutral("echo", False)
    f.neutral("best_of", 1)
    if f.get("suffix") is not None:
        raise bad("suffix: not supported by this server", param="suffix", code="unsupported_value")
    logprobs = f.integer("logprobs", None, 0, MAX_TOP_LOGPROBS["completion"])
    ids = _prompt_ids(f, served)
    max_tokens = _max_tokens(f, served, len(ids), ("max_tokens",), "prompt")
    return Request(kind="completion", prompt_ids=ids, max_tokens=max_tokens, sampling=sampling,
                   eos_ids=served.tokenizer.eos_token_ids, stop=stop, logit_bias=bias, stream=stream,
                   include_usage=usage, logprobs=logprobs, id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()))


# Responses ---------------------------------------------------------------------------------------

@dataclass
class TokenLogprob:
    """One generated token's log-probability and the most likely alternatives; `offset`: where
    its text starts in the generated text."""

    token: str
    logprob: float
    top: list[tuple[str, float]]
    offset: int = 0


def token_logprob(tokenizer, token: int, logprobs: mx.array, k: int) -> TokenLogprob:
    """The chosen token's log-probability and the top `k`, from a step's `[vocab]` log-probabilities."""
    if k:
        order = mx.argpartition(-logprobs, k - 1)[:k]
        values = logprobs[order]
        mx.eval(values, order)
        pairs = sorted(zip(values.tolist(), order.tolist(), strict=True), key=lambda p: -p[0])
    else:
        pairs = []
    def name(i: int) -> str:
        return tokenizer.decode([i], skip_special_tokens=False)

    return TokenLogprob(name(token), logprobs[token].item(), [(name(i), v) for v, i in pairs])


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def chat_logprobs(tokens: list[TokenLogprob]) -> dict:
    def entry(text, logprob):
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
    return {"content": [dict(entry(t.token, t.logprob), top_logprobs=[entry(s, v) for s, v in t.top])
                        for t in tokens]}


def completion_logprobs(tokens: list[TokenLogprob]) -> dict:
    """OpenAI's legacy shape of the same."""
    return {"tokens": [t.token for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [dict(t.top) for t in tokens], "text_offset": [t.offset for t in tokens]}


def models_list(model_id: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "local"}]}


def _chunk_object(req: Request) -> str:
    return "chat.completion.chunk" if req.kind == "chat" else "text_completion"


def _logprobs_json(req: Request, tokens: list[TokenLogprob]):
    if req.logprobs is None:
        return None
    return chat_logprobs(tokens) if req.kind == "chat" else completion_logprobs(tokens)


def stream_chunk(req: Request, model_id: str, text: str | None, tokens: list[TokenLogprob] = (),
                 finish: str | None = None, first: bool = False) -> dict:
    """One server-sent event of a streamed response: new text (and its tokens' log-probabilities),
    or the finish reason; a chat's first event announces the assistant's role."""
    if req.kind == "chat":
        delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
        choice = {"index": 0, "delta": delta, "logprobs": _logprobs_json(req, list(tokens)) if tokens else None,
                  "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": _logprobs_json(req, list(tokens)) if tokens else None,
                  "finish_reason": finish}
    out = {"id": req.id, "object": _chunk_object(req), "created": req.created, "model": model_id, "choices": [choice]}
    if req.include_usage:
        out["usage"] = None
    return out


def usage_chunk(req: Request, model_id: str, totals: dict) -> dict:
    """The last event when `stream_options.include_usage` asked for it: no choices, the usage."""
    return {"id": req.id, "object": _chunk_object(req), "created": req.created, "model": model_id, "choices": [],
            "usage": totals}


def full_response(req: Request, model_id: str, text: str, tokens: list[TokenLogprob], finish: str,
                  totals: dict) -> dict:
    """The whole response of a request that was not streamed."""
    if req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": _logprobs_json(req, tokens), "finish_reason": finish}
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": _logprobs_json(req, tokens), "finish_reason": finish}
        kind = "text_completion"
    return {"id": req.id, "object": kind, "created": req.created, "model": model_id, "choices": [choice],
            "usage": totals}
