"""`runtime calibrate`: measure, on this device, which weight layout runs each projection faster.

For every projection role at the real shapes of a Gemma3n config (default: E2B and E4B), and for
every dtype asked for, time batch-1 GEMV in both layouts the bundle format knows:

- standard:      `x @ W.T` with `W` stored `[out, in]` (the Hugging Face layout; MLX's `gemv`)
- pretransposed: `x @ Wt`  with `Wt` stored contiguous `[in, out]` (MLX's `gemv_t`)

The winner depends on device *and* dtype (on one x86_64 CPU float32 prefers pretransposed while
bfloat16 prefers standard), so the result is a target profile with per-dtype rules, in the
format of `manifests/targets/*.yaml`, plus the measurements it rests on. `convert
--target-profile FILE` applies it; `--save` stores it where `convert --target auto` looks first
(`manifests.profiles.user_profile_dir()`).

How a time is taken: several copies of the weight (at least `cache_bytes` together, so that no
GEMV is served from a cache the previous one warmed), many GEMVs in one evaluated graph (so the
per-call overhead is not what is measured), a warm-up pass, then the median of `repeats` samples,
the two layouts alternating sample by sample (noise from elsewhere hits both).
A role switches to pretransposed only when that is faster by more than `margin` over all of the
role's shapes together; a tie keeps the layout that needs no conversion.

Given a bundle (`--config BUNDLE`), calibrate also measures where the per-layer embedding table
should live (the profile's `per_layer_embeddings`, manifests/profiles.py): it loads the bundle and
decodes with the table resident (in accelerator memory) and mapped (memory-mapped on the host, a
row gathered per token: runtime/mapped.py), over the same stored bytes (the other placement is
made from the file the bundle holds the table in), alternating, medians. Mapped frees the table's
gigabytes of accelerator memory; it is chosen when it decodes at least `placement_floor` (0.9)
as fast as resident.
"""

from __future__ import annotations

import datetime
import math
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import click
import mlx.core as mx
import yaml

from manifests import MANIFEST_NAME, ManifestError, read_manifest
from manifests.cli import CommandError, not_nan
from manifests.files import CONFIG_LIMIT, FileRefused, NotParsed, parse_json, read_limited
from manifests.format import DTYPES, EMBED_TOKENS_PER_LAYER, MAPPED, PRETRANSPOSED, RESIDENT, STANDARD
from manifests.gemma3n import ARCHITECTURE as GEMMA3N
from manifests.gemma3n import MODEL_TYPES, SIZES, published_text_config
from manifests.profiles import (
    ROLES,
    ProfileError,
    load_profile,
    profile_sha256,
    save_user_profile,
    target_for_device,
    user_profile_dir,
)
from manifests.records import EMBEDDINGS, Storage
from manifests.safetensors_header import read_header_file
from runtime.architectures import architecture
from runtime.bundle import shard_files
from runtime.mapped import MappedTable
from runtime.projections import build_embedding, projection_over

# Projections whose weight goes through a plain matmul. The AltUp coefficient and router tensors
# (4x4, 16x4, 4x2048) are left out: too small for the layout to matter, and their math runs in
# float32 whatever the bundle's dtype.
CALIBRATED_ROLES = tuple(role for role in ROLES if not role.startswith("altup."))
DEFAULT_DTYPES = ("bfloat16", "float32")

# The published sizes (manifests/gemma3n.py), measured when no config is given.
DEFAULT_CONFIGS = {size: published_text_config(size) for size in SIZES}

Shape = tuple[int, int]
Measure = Callable[[Shape, str], dict[str, list[float]]]


class CalibrationError(ValueError):
    """A config or bundle calibrate cannot read."""


# Bounds of the counts a caller gives (a huge one ran for ever or allocated without end).
MAX_REPEATS, MAX_CACHE_MB = 1000, 1 << 16


@dataclass(frozen=True)
class Settings:
    repeats: int = 5
    warmup: int = 1
    cache_bytes: int = 256 << 20   # distinct weight bytes per sample: larger than any cache
    graph_bytes: int = 512 << 20   # weight bytes streamed per evaluated graph
    max_copies: int = 1024
    margin: float = 0.03
    placement_floor: float = 0.9  # mapped when it decodes at least this fraction of resident's rate
    placement_rounds: int = 3
    placement_tokens: int = 32


def role_shapes(text_config: dict, arch: str = GEMMA3N) -> dict[str, list[Shape]]:
    """Role -> the distinct `[out, in]` weight shapes it has in this config, in first-use order
    (the architecture's own table: runtime/architectures.py)."""
    try:
        shapes = architecture(arch).projection_shapes(text_config)
    except (KeyError, TypeError, ValueError) as e:
        raise CalibrationError(f"text config: {e}") from None
    return {role: shapes[role] for role in CALIBRATED_ROLES}


def merge_shapes(configs: Iterable[dict]) -> dict[str, list[Shape]]:
    merged: dict[str, list[Shape]] = {}
    for cfg in configs:
        for role, shapes in role_shapes(cfg).items():
            merged.setdefault(role, [])
            merged[role] += [s for s in shapes if s not in merged[role]]
    return merged


def read_text_config(path: str | Path) -> tuple[dict, str, list[str]]:
    """(text config, a label, the bundle's projection dtypes or []) from a config.json, a
    checkpoint directory holding one, or a bundle directory (its manifest)."""
    path = Path(path)
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        try:
            manifest = read_manifest(path)
        except ManifestError as e:
            raise CalibrationError(str(e)) from None
        dtypes = sorted({p["dtype"] for p in manifest["projections"].values()
                         if p.get("quantized") is None and p["dtype"] in DTYPES})
        return manifest["model"]["text_config"], str(path), dtypes
    if path.is_dir():
        path = path / "config.json"
    try:  # through the small-file door: a FIFO or /dev/zero is refused before any read
        config = parse_json(read_limited(path, CONFIG_LIMIT, "config.json"))
    except FileRefused as e:
        raise CalibrationError(str(e)) from None
    except OSError as e:
        raise CalibrationError(f"{path}: cannot read ({e.strerror})") from None
    except NotParsed as e:
        raise CalibrationError(f"{path}: {e}") from None
    if not isinstance(config, dict):
        raise CalibrationError(f"{path}: not a JSON object")
    text = config.get("text_config", config)
    model_type = str(text.get("model_type", config.get("model_type", "")))
    if model_type not in MODEL_TYPES:
        raise CalibrationError(f"{path}: model_type {model_type!r} is not Gemma3n")
    try:
        role_shapes(text)
    except CalibrationError as e:
        raise CalibrationError(f"{path}: {e}") from None
    return text, str(path), []


def _weights(shape: Shape, dtype: str, layout: str, settings: Settings) -> list:
    """Distinct copies of one weight, at least `cache_bytes` together (one copy when a single
    weight is already that large)."""
    out_f, in_f = shape
    dt = getattr(mx, dtype)
    nbytes = out_f * in_f * dt.size
    copies = min(settings.max_copies, max(1, math.ceil(settings.cache_bytes / nbytes)))
    stored = Storage(layout).weight_shape(out_f, in_f)
    weights = []
    for _ in range(copies):
        w = (mx.random.normal(stored) * in_f ** -0.5).astype(dt)
        mx.eval(w)  # one at a time: never a float32 temporary of all copies at once
        weights.append(w)
    return weights


def measure_gemv(shape: Shape, dtype: str, settings: Settings = Settings()) -> dict[str, list[float]]:
    """Seconds per batch-1 GEMV with a weight of `[out, in]` shape `shape`, per layout, one value
    per sample. The layouts alternate sample by sample, so a burst of noise from elsewhere on the
    machine lands on both rather than deciding between them."""
    out_f, in_f = shape
    dt = getattr(mx, dtype)
    nbytes = out_f * in_f * dt.size
    weights = {layout: _weights(shape, dtype, layout, settings) for layout in (STANDARD, PRETRANSPOSED)}
    copies = len(weights[STANDARD])
    count = min(4 * settings.max_copies, max(copies, math.ceil(settings.graph_bytes / nbytes)))
    xs = [mx.random.normal((1, in_f)).astype(dt) for _ in range(4)]
    mx.eval(xs)

    modules = {layout: [projection_over(layout, w) for w in ws] for layout, ws in weights.items()}

    samples: dict[str, list[float]] = {STANDARD: [], PRETRANSPOSED: []}
    for r in range(settings.warmup + settings.repeats):
        order = (STANDARD, PRETRANSPOSED) if r % 2 == 0 else (PRETRANSPOSED, STANDARD)
        for layout in order:
            # x @ W.T over [out, in], x @ Wt over [in, out] (runtime/projections.py)
            ys = [modules[layout][i % copies](xs[i % 4]) for i in range(count)]
            t0 = time.perf_counter()
            mx.eval(ys)
            elapsed = time.perf_counter() - t0
            if r >= settings.warmup:
                samples[layout].append(elapsed / count)
            del ys
    del weights, modules, xs
    mx.clear_cache()
    return samples


def device_info() -> dict:
    info = {k: v for k, v in mx.device_info().items() if isinstance(v, (str, int, float, bool))}
    info.setdefault("machine", platform.machine())
    info["default_device"] = str(mx.default_device())
    return info


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def choose(standard_s: float, pretransposed_s: float, margin: float) -> str:
    """Pretransposed only when clearly faster: a tie keeps the layout that needs no conversion."""
    return PRETRANSPOSED if pretransposed_s < standard_s * (1.0 - margin) else STANDARD


def streamed_bytes(settings: Settings) -> int:
    """Weight bytes one row (a role's shape in one dtype) streams through both layouts, and makes:
    what its time is, so what the run's time scales with (the device's memory bandwidth)."""
    return 2 * ((settings.warmup + settings.repeats) * settings.graph_bytes + settings.cache_bytes)


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.0f} MB"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def calibrate(shapes: dict[str, list[Shape]], dtypes: Iterable[str] = DEFAULT_DTYPES, *,
              settings: Settings = Settings(), measure: Measure | None = None,
              info: dict | None = None, source: str = "E2B, E4B",
              progress: Callable[[str], None] | None = None,
              clock: Callable[[], float] = time.perf_counter) -> dict:
    """Measure every (role, shape, dtype, layout) and return a target profile as a dict.

    `measure(shape, dtype) -> {layout: [seconds per GEMV, ...]}` defaults to `measure_gemv` on
    the current MLX device; tests inject their own timer (and `clock`, which times the run for
    the estimate of time left each `progress` line ends with).
    """
    dtypes = list(dict.fromkeys(dtypes))
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise CalibrationError(f"unknown dtype {dtype!r} (use {', '.join(DTYPES)})")
    unknown = sorted(set(shapes) - set(CALIBRATED_ROLES))
    if unknown:
        raise CalibrationError(f"cannot calibrate roles {', '.join(unknown)}")
    if measure is None:
        def measure(shape, dtype):
            return measure_gemv(shape, dtype, settings)
    info = device_info() if info is None else dict(info)

    layouts: dict[str, dict] = {}
    measurements: dict[str, dict] = {}
    total, done, started = sum(len(s) for s in shapes.values()) * len(dtypes), 0, clock()
    for role, role_shape_list in shapes.items():
        rule: dict[str, str] = {}
        for dtype in dtypes:
            rows, totals = [], {STANDARD: 0.0, PRETRANSPOSED: 0.0}
            for shape in role_shape_list:
                samples = measure(tuple(shape), dtype)
                medians = {layout: statistics.median(samples[layout]) for layout in (STANDARD, PRETRANSPOSED)}
                for layout in medians:
                    totals[layout] += medians[layout]
                gb = shape[0] * shape[1] * getattr(mx, dtype).size / 1e9
                rows.append({
                    "shape": [int(shape[0]), int(shape[1])],
                    "standard_us": round(medians[STANDARD] * 1e6, 2),
                    "pretransposed_us": round(medians[PRETRANSPOSED] * 1e6, 2),
                    "speedup": round(medians[STANDARD] / medians[PRETRANSPOSED], 3),
                    "standard_gb_s": round(gb / medians[STANDARD], 2),
                    "pretransposed_gb_s": round(gb / medians[PRETRANSPOSED], 2),
                })
                done += 1
                if progress:  # rows stream the same bytes, so the mean row so far predicts the rest
                    spent = clock() - started
                    left = (f"about {_duration(spent / done * (total - done))} left" if done < total
                            else f"done in {_duration(spent)}")
                    progress(f"[{done:{len(str(total))}d}/{total}] {role:28s} {dtype:9s} {str(tuple(shape)):16s} "
                             f"standard {rows[-1]['standard_us']:10.1f} us  pretransposed "
                             f"{rows[-1]['pretransposed_us']:10.1f} us  x{rows[-1]['speedup']:.2f}  {left}")
            rule[dtype] = choose(totals[STANDARD], totals[PRETRANSPOSED], settings.margin)
            measurements.setdefault(role, {})[dtype] = rows
        rule["default"] = STANDARD
        layouts[role] = rule

    device_name = str(info.get("device_name", "unknown"))
    arch = str(info.get("architecture", "unknown"))
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    device_class = target_for_device(info)
    # GEMV timing cannot see what fusing saves (fewer launches per decode step), so the fused
    # groups are the device class's, decided by whole-step decode benchmarks.
    fuse = list(load_profile(device_class).fuse)
    fused_note = (f" Fused groups ({', '.join(fuse)}) come from the built-in {device_class} profile, "
                  "decided by decode benchmarks, not by this calibration.") if fuse else ""
    profile = {
        "name": f"calibrated-{_slug(arch)}-{_slug(device_name)}",
        "description": f"Calibrated by `runtime calibrate` on {device_name} ({arch})",
        "evidence": (
            f"Measured on this device on {now[:10]} with MLX {mx.__version__}: batch-1 GEMV, "
            f"median of {settings.repeats} samples after {settings.warmup} warm-up, layouts alternating, each sample "
            f"many GEMVs in one graph over weight copies of at least {settings.cache_bytes >> 20} MiB; "
            f"pretransposed where it was more than {settings.margin:.0%} faster over the role's shapes "
            f"({source}). Dtypes not measured stay standard.{fused_note}"
        ),
        "device": info,
        "device_class": device_class,
        "mlx_version": mx.__version__,
        "calibration": {
            "date": now, "shapes_from": source, "dtypes": dtypes, "repeats": settings.repeats,
            "warmup": settings.warmup, "cache_bytes": settings.cache_bytes,
            "graph_bytes": settings.graph_bytes, "margin": settings.margin,
        },
        "layouts": layouts,
        "measurements": measurements,
    }
    if fuse:
        profile["fuse"] = fuse
    return profile


# --- Where the per-layer embedding table lives (needs a bundle) --------------------------------

def placement_tables(model) -> dict[str, object]:
    """The loaded model's per-layer table in both placements over the same stored bytes: resident
    (the module, its arrays in accelerator memory) and mapped (a MappedTable over the file holding
    them: the table's own file, or the shard it shares with other tensors)."""
    lm, bundle, manifest = model.model.language_model, Path(model.bundle_path), model.manifest
    table = lm.embed_tokens_per_layer
    if isinstance(table, MappedTable):
        record = {k: v for k, v in table.record.items() if k != "file"}
        resident = build_embedding(EMBED_TOKENS_PER_LAYER, record, table.num, table.dims)
        arrays = mx.load(str(table.file))
        resident.load_weights([(t.part, arrays[t.key]) for t in EMBEDDINGS.stored(record)])
        mx.eval(resident.parameters())
        return {RESIDENT: resident, MAPPED: table}
    record = manifest["embeddings"][EMBED_TOKENS_PER_LAYER]
    keys = {t.key for t in EMBEDDINGS.stored(record)}
    for name in shard_files(bundle, manifest):
        entries, _, start = read_header_file(bundle / name)
        held = {e.name: e for e in entries}
        if keys <= held.keys():
            return {RESIDENT: table, MAPPED: MappedTable(bundle / name, record, held, start, EMBED_TOKENS_PER_LAYER)}
    raise CalibrationError(f"{bundle}: the per-layer table's tensors are spread over several shards; "
                           "convert it with --ple mapped to measure the placement")


def decode_rate(model, tokens: int, prompt: list[int]) -> float:
    """Tokens per second of a greedy decode (compiled step, the product's loop), after the first token."""
    from runtime.generate import generate_step

    first = None
    n = 0
    for _ in generate_step(prompt, model, max_tokens=tokens):
        n += 1
        if first is None:
            first = time.perf_counter()
    return (n - 1) / (time.perf_counter() - first)


def choose_placement(resident_tps: float, mapped_tps: float, floor: float) -> str:
    return MAPPED if mapped_tps >= floor * resident_tps else RESIDENT


def measure_placement(model, settings: Settings = Settings(), rate=decode_rate) -> dict:
    """Decode tok/s with the table resident and mapped (alternating, after a warm-up of each), and
    the placement chosen: `per_layer_embeddings` and its measurement for the profile. `rate(model,
    tokens, prompt)` defaults to `decode_rate`; tests inject their own."""
    lm = model.model.language_model
    tables = placement_tables(model)
    original = lm.embed_tokens_per_layer
    vocab = min(model.config.vocab_size, model.config.vocab_size_per_layer_input)
    prompt = [3 + (7919 * i) % (vocab - 3) for i in range(16)]
    samples: dict[str, list[float]] = {RESIDENT: [], MAPPED: []}
    try:
        for r in range(1 + settings.placement_rounds):
            for placement in ((RESIDENT, MAPPED) if r % 2 == 0 else (MAPPED, RESIDENT)):
                lm.embed_tokens_per_layer = tables[placement]  # the compiled step is made anew per table
                tps = rate(model, settings.placement_tokens, prompt)
                if r:
                    samples[placement].append(tps)
    finally:
        lm.embed_tokens_per_layer = original
    resident, mapped = (statistics.median(samples[p]) for p in (RESIDENT, MAPPED))
    table = tables[MAPPED]
    return {
        "per_layer_embeddings": choose_placement(resident, mapped, settings.placement_floor),
        "measurement": {
            "bundle": str(model.bundle_path), "table_bytes": table.nbytes,
            "resident_tok_s": round(resident, 3), "mapped_tok_s": round(mapped, 3),
            "ratio": round(mapped / resident, 3), "floor": settings.placement_floor,
            "tokens": settings.placement_tokens, "rounds": settings.placement_rounds,
        },
    }


def add_placement(profile: dict, placement: dict) -> dict:
    """The profile with the measured placement of the per-layer table and its evidence."""
    m = placement["measurement"]
    profile["per_layer_embeddings"] = placement["per_layer_embeddings"]
    profile["evidence"] += (
        f" Per-layer embeddings {placement['per_layer_embeddings']}: decoding {m['tokens']} tokens of {m['bundle']} "
        f"with the table mapped ran at {m['ratio']:.2f}x its resident rate (median of {m['rounds']}, "
        f"alternating; mapped when at least {m['floor']:.2f}x, freeing {m['table_bytes'] / 1e9:.2f} GB of "
        "accelerator memory).")
    profile["placement_measurement"] = m
    return profile


def placed(bundle: str, settings: Settings, say=None) -> dict:
    """`measure_placement` on the bundle at `bundle`, loaded here; one line per outcome to `say`."""
    from runtime.loader import load_model

    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a bundle made for another device class measures all the same
            model = load_model(bundle)
    except (ManifestError, ValueError, OSError) as e:
        raise BadInput(str(e).splitlines()[0]) from None
    try:
        result = measure_placement(model, settings)
    except CalibrationError as e:
        raise BadInput(str(e)) from None
    if say:
        m = result["measurement"]
        say(f"per-layer embeddings: resident {m['resident_tok_s']:.2f} tok/s, mapped {m['mapped_tok_s']:.2f} tok/s "
            f"({m['ratio']:.2f}x): {result['per_layer_embeddings']}")
    return result


def profile_text(profile: dict) -> str:
    header = ("# Target profile written by `runtime calibrate`; use it with\n"
              "# `convert --target-profile THIS_FILE`, or save it with `runtime calibrate --save`.\n")
    return header + yaml.safe_dump(profile, sort_keys=False, width=100)


def layout_table(profile: dict) -> str:
    """The measurements as an aligned text table, one row per role, dtype and shape."""
    lines = [f"{'role':28s} {'dtype':9s} {'shape [out, in]':16s} {'standard us':>12s} "
             f"{'pretr. us':>12s} {'speedup':>8s}  chosen"]
    for role, per_dtype in profile["measurements"].items():
        for dtype, rows in per_dtype.items():
            chosen = profile["layouts"][role][dtype]
            for row in rows:
                lines.append(f"{role:28s} {dtype:9s} {str(row['shape']):16s} {row['standard_us']:12.1f} "
                             f"{row['pretransposed_us']:12.1f} {row['speedup']:8.2f}  {chosen}")
    return "\n".join(lines)


class BadInput(CommandError):
    """One `error:` line, exit 2 (manifests/cli.py)."""


@click.command("calibrate")
@click.option("--config", "config_path", type=click.Path(exists=False), default=None,
              help="config.json, a checkpoint directory, or a bundle directory whose shapes to measure "
                   "(default: the E2B and E4B shapes)")
@click.option("--dtype", "dtypes", multiple=True, type=click.Choice(DTYPES),
              help="dtype to measure (repeatable; default: the bundle's, else bfloat16 and float32)")
@click.option("--role", "roles", multiple=True, type=click.Choice(CALIBRATED_ROLES),
              help="measure only this role (repeatable; default: every projection role)")
@click.option("--repeats", type=click.IntRange(1, MAX_REPEATS), default=Settings.repeats, show_default=True,
              help="timed samples per layout and shape (their median counts)")
@click.option("--margin", type=click.FloatRange(0.0, 0.5), default=Settings.margin, show_default=True,
              callback=not_nan, help="how much faster pretransposed must be to be chosen")
@click.option("--cache-mb", type=click.IntRange(1, MAX_CACHE_MB), default=Settings.cache_bytes >> 20,
              show_default=True,
              help="distinct weight bytes per sample (MiB)")
@click.option("--out", "out", type=click.Path(dir_okay=False), default=None, help="write the profile here")
@click.option("--save", is_flag=True, help="store the profile in the user profile directory, where "
                                           "`convert --target auto` prefers it for this device")
@click.option("--placement/--no-placement", default=True, show_default=True,
              help="with a bundle as --config: also decode with the per-layer embedding table resident and "
                   "mapped, and choose its placement (per_layer_embeddings)")
@click.option("--placement-floor", type=click.FloatRange(0.0, 1.0), default=Settings.placement_floor, callback=not_nan,
              show_default=True, help="mapped is chosen when it decodes at least this fraction of resident's rate")
@click.option("--quiet", is_flag=True, help="no progress or table on stderr")
def calibrate_command(config_path, dtypes, roles, repeats, margin, cache_mb, out, save, quiet, placement,
                      placement_floor):
    """Measure standard vs pretransposed GEMV per projection role on this device; write a profile.

    It takes minutes: every row (a role's shape in one dtype) streams about 7.0 GB of weights at
    the defaults, so its time is set by the device's memory bandwidth. The defaults measure 38
    rows (19 shapes of E2B and E4B, bfloat16 and float32): 10 to 30 minutes on a 2-core x86_64
    CPU (17 to 42 s a row). --role, --dtype, --repeats and --cache-mb measure less. Progress, with the time left,
    goes to stderr, one line per row. With a bundle as --config, it then decodes with the bundle's
    per-layer embedding table resident and mapped and chooses its placement (--no-placement skips it).
    """
    try:
        if config_path:
            text, source, bundle_dtypes = read_text_config(config_path)
            shapes = role_shapes(text)
        else:
            source, bundle_dtypes = ", ".join(DEFAULT_CONFIGS), []
            shapes = merge_shapes(DEFAULT_CONFIGS.values())
    except CalibrationError as e:
        raise BadInput(str(e)) from None
    # Where the profile goes is checked before minutes of measuring, not after.
    if out and not Path(out).parent.is_dir():
        raise BadInput(f"{out}: cannot write the profile (no directory {Path(out).parent})")
    if save:
        try:
            saved_dir = user_profile_dir()
        except ProfileError as e:
            raise BadInput(str(e)) from None
        if saved_dir.exists() and not saved_dir.is_dir():
            raise BadInput(f"{saved_dir}: cannot save the profile there (not a directory)")
    if roles:
        shapes = {r: s for r, s in shapes.items() if r in roles}
    settings = Settings(repeats=repeats, margin=margin, cache_bytes=cache_mb << 20,
                        graph_bytes=2 * (cache_mb << 20), placement_floor=placement_floor)
    say = None if quiet else (lambda line: click.echo(line, err=True))
    dtypes = dtypes or bundle_dtypes or DEFAULT_DTYPES
    if say:
        rows = sum(len(s) for s in shapes.values()) * len(dtypes)
        say(f"calibrating on {mx.default_device()} ({mx.device_info().get('device_name', '?')}), "
            f"MLX {mx.__version__}, shapes of {source}: {rows} row{'s' if rows != 1 else ''} (role, shape, dtype), "
            f"each streaming {_size(streamed_bytes(settings))} of weights; one line per row as it is measured")
    profile = calibrate(shapes, dtypes, settings=settings, source=source, progress=say)
    bundle = config_path and (Path(config_path) / MANIFEST_NAME).is_file()
    if placement and bundle:
        profile = add_placement(profile, placed(config_path, settings, say))
    elif say:
        say("per_layer_embeddings: not measured (give a bundle as --config to measure its placement)")
    text = profile_text(profile)
    if say:
        say(layout_table(profile))
    if out:
        try:
            Path(out).write_text(text)
        except OSError as e:
            raise BadInput(f"{out}: cannot write the profile ({e.strerror or e})") from None
        if say:
            say(f"wrote {out} (sha256 {profile_sha256(text)[:12]})")
    if save:
        try:
            path = save_user_profile(text, profile["device"])
        except ProfileError as e:
            raise BadInput(str(e)) from None
        except OSError as e:
            raise BadInput(f"{e.filename or user_profile_dir()}: cannot save the profile there "
                           f"({e.strerror or e})") from None
        if say:
            say(f"saved {path}: `convert --target auto` uses it on this device")
    if not out and not save:
        sys.stdout.write(text)


if __name__ == "__main__":  # `python -m runtime.calibrate`: the same one-line errors as `runtime calibrate`
    from manifests.cli import run_program

    sys.exit(run_program(calibrate_command, None, "python -m runtime.calibrate"))
