"""Gemma3n, the architecture every bundle holds today (the manifest's `model.architecture`).

What the converter, the runtime and the benchmarks all need to know of it beyond a checkpoint's
own files: its name, the `model_type` values of its configs, and the text configs of its
published sizes (google/gemma-3n-E2B-it and -E4B-it), so that `runtime calibrate` measures and
`benchmarks/make_checkpoint.py` builds at the real shapes without downloading either.

Each half describes the architecture's tensors once on its own side, keyed by this name:
convert/gemma3n.py (names, shapes, roles of a checkpoint) and runtime/model.py (the model).
"""

from __future__ import annotations

import copy

ARCHITECTURE = "gemma3n"
MODEL_TYPE = "gemma3n"  # a whole model's config.json (text_config inside)
TEXT_MODEL_TYPE = "gemma3n_text"  # the text decoder's own config
MODEL_TYPES = (MODEL_TYPE, TEXT_MODEL_TYPE)

# What the published sizes differ in; everything else is shared (PUBLISHED_TEXT_CONFIG).
SIZES = {
    "E2B": {"num_hidden_layers": 30, "intermediate_size": 8192, "num_kv_shared_layers": 10},
    "E4B": {"num_hidden_layers": 35, "intermediate_size": 16384, "num_kv_shared_layers": 15},
}

# The text config both ship (transformers 4.53 era), plus `rope_parameters`, the spelling newer
# transformers write. mlx-lm reads the legacy `rope_theta`/`rope_local_base_freq`, so both are
# present, as in a re-saved hub config.
PUBLISHED_TEXT_CONFIG = {
    "model_type": TEXT_MODEL_TYPE,
    "altup_active_idx": 0,
    "altup_coef_clip": 120.0,
    "altup_correct_scale": True,
    "altup_lr_multiplier": 1.0,
    "altup_num_inputs": 4,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "final_logit_softcapping": 30.0,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 2048,
    "hidden_size_per_layer_input": 256,
    "initializer_range": 0.02,
    "laurel_rank": 64,
    "max_position_embeddings": 32768,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000.0,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
    },
    "sliding_window": 512,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 262400,
    "vocab_size_per_layer_input": 262144,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
    "tie_word_embeddings": True,
}


def layer_types(layers: int) -> list[str]:
    """Gemma3n's attention pattern: four sliding-window layers, then one full-attention layer."""
    return ["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(layers)]


def published_text_config(size: str) -> dict:
    """The text config of a published size (a key of SIZES), a fresh copy each call."""
    if size not in SIZES:
        raise ValueError(f"unknown Gemma3n size {size!r} (known: {', '.join(SIZES)})")
    s = SIZES[size]
    layers = s["num_hidden_layers"]
    config = copy.deepcopy(PUBLISHED_TEXT_CONFIG)
    config.update({
        "activation_sparsity_pattern": [0.95] * 10 + [0.0] * (layers - 10),
        "intermediate_size": [s["intermediate_size"]] * layers,
        "layer_types": layer_types(layers),
        "num_hidden_layers": layers,
        "num_kv_shared_layers": s["num_kv_shared_layers"],
    })
    return config
