"""The plan: every bundle tensor, where its bytes come from, and what happens to them on the way.

Planning is pure (a `Source` of parsed headers and config, a target profile, options in; a `Plan`
out) and reads no tensor data, so `--dry-run` prints exactly what a conversion would do, and
the writer executes the plan without making decisions of its own.

Each bundle tensor is made from one source tensor by a `transform`: `copy` (bytes as they are),
`cast` (to another float dtype) or `transpose` (cast if asked, then written [in, out]); `zeros`
makes a tensor a source lacks that mlx-lm's loader wants and nothing reads (`kept_for_mlx_lm`). With
`--quantize`, `quantize` makes three bundle tensors (packed weight, scales, biases) of one source
tensor (convert/quantize.py). A fused projection (the profile's `fuse`, convert/fusion.py) is
made of several source tensors stacked along their rows (`Item.members`), by the same transforms.

Two choices about where a tensor goes rather than how it is made: the per-layer embedding table
placed `mapped` (the profile's `per_layer_embeddings`, or `--ple`) is written to a file of its
own (manifests/format.py MAPPED_FILE) and recorded under `mapped_embeddings`, not in a shard;
and where the LM head is stored pretransposed, the token embedding is not stored a second time:
its record reads its rows as columns of `lm_head.weight_t` (manifests/records.py).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import resource
import sys
from collections import Counter
from dataclasses import dataclass, field

from convert.architectures import architecture, architecture_of
from convert.dtypes import CODE_FOR_OPTION, FLOATS
from convert.errors import ConvertError
from convert.fusion import fuse as fuse_groups
from convert.items import Item
from convert.overlap import DEPTH, HOT_CHUNK
from convert.quantize import QuantSpec, not_quantized_because, spill_bytes
from convert.quantize import buffers as quant_buffers
from convert.safetensors_io import DTYPE_CODES, DTYPE_NAMES, ITEMSIZE, TensorInfo, build_header
from convert.shardfile import DEPTH as STAGE_DEPTH
from convert.shardfile import STAGE
from convert.source import NAMING_PREFIXES, TOWERS, Source
from convert.transpose import TILE_ROWS
from manifests.config import check_quantization
from manifests.format import (
    EMBED_TOKENS,
    EMBED_TOKENS_PER_LAYER,
    FUSE_ALL,
    INDEX_NAME,
    LM_HEAD,
    MAPPED,
    MAPPED_FILE,
    NAMINGS,
    PLACEMENTS,
    PREFIX,
    PRETRANSPOSED,
    STANDARD,
    ManifestError,
)
from manifests.gemma3n import ARCHITECTURE as GEMMA3N
from manifests.profiles import TargetProfile
from manifests.records import (
    BIASES,
    EMBEDDINGS,
    MAPPED_EMBEDDINGS,
    PROJECTIONS,
    SCALES,
    WEIGHT,
    Kind,
    Quantization,
    Storage,
)

DTYPE_OPTIONS = ("keep", "bfloat16", "float16", "float32")

# Bytes read per block (and per cast): big enough that the Python loop around each costs nothing,
# small beside 2 GB. Two of each kind are held (convert/overlap.py), so 32 MB keeps the working
# set of a copy or cast where one 64 MB block had it.
READ_BLOCK = 32 * 1024 * 1024
# Output band of a transposed tensor held in memory at once (in source dtype). A tensor whose
# transpose is larger is written in several bands, each a full pass over the source rows.
BAND_BYTES = 512 * 1024 * 1024
# The buffer that reads bytes only to hash them (gaps between tensors, dropped tensors), one
# cache-sized piece at a time (convert/overlap.py).
HASH_SCRATCH = HOT_CHUNK
# The staging buffers of the shard being written with O_DIRECT (convert/shardfile.py).
SHARD_STAGING = STAGE * STAGE_DEPTH
# numpy's temporaries inside a cast (a few sub-chunks of 2^18 elements) and Python's own objects.
CAST_SLACK = 8 * 1024 * 1024

DEFAULT_MAX_SHARD_SIZE = 5_000_000_000  # what the hub's save_pretrained uses ("5GB")

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000 (decimal units, as the hub), '512MiB' binary, a bare number bytes."""
    if isinstance(text, int):
        value = text
    else:
        import re

        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise ConvertError(f"--max-shard-size {text!r}: use a size like 500MB, 2GB or 5GB")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise ConvertError(f"--max-shard-size {text!r}: must be positive")
    return value


def human(n: int) -> str:
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


@dataclass
class Shard:
    name: str
    items: list[Item]
    header: bytes
    mapped: bool = False  # a mapped table's own file (MAPPED_FILE), not a shard the index lists

    @property
    def nbytes(self) -> int:
        return len(self.header) + sum(i.nbytes for i in self.items)


@dataclass
class Plan:
    source: Source
    profile: TargetProfile
    device: dict | None
    dtype: str
    shards: list[Shard]
    projections: dict[str, dict]
    embeddings: dict[str, dict]
    dropped: list[dict]
    tied: bool
    read_block: int = READ_BLOCK
    band_bytes: int = BAND_BYTES
    baseline_rss: int = 0
    roles: Counter = field(default_factory=Counter)
    quantize: QuantSpec | None = None
    unquantized: Counter = field(default_factory=Counter)  # --quantize: reason -> tensors left float
    fuse: tuple[str, ...] = ()  # the groups asked for (profile's `fuse`, or --fuse/--no-fuse)
    fused: Counter = field(default_factory=Counter)  # group -> layers fused
    unfused: Counter = field(default_factory=Counter)  # "group: reason" -> layers left unfused
    architecture: str = GEMMA3N  # the manifest's model.architecture (convert/architectures.py)
    # Tensors stored for mlx-lm's loader that this runtime never reads (manifest `unread`), and the
    # bundle's config.json where it must differ from the source's for mlx-lm (None: copied as is).
    unread: dict[str, dict] = field(default_factory=dict)
    config_json: bytes | None = None
    mlx_lm: bool = False  # written for mlx-lm's loader too
    mapped: dict[str, dict] = field(default_factory=dict)  # records of tables placed `mapped`
    placement: str = "resident"  # of the per-layer embedding table (manifests/format.py PLACEMENTS)

    @property
    def items(self) -> list[Item]:
        return [i for s in self.shards for i in s.items]

    @property
    def model_shards(self) -> list[Shard]:
        """The shards proper (what the index lists), without the mapped table's own file."""
        return [s for s in self.shards if not s.mapped]

    @property
    def index_bytes(self) -> int:
        return len(index_text(self)) if len(self.model_shards) > 1 else 0

    @property
    def bytes_out(self) -> int:
        copied = sum(self.source.path(n).stat().st_size for n in self.source.copied_files)
        return sum(s.nbytes for s in self.shards) + self.index_bytes + copied

    @property
    def records(self) -> int:
        """The manifest's projection and embedding records, mapped ones too (`runtime verify` counts the same)."""
        return len(self.projections) + len(self.embeddings) + len(self.mapped)

    @property
    def tensor_bytes_out(self) -> int:
        return sum(i.nbytes for i in self.items)

    @property
    def disk_needed(self) -> int:
        # The manifest is small but not tiny (every projection and file is listed): allow 1 MB + 1 kB
        # per tensor for it and for file system rounding.
        return self.bytes_out + 1_000_000 + 1000 * len(self.items) + spill_bytes(self.items)

    @property
    def predicted_peak(self) -> int:
        """A bound on the run's peak resident memory: what the process held when it planned, the
        hash scratch, the shard's staging buffers and slack, the writer's buffers at their largest
        (each is kept from item to item and only grows, so their largest sizes add up), and the most
        MLX holds for one item."""
        asked: dict[str, list[int]] = {}
        mlx = 0
        for item in self.items:
            for kind, sizes in buffer_sizes(item, self.read_block, self.band_bytes).items():
                if kind == "mlx":
                    mlx = max([mlx, *sizes])
                else:
                    asked.setdefault(kind, []).extend(sizes)
        # A kind the writer rotates `DEPTH` buffers of ends with each at the largest size it got:
        # at most the `DEPTH` largest asked for; any other kind is one buffer.
        kept = sum(sum(sorted(sizes, reverse=True)[:DEPTH if kind in RINGS else 1]) for kind, sizes in asked.items())
        return self.baseline_rss + HASH_SCRATCH + SHARD_STAGING + CAST_SLACK + kept + mlx

    def summary(self) -> str:
        src = self.source
        lines = [
            f"source   {src.display} ({src.kind}, {len(src.headers)} safetensors "
            f"file{'s' if len(src.headers) != 1 else ''}, {len(src.tensors)} tensors)",
            f"naming   {NAMINGS[src.naming]}",
            f"target   {self.profile.name} (profile sha256 {self.profile.sha256[:12]})"
            + (f", device {self.device.get('architecture')}" if self.device else ""),
            f"dtype    {self.dtype}",
            f"tensors  {len(self.items)} written ({self.records} manifest records), {len(self.dropped)} dropped",
        ]
        for reason, n in sorted(Counter(u["reason"] for u in self.unread.values()).items()):
            lines.append(f"  kept    {n:5d}  {reason}")
        reasons = Counter(d["reason"] for d in self.dropped)
        for reason, n in sorted(reasons.items()):
            lines.append(f"  dropped {n:5d}  {reason}")
        lines.append(f"{'role':28s} {STANDARD:>9s} {PRETRANSPOSED:>14s}")
        for role in sorted({r for r, _ in self.roles}):
            lines.append(f"{role:28s} {self.roles[role, STANDARD]:9d} {self.roles[role, PRETRANSPOSED]:14d}")
        if self.quantize:
            done = sum(1 for i in self.items if i.part == WEIGHT)
            lines.append(f"quantize {self.quantize.describe()}: {done} tensors")
            for reason, n in sorted(self.unquantized.items()):
                lines.append(f"  float   {n:5d}  {reason}")
        if self.profile.mlx_lm:
            lines.append("mlx-lm   " + ("loads it too (mlx_lm.load)" if self.mlx_lm else
                                        "cannot load it: the per-layer table mapped (--ple mapped)" if self.mapped
                                        else "cannot load it: fused projections (--fuse)"))
        if self.fuse:
            lines.append("fuse     " + ", ".join(f"{g} {self.fused[g]} layers" for g in self.fuse))
            for reason, n in sorted(self.unfused.items()):
                lines.append(f"  unfused {n:5d}  {reason}")
        lines.append(f"per-layer embeddings  {self.placement}"
                     + (f": in {MAPPED_FILE}, memory-mapped by the runtime" if self.mapped else ""))
        if self.embeddings.get(EMBED_TOKENS, {}).get("layout") == PRETRANSPOSED:
            lines.append(f"token embedding  read from {self.embeddings[EMBED_TOKENS]['key']} (stored once)")
        transforms = Counter(i.transform for i in self.items if i.part in ("", WEIGHT))
        lines += [
            "writes   " + ", ".join(f"{n} {t}" for t, n in sorted(transforms.items())),
            f"bytes in   {human(src.bytes_in)}",
            f"bytes out  {human(self.bytes_out)} in {len(self.model_shards)} shard"
            f"{'s' if len(self.model_shards) != 1 else ''}" + (" + index" if len(self.model_shards) > 1 else "")
            + "".join(f" + {s.name} ({human(s.nbytes)}, mapped)" for s in self.shards if s.mapped),
            f"peak memory at most  {human(self.predicted_peak)}",
            f"disk needed  {human(self.disk_needed)}",
        ]
        return "\n".join(lines)


def rows_per_block(item: Item, read_block: int) -> int:
    """Source rows read at once for a transpose: a multiple of the tile height, within the block."""
    rows, cols = item.source.shape
    per_row = cols * item.source.itemsize
    n = max(TILE_ROWS, (read_block // max(per_row, 1)) // TILE_ROWS * TILE_ROWS)
    return min(rows, n)


def band_rows(item: Item, band_bytes: int) -> int:
    """Output rows of a transpose held in one band (in the source dtype): `DEPTH` bands, one
    being filled while the one before is hashed and written, share `band_bytes`."""
    rows, cols = item.source.shape
    return max(1, min(cols, band_bytes // DEPTH // max(rows * item.source.itemsize, 1)))


def block_bytes(item: Item, read_block: int) -> int:
    """Source bytes read at once for a copy or cast: whole elements, at most `read_block`."""
    size = item.source.itemsize
    return max(size, min(item.source.nbytes, read_block) // size * size)


# The writer's named buffers, each kept and grown from item to item: `DEPTH` of each kind the main
# thread rotates through (convert/overlap.py: one filled while the output lane writes another),
# named `read0`, `read1`, ..., and the single ones of --quantize (convert/quantize.py).
RINGS = ("read", "cast", "band")


def buffer_sizes(item: Item, read_block: int, band_bytes: int) -> dict[str, list[int]]:
    """The buffers the writer fills for `item`, by kind: the size of each, up to `DEPTH` of a kind
    the writer rotates (`RINGS`: a tensor of one block fills one, of several fills them all), and
    `mlx`: what MLX holds while a quantized item is written."""
    src, out_size = item.source, ITEMSIZE[item.dtype]
    if item.transform == "quantize":  # a block at a time, from the same rotating read and cast buffers
        return {kind: [n] * (DEPTH if kind in RINGS else 1) for kind, n in quant_buffers(item, read_block).items()}
    if item.transform == "transpose":
        rows, cols = src.shape
        block_rows = rows_per_block(item, read_block)
        height = band_rows(item, band_bytes)
        bands = -(-cols // height)
        blocks = bands * sum(-(-part.shape[0] // block_rows) for _, part in item.parts)
        step = block_bytes(item, read_block)
        sizes = {"read": (block_rows * cols * src.itemsize, blocks), "band": (height * rows * src.itemsize, bands)}
        if item.dtype != src.dtype:
            sizes["cast"] = (step // src.itemsize * out_size, bands * -(-height * rows * src.itemsize // step))
    else:
        step = block_bytes(item, read_block)
        blocks = sum(-(-part.nbytes // step) for _, part in item.parts)
        sizes = {"read": (step, blocks)}
        if item.transform == "cast":
            sizes["cast"] = (step // src.itemsize * out_size, blocks)
    return {kind: [n] * min(count, DEPTH) for kind, (n, count) in sizes.items()}


def current_rss() -> int:
    """This process's resident memory now (Linux), else its peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def peak_rss() -> int:
    """This process's peak resident memory: the memory map's high-water mark on Linux (ru_maxrss
    there keeps the parent's size across fork and exec: a conversion started by a large Python
    process would report that process's peak), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def quantization_of(config: dict, text_config: dict, display: str) -> dict | None:
    """The MLX `quantization` block (defaults plus per-module overrides), or None."""
    for where in (config, text_config):
        q = where.get("quantization")
        if q is None and isinstance(where.get("quantization_config"), dict):
            q = where["quantization_config"]
            if "quant_method" in q:
                raise ConvertError(f"{display}: quantization method {q['quant_method']!r} is not MLX quantization; "
                                   "only MLX-quantized weights pass through")
        if q is not None:
            if not isinstance(q, dict):
                raise ConvertError(f"{display}: quantization is not a mapping")
            return q
    return None


# The bits and group sizes an MLX-quantized checkpoint may use, where a module's are read off its
# shapes (mixed-precision recipes that leave them out of the quantization block).
MLX_BITS = (2, 3, 4, 5, 6, 8)
MLX_GROUP_SIZES = (16, 32, 64, 128)


def _quant_params(q: dict | None, module_key: str, weight: TensorInfo, scales: TensorInfo, in_dim: int,
                  where: str) -> dict:
    """{bits, group_size, mode} of one MLX-quantized module.

    A per-module entry of the quantization block (keyed by the module's path in the checkpoint)
    wins; otherwise the block's defaults, unless the shapes say otherwise (mixed-precision
    recipes), in which case bits and group size are read off the shapes as mlx-lm does.
    """
    if q is None:
        raise ConvertError(f"{where}: uint32 weight with .scales (MLX-quantized) but config.json has no "
                           "quantization block")
    params = q.get(module_key)
    if params is False:
        raise ConvertError(f"{where}: quantized, but config.json's quantization block says this module is not")
    explicit = isinstance(params, dict)
    params = params if explicit else q
    try:
        found = {"bits": int(params["bits"]), "group_size": int(params["group_size"]),
                 "mode": str(params.get("mode", q.get("mode", "affine")))}
    except (KeyError, TypeError, ValueError, OverflowError):
        raise ConvertError(f"{where}: config.json's quantization block lacks bits/group_size") from None
    if not explicit and len(weight.shape) == 2 and len(scales.shape) == 2:
        def stores(q: Quantization) -> bool:  # whether `q` stores this module's weight and scales
            if not q.packs(in_dim):
                return False
            described = Storage(quantized=q).tensors("", weight.shape[0], in_dim)
            return [t.shape for t in described[:2]] == [weight.shape, scales.shape]

        if not stores(Quantization(found["bits"], found["group_size"], found["mode"])):
            for bits, group in itertools.product(MLX_BITS, MLX_GROUP_SIZES):
                if stores(Quantization(bits, group, found["mode"])):
                    found.update(bits=bits, group_size=group)
                    break
    try:  # one that MLX computes with (manifests/config.py), as the runtime will check again
        return check_quantization(found, f"{where}: config.json's quantization")
    except ManifestError as e:
        raise ConvertError(str(e)) from None


def make_plan(source: Source, profile: TargetProfile, *, dtype: str = "keep", device: dict | None = None,
              max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, read_block: int = READ_BLOCK,
              band_bytes: int = BAND_BYTES, baseline_rss: int | None = None,
              quantize: QuantSpec | None = None, fuse: bool | None = None, ple: str | None = None) -> Plan:
    """`fuse`: None fuses the groups the profile's `fuse` lists; True every group; False none.
    `ple`: where the per-layer embedding table goes (`resident` or `mapped`; None: as the
    profile's `per_layer_embeddings` says)."""
    if dtype not in DTYPE_OPTIONS:
        raise ConvertError(f"--dtype {dtype!r}: use one of {', '.join(DTYPE_OPTIONS)}")
    placement = ple or profile.per_layer_embeddings
    if placement not in PLACEMENTS:
        raise ConvertError(f"--ple {placement!r}: use one of {', '.join(PLACEMENTS)}")
    tc, cfg = source.text_config, source.config
    arch_name = architecture_of(source.model_type)
    arch = architecture(arch_name)  # what the architecture's checkpoints hold (convert/architectures.py)
    shapes = arch.expected_tensors(tc)
    unused = arch.kv_shared_unused(tc)
    tied = bool(tc.get("tie_word_embeddings", cfg.get("tie_word_embeddings", True)))
    prefix = NAMING_PREFIXES[source.naming]
    config_where = f"{source.display}/config.json"
    quant = quantization_of(cfg, tc, config_where)

    def where(key: str) -> str:
        return f"{source.display}/{source.tensors[key][0]}: tensor {key!r}"

    # 1. Classify every source tensor: a decoder tensor (by decoder-relative path) or dropped.
    decoder: dict[str, str] = {}  # decoder path -> source key
    dropped: list[dict] = []
    shared_kv: dict[str, str] = {}  # decoder path -> source key of the K/V tensors of KV-shared layers
    for key in source.tensors:
        bare = key[len("model."):] if key.startswith("model.") else key
        if bare.split(".")[0] in TOWERS:
            dropped.append({"key": key, "reason": f"{bare.split('.')[0]}: not part of the text decoder"})
        elif key.startswith(prefix):
            path = key[len(prefix):]
            module, _, leaf = path.rpartition(".")
            if path in unused or (leaf in (SCALES, BIASES) and f"{module}.weight" in unused):
                shared_kv[path] = key  # kept for mlx-lm or dropped: decided once the layouts are (7.)
                continue
            decoder[path] = key
        elif "lm_head" in key.split(".")[:-1]:
            if not tied:
                raise ConvertError(f"{where(key)}: an untied LM head is not supported (Gemma3n ties it to "
                                   "embed_tokens)")
            dropped.append({"key": key, "reason": "stray LM head of a tied model; the LM head is embed_tokens"})
        else:
            raise ConvertError(f"{where(key)}: unexpected tensor (not part of the {arch.NAME} text decoder "
                               f"under {prefix!r}, and not a vision/audio tower)")

    # 2. Quantized modules: `.weight` uint32 with `.scales` (and `.biases` in affine mode).
    quantized: dict[str, dict] = {}  # decoder module -> {bits, group_size, mode}
    companions: set[str] = set()  # decoder paths of their scales and biases
    for path, key in decoder.items():
        module, _, leaf = path.rpartition(".")
        if leaf == SCALES:
            wpath = f"{module}.weight"
            if wpath not in shapes or len(shapes[wpath]) != 2:
                raise ConvertError(f"{where(key)}: unexpected tensor (not part of the {arch.NAME} text decoder)")
            if wpath not in decoder or source.tensors[decoder[wpath]][1].dtype != "U32":
                raise ConvertError(f"{where(key)}: .scales without a uint32 {module}.weight beside it")
            out_dim, in_dim = shapes[wpath]
            winfo, sinfo = source.tensors[decoder[wpath]][1], source.tensors[key][1]
            q = _quant_params(quant, key.rpartition(".")[0], winfo, sinfo, in_dim, where(decoder[wpath]))
            storage = Storage(quantized=Quantization.of(q))
            want_w = storage.weight_shape(out_dim, in_dim)
            if not storage.quantized.packs(in_dim) or winfo.shape != want_w:
                raise ConvertError(f"{where(decoder[wpath])}: shape {list(winfo.shape)} but config.json implies "
                                   f"{list(want_w)} ({q['bits']}-bit of {list(shapes[wpath])})")
            for t in storage.tensors(module, out_dim, in_dim)[1:]:  # scales (and biases) beside the weight
                if t.key not in decoder:
                    raise ConvertError(f"{where(decoder[wpath])}: {q['mode']}-quantized but {prefix}{t.key} is missing")
                found = source.tensors[decoder[t.key]][1].shape
                if found != t.shape:
                    group = f" (group size {q['group_size']})" if t.part == SCALES else ""
                    raise ConvertError(f"{where(decoder[t.key])}: shape {list(found)} but config.json implies "
                                       f"{list(t.shape)}{group}")
                companions.add(t.key)
            quantized[module] = q
    if quantize is not None and (quantized or quant is not None):
        first = next((decoder[m + ".weight"] for m in quantized), None)
        what = f"{where(first)}: already MLX-quantized" if first else f"{config_where}: has a quantization block"
        raise ConvertError(f"{what}; --quantize needs a float checkpoint (without --quantize, quantized weights "
                           "pass through as they are)")
    if quant is not None and not quantized:
        # Copied with config.json, the block would tell mlx-lm's loader to quantize float weights.
        raise ConvertError(f"{config_where}: has a quantization block, but no tensor is quantized (no scales "
                           "beside any weight); remove the block, or convert the quantized checkpoint it belongs to")

    # 3. Every other decoder tensor must be expected, of a float dtype and of the expected shape.
    for path, key in decoder.items():
        module, _, leaf = path.rpartition(".")
        info = source.tensors[key][1]
        if module in quantized and (leaf == WEIGHT or path in companions):
            continue
        if leaf == BIASES or path not in shapes:
            raise ConvertError(f"{where(key)}: unexpected tensor (not part of the {arch.NAME} text decoder)")
        if info.dtype == "U32" and leaf == "weight":
            raise ConvertError(f"{where(key)}: uint32 weight without {prefix}{module}.scales")
        if info.dtype not in FLOATS:
            raise ConvertError(f"{where(key)}: dtype {info.dtype} is not supported (bfloat16, float16 or float32)")
        if info.shape != shapes[path]:
            raise ConvertError(f"{where(key)}: shape {list(info.shape)} but config.json implies {list(shapes[path])}")
    missing = [p for p in shapes if p not in decoder]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        first_file = next(iter(source.headers))
        raise ConvertError(f"{source.display}/{first_file}: tensor {prefix + missing[0]!r} is missing{more}; "
                           "config.json's text config needs it")

    # 4. Items, projections and embeddings, in source reading order.
    items: list[Item] = []
    projections: dict[str, dict] = {}
    embeddings: dict[str, dict] = {}
    roles: Counter = Counter()

    def out_dtype(info: TensorInfo) -> str:
        return info.dtype if dtype == "keep" else CODE_FOR_OPTION[dtype]

    # --quantize: the decoder modules whose weight is quantized here, and why the others are not.
    requantized: set[str] = set()
    unquantized: Counter = Counter()
    for path in decoder if quantize is not None else ():
        module, _, leaf = path.rpartition(".")
        if leaf == WEIGHT and (arch.projection_role(module) or module in arch.EMBEDDINGS):
            reason = not_quantized_because(arch, module, shapes[path], quantize)
            if reason is None:
                requantized.add(module)
            else:
                unquantized[reason] += 1

    def storage_of(module: str, role: str | None, info: TensorInfo) -> tuple[Storage, str]:
        """How the weight of `module` is stored (manifests/records.py), and the dtype code its
        values are written in (the scales' of a quantized one)."""
        if module in requantized:
            return Storage(STANDARD, quantize), out_dtype(info)
        if module in quantized:
            return Storage(STANDARD, Quantization.of(quantized[module])), info.dtype
        written = out_dtype(info)
        return Storage(profile.layout_for(role, DTYPE_NAMES[written]) if role else STANDARD), written

    def record(kind: Kind, name: str, module: str, role: str | None, info: TensorInfo) -> tuple[dict, str]:
        """What the record `name` of `module`'s weight says is stored; the dtype code written."""
        storage, written = storage_of(module, role, info)
        weight = kind.expected(name, storage, *shapes[module + ".weight"], DTYPE_NAMES[written])[0]
        return {"key": weight.key, "shape": list(weight.shape), "dtype": weight.dtype,
                "quantized": storage.quantized and storage.quantized.record, "layout": storage.layout}, written

    def add_projection(name: str, role: str, info: TensorInfo, src_key: str, file: str, module: str):
        r, written = record(PROJECTIONS, name, module, role, info)
        if r["layout"] == PRETRANSPOSED:  # the one tensor made here; the others are planned as they are read
            items.append(Item(r["key"], file, info, written, tuple(r["shape"]), "transpose"))
        projections[name] = {"role": role, "layout": r["layout"], "key": r["key"], "source_key": src_key,
                             "shape": r["shape"], "source_shape": list(info.shape), "dtype": r["dtype"],
                             "bias": None, "quantized": r["quantized"]}
        roles[role, r["layout"]] += 1

    for path, key in decoder.items():
        file, info = source.tensors[key]
        module, _, leaf = path.rpartition(".")
        if module in requantized and leaf == WEIGHT:
            storage, written = storage_of(module, None, info)
            for t in storage.tensors(PREFIX + module, *info.shape, DTYPE_NAMES[written]):
                items.append(Item(t.key, file, info, DTYPE_CODES[t.dtype], t.shape, "quantize", quantize, t.part,
                                  written))
        elif module in quantized:
            items.append(Item(PREFIX + path, file, info, info.dtype, info.shape, "copy"))
        else:
            written = out_dtype(info)
            role = arch.projection_role(module) if leaf == WEIGHT else None
            if role is None or storage_of(module, role, info)[0].layout != PRETRANSPOSED:
                items.append(Item(PREFIX + path, file, info, written, info.shape,
                                  "copy" if written == info.dtype else "cast"))
        if leaf != WEIGHT:
            continue
        role = arch.projection_role(module)
        if role is not None:
            add_projection(PREFIX + module, role, info, key, file, module)
        elif module in arch.EMBEDDINGS:
            r, _ = record(EMBEDDINGS, PREFIX + module, module, None, info)
            embeddings[PREFIX + module] = {"key": r["key"], "source_key": key, "shape": r["shape"],
                                           "dtype": r["dtype"], "quantized": r["quantized"]}
            if module == "embed_tokens":
                add_projection(LM_HEAD, "lm_head", info, key, file, module)
                if projections[LM_HEAD]["layout"] == PRETRANSPOSED:
                    read_from_head(embeddings[EMBED_TOKENS], projections[LM_HEAD], items)

    # 5. Fused groups: the members' items and records become one each (convert/fusion.py).
    fuse_names = profile.fuse if fuse is None else (FUSE_ALL if fuse else ())
    fused, unfused = Counter(), Counter()
    if fuse_names:
        items, projections, fused, unfused = fuse_groups(items, projections, roles, fuse_names,
                                                         arch.kv_shared_layers(tc))

    # 6. The per-layer embedding table placed `mapped`: its tensors go to a file of their own.
    mapped: dict[str, dict] = {}
    table_items: list[Item] = []
    if placement == MAPPED:
        record = embeddings.pop(EMBED_TOKENS_PER_LAYER)
        mapped[EMBED_TOKENS_PER_LAYER] = {**record, "file": MAPPED_FILE}
        keys = {t.key for t in MAPPED_EMBEDDINGS.stored(mapped[EMBED_TOKENS_PER_LAYER])}
        table_items = [i for i in items if i.key in keys]
        items = [i for i in items if i.key not in keys]

    # 7. A profile that promises mlx-lm (`mlx_lm: true`, the generic target) gets bundles mlx-lm's
    # own loader reads: the KV-shared layers' K/V kept (unread here), config.json completed;
    # unless --fuse made projections mlx-lm cannot read, or --ple mapped took the per-layer table
    # out of the shards (mlx-lm reads it there). Any other bundle drops them.
    config_json = None
    mlx_lm = profile.mlx_lm and not mapped and mlx_lm_readable(projections)
    if mlx_lm:
        floats = Counter(it.dtype for it in items if it.dtype in FLOATS)  # the bundle's own float dtype
        new_items, unread = kept_for_mlx_lm(unused, shared_kv, source, quant, where, out_dtype,
                                            floats.most_common(1)[0][0])
        items += new_items
        config_json = mlx_lm_config(cfg, arch, quantize)
    else:
        unread = {}
        dropped += [{"key": key, "reason": "K/V of a KV-shared layer, which reuses an earlier layer's cache: never "
                     "read"} for key in shared_kv.values()]

    # 8. Shards: greedy in reading order, each at most `max_shard_size` of data (a bigger tensor
    # gets a shard of its own); inside a shard, larger item sizes first so every tensor stays
    # aligned to its element size (the writer packs tensors without padding).
    groups: list[list[Item]] = [[]]
    size = 0
    for item in items:
        if groups[-1] and size + item.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += item.nbytes
    n = len(groups)
    shards = []
    for i, group in enumerate(groups):
        group.sort(key=lambda it: -ITEMSIZE[it.dtype])
        name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        header = build_header([(it.key, it.dtype, it.shape) for it in group], SHARD_METADATA)
        shards.append(Shard(name, group, header))
    if table_items:  # in row-major order as stored: one token's row for every layer is contiguous
        table_items.sort(key=lambda it: -ITEMSIZE[it.dtype])
        header = build_header([(it.key, it.dtype, it.shape) for it in table_items], SHARD_METADATA)
        shards.append(Shard(MAPPED_FILE, table_items, header, mapped=True))

    return Plan(source=source, profile=profile, device=device, dtype=dtype, shards=shards,
                projections=projections, embeddings=embeddings, dropped=dropped, tied=tied,
                read_block=read_block, band_bytes=band_bytes,
                baseline_rss=current_rss() if baseline_rss is None else baseline_rss, roles=roles,
                quantize=quantize, unquantized=unquantized, fuse=fuse_names, fused=fused, unfused=unfused,
                architecture=arch_name, unread=unread, config_json=config_json, mlx_lm=mlx_lm, mapped=mapped,
                placement=placement)


def read_from_head(embedding: dict, head: dict, items: list[Item]) -> None:
    """Store the token embedding once: where the LM head is pretransposed (`lm_head.weight_t`,
    `[hidden, vocab]`), the embedding's record reads its rows as that tensor's columns, and the
    `[vocab, hidden]` copy is not written (an m5 bundle then holds no more bytes than its source's
    text weights). A column gather costs more than a row gather, but a token's row is one read
    among a decode step's gigabytes (docs/BENCHMARKS.md measures it)."""
    storage = Storage(PRETRANSPOSED)
    weight = EMBEDDINGS.expected(EMBED_TOKENS, storage, *storage.dims(head["shape"]), head["dtype"])[0]
    own = EMBEDDINGS.weight_key(EMBED_TOKENS)
    items[:] = [i for i in items if i.key != own]
    embedding.update(key=weight.key, shape=list(weight.shape), layout=PRETRANSPOSED)


UNREAD_REASON = "K/V of a KV-shared layer: never read here, kept for mlx-lm's loader"
ZEROS_REASON = ("K/V of a KV-shared layer, not in the source: zeros, for mlx-lm's loader (which reads the "
                "producer's cache instead, like this runtime)")


def mlx_lm_readable(projections: dict[str, dict]) -> bool:
    """Whether mlx-lm's gemma3n reads these projections as stored: every one standard and none
    fused (its modules are Hugging Face's, `[out, in]` weights one per projection)."""
    return all(r["layout"] == STANDARD and not r.get("fused") for r in projections.values())


def kept_for_mlx_lm(unused: dict[str, tuple[int, ...]], shared_kv: dict[str, str], source: Source,
                    quant: dict | None, where, out_dtype, float_code: str) -> tuple[list[Item], dict[str, dict]]:
    """Items and `unread` entries for the KV-shared layers' K/V tensors (`unused`: path -> shape),
    which mlx-lm's loader wants in every layer although, given a cache, it never reads them.
    Those the source has (`shared_kv`: path -> source key) are written like any float tensor
    (an MLX-quantized module's tensors copied as they are), each checked against the shape of a
    layer's own; those it lacks (newer transformers saves none) are zeros in `float_code`."""
    items, unread = [], {}
    for path, shape in unused.items():
        module = path.rpartition(".")[0]
        present = [p for p in shared_kv if p.rpartition(".")[0] == module]
        if not present:
            info = TensorInfo(PREFIX + path, float_code, tuple(shape), 0, math.prod(shape) * ITEMSIZE[float_code])
            items.append(Item(PREFIX + path, "", info, float_code, info.shape, "zeros"))
            unread[PREFIX + path] = {"source_key": None, "shape": list(shape), "dtype": DTYPE_NAMES[float_code],
                                     "reason": ZEROS_REASON}
            continue
        for kept in present:
            key = shared_kv[kept]
            file, info = source.tensors[key]
            leaf = kept.rpartition(".")[2]
            if f"{module}.{SCALES}" in shared_kv and path in shared_kv:  # MLX-quantized
                q = _quant_params(quant, key.rpartition(".")[0], source.tensors[shared_kv[path]][1],
                                  source.tensors[shared_kv[f"{module}.{SCALES}"]][1], shape[1], where(key))
                want = Storage(quantized=Quantization.of(q)).tensors(module, *shape)
                expected, written = {t.part: t.shape for t in want}.get(leaf, info.shape), info.dtype
            else:
                if info.dtype not in FLOATS:
                    raise ConvertError(f"{where(key)}: dtype {info.dtype} is not supported (bfloat16, float16 or "
                                       "float32)")
                expected, written = shape, out_dtype(info)
            if info.shape != tuple(expected):
                raise ConvertError(f"{where(key)}: shape {list(info.shape)} but config.json implies {list(expected)}")
            items.append(Item(PREFIX + kept, file, info, written, info.shape,
                              "copy" if written == info.dtype else "cast"))
            unread[PREFIX + kept] = {"source_key": key, "shape": list(info.shape), "dtype": DTYPE_NAMES[written],
                                     "reason": UNREAD_REASON}
    return items, unread


def mlx_lm_config(config: dict, arch, quantize: QuantSpec | None) -> bytes | None:
    """The bundle's config.json where mlx-lm's loader needs more than the source's says (None:
    the source's, copied byte for byte): the keys its gemma3n requires beside newer ones (the
    architecture's `mlx_lm_text_config`), and the `quantization` block of `--quantize`, by which
    it quantizes every module that has scales."""
    config = json.loads(json.dumps(config))  # a deep copy
    text = config.get("text_config", config)
    added = arch.mlx_lm_text_config(text)
    if not added and quantize is None:
        return None
    text.update(added)
    if quantize is not None:
        config["quantization"] = quantize.record
    return (json.dumps(config, indent=2) + "\n").encode()


SHARD_METADATA = {"format": "mlx", "producer": "mlx-prepared"}


def index_text(plan: Plan) -> bytes:
    weight_map = {it.key: s.name for s in plan.model_shards for it in s.items}
    total = sum(it.nbytes for s in plan.model_shards for it in s.items)
    doc = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    return (json.dumps(doc, indent=2) + "\n").encode()


__all__ = ["Item", "Plan", "Shard", "make_plan", "parse_size", "index_text", "INDEX_NAME"]
