"""Conversations: runtime/chat.py renders message lists exactly as the bundle's own chat template
does (rendered here by jinja2 in a sandbox, as transformers renders it), refuses what the
template refuses, and `messages=` / `system=` / `--system` reach the model as that text.

The template is the demo checkpoint's (Gemma3n's own template), which the converter copies into
every bundle byte for byte (tests/test_convert.py); the tests below read it from a converted
bundle."""

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from runtime.chat import MessageError, MessageTypeError, chat_turn, check_messages, render_messages
from runtime.generate import ChatSession, generate, stream_generate
from tests.runtime_helpers import demo_bundle, load_quietly

BOS = "<bos>"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return demo_bundle(tmp_path_factory.mktemp("chat"))


@pytest.fixture(scope="module")
def loaded(bundle):
    return load_quietly(bundle)


def template_of(bundle):
    """The bundle's chat_template as transformers renders it: a sandboxed jinja2 environment
    with trimmed blocks and `raise_exception`."""
    source = json.loads((bundle / "tokenizer_config.json").read_text())["chat_template"]

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


@pytest.fixture(scope="module")
def template(bundle):
    return template_of(bundle)


# Texts that stress trimming and escaping: surrounding whitespace of every kind, template syntax,
# Gemma's own markers, non-ASCII.
texts = st.one_of(
    st.text(max_size=24),
    st.lists(st.sampled_from([" ", "\n", "\t", "\u3000", "a", "é", "{{ x }}", "{% if %}", "<start_of_turn>",
                              "\\n", "'", '"', "日本", "🙂"]), max_size=8).map("".join),
)
parts = st.lists(st.builds(lambda t: {"type": "text", "text": t}, texts), min_size=1, max_size=3)
contents = st.one_of(texts, parts)


@st.composite
def conversations(draw):
    """A valid conversation: an optional system message, then user/assistant from user."""
    turns = draw(st.integers(1, 6))
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": draw(contents)} for i in range(turns)]
    if draw(st.booleans()):
        # one text part at most: the template keeps only the first part of a system message
        system = draw(st.one_of(texts, st.builds(lambda t: [{"type": "text", "text": t}], texts)))
        messages.insert(0, {"role": "system", "content": system})
    return messages


@settings(max_examples=300, deadline=None)
@given(conversations(), st.booleans())
def test_rendering_equals_the_bundles_chat_template(template, messages, add_generation_prompt):
    expected = template.render(messages=messages, bos_token=BOS, add_generation_prompt=add_generation_prompt)
    assert BOS + render_messages(messages, add_generation_prompt) == expected


@st.composite
def any_role_order(draw):
    roles = draw(st.lists(st.sampled_from(["user", "assistant"]), min_size=1, max_size=5))
    messages = [{"role": r, "content": draw(texts)} for r in roles]
    if draw(st.booleans()):
        messages.insert(0, {"role": "system", "content": draw(texts)})
    return messages


@settings(max_examples=200, deadline=None)
@given(any_role_order())
def test_refuses_exactly_the_role_orders_the_template_refuses(template, messages):
    try:
        expected = template.render(messages=messages, bos_token=BOS, add_generation_prompt=True)
    except TemplateError:
        with pytest.raises(MessageError, match="alternate"):
            render_messages(messages)
    else:
        assert BOS + render_messages(messages) == expected


def test_system_folds_into_the_first_user_turn_and_assistant_is_model():
    text = render_messages([{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi \n"},
                            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Why?"}])
    assert text == ("<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
                    "<start_of_turn>user\nWhy?<end_of_turn>\n<start_of_turn>model\n")
    assert chat_turn("Why?") == "<start_of_turn>user\nWhy?<end_of_turn>\n<start_of_turn>model\n"


def test_a_developer_message_is_the_system_message():
    """OpenAI's newer clients send the system prompt as role 'developer' (it was an unknown role)."""
    asked = [{"role": "user", "content": "Hi"}]
    assert render_messages([{"role": "developer", "content": "Be brief."}, *asked]) == \
        render_messages([{"role": "system", "content": "Be brief."}, *asked])
    with pytest.raises(MessageError, match="a system message can only come first"):
        check_messages([*asked, {"role": "developer", "content": "x"}])


@pytest.mark.parametrize("messages, param, kind", [
    ([], "messages", MessageError),
    ("hello", "messages", MessageTypeError),
    ([{"role": "tool", "content": "x"}], "messages[0].role", MessageError),
    ([{"role": "user"}], "messages[0].content", MessageError),
    ([{"role": "user", "content": 3}], "messages[0].content", MessageTypeError),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "messages[0].content[0].type",
     MessageError),
    ([{"role": "user", "content": [{"type": "text", "text": None}]}], "messages[0].content[0].text",
     MessageTypeError),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "messages[1].role", MessageError),
    ([{"role": "system", "content": "b"}], "messages", MessageError),
    ([{"role": "user", "content": "a", "tool_calls": []}], "messages[0].tool_calls", MessageError),
    (["hi"], "messages[0]", MessageTypeError),
])
def test_bad_messages_name_the_field(messages, param, kind):
    with pytest.raises(kind) as caught:
        check_messages(messages)
    assert caught.value.param == param
    assert str(caught.value).startswith(param + ": ")
    if kind is MessageTypeError:
        assert isinstance(caught.value, TypeError)


def test_messages_reach_the_model_as_the_rendered_text(loaded):
    model, tokenizer = loaded
    messages = [{"role": "system", "content": "Zen."}, {"role": "user", "content": "Beautiful is better than"}]
    ids = tokenizer.encode(render_messages(messages))
    assert ids[0] == tokenizer.bos_token_id
    first = next(iter(stream_generate(model, tokenizer, messages=messages, max_tokens=1)))
    assert first.prompt_tokens == len(ids)
    assert generate(model, tokenizer, messages=messages, max_tokens=12) == \
        generate(model, tokenizer, ids, max_tokens=12, eos_token_ids=tokenizer.chat_stop_ids())
    single = [{"role": "user", "content": "Beautiful is better than"}]
    assert generate(model, tokenizer, messages=single, max_tokens=12) == \
        generate(model, tokenizer, "Beautiful is better than", chat=True, max_tokens=12)


def test_prompt_and_messages_exclude_each_other(loaded):
    model, tokenizer = loaded
    with pytest.raises(TypeError, match="either prompt or messages"):
        generate(model, tokenizer, "x", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(TypeError, match="either prompt or messages"):
        generate(model, tokenizer)
    with pytest.raises(TypeError, match="chat=True"):
        generate(model, tokenizer, messages=[{"role": "user", "content": "x"}], chat=True)
    with pytest.raises(MessageError):
        generate(model, tokenizer, messages=[{"role": "bot", "content": "x"}])


def test_chat_session_system_prompt_opens_the_first_turn(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, max_tokens=10, system="Zen.")
    reply = "".join(r.text for r in session.send("Beautiful is better than"))
    messages = [{"role": "system", "content": "Zen."}, {"role": "user", "content": "Beautiful is better than"}]
    assert reply == generate(model, tokenizer, messages=messages, max_tokens=10)
    plain = ChatSession(model, tokenizer, max_tokens=10)
    assert plain._turn_ids("x") != ChatSession(model, tokenizer, system="Zen.")._turn_ids("x")


@pytest.mark.parametrize("bad", [{"max_tokens": "x"}, {"temperature": -1.0}, {"nope": 1}])
def test_a_turn_refused_for_its_keywords_leaves_the_session_as_it_was(loaded, bad):
    """send(..., max_tokens="x") raised, but counted the turn: the next one was rendered as a
    continuation (no <bos>, no system prompt) into an empty cache."""
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, max_tokens=3, system="Zen.")
    with pytest.raises((TypeError, ValueError)):
        list(session.send("hi", **bad))
    fresh = ChatSession(model, tokenizer, max_tokens=3, system="Zen.")
    assert session._turn_ids("hello") == fresh._turn_ids("hello")
    assert [r.token for r in session.send("hello")] == [r.token for r in fresh.send("hello")]


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "runtime", *args], capture_output=True, text=True, input=stdin,
                          timeout=300)


def test_cli_system_prompt_for_generate_and_chat(bundle, loaded):
    model, tokenizer = loaded
    messages = [{"role": "system", "content": "Zen."}, {"role": "user", "content": "Beautiful is better than"}]
    r = run("generate", str(bundle), "--prompt", "Beautiful is better than", "--system", "Zen.", "--max-tokens", "12")
    assert r.returncode == 0, r.stderr
    assert r.stdout == generate(model, tokenizer, messages=messages, max_tokens=12) + "\n"
    r = run("chat", str(bundle), "--system", "Zen.", "--max-tokens", "8", stdin="Beautiful is better than\nFlat is\n")
    assert r.returncode == 0, r.stderr
    session = ChatSession(model, tokenizer, max_tokens=8, system="Zen.")
    replies = ["".join(x.text for x in session.send(m)) for m in ("Beautiful is better than", "Flat is")]
    assert r.stdout == "".join(reply + "\n" for reply in replies)
