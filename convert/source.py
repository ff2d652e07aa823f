"""Where a checkpoint comes from: a local directory or a hub snapshot, read and validated.

Opening a source reads `config.json`, the index (if sharded) and every safetensors header, and
refuses anything it cannot stand behind, with one line naming the file and the tensor. No tensor
data is read here.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from convert.errors import ConvertError
from convert.gemma3n import ARCHITECTURES
from convert.safetensors_io import Header, read_header
from manifests import MANIFEST_NAME, ManifestError, read_manifest
from manifests.config import check_eos_token_ids, checked_text_config
from manifests.files import (
    CONFIG_LIMIT,
    TOKENIZER_LIMIT,
    FileRefused,
    NotParsed,
    is_regular,
    not_regular,
    parse_json,
    read_limited,
)
from manifests.format import INDEX_NAME, revision_problem
from manifests.vocab import tokenizer_problem

SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
TOKENIZER_NAME = "tokenizer.json"

# Copied into the bundle byte for byte when present (plus chat_template*).
COPIED_FILES = (TOKENIZER_NAME, "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                GENERATION_CONFIG_NAME)
COPIED_PREFIX = "chat_template"

# What a hub snapshot needs; the towers' preprocessor files come along as json, harmlessly.
HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "chat_template*"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# Source naming -> prefix of the decoder's tensors. `hf` and `mlx-lm` share a prefix and differ in
# whether the vision/audio towers are present.
NAMING_PREFIXES = {
    "hf": "model.language_model.",
    "mlx-lm": "model.language_model.",
    "mlx-vlm": "language_model.model.",
    "hf-text": "model.",
}
TOWERS = ("vision_tower", "audio_tower", "embed_vision", "embed_audio")

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class Source:
    root: Path  # directory the files are read from
    display: str  # how messages name the source
    kind: str  # "local" or "hub"
    config: dict
    text_config: dict
    model_type: str
    naming: str
    headers: dict[str, Header]  # safetensors file (relative) -> header, in reading order
    tensors: dict[str, tuple[str, object]]  # source key -> (file, TensorInfo), in reading order
    index_name: str | None
    copied_files: list[str]  # relative names copied into the bundle (config.json first)
    generation_config: dict | None
    metadata_hashes: dict[str, str] = field(default_factory=dict)  # small files read whole: sha256
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    containment: Path | None = None  # every file read must resolve inside this

    def path(self, name: str) -> Path:
        return self.root / name

    @property
    def bytes_in(self) -> int:
        sizes = [h.size for h in self.headers.values()]
        sizes += [self.path(n).stat().st_size for n in self.copied_files]
        if self.index_name:
            sizes.append(self.path(self.index_name).stat().st_size)
        return sum(sizes)


def is_repo_id(text: str) -> bool:
    return bool(_REPO_ID.fullmatch(text)) and not Path(text).exists()


def resolve_hub(repo_id: str, revision: str | None) -> tuple[Path, str]:
    """Snapshot a hub repo (or find it in the local cache offline); return its folder and commit."""
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS)
    except Exception as e:  # the hub raises many types (HTTP, offline, cache, validation): report one line
        first = (str(e).strip().splitlines() or [""])[0]
        raise ConvertError(f"{repo_id}: cannot get it from the hub at revision {revision or 'main'} "
                           f"({type(e).__name__}: {first})") from None
    folder = Path(folder)
    # The snapshot folder of the hub cache is named after the resolved commit.
    return folder, folder.name


def _inside(path: Path, root: Path) -> bool:
    real = os.path.realpath(path)
    return real == str(root) or real.startswith(str(root) + os.sep)


def _recordable(name: str, where: str, what: str) -> None:
    """Refuse a path or file name the manifest would record (SOURCE's path, the names of the files
    read and copied) unless it is valid UTF-8: an undecodable byte in a name reaches Python as a
    lone surrogate, which YAML cannot write (it was a traceback as the manifest was written)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as e:
        offset = len(name[:e.start].encode("utf-8", "surrogateescape"))
        byte = name[e.start].encode("utf-8", "surrogateescape")[:1].hex()
        raise ConvertError(f"{where}: {what} is not valid UTF-8 (byte 0x{byte} at offset {offset}), and the "
                           "manifest records it as text; rename it") from None


def _eos(config: dict, vocab_size: int, where: str) -> None:
    """The stop ids a config declares (manifests/config.py's check), as a ConvertError."""
    try:
        check_eos_token_ids(config.get("eos_token_id"), vocab_size, where)
    except ManifestError as e:
        raise ConvertError(str(e)) from None


def _read_json(path: Path, display: str, hashes: dict[str, str], name: str) -> object:
    try:
        raw = read_limited(path, CONFIG_LIMIT, "JSON file")  # by type first: a FIFO or device is refused
    except FileRefused as e:
        raise ConvertError(f"{display}: {e.strerror}") from None
    except OSError as e:
        raise ConvertError(f"{display}: cannot read ({e.strerror})") from None
    hashes[name] = hashlib.sha256(raw).hexdigest()
    try:
        return parse_json(raw)
    except NotParsed as e:
        raise ConvertError(f"{display}: {e}") from None


def text_config_of(config: dict, display: str) -> tuple[str, dict]:
    """(model_type, text config) of a Gemma3n config.json; anything else is refused by name."""
    model_type = config.get("model_type")
    if "text_config" in config:
        text = config["text_config"]
        if model_type != "gemma3n":
            raise _not_gemma3n(config, display)
        if not isinstance(text, dict):
            raise ConvertError(f"{display}: text_config is not a mapping")
        if text.get("model_type", "gemma3n_text") != "gemma3n_text":
            raise ConvertError(f"{display}: text_config.model_type is {text['model_type']!r}, not gemma3n_text")
    elif model_type in ARCHITECTURES:
        if model_type == "gemma3n":
            raise ConvertError(f"{display}: model_type gemma3n but no text_config")
        text = config
    else:
        raise _not_gemma3n(config, display)
    try:  # the one check of every value the decoder reads (manifests/config.py), defaults filled in
        return model_type, checked_text_config(text, f"{display}: text_config" if text is not config else display)
    except ManifestError as e:
        raise ConvertError(str(e)) from None


def _not_gemma3n(config: dict, display: str) -> ConvertError:
    arch = config.get("architectures")
    what = repr(config.get("model_type")) if "model_type" in config else "missing"
    archs = f" ({', '.join(map(str, arch))})" if isinstance(arch, list) and arch else ""
    return ConvertError(f"{display}: model_type {what}{archs} is not Gemma3n; this converter handles "
                        f"model_type {' or '.join(ARCHITECTURES)} only")


def detect_naming(keys) -> str | None:
    """Which naming a checkpoint's keys use, or None if no decoder tensors are recognised."""
    keys = list(keys)
    if any(k.startswith("model.language_model.") for k in keys):
        towers = any(k.startswith(f"model.{t}.") or k.startswith(f"{t}.") for k in keys for t in TOWERS)
        return "hf" if towers else "mlx-lm"
    if any(k.startswith("language_model.model.") for k in keys):
        return "mlx-vlm"
    if any(k.startswith("model.") for k in keys):
        return "hf-text"
    return None


def _bundle_given(root: Path, display: str) -> ConvertError:
    """SOURCE is a prepared bundle (this tool's output): say so, and name the checkpoint it was
    made from when its manifest says, rather than refusing its first renamed tensor."""
    try:
        source = read_manifest(root)["source"]
        made_from = source.get("repo_id") or source.get("path")
    except (ManifestError, KeyError, TypeError):
        made_from = None
    original = f" it was made from ({made_from})" if made_from else ""
    return ConvertError(f"{display}: a prepared bundle ({MANIFEST_NAME}), not a checkpoint: convert wants the "
                        f"original checkpoint{original}; a bundle runs as it is: "
                        f"python -m runtime generate {display} --prompt ...")


def open_source(source: str | os.PathLike, revision: str | None = None) -> Source:
    """Open a checkpoint directory or hub repo id; validate everything but the tensor data."""
    text = str(source)
    if revision is not None and (problem := revision_problem(revision)):
        raise ConvertError(f"--revision: {problem}")
    repo_id = commit = None
    if Path(text).exists():
        root = Path(text)
        if not root.is_dir():
            raise ConvertError(f"{text}: SOURCE must be a checkpoint directory")
        if revision:
            raise ConvertError(f"{text}: --revision applies to hub repo ids, not to a local directory")
        kind, display = "local", text
        containment = Path(os.path.realpath(root))
        _recordable(str(containment), display, "the path of SOURCE")
        if os.path.lexists(root / MANIFEST_NAME):
            raise _bundle_given(root, display)
    elif is_repo_id(text):
        root, commit = resolve_hub(text, revision)
        kind, display, repo_id = "hub", f"{text}@{commit[:12]}", text
        revision = revision or "main"  # what snapshot_download resolves when none is given
        # Hub snapshots hold symlinks into the repo's blob store two levels up; that is inside.
        containment = Path(os.path.realpath(root.parent.parent))
    else:
        raise ConvertError(f"{text}: no such directory (nor a hub repo id like org/name)")

    hashes: dict[str, str] = {}

    def checked(name: str, what: str) -> Path:
        path = root / name
        if not _inside(path, containment):
            raise ConvertError(f"{display}/{name}: {what} resolves outside SOURCE (symlink to "
                               f"{os.path.realpath(path)})")
        return path

    config_path = root / CONFIG_NAME
    if not os.path.lexists(config_path):
        raise ConvertError(f"{display}/{CONFIG_NAME}: missing; SOURCE must hold a Gemma3n config.json")
    config = _read_json(checked(CONFIG_NAME, "config.json"), f"{display}/{CONFIG_NAME}", hashes, CONFIG_NAME)
    if not isinstance(config, dict):
        raise ConvertError(f"{display}/{CONFIG_NAME}: not a JSON object")
    model_type, text_config = text_config_of(config, f"{display}/{CONFIG_NAME}")
    for where, holder in ((f"{display}/{CONFIG_NAME}", config),
                          (f"{display}/{CONFIG_NAME}: text_config", config.get("text_config"))):
        if isinstance(holder, dict):
            _eos(holder, text_config["vocab_size"], where)

    index_name, files, weight_map = None, [], None
    if os.path.lexists(root / INDEX_NAME):
        index_name = INDEX_NAME
        where = f"{display}/{INDEX_NAME}"
        index = _read_json(checked(INDEX_NAME, "the index"), where, hashes, INDEX_NAME)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConvertError(f"{where}: no weight_map mapping tensor names to files")
        for key, name in weight_map.items():
            if not isinstance(name, str) or not name:
                raise ConvertError(f"{where}: tensor {key!r}: file {name!r} is not a file name")
            _recordable(name, f"{where}: tensor {key!r}", "the file name")
            if os.path.isabs(name) or ".." in Path(name).parts:
                raise ConvertError(f"{where}: tensor {key!r}: file {name!r} points outside SOURCE")
            if name not in files:
                files.append(name)
        for name in files:
            key = next(k for k, v in weight_map.items() if v == name)
            if not os.path.lexists(root / name):
                raise ConvertError(f"{where}: tensor {key!r}: shard {name!r} is missing")
            if not _inside(root / name, containment):
                raise ConvertError(f"{where}: tensor {key!r}: shard {name!r} resolves outside SOURCE "
                                   f"(symlink to {os.path.realpath(root / name)})")
    elif os.path.lexists(root / SINGLE_NAME):
        files = [SINGLE_NAME]
        checked(SINGLE_NAME, "the weights file")
    else:
        pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ConvertError(f"{display}/{pickles[0]}: pickle checkpoints are refused (loading one can run "
                               "arbitrary code); convert it to safetensors first")
        raise ConvertError(f"{display}: no {SINGLE_NAME} or {INDEX_NAME}")

    headers: dict[str, Header] = {}
    tensors: dict[str, tuple[str, object]] = {}
    for name in files:
        header = read_header(root / name, f"{display}/{name}")
        headers[name] = header
        for key, info in header.tensors.items():
            if key in tensors:
                raise ConvertError(f"{display}/{name}: tensor {key!r} is also in {tensors[key][0]}")
            if weight_map is not None and weight_map.get(key) != name:
                raise ConvertError(f"{display}/{name}: tensor {key!r} is not listed for this file in {INDEX_NAME}")
            tensors[key] = (name, info)
    if weight_map is not None:
        for key, name in weight_map.items():
            if key not in tensors:
                raise ConvertError(f"{display}/{INDEX_NAME}: tensor {key!r}: listed in {name} but that file "
                                   "does not hold it")

    naming = detect_naming(tensors)
    if naming is None:
        raise ConvertError(f"{display}/{files[0]}: no Gemma3n decoder tensors (keys under model.language_model., "
                           "language_model.model. or model.)")

    copied = [CONFIG_NAME]
    present = sorted(p.name for p in root.iterdir())
    for name in present:
        if name in COPIED_FILES or name.startswith(COPIED_PREFIX):
            _recordable(name, f"{display}/{name}", "the name of a file to copy")
            path = checked(name, "a copied file")
            if is_regular(path):
                copied.append(name)
            elif os.path.lexists(path) and not path.is_dir():  # a FIFO, a device: never read, never copied
                raise ConvertError(f"{display}/{name}: {not_regular(path)}")

    if TOKENIZER_NAME in copied:  # the bundle's tokenizer must fit the model's embedding table
        try:
            raw = read_limited(root / TOKENIZER_NAME, TOKENIZER_LIMIT, "tokenizer.json")
        except OSError as e:
            raise ConvertError(f"{display}/{TOKENIZER_NAME}: {e.strerror or e}") from None
        problem = tokenizer_problem(raw, text_config["vocab_size"])
        if problem:
            raise ConvertError(f"{display}/{TOKENIZER_NAME}: {problem} (config.json vocab_size)")

    generation_config = None
    if GENERATION_CONFIG_NAME in copied:
        gen_hashes: dict[str, str] = {}
        generation_config = _read_json(root / GENERATION_CONFIG_NAME, f"{display}/{GENERATION_CONFIG_NAME}",
                                       gen_hashes, GENERATION_CONFIG_NAME)
        if not isinstance(generation_config, dict):
            raise ConvertError(f"{display}/{GENERATION_CONFIG_NAME}: not a JSON object")
        _eos(generation_config, text_config["vocab_size"], f"{display}/{GENERATION_CONFIG_NAME}")

    return Source(root=root, display=display, kind=kind, config=config, text_config=text_config,
                  model_type=model_type, naming=naming, headers=headers, tensors=tensors,
                  index_name=index_name, copied_files=copied, generation_config=generation_config,
                  metadata_hashes=hashes, repo_id=repo_id, revision=revision, commit=commit,
                  containment=containment)
