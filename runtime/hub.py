"""Run straight from a hub id: find, download and choose a bundle's variant (runtime/publish.py
ships bundles there).

Repository layout (one repo per model, one folder per device class):

    org/gemma-3n-E2B-it-mlx-prepared/
        README.md            model card listing every variant
        m5/manifest.yaml     a complete bundle per target
        m5/model-00001-of-00002.safetensors ...
        generic/manifest.yaml ...

Folders rather than branches or repos: every variant of a model is found from every other (one
card lists them all), and since the runtime reads a variant's manifest first and then asks only
for the files that manifest lists, a multi-variant repo never downloads the variants it does not
run.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import click

from manifests import MANIFEST_NAME, ManifestError, load_manifest, target_for_device
from manifests.cli import CommandError
from manifests.format import MANIFEST_DIGEST_NAME
from runtime.bundle import convert_command, device_target

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?")


class HubError(CommandError):
    """One `error:` line, exit 2 (manifests/cli.py)."""


def is_hub_id(ref: str | os.PathLike) -> bool:
    """`org/name` or `org/name:variant` that is not an existing local path."""
    ref = str(ref)
    return bool(_HUB_ID.fullmatch(ref)) and not Path(ref).exists()


def split_ref(ref: str) -> tuple[str, str | None]:
    repo_id, _, variant = ref.partition(":")
    return repo_id, variant or None


def _snapshot(repo_id: str, revision: str | None, patterns: list[str], cache_dir=None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, cache_dir=cache_dir))
    except LocalEntryNotFoundError:
        raise HubError(
            f"{repo_id}: not in the local hub cache, and the hub is unreachable or HF_HUB_OFFLINE is set; once "
            f"online, `runtime generate {repo_id} ...` downloads a bundle, and an original checkpoint needs "
            f"preparing first: {prepare_command(repo_id, revision)}"
        ) from None
    except Exception as e:  # RepositoryNotFoundError, RevisionNotFoundError, HTTP errors
        raise HubError(f"{repo_id}: cannot download from the hub ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def prepare_command(repo_id: str, revision: str | None = None) -> str:
    """The `convert` command that makes a runnable bundle of a hub checkpoint for this device."""
    return convert_command(repo_id, device_target(), revision)


def choose_variant(variants: dict[str, str], device_info: dict, wanted: str | None = None) -> str:
    """variants: folder -> target name. Named > matches this device > generic > the only one."""
    if wanted is not None:
        if wanted not in variants:
            raise HubError(f"no variant {wanted!r} in the repo; it has: {', '.join(sorted(variants)) or 'none'}")
        return wanted
    mine = target_for_device(device_info)
    for folder, target in sorted(variants.items()):
        if target == mine:
            return folder
    for folder, target in sorted(variants.items()):
        if target == "generic":
            return folder
    if len(variants) == 1:
        return next(iter(variants))
    raise HubError(f"no variant for this device ({mine}) and no generic one; name one of: {', '.join(sorted(variants))}")


def resolve_bundle(ref: str, *, revision: str | None = None, variant: str | None = None,
                   cache_dir=None, device_info: dict | None = None) -> Path:
    """Download (or find in the cache) only the files of the chosen variant; return its folder."""
    import mlx.core as mx

    repo_id, named = split_ref(ref)
    variant = variant or named
    # config.json too: a repo with one but no manifest holds a checkpoint to convert, not a bundle.
    root = _snapshot(repo_id, revision, [MANIFEST_NAME, f"*/{MANIFEST_NAME}", "config.json"], cache_dir)
    variants = {}
    for path in sorted(root.glob(f"*/{MANIFEST_NAME}")) + ([root / MANIFEST_NAME] if (root / MANIFEST_NAME).exists() else []):
        folder = "" if path.parent == root else path.parent.name
        try:
            variants[folder] = load_manifest(path)["target"]["name"]
        except ManifestError as e:
            raise HubError(f"{repo_id}: {e}") from None
    if not variants:
        at = f"at revision {revision or 'main'}"
        if (root / "config.json").is_file():  # a model's own repo: its checkpoint is convert's input
            raise HubError(f"{repo_id}: a model checkpoint {at}, not an mlx-prepared bundle (no manifest.yaml); "
                           f"prepare it first: {prepare_command(repo_id, revision)}")
        raise HubError(f"{repo_id}: no mlx-prepared bundle (no manifest.yaml) {at}")
    folder = choose_variant(variants, device_info if device_info is not None else mx.device_info(), variant)
    prefix = f"{folder}/" if folder else ""
    manifest = load_manifest(root / prefix / MANIFEST_NAME)
    patterns = [prefix + MANIFEST_NAME, prefix + MANIFEST_DIGEST_NAME] + [prefix + name for name in manifest["files"]]
    root = _snapshot(repo_id, revision, patterns, cache_dir)
    return root / folder if folder else root
