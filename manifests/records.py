"""What a manifest record stores: keys, shapes and dtypes, written once for writer and readers.

A record (`projections.<path>`, `embeddings.<path>` or `mapped_embeddings.<path>` in
manifest.yaml) stands for one matrix the model multiplies by (`[out, in]`, the Hugging Face way
round) or looks rows up in (`[num, dims]`), and says how the converter stored it. The tensors
that means:

    record                     part      key              shape                   dtype
    standard                   weight    <base>.weight    [out, in]               the record's
    pretransposed              weight_t  <base>.weight_t  [in, out]               the record's
    quantized (standard only)  weight    <base>.weight    [out, in * bits / 32]   uint32
                               scales    <base>.scales    [out, in / group_size]  not recorded (1)
                               biases    <base>.biases    [out, in / group_size]  not recorded (1)
    with a bias                bias      <base>.bias      [out]                   not recorded
    embedding                  as a standard projection, plain or quantized: out = num, in = dims

(1) In `affine` mode the float dtype the weight was quantized from. Only `affine` stores biases;
mx.quantize's other modes make a weight and scales alone.

`<base>` is the record's own path, except where the LM head and the token embedding share one
table: tied (standard), the head reads the embedding table's tensors
(`model.language_model.embed_tokens.*`); pretransposed, the head stores `lm_head.weight_t`, and
an embedding record with `layout: pretransposed` reads its rows as columns of that same tensor
(so the table is stored once either way). A fused record (`fused: [{path, out}, ...]`) is any of
these over its members' rows concatenated: out is the sum of the members' outs.

Where the tensors are: a record of `projections` or `embeddings` in the bundle's shards (its
index, or its one shard); a record of `mapped_embeddings` (the per-layer embedding table placed
`mapped`, manifests/format.py) in the file its `file` names, a safetensors file holding that
record's tensors alone, which the runtime memory-maps instead of loading (`Kind.file`).

Each tensor's `part` is also its MLX parameter name in the module built for the record, so the
runtime's modules take the bundle's arrays by name. Everything that writes a bundle (convert's
planning, fusion and quantization) and everything that reads one (the runtime's modules, load's
and verify's checks, the hub's model card) asks this module instead of re-deriving the rule;
a reader of stored tensors walks `records(manifest)` and asks each record's kind for its
tensors (`stored`) and their file (`file`).

A new kind of record is a new manifest section: a `Kind` in KINDS (a subclass where its records
store something other than one matrix in the shards: `stored` and `file` say what and where),
its schema in manifest.schema.yaml, and the runtime module built for it; `records` walks every
kind, so load's and verify's checks cover it at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from manifests.format import (
    EMBED_TOKENS,
    LM_HEAD,
    MANIFEST_NAME,
    PRETRANSPOSED,
    PRETRANSPOSED_SUFFIX,
    STANDARD,
    ManifestError,
)

# A tensor's part: its MLX parameter name in the module, and the last part of its key.
WEIGHT, WEIGHT_T, SCALES, BIASES, BIAS = "weight", PRETRANSPOSED_SUFFIX[1:], "scales", "biases", "bias"
# What a quantized weight is packed into (mx.quantize: 32 / bits values per element).
PACKED_DTYPE = "uint32"


@dataclass(frozen=True)
class Quantization:
    """MLX quantization of a matrix along its rows (the record's `quantized: {bits, group_size,
    mode}`): `mx.quantize` packs each row's values `32 / bits` to a uint32 and keeps one scale
    (and, in `affine` mode, one bias) per `group_size` consecutive values of a row."""

    bits: int
    group_size: int
    mode: str = "affine"

    @classmethod
    def of(cls, quantized: dict | None) -> Quantization | None:
        """The record's `quantized` entry (None: not quantized)."""
        if not quantized:
            return None
        return cls(int(quantized["bits"]), int(quantized["group_size"]), str(quantized["mode"]))

    @property
    def record(self) -> dict:
        """What the manifest records for it."""
        return {"bits": self.bits, "group_size": self.group_size, "mode": self.mode}

    def describe(self) -> str:
        return f"{self.bits}-bit {self.mode}, group size {self.group_size}"

    @property
    def parts(self) -> tuple[str, ...]:
        """The tensors stored beside the packed weight, in the order mx.quantize returns them."""
        return (SCALES, BIASES) if self.mode == "affine" else (SCALES,)

    def packs(self, cols: int) -> bool:
        """Whether rows of `cols` values pack into whole uint32s and whole groups."""
        return cols * self.bits % 32 == 0 and cols % self.group_size == 0

    def packed_cols(self, cols: int) -> int:
        return cols * self.bits // 32

    def groups(self, cols: int) -> int:
        return cols // self.group_size

    def cols_of_packed(self, packed: int) -> int:
        """The values per row of a packed weight `packed` uint32s wide."""
        return packed * 32 // self.bits


@dataclass(frozen=True)
class Tensor:
    """One stored tensor of a record."""

    part: str  # weight, weight_t, scales, biases or bias: the MLX parameter name
    key: str
    shape: tuple[int, ...]
    dtype: str | None  # MLX/manifest dtype name; None where the record does not say


@dataclass(frozen=True)
class Storage:
    """How one matrix is stored: its layout, its quantization, whether it has a bias."""

    layout: str = STANDARD
    quantized: Quantization | None = None
    bias: bool = False

    @classmethod
    def of(cls, record: dict, where: str = MANIFEST_NAME) -> Storage:
        """A record's storage; a combination no writer makes is a ManifestError naming `where`."""
        # Embedding records have no layout (rows are looked up), but the one read from the head's.
        layout = record.get("layout", STANDARD)
        if layout not in (STANDARD, PRETRANSPOSED):
            raise ManifestError(f"{where}: unknown layout {layout!r}")
        quantized = Quantization.of(record.get("quantized"))
        if quantized and layout != STANDARD:
            raise ManifestError(f"{where}: a quantized projection must be standard")
        return cls(layout, quantized, bool(record.get("bias")))

    @property
    def weight_part(self) -> str:
        return WEIGHT_T if self.layout == PRETRANSPOSED else WEIGHT

    def weight_shape(self, out_dims: int, in_dims: int) -> tuple[int, int]:
        """The stored weight's shape for a matrix `[out, in]`."""
        if self.quantized:
            return out_dims, self.quantized.packed_cols(in_dims)
        return (in_dims, out_dims) if self.layout == PRETRANSPOSED else (out_dims, in_dims)

    def dims(self, weight_shape) -> tuple[int, int]:
        """`(out, in)` of the matrix whose stored weight has `weight_shape` (weight_shape's inverse)."""
        if len(weight_shape) != 2:
            raise ValueError(f"shape {list(weight_shape)} is not a matrix")
        rows, cols = weight_shape
        if self.quantized:
            return rows, self.quantized.cols_of_packed(cols)
        return (cols, rows) if self.layout == PRETRANSPOSED else (rows, cols)

    def tensors(self, base: str, out_dims: int, in_dims: int, dtype: str | None = None) -> list[Tensor]:
        """Every tensor stored for an `[out, in]` matrix under `base`, the weight first. `dtype`: the
        float dtype of its values (an affine-quantized one's scales and biases have it too)."""
        q = self.quantized
        if q is None:
            tensors = [Tensor(self.weight_part, f"{base}.{self.weight_part}", self.weight_shape(out_dims, in_dims),
                              dtype)]
        else:
            if not q.packs(in_dims):
                raise ManifestError(f"quantized {out_dims}x{in_dims} with bits={q.bits}, group_size={q.group_size} "
                                    "does not pack")
            tensors = [Tensor(WEIGHT, f"{base}.{WEIGHT}", self.weight_shape(out_dims, in_dims), PACKED_DTYPE)]
            scale_dtype = dtype if q.mode == "affine" else None
            tensors += [Tensor(part, f"{base}.{part}", (out_dims, q.groups(in_dims)), scale_dtype) for part in q.parts]
        if self.bias:
            tensors.append(Tensor(BIAS, f"{base}.{BIAS}", (out_dims,), dtype))
        return tensors


def head_base(layout: str) -> str:
    """Where the LM head's tensors are: the embedding table's (tied, standard), or `lm_head`."""
    return EMBED_TOKENS if layout == STANDARD else LM_HEAD


@dataclass(frozen=True)
class Kind:
    """A section of the manifest whose records each stand for stored tensors."""

    section: str
    laid_out: bool  # records carry a `layout` (projections) or are standard (embeddings; but see base)

    def base(self, path: str, layout: str = STANDARD) -> str:
        """The key every tensor of the record at `path` starts with."""
        if self.laid_out and path == LM_HEAD:
            return head_base(layout)
        if path == EMBED_TOKENS and layout == PRETRANSPOSED:
            return LM_HEAD  # the token embedding read from the pretransposed head: one table, stored once
        return path

    def file(self, record: dict) -> str | None:
        """The bundle file holding the record's tensors where the record names one; None where
        they are in the shards."""
        return None

    def weight_key(self, path: str, layout: str = STANDARD) -> str:
        """The key a record at `path` names (its `key`): no renaming at load."""
        return f"{self.base(path, layout)}.{Storage(layout).weight_part}"

    def expected(self, path: str, storage: Storage, out_dims: int, in_dims: int,
                 dtype: str | None = None) -> list[Tensor]:
        """The tensors a record at `path` stores for an `[out, in]` matrix (dims from the config)."""
        return storage.tensors(self.base(path, storage.layout), out_dims, in_dims, dtype)

    def stored(self, record: dict, where: str = MANIFEST_NAME) -> list[Tensor]:
        """The tensors a record says are stored, from the record alone, the weight first (its
        `key`, `shape` and `dtype` as recorded; the others follow from them)."""
        storage = Storage.of(record, where)
        try:
            tensors = storage.tensors(record["key"].rpartition(".")[0], *storage.dims(record["shape"]))
        except ValueError as e:  # ManifestError (a ValueError): does not pack; else not a matrix
            raise ManifestError(f"{where}: {e}") from None
        return [Tensor(tensors[0].part, record["key"], tuple(record["shape"]), record["dtype"]), *tensors[1:]]


@dataclass(frozen=True)
class MappedKind(Kind):
    """Embedding tables placed `mapped`: stored like any embedding (plain or quantized rows), but
    in a safetensors file of their own (`file`), which the runtime memory-maps read-only and
    gathers rows from on the host instead of loading it."""

    def file(self, record: dict) -> str | None:
        return record["file"]


PROJECTIONS = Kind("projections", laid_out=True)
EMBEDDINGS = Kind("embeddings", laid_out=False)
MAPPED_EMBEDDINGS = MappedKind("mapped_embeddings", laid_out=False)
KINDS = {kind.section: kind for kind in (PROJECTIONS, EMBEDDINGS, MAPPED_EMBEDDINGS)}


def records(manifest: dict) -> Iterator[tuple[str, Kind, str, dict]]:
    """(where, kind, path, record) for every record of the manifest that stands for stored
    tensors; `where` names the record for one-line messages."""
    for kind in KINDS.values():  # a section added later is absent from older manifests
        for path, record in (manifest.get(kind.section) or {}).items():
            yield f"{MANIFEST_NAME}: {kind.section}.{path}", kind, path, record


def mapped_files(manifest: dict) -> list[str]:
    """The files of the bundle that records name as their own (memory-mapped, not shards)."""
    return sorted({f for _, kind, _, record in records(manifest) if (f := kind.file(record)) is not None})


UNREAD = "unread"


def unread(manifest: dict) -> Iterator[tuple[str, str, dict]]:
    """(where, key, entry) for every tensor the bundle stores for another reader and this runtime
    never reads (the manifest's `unread` section: `{source_key, shape, dtype, reason}` by key; the
    K/V of KV-shared layers, which mlx-lm's loader wants): load and verify check each is stored
    as recorded, and load leaves it out of the model."""
    for key, entry in (manifest.get(UNREAD) or {}).items():
        yield f"{MANIFEST_NAME}: {UNREAD}.{key}", key, entry


def fused_members(record: dict) -> list[tuple[str, int]]:
    """(path, out) of a fused record's members in row order; [] for a record that is not fused."""
    return [(m["path"], int(m["out"])) for m in record.get("fused") or []]


__all__ = ["BIAS", "BIASES", "EMBEDDINGS", "KINDS", "Kind", "MAPPED_EMBEDDINGS", "MappedKind", "PACKED_DTYPE",
           "PROJECTIONS", "Quantization", "SCALES", "Storage", "Tensor", "UNREAD", "WEIGHT", "WEIGHT_T",
           "fused_members", "head_base", "mapped_files", "records", "unread"]
