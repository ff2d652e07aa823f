"""The bundle tokenizer: loading, stop ids, chat format, and streaming detokenization.

Two real tokenizer.json files are built here with the `tokenizers` library: a byte-level BPE (as
in the demo checkpoint) and a Gemma-style BPE with byte fallback and SentencePiece decoders
(as in Gemma's own tokenizer.json), because they split characters across tokens differently.
"""

import json

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from runtime.tokenizer import (
    StreamingDetokenizer,
    Tokenizer,
    bundle_eos_token_ids,
    load_tokenizer,
)
from runtime.chat import chat_turn

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
CORPUS = ["Beautiful is better than ugly.", "Explicit is better than implicit.", "naïve café — 日本語 🙂"]


def byte_level_tokenizer() -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return tok


def byte_fallback_tokenizer() -> HFTokenizer:
    """Gemma's scheme: '▁' for spaces, <0xNN> byte tokens for anything outside the vocab."""
    vocab = {name: i for i, name in enumerate(SPECIALS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ["▁", "a", "b", "e", "t", "r", "▁is", "▁better", "é", "日"]:
        vocab.setdefault(piece, len(vocab))
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(SPECIALS)
    return tok


BACKENDS = {"byte-level": byte_level_tokenizer(), "byte-fallback": byte_fallback_tokenizer()}


def stream(backend, ids):
    d = StreamingDetokenizer(backend)
    chunks = [d.add_token(i) for i in ids]
    chunks.append(d.finalize())
    return chunks


@pytest.mark.parametrize("kind", list(BACKENDS))
@settings(max_examples=60, deadline=None)
@given(text=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufffd"), max_size=40))
def test_streaming_equals_full_decode_and_never_splits_a_character(kind, text):
    backend = BACKENDS[kind]
    ids = backend.encode(text, add_special_tokens=False).ids
    chunks = stream(backend, ids)
    assert "".join(chunks) == backend.decode(ids)
    for chunk in chunks:
        assert "\ufffd" not in chunk  # the text has none: a replacement char means half a character


@pytest.mark.parametrize("kind", list(BACKENDS))
def test_multibyte_characters_are_held_until_complete(kind):
    backend = BACKENDS[kind]
    text = "a 日本 🙂"
    ids = backend.encode(text, add_special_tokens=False).ids
    chunks = stream(backend, ids)
    # Some token must have ended mid-character (🙂 is 4 bytes, never one token here) and emitted
    # nothing, and the character must then come out whole.
    assert "" in chunks[:-1]
    assert "🙂" in chunks
    assert "".join(chunks) == text


def test_invalid_bytes_are_released_at_finalize():
    backend = BACKENDS["byte-fallback"]
    lead_byte = backend.token_to_id("<0xE6>")  # first byte of a 3-byte character, never completed
    d = StreamingDetokenizer(backend)
    assert d.add_token(backend.token_to_id("a")) == "a"
    assert d.add_token(lead_byte) == ""
    assert d.finalize() == "\ufffd"


def write_bundle(tmp_path, backend, *, config=None, generation=None, tokenizer_config=None, manifest=None):
    backend.save(str(tmp_path / "tokenizer.json"))
    for name, data in [("config.json", config), ("generation_config.json", generation),
                       ("tokenizer_config.json", tokenizer_config)]:
        if data is not None:
            (tmp_path / name).write_text(json.dumps(data))
    if manifest is not None:
        (tmp_path / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    return tmp_path


def test_load_tokenizer_none_without_tokenizer_json(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert load_tokenizer(tmp_path) is None


def test_load_tokenizer_rejects_a_broken_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_eos_ids_are_the_union_of_config_and_generation_config(tmp_path):
    write_bundle(tmp_path, BACKENDS["byte-level"],
                 config={"eos_token_id": 1, "text_config": {"eos_token_id": [1, 7]}},
                 generation={"eos_token_id": [1, 106]},
                 tokenizer_config={"eos_token": "<end_of_turn>"})
    tok = load_tokenizer(tmp_path)
    assert tok.eos_token_ids == [1, 5, 7, 106]  # <end_of_turn> is id 5 in this vocabulary
    assert bundle_eos_token_ids(tmp_path) == [1, 7, 106]


def test_eos_ids_from_a_valid_manifest(tmp_path):
    from manifests import MANIFEST_NAME  # noqa: F401  (the name the reader looks for)
    from tests.checkpoints import tiny_text_config
    write_bundle(tmp_path, BACKENDS["byte-level"], config={"eos_token_id": 1})
    manifest = {
        "format_version": 1, "tool": {"name": "mlx-prepared", "version": "0"},
        "versions": {"mlx": "0", "python": "3"},
        "source": {"kind": "local", "naming": "hf", "files": {}},
        "model": {"architecture": "gemma3n", "model_type": "gemma3n", "text_config": tiny_text_config(),
                  "eos_token_ids": [1, 42]},
        "target": {"name": "generic", "profile": {}, "profile_sha256": "0", "device": None},
        "dtype": "keep", "projections": {}, "embeddings": {}, "dropped": [], "files": {},
    }
    (tmp_path / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    assert bundle_eos_token_ids(tmp_path) == [1, 42]


def test_bos_from_post_processor_or_tokenizer_config(tmp_path):
    with_post = Tokenizer(BACKENDS["byte-level"], bos_token="<bos>", add_bos_token=True)
    assert with_post.encode("ugly")[0] == 2 and with_post.encode("ugly")[1] != 2
    assert with_post.encode("ugly", add_special_tokens=False)[0] != 2
    without_post = Tokenizer(BACKENDS["byte-fallback"], bos_token="<bos>", add_bos_token=True)
    ids = without_post.encode("ab")
    assert ids[0] == 2 and ids.count(2) == 1
    assert Tokenizer(BACKENDS["byte-fallback"]).encode("ab")[0] != 2


def test_chat_turn_is_gemmas_format_and_special_tokens_are_single_ids():
    text = chat_turn("Why?")
    assert text == "<start_of_turn>user\nWhy?<end_of_turn>\n<start_of_turn>model\n"
    tok = Tokenizer(BACKENDS["byte-level"], eos_token_ids=[1], bos_token="<bos>", add_bos_token=True)
    ids = tok.encode(text)
    assert ids[:2] == [2, 4]  # <bos>, <start_of_turn>
    assert ids.count(4) == 2 and ids.count(5) == 1
    assert tok.chat_stop_ids() == [1, 5]
