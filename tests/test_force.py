"""`--force` replaces only a bundle this tool provably wrote, and cleanup deletes only what a dead
run provably left (convert/ownership.py). Everything else is refused in one line naming what is
in the way, and stays byte for byte as it was.

The real command in a subprocess (the working directory matters here), on one tiny checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from convert import convert_checkpoint
from convert.ownership import PARTIAL_MARKER, marker_text
from convert.pipeline import clean_stale
from manifests import read_manifest
from runtime.verify import verify_bundle
from tests.checkpoints import make_checkpoint


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("force") / "src", "hf", extra_files=False)


@pytest.fixture(scope="module")
def pristine(source, tmp_path_factory) -> Path:
    return convert_checkpoint(source, tmp_path_factory.mktemp("force-b") / "bundle", target="generic")


@pytest.fixture
def bundle(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "bundle"))


def convert_cli(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "convert", "--target", "generic", "-q", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


def tree(path: Path) -> dict[str, str]:
    """Everything under `path`, file by file, with its content's hash (what 'untouched' means)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


def refused(r, line: str) -> None:
    assert "Traceback" not in r.stderr
    assert (r.returncode, r.stderr.splitlines()) == (2, [line]), r.stderr


def a_user_tree(path: Path) -> Path:
    """A user's project that happens to hold a file named manifest.yaml."""
    (path / "src").mkdir(parents=True)
    (path / "manifest.yaml").write_text("services: [web, db]\n")
    (path / "notes.txt").write_text("do not lose me")
    (path / "src" / "main.py").write_text("print('hello')\n")
    return path


def test_force_refuses_a_user_tree_holding_a_manifest_yaml(source, tmp_path):
    p = a_user_tree(tmp_path / "project")
    before = tree(p)
    r = convert_cli("--force", source, p, cwd=tmp_path)
    refused(r, f"error: {p}: OUT is not a bundle this tool wrote ({p / 'manifest.yaml'}: format_version missing or not an integer); "
               "refusing to replace it (remove it yourself or choose another OUT)")
    assert tree(p) == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["project"]


def test_force_never_replaces_the_working_directory(source, bundle, tmp_path):
    """OUT = `.` inside a user's tree, and even inside a genuine bundle."""
    p = a_user_tree(tmp_path / "project")
    before = tree(p)
    refused(convert_cli("--force", source, ".", cwd=p),
            f"error: {p}: OUT is the working directory ({p}); refusing to replace it")
    assert tree(p) == before
    before = tree(bundle)
    refused(convert_cli("--force", source, ".", cwd=bundle),
            f"error: {bundle}: OUT is the working directory ({bundle}); refusing to replace it")
    assert tree(bundle) == before


def test_force_never_replaces_a_directory_holding_the_working_directory_or_source(source, tmp_path):
    p = a_user_tree(tmp_path / "project")
    before = tree(p)
    refused(convert_cli("--force", source, p, cwd=p / "src"),
            f"error: {p}: OUT contains the working directory ({p / 'src'}); refusing to replace it")
    copy = Path(shutil.copytree(source, p / "src" / "checkpoint"))
    before = tree(p)
    refused(convert_cli("--force", copy, p, cwd=tmp_path),
            f"error: {p}: SOURCE ({copy}) is inside OUT; write the bundle elsewhere")
    assert tree(p) == before


@pytest.mark.parametrize("kind", ["an unlisted file", "a subdirectory", "an edited manifest",
                                  "no manifest.sha256", "a manifest of another schema"])
def test_force_refuses_a_bundle_it_cannot_prove_its_own(source, bundle, tmp_path, kind):
    if kind == "an unlisted file":
        (bundle / "my-notes.txt").write_text("mine")
        why = f"{bundle / 'my-notes.txt'} is not listed in its manifest.yaml"
    elif kind == "a subdirectory":
        (bundle / "work").mkdir()
        (bundle / "work" / "draft.txt").write_text("mine")
        why = f"{bundle / 'work'} is a directory, which no bundle holds"
    elif kind == "an edited manifest":
        with (bundle / "manifest.yaml").open("a") as f:
            f.write("# my comment\n")
        why = f"{bundle / 'manifest.yaml'} differs from manifest.sha256 (edited after conversion)"
    elif kind == "no manifest.sha256":
        (bundle / "manifest.sha256").unlink()
        why = "no manifest.sha256, so its manifest.yaml cannot be checked"
    else:
        (bundle / "manifest.yaml").write_text("format_version: 1\n")
        why = f"{bundle / 'manifest.yaml'}: <root>: missing required field 'tool'"
    before = tree(bundle)
    refused(convert_cli("--force", source, bundle, cwd=tmp_path),
            f"error: {bundle}: OUT is not a bundle this tool wrote ({why}); refusing to replace it "
            "(remove it yourself or choose another OUT)")
    assert tree(bundle) == before


def test_force_replaces_a_proven_bundle_and_an_empty_directory(source, bundle, tmp_path):
    r = convert_cli("--force", "--target", "m5", source, bundle, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert read_manifest(bundle)["target"]["name"] == "m5" and verify_bundle(bundle) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    assert convert_cli("--force", source, empty, cwd=tmp_path).returncode == 0
    assert verify_bundle(empty) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "empty"]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_cleanup_removes_only_what_dead_runs_provably_left(pristine, tmp_path):
    """A killed run's partial bundle (its marker, regular files) goes; the old bundle a run killed
    between --force's two renames comes back; look-alikes under the same names stay."""
    out = tmp_path / "out"
    dead, dead2, dead3 = dead_pid(), dead_pid(), dead_pid()
    partial = tmp_path / f".out.tmp-{dead}"
    partial.mkdir()
    (partial / PARTIAL_MARKER).write_bytes(marker_text(dead))
    (partial / "model.safetensors").write_bytes(b"partial")
    (partial / ".spill-1").write_bytes(b"scales")
    live = tmp_path / f".out.tmp-{os.getpid()}"  # a live run's: left alone
    live.mkdir()
    lookalike = tmp_path / f".out.tmp-{dead2}"  # a user's directory under a run's name: no marker
    lookalike.mkdir()
    (lookalike / "thesis.tex").write_text("mine")
    wrong_pid = tmp_path / f".out.tmp-{dead3}"  # a marker naming another run, and a subdirectory
    (wrong_pid / "sub").mkdir(parents=True)
    (wrong_pid / PARTIAL_MARKER).write_bytes(marker_text(dead))
    old = Path(shutil.copytree(pristine, tmp_path / f".out.old-{dead}"))
    fake_old = tmp_path / f".fresh.old-{dead}"
    fake_old.mkdir()
    (fake_old / "manifest.yaml").write_text("old bundle")

    clean_stale(out)
    clean_stale(tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["out", live.name, lookalike.name, wrong_pid.name, fake_old.name])
    assert not old.exists() and verify_bundle(out) == []
    assert (lookalike / "thesis.tex").read_text() == "mine"
    assert (fake_old / "manifest.yaml").read_text() == "old bundle"
    assert (wrong_pid / "sub").is_dir()


@pytest.mark.parametrize("kind", ["a symlink to a user's file", "a user's file"])
def test_a_file_named_like_the_lock_is_never_truncated(source, tmp_path, kind):
    """The lock `.OUT.lock` is truncated and removed by each run: only a file a run left (a
    process id) is taken over, never through a symlink."""
    precious = tmp_path / "thesis.txt"
    precious.write_text("years of work\n")
    lock = tmp_path / ".out.lock"
    if kind == "a user's file":
        lock.write_text("my notes about the lock\n")
    else:
        lock.symlink_to(precious)
    before = tree(tmp_path)
    refused(convert_cli(source, tmp_path / "out", cwd=tmp_path),
            f"error: {lock}: in the way of this conversion's lock, and not a lock this tool left (one holds a "
            "process id and nothing else); remove it or choose another OUT")
    assert tree(tmp_path) == before and precious.read_text() == "years of work\n"
    lock.unlink()
    lock.write_text("12345")  # what a killed run leaves: taken over
    assert convert_cli(source, tmp_path / "out", cwd=tmp_path).returncode == 0
    assert not lock.exists()
