"""Read, write and validate `manifest.yaml`, the first thing a reader of a bundle looks at."""

from __future__ import annotations

import os
from functools import lru_cache
from importlib import resources
from pathlib import Path

import yaml

from manifests.format import FORMAT_VERSION, MANIFEST_NAME, ManifestError
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
    except SchemaError as e:
        raise ManifestError(f"{where}: {e}") from None
    return manifest


def dump_manifest(manifest: dict) -> str:
    validate_manifest(manifest, "manifest being written")
    return yaml.dump(manifest, Dumper=_Dumper, sort_keys=False, default_flow_style=None, width=100)


def write_manifest(manifest: dict, directory: str | os.PathLike) -> Path:
    path = Path(directory) / MANIFEST_NAME
    path.write_text(dump_manifest(manifest))
    return path


def load_manifest(path: str | os.PathLike) -> dict:
    """Parse and validate one manifest file; every failure is a one-line ManifestError."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ManifestError(f"{path}: no manifest") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: unreadable ({e})") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ManifestError(f"{path}: not valid YAML ({first})") from None
    return validate_manifest(data, str(path))


def read_manifest(bundle: str | os.PathLike) -> dict:
    return load_manifest(Path(bundle) / MANIFEST_NAME)
