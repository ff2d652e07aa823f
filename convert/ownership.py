"""What `convert` may replace or delete: only directories it can prove it wrote.

`--force` replaces OUT, and a run cleans up what killed runs left beside OUT. Both delete, so
both first prove the directory is this tool's:

- **a bundle** (what `--force` replaces, and a killed `--force` left as `.OUT.old-<pid>`): its
  manifest.yaml validates against the schema, manifest.sha256 is there and matches it, and the
  directory holds nothing else than the files the manifest lists (no other file, no
  subdirectory). A directory that merely holds a file named manifest.yaml is not one.
- **a partial bundle** (`.OUT.tmp-<pid>`, a run killed mid-write): it holds the marker file the
  run wrote first, naming that pid, and nothing but regular files (a conversion writes no
  subdirectory and no symlink).

Deleting removes exactly the entries the proof covered, then the empty directory; anything that
appeared meanwhile stays, and so does the directory. The working directory, SOURCE, and any
directory holding either are never replaced, whatever they hold.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from convert.errors import ConvertError
from manifests import MANIFEST_DIGEST_NAME, MANIFEST_NAME, ManifestError, load_manifest, recorded_manifest_digest
from manifests.files import read_limited
from manifests.format import MANIFEST_LIMIT

PARTIAL_MARKER = ".mlx-prepared-partial"


def marker_text(pid: int) -> bytes:
    return f"a bundle being written by mlx-prepared's convert, pid {pid}\n".encode()


def within(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def _entries(path: Path) -> list[os.DirEntry]:
    with os.scandir(path) as it:
        return sorted(it, key=lambda e: e.name)


def bundle_entries(path: Path) -> tuple[list[str] | None, str | None]:
    """(the names a bundle at `path` consists of, None) if it is provably a bundle this tool wrote,
    else (None, why not) in a few words naming what is in the way."""
    if not os.path.lexists(path / MANIFEST_NAME):
        return None, f"no {MANIFEST_NAME}"
    try:
        manifest = load_manifest(path / MANIFEST_NAME)
    except ManifestError as e:
        return None, str(e)
    try:
        recorded = recorded_manifest_digest(path)
    except ManifestError as e:
        return None, str(e)
    if recorded is None:
        return None, f"no {MANIFEST_DIGEST_NAME}, so its {MANIFEST_NAME} cannot be checked"
    try:
        data = read_limited(path / MANIFEST_NAME, MANIFEST_LIMIT, "manifest")
    except OSError as e:
        return None, f"{path / MANIFEST_NAME}: unreadable ({e.strerror or e})"
    if hashlib.sha256(data).hexdigest() != recorded:
        return None, f"{path / MANIFEST_NAME} differs from {MANIFEST_DIGEST_NAME} (edited after conversion)"
    listed = set(manifest["files"]) | {MANIFEST_NAME, MANIFEST_DIGEST_NAME}
    names = []
    for entry in _entries(path):
        if entry.is_dir(follow_symlinks=False):
            return None, f"{path / entry.name} is a directory, which no bundle holds"
        if entry.name not in listed:
            return None, f"{path / entry.name} is not listed in its {MANIFEST_NAME}"
        names.append(entry.name)
    return names, None


def partial_entries(path: Path, pid: int) -> list[str] | None:
    """The names in `path` if it is provably the partial bundle of run `pid`, else None."""
    try:
        entries = _entries(path)
        marker = read_limited(path / PARTIAL_MARKER, 256, "marker")
    except OSError:
        return None
    if marker != marker_text(pid):
        return None
    if not all(stat.S_ISREG(e.stat(follow_symlinks=False).st_mode) for e in entries):
        return None
    return [e.name for e in entries]


def remove_entries(path: Path, names: list[str]) -> bool:
    """Unlink exactly `names` in `path`, then the directory if that left it empty. The files that
    prove the directory ours go last, so a run killed while deleting leaves it provable still."""
    proofs = (PARTIAL_MARKER, MANIFEST_DIGEST_NAME, MANIFEST_NAME)
    for name in sorted(names, key=lambda n: proofs.index(n) if n in proofs else -1):
        try:
            os.unlink(path / name)
        except FileNotFoundError:
            pass
    try:
        os.rmdir(path)
    except OSError:
        return False  # something else appeared there: it stays
    return True


def remove_if_ours(path: Path, pid: int) -> bool:
    """Delete `path` if it is provably run `pid`'s partial bundle or a bundle; say whether it did."""
    if os.path.islink(path) or not path.is_dir():
        return False
    names = partial_entries(path, pid)
    if names is None:
        names, _ = bundle_entries(path)
    return remove_entries(path, names or [])  # unproven: only an empty directory goes


def protected(src_roots: list[str]) -> list[tuple[str, str]]:
    """(real path, how messages name it) of the directories OUT may never be or contain."""
    try:
        cwd = [(os.path.realpath(os.getcwd()), "the working directory")]
    except OSError:  # the working directory was removed: nothing to protect there
        cwd = []
    return cwd + [(r, "SOURCE") for r in src_roots]


def check_replaceable(out: Path, force: bool, src_roots: list[str] = ()) -> None:
    """Refuse, in one line naming what is in the way, unless OUT is absent or `force` may replace it."""
    if not os.path.lexists(out):
        return
    if not force:
        raise ConvertError(f"{out}: OUT already exists; pass --force to replace it")
    if out.is_symlink() or not out.is_dir():
        raise ConvertError(f"{out}: OUT exists and is not a directory; refusing to replace it")
    real = os.path.realpath(out)
    for root, name in protected(list(src_roots)):
        if within(root, real):
            what = "is" if root == real else "contains"
            raise ConvertError(f"{out}: OUT {what} {name} ({root}); refusing to replace it")
    if not _entries(out):
        return  # an empty directory: nothing to lose
    _, why = bundle_entries(out)
    if why:
        raise ConvertError(f"{out}: OUT is not a bundle this tool wrote ({why}); refusing to replace it "
                           "(remove it yourself or choose another OUT)")


def remove_replaced(old: Path) -> None:
    """Delete the bundle `--force` just moved aside (proved again: it may have changed since)."""
    if not _entries(old):
        os.rmdir(old)
        return
    names, _ = bundle_entries(old)
    if names is not None:
        remove_entries(old, names)
