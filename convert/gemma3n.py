"""What a Gemma3n text decoder checkpoint holds: tensor names, shapes and projection roles.

Names here are relative to the decoder (`layers.0.mlp.gate_proj.weight`); the bundle prefixes
them with `manifests.PREFIX`. This is the converter's single description of the architecture
(convert/architectures.py lists what an architecture's module provides): planning, validation,
the tests' checkpoint builder and the benchmark generator all read it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from manifests.config import DEFAULTS
from manifests.config import FULL, SLIDING, rope_thetas
from manifests.gemma3n import ARCHITECTURE, MODEL_TYPES, TEXT_MODEL_TYPE

ARCHITECTURES = MODEL_TYPES  # the config model_types source reading accepts
NAME = "Gemma3n"  # in messages
__all__ = ["ARCHITECTURE", "ARCHITECTURES", "EMBEDDINGS", "MODEL_TYPES", "NAME", "NEVER_QUANTIZED", "NEVER_QUANTIZED_BECAUSE",
           "TEXT_MODEL_TYPE", "TextShapes", "expected_tensors", "kv_shared_layers", "kv_shared_unused", "mlx_lm_text_config",
           "projection_role", "text_shapes"]


@dataclass(frozen=True)
class TextShapes:
    vocab_size: int
    vocab_size_per_layer_input: int
    hidden_size: int
    hidden_size_per_layer_input: int
    intermediate_sizes: tuple[int, ...]
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_kv_shared_layers: int
    laurel_rank: int
    altup_num_inputs: int

    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers


def text_shapes(text_config: dict) -> TextShapes:
    """Read the shape-bearing fields of a Gemma3n text config (checked at the door, convert/source.py:
    manifests/config.py, whose defaults fill what it lacks); KeyError names a missing one."""
    c = {**DEFAULTS, **text_config}
    layers = int(c["num_hidden_layers"])
    inter = c["intermediate_size"]
    inter = tuple(int(x) for x in inter) if isinstance(inter, (list, tuple)) else (int(inter),) * layers
    if len(inter) != layers:
        raise ValueError(f"intermediate_size has {len(inter)} entries for {layers} layers")
    return TextShapes(
        vocab_size=int(c["vocab_size"]),
        vocab_size_per_layer_input=int(c["vocab_size_per_layer_input"]),
        hidden_size=int(c["hidden_size"]),
        hidden_size_per_layer_input=int(c["hidden_size_per_layer_input"]),
        intermediate_sizes=inter,
        num_hidden_layers=layers,
        num_attention_heads=int(c["num_attention_heads"]),
        num_key_value_heads=int(c["num_key_value_heads"]),
        head_dim=int(c["head_dim"]),
        num_kv_shared_layers=int(c["num_kv_shared_layers"]),
        laurel_rank=int(c["laurel_rank"]),
        altup_num_inputs=int(c["altup_num_inputs"]),
    )


def expected_tensors(text_config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor the decoder uses, name -> [out, in]-style source shape, in a stable order.

    KV-shared layers have no k_proj, v_proj or k_norm: they reuse an earlier layer's cache.
    """
    s = text_shapes(text_config)
    h, hp, n, hd = s.hidden_size, s.hidden_size_per_layer_input, s.altup_num_inputs, s.head_dim
    t: dict[str, tuple[int, ...]] = {
        "embed_tokens.weight": (s.vocab_size, h),
        "embed_tokens_per_layer.weight": (s.vocab_size_per_layer_input, s.num_hidden_layers * hp),
        "per_layer_model_projection.weight": (s.num_hidden_layers * hp, h),
        "per_layer_projection_norm.weight": (hp,),
    }
    for i in range(n - 1):
        t[f"altup_projections.{i}.weight"] = (h, h)
    for i in range(n - 1):
        t[f"altup_unembed_projections.{i}.weight"] = (h, h)
    for i in range(s.num_hidden_layers):
        p, inter = f"layers.{i}.", s.intermediate_sizes[i]
        shared = i >= s.first_kv_shared_layer
        t[p + "self_attn.q_proj.weight"] = (s.num_attention_heads * hd, h)
        if not shared:
            t[p + "self_attn.k_proj.weight"] = (s.num_key_value_heads * hd, h)
            t[p + "self_attn.v_proj.weight"] = (s.num_key_value_heads * hd, h)
        t[p + "self_attn.o_proj.weight"] = (h, s.num_attention_heads * hd)
        t[p + "self_attn.q_norm.weight"] = (hd,)
        if not shared:
            t[p + "self_attn.k_norm.weight"] = (hd,)
        t[p + "mlp.gate_proj.weight"] = (inter, h)
        t[p + "mlp.up_proj.weight"] = (inter, h)
        t[p + "mlp.down_proj.weight"] = (h, inter)
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "post_per_layer_input_norm"):
            t[p + norm + ".weight"] = (h,)
        t[p + "altup.correct_output_scale"] = (h,)
        t[p + "altup.correction_coefs.weight"] = (n, n)
        t[p + "altup.prediction_coefs.weight"] = (n * n, n)
        t[p + "altup.modality_router.weight"] = (n, h)
        t[p + "altup.router_norm.weight"] = (h,)
        t[p + "laurel.linear_left.weight"] = (s.laurel_rank, h)
        t[p + "laurel.linear_right.weight"] = (h, s.laurel_rank)
        t[p + "laurel.post_laurel_norm.weight"] = (h,)
        t[p + "per_layer_input_gate.weight"] = (hp, h)
        t[p + "per_layer_projection.weight"] = (h, hp)
    t["norm.weight"] = (h,)
    return t


def kv_shared_layers(text_config: dict) -> list[bool]:
    """Per decoder layer, whether it is KV-shared: the last `num_kv_shared_layers` reuse an earlier
    layer's K/V cache and have no k/v projections of their own."""
    s = text_shapes(text_config)
    return [i >= s.first_kv_shared_layer for i in range(s.num_hidden_layers)]


def kv_shared_unused(text_config: dict) -> dict[str, tuple[int, ...]]:
    """K/V tensors checkpoints carry for KV-shared layers, which the model never reads, name ->
    shape (that of a layer's own k/v). Every Hugging Face Gemma3n checkpoint has them, and
    mlx-lm's loader wants them (it builds k/v in every layer)."""
    s = text_shapes(text_config)
    kv = s.num_key_value_heads * s.head_dim
    shapes = {"k_proj.weight": (kv, s.hidden_size), "v_proj.weight": (kv, s.hidden_size), "k_norm.weight": (s.head_dim,)}
    return {f"layers.{i}.self_attn.{name}": shape
            for i in range(s.first_kv_shared_layer, s.num_hidden_layers) for name, shape in shapes.items()}


# mlx-lm's names for the RoPE base of each layer type (old transformers configs' too).
ROPE_KEYS = {FULL: "rope_theta", SLIDING: "rope_local_base_freq"}


def mlx_lm_text_config(text_config: dict) -> dict:
    """Keys mlx-lm's gemma3n requires that a newer config may lack, to add beside it: the RoPE
    bases as `rope_theta` (full attention) and `rope_local_base_freq` (sliding), which newer
    transformers configs keep only in `rope_parameters` (read as manifests/config.py reads them
    for our runtime). {} where nothing is missing."""
    thetas = rope_thetas(text_config)
    return {key: thetas[kind] for kind, key in ROPE_KEYS.items() if key not in text_config}


_LAYER_ROLE = re.compile(
    r"layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj|laurel\.linear_(left|right)"
    r"|altup\.(prediction_coefs|correction_coefs|modality_router)|per_layer_input_gate|per_layer_projection)$"
)
_TOP_ROLE = re.compile(r"(per_layer_model_projection|altup_projections|altup_unembed_projections)(\.\d+)?$")


def projection_role(module: str) -> str | None:
    """Role of a linear module (decoder-relative path without `.weight`), or None if not linear."""
    m = _LAYER_ROLE.search(module)
    if m and module.startswith("layers."):
        role = m.group(1)
        return role.replace("self_attn.", "attn.")
    m = _TOP_ROLE.fullmatch(module)
    return m.group(1) if m else None


EMBEDDINGS = ("embed_tokens", "embed_tokens_per_layer")

# Linear modules never quantized (convert/quantize.py says why in full): AltUp's coefficient
# matrices and router are tiny, shape every plane's mixture, and run in float32 on purpose.
NEVER_QUANTIZED = ("altup.correction_coefs", "altup.prediction_coefs", "altup.modality_router")
NEVER_QUANTIZED_BECAUSE = "AltUp coefficients and router stay float"
