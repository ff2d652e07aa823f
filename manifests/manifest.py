"""Read, write and validate `manifest.yaml`, the first thing a reader of a bundle looks at."""

from __future__ import annotations

import hashlib
import os
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path

import yaml

from manifests.config import check_quantization, checked_text_config
from manifests.files import FileRefused, NotParsed, parse_yaml, read_limited
from manifests.format import (
    EMBED_TOKENS,
    FORMAT_VERSION,
    FUSED_GROUPS,
    LM_HEAD,
    MANIFEST_DIGEST_NAME,
    MANIFEST_LIMIT,
    MANIFEST_NAME,
    PRETRANSPOSED,
    STANDARD,
    ManifestError,
)
from manifests.records import KINDS, Storage
from manifests.schema import SchemaError, validate

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


@lru_cache(maxsize=1)
def manifest_schema() -> dict:
    text = resources.files("manifests").joinpath("manifest.schema.yaml").read_text()
    return yaml.load(text, Loader=_Loader)


def validate_manifest(manifest: object, where: str = MANIFEST_NAME) -> dict:
    """Check the format version first (a newer one is refused), then the whole schema."""
    if not isinstance(manifest, dict):
        raise ManifestError(f"{where}: not a mapping")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ManifestError(f"{where}: format_version missing or not an integer")
    if version > FORMAT_VERSION:
        raise ManifestError(
            f"{where}: bundle format_version {version} is newer than this mlx-prepared reads "
            f"({FORMAT_VERSION}); upgrade mlx-prepared"
        )
    try:
        validate(manifest, manifest_schema())
    except SchemaError as e:  # folded: a key or value may hold a newline, the message stays one line
        raise ManifestError(f"{where}: {' '.join(str(e).split())}") from None
    for section in KINDS:  # before anything computes with bits or group size
        for name, record in (manifest.get(section) or {}).items():
            if record.get("quantized") is not None:
                check_quantization(record["quantized"], f"{where}: {section}.{name}.quantized")
    check_fused(manifest["projections"], where)
    check_placements(manifest, where)
    if version < needed_version(manifest):
        raise ManifestError(f"{where}: format_version {version}, but it records what version "
                            f"{needed_version(manifest)} added (mapped embedding tables, an embedding's layout, "
                            "unread tensors or known answers)")
    checked_text_config(manifest["model"]["text_config"], f"{where}: model.text_config")
    return manifest


# Sections version 1 did not have: a version-1 reader's schema refuses a manifest holding one.
VERSION_2_SECTIONS = ("mapped_embeddings", "unread", "known_answers")


def needed_version(manifest: dict) -> int:
    """The lowest format version that describes this manifest's bundle (manifests/format.py):
    what the writer records, so that older readers refuse only the bundles they cannot read, and
    with "upgrade mlx-prepared" rather than a schema error."""
    from_head = any("layout" in record for record in manifest["embeddings"].values())
    return 2 if from_head or any(manifest.get(s) for s in VERSION_2_SECTIONS) else 1


def check_placements(manifest: dict, where: str = MANIFEST_NAME) -> None:
    """Each embedding table is recorded once, resident or mapped, and a mapped one's file is one of
    the bundle's listed files; only the token embedding is read from the pretransposed head, whose
    record must be there (under the same key) to read from."""
    mapped = manifest.get("mapped_embeddings") or {}
    for path, record in mapped.items():
        at = f"{where}: mapped_embeddings.{path}"
        if path in manifest["embeddings"]:
            raise ManifestError(f"{at}: recorded twice, also under embeddings (a table is resident or mapped)")
        if record["file"] not in manifest["files"]:
            raise ManifestError(f"{at}: file {record['file']!r} is not listed under files")
    for path, record in manifest["embeddings"].items():
        if record.get("layout", STANDARD) == STANDARD:
            continue
        at = f"{where}: embeddings.{path}"
        head = manifest["projections"].get(LM_HEAD) or {}
        if path != EMBED_TOKENS or head.get("layout") != PRETRANSPOSED or head.get("key") != record["key"]:
            raise ManifestError(f"{at}: only {EMBED_TOKENS} may be read from the pretransposed LM head, and only "
                                f"where {LM_HEAD} is recorded pretransposed under the same key")


def fused_group(path: str) -> tuple[str, str, tuple[str, ...]] | None:
    """(group name, layer prefix, member paths in order) of a fused module path, or None."""
    for name, (module, members) in FUSED_GROUPS.items():
        if path.endswith("." + module):
            base = path[: -len(module)]
            return name, base, tuple(base + m for m in members)
    return None


def check_fused(projections: dict, where: str = MANIFEST_NAME) -> None:
    """Every fused record: a known group, exactly its members in order, none of them also
    recorded on its own or in another fused record (each projection is covered once), and member
    rows adding up to the fused weight's output dimension."""
    claimed: dict[str, str] = {}  # member path -> the fused record listing it
    for path, record in projections.items():
        members = record.get("fused")
        if members is None:
            continue
        at = f"{where}: projections.{path}"
        group = fused_group(path)
        if group is None:
            known = ", ".join(m for m, _ in FUSED_GROUPS.values())
            raise ManifestError(f"{at}: fused, but not a module that fuses (known: {known})")
        name, _, want = group
        got = [m["path"] for m in members]
        for m in want:
            if m not in got:
                raise ManifestError(f"{at}: fused record lacks member {m} (a {name} group is "
                                    f"{', '.join(w.rsplit('.', 1)[-1] for w in want)}, in that order)")
        if got != list(want):
            raise ManifestError(f"{at}: fused members {got} are not exactly {list(want)} in that order")
        for m in got:
            if m in projections:
                raise ManifestError(f"{where}: projections.{m}: covered twice, by its own record and as a "
                                    f"member of {path}")
            if m in claimed:
                raise ManifestError(f"{where}: projections.{m}: covered twice, as a member of {claimed[m]} "
                                    f"and of {path}")
            claimed[m] = path
        shape = list(record["shape"])
        if len(shape) != 2:
            raise ManifestError(f"{at}: fused weight shape {shape} is not a matrix")
        rows = Storage.of(record, at).dims(shape)[0]
        total = sum(m["out"] for m in members)
        if total != rows:
            raise ManifestError(f"{at}: member outs {[m['out'] for m in members]} sum to {total}, but the "
                                f"{record['layout']} shape {shape} has {rows} output rows")
        for m in members:
            if "source_shape" in m and (len(m["source_shape"]) != 2 or m["source_shape"][0] != m["out"]):
                raise ManifestError(f"{at}: member {m['path']} has out {m['out']} but source shape "
                                    f"{m['source_shape']}")


def dump_manifest(manifest: dict) -> str:
    validate_manifest(manifest, "manifest being written")
    return yaml.dump(manifest, Dumper=_Dumper, sort_keys=False, default_flow_style=None, width=100)


def manifest_digest_line(data: bytes) -> str:
    """The content of manifest.sha256 for a manifest of these bytes (as `sha256sum` writes it)."""
    return f"{hashlib.sha256(data).hexdigest()}  {MANIFEST_NAME}\n"


def write_manifest(manifest: dict, directory: str | os.PathLike) -> Path:
    """Write manifest.yaml, then its own digest beside it (format.MANIFEST_DIGEST_NAME)."""
    path = Path(directory) / MANIFEST_NAME
    data = dump_manifest(manifest).encode()
    path.write_bytes(data)
    (Path(directory) / MANIFEST_DIGEST_NAME).write_text(manifest_digest_line(data))
    return path


_DIGEST_LINE = re.compile(rf"([0-9a-f]{{64}})  {re.escape(MANIFEST_NAME)}\n?")


def recorded_manifest_digest(bundle: str | os.PathLike) -> str | None:
    """The sha256 recorded in the bundle's manifest.sha256, or None when the bundle has none."""
    path = Path(bundle) / MANIFEST_DIGEST_NAME
    try:
        raw = read_limited(path, 256, "manifest digest")  # the line is 81 bytes
    except FileNotFoundError:
        return None
    except FileRefused as e:
        raise ManifestError(str(e)) from None
    except OSError as e:
        raise ManifestError(f"{path}: unreadable ({e.strerror or e})") from None
    m = _DIGEST_LINE.fullmatch(raw.decode("ascii", errors="replace"))
    if not m:
        raise ManifestError(f"{path}: not a '<sha256>  {MANIFEST_NAME}' line")
    return m.group(1)


def load_manifest(path: str | os.PathLike) -> dict:
    """Parse and validate one manifest file; every failure is a one-line ManifestError."""
    path = Path(path)
    try:
        text = read_limited(path, MANIFEST_LIMIT, "manifest").decode("utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{path}: no manifest") from None
    except FileRefused as e:
        raise ManifestError(str(e)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: unreadable ({e})") from None
    try:
        data = parse_yaml(text)
    except NotParsed as e:
        raise ManifestError(f"{path}: {e}") from None
    try:
        return validate_manifest(data, str(path))
    except RecursionError:
        raise ManifestError(f"{path}: nested too deeply to be a manifest") from None


def read_manifest(bundle: str | os.PathLike) -> dict:
    return load_manifest(Path(bundle) / MANIFEST_NAME)
