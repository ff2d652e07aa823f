"""Shared pieces of the runtime tests: the transformers reference and manifest-style records.

`layout_records` lays out a checkpoint's tensors the way a bundle for a target stores them
(pretransposed roles as contiguous `[in, out]` under `.weight_t`) and writes the manifest's
`projections` and `embeddings` for them. It lets the model be tested on its own, straight from
`tests/checkpoints.py`; bundles made by the real converter are tested in test_loader.py.
"""

from __future__ import annotations

import numpy as np

import mlx.core as mx

from convert.gemma3n import EMBEDDINGS, projection_role
from manifests import PREFIX, load_profile
from manifests.format import EMBED_TOKENS, LM_HEAD, LM_HEAD_PRETRANSPOSED_KEY, PRETRANSPOSED


def dtype_name(a: mx.array) -> str:
    return str(a.dtype).rsplit(".", 1)[-1]


def layout_records(tensors: dict[str, mx.array], target: str = "generic"):
    """(stored tensors, projections, embeddings) for a `mlx-lm`-named checkpoint and a target."""
    profile = load_profile(target)
    stored: dict[str, mx.array] = {}
    projections: dict[str, dict] = {}
    embeddings: dict[str, dict] = {}
    for key, value in tensors.items():
        module = key[: -len(".weight")] if key.endswith(".weight") else None
        relative = module[len(PREFIX):] if module else None
        role = projection_role(relative) if module else None
        if role is None:
            stored[key] = value
            if relative in EMBEDDINGS:
                embeddings[module] = {"key": key, "shape": list(value.shape), "dtype": dtype_name(value),
                                      "quantized": None}
            continue
        layout = profile.layout_for(role, dtype_name(value))
        new_key = module + (".weight_t" if layout == PRETRANSPOSED else ".weight")
        stored[new_key] = mx.array(np.ascontiguousarray(np.array(value).T)) if layout == PRETRANSPOSED else value
        projections[module] = {
            "role": role, "layout": layout, "key": new_key, "source_key": key,
            "shape": list(stored[new_key].shape), "source_shape": list(value.shape),
            "dtype": dtype_name(value), "bias": None, "quantized": None,
        }
    embed = tensors[EMBED_TOKENS + ".weight"]
    head_layout = profile.layout_for("lm_head", dtype_name(embed))
    if head_layout == PRETRANSPOSED:
        stored[LM_HEAD_PRETRANSPOSED_KEY] = mx.array(np.ascontiguousarray(np.array(embed).T))
        head_key, head_shape = LM_HEAD_PRETRANSPOSED_KEY, list(reversed(embed.shape))
    else:
        head_key, head_shape = EMBED_TOKENS + ".weight", list(embed.shape)
    projections[LM_HEAD] = {
        "role": "lm_head", "layout": head_layout, "key": head_key, "source_key": EMBED_TOKENS + ".weight",
        "shape": head_shape, "source_shape": list(embed.shape), "dtype": dtype_name(embed),
        "bias": None, "quantized": None,
    }
    return stored, projections, embeddings


def reference_model(text_config: dict, tensors: dict[str, mx.array]):
    """transformers' Gemma3nForCausalLM in float32, eager attention, with the checkpoint's weights."""
    import torch
    import transformers

    config = transformers.Gemma3nTextConfig(**text_config)
    config._attn_implementation = "eager"
    ref = transformers.Gemma3nForCausalLM(config).float().eval()
    state = {"model." + k[len(PREFIX):]: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in tensors.items()}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected, (missing, unexpected)
    assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr(), "LM head must be tied"
    assert ref.config._attn_implementation == "eager"
    return ref


def reference_logits(ref, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return ref(torch.from_numpy(ids)).logits.float().numpy()


def relative_error(ours, ref: np.ndarray) -> float:
    """max |ours - ref| / max |ref|: the parity metric of every runtime test."""
    ours = np.array(ours, dtype=np.float32)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())
