"""The runtime's door for the small files of a bundle: manifest, tokenizer, configs.

The shards have theirs in the loader (their names come from the manifest or the index, and
`runtime.verify.outside_bundle` refuses any that lead out of the bundle). Every other file the
runtime reads from a bundle comes through here, on a plain load as with `verify`:

- it must stay inside the bundle (a symlink to elsewhere is refused; in the hub cache, inside the
  repo's cache folder, whose blobs the snapshot's symlinks point at);
- it must be a regular file, checked by type before it is opened (manifests/files.py);
- it is read whole only up to a byte limit, counted as it is read.

A refusal is a `BundleError` (a ValueError) naming the file, one line.
"""

from __future__ import annotations

import os
from pathlib import Path

from manifests.files import read_limited
from runtime.verify import containment


def _error(message: str) -> Exception:
    from runtime.loader import BundleError  # the loader imports this module's callers

    return BundleError(message)


def inside_bundle(bundle: str | os.PathLike, name: str) -> Path:
    """`bundle/name`, or BundleError when that path resolves outside the bundle."""
    path = Path(bundle) / name
    if os.path.lexists(path):
        real, root = os.path.realpath(path), containment(Path(bundle))
        if not real.startswith(root.rstrip(os.sep) + os.sep):
            raise _error(f"{path}: a symlink to {real}, outside the bundle; refusing to read it")
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
        raise _error(f"{path}: {e.strerror or e}") from None
