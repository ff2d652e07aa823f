"""The converter's overlapped writing (convert/overlap.py): blocks of 1 MiB and more are written and
hashed on the output lane while the main thread reads the next one. These tests use tensors and
blocks large enough to take that path (the tiny checkpoints of the other tests never do).

- fenced buffers: a buffer refilled as soon as `Buffers` hands it out again never changes what
  was written from it;
- conversions with different block and band sizes (one band or several, one block or many, each
  of them on the lane) write the same bytes, the transposed LM head is numpy's transpose of the
  embedding, and every sha256 in the manifest is the file's;
- a write that fails on the lane (past a file-size limit) is still one line naming the file and
  the tensor, and leaves nothing at OUT;
- a shard file (convert/shardfile.py) holds exactly the bytes written, with O_DIRECT through its
  aligned staging buffers and without.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import resource
import signal
import subprocess
import sys
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file as st_load_numpy

from convert import convert_checkpoint, shardfile
from convert.overlap import DEPTH, OVERLAP_MIN, Buffers, Fence
from convert.safetensors_io import SafetensorsWriter
from convert.shardfile import ALIGN, STAGE, ShardFile
from tests.checkpoints import make_checkpoint, tiny_text_config

REPO = Path(__file__).resolve().parents[1]
MB = 1 << 20


def test_fenced_buffers_are_not_refilled_while_the_lane_writes_them(tmp_path):
    """Each block is written from one of two rotating buffers and the buffer is overwritten with
    garbage the moment `Buffers` hands it out again: the file still holds the blocks as written."""
    rng = np.random.default_rng(0)
    blocks = [rng.integers(0, 256, 3 * MB // 2, dtype=np.uint8) for _ in range(7)]
    total = sum(b.size for b in blocks)
    bufs = Buffers()
    w = SafetensorsWriter(tmp_path / "o.safetensors", [("x", "U8", (total,))])
    w.begin("x")
    for block in blocks:
        buf, fence = bufs.next("read", block.size)
        buf[:] = b"\xff" * block.size  # what a refill too early would leave in the file
        buf[:] = block.tobytes()
        w.write(buf, fence)
    bufs.release()
    sha, n = w.close()
    raw = (tmp_path / "o.safetensors").read_bytes()
    assert (sha, n) == (hashlib.sha256(raw).hexdigest(), len(raw))
    assert np.array_equal(st_load_numpy(str(tmp_path / "o.safetensors"))["x"], np.concatenate(blocks))


@pytest.mark.parametrize("direct", [True, False])
def test_a_shard_file_holds_exactly_the_bytes_written(tmp_path, direct):
    """Pieces of odd sizes crossing staging buffers (and one longer than a whole buffer), a size
    that is no multiple of the block: the padding of the last O_DIRECT block is cut."""
    rng = np.random.default_rng(1)
    sizes = [8, 1, ALIGN - 3, STAGE - 5, 3 * MB + 7, 2 * STAGE + 11, 5]
    data = rng.integers(0, 256, sum(sizes), dtype=np.uint8).tobytes()
    path = tmp_path / "shard"
    f = ShardFile(path, lambda e, what: OSError(e.errno, f"{e.strerror} while writing {what}", str(path)), direct)
    if direct and hasattr(os, "O_DIRECT"):
        assert f.direct  # this file system takes O_DIRECT, so the staged path is the one tested
    done = 0
    for n in sizes:
        f.write(memoryview(data)[done:done + n], "x")
        done += n
    assert f.finish("x") == len(data)
    f.sync()
    assert path.read_bytes() == data
    with pytest.raises(FileExistsError):
        ShardFile(path, None)


needs_o_direct = pytest.mark.skipif(not getattr(os, "O_DIRECT", 0), reason="no O_DIRECT on this platform")


def refuse_o_direct(monkeypatch, where: str) -> None:
    """A file system without O_DIRECT (ramfs; tmpfs on Linux 6.18 takes it): `fcntl` refuses to set it
    (EINVAL), or, for `where="pwrite"`, it is set but every write through it fails with EINVAL."""
    real_fcntl, real_pwrite = fcntl.fcntl, os.pwrite
    if where == "fcntl":
        def refusing(fd, cmd, arg=0):
            if cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_fcntl(fd, cmd, arg)
        monkeypatch.setattr(shardfile.fcntl, "fcntl", refusing)
    else:
        def refusing(fd, data, offset):
            if real_fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_pwrite(fd, data, offset)
        monkeypatch.setattr(shardfile.os, "pwrite", refusing)


@needs_o_direct
@pytest.mark.parametrize("where", ["fcntl", "pwrite"])
def test_a_shard_file_where_o_direct_is_refused_is_written_buffered(tmp_path, monkeypatch, where):
    refuse_o_direct(monkeypatch, where)
    data = np.random.default_rng(2).integers(0, 256, 2 * STAGE + 3 * MB + 7, dtype=np.uint8).tobytes()
    path = tmp_path / "shard"
    f = ShardFile(path, lambda e, what: OSError(e.errno, f"{e.strerror} while writing {what}", str(path)))
    for i in range(0, len(data), 3 * MB):
        f.write(memoryview(data)[i:i + 3 * MB], "x")
    assert f.finish("x") == len(data)
    assert not f.direct
    f.sync()
    assert path.read_bytes() == data


@needs_o_direct
def test_a_short_o_direct_write_goes_on_buffered_and_reports_the_limit(tmp_path):
    """A file-size limit 1 MiB into a staging buffer: the O_DIRECT write of that buffer comes back
    short, the rest goes buffered and fails with EFBIG, as a buffered write would; the file holds
    the bytes up to the limit."""
    limit = 2 * STAGE + MB
    data = np.random.default_rng(3).integers(0, 256, 4 * STAGE, dtype=np.uint8).tobytes()
    path = tmp_path / "shard"
    old_limit, old_handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
        f = ShardFile(path, lambda e, what: OSError(e.errno, f"{e.strerror} while writing {what}", str(path)))
        assert f.direct
        with pytest.raises(OSError) as raised:
            for i in range(0, len(data), MB):
                f.write(memoryview(data)[i:i + MB], "x")
            f.finish("x")
        f.close()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert raised.value.errno == errno.EFBIG and raised.value.filename == str(path)
    assert not f.direct
    assert path.read_bytes() == data[:limit]


def test_a_failed_fsync_still_closes_the_shard(tmp_path, monkeypatch):
    f = ShardFile(tmp_path / "shard", None)
    f.write(memoryview(b"x" * 5000), "x")
    f.finish("x")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(shardfile.os, "fsync", full)
    with pytest.raises(OSError):
        f.sync()
    assert f._fd == -1


def test_an_interrupted_wait_still_lets_the_lane_finish_before_the_file_closes(tmp_path):
    """Ctrl-C (here a KeyboardInterrupt from SIGALRM) while the main thread waits on the lane: the
    abort that follows waits for the write still running on the lane before it closes the file,
    so that write never lands on a closed (or reused) descriptor."""
    w = SafetensorsWriter(tmp_path / "o.safetensors", [("x", "U8", (2 * MB,))])
    gate = threading.Event()
    write = w._file.write

    def held(view, what):
        gate.wait(10)
        write(view, what)

    w._file.write = held
    w.begin("x")
    buf = bytearray(2 * MB)
    w.write(memoryview(buf), Fence())  # on the lane, held there
    job = w._last

    def interrupt(*_):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        with pytest.raises(KeyboardInterrupt):
            w.finish()  # waits on the lane, cut short
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert not job.done()
    threading.Timer(0.2, gate.set).start()
    w.abort()
    assert job.done() and job.exception() is None


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_a_grown_buffer_gives_the_old_one_back():
    """The plan counts one buffer of each name at its largest: growing one must hand the old one
    back to the system (malloc kept outgrown buffers of up to 32 MiB, 25 MB over on an E2B)."""
    bufs = Buffers()
    np.frombuffer(bufs.get("band", 24 * MB), np.uint8).fill(1)  # touched: resident
    before = _rss()
    np.frombuffer(bufs.get("band", 40 * MB), np.uint8).fill(1)
    grew = _rss() - before
    assert 12 * MB < grew < 20 * MB, grew  # 40 MB in, 24 MB out; keeping both would be 40 MB


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """float32, embedding 32768 x 64 (8 MB) and per-layer embedding 32768 x 160 (21 MB)."""
    cfg = tiny_text_config(vocab_size=32768, vocab_size_per_layer_input=32768)
    return make_checkpoint(tmp_path_factory.mktemp("wide") / "src", "hf", text_config=cfg, dtype=mx.float32)


def _convert(src: Path, out: Path, *extra: str) -> dict[str, bytes]:
    r = subprocess.run([sys.executable, "-m", "convert", "--target", "m5", "-q", *extra, str(src), str(out)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return {p.name: p.read_bytes() for p in out.iterdir()}


def test_block_and_band_sizes_do_not_change_a_byte(wide, tmp_path):
    # Defaults: one block and one band per tensor. Then blocks of 1.5 MB (the 21 MB table in 14
    # blocks) and bands of 3 MB / DEPTH (the 8 MB LM head in 6 bands), all past OVERLAP_MIN.
    small = ("--read-block-size", "1.5MiB", "--band-size", "3MiB")
    assert 3 * MB // DEPTH >= OVERLAP_MIN
    default = _convert(wide, tmp_path / "default")
    assert _convert(wide, tmp_path / "small", *small) == default
    assert _convert(wide, tmp_path / "bf16", *small, "--dtype", "bfloat16") != default  # the flags are read

    manifest = yaml.safe_load(default["manifest.yaml"])
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == hashlib.sha256(default[name]).hexdigest(), name
    for name, sha in manifest["source"]["files"].items():
        assert sha == hashlib.sha256((wide / name).read_bytes()).hexdigest(), name

    bundle = st_load_numpy(str(tmp_path / "small" / "model.safetensors"))
    source = st_load_numpy(str(wide / "model.safetensors"))
    embed = source["model.language_model.embed_tokens.weight"]
    heads = [k for k in bundle if k.startswith("lm_head")]
    assert len(heads) == 1 and np.array_equal(bundle[heads[0]], embed.T)
    per_layer = "model.language_model.embed_tokens_per_layer.weight"
    assert np.array_equal(bundle[per_layer], source[per_layer])


@needs_o_direct
def test_a_conversion_where_o_direct_is_refused_writes_the_same_bytes(wide, tmp_path, monkeypatch):
    default = _convert(wide, tmp_path / "default", "--read-block-size", "1.5MiB")
    refuse_o_direct(monkeypatch, "fcntl")
    convert_checkpoint(wide, tmp_path / "buffered", target="m5", read_block=3 * MB // 2)
    assert {p.name: p.read_bytes() for p in (tmp_path / "buffered").iterdir()} == default


def _fsize_limit(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so a write past the limit fails with EFBIG
    return apply


def test_a_write_failing_on_the_lane_is_one_line_and_leaves_nothing(wide, tmp_path):
    """A 12 MB file-size limit stops the shard inside its 21 MB per-layer embedding, a block the
    lane writes: the line names the shard inside OUT and that tensor."""
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "convert", "--target", "m5", "-q", str(wide), str(out)],
                       capture_output=True, text=True, cwd=REPO, preexec_fn=_fsize_limit(12 * MB))
    assert r.returncode == 2, r.stderr
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"error: {out}/model.safetensors: out of disk space or over the file-size limit ("), line
    assert "while writing tensor 'model.language_model.embed_tokens_per_layer.weight'" in line, line
    assert line.endswith(f"; {out} was left as it was"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == []
