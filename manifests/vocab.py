"""A bundle's tokenizer must not produce a token id its model has no embedding for.

The embedding table has `vocab_size` rows (the text config); a tokenizer.json whose vocabulary or
added tokens reach past it (a token added to the tokenizer without resizing the model) would make
the model read past its table. `convert` refuses such a source, `verify` reports such a bundle,
and the runtime's generation doors refuse the ids themselves (runtime/inputs.py).
"""

from __future__ import annotations


def tokenizer_problem(raw: bytes, vocab_size: int) -> str | None:
    """Why the tokenizer.json `raw` cannot serve a model of `vocab_size` tokens, or None."""
    import tokenizers

    try:
        backend = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as e:  # the library raises plain Exception subclasses for bad files
        first = (str(e).splitlines() or [type(e).__name__])[0][:120]
        return f"not a valid tokenizer.json ({first})"
    vocab = backend.get_vocab(with_added_tokens=True)
    if not vocab:
        return None
    token, top = max(vocab.items(), key=lambda kv: kv[1])
    if top >= vocab_size:
        beyond = sum(1 for i in vocab.values() if i >= vocab_size)
        return (f"token {token[:40]!r} has id {top} ({beyond} token{'s' if beyond != 1 else ''} at or past "
                f"{vocab_size}), outside the model's vocabulary [0, {vocab_size}): the model has no "
                "embedding for it")
    return None
