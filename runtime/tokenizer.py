"""The bundle's tokenizer: `tokenizer.json` through the `tokenizers` library, nothing else.

Also here: the stop tokens a bundle declares (manifest, config.json, generation_config.json,
tokenizer_config.json), Gemma's turn markers, and streaming detokenization that never
emits half a character.
"""

from __future__ import annotations

import os
from pathlib import Path

import tokenizers

from manifests.files import CONFIG_LIMIT, TOKENIZER_LIMIT, NotParsed, parse_json
from runtime.bundle import read_bundle_file

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
REPLACEMENT_CHAR = "\ufffd"

START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"


class StreamingDetokenizer:
    """Feed token ids one at a time; get back only text that is complete.

    Decoding a token in isolation is wrong twice over: byte-level and byte-fallback tokenizers
    split multi-byte characters across tokens, and SentencePiece-style decoders treat the first
    token of a decode specially (the leading space). So each step decodes a short window of
    recent tokens (an anchor that was already emitted, plus the new ones) and emits what the
    window adds beyond the anchor, holding it back while it ends in an incomplete character.
    The concatenation of everything emitted, plus `finalize()`, equals `decode(all ids)`.
    """

    ANCHOR_TOKENS = 4

    def __init__(self, backend: tokenizers.Tokenizer, skip_special_tokens: bool = True):
        self._backend = backend
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._start = 0            # window start in _ids
        self._anchor_text = ""     # decode(_ids[_start:_emitted_upto]), already emitted
        self._emitted_upto = 0     # ids whose text has been emitted
        self._text = ""            # all text emitted so far

    def _decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=self._skip)

    def add_token(self, token_id: int) -> str:
        """The newly completed text (possibly empty) after appending `token_id`."""
        self._ids.append(int(token_id))
        window = self._decode(self._ids[self._start:])
        if window.endswith(REPLACEMENT_CHAR):
            return ""  # an incomplete character (or a real U+FFFD, released by the next token)
        return self._emit(window)

    def finalize(self) -> str:
        """Whatever is still held back, released as is (e.g. a truly invalid byte sequence)."""
        if self._emitted_upto == len(self._ids):
            return ""
        return self._emit(self._decode(self._ids[self._start:]))

    def _emit(self, window: str) -> str:
        if window.startswith(self._anchor_text):
            new = window[len(self._anchor_text):]
        else:
            # A decoder whose output for a window is not a prefix of the longer window's: fall
            # back to decoding everything, which is always right.
            new = self._decode(self._ids)[len(self._text):]
        self._text += new
        self._emitted_upto = len(self._ids)
        self._move_anchor(self._anchor_text + new if window.startswith(self._anchor_text) else None)
        return new

    def _move_anchor(self, window_text: str | None) -> None:
        """Start the next window a few tokens back, at a token that begins a whole character.

        A window that starts inside a character decodes differently (byte-fallback decoders
        replace the whole byte run), so a start is accepted only if its text is clean and is
        exactly the tail of what was emitted; otherwise the window keeps growing.
        """
        n = len(self._ids)
        for p in range(max(self._start, n - self.ANCHOR_TOKENS), n):
            text = self._decode(self._ids[p:])
            if REPLACEMENT_CHAR not in text and self._text.endswith(text):
                self._start, self._anchor_text = p, text
                return
        self._anchor_text = window_text if window_text is not None else self._decode(self._ids[self._start:])

    @property
    def tokens(self) -> list[int]:
        return list(self._ids)


class Tokenizer:
    """A thin view over a `tokenizers.Tokenizer` plus what generation needs to know.

    eos_token_ids: every id that ends generation (see `bundle_eos_token_ids`).
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, eos_token_ids=(), bos_token: str | None = None,
                 add_bos_token: bool = False):
        self.backend = backend
        self.eos_token_ids = sorted({int(i) for i in eos_token_ids})
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token else None
        self.add_bos_token = add_bos_token and self.bos_token_id is not None
        self.end_of_turn_id = backend.token_to_id(END_OF_TURN)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with special tokens, a <bos> in front as the tokenizer wants it."""
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos_token and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids  # tokenizer.json without a post-processor adding it
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def detokenizer(self) -> StreamingDetokenizer:
        return StreamingDetokenizer(self.backend)

    def chat_stop_ids(self) -> list[int]:
        """Stop ids for chat: the declared ones plus <end_of_turn>, which ends every reply."""
        extra = [] if self.end_of_turn_id is None else [self.end_of_turn_id]
        return sorted(set(self.eos_token_ids) | set(extra))


def _read_json(bundle_dir: Path, name: str) -> dict:
    """A JSON file of the bundle ({} when absent), read through the bundle's file door."""
    raw = read_bundle_file(bundle_dir, name, CONFIG_LIMIT, "JSON file")
    if raw is None:
        return {}
    try:
        data = parse_json(raw)
    except NotParsed as e:
        raise ValueError(f"{bundle_dir / name}: {e}") from None
    return data if isinstance(data, dict) else {}


def _ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)]
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    return []


def bundle_eos_token_ids(bundle_dir: str | os.PathLike, backend: tokenizers.Tokenizer | None = None) -> list[int]:
    """Every end-of-sequence id the bundle declares anywhere.

    Gemma checkpoints disagree with themselves: config.json may say `1` while
    generation_config.json says `[1, 106]` (<end_of_turn>); stopping on only one of them makes
    replies run on forever. So take the union of the manifest's `model.eos_token_ids`, config.json
    (top level and text_config), generation_config.json and the tokenizer's eos token.
    """
    bundle_dir = Path(bundle_dir)
    ids: set[int] = set()
    manifest = bundle_dir / "manifest.yaml"
    if manifest.exists():
        from manifests import ManifestError, read_manifest
        try:
            ids.update(_ids(read_manifest(bundle_dir).get("model", {}).get("eos_token_ids")))
        except ManifestError:
            pass  # the loader reports a bad manifest; here it only contributes stop ids
    config = _read_json(bundle_dir, "config.json")
    ids.update(_ids(config.get("eos_token_id")))
    text_config = config.get("text_config")
    ids.update(_ids((text_config if isinstance(text_config, dict) else {}).get("eos_token_id")))
    ids.update(_ids(_read_json(bundle_dir, "generation_config.json").get("eos_token_id")))
    if backend is not None:
        eos = _token_content(_read_json(bundle_dir, TOKENIZER_CONFIG_FILE).get("eos_token"))
        if eos is not None and backend.token_to_id(eos) is not None:
            ids.add(backend.token_to_id(eos))
    return sorted(ids)


def _token_content(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<eos>", ...} in older tokenizer configs
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_tokenizer(bundle_dir: str | os.PathLike) -> Tokenizer | None:
    """The bundle's tokenizer, or None when it has no tokenizer.json."""
    bundle_dir = Path(bundle_dir)
    raw = read_bundle_file(bundle_dir, TOKENIZER_FILE, TOKENIZER_LIMIT, "tokenizer.json")
    if raw is None:
        return None
    try:
        backend = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as e:  # the library raises plain Exception subclasses for bad files
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{bundle_dir / TOKENIZER_FILE}: not a valid tokenizer.json ({first})") from None
    config = _read_json(bundle_dir, TOKENIZER_CONFIG_FILE)
    return Tokenizer(
        backend,
        eos_token_ids=bundle_eos_token_ids(bundle_dir, backend),
        bos_token=_token_content(config.get("bos_token")),
        add_bos_token=bool(config.get("add_bos_token", False)),
    )
