"""`convert known-answers BUNDLE`: add known answers (manifests/known_answers.py) to a bundle of ours.

`convert --known-answers` records them while converting; this adds (or renews) them on a bundle
converted without, with the same reference (convert/reference.py). The answers vouch for the
weights they were computed from, so the bundle must first be exactly what its manifest says:
provably one this tool wrote (its manifest digest, nothing unlisted: convert/ownership.py), and
every file of the recorded size and sha256.

The new manifest goes in the way a conversion's output does, so nothing is half-written: a copy
of the bundle is made beside it from hard links (no byte of a weight is copied), the new
manifest.yaml and manifest.sha256 are written into the copy, and the copy replaces the bundle by
two renames (convert/pipeline.py's temporary and `.old-` names, lock and clean-up, so a killed
run is repaired by the next one).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import click

from convert.errors import ConvertError
from convert.ownership import PARTIAL_MARKER, bundle_entries, marker_text, remove_if_ours, remove_replaced
from convert.pipeline import _fsync_dir, clean_stale, destination_lock, os_errors
from convert.planning import human, peak_rss
from convert.reference import known_answers
from manifests import MANIFEST_NAME, ManifestError, read_manifest
from manifests.known_answers import SECTION
from manifests.manifest import needed_version, write_manifest

_CHUNK = 8 << 20


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_intact(bundle: Path, manifest: dict) -> None:
    """Refuse (one line) a bundle that is not exactly what its manifest describes: provably one
    this tool wrote (convert/ownership.py: the manifest's digest matches, nothing unlisted), and
    every listed file of the recorded size and sha256."""
    refuse = "known answers vouch for the weights as converted; convert the bundle again"
    _, why = bundle_entries(bundle)
    if why:
        raise ConvertError(f"{bundle}: not as converted ({why}); {refuse}")
    for name, record in manifest["files"].items():
        path = bundle / name
        if path.is_symlink() or not path.is_file():
            raise ConvertError(f"{path}: listed in {MANIFEST_NAME} but not a file inside the bundle; {refuse}")
        if path.stat().st_size != record["bytes"] or _sha256(path) != record["sha256"]:
            raise ConvertError(f"{path}: differs from {MANIFEST_NAME} (size or sha256); {refuse}")


def replace_manifest(bundle: Path, manifest: dict) -> None:
    """Put `manifest` in place of BUNDLE's manifest.yaml and manifest.sha256 together (see the
    module docstring): hard links into `.BUNDLE.tmp-<pid>` (marked as a conversion marks its
    partial bundle, convert/ownership.py), the manifest written there, then two renames."""
    parent = bundle.parent
    tmp = parent / f".{bundle.name}.tmp-{os.getpid()}"
    with os_errors(bundle):
        remove_if_ours(tmp, os.getpid())
        tmp.mkdir()
    try:
        (tmp / PARTIAL_MARKER).write_bytes(marker_text(os.getpid()))
        for name in manifest["files"]:
            try:
                os.link(bundle / name, tmp / name)
            except OSError as e:
                raise ConvertError(f"{bundle / name}: cannot be hard-linked ({e.strerror or e}); convert the "
                                   "bundle again with --known-answers instead") from None
        write_manifest(manifest, tmp)
        (tmp / PARTIAL_MARKER).unlink()
        _fsync_dir(tmp)
        old = parent / f".{bundle.name}.old-{os.getpid()}"
        os.rename(bundle, old)
        try:
            os.rename(tmp, bundle)
        except BaseException:
            os.rename(old, bundle)
            raise
        remove_replaced(old)  # links only: every weight lives on in the new bundle
        _fsync_dir(parent)
    except OSError as e:
        remove_if_ours(tmp, os.getpid())
        raise ConvertError(f"{e.filename or bundle}: {e.strerror or e}; {bundle} was left as it was") from None
    except BaseException:
        remove_if_ours(tmp, os.getpid())
        raise


def add_known_answers(bundle: str | os.PathLike) -> dict:
    """Compute the known answers of BUNDLE (a bundle of ours, intact) and record them in its
    manifest; return the section. Every refusal is a one-line ConvertError."""
    bundle = Path(bundle).absolute()
    if not bundle.parent.is_dir():
        raise ConvertError(f"{bundle}: not a bundle directory")
    with destination_lock(bundle):
        with os_errors(bundle):
            clean_stale(bundle)  # first: a killed rewrite's bundle is put back
            if bundle.is_symlink() or not bundle.is_dir():
                raise ConvertError(f"{bundle}: not a bundle directory")
            try:
                manifest = read_manifest(bundle)
            except ManifestError as e:
                raise ConvertError(str(e)) from None
            check_intact(bundle, manifest)
            manifest[SECTION] = known_answers(bundle, manifest)
        manifest["format_version"] = needed_version(manifest)  # known answers came with version 2
        replace_manifest(bundle, manifest)
    return manifest[SECTION]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle", type=click.Path(path_type=Path))
def command(bundle):
    """Run the float32 reference over BUNDLE's stored weights and record its answers in the
    manifest, for `runtime verify --numeric` (the bundle must be intact: every hash is checked)."""
    started = time.perf_counter()
    section = add_known_answers(bundle)
    click.echo(f"added known answers to {bundle}: {len(section['prompt'])}-token prompt, top-"
               f"{len(section['logits'][0]['ids'])} logits at {len(section['positions'])} positions, "
               f"{len(section['hidden']['layers'])} layers; reference {section['reference']['seconds']:.1f} s, "
               f"all {time.perf_counter() - started:.1f} s, peak memory {human(peak_rss())}")


__all__ = ["add_known_answers", "check_intact", "command", "replace_manifest"]
