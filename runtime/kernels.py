"""Say so while MLX compiles kernels, the first time a model runs on a machine.

MLX compiles some kernels at first use (on the CPU: C++ for each fused elementwise graph; on
CUDA: every kernel, through NVRTC) and caches them on disk, under `$TMPDIR/mlx/<version>/cpu`
and `MLX_PTX_CACHE_DIR` (default `$TMPDIR/mlx/<version>/ptx`). Until a dtype or quantization
has run once on a machine, its first generation stalls while that happens, silently: 45 s for
the 2 MB demo on a busy 2-core CPU (then 1 s); on an H100, E2B's compiled decode step took
115-125 s (21 kernels).

Whether it is happening is read off those caches, not guessed: the note is given only when a
kernel cache changes while the command runs (a new kernel written), so it never appears on a
warm machine, and never for anything but a compilation. Metal compiles in-process and caches
nothing here, so on Apple GPUs it stays silent.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx

POLL_S = 0.5
_noted = threading.Event()  # once per process


def kernel_cache_dirs() -> list[Path]:
    """Where this MLX writes the kernels it compiles: its CPU cache and its CUDA (PTX) cache."""
    base = Path(tempfile.gettempdir()) / "mlx" / mx.__version__
    return [base / "cpu", Path(os.environ.get("MLX_PTX_CACHE_DIR") or base / "ptx")]


def _state(directory: Path) -> tuple | None:
    """What changes when a kernel is written: the directory's and its subdirectories' mtimes."""
    try:
        stamps = [directory.stat().st_mtime_ns]
        with os.scandir(directory) as entries:
            stamps += [e.stat().st_mtime_ns for e in entries if e.is_dir(follow_symlinks=False)]
    except OSError:  # not there (yet): nothing compiled into it
        return None
    return tuple(stamps)


def compile_note(directory: Path) -> str:
    return (f"MLX is compiling kernels this model needs for the first time on this machine (up to two "
            f"minutes on a GPU, once: they are cached in {directory})")


@contextmanager
def noting_compilation(say: Callable[[str], None], poll_s: float = POLL_S):
    """While the body runs, call `say(note)` once (per process) when MLX writes a new kernel."""
    if _noted.is_set():
        yield
        return
    dirs = kernel_cache_dirs()
    before = [_state(d) for d in dirs]
    done = threading.Event()

    def watch():
        while not done.wait(poll_s):
            for directory, was in zip(dirs, before, strict=True):
                if _state(directory) != was:
                    if not _noted.is_set():
                        _noted.set()
                        say(compile_note(directory))
                    return

    thread = threading.Thread(target=watch, name="mlx-kernel-note", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
