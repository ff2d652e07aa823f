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

from manifests.config import DEFAULTS as CONFIG_DEFAULTS
from manifests.config import FULL as CONFIG_FULL
from manifests.config import SLIDING as CONFIG_SLIDING
from manifests.config import kv_producers, rope_thetas
from manifests.format import EMBED_TOKENS, FUSED_GROUPS, LM_HEAD, PREFIX, ManifestError, fused_groups_in
from runtime.cache import KVCache, RotatingKVCache
from runtime.mapped import MappedTable
from runtime.projections import (
    HeadColumns,
    Pretransposed,
    QuantizedStandard,
    build_embedding,
    build_fused,
    build_head,
    build_projection,
    quantized_parts,
)
from runtime.quirks import rows

FULL, SLIDING = CONFIG_FULL, CONFIG_SLIDING


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
    max_position_embeddings: int = 32_768  # the context the model was trained for (generation warns past it)
    rope_thetas: dict = field(default_factory=dict, init=False)

    @classmethod
    def from_dict(cls, config: dict) -> TextConfig:
        """From a config the manifest door checked (manifests/config.py), with the same defaults."""
        names = {f.name for f in fields(cls) if f.init}
        return cls(**{k: v for k, v in {**CONFIG_DEFAULTS, **config}.items() if k in names})

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
        try:
            return rope_thetas(vars(self))
        except ValueError as e:
            raise ValueError(f"text_config: {e}") from None

    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def kv_producers(self) -> dict[int, int]:
        """Shared layer -> the last non-shared layer of its type, whose K/V it reuses."""
        try:
            return kv_producers(self.layer_types, self.first_kv_shared_layer)
        except ValueError as e:
            raise ValueError(f"text_config: {e}") from None


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
    return (1 + mx.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))) * (0.5 * x)


def softcap(x: mx.array, cap: float) -> mx.array:
    return mx.tanh(x / cap) * cap


def call(module: nn.Module, x: mx.array) -> mx.array:
    """`module(x)`: how the eager forward multiplies by a projection. The token-wise methods
    below take the multiply as `linear(module, x)`, so that the compiled decode step can run the
    same formulas through its transposed views (runtime/fast.py)."""
    return module(x)


def row_major(x: mx.array) -> mx.array:
    """`x` with row-major strides (a view where its rows already are contiguous, else a copy).
    A slice of a fused projection's output keeps the fused row's stride, even over one row, and
    so does an element-wise result over such slices. MLX's matmul copies an input whose row
    stride is not its width, as one kernel more per projection on a GPU (one decode row's
    LAuReL and down-projection inputs: 60 copies a step on E4B). Reshaping to one axis and
    back gives a one-row view fresh strides at no cost; a strided slice of several rows is
    copied here instead of in the matmul."""
    return x.reshape(-1).reshape(x.shape)


def gaussian_top_k(gate: mx.array, std_multiplier: float) -> mx.array:
    """Keep what lies `std_multiplier` standard deviations above the mean of the last axis, minus
    that threshold (activation sparsity: the `sparsity` quantile of a normal fitted to the
    activations). Two-pass statistics, the variance as the deviations' dot product with
    themselves: one GEMV per row instead of a second reduction over squared deviations (in the
    compiled step 5 kernels where two means are 6; on the CPU faster than mx.std too)."""
    inv_n = 1.0 / gate.shape[-1]
    # row-major, or the dot product's matmul copies both operands (a decode row of a fused
    # gate/up output keeps the fused row's stride, and so do the deviations: `row_major`)
    dev = row_major(gate - mx.sum(gate, axis=-1, keepdims=True) * inv_n)
    std = mx.sqrt((dev @ dev.swapaxes(-1, -2)) * inv_n)
    return mx.maximum(dev - std * std_multiplier, 0)


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


def layer_projections(c: TextConfig, layer: int) -> dict[str, tuple[int, int]]:
    """`(in, out)` of every linear projection of decoder layer `layer`, by its path in the layer,
    as the text config implies them (a KV-shared layer has no k/v: it reads its producer's cache)."""
    h, hp, n = c.hidden_size, c.hidden_size_per_layer_input, c.altup_num_inputs
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    inter, rank = c.intermediate_size[layer], c.laurel_rank
    dims = {
        "self_attn.q_proj": (h, q), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
        "self_attn.o_proj": (q, h),
        "mlp.gate_proj": (h, inter), "mlp.up_proj": (h, inter), "mlp.down_proj": (inter, h),
        "laurel.linear_left": (h, rank), "laurel.linear_right": (rank, h),
        "altup.correction_coefs": (n, n), "altup.prediction_coefs": (n, n * n), "altup.modality_router": (h, n),
        "per_layer_input_gate": (h, hp), "per_layer_projection": (hp, h),
    }
    if layer >= c.first_kv_shared_layer:
        del dims["self_attn.k_proj"], dims["self_attn.v_proj"]
    return dims


def model_projections(c: TextConfig) -> dict[str, tuple[int, int]]:
    """`(in, out)` of every linear projection outside the decoder layers, by its path (the LM
    head's is `lm_head`)."""
    h, layers = c.hidden_size, c.num_hidden_layers
    dims = {f"{PREFIX}per_layer_model_projection": (h, layers * c.hidden_size_per_layer_input)}
    for name in ("altup_projections", "altup_unembed_projections"):
        dims.update({f"{PREFIX}{name}.{i}": (h, h) for i in range(c.altup_num_inputs - 1)})
    dims[LM_HEAD] = (h, c.vocab_size)
    return dims


def projection_role(path: str) -> str:
    """The target-profile role (manifests/profiles.py ROLES) of the projection at `path`: its path
    in a layer (`attn.` for `self_attn.`), else its name without an index."""
    path = path.removeprefix(PREFIX)
    if path.startswith("layers."):
        return path.split(".", 2)[2].replace("self_attn.", "attn.")
    return path.split(".")[0]


def projection_shapes(text_config: dict) -> dict[str, list[tuple[int, int]]]:
    """Role -> the distinct `[out, in]` weight shapes of its projections under `text_config`, in
    first-use order: what `runtime calibrate` measures. Raises what TextConfig raises."""
    c = TextConfig.from_dict(text_config)
    dims = [(f"{PREFIX}layers.{i}.{rel}", d) for i in range(c.num_hidden_layers)
            for rel, d in layer_projections(c, i).items()]
    shapes: dict[str, list[tuple[int, int]]] = {}
    for path, (in_dims, out_dims) in dims + list(model_projections(c).items()):
        seen = shapes.setdefault(projection_role(path), [])
        if (out_dims, in_dims) not in seen:
            seen.append((out_dims, in_dims))
    return shapes


# The projections that read each input of a decoder layer, by path in the layer: a fused group
# (manifests/format.py FUSED_GROUPS) joins projections of one input, so these are what the
# forward passes ask `DecoderLayer.project` for.
ATTENTION_INPUT = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "laurel.linear_left")
MLP_INPUT = ("mlp.gate_proj", "mlp.up_proj")
MLP_BLOCKS = tuple((m,) for m in MLP_INPUT)  # gate and up, one block each


@dataclass(frozen=True)
class Fused:
    """A fused module of a layer: its path in the layer, and its members' paths and output sizes
    in row order (its output is theirs side by side)."""

    path: str
    members: tuple[str, ...]
    outs: tuple[int, ...]


class Projections:
    """Looks up manifest records by module path while the tree is being built."""

    def __init__(self, records: dict, embeddings: dict, mapped: dict | None = None):
        self.records, self.embeddings, self.mapped = records, embeddings, mapped or {}

    def linear(self, path: str, input_dims: int, output_dims: int) -> nn.Module:
        return build_projection(path, self.records.get(path), input_dims, output_dims)

    def embedding(self, path: str, num: int, dims: int):
        """The table's module, or the MappedTable of a table placed `mapped` (runtime/mapped.py)."""
        return build_embedding(path, self.embeddings.get(path), num, dims, self.mapped.get(path))

    def fused_groups(self, path: str, layer: int, kv_shared: bool,
                     dims: dict[str, tuple[int, int]]) -> list[tuple[Fused, nn.Module]]:
        """The fused modules the manifest records in the layer at `path` (FUSED_GROUPS), built and
        checked against the config's `dims`; a group recorded in the wrong kind of layer is named."""
        here = fused_groups_in(kv_shared)
        built = []
        for name, (module, members) in FUSED_GROUPS.items():
            record = self.records.get(f"{path}.{module}")
            if record is None:
                continue
            if name not in here:
                raise ManifestError(f"manifest.yaml: projections.{path}.{module}: layer {layer} "
                                    f"{'is KV-shared (no k/v of its own)' if kv_shared else 'has k/v of its own'}, "
                                    f"so it needs {self._instead(members, here, dims)}")
            if not record.get("fused"):
                raise ManifestError(f"manifest.yaml: projections.{path}.{module}: a fused module's record needs its "
                                    "`fused` members")
            outs = [(f"{path}.{m}", dims[m][1]) for m in members]
            fused = Fused(module, members, tuple(o for _, o in outs))
            built.append((fused, build_fused(f"{path}.{module}", record, dims[members[0]][0], outs)))
        return built

    @staticmethod
    def _instead(members: tuple[str, ...], here: tuple[str, ...], dims: dict) -> str:
        """What a layer of this kind stores of `members` instead: a group that applies here and
        holds the ones it has, or those alone."""
        have = [m for m in members if m in dims]
        groups = [module for name, (module, group) in FUSED_GROUPS.items() if name in here and set(have) <= set(group)]
        return " or ".join(groups + [", ".join(m.rsplit(".", 1)[-1] for m in have) + " unfused"])


class LayerProjections:
    """The projections of one decoder layer: its fused modules first, then every projection no
    fused module holds, each built from its record and set on the module that owns it."""

    def __init__(self, c: TextConfig, p: Projections, layer: int):
        self.path = f"{PREFIX}layers.{layer}"
        self.p, self.dims = p, layer_projections(c, layer)
        self.fused = p.fused_groups(self.path, layer, layer >= c.first_kv_shared_layer, self.dims)
        self.in_fused = {m for f, _ in self.fused for m in f.members}

    def attach(self, owner: nn.Module, path: str) -> None:
        """Build the projection at `path` (in the layer) on `owner` under its last name, unless a
        fused module holds it or the layer has none there (a KV-shared layer's k/v)."""
        if path in self.dims and path not in self.in_fused:
            setattr(owner, path.rsplit(".", 1)[-1], self.p.linear(f"{self.path}.{path}", *self.dims[path]))


class LaurelBlock(nn.Module):
    """Learned augmented residual: a rank-r bypass, normed, added back. The layer projects its
    input (`linear_left`, maybe fused with q/k/v) and that (`linear_right`), and passes it in."""

    def __init__(self, c: TextConfig, lp: LayerProjections):
        super().__init__()
        lp.attach(self, "laurel.linear_left")
        lp.attach(self, "laurel.linear_right")
        self.post_laurel_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def __call__(self, x: mx.array, right: mx.array) -> mx.array:
        """`x` plus `right` (the right projection's output) normed."""
        return x + self.post_laurel_norm(right)


class Attention(nn.Module):
    """Attention over q, k and v, which the layer projects (maybe fused) and passes in."""

    def __init__(self, c: TextConfig, lp: LayerProjections, layer: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.eps = c.rms_norm_eps
        kind = c.layer_types[layer]
        self.window = c.sliding_window if kind == SLIDING else None
        self.theta = c.rope_thetas[kind]
        self.is_kv_shared = layer >= c.first_kv_shared_layer
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):  # KV-shared layers have no k/v
            lp.attach(self, f"self_attn.{name}")
        if not self.is_kv_shared:
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)

    def rope(self, x: mx.array, offset: int) -> mx.array:
        return mx.fast.rope(x, self.head_dim, traditional=False, base=self.theta, scale=1.0, offset=offset)

    def __call__(self, q: mx.array, k: mx.array | None, v: mx.array | None, offset: int, cache,
                 shared_kv: tuple | None):
        """`q`, `k`, `v`: `[b, n, 1, heads * head_dim]` (k and v None in a KV-shared layer).
        `shared_kv`: (keys, values, mask) of this layer's producer, for a KV-shared layer. Returns
        the heads' output `[b, n, 1, heads * head_dim]` (before o_proj, which the layer applies)
        and (keys, values, mask) for the layers that share this one's."""
        b, n = q.shape[:2]
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
            mask = None if k_start is None else attention_mask(offset, n, k_start, keys.shape[2], self.window)
        out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=1.0, mask=mask)
        return out.transpose(0, 2, 1, 3).reshape(b, n, 1, -1), (keys, values, mask)


class MLP(nn.Module):
    """The gated feed-forward block over gate and up, which the layer projects (maybe fused)."""

    def __init__(self, c: TextConfig, lp: LayerProjections, layer: int):
        super().__init__()
        for name in ("gate_proj", "up_proj", "down_proj"):
            lp.attach(self, f"mlp.{name}")
        sparsity = c.activation_sparsity_pattern[layer]
        # Gaussian top-k: keep what lies above the `sparsity` quantile of a normal fitted to the
        # activations. NormalDist().inv_cdf(p) is sqrt(2) * erfinv(2p - 1), in double precision.
        self.std_multiplier = NormalDist().inv_cdf(sparsity) if sparsity > 0 else None

    def activate(self, gate: mx.array, up: mx.array) -> mx.array:
        """What the down projection reads: gelu(gate) * up, the gate first sparsified where the
        layer is activation-sparse."""
        if self.std_multiplier is not None:
            gate = gaussian_top_k(gate, self.std_multiplier)
        return gelu_tanh(gate) * up

    def __call__(self, gate: mx.array, up: mx.array, linear=call, activate=None) -> mx.array:
        """`activate`: `self.activate` by default, or what stands in for it (the compiled step's
        CUDA kernel, runtime/fast.py)."""
        return linear(self.down_proj, row_major((activate or self.activate)(gate, up)))


class AltUp(nn.Module):
    """Alternating updates over `altup_num_inputs` planes: predict before a layer, correct after."""

    def __init__(self, c: TextConfig, lp: LayerProjections):
        super().__init__()
        n, h = c.altup_num_inputs, c.hidden_size
        self.n, self.active, self.hidden = n, c.altup_active_idx, h
        self.correct_output_scale = mx.zeros((h,))
        for name in ("correction_coefs", "prediction_coefs", "modality_router"):
            lp.attach(self, f"altup.{name}")
        self.router_norm = RMSNorm(h, c.rms_norm_eps)

    def router(self, x: mx.array, linear=call) -> mx.array:
        """tanh(router(norm(x)) / hidden) in float32, returned in x's dtype (as transformers rounds
        it). The `1 / hidden` scale follows the matmul (exact for a power-of-two width), so that
        it joins the tanh's kernel in the compiled step."""
        routed = linear(self.modality_router, self.router_norm(x))
        return mx.tanh(routed.astype(mx.float32) * (1.0 / self.hidden)).astype(x.dtype)

    def predict(self, planes: mx.array, linear=call) -> mx.array:
        """planes `[..., n, h]` -> predictions: plane j plus sum_i coefs[j, i] * plane i, with the
        coefficients routed from the active plane; one matmul that adds the residual (addmm)."""
        a = self.active
        coefs = linear(self.prediction_coefs, self.router(planes[..., a : a + 1, :], linear))
        return mx.addmm(planes, coefs.reshape(*planes.shape[:-1], self.n), planes)


class DecoderLayer(nn.Module):
    def __init__(self, c: TextConfig, p: Projections, layer: int):
        super().__init__()
        h = c.hidden_size
        self.active = c.altup_active_idx
        self.correct_scale = c.altup_correct_scale
        # Fused groups (manifests/format.py FUSED_GROUPS: q/k/v, gate/up, either with laurel's left)
        # are built first; their members are then not built apart, and `project` cuts their output.
        lp = LayerProjections(c, p, layer)
        self.self_attn = Attention(c, lp, layer)
        self.mlp = MLP(c, lp, layer)
        self.input_layernorm = RMSNorm(h, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(h, c.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(h, c.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(h, c.rms_norm_eps)
        self.altup = AltUp(c, lp)
        self.laurel = LaurelBlock(c, lp)
        lp.attach(self, "per_layer_input_gate")
        lp.attach(self, "per_layer_projection")
        self.post_per_layer_input_norm = RMSNorm(h, c.rms_norm_eps)
        for fused, module in lp.fused:
            *owners, name = fused.path.split(".")
            setattr(self.module_at(owners), name, module)
        # Not parameters: what `project` reads (fused path -> Fused, member path -> Fused).
        object.__setattr__(self, "fused", {f.path: f for f, _ in lp.fused})
        object.__setattr__(self, "fused_of", {m: f for f, _ in lp.fused for m in f.members})
        object.__setattr__(self, "attention_input", tuple(m for m in ATTENTION_INPUT if m in lp.dims))

    def module_at(self, path) -> nn.Module:
        """The module at `path` (dotted, or its parts) in this layer."""
        module = self
        for name in path.split(".") if isinstance(path, str) else path:
            module = module[name]
        return module

    def project(self, x: mx.array, blocks, linear=call) -> list[mx.array]:
        """The outputs on `x` of the projections in `blocks` (tuples of paths in the layer, all
        reading `x`), one array per block: its members' outputs side by side, in order.

        One matmul per module; a fused module's output is cut by one split where it holds more
        than one block (and not at all where it is one block), and only a block whose members
        live in several modules is concatenated. `linear(module, x)` multiplies (default
        `module(x)`; the compiled decode step passes its own, through transposed views)."""
        place = {m: (b, i) for b, block in enumerate(blocks) for i, m in enumerate(block)}
        pieces: list[dict[int, mx.array]] = [{} for _ in blocks]
        for member, (b, i) in place.items():
            if i in pieces[b]:
                continue
            fused = self.fused_of.get(member)
            if fused is None:
                pieces[b][i] = linear(self.module_at(member), x)
                continue
            # Runs of members that follow each other both in the module's rows and in one block.
            runs: list[list] = []  # [block, first position, width]
            for m, out in zip(fused.members, fused.outs, strict=True):
                at = place.get(m, (None, None))
                last = runs[-1] if runs else None
                if last and last[0] is not None and at[0] == last[0] and at[1] == last[1] + last[3]:
                    last[2] += out
                    last[3] += 1
                else:
                    runs.append([at[0], at[1], out, 1])
            module = self.module_at(fused.path)
            if len(runs) > 1 and linear is call and isinstance(module, QuantizedStandard) and rows(x) > 1:
                # a prefill: run by run (projections.quantized_parts says why), skipping unused rows
                parts = quantized_parts(module, x, [r[2] for r in runs], [r[0] is not None for r in runs])
            else:
                y = linear(module, x)
                cuts = list(itertools.accumulate(width for _, _, width, _ in runs[:-1]))
                parts = mx.split(y, cuts, axis=-1) if cuts else [y]
            for (rb, ri, _, _), part in zip(runs, parts, strict=True):
                if rb is not None:
                    pieces[rb][ri] = part
        return [p[0] if len(p) == 1 else mx.concatenate([p[i] for i in sorted(p)], axis=-1) for p in pieces]

    def forward(self, planes: mx.array, per_layer_input: mx.array, attend, plane_mask: mx.array,
                linear=call) -> tuple[mx.array, object]:
        """The layer's arithmetic, written once for both forward passes (the eager `__call__` and
        the compiled decode step, runtime/fast.py), over tokens in rows: `planes` `[..., n, h]`
        (the n AltUp planes of each token), activations `[..., 1, h]`, `per_layer_input`
        `[..., 1, hp]`, `plane_mask` `[n, 1]` (0 for the first plane, 1 for the others).
        `attend(normed)` is the part each pass does its own way: q/k/v, their norms and RoPE, the
        cache and attention; it returns (the heads' output before o_proj, laurel's left
        projection, what the pass keeps of the cache), and that last one is returned too.

        AltUp correct and the per-layer input are one expression over all planes: the active
        plane corrected is computed on its own (scaled, it feeds the per-layer gate) and again
        inside the final expression, so the corrected planes are never materialized (in the
        compiled step one kernel fewer than correcting all planes, then slicing). The innovation
        is written `-(active - activated)` the second time: the same numbers, but not an
        expression `mx.compile` would merge with the first and materialize."""
        predictions, active, normed = self.predict(planes, linear)
        activated, coefs, projected, state = self.body(
            normed, per_layer_input, attend, linear,
            residual=lambda attn, laurel: self.attention_residual(attn, laurel, active, normed),
            correct=lambda mlp, attn_laurel: self.correct(mlp, attn_laurel, active, linear))
        return self.corrected(predictions, active, activated, coefs, projected, plane_mask), state

    def body(self, normed: mx.array, per_layer_input: mx.array, attend, linear, residual, correct, activate=None):
        """What runs between the layer's steps below: attention (`attend`), o_proj and LAuReL's
        right projection, the MLP, the per-layer input's gate and projection. `residual(attn,
        laurel)` is `attention_residual`, `correct(mlp, attn_laurel)` is `correct`, each bound to
        this layer's predictions, or the compiled step's CUDA kernels in their place
        (runtime/fast.py), as `activate(gate, up)` may stand in for `MLP.activate`. Returns
        (activated, correction coefficients, the per-layer projection, what `attend` kept of the
        cache)."""
        heads, left, state = attend(normed)
        attn = linear(self.self_attn.o_proj, heads)
        attn_laurel, ffw_input = residual(attn, linear(self.laurel.linear_right, row_major(left)))
        gate, up = self.project(ffw_input, MLP_BLOCKS, linear)
        activated, coefs, first = correct(self.mlp(gate, up, linear, activate), attn_laurel)
        first = gelu_tanh(linear(self.per_layer_input_gate, first)) * per_layer_input
        return activated, coefs, linear(self.per_layer_projection, first), state

    # The layer's steps between its projections, attention and MLP, in `forward`'s order; the
    # compiled decode step on a CUDA GPU runs each as one kernel (runtime/cuda_blocks.py). The
    # active prediction is sliced once (`predict`) and handed on.

    def predict(self, planes: mx.array, linear=call) -> tuple[mx.array, mx.array, mx.array]:
        """(AltUp's predictions `[..., n, h]`, the active one `[..., 1, h]`, its input norm)."""
        predictions = self.altup.predict(planes, linear)
        active = predictions[..., self.active : self.active + 1, :]
        return predictions, active, self.input_layernorm(active)

    def attention_residual(self, attn: mx.array, laurel: mx.array, active: mx.array,
                           normed: mx.array) -> tuple[mx.array, mx.array]:
        """(the active prediction + attention + LAuReL, over sqrt(2); that normed for the MLP), from
        o_proj's output `attn` and LAuReL's right projection's `laurel`."""
        attn_laurel = ((active + self.post_attention_layernorm(attn)) + self.laurel(normed, laurel)) * (2.0**-0.5)
        return attn_laurel, self.pre_feedforward_layernorm(attn_laurel)

    def correct(self, mlp: mx.array, attn_laurel: mx.array, active: mx.array,
                linear=call) -> tuple[mx.array, mx.array, mx.array]:
        """(the activated output, AltUp's correction coefficients `[..., n, 1]`, the active plane
        corrected, scaled where the model scales it), from the MLP's output `mlp`."""
        altup, a = self.altup, self.active
        activated = attn_laurel + self.post_feedforward_layernorm(mlp)
        coefs = linear(altup.correction_coefs, altup.router(activated, linear)).reshape(*active.shape[:-2], altup.n, 1)
        first = active + (activated - active) * (coefs[..., a : a + 1, :] + 1.0)
        if self.correct_scale:
            first = first * altup.correct_output_scale
        return activated, coefs, first

    def corrected(self, predictions: mx.array, active: mx.array, activated: mx.array, coefs: mx.array,
                  projected: mx.array, plane_mask: mx.array) -> mx.array:
        """The planes the layer ends with: its predictions corrected by the activated output
        (AltUp correct, with the correction coefficients `coefs`), and the per-layer input's
        projection `projected`, normed, added where `plane_mask` is 1 (every plane but the first,
        as transformers does, whichever plane is active)."""
        first = self.post_per_layer_input_norm(projected)
        return predictions - (active - activated) * (coefs + 1.0) + first * plane_mask

    def __call__(self, planes: mx.array, per_layer_input: mx.array, plane_mask: mx.array, offset: int, cache,
                 shared_kv):
        """The eager layer: `forward` with q, k, v and laurel's left projected one block each,
        and attention over the eager cache (or `shared_kv`, its producer's, in a KV-shared layer)."""
        def attend(normed):
            paths = self.attention_input
            projected = dict(zip(paths, self.project(normed, [(m,) for m in paths]), strict=True))
            heads, kv = self.self_attn(projected["self_attn.q_proj"], projected.get("self_attn.k_proj"),
                                       projected.get("self_attn.v_proj"), offset, cache, shared_kv)
            return heads, projected["laurel.linear_left"], kv

        return self.forward(planes, per_layer_input, attend, plane_mask)


def rescale_to(x: mx.array, target_rms: mx.array) -> mx.array:
    rms = mx.sqrt(mx.maximum(mx.mean(x * x, axis=-1, keepdims=True), 1e-5))
    return x * target_rms / rms


class LanguageModel(nn.Module):
    """`model.language_model`: embeddings, per-layer inputs, AltUp planes, layers, final norm."""

    # When set, called with (stage, planes [b, t, n, hidden]) for the planes entering layer 0
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
        dims = model_projections(c)
        path = f"{PREFIX}per_layer_model_projection"
        self.per_layer_model_projection = p.linear(path, *dims[path])
        self.per_layer_projection_norm = RMSNorm(hp, c.rms_norm_eps)
        for name in ("altup_projections", "altup_unembed_projections"):
            paths = [f"{PREFIX}{name}.{i}" for i in range(c.altup_num_inputs - 1)]
            setattr(self, name, [p.linear(path, *dims[path]) for path in paths])
        self.layers = [DecoderLayer(c, p, i) for i in range(n_layers)]
        self.norm = RMSNorm(h, c.rms_norm_eps)
        self._kv_producers = c.kv_producers()
        # Not a parameter: planes 1.. receive the per-layer input (transformers: `corrected[1:] += ...`).
        object.__setattr__(self, "plane_mask", mx.array([[0.0]] + [[1.0]] * (c.altup_num_inputs - 1)))  # [n, 1]

    def per_layer_inputs(self, ids: mx.array, embeds: mx.array, rows: mx.array | None = None,
                         projection_scale: mx.array | None = None) -> mx.array:
        """`rows`: the per-layer table's rows of `ids` already gathered, where the table is placed
        `mapped` (MappedTable.gather; the compiled decode step takes them as an input); gathered
        here, on the host, when not given. `projection_scale`: `hidden_size ** -0.5` in the
        embeddings' dtype, as an array of the projection's shape where the caller has one (the
        compiled step: see DecodeStep.scales), else a scalar."""
        c = self.config
        shape = (*ids.shape, c.num_hidden_layers, c.hidden_size_per_layer_input)
        ple = self.embed_tokens_per_layer
        if isinstance(ple, MappedTable):
            table = ple.values(ple.gather(ids) if rows is None else rows)  # ids beyond the table: row 0
        else:
            # Ids beyond the per-layer table (e.g. multimodal tokens) read row 0.
            in_table = (ids >= 0) & (ids < c.vocab_size_per_layer_input)
            table = ple(mx.where(in_table, ids, 0))
        table = table.reshape(shape) * mx.array(c.hidden_size_per_layer_input**0.5, table.dtype)
        if projection_scale is None:
            projection_scale = mx.array(c.hidden_size**-0.5, embeds.dtype)
        projected = self.per_layer_model_projection(embeds) * projection_scale
        projected = self.per_layer_projection_norm(projected.reshape(shape))
        return (projected + table) * mx.array(2.0**-0.5, embeds.dtype)

    def altup_planes(self, embeds: mx.array, linear=call) -> mx.array:
        """The embeddings and their AltUp projections (rescaled to the embeddings' RMS), each
        token's planes in rows: `[..., n, hidden]`. The projections are rescaled stacked, by one
        set of kernels (row by row the same arithmetic, the same bits): in the compiled step 6
        kernels fewer than one by one, and one distinct fused kernel fewer to compile (the
        embeddings' RMS joins the rescaling's kernel; tests/test_decode_graph.py)."""
        first = embeds[..., None, :]  # a view; the RMS taken of it is `[..., 1, 1]` with no reshape to split the kernel
        target = mx.sqrt(mx.mean(first * first, axis=-1, keepdims=True))
        projected = mx.stack([linear(proj, embeds) for proj in self.altup_projections], axis=-2)
        return mx.concatenate([first, rescale_to(projected, target)], axis=-2)

    def unembed(self, planes: mx.array, linear=call) -> mx.array:
        """Planes `[..., n, h]` -> the final hidden state `[..., 1, h]`: the mean of plane 0 and
        the others' unembedding projections, rescaled to plane 0's RMS, normed."""
        top = planes[..., 0:1, :]
        target = mx.sqrt(mx.mean(top * top, axis=-1, keepdims=True))
        total = top
        for i, proj in enumerate(self.altup_unembed_projections):
            total = total + rescale_to(linear(proj, planes[..., i + 1 : i + 2, :]), target)
        return self.norm(total / planes.shape[-2])

    def __call__(self, ids: mx.array, cache: list | None = None) -> mx.array:
        c = self.config
        embeds = self.embed_tokens(ids)
        embeds = embeds * mx.array(c.hidden_size**0.5, embeds.dtype)
        per_layer = self.per_layer_inputs(ids, embeds)  # [b, t, layers, hp]
        planes = self.altup_planes(embeds)  # [b, t, n, h]: each token's planes in rows
        plane_mask = self.plane_mask.astype(embeds.dtype)
        if self.layer_hook is not None:
            self.layer_hook(-1, planes)

        offset = cache[0].offset if cache is not None else 0
        kv_of_layer: dict[int, tuple] = {}
        for i, layer in enumerate(self.layers):
            shared = kv_of_layer[self._kv_producers[i]] if i in self._kv_producers else None
            layer_cache = None if cache is None or shared is not None else cache[i]
            planes, kv_of_layer[i] = layer(planes, per_layer[:, :, i : i + 1, :], plane_mask, offset, layer_cache,
                                           shared)
            if self.layer_hook is not None:
                self.layer_hook(i, planes)
        return self.unembed(planes).squeeze(-2)


class Gemma3nWrapper(nn.Module):
    """The `model.` level of the key path (`model.language_model.*`)."""

    def __init__(self, c: TextConfig, p: Projections):
        super().__init__()
        self.language_model = LanguageModel(c, p)


class Model(nn.Module):
    """Gemma3n text decoder with its (tied) LM head; `model(ids, cache) -> logits [b, t, vocab]`."""

    def __init__(self, config: TextConfig | dict, projections: dict, embeddings: dict, mapped: dict | None = None):
        """`mapped`: path -> MappedTable of the tables placed `mapped` (runtime/loader.py opens them)."""
        super().__init__()
        c = config if isinstance(config, TextConfig) else TextConfig.from_dict(config)
        self.config = c
        p = Projections(projections, embeddings, mapped)
        self.model = Gemma3nWrapper(c, p)
        # The tied head reads the embedding table as it is; a pretransposed one is a module of its own.
        head = build_head(projections.get(LM_HEAD), *model_projections(c)[LM_HEAD])
        self.tied_head = head is None
        if head is not None:
            self.lm_head = head
        embed = self.model.language_model.embed_tokens
        if isinstance(embed, HeadColumns):  # the table stored once, as the pretransposed head
            if not isinstance(head, Pretransposed):
                raise ManifestError(f"manifest.yaml: embeddings.{EMBED_TOKENS}: reads the LM head's columns, but "
                                    f"{LM_HEAD} is not stored pretransposed")
            embed.head = head

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
