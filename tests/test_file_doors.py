"""Files that are not what their name says: FIFOs, devices, symlinks to /dev/zero or out of the
bundle, files past their size limit. Each is refused by type (or by the bytes actually read)
before any read, in one line naming it, by the converter (`python -m convert`) and the runtime
(`runtime generate`, `runtime verify`, `runtime.load`); nothing blocks, nothing reads forever.

Every run has a timeout: a reader that blocked on a FIFO or read /dev/zero would fail it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from manifests.files import FileRefused, read_limited
from tests.runtime_helpers import convert, load_quietly, text_checkpoint

REPO = Path(__file__).resolve().parents[1]


def run(module: str, *args, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MTL_CAPTURE_ENABLED", "MLX_PREPARED_CAPTURE_DECODE")}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120, input=stdin)


def one_error(r, prefix: str) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(prefix), (r.returncode, r.stderr)
    return lines[0]


def replace_with(path: Path, kind: str) -> str:
    """Put a special file where `path` was; return what the refusal must say."""
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
        return "a FIFO, not a regular file"
    if kind == "dev-zero":
        path.symlink_to("/dev/zero")
        return "/dev/zero"
    raise AssertionError(kind)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return text_checkpoint(tmp_path_factory.mktemp("doors") / "src")


@pytest.fixture(scope="module")
def pristine(source, tmp_path_factory) -> Path:
    return convert(source, tmp_path_factory.mktemp("doors-b") / "bundle", "generic")


@pytest.fixture
def src(source, tmp_path) -> Path:
    return Path(shutil.copytree(source, tmp_path / "src"))


@pytest.fixture
def bundle(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "bundle", symlinks=True))


@pytest.mark.parametrize("name, kind", [("config.json", "fifo"), ("config.json", "dev-zero"),
                                        ("model.safetensors", "fifo"), ("tokenizer.json", "fifo"),
                                        ("generation_config.json", "fifo"), ("tokenizer.json", "dev-zero")])
def test_convert_refuses_a_special_file_in_source(src, tmp_path, name, kind):
    says = replace_with(src / name, kind)
    line = one_error(run("convert", "--target", "generic", "-q", src, tmp_path / "out"), f"error: {src}/{name}: ")
    assert says in line, line
    assert not (tmp_path / "out").exists()


def test_convert_refuses_a_device_in_source(src, tmp_path):
    """A character device inside SOURCE itself (mknod needs root; elsewhere the FIFO cases stand)."""
    (src / "tokenizer.json").unlink()
    try:
        os.mknod(src / "tokenizer.json", 0o600 | 0o020000, os.makedev(1, 5))  # /dev/zero's numbers
    except PermissionError:
        pytest.skip("mknod needs root")
    line = one_error(run("convert", "--target", "generic", "-q", src, tmp_path / "out"),
                     f"error: {src}/tokenizer.json: ")
    assert "a character device, not a regular file" in line, line


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "not-utf8"])
def test_convert_refuses_a_special_target_profile(src, tmp_path, kind):
    """`--target-profile FILE` goes through the same door: a FIFO blocked the reader forever and
    /dev/zero was read until memory ran out; bytes that are not UTF-8 were a traceback."""
    profile = tmp_path / "profile.yaml"
    if kind == "not-utf8":
        profile.write_bytes(b"name: \xff\n")
        says = "not UTF-8 text (byte 0xff at offset 6)"
    else:
        profile.write_text("name: x\n")
        says = replace_with(profile, kind)
    line = one_error(run("convert", "--target-profile", profile, "-q", src, tmp_path / "out"), f"error: {profile}: ")
    assert says in line, line
    assert not (tmp_path / "out").exists()


def test_size_limits_count_the_bytes_read(tmp_path):
    """/proc files report st_size 0 yet hold bytes; a limit checked against st_size would read on."""
    big = tmp_path / "big.json"
    big.write_bytes(b" " * 1001)
    with pytest.raises(FileRefused, match="more than 1000 bytes"):
        read_limited(big, 1000)
    assert read_limited(tmp_path / "big.json", 1001) == b" " * 1001
    assert os.stat("/proc/self/status").st_size == 0
    with pytest.raises(FileRefused, match="more than 10 bytes"):
        read_limited("/proc/self/status", 10)


@pytest.mark.parametrize("name, kind", [("tokenizer.json", "fifo"), ("tokenizer.json", "dev-zero"),
                                        ("tokenizer_config.json", "fifo"), ("config.json", "dev-zero"),
                                        ("generation_config.json", "fifo"), ("manifest.yaml", "fifo"),
                                        ("model.safetensors", "fifo")])
def test_runtime_generate_refuses_a_special_file_in_the_bundle(bundle, name, kind):
    says = replace_with(bundle / name, kind)
    line = one_error(run("runtime", "generate", bundle, "--prompt", "hi", "--max-tokens", "2"),
                     f"error: {bundle / name}: ")
    assert says in line, line


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "config.json",
                                  "generation_config.json", "manifest.yaml"])
def test_a_plain_load_refuses_a_file_resolving_outside_the_bundle(bundle, tmp_path, name):
    elsewhere = tmp_path / f"elsewhere-{name}"
    (bundle / name).rename(elsewhere)
    (bundle / name).symlink_to(elsewhere)
    with pytest.raises(ValueError) as e:
        load_quietly(bundle)
    assert str(e.value) == f"{bundle / name}: a symlink to {elsewhere}, outside the bundle; refusing to read it"
    line = one_error(run("runtime", "generate", bundle, "--prompt", "hi", "--max-tokens", "2"), "error: ")
    assert line == f"error: {e.value}"


@pytest.mark.parametrize("name", ["manifest.sha256", "model.safetensors", "tokenizer.json"])
def test_verify_with_a_fifo_in_place_of_a_file_does_not_hang(bundle, name):
    replace_with(bundle / name, "fifo")
    r = run("runtime", "verify", bundle)
    assert "Traceback" not in r.stderr and r.returncode == 1, r.stderr
    assert f"{bundle / name}: a FIFO, not a regular file; refusing to read it" in r.stderr.splitlines(), r.stderr
