"""Reading a bundle's own files: its manifest, its index, its shards' headers, its tokenizer
and configs, and the rule that no file it names or reads leads outside it.

Loading (runtime/loader.py), verifying (runtime/verify.py) and publishing (runtime/publish.py) all
read bundles this way, so the rules live here, below the three of them, and each says the same
thing about the same defect.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import mlx.core as mx

from manifests import INDEX_NAME, MANIFEST_NAME, ManifestError, read_manifest, target_for_device
from manifests.files import FileRefused, open_regular_file, read_limited
from manifests.format import MANIFEST_LIMIT
from manifests.records import mapped_files
from manifests.safetensors_header import Entry, HeaderError, read_header_file


class BundleError(ManifestError):
    """A bundle that cannot be loaded as it is; the message is one line a user can act on."""


def convert_command(source: str, target: str, revision: str | None = None) -> str:
    """The command that prepares `source` for `target`: a checkpoint folder, or a hub repo id at
    `revision` (then `source` is the id). OUT is a folder of the current directory named after the
    source (beside the source where the current directory is inside it: OUT may not be in SOURCE)."""
    if revision is not None:
        name, out_dir = source.rstrip("/").rsplit("/", 1)[-1], None
        source_args = f"{shlex.quote(source)} --revision {shlex.quote(revision)}"
    else:
        folder = Path(source).resolve()
        name, source_args = folder.name, shlex.quote(str(source))
        out_dir = folder.parent if Path.cwd().resolve().is_relative_to(folder) else None
    out = f"{name}-{target}" if out_dir is None else str(out_dir / f"{name}-{target}")
    return f"python -m convert --target {target} {source_args} {shlex.quote(out)}"


def source_command(source: dict, target: str) -> str:
    """The command that prepares the checkpoint a manifest's `source` records for `target`: the
    hub repo at the recorded commit, the local folder where it is on this machine, else a
    placeholder for a copy of it (a bundle from the hub, converted on another machine)."""
    if source.get("kind") == "hub" and source.get("repo_id"):
        return convert_command(source["repo_id"], target, source.get("commit") or source.get("revision") or "main")
    path = source.get("path")
    if path and Path(path).is_dir():
        return convert_command(path, target)
    return (f"python -m convert --target {target} CHECKPOINT OUT, CHECKPOINT being a copy of the checkpoint "
            f"it was converted from ({path or 'not recorded'}, not on this machine)")


def device_target() -> str:
    return target_for_device(mx.device_info())


def read_bundle_manifest(path: Path) -> dict:
    """The manifest, or one line saying what to run when `path` is not a prepared bundle."""
    if not path.is_dir():
        raise BundleError(f"{path}: no such bundle directory")
    if not os.path.lexists(path / MANIFEST_NAME):
        what = "a model checkpoint, not a prepared bundle" if (path / "config.json").exists() else "not a prepared bundle"
        raise BundleError(
            f"{path}: no {MANIFEST_NAME} ({what}); prepare it first: {convert_command(str(path), device_target())}"
        )
    inside_bundle(path, MANIFEST_NAME)
    return read_manifest(path)


def read_header(path: Path) -> dict[str, dict]:
    """key -> {dtype, shape, data_offsets} of one safetensors file, checked as strictly as the
    converter checks a source (manifests.safetensors_header): HeaderError (a ValueError) naming
    the tensor if malformed, OSError if unreadable."""
    entries, _, _ = read_header_file(path)
    return {e.name: {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.begin, e.begin + e.nbytes]}
            for e in entries}


def containment(bundle: Path) -> str:
    """The directory every file of `bundle` must resolve inside: the bundle itself, or, for a
    bundle in the hub cache (`models--org--name/snapshots/<commit>/...`, whose files are symlinks
    into the repo's `blobs/`), that repo's cache folder."""
    for parent in [bundle, *bundle.parents]:
        if parent.name == "snapshots" and parent.parent.name.startswith("models--"):
            return os.path.realpath(parent.parent)
    return os.path.realpath(bundle)


def outside_bundle(bundle: Path, name: object, where: str) -> str | None:
    """A one-line problem if the file `name` (as `where` lists it) leads outside the bundle: an
    absolute path, a `..`, or a symlink to elsewhere; None if it stays inside."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in Path(name).parts:
        return f"{bundle}: {where} lists file {name!r}, which is outside the bundle"
    path = bundle / name
    if os.path.lexists(path):
        real, root = os.path.realpath(path), containment(bundle)
        if not real.startswith(root.rstrip(os.sep) + os.sep):
            return f"{path}: a symlink to {real}, outside the bundle ({where} lists it)"
    return None


def read_index(path: Path) -> dict[str, str]:
    """The weight map of the bundle's index file; ValueError (one line) if it is not one."""
    try:
        with open_regular_file(path / INDEX_NAME) as f:  # never blocks on a FIFO nor reads a device
            raw = f.read(MANIFEST_LIMIT + 1)
        if len(raw) > MANIFEST_LIMIT:
            raise ValueError(f"more than {MANIFEST_LIMIT} bytes")
        weight_map = json.loads(raw)["weight_map"]
    except FileRefused as e:
        raise ValueError(f"{path / INDEX_NAME}: unreadable index ({e.strerror})") from None
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise ValueError(f"{path / INDEX_NAME}: unreadable index ({(str(e).splitlines() or [type(e).__name__])[0][:80]})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{path / INDEX_NAME}: weight_map does not map tensor names to file names")
    if not weight_map:
        raise ValueError(f"{path / INDEX_NAME}: weight_map is empty")
    return weight_map


def shard_names(manifest: dict, index: dict[str, str] | None) -> list[str]:
    """The shards of a bundle: the files its index maps tensors to, or (a bundle of one shard has
    no index) the safetensors files its manifest lists, but for the files of mapped tables
    (manifests/records.py), which are mapped, never loaded."""
    if index is not None:
        return sorted(set(index.values()))
    mapped = set(mapped_files(manifest))
    return [n for n in manifest["files"] if n.endswith(".safetensors") and n not in mapped]


def shard_files(path: Path, manifest: dict) -> list[str]:
    """The safetensors files of the bundle, as its index (or the single file) names them."""
    index = None
    if (path / INDEX_NAME).exists():
        try:
            index = read_index(path)
        except OSError as e:
            raise BundleError(f"{path / INDEX_NAME}: unreadable index ({e.strerror or e})") from None
        except ValueError as e:
            raise BundleError(str(e)) from None
    names = shard_names(manifest, index)
    mapped = set(mapped_files(manifest))
    for name in names:
        escape = outside_bundle(path, name, INDEX_NAME if index is not None else MANIFEST_NAME)
        if escape:
            raise BundleError(escape)
        if name in mapped:
            raise BundleError(f"{path / INDEX_NAME}: maps tensors to {name}, the file of a mapped table, which is "
                              "never loaded as a shard")
        if name not in manifest["files"]:
            raise BundleError(f"{path / name}: shard not listed in {MANIFEST_NAME}")
        if not os.path.lexists(path / name):
            raise BundleError(f"{path / name}: shard missing")
        check_shard(path, name)
    if not names:
        raise BundleError(f"{path}: no safetensors shard in the bundle")
    return names


def check_shard(path: Path, name: str) -> None:
    """The shard's header only (no weight is read). mx.load maps a shard lazily and accepts a
    header whose tensors overlap, leave holes or are followed by stray bytes; refuse those here,
    by file and tensor, with the converter's own rules (manifests.safetensors_header)."""
    try:
        read_header_file(path / name)
    except HeaderError as e:
        raise BundleError(f"{path / name}: malformed safetensors header ({e})") from None
    except OSError as e:
        raise BundleError(f"{path / name}: unreadable ({e.strerror or e})") from None


def mapped_headers(path: Path, manifest: dict) -> dict[str, tuple[dict[str, Entry], int]]:
    """The header of each mapped table's file (manifests/records.py `Kind.file`): name ->
    (entries by key, where its data begins). Headers only: not a byte of a table is read."""
    headers = {}
    for name in mapped_files(manifest):
        escape = outside_bundle(path, name, MANIFEST_NAME)
        if escape:
            raise BundleError(escape)
        if not os.path.lexists(path / name):
            raise BundleError(f"{path / name}: missing (the file of a mapped table)")
        try:
            entries, _, start = read_header_file(path / name)
        except HeaderError as e:
            raise BundleError(f"{path / name}: malformed safetensors header ({e})") from None
        except OSError as e:
            raise BundleError(f"{path / name}: unreadable ({e.strerror or e})") from None
        headers[name] = ({e.name: e for e in entries}, start)
    return headers


# The small files the runtime reads besides the manifest and the shards (tokenizer.json,
# tokenizer_config.json, config.json, generation_config.json) come through these two on a plain
# load as with `verify`: inside the bundle (a symlink to elsewhere is refused), a regular file
# (checked by type before it is opened, manifests/files.py), read whole only up to a byte limit
# counted as it is read.

def inside_bundle(bundle: str | os.PathLike, name: str) -> Path:
    """`bundle/name`, or BundleError when that path resolves outside the bundle."""
    path = Path(bundle) / name
    if os.path.lexists(path):
        real, root = os.path.realpath(path), containment(Path(bundle))
        if not real.startswith(root.rstrip(os.sep) + os.sep):
            raise BundleError(f"{path}: a symlink to {real}, outside the bundle; refusing to read it")
    return path


def read_bundle_file(bundle: str | os.PathLike, name: str, limit: int, what: str) -> bytes | None:
    """The bytes of `bundle/name` (None when the bundle has no such file), through the door above."""
    path = inside_bundle(bundle, name)
    if not os.path.lexists(path):
        return None
    try:
        return read_limited(path, limit, what)
    except FileNotFoundError:
        return None
    except OSError as e:  # manifests.files.FileRefused (a FIFO, a device, too large) or an I/O error
        raise BundleError(f"{path}: {e.strerror or e}") from None
