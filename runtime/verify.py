"""`verify BUNDLE`: replay the manifest against the files on disk.

Re-hashes every file the manifest lists (size and sha256), flags files it does not list, and
checks every projection and embedding against the safetensors headers: the key is where the
index says, the stored dtype and shape are the recorded ones, and the shape fits the layout
(`standard` keeps the source shape, `pretransposed` stores it reversed). Only headers are read
for that; the weights themselves are only hashed.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from pathlib import Path

from manifests import INDEX_NAME, MANIFEST_NAME, ManifestError
from manifests.format import PRETRANSPOSED, STANDARD

# Safetensors dtype codes -> the names the manifest uses (MLX's names).
DTYPE_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E4M3": "float8_e4m3", "F8_E5M2": "float8_e5m2",
    "I16": "int16", "U16": "uint16", "F16": "float16", "BF16": "bfloat16",
    "I32": "int32", "U32": "uint32", "F32": "float32",
    "I64": "int64", "U64": "uint64", "F64": "float64",
}
_MAX_HEADER = 100 << 20
_CHUNK = 8 << 20


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_header(path: Path) -> dict[str, dict]:
    """key -> {dtype, shape, data_offsets} of one safetensors file; ValueError if malformed."""
    size = path.stat().st_size
    with path.open("rb") as f:
        first = f.read(8)
        if len(first) < 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", first)
        if n > min(size - 8, _MAX_HEADER):
            raise ValueError(f"header length {n} does not fit in the file")
        header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError("header is not a mapping")
    header.pop("__metadata__", None)
    for key, info in header.items():
        if not (isinstance(info, dict) and {"dtype", "shape", "data_offsets"} <= info.keys()):
            raise ValueError(f"tensor {key}: malformed header entry")
        if 8 + n + info["data_offsets"][1] > size:
            raise ValueError(f"tensor {key}: data runs past the end of the file (truncated?)")
    return header


def check_files(path: Path, manifest: dict) -> list[str]:
    problems = []
    listed = manifest["files"]
    for name, want in listed.items():
        f = path / name
        if not f.is_file():
            problems.append(f"{f}: missing (listed in {MANIFEST_NAME})")
            continue
        size = f.stat().st_size
        if size != want["bytes"]:
            problems.append(f"{f}: {size} bytes, {MANIFEST_NAME} says {want['bytes']}")
        elif sha256_of(f) != want["sha256"]:
            problems.append(f"{f}: sha256 differs from {MANIFEST_NAME}")
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        name = f.relative_to(path).as_posix()
        if name != MANIFEST_NAME and name not in listed:
            problems.append(f"{f}: not listed in {MANIFEST_NAME}")
    return problems


def stored_tensors(path: Path, manifest: dict) -> tuple[dict[str, tuple[str, dict]], dict | None, list[str]]:
    """key -> (shard name, header entry) over every shard; the index's weight map; problems."""
    problems: list[str] = []
    index = None
    if (path / INDEX_NAME).is_file():
        try:
            index = json.loads((path / INDEX_NAME).read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            problems.append(f"{path / INDEX_NAME}: unreadable index ({e})")
    shards = sorted(set(index.values())) if index else [n for n in manifest["files"] if n.endswith(".safetensors")]
    tensors: dict[str, tuple[str, dict]] = {}
    for name in shards:
        f = path / name
        if not f.is_file():
            if name in manifest["files"]:
                continue  # already reported as a missing file
            problems.append(f"{f}: named in {INDEX_NAME} but missing")
            continue
        try:
            header = read_header(f)
        except (OSError, ValueError) as e:
            problems.append(f"{f}: malformed safetensors header ({e})")
            continue
        for key, info in header.items():
            if index is not None and index.get(key) != name:
                problems.append(f"{f}: tensor {key} is not where {INDEX_NAME} says ({index.get(key)})")
            tensors[key] = (name, info)
    if index is not None:
        for key, name in index.items():
            if key not in tensors and (path / name).is_file():
                problems.append(f"{path / name}: tensor {key} named in {INDEX_NAME} is not in the shard")
    return tensors, index, problems


def check_tensors(manifest: dict, tensors: dict[str, tuple[str, dict]]) -> list[str]:
    problems = []
    entries = [("projections", m, r) for m, r in manifest["projections"].items()]
    entries += [("embeddings", m, r) for m, r in manifest["embeddings"].items()]
    for section, module, record in entries:
        where = f"{MANIFEST_NAME}: {section}.{module}"
        key = record["key"]
        if key not in tensors:
            problems.append(f"{where}: tensor {key} is in no shard")
            continue
        shard, info = tensors[key]
        shape, dtype = list(info["shape"]), DTYPE_NAMES.get(info["dtype"], info["dtype"])
        if shape != list(record["shape"]) or dtype != record["dtype"]:
            problems.append(f"{where}: {shard} holds {key} as {dtype} {shape}, "
                            f"the manifest says {record['dtype']} {list(record['shape'])}")
            continue
        if section == "projections":
            source = list(record["source_shape"])
            layout = record["layout"]
            want = source[::-1] if layout == PRETRANSPOSED else source
            if layout not in (STANDARD, PRETRANSPOSED):
                problems.append(f"{where}: unknown layout {layout!r}")
            elif shape != want:
                problems.append(f"{where}: {layout} {key} in {shard} is {shape}; "
                                f"source shape {source} means it should be {want}")
    return problems


def verify_bundle(path, manifest: dict | None = None) -> list[str]:
    """Every way the bundle differs from its manifest, one line each, files first.

    An empty list means the bundle is exactly what its manifest describes. A directory that is
    not a bundle, or whose manifest is unreadable, raises ManifestError (one line).
    """
    path = Path(path)
    if manifest is None:
        from runtime.loader import read_bundle_manifest

        manifest = read_bundle_manifest(path)
    problems = check_files(path, manifest)
    tensors, _, header_problems = stored_tensors(path, manifest)
    return problems + header_problems + check_tensors(manifest, tensors)


def verify_command(path) -> int:
    """The CLI's `verify BUNDLE`: one line per problem on stderr; 0 clean, 1 differs, 2 not a bundle."""
    from runtime.loader import read_bundle_manifest

    try:
        manifest = read_bundle_manifest(Path(path))
        problems = verify_bundle(path, manifest)
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    tensors = len(manifest["projections"]) + len(manifest["embeddings"])
    print(f"ok: {path}: {len(manifest['files'])} files and {tensors} tensor records match {MANIFEST_NAME}")
    return 0
