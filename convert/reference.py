"""The known answers' forward pass: Gemma3n in float32 numpy over the tensors a bundle stores.

A bundle runs on devices we never see, so it carries what its own weights compute on a fixed
prompt (manifests/known_answers.py), and `runtime verify --numeric` checks the device at hand
against that. This is a third forward pass beside the runtime's two (eager and compiled), written
independently of both: plain numpy, float32, transformers' `Gemma3nForCausalLM` step by step
(tests/test_reference.py holds it to transformers the way the runtime is held).

It reads the bundle's tensors as they are stored, through one adapter (`StoredTensors.weight`,
which asks manifests/records.py what each record stores): MLX affine weights (2 to 8 bits)
dequantized here, pretransposed ones read back as `[out, in]`, fused ones cut into their
recorded members. So the answers describe the stored weights, and a
difference at verify time is the device's execution, not quantization error.

Memory stays within the conversion's own bound: a weight is read and multiplied a block of rows
at a time (16 MB in float32), the embedding tables only at the rows the prompt's tokens select;
the activations of a 12-token prompt are a few hundred kB.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from statistics import NormalDist

import numpy as np

from convert.dtypes import STORAGE, bf16_to_f32
from convert.errors import ConvertError
from convert.gemma3n import TextShapes, expected_tensors, text_shapes
from manifests import ManifestError
from manifests.format import EMBED_TOKENS, LM_HEAD, PREFIX, PRETRANSPOSED
from manifests.known_answers import checksum
from manifests.records import BIASES, SCALES, WEIGHT, WEIGHT_T, Storage, fused_members, records
from manifests.safetensors_header import DTYPE_NAMES, read_header_file

PROMPT_LENGTH = 12
RECORDED_POSITIONS = 4  # the last ones: `verify --numeric` prefills the rest, then decodes these compiled
TOP_K = 8
COORDINATES = 8
PROMPT_SEED = 20251127
BLOCK_BYTES = 16 * 1024 * 1024  # float32 bytes of a weight's rows made at once

# Tolerances per activation dtype (the dtype the runtime computes in: the embedding's, or its
# scales' when quantized): |runtime - reference| per recorded logit; per hidden checksum, the
# aggregates' and the single values' difference relative to the reference's RMS. `TF32`: a
# float32 bundle on a device whose float32 matmuls run in TF32. Each is the largest difference
# measured between the runtime (eager and compiled, CPU) and this reference, times 3, rounded up
# to 1, 2 or 5 x 10^k; measured on tiny random models (two kinds of norm scales), the trained
# demo and full-size random E2B (4-bit), float and 4/8-bit; TF32 by rounding this reference's
# matmul inputs (docs/KNOWN_ANSWERS.md: the measurements, and what the loose ones still catch).
TOLERANCES = {
    "float32": {"logits": 5e-4, "hidden": 5e-6, "values": 2e-4},
    "bfloat16": {"logits": 10.0, "hidden": 0.1, "values": 10.0},
    "float16": {"logits": 1.0, "hidden": 0.02, "values": 1.0},
}
TF32 = {"logits": 0.5, "hidden": 5e-3, "values": 0.5}


def _read_into(fd: int, buf: np.ndarray, offset: int) -> None:
    view = memoryview(buf).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise ConvertError(f"unexpected end of file reading a tensor at byte {offset + done}")
        done += n


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored floats (safetensors dtype code, bfloat16 as raw uint16) as float32."""
    if dtype == "F32":
        return raw
    if dtype == "BF16":
        out = np.empty(raw.shape, np.float32)
        bf16_to_f32(raw, out)
        return out
    if dtype == "F16":
        return raw.astype(np.float32)
    raise ConvertError(f"known answers: stored dtype {dtype} is not a float")


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """MLX's packed uint32 rows `[r, words]` -> their `bits`-bit values `[r, words * 32 / bits]`:
    each row is one little-endian bit stream (so 3-, 5- and 6-bit values may straddle words)."""
    rows = packed.shape[0]
    if 8 % bits == 0:  # whole values per byte: the k-th of each byte, for each k, over all bytes at once
        data = packed.view(np.uint8)
        out = np.empty((rows, data.shape[1], 8 // bits), np.uint8)
        for k in range(8 // bits):
            np.bitwise_and(data >> np.uint8(k * bits), np.uint8((1 << bits) - 1), out=out[:, :, k])
        return out.reshape(rows, -1)
    stream = np.unpackbits(np.ascontiguousarray(packed).view(np.uint8), axis=1, bitorder="little")
    return stream.reshape(rows, -1, bits).astype(np.uint32) @ (np.uint32(1) << np.arange(bits, dtype=np.uint32))


def dequantize(packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group_size: int) -> np.ndarray:
    """MLX affine dequantization, `scale * q + bias` per group, in float32, a block of rows at a time."""
    rows = packed.shape[0]
    cols = packed.shape[1] * 32 // bits
    out = np.empty((rows, cols), np.float32)
    step = max(1, BLOCK_BYTES // 4 // max(cols, 1))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        block = out[r0:r1].reshape(r1 - r0, -1, group_size)
        block[:] = unpack(packed[r0:r1], bits).reshape(r1 - r0, -1, group_size)
        block *= scales[r0:r1, :, None]
        block += biases[r0:r1, :, None]
    return out


class StoredTensors:
    """A bundle's tensors by key (headers read once, bytes read with pread when asked), and its
    projections and embeddings by module path, as the manifest records them."""

    def __init__(self, directory: str | os.PathLike, manifest: dict):
        self.directory = Path(directory)
        self.tensors: dict[str, tuple[Path, int, object]] = {}
        for name in manifest["files"]:
            if name.endswith(".safetensors"):
                entries, _, start = read_header_file(self.directory / name)
                for e in entries:
                    self.tensors[e.name] = (self.directory / name, start + e.begin, e)
        # Module path -> (where, kind, record, first row, rows): every record, and each fused
        # record's members at their rows (manifests/records.py says what a record stores).
        self.modules: dict[str, tuple] = {}
        for where, kind, path, record in records(manifest):
            self._check(where, kind, path, record)
            out = Storage.of(record, where).dims(record["shape"])[0]
            self.modules[path] = (where, kind, record, 0, out)
            first = 0
            for member, rows in fused_members(record):
                self.modules[member] = (where, kind, record, first, rows)
                first += rows
        self._fds: dict[Path, int] = {}

    def _check(self, where: str, kind, path: str, record: dict) -> None:
        """The reference's door: a record names its tensors where the runtime looks for them, and
        each is stored with the shape (and dtype) the record says. The manifest's digest proves
        only that nobody changed it since it was written; one written (or recomputed) with records
        that disagree with the headers made the reference fail with numpy's errors (shapes that do
        not stack, arrays too big) or compute answers for tensors that are not the model's."""
        try:
            stored = kind.stored(record, where)
            layout = Storage.of(record, where).layout
        except ManifestError as e:
            raise ConvertError(f"{self.directory}/{e}") from None
        want = kind.weight_key(path, layout)
        if record["key"] != want:
            raise ConvertError(f"{self.directory}/{where}: key {record['key']!r} is not where a {layout} record at "
                               f"{path} lives ({want!r})")
        for tensor in stored:
            if tensor.key not in self.tensors:
                raise ConvertError(f"{self.directory}/{where}: tensor {tensor.key} is in no shard")
            file, _, entry = self.tensors[tensor.key]
            dtype = DTYPE_NAMES.get(entry.dtype, entry.dtype)
            if list(entry.shape) != list(tensor.shape) or (tensor.dtype is not None and dtype != tensor.dtype):
                said = f"{tensor.dtype or dtype} {list(tensor.shape)}"
                raise ConvertError(f"{self.directory}/{where}: {file.name} holds {tensor.key} as {dtype} "
                                   f"{list(entry.shape)}, the manifest says {said}")

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _entry(self, key: str):
        if key not in self.tensors:
            raise ConvertError(f"{self.directory}: tensor {key} is in no shard")
        path, start, entry = self.tensors[key]
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path], start, entry

    def rows(self, key: str, rows: range | np.ndarray) -> tuple[np.ndarray, str]:
        """(rows of a stored 2-D tensor in its storage dtype, the dtype code)."""
        fd, start, e = self._entry(key)
        cols = e.shape[1]
        per_row = cols * STORAGE[e.dtype].itemsize
        if isinstance(rows, range):
            out = np.empty((len(rows), cols), STORAGE[e.dtype])
            _read_into(fd, out, start + rows.start * per_row)
            return out, e.dtype
        out = np.empty((len(rows), cols), STORAGE[e.dtype])
        for i, r in enumerate(rows):
            _read_into(fd, out[i], start + int(r) * per_row)
        return out, e.dtype

    def columns(self, key: str, cols: range) -> tuple[np.ndarray, str]:
        """(columns `cols` of a stored 2-D tensor, every row, in its storage dtype, the dtype code)."""
        fd, start, e = self._entry(key)
        itemsize = STORAGE[e.dtype].itemsize
        if len(cols) == e.shape[1]:
            return self.rows(key, range(e.shape[0]))
        out = np.empty((e.shape[0], len(cols)), STORAGE[e.dtype])
        for r in range(e.shape[0]):
            _read_into(fd, out[r], start + (r * e.shape[1] + cols.start) * itemsize)
        return out, e.dtype

    def vector(self, key: str) -> np.ndarray:
        """A stored 1-D tensor (a norm's scale) as float32."""
        fd, start, e = self._entry(key)
        raw = np.empty(e.shape, STORAGE[e.dtype])
        _read_into(fd, raw, start)
        return to_float32(raw, e.dtype)

    def out_dim(self, path: str) -> int:
        return self._locate(path)[4]

    def _locate(self, path: str) -> tuple:
        if path not in self.modules:
            raise ConvertError(f"known answers: no manifest record stores {path}")
        return self.modules[path]

    def weight(self, path: str, rows: range | np.ndarray | None = None) -> np.ndarray:
        """The adapter: float32 `[out, in]` of the projection or embedding at module `path` (or
        `rows` of it), whatever its record says about how it is stored."""
        where, kind, record, first, count = self._locate(path)
        rows = range(count) if rows is None else rows
        want = range(first + rows.start, first + rows.stop) if isinstance(rows, range) else np.asarray(rows) + first
        storage = Storage.of(record, where)
        stored = {t.part: t.key for t in kind.stored(record, where)}
        q = storage.quantized
        if storage.bias or (q and q.mode != "affine"):
            raise ConvertError(f"known answers: {where}: {'a bias' if storage.bias else f'{q.mode} quantization'} "
                               "is not supported by the reference")
        if q:
            packed, _ = self.rows(stored[WEIGHT], want)
            scales, biases = (to_float32(*self.rows(stored[part], want)) for part in (SCALES, BIASES))
            return dequantize(packed, scales, biases, q.bits, q.group_size)
        if storage.layout == PRETRANSPOSED:  # the rows are columns of `[in, out]`: a range at once, ids one by one
            ranges = [want] if isinstance(want, range) else [range(int(i), int(i) + 1) for i in want]
            return np.concatenate([to_float32(*self.columns(stored[WEIGHT_T], r)).T for r in ranges])
        return to_float32(*self.rows(stored[WEIGHT], want))

    def activation_dtype(self) -> str:
        """The dtype the runtime computes in: the embedding's, or its scales' when quantized."""
        where, kind, record, _, _ = self._locate(EMBED_TOKENS)
        if not record.get("quantized"):
            return record["dtype"]
        scales = next(t.key for t in kind.stored(record, where) if t.part == SCALES)
        return DTYPE_NAMES[self._entry(scales)[2].dtype]


@dataclass(frozen=True)
class Arch:
    """What the forward pass reads from the text config, defaults as transformers'."""

    shapes: TextShapes
    eps: float
    window: int
    layer_types: list[str]
    sparsity: list[float]
    thetas: dict[str, float]
    active: int
    correct_scale: bool
    softcap: float | None


def arch_of(text_config: dict) -> Arch:
    c = text_config
    s = text_shapes(c)
    n = s.num_hidden_layers
    types = c.get("layer_types") or ["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(n)]
    sparsity = c.get("activation_sparsity_pattern")
    if sparsity is None:
        sparsity = [0.95] * 10 + [0.0] * (n - 10) if n > 10 else [0.0] * n
    elif not isinstance(sparsity, list):
        sparsity = [sparsity] * n
    if c.get("hidden_activation", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        raise ConvertError(f"known answers: hidden_activation {c['hidden_activation']!r} is not supported")
    params = c.get("rope_parameters") or {}
    if "rope_theta" in params or "rope_type" in params:
        params = {"full_attention": params, "sliding_attention": params}
    old = {"full_attention": c.get("rope_theta"), "sliding_attention": c.get("rope_local_base_freq")}
    thetas = {}
    for kind, default in (("full_attention", 1e6), ("sliding_attention", 1e4)):
        p = dict(params.get(kind) or {})
        if kind == "full_attention" and c.get("rope_scaling"):
            p.update(c["rope_scaling"])
        if p.get("rope_type", "default") != "default":
            raise ConvertError(f"known answers: RoPE type {p['rope_type']!r} is not supported")
        theta = p.get("rope_theta", old[kind])
        thetas[kind] = float(default if theta is None else theta)
    return Arch(s, float(c.get("rms_norm_eps", 1e-6)), int(c.get("sliding_window", 512)), list(types),
                [float(x) for x in sparsity], thetas, int(c.get("altup_active_idx", 0)),
                bool(c.get("altup_correct_scale", True)), c.get("final_logit_softcapping", 30.0))


def rms_norm(x: np.ndarray, weight: np.ndarray | None, eps: float) -> np.ndarray:
    y = x * (np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps)) ** np.float32(-0.5)
    return y if weight is None else y * weight


def gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.float32(math.sqrt(2.0 / math.pi)) * (x + np.float32(0.044715) * x**3)))


def rescale(x: np.ndarray, target: np.ndarray) -> np.ndarray:
    magnitude = np.sqrt(np.maximum(np.mean(x * x, axis=-1, keepdims=True), np.float32(1e-5)))
    return x * target / magnitude


def rope(x: np.ndarray, theta: float) -> np.ndarray:
    """Rotate `x` [positions, heads, d] by its position (non-interleaved halves)."""
    t, _, d = x.shape
    inv = np.float32(1.0) / (np.float32(theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))
    freqs = np.arange(t, dtype=np.float32)[:, None] * inv[None, :]
    angles = np.concatenate([freqs, freqs], axis=-1)[:, None, :]
    rotated = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], axis=-1)
    return x * np.cos(angles) + rotated * np.sin(angles)


def attention(q, k, v, window: int | None) -> np.ndarray:
    """q [t, heads, d], k/v [t, kv_heads, d] -> [t, heads * d]; scale 1, causal (and windowed)."""
    t, heads, d = q.shape
    group = heads // k.shape[1]
    pos = np.arange(t)
    allowed = pos[None, :] <= pos[:, None]
    if window is not None:
        allowed &= pos[None, :] > pos[:, None] - window
    out = np.empty_like(q)
    for h in range(heads):
        scores = q[:, h] @ k[:, h // group].T
        scores = np.where(allowed, scores, -np.inf)
        weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
        out[:, h] = (weights / weights.sum(axis=-1, keepdims=True)) @ v[:, h // group]
    return out.reshape(t, heads * d)


class Forward:
    """Gemma3n over `StoredTensors`, one layer at a time; `on_planes(stage, planes)` sees the AltUp
    planes `[n, t, hidden]` entering layer 0 (stage -1) and after each layer."""

    def __init__(self, store: StoredTensors, text_config: dict):
        self.store, self.arch = store, arch_of(text_config)

    def w(self, path: str, rows=None) -> np.ndarray:
        return self.store.weight(PREFIX + path, rows)

    def v(self, path: str) -> np.ndarray:
        return self.store.vector(PREFIX + path)

    def project(self, x: np.ndarray, path: str) -> np.ndarray:
        """`x @ W.T` for the weight at module `path`, a block of its rows at a time: no whole
        matrix is ever made in float32 (an E4B MLP one would be 134 MB; the LM head 2.1 GB)."""
        count = self.store.out_dim(path)
        step = max(1, BLOCK_BYTES // 4 // x.shape[-1])
        out = np.empty((*x.shape[:-1], count), np.float32)
        for r0 in range(0, count, step):
            rows = range(r0, min(count, r0 + step))
            # W @ x.T, not x @ W.T: a GEMV over W's contiguous rows, 2-7x faster in OpenBLAS here.
            out[..., r0:rows.stop] = (self.store.weight(path, rows) @ x.reshape(-1, x.shape[-1]).T).T.reshape(
                *x.shape[:-1], len(rows))
        return out

    def linear(self, x: np.ndarray, path: str) -> np.ndarray:
        return self.project(x, PREFIX + path)

    def __call__(self, ids: np.ndarray, positions: list[int], on_planes=None) -> np.ndarray:
        """Logits `[len(positions), vocab]` (soft-capped) of the prompt `ids` [t]."""
        a, s = self.arch, self.arch.shapes
        h, hp, layers = s.hidden_size, s.hidden_size_per_layer_input, s.num_hidden_layers
        unique, back = np.unique(ids, return_inverse=True)
        embeds = self.w("embed_tokens", unique)[back] * np.float32(h**0.5)
        pl_ids = np.where((ids >= 0) & (ids < s.vocab_size_per_layer_input), ids, 0)
        unique, back = np.unique(pl_ids, return_inverse=True)
        table = (self.w("embed_tokens_per_layer", unique)[back] * np.float32(hp**0.5)).reshape(len(ids), layers, hp)
        projected = self.linear(embeds, "per_layer_model_projection") * np.float32(h**-0.5)
        projected = projected.reshape(len(ids), layers, hp)
        projected = rms_norm(projected, self.v("per_layer_projection_norm.weight"), a.eps)
        per_layer = (projected + table) * np.float32(1 / math.sqrt(2.0))

        target = np.sqrt(np.mean(embeds * embeds, axis=-1, keepdims=True))
        planes = np.stack([embeds] + [rescale(self.linear(embeds, f"altup_projections.{i}"), target)
                                      for i in range(s.altup_num_inputs - 1)])
        if on_planes:
            on_planes(-1, planes)
        producers = self.kv_producers()
        kv: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for i in range(layers):
            planes = self.layer(i, planes, per_layer[:, i], kv, producers.get(i))
            if on_planes:
                on_planes(i, planes)

        target = np.sqrt(np.mean(planes[0] * planes[0], axis=-1, keepdims=True))
        unembedded = [planes[0]] + [rescale(self.linear(planes[i + 1], f"altup_unembed_projections.{i}"), target)
                                    for i in range(s.altup_num_inputs - 1)]
        hidden = rms_norm(np.mean(np.stack(unembedded), axis=0), self.v("norm.weight"), a.eps)[positions]
        return self.head(hidden)

    def head(self, hidden: np.ndarray) -> np.ndarray:
        """The LM head (in blocks of rows, like every projection), then the soft cap."""
        logits = self.project(hidden, LM_HEAD)
        cap = self.arch.softcap
        return np.tanh(logits / np.float32(cap)) * np.float32(cap) if cap else logits

    def kv_producers(self) -> dict[int, int]:
        """KV-shared layer -> the last layer of its type before the shared ones (whose K/V it reads)."""
        s, types = self.arch.shapes, self.arch.layer_types
        first = s.first_kv_shared_layer
        last = {types[i]: i for i in range(first)}
        return {i: last[types[i]] for i in range(first, s.num_hidden_layers)}

    def router(self, p: str, x: np.ndarray) -> np.ndarray:
        inputs = (rms_norm(x, self.v(p + "altup.router_norm.weight"), self.arch.eps)
                  * np.float32(1.0 / self.arch.shapes.hidden_size))
        return np.tanh(self.linear(inputs, p + "altup.modality_router"))

    def layer(self, i: int, planes, per_layer, kv: dict, producer: int | None) -> np.ndarray:
        a, s = self.arch, self.arch.shapes
        p, n, eps = f"layers.{i}.", s.altup_num_inputs, a.eps
        t = planes.shape[1]
        # AltUp predict: predictions[j] = planes[j] + sum_i coefs[j, i] * planes[i]
        coefs = self.linear(self.router(p, planes[a.active]), p + "altup.prediction_coefs").reshape(t, n, n)
        predictions = planes + np.einsum("tji,ith->jth", coefs, planes)
        active = predictions[a.active]

        normed = rms_norm(active, self.v(p + "input_layernorm.weight"), eps)
        laurel = self.linear(self.linear(normed, p + "laurel.linear_left"), p + "laurel.linear_right")
        laurel = normed + rms_norm(laurel, self.v(p + "laurel.post_laurel_norm.weight"), eps)

        heads, kv_heads, d = s.num_attention_heads, s.num_key_value_heads, s.head_dim
        kind = a.layer_types[i]
        theta = a.thetas[kind]
        q = self.linear(normed, p + "self_attn.q_proj").reshape(t, heads, d)
        q = rope(rms_norm(q, self.v(p + "self_attn.q_norm.weight"), eps), theta)
        if producer is None:
            k = self.linear(normed, p + "self_attn.k_proj").reshape(t, kv_heads, d)
            k = rope(rms_norm(k, self.v(p + "self_attn.k_norm.weight"), eps), theta)
            v = rms_norm(self.linear(normed, p + "self_attn.v_proj").reshape(t, kv_heads, d), None, eps)
            kv[i] = (k, v)
        else:
            k, v = kv[producer]
        out = attention(q, k, v, a.window if kind == "sliding_attention" else None)
        attn = rms_norm(self.linear(out, p + "self_attn.o_proj"), self.v(p + "post_attention_layernorm.weight"), eps)
        attn_laurel = (active + attn + laurel) / np.float32(math.sqrt(2.0))

        x = rms_norm(attn_laurel, self.v(p + "pre_feedforward_layernorm.weight"), eps)
        gate = self.linear(x, p + "mlp.gate_proj")
        if a.sparsity[i] > 0:
            cutoff = gate.mean(axis=-1, keepdims=True) + gate.std(axis=-1, keepdims=True) * np.float32(
                NormalDist().inv_cdf(a.sparsity[i]))
            gate = np.maximum(gate - cutoff, 0)
        ffw = self.linear(gelu(gate) * self.linear(x, p + "mlp.up_proj"), p + "mlp.down_proj")
        activated = attn_laurel + rms_norm(ffw, self.v(p + "post_feedforward_layernorm.weight"), eps)

        # AltUp correct, then the per-layer input into planes 1..
        coefs = self.linear(self.router(p, activated), p + "altup.correction_coefs") + np.float32(1.0)
        corrected = predictions + (activated - active)[None] * coefs.T[:, :, None]
        first = corrected[a.active]
        if a.correct_scale:
            first = first * self.v(p + "altup.correct_output_scale")
        first = gelu(self.linear(first, p + "per_layer_input_gate")) * per_layer
        first = rms_norm(self.linear(first, p + "per_layer_projection"),
                         self.v(p + "post_per_layer_input_norm.weight"), eps)
        corrected[1:] += first
        return corrected


def prompt_ids(text_config: dict) -> np.ndarray:
    """The fixed prompt: BOS, then ids drawn from a fixed seed, one of them the last id of the
    vocabulary (beyond the per-layer table in Gemma3n's, which maps it to row 0)."""
    vocab = int(text_config["vocab_size"])
    ids = np.random.default_rng(PROMPT_SEED).integers(min(3, vocab - 1), vocab, PROMPT_LENGTH)
    bos = text_config.get("bos_token_id", 2)
    if isinstance(bos, int) and 0 <= bos < vocab:
        ids[0] = bos
    ids[PROMPT_LENGTH // 2] = vocab - 1
    return ids


def check_config(directory: str | os.PathLike, manifest: dict) -> None:
    """Every record's matrix is the `[out, in]` the manifest's text config implies
    (convert/gemma3n.py), a fused record's members each theirs, as `load` checks: a manifest whose
    digest was recomputed after an edit to one side only got answers for a model that `load` and
    `verify` then refuse. One line naming the record, else None."""
    expected = expected_tensors(manifest["model"]["text_config"])
    for where, _, path, record in records(manifest):
        try:
            out, cols = Storage.of(record, where).dims(record["shape"])
        except (ManifestError, ValueError) as e:
            raise ConvertError(f"{directory}/{where}: {e}") from None
        members = fused_members(record) or [(path, out)]
        for member, rows in members:
            name = EMBED_TOKENS if member == LM_HEAD else member  # a head of its own: the embedding's shape
            want = expected.get(f"{name.removeprefix(PREFIX)}.weight")
            if want is None or (rows, cols) != tuple(want):
                implied = "no such matrix" if want is None else f"[out, in] {list(want)}"
                raise ConvertError(f"{directory}/{where}: {member} is [out, in] {[rows, cols]}, and the text config "
                                   f"implies {implied}; convert the bundle again")


def known_answers(directory: str | os.PathLike, manifest: dict) -> dict:
    """The `known_answers` section (manifests/known_answers.py) for the bundle in `directory`
    described by `manifest` (its files, projections, embeddings and text config)."""
    started = time.perf_counter()
    text_config = manifest["model"]["text_config"]
    store = StoredTensors(directory, manifest)  # first: records against the files' headers
    try:
        check_config(directory, manifest)
        forward = Forward(store, text_config)
        s = forward.arch.shapes
        ids = prompt_ids(text_config)
        positions = list(range(PROMPT_LENGTH - RECORDED_POSITIONS, PROMPT_LENGTH))
        coordinates = sorted({int(c) for c in np.linspace(0, s.hidden_size - 1, COORDINATES)})
        stages: dict[int, dict] = {}
        logits = forward(ids, positions,
                         lambda stage, planes: stages.__setitem__(
                             stage, checksum(planes, forward.arch.active, coordinates)))
        activations = store.activation_dtype()
    finally:
        store.close()
    entries = []
    for position, row in zip(positions, logits, strict=True):
        top = np.argsort(-row, kind="stable")[:TOP_K]
        entries.append({"position": position, "ids": [int(i) for i in top], "values": [_short(row[i]) for i in top]})
    short = lambda c: {k: (_short(v) if not isinstance(v, list) else [_short(x) for x in v]) for k, v in c.items()}  # noqa: E731
    return {
        "reference": {"name": "numpy-float32", "numpy": metadata.version("numpy"),
                      "seconds": round(time.perf_counter() - started, 2)},
        "prompt": [int(i) for i in ids],
        "positions": positions,
        "logits": entries,
        "coordinates": coordinates,
        "hidden": {"input": short(stages[-1]), "layers": [short(stages[i]) for i in range(s.num_hidden_layers)]},
        "tolerance": {"activations": activations, **TOLERANCES[activations],
                      **({"tf32": dict(TF32)} if activations == "float32" else {})},
    }


def _short(x) -> float:
    """A float with 9 significant digits: every float32 survives the round trip, the manifest stays readable."""
    return float(f"{float(x):.9g}")


__all__ = ["Forward", "StoredTensors", "known_answers", "prompt_ids", "dequantize", "TOLERANCES"]
