"""Compiled single-token decode: one `mx.compile`d step over fixed-shape KV buffers.

Decode is memory-bound in principle, but at batch 1 the eager path spends most of a token
building a graph of a few thousand small ops in Python and launching them one by one. A
compiled step is traced once and replayed: no per-token Python graph building, and MLX fuses
the element-wise chains (norms, AltUp mixing, gates, soft-cap) into fewer kernels.

Compilation needs shapes that do not change from token to token, so decode uses
`StaticKVCache`s: a full-attention layer writes position p to slot p of a buffer with room
for `capacity` positions; a sliding layer writes it to slot p % window of a ring. Attention
reads the whole buffer with a mask of the slots written so far; the order of keys in a ring
does not matter to attention because RoPE was applied before they were stored. Prefill stays
eager (its shapes vary anyway); `CompiledDecoder` takes over the eager caches after it and
hands them back (`to_eager`) so a chat can prefill its next turn.
"""

from __future__ import annotations

import mlx.core as mx

from runtime.cache import KVCache, RotatingKVCache

DEFAULT_CAPACITY = 1024


class StaticKVCache:
    """Keys/values of one layer in a fixed buffer `[batch, kv_heads, size, head_dim]`."""

    def __init__(self, keys: mx.array, values: mx.array, position: mx.array):
        self.keys, self.values, self.offset = keys, values, position

    @property
    def size(self) -> int:
        return self.keys.shape[2]

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        slot = (self.offset % self.size).reshape(1)
        self.keys = mx.slice_update(self.keys, keys, slot, axes=(2,))
        self.values = mx.slice_update(self.values, values, slot, axes=(2,))
        return self.keys, self.values, 0

    def attention_mask(self) -> mx.array:
        # Slots written so far: all of them once a ring has wrapped.
        return (mx.arange(self.size) <= self.offset).reshape(1, 1, 1, -1)


def _pad(x: mx.array, size: int) -> mx.array:
    n = x.shape[2]
    if n == size:
        return x
    return mx.concatenate([x, mx.zeros((*x.shape[:2], size - n, x.shape[3]), x.dtype)], axis=2)


def _ring_from_eager(cache: RotatingKVCache) -> tuple[mx.array, mx.array]:
    """The eager ring in slot order p % window (what StaticKVCache writes)."""
    keys, values = cache._ordered()  # oldest first: positions offset - n .. offset - 1
    n, first = keys.shape[2], cache.offset - keys.shape[2]
    shift = first % cache.window
    if n == cache.window and shift:
        keys, values = mx.roll(keys, shift, axis=2), mx.roll(values, shift, axis=2)
    return _pad(keys, cache.window), _pad(values, cache.window)


def cache_owners(config) -> list[int]:
    """Layers that keep a KV cache of their own (not KV-shared), in order: one buffer pair each."""
    producers = config.kv_producers()
    return [i for i in range(config.num_hidden_layers) if i not in producers]


def compiled_step(model):
    """The model's compiled decode step, made once per model: `mx.compile` keeps its traces per
    input shape on the function object, so every generation after the first replays them."""
    step = getattr(model, "_compiled_decode_step", None)
    if step is not None:
        return step
    c = model.config
    producers = c.kv_producers()
    owners = cache_owners(c)

    def traced(token: mx.array, position: mx.array, *buffers):
        caches: list = [None] * c.num_hidden_layers
        for j, i in enumerate(owners):
            caches[i] = StaticKVCache(buffers[2 * j], buffers[2 * j + 1], position)
        for i, producer in producers.items():
            caches[i] = caches[producer]
        logits = model(token, cache=caches)[:, -1, :]
        out = [logits]
        for i in owners:
            out += [caches[i].keys, caches[i].values]
        return tuple(out)

    step = mx.compile(traced)
    object.__setattr__(model, "_compiled_decode_step", step)  # not a parameter: outside the module tree
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
        self.capacity = max(capacity, self.position + 1)
        self.buffers = []
        for i in self.owners:
            if not self.sliding[i]:
                state = cache[i].state
                if not state:
                    raise ValueError("CompiledDecoder needs a prefilled cache")
                keys, values = (_pad(a, self.capacity) for a in state)
            else:
                keys, values = _ring_from_eager(cache[i])
            self.buffers += [keys, values]
        self._step = compiled_step(model)

    def _grow(self) -> None:
        """Double the full-attention buffers; the next call traces the new shapes once."""
        self.capacity *= 2
        for j, i in enumerate(self.owners):
            if not self.sliding[i]:
                self.buffers[2 * j] = _pad(self.buffers[2 * j], self.capacity)
                self.buffers[2 * j + 1] = _pad(self.buffers[2 * j + 1], self.capacity)

    def __call__(self, token: mx.array) -> mx.array:
        if self.position >= self.capacity:
            self._grow()
        out = self._step(token.reshape(-1, 1).astype(mx.int32), mx.array(self.position, mx.int32), *self.buffers)
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
            keys, values = self.buffers[2 * j], self.buffers[2 * j + 1]
            cache = self.eager[i]
            if isinstance(cache, KVCache):
                cache.keys, cache.values, cache.offset = keys[..., :n, :], values[..., :n, :], n
            else:
                assert isinstance(cache, RotatingKVCache)
                cache.keys, cache.values, cache.offset = keys, values, n
                cache._size = min(n, cache.window)
                cache._next = n % cache.window if n >= cache.window else n
        return self.eager
