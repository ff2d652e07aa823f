"""A model from a bundle's manifest and shards, every record checked: the part of loading that
`verify` runs too (headers only, weights as lazy arrays), so that a bundle it passes is one that
loads. runtime/loader.py adds the target check, the optional verification and the tokenizer.

The promise kept here: no transpose, copy, cast, concatenation or renaming of any weight.
`mx.load` maps each tensor lazily and `load_weights` puts that very array into the module the
manifest named (tests/test_loader.py holds the check).
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from manifests import MANIFEST_NAME, ManifestError
from manifests.records import records, unread
from manifests.safetensors_header import DTYPE_NAMES
from runtime.architectures import architecture
from runtime.bundle import BundleError, mapped_headers, shard_files
from runtime.mapped import MAPPABLE, MappedTable


def read_shards(path: Path, names: list[str]) -> tuple[dict[str, mx.array], dict[str, str]]:
    """Every tensor of the bundle as a lazy `mx.load` array, and the shard each came from."""
    arrays: dict[str, mx.array] = {}
    origin: dict[str, str] = {}
    for name in names:
        try:
            shard = mx.load(str(path / name))
        except (RuntimeError, ValueError, OSError) as e:
            raise BundleError(f"{path / name}: unreadable safetensors ({e})") from None
        for key, array in shard.items():
            if key in arrays:
                raise BundleError(f"{path / name}: tensor {key} also in {origin[key]}")
            arrays[key] = array
            origin[key] = name
    return arrays, origin


def dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def check_records(manifest: dict, arrays: dict[str, mx.array], origin: dict[str, str],
                  mapped: dict[str, tuple[dict, int]] | None = None) -> None:
    """Each manifest record must describe the tensor it names exactly, and every other tensor it
    stores (manifests/records.py: scales, biases, a bias) must be there: in the shards, or, for a
    mapped table, in its own file (`mapped`: bundle.mapped_headers), which holds nothing else.
    Say both when not."""
    files = {file: {k: (list(e.shape), DTYPE_NAMES[e.dtype]) for k, e in entries.items()}
             for file, (entries, _) in (mapped or {}).items()}
    for where, kind, _, record in records(manifest):
        file = kind.file(record)
        if file is not None:  # a mapped table: its own file's header
            check_mapped(where, file, record, kind.stored(record, where), files[file])
            continue
        check_stored(where, record["key"], record, arrays, origin)
        for extra in kind.stored(record, where)[1:]:
            if extra.key not in arrays:
                raise BundleError(f"{where} needs tensor {extra.key}, which no shard holds")
    for where, key, entry in unread(manifest):
        check_stored(where, key, entry, arrays, origin)


def check_mapped(where: str, file: str, record: dict, stored: list, held: dict[str, tuple[list, str]]) -> None:
    """A mapped table's own file (its header: key -> (shape, dtype)) holds the record's tensors
    (`stored`, manifests/records.py) as recorded, in a dtype a mapped table is read as, and nothing else."""
    key = record["key"]
    if key not in held:
        raise BundleError(f"{where} names tensor {key}, which {file} lacks")
    want, found = (list(record["shape"]), record["dtype"]), held[key]
    if want != found:
        raise BundleError(f"{where} says {key} is {want[1]} {want[0]}, but {file} holds {found[1]} {found[0]}")
    for extra in stored[1:]:
        if extra.key not in held:
            raise BundleError(f"{where} needs tensor {extra.key}, which {file} lacks")
        if held[extra.key][0] != list(extra.shape):
            raise BundleError(f"{where} needs {extra.key} of shape {list(extra.shape)}, but {file} holds "
                              f"{held[extra.key][0]}")
    others = sorted(set(held) - {t.key for t in stored})
    if others:
        raise BundleError(f"{where}: {file} also holds {others[0]}; a mapped table's file holds its own tensors alone")
    for k, (_, dtype) in held.items():
        if dtype not in MAPPABLE:
            raise BundleError(f"{where}: {file} holds {k} as {dtype}, which a mapped table is not stored as")


def open_mapped(path: Path, manifest: dict, headers: dict[str, tuple[dict, int]]) -> dict[str, MappedTable]:
    """Every table placed `mapped`, by path: its file memory-mapped, not read (runtime/mapped.py)."""
    tables = {}
    for where, kind, table_path, record in records(manifest):
        file = kind.file(record)
        if file is not None:
            entries, start = headers[file]
            tables[table_path] = MappedTable(path / file, record, entries, start, where)
    return tables


def check_stored(where: str, key: str, said: dict, arrays: dict[str, mx.array], origin: dict[str, str]) -> None:
    """The tensor `key` is in a shard with the shape and dtype the manifest entry `where` says."""
    if key not in arrays:
        raise BundleError(f"{where} names tensor {key}, which no shard holds")
    stored = arrays[key]
    want = (list(said["shape"]), said["dtype"])
    found = (list(stored.shape), dtype_name(stored.dtype))
    if want != found:
        raise BundleError(f"{where} says {key} is {want[1]} {want[0]}, but {origin[key]} holds {found[1]} {found[0]}")


def put_weights(model, arrays: dict[str, mx.array], path: Path, unread_keys=()) -> None:
    """The arrays go into the modules as they are, by their own names; nothing else. The tensors
    the manifest records as unread (stored for another reader) stay out, untouched."""
    skip = set(unread_keys)
    arrays = {k: a for k, a in arrays.items() if k not in skip}
    wanted = {k for k, _ in tree_flatten(model.parameters())}
    missing, extra = sorted(wanted - arrays.keys()), sorted(arrays.keys() - wanted)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) the model needs are missing (first: {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} tensor(s) the model has no place for (first: {extra[0]})")
        raise BundleError(f"{path}: " + "; ".join(parts))
    try:
        model.load_weights(list(arrays.items()), strict=True)
    except ValueError as e:
        raise BundleError(f"{path}: {str(e).splitlines()[0]}") from None


def build_model(path: Path, manifest: dict):
    """The model the manifest describes, its weights the shards' lazy arrays (nothing read but
    headers): every record checked against the stored tensors and against the model the text
    config builds (a key where the runtime looks for it, a shape the config implies, every
    module covered, every stored tensor placed); BundleError (one line) otherwise. `verify` runs
    it too, so that a bundle it passes is one that loads."""
    arrays, origin = read_shards(path, shard_files(path, manifest))
    headers = mapped_headers(path, manifest)
    try:
        check_records(manifest, arrays, origin, headers)
    except BundleError:
        raise
    except ManifestError as e:  # a record no writer makes (manifests/records.py), like those Model refuses
        raise BundleError(f"{path / MANIFEST_NAME}: {str(e).removeprefix(MANIFEST_NAME + ': ')}") from None
    mapped = open_mapped(path, manifest, headers)
    try:
        model = architecture(manifest["model"]["architecture"]).Model(
            manifest["model"]["text_config"], manifest["projections"], manifest["embeddings"], mapped=mapped)
    except ManifestError as e:
        raise BundleError(f"{path / MANIFEST_NAME}: {str(e).removeprefix(MANIFEST_NAME + ': ')}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise BundleError(f"{path / MANIFEST_NAME}: model.text_config: {e}") from None
    put_weights(model, arrays, path, [key for _, key, _ in unread(manifest)])
    object.__setattr__(model, "manifest", manifest)
    object.__setattr__(model, "bundle_path", path)
    return model
