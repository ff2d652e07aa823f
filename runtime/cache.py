"""KV caches: a growing one for full-attention layers, a rotating window for sliding layers.

`update_and_fetch(keys, values)` appends `[batch, kv_heads, n, head_dim]` and returns what the
new queries may attend to, plus the position of the first returned key, or None when the keys
come back in rotation order (single-token steps on a full window, where every key is in reach
and no mask is needed). KV-shared layers have no cache of their own: `make_cache` gives them
the same object as the last non-shared layer of their type, and the model never updates it
from a shared layer.
"""

from __future__ import annotations

import mlx.core as mx


def pad_positions(x: mx.array, size: int) -> mx.array:
    """`x` `[batch, kv_heads, n, head_dim]` followed by zeros up to `size` positions."""
    n = x.shape[2]
    if n == size:
        return x
    return mx.concatenate([x, mx.zeros((*x.shape[:2], size - n, x.shape[3]), x.dtype)], axis=2)


class KVCache:
    """Every key and value since position 0, in a buffer grown `step` positions at a time."""

    step = 256

    def __init__(self):
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array, int]:
        n = keys.shape[2]
        end = self.offset + n
        if self.keys is None or end > self.keys.shape[2]:
            grow = ((end - (0 if self.keys is None else self.keys.shape[2]) + self.step - 1) // self.step) * self.step
            new_k = mx.zeros((*keys.shape[:2], grow, keys.shape[3]), keys.dtype)
            new_v = mx.zeros((*values.shape[:2], grow, values.shape[3]), values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[..., : self.offset, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., : self.offset, :], new_v], axis=2)
        self.keys[..., self.offset : end, :] = keys
        self.values[..., self.offset : end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :], 0

    @property
    def state(self) -> tuple[mx.array, mx.array] | tuple[()]:
        """The keys and values so far (views of the buffers), e.g. for `mx.eval`."""
        if self.keys is None:
            return ()
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class RotatingKVCache:
    """The last `window` keys and values; older ones can no longer be attended to.

    Multi-token updates return the kept keys followed by the new ones in position order, so
    the caller's mask can express the window; single-token updates overwrite the oldest slot.
    """

    def __init__(self, window: int):
        self.window = window
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0  # positions seen so far
        self._size = 0  # valid entries in the buffer
        self._next = 0  # slot the next single token goes to

    def _ordered(self) -> tuple[mx.array, mx.array]:
        k, v = self.keys[..., : self._size, :], self.values[..., : self._size, :]
        if self._size == self.window and self._next:
            k = mx.concatenate([k[..., self._next :, :], k[..., : self._next, :]], axis=2)
            v = mx.concatenate([v[..., self._next :, :], v[..., : self._next, :]], axis=2)
        return k, v

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array, int | None]:
        n = keys.shape[2]
        if n == 1:
            if self.keys is None:
                shape = (*keys.shape[:2], self.window, keys.shape[3])
                self.keys, self.values = mx.zeros(shape, keys.dtype), mx.zeros(shape, values.dtype)
            self.keys[..., self._next : self._next + 1, :] = keys
            self.values[..., self._next : self._next + 1, :] = values
            self._next = (self._next + 1) % self.window
            self._size = min(self._size + 1, self.window)
            self.offset += 1
            if self._size < self.window:
                return self.keys[..., : self._size, :], self.values[..., : self._size, :], self.offset - self._size
            return self.keys, self.values, None

        if self.keys is None or self._size == 0:
            all_k, all_v = keys, values
        else:
            old_k, old_v = self._ordered()
            all_k = mx.concatenate([old_k, keys], axis=2)
            all_v = mx.concatenate([old_v, values], axis=2)
        start = self.offset - (all_k.shape[2] - n)
        self.offset += n
        self._store(all_k, all_v)
        return all_k, all_v, start

    def _store(self, k: mx.array, v: mx.array) -> None:
        total = k.shape[2]
        if total >= self.window:
            self.keys, self.values = k[..., total - self.window :, :], v[..., total - self.window :, :]
            self._size, self._next = self.window, 0
            return
        self.keys, self.values = pad_positions(k, self.window), pad_positions(v, self.window)
        self._size, self._next = total, total

    def to_ring(self) -> tuple[mx.array, mx.array]:
        """Keys and values `[batch, kv_heads, window, head_dim]` with position p in slot p % window
        (zeros in slots not written yet): the layout of the compiled decode step's ring buffer."""
        keys, values = self._ordered()  # oldest first: positions offset - n .. offset - 1
        n = keys.shape[2]
        shift = (self.offset - n) % self.window
        if n == self.window and shift:
            keys, values = mx.roll(keys, shift, axis=2), mx.roll(values, shift, axis=2)
        return pad_positions(keys, self.window), pad_positions(values, self.window)

    def from_ring(self, keys: mx.array, values: mx.array, offset: int) -> None:
        """Take over a ring in `to_ring`'s layout after `offset` positions (the inverse of to_ring)."""
        self.keys, self.values, self.offset = keys, values, offset
        self._size = min(offset, self.window)
        self._next = offset % self.window if offset >= self.window else offset

    @property
    def state(self) -> tuple[mx.array, mx.array] | tuple[()]:
        """The buffers as stored (rotation order): what `mx.eval` needs to materialize the cache."""
        return () if self.keys is None else (self.keys, self.values)

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes
