"""Compiled single-token decode: one `mx.compile`d step over fixed-shape KV buffers.

At batch 1 on a big GPU a decode step is launch-bound: MLX spends host time on every node of
the graph it evaluates, and the weights' bytes take a fraction of that. On an H100 an E2B-shaped
model with tiny widths decoded barely faster than the full-size one (docs/BENCHMARKS.md). So
decode is a separate forward pass, `DecodeStep`, written for the fewest nodes (see its
docstring), traced once by `mx.compile` and replayed: no per-token Python graph building, and
MLX fuses the element-wise chains into single kernels. `benchmarks/bench_graph.py` counts the
nodes; the float32 parity tests check every compiled step against transformers.

Compilation needs shapes that do not change from token to token: a full-attention layer writes
position p to slot p of a buffer with room for `capacity` positions (doubled, and traced once
more, when full); a sliding layer writes it to slot p % window of a ring
(`RotatingKVCache.to_ring`). A layer's keys and values share one buffer, `[1, 2 * kv_heads,
slots, head_dim]` (keys' heads, then values'), so one update writes both. Attention reads the
whole buffer with a mask of the slots written so far; the order of keys in a ring does not
matter to attention because RoPE was applied before they were stored. Prefill stays eager (its
shapes vary anyway); `CompiledDecoder` takes over the eager caches after it and hands them back
(`to_eager`) so a chat can prefill its next turn.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from runtime import cuda_blocks
from runtime.cache import KVCache, RotatingKVCache, pad_positions
from runtime.mapped import MappedTable
from runtime.model import rms_norm, softcap
from runtime.projections import transposed_view

DEFAULT_CAPACITY = 1024
AUTO = object()  # DecodeStep's default `blocks`: the CUDA kernels where they apply

# What a layer's projections give the step's attention (`DecoderLayer.project` blocks): q, k and
# v side by side (q alone in a KV-shared layer) and laurel's left, from the normed input.
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
Q = QKV[:1]
LAUREL_LEFT = ("laurel.linear_left",)


def cache_owners(config) -> list[int]:
    """Layers that keep a KV cache of their own (not KV-shared), in order: one K/V buffer each."""
    producers = config.kv_producers()
    return [i for i in range(config.num_hidden_layers) if i not in producers]


def transposed_views(lm, head) -> dict[int, mx.array]:
    """`id(module) -> W.T` for every float `[out, in]` weight the step multiplies by, evaluated
    here. A transpose is a view (strides over the same buffer: no copy, no bytes moved); taken
    inside the compiled step it would be one more graph node per projection and per token.
    Every projection a layer holds is one the step uses (KV-shared layers build no k/v), so no
    weight is read that decoding would not read; a tied head's view is of the embedding table."""
    modules = [m for layer in lm.layers for _, m in layer.named_modules()]
    modules += [*lm.altup_projections, *lm.altup_unembed_projections, head]
    views = {id(m): view for m in modules if (view := transposed_view(m)) is not None}
    mx.eval(list(views.values()))
    return views


class DecodeStep:
    """One token through the decoder: `step(token [1, 1], position, *buffers)`, or, where the
    per-layer table is placed `mapped`, `step(token, position, rows, *buffers)` with the token's
    row gathered on the host (runtime/mapped.py): the one input not made in the graph.

    The same arithmetic as `Model.__call__` (runtime/model.py) for a single position of a single
    sequence: the layers run `DecoderLayer.forward`, the head `LanguageModel.unembed`, the formulas
    the eager model runs, here over one token (planes `[n, hidden]`, activations `[1, hidden]`)
    and through `linear` (transposed views). What is this step's own is attention (`_attend`):
    q/k/v heads, RoPE, the fixed-shape K/V buffers. All of it is written for the fewest kernels
    (and views), because at batch 1 on a big GPU each kernel costs a few microseconds of launch
    and host time (a view far less; docs/BENCHMARKS.md) and the weights' bytes alone would take a
    fraction of the step:

    - activations are 2-D `[1, hidden]` and the AltUp planes one `[n, hidden]` array, so a plane
      is one row slice and a `[1, hidden]` update broadcasts over all planes without a reshape;
      a matmul on 3-D input would add a flatten and an unflatten;
    - weights are multiplied through transposed views taken once (`transposed_views`), and the
      fused q/k/v and gate/up outputs and the per-layer inputs are cut by one `split` each;
    - (DecoderLayer.forward, AltUp) predict mixes the planes with one matmul that adds the
      residual (`addmm`); correct and the per-layer-input update are one fused element-wise
      kernel, the active plane's correction (with its scale) another: the corrected planes are
      never materialized;
    - (AltUp.router) the router's `1 / hidden` scale follows its matmul, into the `tanh` kernel
      (exact for a power-of-two width), and router outputs are cast to the activation dtype as
      transformers does, so no cast needs a kernel of its own;
    - attention over the fixed-size buffers is written out (scores, masked softmax, values):
      MLX's fused attention takes no array mask on CUDA and would expand into more nodes; the
      mask is additive and joins the scores' matmul (`addmm`; `attention`). On a CUDA GPU it is
      one kernel of the runtime's own where the buffer has at most 1024 slots
      (`cuda_blocks.attention`);
    - a layer's q, k and v heads are normed by one unscaled norm, then scaled per head and q and
      k rotated by RoPE in one fused element-wise kernel (`_rope_tables`, `_scale_and_rotate`):
      2 kernels where the norms and RoPEs one by one are 5 (on a CUDA GPU one kernel of the
      runtime's own, `cuda_blocks.heads`);
    - a fused bundle (manifests/format.py FUSED_GROUPS) is one GEMV per group, its output cut by
      one split (`DecoderLayer.project`);
    - (gaussian_top_k) the activation-sparse layers' standard deviation is one dot product of the
      deviations with themselves (5 kernels for the Gaussian top-k where two means are 6).
    - on a CUDA GPU (`_blocks_layers`, runtime/cuda_blocks.py) each layer's steps between its
      projections, attention and MLP (norms, AltUp predict and correct, the residuals) run as
      three kernels of the runtime's own, where the generic graph launches 19, and an
      activation-sparse layer's MLP activation as a fourth, where it launches 5.

    A change to a shared formula changes both passes at once; tests/test_decode_graph.py holds
    this step's kernel and view budgets, tests/test_fast.py the two passes equal on every kind
    of bundle.
    """

    def __init__(self, model, blocks=AUTO):
        """`blocks`: the fused kernels for a layer's small blocks (runtime/cuda_blocks.py), or
        None for the generic graph; by default (`AUTO`) `cuda_blocks.Blocks` where
        `cuda_blocks.enabled()`, else None."""
        c = model.config
        self.model, self.config = model, c
        self.lm = model.model.language_model
        self.owners = cache_owners(c)
        self.producers = c.kv_producers()
        self.head = self.lm.embed_tokens if model.tied_head else model.lm_head
        self.mapped = isinstance(self.lm.embed_tokens_per_layer, MappedTable)
        self.weights_t = transposed_views(self.lm, self.head)
        self.rope_tables = self._rope_tables()
        self.scales = self._scales()
        if blocks is AUTO:
            blocks = cuda_blocks.Blocks(c, self.lm.layers) if cuda_blocks.enabled() else None
        self.blocks = blocks

    def _scales(self) -> tuple[mx.array, mx.array]:
        """The embeddings' scale `hidden ** 0.5` `[1, hidden]` and the per-layer projection's
        `hidden ** -0.5` `[1, layers * per-layer width]`, in the embeddings' dtype, evaluated here.

        A scalar in the step is a constant MLX broadcasts inside a fused kernel, named after its
        value: each of these two was then a kernel that nothing else shares, compiled on every
        fresh machine (seconds each on CUDA; tests/test_decode_graph.py). Already the shape of
        what they multiply, each is one plain multiply, as many kernels per step as before and
        the same bits."""
        c = self.config
        dtype = self.lm.embed_tokens(mx.array([0])).dtype
        width = c.num_hidden_layers * c.hidden_size_per_layer_input
        # each the very scalar the eager pass multiplies by (model.py), repeated
        scales = (mx.full((1, c.hidden_size), mx.array(c.hidden_size**0.5, dtype)),
                  mx.full((1, width), mx.array(c.hidden_size**-0.5, dtype)))
        mx.eval(scales)
        return scales

    def _rope_tables(self) -> list[tuple[mx.array, mx.array, mx.array]]:
        """Per layer, what `_scale_and_rotate` needs for the heads it projects (q, k and v where
        the layer keeps its own KV, else q), each `[1, heads, 1, 2, d / 2]` (a head's two halves,
        which non-traditional RoPE rotates against each other), evaluated here (a few KB):

        - `freq`: RoPE's inverse frequencies (`base ** (-2j / d)`, from float64) on q and k heads
          and 0 on v heads, so the same kernel leaves v unrotated;
        - `scale`: the q/k norm's scale on each q/k head, 1 on v (whose norm has none);
        - `swapped`: the scale with its halves swapped and the first half negated, for the
          rotated-half term `(-x2, x1)`."""
        tables = []
        for i, layer in enumerate(self.lm.layers):
            attn = layer.self_attn
            own = i not in self.producers
            nq, nkv, d = attn.n_heads, attn.n_kv_heads if own else 0, attn.head_dim  # k/v heads projected here
            heads = nq + 2 * nkv
            inv = 1.0 / (attn.theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
            rotated = np.array([1.0] * (nq + nkv) + [0.0] * nkv)
            freq = mx.array((rotated[:, None, None] * inv[None, None, :]).astype(np.float32))
            freq = mx.broadcast_to(freq.reshape(1, heads, 1, 1, d // 2), (1, heads, 1, 2, d // 2))
            dtype = attn.q_norm.weight.dtype
            rows = [mx.broadcast_to(attn.q_norm.weight, (nq, d))]
            if own:
                rows += [mx.broadcast_to(attn.k_norm.weight, (nkv, d)), mx.ones((nkv, d), dtype)]
            scale = mx.concatenate(rows).reshape(1, heads, 1, 2, d // 2)
            sign = mx.array([-1.0, 1.0], dtype).reshape(1, 1, 1, 2, 1)
            tables.append((mx.contiguous(freq), scale, mx.contiguous(scale[:, :, :, ::-1, :] * sign)))
        mx.eval(tables)
        return tables

    @staticmethod
    def _scale_and_rotate(x: mx.array, position: mx.array, table) -> mx.array:
        """`x` `[1, heads, 1, d]`, normed without scale: each head scaled and rotated by RoPE at
        `position` (v heads, whose frequencies are 0, only scaled), in one fused kernel. The
        rotated half `(-x2, x1)` is a view of `x` with its halves in reverse order (a negative
        stride, no copy) times the swapped, negated scale; angles and products are float32 and
        the result is rounded once, to `x`'s dtype (mx.fast.rope rounds the same way)."""
        freq, scale, swapped = table
        heads, d = x.shape[1], x.shape[3]
        halves = x.reshape(1, heads, 1, 2, d // 2)
        angle = position.astype(mx.float32) * freq
        out = halves * scale * mx.cos(angle) + halves[:, :, :, ::-1, :] * swapped * mx.sin(angle)
        return out.astype(x.dtype).reshape(1, heads, 1, d)

    def linear(self, module, x: mx.array) -> mx.array:
        """`module(x)`, through the weight's transposed view where there is one."""
        w_t = self.weights_t.get(id(module))
        if w_t is None:
            return module.as_linear(x) if module is self.head and self.model.tied_head else module(x)
        y = x @ w_t
        return y + module.bias if "bias" in module else y

    def __call__(self, token: mx.array, position: mx.array, *arrays):
        """`arrays`: the token's gathered per-layer row where the table is mapped, then one
        `[1, 2 * kv_heads, slots, head_dim]` key/value buffer per cache owner."""
        c, lm = self.config, self.lm
        rows, buffers = (arrays[0], arrays[1:]) if self.mapped else (None, arrays)
        if token.shape != (1, 1):
            raise ValueError("the compiled decode step takes one token of one sequence ([1, 1]), "
                             f"not {list(token.shape)}")
        ids = token.reshape(1)
        embeds = lm.embed_tokens(ids)
        dtype = embeds.dtype
        embed_scale, projection_scale = self.scales
        embeds = embeds * embed_scale
        # The model's own per-layer inputs and AltUp planes: layers x [1, width], [n, hidden].
        layers = c.num_hidden_layers
        per_layer = mx.split(lm.per_layer_inputs(ids, embeds, rows, projection_scale).reshape(1, -1), layers, axis=1)
        planes = lm.altup_planes(embeds, self.linear).reshape(c.altup_num_inputs, -1)
        plane_mask = lm.plane_mask.astype(dtype)

        kv = dict(zip(self.owners, buffers, strict=True))
        masks = {}
        for i in self.owners:
            size = kv[i].shape[2]
            if size not in masks:
                # Additive: 0 for slots written so far, -inf for the rest (folded into the scores' matmul).
                masks[size] = mx.where(mx.arange(size) <= position, 0.0, -mx.inf).astype(kv[i].dtype)
        if self.blocks is not None:
            planes = self._blocks_layers(planes, per_layer, position, plane_mask, kv, masks)
        else:
            for i, layer in enumerate(lm.layers):
                owner = self.producers.get(i, i)
                planes, kv[owner] = self._layer(layer, planes, per_layer[i], position, plane_mask,
                                                self.rope_tables[i], owner == i, kv[owner], masks)
        return (self._head(planes), *(kv[i] for i in self.owners))

    def _blocks_layers(self, planes, per_layer, position, plane_mask, kv, masks):
        """All layers (`DecoderLayer.forward` each) with their small blocks as `self.blocks`'
        kernels and their projections, attention and MLP as in `_layer`. A layer ends in the
        next one's first kernel (`tail_predict`); the last one ends as the generic graph does."""
        b, tail, layer = self.blocks, None, None
        for i, layer in enumerate(self.lm.layers):
            owner = self.producers.get(i, i)
            pred, normed = b.predict(i, planes) if tail is None else b.tail_predict(i, *tail)
            activated, correction, projected, kv[owner] = self._blocks_layer(i, layer, pred, normed, per_layer[i],
                                                                             position, owner == i, kv[owner], masks)
            tail = (pred, activated, correction, projected)
        pred, activated, correction, projected = tail
        active = pred[layer.active : layer.active + 1]
        return layer.corrected(pred, active, activated, correction, projected, plane_mask)

    def _blocks_layer(self, i, layer, pred, normed, per_layer, position, own_kv, kv, masks):
        """Layer i's `DecoderLayer.body` with this step's attention and the kernels in the place of
        its attention-residual and correct steps: (activated, correction coefficients, the
        per-layer projection, the K/V buffer)."""
        b = self.blocks
        return layer.body(normed, per_layer,
                          lambda x: self._attend(layer, x, position, self.rope_tables[i], own_kv, kv, masks),
                          self.linear,
                          residual=lambda attn, laurel: b.attn_laurel(i, attn, laurel, pred, normed),
                          correct=lambda mlp, attn_laurel: b.correct(i, mlp, attn_laurel, pred),
                          activate=b.activation(i))

    def _layer(self, layer, planes, per_layer, position, plane_mask, rope_table, own_kv, kv, masks):
        """One decoder layer (`DecoderLayer.forward`) with this step's attention; `kv` is the
        layer's key/value buffer (its own where `own_kv`, which this token's k and v are written
        to, else its producer's), returned as updated."""
        return layer.forward(planes, per_layer,
                             lambda normed: self._attend(layer, normed, position, rope_table, own_kv, kv, masks),
                             plane_mask, self.linear)

    def _attend(self, layer, normed, position, rope_table, own_kv, kv, masks):
        """(the heads' output `[1, heads * head_dim]`, laurel's left projection, the K/V buffer)."""
        attn, eps = layer.self_attn, self.config.rms_norm_eps
        nq, nkv, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
        # q, k and v side by side (q alone in a KV-shared layer), and laurel's left projection:
        # one GEMV each, or one for both where the bundle fuses them, cut by one split.
        qkv, laurel = layer.project(normed, (QKV if own_kv else Q, LAUREL_LEFT), self.linear)
        # q, k and v heads (q alone in a KV-shared layer) normed at once, then scaled per head (v by
        # 1) and q and k rotated (v by angle 0): 2 kernels where the norms and RoPEs one by one are
        # 5 (on a CUDA GPU one: cuda_blocks.heads).
        x = qkv.reshape(1, nq + 2 * nkv if own_kv else nq, 1, d)
        x = (self.blocks.heads if self.blocks is not None else heads)(x, position, rope_table, eps)
        if own_kv:
            # k's and v's heads follow q's: one update writes both into the shared buffer.
            q = x[:, :nq]
            # A scatter along the slots, not mx.slice_update: MLX's CUDA backend launches a dynamic
            # slice update over the whole buffer, each new element rewritten as many times as the
            # buffer has slots (17 us a layer on E4B); the scatter's launch covers the update alone.
            slot = (position % kv.shape[2]).reshape(1, 1, 1, 1)
            kv = mx.put_along_axis(kv, slot, x[:, nq:], axis=2)
        else:
            q = x
        mask = masks[kv.shape[2]]
        if self.blocks is not None and self.blocks.attends(kv.shape[2], d):
            return self.blocks.attention(q, kv, mask), laurel, kv
        return attention(q, kv, mask), laurel, kv

    def _head(self, planes):
        logits = self.linear(self.head, self.lm.unembed(planes, self.linear))
        cap = self.config.final_logit_softcapping
        return softcap(logits, cap) if cap else logits


def heads(x: mx.array, position: mx.array, table, eps: float) -> mx.array:
    """A layer's q/k/v heads `x` `[1, n, 1, d]` normed without scale, then scaled per head and
    rotated by RoPE at `position` (`DecodeStep._scale_and_rotate`, `table` from `_rope_tables`)."""
    return DecodeStep._scale_and_rotate(rms_norm(x, None, eps), position, table)


def attention(q: mx.array, kv: mx.array, mask: mx.array) -> mx.array:
    """One query token's attention: q `[1, nq, 1, d]` (normed, scaled, rotated), the K/V buffer
    `[1, 2 * nkv, slots, d]` (keys, then values), the additive mask `[slots]` (0 for slots written
    so far, -inf for the rest); returns the heads' output `[1, nq * d]`. The attention scale is 1;
    the mask joins the scores' matmul (`addmm`): 3 kernels."""
    nq, d, nkv = q.shape[1], q.shape[3], kv.shape[1] // 2
    keys, values = kv[:, :nkv], kv[:, nkv:]
    scores = mx.addmm(mask, q.reshape(1, nkv, nq // nkv, d), keys.swapaxes(-1, -2))
    return (mx.softmax(scores, axis=-1, precise=True) @ values).reshape(1, nq * d)


def compiled_step(model):
    """The model's compiled decode step (`DecodeStep`), made once per model and placement of its
    per-layer table: `mx.compile` keeps its traces per input shape on the function object, so
    every generation after the first replays them."""
    table = model.model.language_model.embed_tokens_per_layer
    made = getattr(model, "_compiled_decode_step", None)
    if made is not None and made[0] is table:
        return made[1]
    decode = DecodeStep(model)
    step = mx.compile(lambda token, position, *arrays: decode(token, position, *arrays))
    object.__setattr__(model, "_compiled_decode_step", (table, step))  # not a parameter: outside the module tree
    return step


class CompiledDecoder:
    """`decoder(tokens [batch]) -> logits [batch, vocab]`: one new token per row, compiled, after an eager prefill."""

    def __init__(self, model, cache: list, capacity: int = DEFAULT_CAPACITY):
        c = model.config
        self.model = model
        self.owners = cache_owners(c)
        self.sliding = {i: c.layer_types[i] == "sliding_attention" for i in self.owners}
        self.eager = cache
        self.position = cache[0].offset
        batch = cache[0].state[0].shape[0] if cache[0].state else 1
        if batch != 1:
            raise ValueError(f"the compiled decoder runs one sequence, not a batch of {batch}: decode batches eagerly")
        self.capacity = max(capacity, self.position + 1)
        self.buffers = []  # per owner: keys' heads then values', [1, 2 * kv_heads, slots, head_dim]
        for i in self.owners:
            if not self.sliding[i]:
                state = cache[i].state
                if not state:
                    raise ValueError("CompiledDecoder needs a prefilled cache")
                keys, values = (pad_positions(a, self.capacity) for a in state)
            else:
                keys, values = cache[i].to_ring()
            self.buffers.append(mx.concatenate([keys, values], axis=1))
        self._step = compiled_step(model)
        table = model.model.language_model.embed_tokens_per_layer
        self.table = table if isinstance(table, MappedTable) else None

    def _grow(self) -> None:
        """Double the full-attention buffers; the next call traces the new shapes once."""
        self.capacity *= 2
        for j, i in enumerate(self.owners):
            if not self.sliding[i]:
                self.buffers[j] = pad_positions(self.buffers[j], self.capacity)

    def __call__(self, token: mx.array) -> mx.array:
        if self.position >= self.capacity:
            self._grow()
        # A mapped per-layer table: the token's row, gathered on the host, which waits for the token.
        rows = () if self.table is None else (self.table.gather(token),)
        out = self._step(token.reshape(-1, 1).astype(mx.int32), mx.array(self.position, mx.int32), *rows,
                         *self.buffers)
        self.buffers = list(out[1:])
        self.position += 1
        return out[0]

    @property
    def state(self) -> list[mx.array]:
        return self.buffers

    def to_eager(self) -> list:
        """The eager caches holding everything decoded so far (for the next eager prefill)."""
        n = self.position
        for j, i in enumerate(self.owners):
            kv = self.buffers[j]
            keys, values = kv[:, : kv.shape[1] // 2], kv[:, kv.shape[1] // 2 :]
            cache = self.eager[i]
            if isinstance(cache, KVCache):
                cache.keys, cache.values, cache.offset = keys[..., :n, :], values[..., :n, :], n
            else:
                assert isinstance(cache, RotatingKVCache)
                cache.from_ring(keys, values, n)
        return self.eager
