"""The Gemma3n text decoder in MLX, top to bottom in one file.

The module tree mirrors the bundle's tensor keys exactly (`model.language_model.<decoder path>`,
and `lm_head.weight_t` for a pretransposed head), so loading is `load_weights` with no
renaming. Every linear projection is built from its manifest record (runtime/projections.py);
nothing here looks at a stored shape to decide a layout.

The reference is Hugging Face transformers' `Gemma3nForCausalLM`: same arithmetic, in the same
order where it matters for float32 parity.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, fields
from statistics import NormalDist

import mlx.core as mx
import mlx.nn as nn

from manifests.format import EMBED_TOKENS, FUSED_GROUPS, LM_HEAD, PREFIX, PRETRANSPOSED, ManifestError
from runtime.cache import KVCache, RotatingKVCache
from runtime.projections import build_embedding, build_fused, build_projection

FULL, SLIDING = "full_attention", "sliding_attention"
DEFAULT_THETA = {FULL: 1_000_000.0, SLIDING: 10_000.0}


@dataclass
class TextConfig:
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int | list[int]
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int = 262_400
    vocab_size_per_layer_input: int = 262_144
    hidden_size_per_layer_input: int = 256
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    sliding_window: int = 512
    layer_types: list[str] | None = None
    num_kv_shared_layers: int = 0
    laurel_rank: int = 64
    altup_num_inputs: int = 4
    altup_active_idx: int = 0
    altup_correct_scale: bool = True
    activation_sparsity_pattern: float | list[float] | None = None
    final_logit_softcapping: float | None = 30.0
    hidden_activation: str = "gelu_pytorch_tanh"
    rope_parameters: dict | None = None
    rope_theta: float | None = None  # old configs: full-attention base
    rope_local_base_freq: float | None = None  # old configs: sliding-attention base
    rope_scaling: dict | None = None
    attention_bias: bool = False
    rope_thetas: dict = field(default_factory=dict, init=False)

    @classmethod
    def from_dict(cls, config: dict) -> "TextConfig":
        names = {f.name for f in fields(cls) if f.init}
        return cls(**{k: v for k, v in config.items() if k in names})

    def __post_init__(self):
        n = self.num_hidden_layers
        if not isinstance(self.intermediate_size, (list, tuple)):
            self.intermediate_size = [self.intermediate_size] * n
        if self.layer_types is None:
            self.layer_types = [FULL if (i + 1) % 5 == 0 else SLIDING for i in range(n)]
        sparsity = self.activation_sparsity_pattern
        if sparsity is None:
            sparsity = [0.95] * 10 + [0.0] * (n - 10) if n > 10 else [0.0] * n
        elif not isinstance(sparsity, (list, tuple)):
            sparsity = [sparsity] * n
        self.activation_sparsity_pattern = list(sparsity)
        if len(self.intermediate_size) != n or len(self.layer_types) != n or len(sparsity) != n:
            raise ValueError("text_config: intermediate_size, layer_types and activation_sparsity_pattern "
                             f"need one entry per layer ({n})")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
            raise ValueError(f"text_config: unsupported hidden_activation {self.hidden_activation!r}")
        self.rope_thetas = self._rope_thetas()

    def _rope_thetas(self) -> dict[str, float]:
        """Base per layer type, from `rope_parameters` (new) or `rope_theta`/`rope_local_base_freq` (old)."""
        params = self.rope_parameters or {}
        if "rope_theta" in params or "rope_type" in params:  # one set of parameters for every type
            params = {FULL: params, SLIDING: params}
        old = {FULL: self.rope_theta, SLIDING: self.rope_local_base_freq}
        thetas = {}
        for kind in (FULL, SLIDING):
            p = dict(params.get(kind) or {})
            if kind == FULL and self.rope_scaling:
                p.update(self.rope_scaling)
            if p.get("rope_type", "default") != "default":
                raise ValueError(f"text_config: RoPE type {p['rope_type']!r} for {kind} is not supported")
            theta = p.get("rope_theta", old[kind])
            thetas[kind] = float(theta if theta is not None else DEFAULT_THETA[kind])
        return thetas

    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def kv_producers(self) -> dict[int, int]:
        """Shared layer -> the last non-shared layer of its type, whose K/V it reuses."""
        first = self.first_kv_shared_layer
        if self.num_kv_shared_layers == 0:
            return {}
        last_of_type = {t: i for i, t in enumerate(self.layer_types[:first])}
        producers = {}
        for i in range(first, self.num_hidden_layers):
            kind = self.layer_types[i]
            if kind not in last_of_type:
                raise ValueError(f"text_config: KV-shared layer {i} ({kind}) has no earlier {kind} layer to share")
            producers[i] = last_of_type[kind]
        return producers


def rms_norm(x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
    # Gemma3n scales by `w`, not `1 + w`; mx.fast.rms_norm accumulates in float32.
    return mx.fast.rms_norm(x, weight, eps)


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return rms_norm(x, self.weight, self.eps)


def gelu_tanh(x: mx.array) -> mx.array:
    return 0.5 * x * (1 + mx.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def softcap(x: mx.array, cap: float) -> mx.array:
    return mx.tanh(x / cap) * cap


def attention_mask(q_start: int, q_len: int, k_start: int, k_len: int, window: int | None) -> mx.array | None:
    """Boolean [q_len, k_len]: causal, and within `window` positions for sliding layers."""
    if q_len == 1 and (window is None or q_start - k_start < window):
        return None
    q = mx.arange(q_start, q_start + q_len)[:, None]
    k = mx.arange(k_start, k_start + k_len)[None, :]
    mask = k <= q
    if window is not None:
        mask = mask & (k > q - window)
    return mask


class Projections:
    """Looks up manifest records by module path while the tree is being built."""

    def __init__(self, records: dict, embeddings: dict):
        self.records, self.embeddings = records, embeddings

    def linear(self, path: str, input_dims: int, output_dims: int) -> nn.Module:
        return build_projection(path, self.records.get(path), input_dims, output_dims)

    def fused(self, path: str, input_dims: int, members: list[tuple[str, int]]) -> nn.Module | None:
        """The fused projection recorded at `path` over `members` ((path, out) in row order), or
        None when the manifest stores the members apart."""
        record = self.records.get(path)
        if record is None:
            return None
        if not record.get("fused"):
            raise ManifestError(f"manifest.yaml: projections.{path}: a fused module's record needs its `fused` members")
        return build_fused(path, record, input_dims, members)

    def embedding(self, path: str, num: int, dims: int) -> nn.Module:
        return build_embedding(path, self.embeddings.get(path), num, dims)


class LaurelBlock(nn.Module):
    """Learned augmented residual: a rank-r bypass, normed, added back. `left=False`: the bundle
    fuses `linear_left` into the layer's q/k/v projection, which passes its output in."""

    def __init__(self, c: TextConfig, p: Projections, path: str, left: bool = True):
        super().__init__()
        if left:
            self.linear_left = p.linear(f"{path}.linear_left", c.hidden_size, c.laurel_rank)
        self.linear_right = p.linear(f"{path}.linear_right", c.laurel_rank, c.hidden_size)
        self.post_laurel_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def __call__(self, x: mx.array, left: mx.array | None = None) -> mx.array:
        left = self.linear_left(x) if left is None else left
        return x + self.post_laurel_norm(self.linear_right(left))


class Attention(nn.Module):
    """`projected=True`: the bundle fuses q/k/v with laurel's left projection at the layer
    (`qkv_laurel_proj`, `q_laurel_proj`), which passes q (and k, v) in; no projections here."""

    def __init__(self, c: TextConfig, p: Projections, path: str, layer: int, projected: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.eps = c.rms_norm_eps
        kind = c.layer_types[layer]
        self.window = c.sliding_window if kind == SLIDING else None
        self.theta = c.rope_thetas[kind]
        self.is_kv_shared = layer >= c.first_kv_shared_layer
        h, q_dims, kv_dims = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        # A fused bundle stores q/k/v as one `qkv_proj` (rows q, k, v); its output is split at
        # `qkv_splits` (cumulative) here (runtime/fast.py reshapes it into heads instead). KV-shared
        # layers have no k/v. `projected`: the layer holds them (with laurel's left) instead.
        qkv = None if projected else p.fused(f"{path}.qkv_proj", h, [
            (f"{path}.q_proj", q_dims), (f"{path}.k_proj", kv_dims), (f"{path}.v_proj", kv_dims)])
        if qkv is not None:
            if self.is_kv_shared:
                raise ManifestError(f"manifest.yaml: projections.{path}.qkv_proj: layer {layer} is KV-shared "
                                    "(it has no k/v of its own), so it needs a lone q_proj")
            self.qkv_proj = qkv
            object.__setattr__(self, "qkv_splits", [q_dims, q_dims + kv_dims])  # not a parameter
        elif not projected:
            self.q_proj = p.linear(f"{path}.q_proj", h, q_dims)
            if not self.is_kv_shared:
                self.k_proj = p.linear(f"{path}.k_proj", h, kv_dims)
                self.v_proj = p.linear(f"{path}.v_proj", h, kv_dims)
        if not self.is_kv_shared:
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.o_proj = p.linear(f"{path}.o_proj", q_dims, h)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)

    def rope(self, x: mx.array, offset: int) -> mx.array:
        return mx.fast.rope(x, self.head_dim, traditional=False, base=self.theta, scale=1.0, offset=offset)

    def __call__(self, x: mx.array, offset: int, cache, shared_kv: tuple | None, projected: tuple | None = None):
        """`shared_kv`: (keys, values, mask) of this layer's producer, for a KV-shared layer.
        `projected`: (q, k, v), or (q,) in a KV-shared layer, already projected from `x`."""
        b, n, _ = x.shape
        if projected is not None:
            q, k, v = projected if len(projected) == 3 else (projected[0], None, None)
        elif "qkv_proj" in self:
            q, k, v = mx.split(self.qkv_proj(x), self.qkv_splits, axis=-1)
        else:
            q = self.q_proj(x)
            if not self.is_kv_shared:
                k, v = self.k_proj(x), self.v_proj(x)
        q = self.q_norm(q.reshape(b, n, self.n_heads, self.head_dim))
        q = self.rope(q.transpose(0, 2, 1, 3), offset)
        if self.is_kv_shared:
            keys, values, mask = shared_kv
        else:
            k = self.k_norm(k.reshape(b, n, self.n_kv_heads, self.head_dim))
            keys = self.rope(k.transpose(0, 2, 1, 3), offset)
            v = rms_norm(v.reshape(b, n, self.n_kv_heads, self.head_dim), None, self.eps)
            values = v.transpose(0, 2, 1, 3)
            k_start = 0
            if cache is not None:
                keys, values, k_start = cache.update_and_fetch(keys, values)
            if hasattr(cache, "attention_mask"):  # fixed-shape cache of compiled decode (runtime/fast.py)
                mask = cache.attention_mask()
            else:
                mask = None if k_start is None else attention_mask(offset, n, k_start, keys.shape[2], self.window)
        out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=1.0, mask=mask)
        out = self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, n, -1))
        return out, (keys, values, mask)


class MLP(nn.Module):
    def __init__(self, c: TextConfig, p: Projections, path: str, layer: int):
        super().__init__()
        h, inter = c.hidden_size, c.intermediate_size[layer]
        # A fused bundle stores gate/up as one `gate_up_proj` (rows gate, then up), split at
        # `gate_up_split` (this layer's intermediate size).
        gate_up = p.fused(f"{path}.gate_up_proj", h, [(f"{path}.gate_proj", inter), (f"{path}.up_proj", inter)])
        if gate_up is not None:
            self.gate_up_proj = gate_up
            self.gate_up_split = inter
        else:
            self.gate_proj = p.linear(f"{path}.gate_proj", h, inter)
            self.up_proj = p.linear(f"{path}.up_proj", h, inter)
        self.down_proj = p.linear(f"{path}.down_proj", inter, h)
        sparsity = c.activation_sparsity_pattern[layer]
        # Gaussian top-k: keep what lies above the `sparsity` quantile of a normal fitted to the
        # activations. NormalDist().inv_cdf(p) is sqrt(2) * erfinv(2p - 1), in double precision.
        self.std_multiplier = NormalDist().inv_cdf(sparsity) if sparsity > 0 else None

    def __call__(self, x: mx.array) -> mx.array:
        if "gate_up_proj" in self:
            gate, up = mx.split(self.gate_up_proj(x), [self.gate_up_split], axis=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        if self.std_multiplier is not None:
            mean = mx.mean(gate, axis=-1, keepdims=True)
            std = mx.std(gate, axis=-1, keepdims=True)
            gate = mx.maximum(gate - (mean + std * self.std_multiplier), 0)
        return self.down_proj(gelu_tanh(gate) * up)


class AltUp(nn.Module):
    """Alternating updates over `altup_num_inputs` planes: predict before a layer, correct after."""

    def __init__(self, c: TextConfig, p: Projections, path: str):
        super().__init__()
        n, h = c.altup_num_inputs, c.hidden_size
        self.n, self.active, self.hidden = n, c.altup_active_idx, h
        self.correct_output_scale = mx.zeros((h,))
        self.correction_coefs = p.linear(f"{path}.correction_coefs", n, n)
        self.prediction_coefs = p.linear(f"{path}.prediction_coefs", n, n * n)
        self.modality_router = p.linear(f"{path}.modality_router", h, n)
        self.router_norm = RMSNorm(h, c.rms_norm_eps)

    def router_modalities(self, x: mx.array) -> mx.array:
        routed = self.modality_router(self.router_norm(x) * (1.0 / self.hidden))
        return mx.tanh(routed.astype(mx.float32))

    def predict(self, planes: mx.array) -> mx.array:
        """planes [n, b, t, h] -> predictions [n, b, t, h]: each plane plus a mix of all planes."""
        modalities = self.router_modalities(planes[self.active])
        coefs = self.prediction_coefs(modalities).reshape(*modalities.shape[:-1], self.n, self.n)
        # prediction[j] = planes[j] + sum_i coefs[..., j, i] * planes[i]
        mixed = mx.einsum("btji,ibth->jbth", coefs, planes.astype(coefs.dtype))
        return (planes + mixed).astype(planes.dtype)

    def correct(self, predictions: mx.array, activated: mx.array) -> mx.array:
        modalities = self.router_modalities(activated)
        coefs = self.correction_coefs(modalities) + 1.0  # [b, t, n]
        innovation = activated - predictions[self.active]
        corrected = predictions + innovation[None] * coefs.transpose(2, 0, 1)[..., None]
        return corrected.astype(activated.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, c: TextConfig, p: Projections, layer: int):
        super().__init__()
        path = f"{PREFIX}layers.{layer}"
        h = c.hidden_size
        self.active = c.altup_active_idx
        self.correct_scale = c.altup_correct_scale
        # A bundle may fuse q/k/v (q in KV-shared layers) with laurel's left projection: one
        # layer-level module over the same input (manifests/format.py `qkv_laurel`, `q_laurel`).
        shared = layer >= c.first_kv_shared_layer
        q_dims, kv_dims = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        outs = {"self_attn.q_proj": q_dims, "self_attn.k_proj": kv_dims, "self_attn.v_proj": kv_dims,
                "laurel.linear_left": c.laurel_rank}
        group, other_group = ("q_laurel", "qkv_laurel") if shared else ("qkv_laurel", "q_laurel")
        name, member_paths = FUSED_GROUPS[group]
        members = [(f"{path}.{m}", outs[m]) for m in member_paths]
        other = FUSED_GROUPS[other_group][0]
        if f"{path}.{other}" in p.records:
            raise ManifestError(f"manifest.yaml: projections.{path}.{other}: layer {layer} "
                                f"{'is KV-shared (no k/v)' if shared else 'has k/v of its own'}, so it needs {name}")
        in_proj = p.fused(f"{path}.{name}", h, members)
        if in_proj is not None:
            setattr(self, name, in_proj)
            object.__setattr__(self, "in_splits", list(itertools.accumulate(o for _, o in members[:-1])))
        self.self_attn = Attention(c, p, f"{path}.self_attn", layer, projected=in_proj is not None)
        self.mlp = MLP(c, p, f"{path}.mlp", layer)
        self.input_layernorm = RMSNorm(h, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(h, c.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(h, c.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(h, c.rms_norm_eps)
        self.altup = AltUp(c, p, f"{path}.altup")
        self.laurel = LaurelBlock(c, p, f"{path}.laurel", left=in_proj is None)
        self.per_layer_input_gate = p.linear(f"{path}.per_layer_input_gate", h, c.hidden_size_per_layer_input)
        self.per_layer_projection = p.linear(f"{path}.per_layer_projection", c.hidden_size_per_layer_input, h)
        self.post_per_layer_input_norm = RMSNorm(h, c.rms_norm_eps)

    @property
    def in_proj(self) -> nn.Module | None:
        """The fused q/k/v (q in a KV-shared layer) + laurel-left projection, if the bundle has one."""
        for group in ("qkv_laurel", "q_laurel"):
            name = FUSED_GROUPS[group][0]
            if name in self:
                return self[name]
        return None

    def __call__(self, planes: mx.array, per_layer_input: mx.array, offset: int, cache, shared_kv):
        predictions = self.altup.predict(planes)
        active = predictions[self.active]
        normed = self.input_layernorm(active)
        in_proj = self.in_proj
        if in_proj is not None:
            *projected, left = mx.split(in_proj(normed), self.in_splits, axis=-1)
            laurel = self.laurel(normed, left)
            attn, kv = self.self_attn(normed, offset, cache, shared_kv, projected=tuple(projected))
        else:
            laurel = self.laurel(normed)
            attn, kv = self.self_attn(normed, offset, cache, shared_kv)
        attn = self.post_attention_layernorm(attn)
        attn_laurel = ((active + attn) + laurel) * (2.0**-0.5)
        ffw = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(attn_laurel)))
        corrected = self.altup.correct(predictions, attn_laurel + ffw)

        first = corrected[self.active]
        if self.correct_scale:
            first = first * self.altup.correct_output_scale
        first = gelu_tanh(self.per_layer_input_gate(first)) * per_layer_input
        first = self.post_per_layer_input_norm(self.per_layer_projection(first))
        corrected = mx.concatenate([corrected[:1], corrected[1:] + first[None]], axis=0)
        return corrected, kv


def rescale_to(x: mx.array, target_rms: mx.array) -> mx.array:
    rms = mx.sqrt(mx.maximum(mx.mean(x * x, axis=-1, keepdims=True), 1e-5))
    return x * target_rms / rms


class LanguageModel(nn.Module):
    """`model.language_model`: embeddings, per-layer inputs, AltUp planes, layers, final norm."""

    # When set, called with (stage, planes [n, b, t, hidden]) for the planes entering layer 0
    # (stage -1) and after each layer: `verify --numeric` (runtime/numeric.py) reads them there.
    layer_hook = None

    def __init__(self, c: TextConfig, p: Projections):
        super().__init__()
        self.config = c
        h, hp, n_layers = c.hidden_size, c.hidden_size_per_layer_input, c.num_hidden_layers
        self.embed_tokens = p.embedding(EMBED_TOKENS, c.vocab_size, h)
        self.embed_tokens_per_layer = p.embedding(
            f"{PREFIX}embed_tokens_per_layer", c.vocab_size_per_layer_input, n_layers * hp
        )
        self.per_layer_model_projection = p.linear(f"{PREFIX}per_layer_model_projection", h, n_layers * hp)
        self.per_layer_projection_norm = RMSNorm(hp, c.rms_norm_eps)
        self.altup_projections = [p.linear(f"{PREFIX}altup_projections.{i}", h, h) for i in range(c.altup_num_inputs - 1)]
        self.altup_unembed_projections = [
            p.linear(f"{PREFIX}altup_unembed_projections.{i}", h, h) for i in range(c.altup_num_inputs - 1)
        ]
        self.layers = [DecoderLayer(c, p, i) for i in range(n_layers)]
        self.norm = RMSNorm(h, c.rms_norm_eps)
        self._kv_producers = c.kv_producers()

    def per_layer_inputs(self, ids: mx.array, embeds: mx.array) -> mx.array:
        c = self.config
        shape = (*ids.shape, c.num_hidden_layers, c.hidden_size_per_layer_input)
        # Ids beyond the per-layer table (e.g. multimodal tokens) read row 0.
        in_table = (ids >= 0) & (ids < c.vocab_size_per_layer_input)
        table = self.embed_tokens_per_layer(mx.where(in_table, ids, 0))
        table = (table * mx.array(c.hidden_size_per_layer_input**0.5, table.dtype)).reshape(shape)
        projected = self.per_layer_model_projection(embeds) * mx.array(c.hidden_size**-0.5, embeds.dtype)
        projected = self.per_layer_projection_norm(projected.reshape(shape))
        return (projected + table) * mx.array(2.0**-0.5, embeds.dtype)

    def altup_planes(self, embeds: mx.array, axis: int = 0) -> mx.array:
        """The embeddings and their AltUp projections (rescaled to the embeddings' RMS), stacked on `axis`."""
        target = mx.sqrt(mx.mean(embeds * embeds, axis=-1, keepdims=True))
        return mx.stack([embeds] + [rescale_to(proj(embeds), target) for proj in self.altup_projections], axis=axis)

    def __call__(self, ids: mx.array, cache: list | None = None) -> mx.array:
        c = self.config
        embeds = self.embed_tokens(ids)
        embeds = embeds * mx.array(c.hidden_size**0.5, embeds.dtype)
        per_layer = self.per_layer_inputs(ids, embeds)

        planes = self.altup_planes(embeds)
        if self.layer_hook is not None:
            self.layer_hook(-1, planes)

        offset = cache[0].offset if cache is not None else 0
        kv_of_layer: dict[int, tuple] = {}
        for i, layer in enumerate(self.layers):
            shared = kv_of_layer[self._kv_producers[i]] if i in self._kv_producers else None
            layer_cache = None if cache is None or shared is not None else cache[i]
            planes, kv_of_layer[i] = layer(planes, per_layer[:, :, i, :], offset, layer_cache, shared)
            if self.layer_hook is not None:
                self.layer_hook(i, planes)

        target = mx.sqrt(mx.mean(planes[0] * planes[0], axis=-1, keepdims=True))
        unembedded = [planes[0]] + [rescale_to(proj(planes[i + 1]), target)
                                     for i, proj in enumerate(self.altup_unembed_projections)]
        return self.norm(mx.mean(mx.stack(unembedded), axis=0))


class Gemma3nWrapper(nn.Module):
    """The `model.` level of the key path (`model.language_model.*`)."""

    def __init__(self, c: TextConfig, p: Projections):
        super().__init__()
        self.language_model = LanguageModel(c, p)


class Model(nn.Module):
    """Gemma3n text decoder with its (tied) LM head; `model(ids, cache) -> logits [b, t, vocab]`."""

    def __init__(self, config: TextConfig | dict, projections: dict, embeddings: dict):
        super().__init__()
        c = config if isinstance(config, TextConfig) else TextConfig.from_dict(config)
        self.config = c
        p = Projections(projections, embeddings)
        self.model = Gemma3nWrapper(c, p)
        head = projections.get(LM_HEAD)
        if head is None:
            raise ValueError(f"manifest.yaml: no projection entry for {LM_HEAD}")
        # The tied head reads the embedding table as it is; a separate table is a module of its own.
        self.tied_head = head["layout"] != PRETRANSPOSED and head["key"] == EMBED_TOKENS + ".weight"
        if not self.tied_head:
            self.lm_head = build_projection(LM_HEAD, head, c.hidden_size, c.vocab_size)

    @property
    def layers(self) -> list:
        return self.model.language_model.layers

    def make_cache(self) -> list:
        """One cache per layer; a KV-shared layer's entry is its producer's cache object."""
        c = self.config
        caches: list = []
        producers = c.kv_producers()
        for i, kind in enumerate(c.layer_types):
            if i in producers:
                caches.append(caches[producers[i]])
            else:
                caches.append(RotatingKVCache(c.sliding_window) if kind == SLIDING else KVCache())
        return caches

    def __call__(self, ids: mx.array, cache: list | None = None) -> mx.array:
        h = self.model.language_model(ids, cache)
        if self.tied_head:
            logits = self.model.language_model.embed_tokens.as_linear(h)
        else:
            logits = self.lm_head(h)
        cap = self.config.final_logit_softcapping
        return softcap(logits, cap) if cap else logits
