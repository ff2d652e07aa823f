"""The library API: `plan(...)` and `convert_checkpoint(...)`; the CLI is a thin layer over these.

Atomicity: the bundle is written into `.OUT.tmp-<pid>` beside OUT and renamed into place only
when complete (with `force`, the old OUT is first renamed to `.OUT.old-<pid>` and deleted after).
A run killed at any point leaves OUT as it was plus a temporary directory named after its dead
pid, which the next run for the same OUT removes (or, for an `.old-` directory whose OUT is
missing because the kill fell between the two renames, puts back).

Exclusion: a run holds `.OUT.lock` beside OUT (flock) from its checks to its final rename, so a
second conversion to the same OUT is refused at once rather than racing the first to the rename.
The kernel drops the lock of a killed run; the next run takes the file over and removes it.

A full disk (ENOSPC, a quota, a file-size limit) is one line naming the file and the tensor being
written, and leaves OUT as it was, like every other failure.
"""

from __future__ import annotations

import errno
import fcntl
import os
import platform
import re
import shutil
import stat
import time
import warnings
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from convert.architectures import architecture
from convert.errors import ConvertError, Float16Warning
from convert.ownership import (
    PARTIAL_MARKER,
    bundle_entries,
    check_replaceable,
    marker_text,
    remove_if_ours,
    remove_replaced,
    within,
)
from convert.planning import (
    BAND_BYTES,
    DEFAULT_MAX_SHARD_SIZE,
    READ_BLOCK,
    Plan,
    human,
    make_plan,
    parse_size,
    peak_rss,
)
from convert.quantize import quant_spec
from convert.reference import known_answers as reference_answers
from convert.safetensors_io import ITEMSIZE, NonFiniteError
from convert.source import Source, open_source
from convert.write import write_bundle
from manifests import (
    FORMAT_VERSION,
    ManifestError,
    ProfileError,
    TargetProfile,
    load_profile,
    load_profile_file,
    target_for_device,
    write_manifest,
)
from manifests.known_answers import SECTION
from manifests.manifest import needed_version
from manifests.profiles import saved_profile_for_device


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def resolve_target(target: str | None = None, target_profile: str | os.PathLike | None = None,
                   device_info: dict | None = None) -> tuple[TargetProfile, dict | None]:
    """(profile, device info it was detected on or None).

    `auto` asks MLX about this machine, then takes the profile saved by `runtime calibrate --save`
    for exactly this device if there is one, else the built-in target `target_for_device` names.
    """
    try:
        if target_profile is not None:
            if target not in (None, "auto"):
                raise ConvertError("use --target or --target-profile, not both")
            return load_profile_file(target_profile), None
        if target in (None, "auto"):
            if device_info is None:
                import mlx.core as mx

                device_info = dict(mx.device_info())
            device = {k: v for k, v in device_info.items() if isinstance(v, (str, int, float, bool))}
            # A profile calibrated on this very device (`runtime calibrate --save`) beats the table.
            saved = saved_profile_for_device(device)
            return (saved or load_profile(target_for_device(device))), device
        return load_profile(target), None
    except ProfileError as e:
        raise ConvertError(str(e)) from None


FLOAT16_ADVICE = ("--dtype float16: Gemma models can overflow float16 (activations past its largest value, "
                  "65504, turn infinite, then NaN); use --dtype bfloat16, the same size")


def plan(source: str | os.PathLike | Source, out: str | os.PathLike | None = None, *, target: str | None = "auto",
         target_profile: str | os.PathLike | None = None, dtype: str = "keep", revision: str | None = None,
         max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, device_info: dict | None = None,
         read_block: int = READ_BLOCK, band_bytes: int = BAND_BYTES, quantize: int | None = None,
         group_size: int | None = None, quant_mode: str | None = None, fuse: bool | None = None,
         ple: str | None = None) -> Plan:
    """Open SOURCE and plan its conversion; reads headers and configs only, writes nothing.

    `quantize` (4 or 8 bits, with `group_size` and `quant_mode`): quantize the float projections
    and embeddings with mx.quantize on the way (convert/quantize.py). `fuse`: None stores fused
    the groups the profile's `fuse` lists, True every group, False none (convert/fusion.py).
    `ple`: `resident` or `mapped` places the per-layer embedding table whatever the profile's
    `per_layer_embeddings` says (None: as it says).
    """
    spec = quant_spec(quantize, group_size, quant_mode)
    if dtype == "float16":
        warnings.warn(FLOAT16_ADVICE, Float16Warning, stacklevel=2)
    with os_errors(source):
        src = source if isinstance(source, Source) else open_source(source, revision)
        if out is not None:
            check_destination(src, Path(out))
        profile, device = resolve_target(target, target_profile, device_info)
        return make_plan(src, profile, dtype=dtype, device=device, max_shard_size=parse_size(max_shard_size),
                         read_block=read_block, band_bytes=band_bytes, quantize=spec, fuse=fuse, ple=ple)


# A destination out of room: a full disk, a quota, or a file-size limit (RLIMIT_FSIZE).
_NO_ROOM = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def os_message(e: OSError, where, tmp: Path | None = None, out: Path | None = None) -> str:
    """One line for an OSError: the file (named inside OUT, not the temporary directory) and why."""
    name = str(e.filename or where)
    if tmp is not None and out is not None and name.startswith(str(tmp)):
        name = str(out) + name[len(str(tmp)):]
    reason = e.strerror or str(e)
    if e.errno in _NO_ROOM:
        reason = f"out of disk space or over the file-size limit ({reason})"
    if out is not None:
        reason += f"; {out} was left as it was"
    return f"{name}: {reason}"


@contextmanager
def os_errors(where):
    """An OSError (permissions, a full disk, a file vanishing) becomes one line naming the file."""
    try:
        yield
    except OSError as e:
        raise ConvertError(os_message(e, where)) from None


def _open_lock(lock: Path) -> int:
    """The lock file, created or one a run of this tool left: never through a symlink, never a
    file of someone else's (it is truncated and removed), refused in one line otherwise."""
    in_the_way = ConvertError(f"{lock}: in the way of this conversion's lock, and not a lock this tool left "
                              "(one holds a process id and nothing else); remove it or choose another OUT")
    try:
        if not stat.S_ISREG(os.lstat(lock).st_mode):  # a symlink, a FIFO, a device: never opened
            raise in_the_way
    except FileNotFoundError:
        pass
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:  # became a symlink since the lstat
            raise in_the_way from None
        raise
    st = os.fstat(fd)
    held = os.pread(fd, 32, 0).strip() if stat.S_ISREG(st.st_mode) else b""
    if not stat.S_ISREG(st.st_mode) or st.st_size > 20 or (held and not held.isdigit()):
        os.close(fd)
        raise in_the_way
    return fd


def _holder_pid(fd: int, wait: float = 2.0) -> str:
    """The process id the holder of the lock on `fd` wrote there. The holder writes it a moment after
    it takes the lock, so a run that meets the lock in that moment waits for it (at most `wait` s)."""
    deadline = time.monotonic() + wait
    while True:
        holder = os.pread(fd, 20, 0).decode("ascii", "replace").strip()
        if holder or time.monotonic() >= deadline:
            return holder
        time.sleep(0.01)


@contextmanager
def destination_lock(out: Path):
    """Hold `.OUT.lock` beside OUT for the rest of a run; refuse at once if another run holds it."""
    lock = out.parent / f".{out.name}.lock"
    with os_errors(lock):
        while True:
            fd = _open_lock(lock)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder_pid(fd)
                os.close(fd)
                who = f" (pid {holder})" if holder.isdigit() else ""
                raise ConvertError(f"{out}: another conversion{who} is writing this OUT; wait for it to "
                                   "finish or choose another OUT") from None
            try:
                same = os.path.samestat(os.stat(lock), os.fstat(fd))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the previous holder removed the file between our open and our lock
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
    try:
        yield
    finally:
        try:
            os.unlink(lock)  # while still holding it, so no other run can hold this same file
        except FileNotFoundError:
            pass
        os.close(fd)


def nonfinite_message(p: Plan, e: NonFiniteError, out: Path) -> str:
    """The source file and tensor of a bundle tensor that `check_finite` refused."""
    item = next((i for i in p.items if i.key == e.tensor), None)
    if item is None:
        return f"{e.message}; {out} was left as it was"
    written = item.quant_dtype or item.dtype  # a quantized weight: the float dtype it was quantized from
    narrowed = ITEMSIZE[written] < ITEMSIZE[item.source.dtype]  # a narrowing cast can overflow to infinity
    cast = f" after narrowing {item.source.dtype} to {written}" if narrowed else ""
    what = f"tensor {item.source.name!r}"
    if item.members:  # fused: the values may be in any member
        what = "one of tensors " + ", ".join(repr(src.name) for _, src in item.members) + f" (fused into {e.tensor})"
    return (f"{p.source.display}/{item.file}: {what}: {e.nan} NaN and {e.inf} infinite "
            f"values{cast} (--check-finite); {out} was left as it was")


def source_roots(src: Source) -> list[str]:
    """The real directories SOURCE occupies (its folder, and the hub cache folder it reads)."""
    return sorted({os.path.realpath(src.root), str(src.containment or os.path.realpath(src.root))})


def check_destination(src: Source, out: Path) -> None:
    out_real = os.path.realpath(out)
    for root in source_roots(src):
        if within(out_real, root):
            raise ConvertError(f"{out}: OUT is inside SOURCE ({src.display}); write the bundle elsewhere")
        if within(root, out_real):
            raise ConvertError(f"{out}: SOURCE ({src.display}) is inside OUT; write the bundle elsewhere")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out: Path) -> list[Path]:
    """Remove what runs for `out` that died left behind, where it is provably theirs
    (convert/ownership.py); return what was removed or restored. Anything else stays."""
    parent = out.parent
    if not parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)")
    handled = []
    for entry in parent.iterdir():
        m = pattern.fullmatch(entry.name)
        if not m or int(m.group(2)) == os.getpid() or _alive(int(m.group(2))):
            continue
        if entry.is_symlink() or not entry.is_dir():
            continue
        if m.group(1) == "old" and not os.path.lexists(out) and bundle_entries(entry)[0] is not None:
            os.rename(entry, out)  # killed between the two renames of --force: put the old one back
            handled.append(entry)
        elif remove_if_ours(entry, int(m.group(2))):
            handled.append(entry)
    return handled


def eos_token_ids(src: Source) -> list[int]:
    """Every EOS id of the config, its text config and the generation config (a model may stop on any)."""
    ids: set[int] = set()
    for where in (src.config, src.text_config, src.generation_config or {}):
        value = where.get("eos_token_id")
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int) and not isinstance(v, bool):
                ids.add(v)
    return sorted(ids)


def normalized_text_config(src: Source, arch: str) -> dict:
    text = {k: v for k, v in src.text_config.items()
            if k not in ("architectures", "quantization", "quantization_config", "transformers_version")}
    text["model_type"] = architecture(arch).TEXT_MODEL_TYPE
    if "tie_word_embeddings" not in text and "tie_word_embeddings" in src.config:
        text["tie_word_embeddings"] = src.config["tie_word_embeddings"]
    return text


def build_manifest(p: Plan, files: dict, source_files: dict) -> dict:
    src = p.source
    if src.kind == "hub":
        source = {"kind": "hub", "repo_id": src.repo_id, "revision": src.revision, "commit": src.commit,
                  "path": str(src.root)}
    else:
        source = {"kind": "local", "path": str(Path(src.root).resolve())}
    source.update(naming=src.naming, files=source_files)
    manifest = {
        "format_version": FORMAT_VERSION,
        "tool": {"name": "mlx-prepared", "version": _version("mlx-prepared")},
        "versions": {"mlx": _version("mlx"), "python": platform.python_version(), "numpy": _version("numpy"),
                     "safetensors": _version("safetensors")},
        "source": source,
        "model": {"architecture": p.architecture, "model_type": src.model_type,
                  "text_config": normalized_text_config(src, p.architecture), "eos_token_ids": eos_token_ids(src)},
        "target": {"name": p.profile.name, "profile": p.profile.content, "profile_sha256": p.profile.sha256,
                   "device": p.device},
        "dtype": p.dtype,
        "projections": p.projections,
        "embeddings": p.embeddings,
        **({"mapped_embeddings": p.mapped} if p.mapped else {}),
        "dropped": p.dropped,
        **({"unread": p.unread} if p.unread else {}),  # only where tensors are kept for mlx-lm
        "files": files,
    }
    manifest["format_version"] = needed_version(manifest)  # older readers load what they can read
    return manifest


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _free_space(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def preflight(p: Plan, out: str | os.PathLike, *, force: bool = False) -> Path:
    """Every check that can refuse before a byte is written (also run by `execute`)."""
    with os_errors(out):
        out = Path(out).absolute()
        check_destination(p.source, out)
        if out.parent.exists() and not out.parent.is_dir():
            raise ConvertError(f"{out}: cannot be created, {out.parent} is not a directory")
        existing = out.parent
        while not existing.exists():
            existing = existing.parent
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConvertError(f"{out}: cannot be created, {existing} is not writable")
        clean_stale(out)
        check_replaceable(out, force, source_roots(p.source))
        free = _free_space(out.parent)
        if free < p.disk_needed:
            raise ConvertError(f"{out.parent}: not enough free disk space for the bundle (needs "
                               f"{human(p.disk_needed)}, {human(free)} free)")
        return out


def execute(p: Plan, out: str | os.PathLike, *, force: bool = False, on_write=None,
            check_finite: bool = False, known_answers: bool = False) -> Path:
    """Write the planned bundle to OUT atomically; return OUT.

    `check_finite`: refuse a tensor holding NaN or infinite values (counted as it is written).
    `known_answers`: run the float32 reference over the written tensors and record its answers
    in the manifest (convert/reference.py), before the bundle is renamed into place.
    """
    with os_errors(out):
        out = preflight(p, out, force=force)
        out.parent.mkdir(parents=True, exist_ok=True)
    with destination_lock(out):
        return _execute_locked(p, out, force, on_write, check_finite, known_answers)


def _execute_locked(p: Plan, out: Path, force: bool, on_write, check_finite: bool, known_answers: bool) -> Path:
    with os_errors(out):
        preflight(p, out, force=force)  # again: another run may have finished OUT before we locked
        parent = out.parent
        tmp = parent / f".{out.name}.tmp-{os.getpid()}"
        remove_if_ours(tmp, os.getpid())  # a dead run's that had this pid; anything else stays in the way
        tmp.mkdir()
    try:
        (tmp / PARTIAL_MARKER).write_bytes(marker_text(os.getpid()))  # what proves it ours to clean_stale
        try:
            files, source_files = write_bundle(p, tmp, on_write=on_write, check_finite=check_finite)
        except NonFiniteError as e:
            raise ConvertError(nonfinite_message(p, e, out)) from None
        manifest = build_manifest(p, files, source_files)
        if known_answers:
            manifest[SECTION] = reference_answers(tmp, manifest)
            manifest["format_version"] = needed_version(manifest)
        try:
            write_manifest(manifest, tmp)
        except ManifestError as e:  # a bug of ours, not bad input; still one line
            raise ConvertError(f"internal error, manifest does not validate: {e}") from None
        (tmp / PARTIAL_MARKER).unlink()  # complete: from here on it proves itself a bundle
        _fsync_dir(tmp)
        if os.path.lexists(out):
            check_replaceable(out, force, source_roots(p.source))
            old = parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                if not os.path.lexists(out):
                    os.rename(old, out)
                raise
            remove_replaced(old)
        else:
            os.rename(tmp, out)
        _fsync_dir(parent)
    except OSError as e:
        remove_if_ours(tmp, os.getpid())
        raise ConvertError(os_message(e, out, tmp, out)) from None
    except BaseException:
        remove_if_ours(tmp, os.getpid())
        raise
    return out


def convert_checkpoint(source: str | os.PathLike, out: str | os.PathLike, *, target: str | None = "auto",
                       target_profile: str | os.PathLike | None = None, dtype: str = "keep",
                       revision: str | None = None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                       force: bool = False, device_info: dict | None = None, on_write=None,
                       read_block: int = READ_BLOCK, band_bytes: int = BAND_BYTES, quantize: int | None = None,
                       group_size: int | None = None, quant_mode: str | None = None,
                       check_finite: bool = False, fuse: bool | None = None, ple: str | None = None,
                       known_answers: bool = False) -> Path:
    """Convert SOURCE (directory or hub repo id) into a prepared bundle at OUT; return OUT.

    Every refusal is a `ConvertError` (a `click.ClickException`, exit code 2) with one line naming
    the file and tensor; nothing is left at OUT then.
    """
    p = plan(source, out, target=target, target_profile=target_profile, dtype=dtype, revision=revision,
             max_shard_size=max_shard_size, device_info=device_info, read_block=read_block,
             band_bytes=band_bytes, quantize=quantize, group_size=group_size, quant_mode=quant_mode,
             fuse=fuse, ple=ple)
    return execute(p, out, force=force, on_write=on_write, check_finite=check_finite, known_answers=known_answers)


def run_report(p: Plan, out: Path, seconds: float) -> str:
    moved = p.tensor_bytes_out
    shards = len(p.model_shards)
    return (f"wrote {out}: {len(p.items)} tensors ({p.records} manifest records) in {shards} "
            f"shard{'s' if shards != 1 else ''}{' + the mapped per-layer embedding table' if p.mapped else ''}, "
            f"{human(moved)} in {seconds:.1f} s ({moved / max(seconds, 1e-9) / 1e9:.2f} GB/s), "
            f"peak memory {human(peak_rss())} (planned: at most {human(p.predicted_peak)})")


__all__ = ["plan", "convert_checkpoint", "execute", "preflight", "resolve_target", "clean_stale", "run_report"]
