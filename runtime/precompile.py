"""Compile a model's decode kernels in a child process while the first generation decodes eagerly.

On a machine that never ran a model, MLX compiles the fused kernels of its compiled decode step
the first time the step runs (runtime/kernels.py): on an H100, E2B's 16 took 83 s, during which
the first generation stood still after its first token. Nothing of that compilation needs the
weights: MLX names a fused kernel after its operations and dtypes, never its shapes or values,
and caches it on disk under that name. So a child process builds the same model over weights
that are zero-stride broadcasts of one zero (no bytes read, nothing allocated but the
transient operands of its matmuls), runs the decode step once, and MLX compiles every kernel
there; meanwhile the parent decodes through the model's eager forward pass, whose kernels come
built (at eager speed: slower than the compiled step, far faster than waiting). When the child
is done, its kernels are published into this machine's caches and the parent's next step is the
compiled one, which then compiles nothing.

Safe by construction:
- the child writes into caches of its own (`TMPDIR` and `MLX_PTX_CACHE_DIR` pointed at a private
  directory); the parent publishes each file it made by copy and atomic rename, the CUDA
  kernel's mangled names (`.txt`) before its code (`.ptx`), so MLX, in this process or any other,
  finds a kernel whole or not at all, whatever is killed when;
- a list of what was published, named after the step's signature (MLX version, device, this
  runtime's source, the model's config, parameter names, shapes and dtypes), says this model's
  kernels are here: the next run finds it, sees every listed file still there, and starts no child;
- a child that fails changes nothing: the compiled step then compiles in this process, as it
  would have without one.

`runtime generate`, `chat` and `serve` start one (runtime/cli.py); the Python API opts in with
`runtime.compile_in_background(model)` (this module's `start`). Where kernels are not cached on
disk (Metal compiles in-process) no child is started. Greedy text is the same either way on the
CPU (the two passes agree bit for bit, tests/test_fast.py); on CUDA the passes' roundings may
differ, so where a first run switches from eager to compiled steps can move a near-tie of a
random-weight model.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from runtime.inputs import check_model
from runtime.kernels import TEMP_VARIABLES, kernel_cache_dirs, mlx_temp_dir

LIST_PREFIX = "mlx-prepared-kernels-"
PRIVATE_PREFIX = "mlx-prepared-compile-"
OWNERS = "owners.json"  # in a child's directory: the pids of the process that made it and of the child
# How often a wait on the main thread comes back to the interpreter: Python runs a signal's
# handler there, between bytecodes, and one the kernel handed to another thread waits for it
# (BackgroundCompile.finish here; the server's idle engine, runtime/server.py).
SIGNAL_POLL_S = 0.25
RUNTIME = Path(__file__).resolve().parent


def caches_on_disk() -> bool:
    """Whether this MLX compiles kernels into a disk cache for the default device (CPU, CUDA)."""
    return mx.default_device().type == mx.cpu or mx.cuda.is_available()


def signature(model) -> str:
    """What the compiled step's kernels depend on, hashed: MLX and the device, this runtime's
    source, the model's config and every parameter's name, shape and dtype, and the per-layer
    table's placement."""
    h = hashlib.sha256()
    info = {k: v for k, v in mx.device_info().items() if isinstance(v, str)}
    h.update(json.dumps([mx.__version__, str(mx.default_device()), info], sort_keys=True).encode())
    for source in sorted(RUNTIME.glob("*.py")):
        h.update(source.name.encode() + source.read_bytes())
    h.update(json.dumps(model.config.__dict__, sort_keys=True, default=str).encode())
    for name, array in tree_flatten(model.parameters()):
        h.update(f"{name}:{array.dtype}:{array.shape};".encode())
    table = model.model.language_model.embed_tokens_per_layer
    h.update(type(table).__name__.encode())
    return h.hexdigest()[:32]


def _list_file(sig: str) -> Path:
    return kernel_cache_dirs()[0].parent / f"{LIST_PREFIX}{sig}.json"


def compiled_here(sig: str) -> bool:
    """Whether the kernels of the step with this signature were published on this machine and
    are all still in its caches."""
    try:
        listed = json.loads(_list_file(sig).read_text())
        return all(Path(p).is_file() for p in listed)
    except (OSError, ValueError, TypeError):
        return False


def zero_weights(model) -> None:
    """Every parameter replaced by a zero-stride broadcast of a zero of its dtype and shape: the
    model computes the same graph over no bytes (what the child compiles kernels with)."""
    flat = tree_flatten(model.parameters())
    model.update(tree_unflatten([(k, mx.broadcast_to(mx.zeros((), v.dtype), v.shape)) for k, v in flat]))


# What MLX keeps per kernel: CUDA's code, mangled names and source; the CPU's library and source.
KERNEL_SUFFIXES = (".ptx", ".txt", ".cu", ".so", ".cpp")


def _kernel_files(root: Path) -> list[Path]:
    """The kernel files under `root`, listed before anything is added to it: not in a child's
    directory or a hidden one (MLX_PTX_CACHE_DIR may be TMPDIR itself, where those live too)."""
    found = []
    for p in root.rglob("*"):
        parts = p.relative_to(root).parts
        if (p.suffix in KERNEL_SUFFIXES and not any(part.startswith((PRIVATE_PREFIX, ".")) for part in parts)
                and (p.is_file() or p.is_symlink())):
            found.append(p)
    return found


def seed(private: Path) -> None:
    """Link every kernel file this machine's caches already hold into the child's own, so that
    the child compiles only what is missing (a machine that ran other models, or this one before
    its list was written, costs the child a load and a trace)."""
    for shared, own in zip(kernel_cache_dirs(), _child_dirs(private), strict=True):
        if not shared.is_dir():
            continue
        for src in _kernel_files(shared):
            link = own / src.relative_to(shared)
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(src, link)


def publish(private: Path, sig: str) -> list[str]:
    """Copy each kernel file the child made under `private` into the same place of this
    machine's caches, atomically (a temporary name, then a rename: MLX sees a file whole or not
    at all), the mangled names before the code they name; then write the list of the kernels
    (those made and those seeded from the caches). The listed paths."""
    shared = kernel_cache_dirs()
    own = _child_dirs(private)
    done: list[str] = []
    for src_root, dst_root in zip(own, shared, strict=True):
        if not src_root.is_dir():
            continue
        # .ptx last: MLX reads a CUDA kernel's .ptx first and then its names (.txt)
        for src in sorted(_kernel_files(src_root), key=lambda p: (p.suffix in (".ptx", ".so"), str(p))):
            dst = dst_root / src.relative_to(src_root)
            if not src.is_symlink() and not dst.exists():  # a link: seeded from there
                dst.parent.mkdir(parents=True, exist_ok=True)
                tmp = dst.parent / f".mlx-prepared-{os.getpid()}.tmp"  # short: kernel names fill NAME_MAX
                shutil.copyfile(src, tmp)
                os.replace(tmp, dst)
            if src.suffix in (".ptx", ".so"):
                done.append(str(dst))
    listing = _list_file(sig)
    listing.parent.mkdir(parents=True, exist_ok=True)  # on CUDA, nothing else makes the CPU cache's parent
    tmp = listing.parent / f".mlx-prepared-{os.getpid()}.tmp"
    tmp.write_text(json.dumps(sorted(done)))
    os.replace(tmp, listing)
    return done


def _child_env(private: Path) -> dict[str, str]:
    """The child's environment: this one with TMPDIR (the only temporary directory) and
    MLX_PTX_CACHE_DIR inside `private`."""
    env = {k: v for k, v in os.environ.items() if k not in TEMP_VARIABLES}
    env.update(TMPDIR=str(private), MLX_PTX_CACHE_DIR=str(private / "ptx"))
    return env


def _child_dirs(private: Path) -> list[Path]:
    """The child's caches: kernel_cache_dirs in the child's environment."""
    return kernel_cache_dirs(_child_env(private))


class BackgroundCompile:
    """A child process compiling a bundle's decode kernels; `ready()` polls it (and publishes its
    kernels when it succeeded), `finish()` waits for it, `stop()` ends it. Use `start`."""

    def __init__(self, bundle: Path, sig: str):
        self.sig = sig
        self.private = Path(tempfile.mkdtemp(prefix=PRIVATE_PREFIX, dir=mlx_temp_dir()[1]))
        seed(self.private)
        self.log = self.private / "child.log"
        with open(self.log, "wb") as log:
            self.child = subprocess.Popen([sys.executable, "-m", "runtime.compile_child", str(bundle)],
                                          env=_child_env(self.private),
                                          cwd=str(RUNTIME.parent), stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT)
        (self.private / OWNERS).write_text(json.dumps([os.getpid(), self.child.pid]))
        atexit.register(self.stop)  # a caller who never finishes it leaves no child running past its exit
        self.published: list[str] | None = None
        self.failure: str | None = None
        self._lock = threading.Lock()  # a server polls from its generation thread and stops from its main one

    def ready(self) -> bool:
        """True once the child has ended (its kernels published if it succeeded); never blocks."""
        with self._lock:
            if self.child is None:
                return True
            if self.child.poll() is None:
                return False
            self._end()
            return True

    def finish(self, timeout: float | None = None) -> bool:
        """Wait for the child (at most `timeout` seconds), then publish its kernels; whether it ended.

        It waits in steps of SIGNAL_POLL_S: Python runs a signal's handler on the main thread between
        bytecodes, the kernel may hand the signal to another thread, and a wait with no timeout
        would then hold the handler (a Ctrl-C, a process manager's SIGTERM) until the child ended.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self.child is not None:
                left = SIGNAL_POLL_S if deadline is None else deadline - time.monotonic()
                try:
                    self.child.wait(timeout=max(0.0, min(SIGNAL_POLL_S, left)))
                except subprocess.TimeoutExpired:
                    if deadline is not None and time.monotonic() >= deadline:
                        return False
                    continue
                self._end()
            return True

    def stop(self) -> None:
        """End the child if it still runs (publishing nothing of it), publish it if it ended well
        and nobody has yet (a server idle since), and remove its directory."""
        with self._lock:
            if self.child is not None and self.child.poll() is not None:
                self._end()
            if self.child is not None:
                self.child.terminate()
                try:
                    self.child.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.child.kill()
                    self.child.wait()
            self.child = None
            shutil.rmtree(self.private, ignore_errors=True)

    def _end(self) -> None:
        code = self.child.returncode
        try:
            if code == 0:
                self.published = publish(self.private, self.sig)
            else:
                lines = self.log.read_text(errors="replace").strip().splitlines()
                self.failure = f"exit {code}" + (f": {lines[-1]}" if lines else "")
        except OSError as e:
            self.failure = f"publishing its kernels failed: {e}"
        finally:
            self.child = None
            shutil.rmtree(self.private, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether a process `pid` runs (a zombie, ended but not yet reaped by whoever adopted it, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's process: alive
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def sweep() -> list[Path]:
    """Remove the directories of children whose parent and child are both gone (a parent killed
    with SIGKILL cleans nothing up): provably ours by their name and the pids they record, and
    left alone while either process lives (or a reused pid looks alive). The ones removed."""
    removed = []
    for d in Path(mlx_temp_dir()[1]).glob(f"{PRIVATE_PREFIX}*"):
        try:
            pids = json.loads((d / OWNERS).read_text())
            if not (isinstance(pids, list) and pids and all(type(p) is int and p > 0 for p in pids)):
                continue
        except (OSError, ValueError):
            continue  # not ours to judge: no record (a start killed before writing it stays)
        if not any(_alive(p) for p in pids):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def start(model) -> BackgroundCompile | None:
    """A child compiling `model`'s decode kernels, where this machine lacks them and caches them
    on disk, and the model came from a bundle directory (runtime.load); else None. While it runs,
    generation with this model decodes eagerly (runtime/generate.py); a second call returns the
    same child. Public as `runtime.compile_in_background`: the caller then owns the child
    (`finish()` waits for it and publishes its kernels, `stop()` ends it)."""
    check_model(model)
    running = getattr(model, "_background_compile", None)
    if running is not None:
        return running
    bundle = getattr(model, "bundle_path", None)
    if bundle is None or not caches_on_disk():
        return None
    sweep()
    sig = signature(model)
    if compiled_here(sig):
        return None
    job = BackgroundCompile(Path(bundle), sig)
    object.__setattr__(model, "_background_compile", job)  # not a parameter: outside the module tree
    return job


def pending(model) -> bool:
    """Whether a background compilation of `model`'s kernels is still running (polled; once it has
    ended, the model forgets it and the compiled step runs)."""
    job = getattr(model, "_background_compile", None)
    if job is None:
        return False
    if not job.ready():
        return True
    object.__setattr__(model, "_background_compile", None)
    return False
