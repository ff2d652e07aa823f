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
import re
import tempfile
import threading
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx

POLL_S = 0.5
_noted = threading.Event()  # once per process


# Where C++'s std::filesystem::temp_directory_path looks (libstdc++, POSIX), in order: the first
# variable set is taken as it is, with no fallback (Python's tempfile falls back; MLX cannot).
TEMP_VARIABLES = ("TMPDIR", "TMP", "TEMP", "TEMPDIR")


def mlx_temp_dir(env: Mapping[str, str] = os.environ) -> tuple[str | None, str]:
    """(the variable naming it, or None for the default; the directory) MLX's caches go under, in
    the environment `env` (this process's by default)."""
    for name in TEMP_VARIABLES:
        if name in env:
            return name, env[name]
    return None, tempfile.gettempdir() if os.name == "nt" else "/tmp"


def kernel_cache_dirs(env: Mapping[str, str] = os.environ) -> list[Path]:
    """Where this MLX writes the kernels it compiles, in the environment `env` (this process's by
    default): its CPU cache and its CUDA (PTX) cache."""
    base = Path(mlx_temp_dir(env)[1]) / "mlx" / mx.__version__
    return [base / "cpu", Path(env.get("MLX_PTX_CACHE_DIR") or base / "ptx")]


def compiled_kernel_names(root: Path) -> set[str]:
    """The fused kernels MLX's CPU has compiled under `root` (a `$TMPDIR`): one library per kernel
    and memory layout, named after what the kernel computes; the layout suffix dropped (a CUDA
    module holds both layouts), so the names are the modules a GPU compiles for the same graph.
    For the benchmarks and tests that count them."""
    return {re.sub(r"_(contiguous|strided_\d+)$", "", p.stem.removeprefix("lib")) for p in root.rglob("lib*.so")}


def kernel_cache_problem() -> str | None:
    """Why MLX could not keep the kernels it compiles, as one line, or None. MLX writes them under
    the temporary directory (kernel_cache_dirs) and, on the CPU, fails the first compiled
    evaluation with a C++ filesystem error when it cannot: checked where a command starts, so
    a TMPDIR that is missing, not a directory or not writable is a one-line error, not a
    traceback in the middle of a generation. Makes the CPU cache directory, as MLX would."""
    name, temp = mlx_temp_dir()
    where = f"{name}={temp!r}" if name else f"the temporary directory {temp}"
    fix = (f"MLX keeps the kernels it compiles under it; point {name or 'TMPDIR'} at a writable directory")
    if not temp or not os.path.isdir(temp):
        return f"{where} is not a directory; {fix}"
    cpu = kernel_cache_dirs()[0]
    try:
        cpu.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"{where}: cannot create {cpu} ({e.strerror or e}); {fix}"
    if not os.access(cpu, os.W_OK | os.X_OK):
        return f"{where}: {cpu} is not writable; {fix}"
    return None


class KernelCacheError(RuntimeError):
    """Compiled decoding cannot run here: MLX could not keep the kernels it compiles (the message
    is `kernel_cache_problem`'s). A RuntimeError, as MLX's own failure was."""


def check_kernel_cache() -> None:
    """The Python API's door for compiled decoding: where MLX keeps compiled kernels on disk (the
    CPU, CUDA; Metal keeps none), a temporary directory it cannot use fails the first compiled
    step with a C++ filesystem error that names no path, after the prompt's first token. Raised
    here instead, before any work, with `kernel_cache_problem`'s line."""
    if mx.default_device().type == mx.gpu and mx.metal.is_available():
        return
    problem = kernel_cache_problem()
    if problem:
        raise KernelCacheError(problem)


def _state(directory: Path) -> tuple | None:
    """What changes when a kernel is written: the directory's and its subdirectories' mtimes; None
    while it is missing or empty. An empty one is not a kernel: the command's own cache check
    (`kernel_cache_problem`) makes the CPU directory before loading, which on a GPU named that
    empty directory as where the GPU's kernels were being cached."""
    try:
        with os.scandir(directory) as entries:
            found = list(entries)
        if not found:
            return None
        stamps = [directory.stat().st_mtime_ns]
        stamps += [e.stat().st_mtime_ns for e in found if e.is_dir(follow_symlinks=False)]
    except OSError:  # not there (yet): nothing compiled into it
        return None
    return tuple(stamps)


def noted() -> None:
    """No note from `noting_compilation` in this process any more: the caller gave its own."""
    _noted.set()


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
