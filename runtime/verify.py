"""`verify BUNDLE`: replay the manifest against the files on disk.

Re-hashes every file the manifest lists (size and sha256), flags files it does not list, and
checks every projection and embedding (and every tensor kept for another reader, `unread`)
against the safetensors headers: the key is where the
index says, the stored dtype and shape are the recorded ones, the shape fits the layout
(`standard` keeps the source shape, `pretransposed` stores it reversed, `--quantize` packs its
rows), and the tensors stored beside it (a quantized one's scales and biases) are there with
their shapes (manifests/records.py). A fused record (q/k/v, gate/up) is checked like any other
against its members' stacked source shape; that its members add up was checked when the
manifest was read. A table placed `mapped` is checked the same way against the header of its own
file, which holds its tensors alone. Only headers are read for that (runtime/bundle.py); the
weights themselves are only hashed. The manifest itself is checked against the
digest recorded beside it (manifest.sha256), and no file the manifest or the index names may lead
outside the bundle (absolute, `..`, or a symlink to elsewhere).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from manifests import INDEX_NAME, MANIFEST_DIGEST_NAME, MANIFEST_NAME, ManifestError, recorded_manifest_digest
from manifests.files import TOKENIZER_LIMIT, not_regular, open_regular_file, read_limited
from manifests.records import Storage, mapped_files, records, unread
from manifests.safetensors_header import DTYPE_NAMES
from manifests.vocab import tokenizer_problem
from runtime.assemble import build_model
from runtime.bundle import outside_bundle, read_bundle_manifest, read_header, read_index, shard_names

_CHUNK = 8 << 20


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open_regular_file(path) as f:  # never blocks on a FIFO nor reads a device
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_manifest_digest(path: Path) -> tuple[list[str], bool]:
    """(problems, whether a digest was recorded) for the manifest file itself."""
    try:
        want = recorded_manifest_digest(path)
    except ManifestError as e:
        return [str(e)], True
    if want is None:
        return [], False
    if sha256_of(path / MANIFEST_NAME) != want:
        return [f"{path / MANIFEST_NAME}: sha256 differs from {MANIFEST_DIGEST_NAME} (edited after conversion)"], True
    return [], True


def check_files(path: Path, manifest: dict) -> list[str]:
    problems = []
    listed = manifest["files"]
    for name, want in listed.items():
        escape = outside_bundle(path, name, MANIFEST_NAME)
        if escape:
            problems.append(escape)
            continue
        f = path / name
        if not os.path.lexists(f):
            problems.append(f"{f}: missing (listed in {MANIFEST_NAME})")
            continue
        why = not_regular(f)
        if why:
            problems.append(f"{f}: {why}")
            continue
        size = f.stat().st_size
        if size != want["bytes"]:
            problems.append(f"{f}: {size} bytes, {MANIFEST_NAME} says {want['bytes']}")
        elif sha256_of(f) != want["sha256"]:
            problems.append(f"{f}: sha256 differs from {MANIFEST_NAME}")
    for f in sorted(p for p in path.rglob("*") if not p.is_dir()):
        name = f.relative_to(path).as_posix()
        if name not in (MANIFEST_NAME, MANIFEST_DIGEST_NAME) and name not in listed:
            problems.append(f"{f}: not listed in {MANIFEST_NAME}")
    return problems


def stored_tensors(path: Path, manifest: dict) -> tuple[dict[str, tuple[str, dict]], dict | None, list[str], set]:
    """key -> (shard name, header entry) over every shard; the index's weight map; problems; the
    shards whose header could not be read (their tensors are not reported again one by one)."""
    problems: list[str] = []
    index = None
    if (path / INDEX_NAME).is_file():
        try:
            index = read_index(path)
        except ValueError as e:
            problems.append(str(e))
    shards = shard_names(manifest, index)
    tensors: dict[str, tuple[str, dict]] = {}
    unreadable = set()
    for name in shards:
        escape = outside_bundle(path, name, INDEX_NAME if index else MANIFEST_NAME)
        if escape:
            if index:  # the manifest's own list was reported by check_files
                problems.append(escape)
            unreadable.add(name)
            continue
        f = path / name
        if not f.is_file():
            if name not in manifest["files"]:
                problems.append(f"{f}: named in {INDEX_NAME} but missing")
            unreadable.add(name)  # a missing listed file was reported by check_files
            continue
        header = _add_header(f, name, tensors, problems, unreadable)
        if header is None:
            continue
        misplaced = [key for key in header if index is not None and index.get(key) != name and tensors[key][0] == name]
        if misplaced:  # one line per shard: a swapped or renamed shard misplaces all of its tensors
            more = f" (and {len(misplaced) - 1} more of its tensors)" if len(misplaced) > 1 else ""
            problems.append(f"{f}: tensor {misplaced[0]} is not where {INDEX_NAME} says "
                            f"({index.get(misplaced[0])}){more}")
    if index is not None:
        for key, name in index.items():
            if key not in tensors and name not in unreadable:
                problems.append(f"{path / name}: tensor {key} named in {INDEX_NAME} is not in the shard")
    for name in mapped_files(manifest):  # a mapped table's own file (missing or escaping: check_files said)
        f = path / name
        if name in shards or outside_bundle(path, name, MANIFEST_NAME) or not f.is_file():
            if name in shards:
                problems.append(f"{path / INDEX_NAME}: maps tensors to {name}, the file of a mapped table")
            unreadable.add(name)
            continue
        _add_header(f, name, tensors, problems, unreadable)
    return tensors, index, problems, unreadable


def _add_header(f: Path, name: str, tensors: dict, problems: list[str], unreadable: set) -> dict | None:
    """The header of the bundle file `name` (at `f`), its tensors added to `tensors` (one that another
    file holds already is a problem); None, and `name` unreadable, when it cannot be read."""
    try:
        header = read_header(f)
    except (OSError, ValueError) as e:
        problems.append(f"{f}: malformed safetensors header ({e})")
        unreadable.add(name)
        return None
    for key, info in header.items():
        if key in tensors:
            problems.append(f"{f}: tensor {key} is also in {tensors[key][0]}")
        tensors.setdefault(key, (name, info))
    return header


def check_tensors(manifest: dict, tensors: dict[str, tuple[str, dict]], index: dict | None = None,
                  unreadable: set = frozenset()) -> list[str]:
    """Each manifest record against the stored headers (manifests/records.py says which tensors
    it stores); a tensor whose shard could not be read (already reported) is skipped rather than
    reported again."""
    problems = []

    def lookup(where: str, key: str) -> tuple[str, list[int], str] | None:
        """(shard, shape, dtype) of a stored tensor, or None (reported once, unless unreadable)."""
        if key not in tensors:
            if not (unreadable and (index.get(key) in unreadable if index else True)):
                problems.append(f"{where}: tensor {key} is in no shard")
            return None
        shard, info = tensors[key]
        return shard, list(info["shape"]), DTYPE_NAMES.get(info["dtype"], info["dtype"])

    for where, kind, _, record in records(manifest):
        key = record["key"]
        found = lookup(where, key)
        if found is None:
            continue
        shard, shape, dtype = found
        file = kind.file(record)
        if file is not None and shard != file:
            problems.append(f"{where}: {key} is in {shard}, not in {file}, the mapped table's own file")
            continue
        if shape != list(record["shape"]) or dtype != record["dtype"]:
            problems.append(f"{where}: {shard} holds {key} as {dtype} {shape}, "
                            f"the manifest says {record['dtype']} {list(record['shape'])}")
            continue
        try:
            storage = Storage.of(record, where)
            stored = kind.stored(record, where)
        except ManifestError as e:
            problems.append(str(e))
            continue
        if kind.laid_out:  # a projection: its stored shape follows from its source's [out, in]
            source = list(record["source_shape"])
            want = list(storage.weight_shape(*source)) if len(source) == 2 else source
            passed_through = storage.quantized is not None and shape == source  # an MLX-quantized source
            if shape != want and not passed_through:
                problems.append(f"{where}: {storage.layout} {key} in {shard} is {shape}; "
                                f"source shape {source} means it should be {want}")
                continue
        for tensor in stored[1:]:  # the first that differs: scales and biases follow one rule
            found = lookup(where, tensor.key)
            if found is not None and found[1] != list(tensor.shape):
                problems.append(f"{where}: {found[0]} holds {tensor.key} as {found[1]}, where the record means "
                                f"{list(tensor.shape)}")
            if found is None or found[1] != list(tensor.shape):
                break
    for where, key, entry in unread(manifest):  # stored for another reader (mlx-lm): as recorded
        found = lookup(where, key)
        if found is not None and (found[1] != list(entry["shape"]) or found[2] != entry["dtype"]):
            problems.append(f"{where}: {found[0]} holds {key} as {found[2]} {found[1]}, "
                            f"the manifest says {entry['dtype']} {list(entry['shape'])}")
    return problems


def verify_bundle(path, manifest: dict | None = None) -> list[str]:
    """Every way the bundle differs from its manifest, one line each, files first.

    An empty list means the bundle is exactly what its manifest describes. A directory that is
    not a bundle, or whose manifest is unreadable, raises ManifestError (one line).
    """
    path = Path(path)
    if manifest is None:
        manifest = read_bundle_manifest(path)
    problems = check_manifest_digest(path)[0] + check_files(path, manifest)
    tensors, index, header_problems, unreadable = stored_tensors(path, manifest)
    problems += header_problems + check_tensors(manifest, tensors, index, unreadable) + check_tokenizer(path, manifest)
    return problems or check_model(path, manifest)


def check_model(path: Path, manifest: dict) -> list[str]:
    """What only the model shows, once every record matches its tensors: a record whose key is
    not where the model looks, a shape the text config does not imply, a module without a
    record, a stored tensor nothing places (runtime/assemble.py's build_model, headers only). A
    manifest edited that way, its digest recorded again, passed verify and failed to load."""
    try:
        build_model(path, manifest)
    except ManifestError as e:  # BundleError is one
        return [str(e)]
    return []


def check_tokenizer(path: Path, manifest: dict) -> list[str]:
    """The bundle's tokenizer.json must produce only ids the model has embeddings for (a file that
    cannot be read at all was reported by check_files)."""
    name = "tokenizer.json"
    if name not in manifest["files"] or outside_bundle(path, name, MANIFEST_NAME):
        return []
    try:
        raw = read_limited(path / name, TOKENIZER_LIMIT, name)
    except OSError:
        return []
    problem = tokenizer_problem(raw, manifest["model"]["text_config"]["vocab_size"])
    return [f"{path / name}: {problem}"] if problem else []


def verify_command(path) -> int:
    """The CLI's `verify BUNDLE`: one line per problem on stderr; 0 clean, 1 differs, 2 not a bundle."""
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
    # The words `convert` reports a bundle in: its tensors, and the manifest records among them.
    tensors = len(stored_tensors(Path(path), manifest)[0])
    described = sum(1 for _ in records(manifest))
    signed = (f"{MANIFEST_NAME} matches {MANIFEST_DIGEST_NAME}" if check_manifest_digest(Path(path))[1]
              else f"no {MANIFEST_DIGEST_NAME}: {MANIFEST_NAME} itself is unchecked")
    print(f"ok: {path}: {len(manifest['files'])} files, {tensors} tensors and {described} manifest records match "
          f"{MANIFEST_NAME}; {signed}")
    return 0
