"""Load a prepared bundle: manifest first, then the shards' arrays straight into the modules.

The promise: no transpose, copy, cast, concatenation or renaming of any weight at load. The
converter did that work once; here `mx.load` maps each tensor lazily and `load_weights` puts
that very array into the module the manifest named. A table placed `mapped` is not loaded at
all: its file is memory-mapped (runtime/mapped.py) and read a row at a time as tokens need it.
tests/test_loader.py holds the check.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import mlx.core as mx

from manifests import target_for_device
from manifests.format import revision_problem
from runtime import cuda_blocks
from runtime.assemble import build_model
from runtime.bundle import BundleError, read_bundle_manifest, source_command
from runtime.inputs import BadType, BadValue
from runtime.tokenizer import load_tokenizer


class TargetMismatchWarning(UserWarning):
    """The bundle was prepared for another device class than this one: a note about speed, not a
    fault (every bundle computes the same logits on every device; only its weights' layouts were
    chosen for another one). The CLI prints it as a note."""


def made_for_this_device(profile: dict, info: dict, here: str) -> bool:
    """A profile `runtime calibrate` measured on this very device, or on its device class."""
    device = profile.get("device") or {}
    same_device = bool(device) and all(device.get(k) == info.get(k) for k in ("device_name", "architecture"))
    return same_device or profile.get("device_class") == here


def check_target(manifest: dict, path: Path, strict: bool, device_info: dict | None = None,
                 stacklevel: int = 2) -> None:
    info = mx.device_info() if device_info is None else device_info
    here = target_for_device(info)
    prepared_for = manifest["target"]["name"]
    if prepared_for == here or made_for_this_device(manifest["target"].get("profile") or {}, info, here):
        return
    message = (
        f"{path} is laid out for target {prepared_for!r} and runs correctly here; for weights laid out for "
        f"this device ({here!r}, {info.get('architecture', '?')}): {source_command(manifest['source'], here)}"
    )
    if strict:
        raise BundleError(message)
    warnings.warn(message, TargetMismatchWarning, stacklevel=stacklevel)


def load_model(path, strict_target: bool = False, verify: bool = False, lazy: bool = False,
               _stacklevel: int = 2):
    """The model alone; see `load`."""
    path = Path(path)
    manifest = read_bundle_manifest(path)
    check_target(manifest, path, strict_target, stacklevel=_stacklevel + 1)
    if verify:
        from runtime.verify import verify_bundle

        problems = verify_bundle(path, manifest)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise BundleError(problems[0] + more)
    model = build_model(path, manifest)
    if not lazy:
        mx.eval(model.parameters())
    return model


def load(path, strict_target: bool = False, verify: bool = False, lazy: bool = False,
         revision: str | None = None):
    """(model, tokenizer) from a prepared bundle; the tokenizer is None when the bundle has none.

    `path` is a bundle folder or a hub id (`org/name`, `org/name:variant`): a hub bundle is
    downloaded (only the chosen variant's files, at `revision`) and always verified.
    `strict_target`: a bundle prepared for another device class is an error, not a note
    (TargetMismatchWarning).
    `verify`: re-hash every file against the manifest first. `lazy`: leave the weights mapped
    but unread until first use (by default they are read before `load` returns).
    """
    from runtime.hub import is_hub_id, resolve_bundle

    for value, name in ((strict_target, "strict_target"), (verify, "verify"), (lazy, "lazy")):
        if not isinstance(value, bool):  # a string ("no") was read as true: strict, verified
            raise BadType(f"{name} must be True or False, not {type(value).__name__} {value!r:.40}")
    if not isinstance(path, (str, os.PathLike)):
        raise BadType(f"path must be a bundle directory or a hub id (a str or a path), not {type(path).__name__}")
    if revision is not None and (problem := revision_problem(revision)):
        raise (BadType if not isinstance(revision, str) else BadValue)(f"revision {problem}")
    cuda_blocks.enabled()  # MLXP_CUDA_BLOCKS, read by the compiled decode step: a bad value stops here
    if is_hub_id(path):
        path, verify = resolve_bundle(str(path), revision=revision), True
    model = load_model(path, strict_target=strict_target, verify=verify, lazy=lazy, _stacklevel=3)
    return model, load_tokenizer(Path(path))
