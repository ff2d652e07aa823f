"""mlx-lm's generation keywords, for code written against `mlx_lm.generate`/`stream_generate`.

Each keyword of mlx-lm's `generate`, `stream_generate` and `generate_step` (mlx-lm 0.32) is one
of three things here: the same name (max_tokens, sampler, logits_processors, prefill_step_size,
prompt_progress_callback; `verbose` for `generate`), a name of ours under another spelling
(`RENAMED`), or something this runtime does not do (`REFUSED`): a TypeError that says so and
what to use instead, rather than a keyword silently ignored. A refused keyword passed as None
(mlx-lm's "off") is accepted, so calls that spell out mlx-lm's defaults still work.
"""

from __future__ import annotations

RENAMED = {
    "temp": "temperature",
    "prompt_cache": "cache",
}

REFUSED = {
    "max_kv_size": "a bounded KV cache is not supported: full-attention layers keep the whole context "
                   "(sliding layers keep only their window already); pass max_tokens to bound generation",
    "kv_bits": "KV cache quantization is not supported; the cache keeps the model's dtype",
    "kv_group_size": "KV cache quantization is not supported; the cache keeps the model's dtype",
    "quantized_kv_start": "KV cache quantization is not supported; the cache keeps the model's dtype",
    "input_embeddings": "input embeddings are not supported; pass the prompt as text or token ids",
    "draft_model": "speculative decoding is not supported; decoding is one compiled step per token",
    "num_draft_tokens": "speculative decoding is not supported; decoding is one compiled step per token",
    "stream": "an mx.Stream is not taken; generation runs on the default device (mx.set_default_device)",
}


def from_mlx_lm(kwargs: dict, where: str) -> dict:
    """`kwargs` with mlx-lm's spellings turned into ours; a TypeError for what is refused."""
    out = {}
    for name, value in kwargs.items():
        if name in REFUSED:
            if value is None:
                continue
            raise TypeError(f"{where}(): {name} (mlx-lm's) is not supported here: {REFUSED[name]}")
        ours = RENAMED.get(name, name)
        if ours in out:
            raise TypeError(f"{where}(): {name} is mlx-lm's name for {ours}; pass one of them")
        out[ours] = value
    return out
