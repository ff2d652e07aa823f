"""Linear projections built from the manifest: the one place a stored layout is interpreted.

A manifest record (`projections[<module path>]`) says how the converter stored one weight, and
manifests/records.py says which tensors that means; here each record becomes the module that
multiplies by them:

- `standard`: `[out, in]` under `<module>.weight` (the Hugging Face layout), plain or quantized
  (`<module>.scales`/`.biases` beside it, with the recorded bits, group size and mode). `x @ W.T`.
- `pretransposed`: contiguous `[in, out]` under `<module>.weight_t`. `x @ Wt`, a plain matmul
  that MLX runs as `gemv_t`, which is faster for some shapes on some devices.
- the LM head: tied, it is the embedding table (`Embedding.as_linear`); pretransposed, a module,
  and then the token embedding reads its rows as the head's columns (`HeadColumns`), so the table
  is stored once either way.

A fused record (`fused: [{path, out}, ...]`, manifests/format.py FUSED_GROUPS) is one of these
over its members' rows concatenated; `build_fused` checks the members against the config, and the
model splits the output (runtime/model.py). Nothing is concatenated at load: convert did that.

Modules here hold lazy placeholders (`mx.zeros`, never evaluated) so that building a model
costs nothing; `load_weights` then puts the shard arrays in their place unchanged.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from manifests.format import EMBED_TOKENS, LM_HEAD, STANDARD, ManifestError
from manifests.records import (
    EMBEDDINGS,
    PACKED_DTYPE,
    PROJECTIONS,
    Quantization,
    Storage,
    Tensor,
    fused_members,
    head_base,
)
from runtime.quirks import rows, wrong_multirow


def _placeholders(module: nn.Module, tensors: list[Tensor]) -> None:
    """Each stored tensor (manifests/records.py) as a lazy `mx.zeros` of its shape, under its own
    name: what `load_weights` replaces with the shard's array of the same name."""
    for t in tensors:
        setattr(module, t.part, mx.zeros(t.shape, mx.uint32 if t.dtype == PACKED_DTYPE else mx.float32))


class Standard(nn.Linear):
    """`x @ W.T (+ b)` over a weight stored `[out, in]`."""

    def __init__(self, tensors: list[Tensor]):
        nn.Module.__init__(self)
        _placeholders(self, tensors)


class QuantizedStandard(nn.QuantizedLinear):
    """MLX-quantized `[out, in]` weight with its scales (and biases), as the manifest records.

    Where this device's quantized matmul gets several rows of this shape wrong (a fault of some
    MLX builds, runtime/quirks.py), those calls multiply by the dequantized weight instead."""

    def __init__(self, tensors: list[Tensor], quantized: Quantization):
        nn.Module.__init__(self)
        self.group_size, self.bits, self.mode = quantized.group_size, quantized.bits, quantized.mode
        _placeholders(self, tensors)
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        y = quantized_product(self, x)
        return y + self["bias"] if "bias" in self else y


def quantized_product(module: nn.Module, x: mx.array, span: slice | None = None) -> mx.array:
    """`x @ W.T` for the MLX-quantized `W` a module holds (`weight`, `scales`, `biases`, and its
    bits, group size and mode), or over its output rows `span` (a slice of whole packed rows: a
    view; None, the default, adds no slice to the graph); where this device's kernel gets several
    rows of this shape wrong (runtime/quirks.py), by the dequantized weight instead."""
    q = dict(group_size=module.group_size, bits=module.bits, mode=module.mode)
    weight, scales, biases = module["weight"], module["scales"], module.get("biases")
    if span is not None:
        weight, scales = weight[span], scales[span]
        biases = biases[span] if biases is not None else None
    n = rows(x)
    if n > 1 and wrong_multirow(weight.shape[-1] * 32 // module.bits, module.bits,
                                module.group_size, module.mode, str(x.dtype).rsplit(".", 1)[-1]):
        return x @ mx.dequantize(weight, scales, biases, **q).T
    if n > 1 and x.size // (x.shape[-2] * x.shape[-1]) > 1:
        # Rows spread over batch dimensions (a prefill's tokens, each `[1, h]`: runtime/model.py)
        # multiply as one matrix: MLX's CUDA kernel tiles each batch entry on its own, so 64 tokens
        # of one row each took 64 tiles of 16-64 rows with one row used (3.4x the device time of
        # the same product over `[64, h]`, measured on the H100: docs/BENCHMARKS.md).
        y = mx.quantized_matmul(x.reshape(n, x.shape[-1]), weight, scales, biases, transpose=True, **q)
        return y.reshape(*x.shape[:-1], y.shape[-1])
    return mx.quantized_matmul(x, weight, scales, biases, transpose=True, **q)


def quantized_parts(module: nn.Module, x: mx.array, widths: list[int], wanted: list[bool]) -> list[mx.array | None]:
    """`x @ W.T (+ b)` of a quantized fused module, cut into consecutive output `widths`, each
    part computed only where `wanted` (None otherwise): one product per part, over its rows of the
    packed weight, scales and biases (slices of whole rows: views of the same buffers, the same
    numbers as one product then a split). For several rows (a prefill), where MLX's CUDA build
    multiplies with its tiled kernel only if the output width is a multiple of 128 and with a
    much slower one otherwise, and a fused width need not be one where its members' are
    (LAuReL's 64 outputs beside q/k/v: 3136 wide in E2B; docs/CUDA_QMM_K64.md)."""
    parts, start = [], 0
    for width, want in zip(widths, wanted, strict=True):
        span = slice(start, start + width)
        y = quantized_product(module, x, span) if want else None
        parts.append(y + module["bias"][span] if y is not None and "bias" in module else y)
        start += width
    return parts


class Pretransposed(nn.Module):
    """`x @ Wt (+ b)` over a weight stored contiguous `[in, out]` under `weight_t`."""

    def __init__(self, tensors: list[Tensor]):
        super().__init__()
        _placeholders(self, tensors)

    def __call__(self, x: mx.array) -> mx.array:
        y = x @ self.weight_t
        if "bias" in self:
            y = y + self.bias
        return y

    def _extra_repr(self) -> str:
        i, o = self.weight_t.shape
        return f"input_dims={i}, output_dims={o}, bias={'bias' in self}"


def _checked(path: str, record: dict, input_dims: int, output_dims: int) -> tuple[Storage, list[Tensor]]:
    """The record's storage and the tensors it stores, once its key, shape and bias are where the
    config says an `[out, in]` projection at `path` keeps them: no renaming at load, no guess."""
    where = f"manifest.yaml: projections.{path}"
    storage = Storage.of(record, where)
    layout = storage.layout
    key = PROJECTIONS.weight_key(path, layout)
    if record["key"] != key:
        raise ManifestError(f"{where}: key {record['key']!r} is not where a {layout} projection at {path} "
                            f"lives ({key!r})")
    tensors = PROJECTIONS.expected(path, storage, output_dims, input_dims)
    want = list(tensors[0].shape)
    if list(record["shape"]) != want:
        raise ManifestError(
            f"{where}: {layout} shape {list(record['shape'])} disagrees with "
            f"the model config, which implies {want} for in={input_dims}, out={output_dims}"
        )
    if storage.bias and record["bias"] != tensors[-1].key:
        raise ManifestError(f"{where}: bias {record['bias']!r} is not where the bias of {path} "
                            f"lives ({tensors[-1].key!r})")
    return storage, tensors


def build_projection(path: str, record: dict | None, input_dims: int, output_dims: int) -> nn.Module:
    """The module for one manifest record, checked against the dimensions the config implies.

    The record decides the class; the config only supplies `in`/`out`, so a record whose
    shape disagrees with the config is an error naming both, never a silent guess.
    """
    if record is None:
        raise ManifestError(f"manifest.yaml: no projection entry for {path}")
    return _module(*_checked(path, record, input_dims, output_dims))


def _module(storage: Storage, tensors: list[Tensor]) -> nn.Module:
    if storage.quantized:
        return QuantizedStandard(tensors, storage.quantized)
    return Standard(tensors) if storage.layout == STANDARD else Pretransposed(tensors)


def build_head(record: dict | None, input_dims: int, output_dims: int) -> nn.Module | None:
    """The LM head's module, or None where it is tied: its record then names the embedding
    table's tensors, which the model multiplies by through `Embedding.as_linear`."""
    if record is None:
        raise ManifestError(f"manifest.yaml: no projection entry for {LM_HEAD}")
    storage, tensors = _checked(LM_HEAD, record, input_dims, output_dims)
    return None if head_base(storage.layout) == EMBED_TOKENS else _module(storage, tensors)


def build_fused(path: str, record: dict, input_dims: int, members: list[tuple[str, int]]) -> nn.Module:
    """The module for a fused record whose members the config says are `members` ((path, out)
    in row order): one projection over their summed output, built like any other."""
    recorded = fused_members(record)
    if recorded != list(members):
        raise ManifestError(
            f"manifest.yaml: projections.{path}: fused members {[f'{p} ({o})' for p, o in recorded]} disagree "
            f"with the model config, which implies {[f'{p} ({o})' for p, o in members]}"
        )
    return build_projection(path, record, input_dims, sum(out for _, out in members))


def projection_over(layout: str, weight: mx.array) -> nn.Module:
    """The float projection a bundle of `layout` builds, over `weight` as that layout stores it:
    how `runtime calibrate` times each layout."""
    storage = Storage(layout)
    module = _module(storage, storage.tensors("", *storage.dims(weight.shape)))
    setattr(module, storage.weight_part, weight)
    return module


def transposed_view(module: nn.Module) -> mx.array | None:
    """`W.T` for a module whose float weight is stored `[out, in]` (a standard projection, an
    embedding table as the tied head): the `[in, out]` operand of `x @ W.T`, as a view (strides
    over the same buffer, no copy). None where the stored weight already is `[in, out]`
    (pretransposed) or is not a plain matrix (quantized)."""
    return module.weight.T if type(module) in (Standard, Embedding) else None


def row_major_weight(module: nn.Module) -> mx.array:
    """A float projection's weight as contiguous `[out, in]`: the stored one (standard), or a copy
    of the transposed stored one (pretransposed); for kernels that read rows of W, where the
    matrix is small (the AltUp router and coefficients: runtime/cuda_blocks.py)."""
    return mx.contiguous(module.weight_t.T) if type(module) is Pretransposed else module.weight


class Embedding(nn.Embedding):
    """A lookup table `[num, dims]`; `as_linear` is the tied head's `x @ E.T`."""

    def __init__(self, tensors: list[Tensor]):
        nn.Module.__init__(self)
        _placeholders(self, tensors)


class QuantizedEmbedding(nn.QuantizedEmbedding):
    def __init__(self, tensors: list[Tensor], quantized: Quantization, num_embeddings: int, dims: int):
        nn.Module.__init__(self)
        self.group_size, self.bits, self.mode = quantized.group_size, quantized.bits, quantized.mode
        self.num_embeddings, self.dims = num_embeddings, dims
        _placeholders(self, tensors)
        self.freeze()

    def as_linear(self, x: mx.array) -> mx.array:
        """The tied head's `x @ E.T` over the quantized table (see `quantized_product`)."""
        return quantized_product(self, x)


class HeadColumns:
    """The token embedding of a bundle whose LM head is pretransposed: `table(ids)` is the ids'
    columns of the head's `[hidden, vocab]` weight, as rows. No parameter of its own (the head
    module holds the one tensor), so not a module; `Model` points it at the head it reads."""

    def __init__(self):
        self.head: Pretransposed | None = None

    def __call__(self, ids: mx.array) -> mx.array:
        return mx.moveaxis(mx.take(self.head.weight_t, ids, axis=1), 0, -1)


def build_embedding(path: str, record: dict | None, num_embeddings: int, dims: int, mapped=None):
    """The module for the embedding table at `path`; for a table placed `mapped`, the
    `MappedTable` the loader opened (`mapped`; runtime/mapped.py); for one read from the
    pretransposed head (manifests/records.py), a `HeadColumns`. Each record is checked against
    the config the same way."""
    section = "mapped_embeddings" if mapped is not None else "embeddings"
    record = mapped.record if mapped is not None else record
    if record is None:
        raise ManifestError(f"manifest.yaml: no embeddings entry for {path}")
    where = f"manifest.yaml: {section}.{path}"
    storage = Storage.of(record, where)
    key = EMBEDDINGS.weight_key(path, storage.layout)
    if record["key"] != key:
        raise ManifestError(f"{where}: key {record['key']!r} is not {key!r}")
    tensors = EMBEDDINGS.expected(path, storage, num_embeddings, dims)
    if list(record["shape"]) != list(tensors[0].shape):
        raise ManifestError(
            f"{where}: shape {list(record['shape'])} disagrees with the "
            f"model config, which implies {list(tensors[0].shape)}"
        )
    if mapped is not None:
        return mapped
    if storage.layout != STANDARD:  # read from the pretransposed head's tensor, checked as the head's
        return HeadColumns()
    if storage.quantized:
        return QuantizedEmbedding(tensors, storage.quantized, num_embeddings, dims)
    return Embedding(tensors)
