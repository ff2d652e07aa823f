"""Linear projections built from the manifest: the one place a stored layout is interpreted.

A manifest record (`projections[<module path>]`) says how the converter stored one weight:

- `standard`: `[out, in]` under `<module>.weight` (the Hugging Face layout), plain or quantized
  (`<module>.scales`/`.biases` beside it, with the recorded bits, group size and mode). `x @ W.T`.
- `pretransposed`: contiguous `[in, out]` under `<module>.weight_t`. `x @ Wt`, a plain matmul
  that MLX runs as `gemv_t`, which is faster for some shapes on some devices.

A fused record (`fused: [{path, out}, ...]`, manifests/format.py FUSED_GROUPS) is one of these
over its members' rows concatenated; `build_fused` checks the members against the config, and the
model splits the output (runtime/model.py). Nothing is concatenated at load: convert did that.

Modules here hold lazy placeholders (`mx.zeros`, never evaluated) so that building a model
costs nothing; `load_weights` then puts the shard arrays in their place unchanged.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from manifests.format import PRETRANSPOSED, PRETRANSPOSED_SUFFIX, STANDARD, ManifestError


class Standard(nn.Linear):
    """`x @ W.T (+ b)` over a weight stored `[out, in]`."""

    def __init__(self, input_dims: int, output_dims: int, bias: bool = False):
        nn.Module.__init__(self)
        self.weight = mx.zeros((output_dims, input_dims))
        if bias:
            self.bias = mx.zeros((output_dims,))


def _quantized_placeholders(module: nn.Module, rows: int, cols: int, bits: int, group_size: int, mode: str):
    """The parameters mx.quantize makes for a [rows, cols] matrix, as shapes only (every mode:
    packed uint32 weight, one scale per group; per-group biases for `affine` alone)."""
    if (cols * bits) % 32 or cols % group_size:
        raise ManifestError(f"quantized {rows}x{cols} with bits={bits}, group_size={group_size} does not pack")
    module.weight = mx.zeros((rows, cols * bits // 32), mx.uint32)
    module.scales = mx.zeros((rows, cols // group_size))
    if mode == "affine":
        module.biases = mx.zeros((rows, cols // group_size))


class QuantizedStandard(nn.QuantizedLinear):
    """MLX-quantized `[out, in]` weight with its scales (and biases), as the manifest records."""

    def __init__(self, input_dims: int, output_dims: int, bias: bool, bits: int, group_size: int, mode: str):
        nn.Module.__init__(self)
        self.group_size, self.bits, self.mode = group_size, bits, mode
        _quantized_placeholders(self, output_dims, input_dims, bits, group_size, mode)
        if bias:
            self.bias = mx.zeros((output_dims,))
        self.freeze()


class Pretransposed(nn.Module):
    """`x @ Wt (+ b)` over a weight stored contiguous `[in, out]` under `weight_t`."""

    def __init__(self, input_dims: int, output_dims: int, bias: bool = False):
        super().__init__()
        self.weight_t = mx.zeros((input_dims, output_dims))
        if bias:
            self.bias = mx.zeros((output_dims,))

    def __call__(self, x: mx.array) -> mx.array:
        y = x @ self.weight_t
        if "bias" in self:
            y = y + self.bias
        return y

    def _extra_repr(self) -> str:
        i, o = self.weight_t.shape
        return f"input_dims={i}, output_dims={o}, bias={'bias' in self}"


def expected_key(path: str, record: dict) -> str:
    """The tensor key a record must point at for the module at `path`: no renaming at load."""
    suffix = PRETRANSPOSED_SUFFIX if record["layout"] == PRETRANSPOSED else ".weight"
    return path + suffix


def build_projection(path: str, record: dict | None, input_dims: int, output_dims: int) -> nn.Module:
    """The module for one manifest record, checked against the dimensions the config implies.

    The record decides the class; the config only supplies `in`/`out`, so a record whose
    shape disagrees with the config is an error naming both, never a silent guess.
    """
    if record is None:
        raise ManifestError(f"manifest.yaml: no projection entry for {path}")
    layout = record["layout"]
    key = expected_key(path, record)
    if record["key"] != key:
        raise ManifestError(
            f"manifest.yaml: projections.{path}: key {record['key']!r} is not where a {layout} "
            f"projection at {path} lives ({key!r})"
        )
    has_bias = bool(record.get("bias"))
    quantized = record.get("quantized")
    if quantized:
        if layout != STANDARD:
            raise ManifestError(f"manifest.yaml: projections.{path}: a quantized projection must be standard")
        module = QuantizedStandard(input_dims, output_dims, has_bias, int(quantized["bits"]),
                                   int(quantized["group_size"]), str(quantized["mode"]))
        want = list(module.weight.shape)
    else:
        want = [output_dims, input_dims] if layout == STANDARD else [input_dims, output_dims]
    if list(record["shape"]) != want:
        raise ManifestError(
            f"manifest.yaml: projections.{path}: {layout} shape {list(record['shape'])} disagrees with "
            f"the model config, which implies {want} for in={input_dims}, out={output_dims}"
        )
    if quantized:
        return module
    if layout == STANDARD:
        return Standard(input_dims, output_dims, has_bias)
    if layout == PRETRANSPOSED:
        return Pretransposed(input_dims, output_dims, has_bias)
    raise ManifestError(f"manifest.yaml: projections.{path}: unknown layout {layout!r}")


def build_fused(path: str, record: dict, input_dims: int, members: list[tuple[str, int]]) -> nn.Module:
    """The module for a fused record whose members the config says are `members` ((path, out)
    in row order): one projection over their summed output, built like any other."""
    recorded = [(m["path"], int(m["out"])) for m in record.get("fused") or []]
    if recorded != list(members):
        raise ManifestError(
            f"manifest.yaml: projections.{path}: fused members {[f'{p} ({o})' for p, o in recorded]} disagree "
            f"with the model config, which implies {[f'{p} ({o})' for p, o in members]}"
        )
    return build_projection(path, record, input_dims, sum(out for _, out in members))


class Embedding(nn.Embedding):
    """A lookup table `[num, dims]`; `as_linear` is the tied head's `x @ E.T`."""

    def __init__(self, num_embeddings: int, dims: int):
        nn.Module.__init__(self)
        self.weight = mx.zeros((num_embeddings, dims))


class QuantizedEmbedding(nn.QuantizedEmbedding):
    def __init__(self, num_embeddings: int, dims: int, bits: int, group_size: int, mode: str):
        nn.Module.__init__(self)
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.num_embeddings, self.dims = num_embeddings, dims
        _quantized_placeholders(self, num_embeddings, dims, bits, group_size, mode)
        self.freeze()


def build_embedding(path: str, record: dict | None, num_embeddings: int, dims: int) -> nn.Module:
    if record is None:
        raise ManifestError(f"manifest.yaml: no embeddings entry for {path}")
    if record["key"] != path + ".weight":
        raise ManifestError(
            f"manifest.yaml: embeddings.{path}: key {record['key']!r} is not {path + '.weight'!r}"
        )
    quantized = record.get("quantized")
    if quantized:
        module = QuantizedEmbedding(num_embeddings, dims, int(quantized["bits"]),
                                    int(quantized["group_size"]), str(quantized["mode"]))
    else:
        module = Embedding(num_embeddings, dims)
    if list(record["shape"]) != list(module.weight.shape):
        raise ManifestError(
            f"manifest.yaml: embeddings.{path}: shape {list(record['shape'])} disagrees with the "
            f"model config, which implies {list(module.weight.shape)}"
        )
    return module
