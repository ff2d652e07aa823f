"""The request door of `runtime serve` (runtime/openai_api.py), field by field: what passes
becomes the Request the engine runs, what does not is an ApiError with OpenAI's error body
naming the field. (tests/test_server.py drives the same door over HTTP with the openai client.)"""

import json

import pytest

from runtime.chat import render_messages
from runtime.openai_api import ApiError, Served, chat_request, completion_request
from runtime.tokenizer import Tokenizer
from tests.test_tokenizer import byte_level_tokenizer

TOKENIZER = Tokenizer(byte_level_tokenizer(), eos_token_ids=[1], bos_token="<bos>", add_bos_token=True)
SERVED = Served(model_id="m", tokenizer=TOKENIZER, vocab_size=300, context_length=64, default_max_tokens=16)
HELLO = [{"role": "user", "content": "hello"}]


def chat(**fields):
    return chat_request(json.dumps({"model": "m", "messages": HELLO, **fields}).encode(), SERVED)


def completion(**fields):
    return completion_request(json.dumps({"model": "m", "prompt": "better", **fields}).encode(), SERVED)


def test_a_chat_request_becomes_what_the_engine_runs():
    r = chat(max_tokens=5, temperature=0.5, top_p=0.9, seed=3, stop="x", logprobs=True, top_logprobs=2,
             stream=True, stream_options={"include_usage": True}, logit_bias={"7": -100}, user="u")
    assert r.prompt_ids == TOKENIZER.encode(render_messages(HELLO))
    assert (r.max_tokens, r.stop, r.logprobs, r.stream, r.include_usage) == (5, ["x"], 2, True, True)
    assert (r.sampling.temperature, r.sampling.top_p, r.sampling.seed) == (0.5, 0.9, 3)
    assert r.logit_bias == {7: -100.0} and r.eos_ids == TOKENIZER.chat_stop_ids()
    assert r.id.startswith("chatcmpl-") and r.kind == "chat"


def test_defaults_nulls_and_the_context():
    r = chat(temperature=None, max_tokens=None)
    assert r.sampling.greedy and r.max_tokens == SERVED.default_max_tokens and r.logprobs is None
    assert chat(max_completion_tokens=7).max_tokens == 7
    assert chat(response_format={"type": "text"}).max_tokens == r.max_tokens  # OpenAI's default, accepted
    prompt = len(r.prompt_ids)
    assert chat(max_tokens=1000).max_tokens == SERVED.context_length - prompt  # cut to what fits
    r = completion(prompt=[2, 5, 9], logprobs=0)
    assert r.prompt_ids == [2, 5, 9] and r.logprobs == 0 and r.eos_ids == TOKENIZER.eos_token_ids
    assert completion(prompt=["better"]).prompt_ids == TOKENIZER.encode("better")  # a batch of one


@pytest.mark.parametrize("door, fields, status, param", [
    (chat, {"model": 3}, 400, "model"),
    (chat, {"model": "other"}, 404, "model"),
    (chat, {"max_tokens": True}, 400, "max_tokens"),
    (chat, {"max_tokens": 2.5}, 400, "max_tokens"),
    (chat, {"max_completion_tokens": 0}, 400, "max_completion_tokens"),
    (chat, {"temperature": -0.1}, 400, "temperature"),
    (chat, {"temperature": float("inf")}, 400, "temperature"),
    (chat, {"top_p": 1.5}, 400, "top_p"),
    (chat, {"top_k": -1}, 400, "top_k"),
    (chat, {"min_p": 2}, 400, "min_p"),
    (chat, {"repetition_penalty": 0}, 400, "repetition_penalty"),
    (chat, {"seed": 2**64}, 400, "seed"),
    (chat, {"seed": "1"}, 400, "seed"),
    (chat, {"stop": ""}, 400, "stop"),
    (chat, {"stop": [1]}, 400, "stop"),
    (chat, {"stream": "yes"}, 400, "stream"),
    (chat, {"stream_options": {"include_usage": True}}, 400, "stream_options"),
    (chat, {"stream": True, "stream_options": {"include_usage": 1}}, 400, "stream_options.include_usage"),
    (chat, {"logprobs": 1}, 400, "logprobs"),
    (chat, {"top_logprobs": 2}, 400, "top_logprobs"),
    (chat, {"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    (chat, {"n": 3}, 400, "n"),
    (chat, {"presence_penalty": 0.5}, 400, "presence_penalty"),
    (chat, {"frequency_penalty": 3}, 400, "frequency_penalty"),
    (chat, {"logit_bias": {"x": 1}}, 400, "logit_bias"),
    (chat, {"logit_bias": {"300": 1}}, 400, "logit_bias"),
    (chat, {"logit_bias": {"3": 101}}, 400, "logit_bias"),
    # str.isdigit() takes these; int() refused the first two with a ValueError that killed the handler
    (chat, {"logit_bias": {"\u00b2": 1}}, 400, "logit_bias"),
    (chat, {"logit_bias": {"9" * 5000: 1}}, 400, "logit_bias"),
    (chat, {"logit_bias": {"\u0663": 1}}, 400, "logit_bias"),
    (chat, {"modalities": ["audio"]}, 400, "modalities"),
    (chat, {"response_format": {"type": "json_object"}}, 400, "response_format"),
    (chat, {"response_format": "text"}, 400, "response_format"),
    (chat, {"user": 5}, 400, "user"),
    (chat, {"store": "no"}, 400, "store"),
    (completion, {"metadata": []}, 400, "metadata"),
    (chat, {"messages": None}, 400, "messages"),
    (chat, {"messages": [{"role": "user", "content": "x" * 400}]}, 400, "messages"),
    (chat, {"prompt": "x"}, 400, "prompt"),
    (completion, {"prompt": ""}, 400, "prompt"),
    (completion, {"prompt": None}, 400, "prompt"),
    (completion, {"prompt": [1, -1]}, 400, "prompt"),
    (completion, {"prompt": [1, 300]}, 400, "prompt"),
    (completion, {"prompt": ["a", "b"]}, 400, "prompt"),
    (completion, {"prompt": {"text": "a"}}, 400, "prompt"),
    (completion, {"echo": True}, 400, "echo"),
    (completion, {"best_of": 2}, 400, "best_of"),
    (completion, {"suffix": "z"}, 400, "suffix"),
    (completion, {"logprobs": 6}, 400, "logprobs"),
    (completion, {"logprobs": True}, 400, "logprobs"),
    (completion, {"messages": HELLO}, 400, "messages"),
    # JSON lets a lone surrogate escape stand; the tokenizer's TypeError killed the handler (no answer)
    (completion, {"prompt": "\ud800"}, 400, "prompt"),
    (completion, {"prompt": ["a\udcff"]}, 400, "prompt"),
    (chat, {"messages": [{"role": "user", "content": "\ud800"}]}, 400, "messages[0].content"),
    (chat, {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}, 400,
     "messages[0].content[0].text"),
    (chat, {"stop": ["ok", "\ud800"]}, 400, "stop"),
])
def test_bad_fields(door, fields, status, param):
    with pytest.raises(ApiError) as caught:
        door(**fields)
    e = caught.value
    assert (e.status, e.param) == (status, param), e.message
    body = e.body()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]


@pytest.mark.parametrize("raw", [b"", b"{", b"null", b"[1]", b'"x"', b"\xff",
                                 b"[" * 100_000 + b"]" * 100_000,  # a RecursionError: the handler died, no answer
                                 b'{"max_tokens": ' + b"9" * 5000 + b"}"])
def test_not_a_json_object(raw):
    with pytest.raises(ApiError) as caught:
        chat_request(raw, SERVED)
    assert caught.value.status == 400 and caught.value.code == "invalid_json"
