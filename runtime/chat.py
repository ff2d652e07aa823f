"""Conversations as Gemma renders them: a message list becomes the text of its turns.

Gemma3n's chat template (the `chat_template` of its tokenizer_config.json), in Python, so the
runtime needs no template engine:

- an optional system message comes first; Gemma has no system role, so its content and a blank
  line open the first user turn;
- then user and assistant alternate, starting with user; the assistant's turns are `model`'s;
- content is a string or a list of text parts (`{"type": "text", "text": ...}`), each trimmed
  of surrounding whitespace (the system message is not trimmed, as in the template);
- every turn is `<start_of_turn>ROLE\\n...<end_of_turn>\\n`, and the text ends with
  `<start_of_turn>model\\n`, where the reply begins.

The template's leading `<bos>` is the tokenizer's to add (`Tokenizer.encode`). One difference,
on purpose: a system message given as several text parts keeps them all (the template keeps the
first). tests/test_chat.py renders a bundle's own template with jinja2 and compares.
"""

from __future__ import annotations

from collections.abc import Sequence

from runtime.inputs import BadValue, check_text
from runtime.tokenizer import END_OF_TURN, START_OF_TURN

ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = ("role", "content", "name")  # `name` (OpenAI's) is accepted and not rendered


class MessageError(ValueError):
    """A message list Gemma's format cannot express; `param` names the field (`messages[2].role`)."""

    def __init__(self, param: str, problem: str):
        super().__init__(f"{param}: {problem}")
        self.param = param


class MessageTypeError(MessageError, TypeError):
    """A field of the wrong type (a TypeError as well as a MessageError)."""


def _unicode(text: str, param: str) -> str:
    """`text` if it is valid Unicode (JSON's "\\ud800" and undecodable bytes of an argument are
    not: a tokenizer refuses them, with a TypeError)."""
    try:
        return check_text(text, param)
    except BadValue as e:
        raise MessageError(param, str(e).removeprefix(f"{param} is ")) from None


def _content_text(content, where: str) -> list[str]:
    """The text parts of one message's content."""
    if isinstance(content, str):
        return [_unicode(content, f"{where}.content")]
    if not isinstance(content, (list, tuple)):
        raise MessageTypeError(f"{where}.content", f"a string or a list of text parts, not {type(content).__name__}")
    parts = []
    for j, part in enumerate(content):
        here = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise MessageTypeError(here, "a part is an object like {'type': 'text', 'text': ...}, "
                                         f"not {type(part).__name__}")
        if part.get("type") != "text":
            raise MessageError(f"{here}.type", f"only text parts are supported, not {part.get('type')!r}")
        if not isinstance(part.get("text"), str):
            raise MessageTypeError(f"{here}.text", "a string")
        parts.append(_unicode(part["text"], f"{here}.text"))
    return parts


def check_messages(messages: Sequence[dict]) -> list[tuple[str, str]]:
    """(role, text) per message, each checked: roles known, system only first, then user and
    assistant alternating from user, at least one user message. Texts are as rendered (trimmed,
    except the system message's)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise MessageTypeError("messages", f"a list of messages, not {type(messages).__name__}")
    if not messages:
        raise MessageError("messages", "empty; at least one user message is needed")
    turns = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise MessageTypeError(where, "a message is an object with 'role' and 'content', "
                                          f"not {type(message).__name__}")
        extra = sorted(set(message) - set(MESSAGE_KEYS))
        if extra:
            raise MessageError(f"{where}.{extra[0]}", "not supported (messages have role, content and name)")
        role = message.get("role")
        if role == "developer":  # OpenAI's newer name for the system message (its clients send it)
            role = "system"
        if role not in ROLES:
            raise MessageError(f"{where}.role", f"unknown role {role!r} (system or developer, user, assistant)")
        if "content" not in message:
            raise MessageError(f"{where}.content", "missing")
        parts = _content_text(message["content"], where)
        if role == "system":
            if i != 0:
                raise MessageError(f"{where}.role", "a system message can only come first")
            turns.append((role, "".join(parts)))
            continue
        first = 1 if turns and turns[0][0] == "system" else 0  # the turn that opens the alternation
        expected = "user" if (i - first) % 2 == 0 else "assistant"
        if role != expected:
            raise MessageError(f"{where}.role", f"roles must alternate user/assistant starting with user; "
                               f"expected {expected!r}, got {role!r}")
        turns.append((role, "".join(p.strip() for p in parts)))
    if not any(role == "user" for role, _ in turns):
        raise MessageError("messages", "no user message")
    return turns


def render_messages(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """The conversation's text in Gemma's format (without <bos>), ready for the model's reply."""
    turns = check_messages(messages)
    prefix = ""
    if turns[0][0] == "system":
        prefix = turns[0][1] + "\n\n"
        turns = turns[1:]
    out = []
    for i, (role, text) in enumerate(turns):
        name = "model" if role == "assistant" else role
        out.append(f"{START_OF_TURN}{name}\n{prefix if i == 0 else ''}{text}{END_OF_TURN}\n")
    if add_generation_prompt:
        out.append(f"{START_OF_TURN}model\n")
    return "".join(out)


def chat_turn(message: str) -> str:
    """One user turn in Gemma's format, ending where the model's reply begins."""
    return render_messages([{"role": "user", "content": message}])


def user_and_system(prompt: str, system: str | None) -> list[dict]:
    """The messages of a one-turn chat: an optional system message, then `prompt` from the user."""
    messages = [] if system is None else [{"role": "system", "content": system}]
    return messages + [{"role": "user", "content": prompt}]
