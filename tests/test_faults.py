"""Faults: conversions killed with SIGKILL at random moments, and conversions racing for one OUT.

The real CLI in a subprocess, on a checkpoint large enough (about 130 MB, m5 transposes its 64 MB
embedding again as the LM head) that a run lasts a few seconds here. tests/test_convert.py kills
one run at one chosen moment; here the moments come from a seeded RNG over the whole run, start
to finish, and every run goes on the same OUT, so each must cope with what the last one left.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from runtime.verify import verify_bundle
from tests.checkpoints import make_checkpoint, tiny_text_config

REPO = Path(__file__).resolve().parents[1]
SEED = 20261125
KILLS = 6


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    cfg = tiny_text_config(vocab_size=1 << 19)
    return make_checkpoint(tmp_path_factory.mktemp("faults") / "src", "hf", text_config=cfg, extra_files=False)


def start(src: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "convert", "--target", "m5", "-q", *extra, str(src), str(out)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def snapshot(out: Path) -> dict:
    """What 'untouched' means: the same files, inodes, sizes and modification times."""
    return {p.name: (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns) for p in out.iterdir()}


def test_sigkill_at_random_moments_leaves_out_as_it_was(big, tmp_path):
    """Runs alternate between replacing a bundle (--force) and writing a fresh OUT; each is
    SIGKILLed at a random moment. After each kill: the previous bundle intact (or, killed after
    its final rename, the new one complete), a fresh OUT absent (or complete); anything else
    left beside them is a dead run's, and the next runs clean it all up and succeed."""
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    started = time.monotonic()
    assert finish(start(big, out)) == (0, "")
    duration = time.monotonic() - started
    before = snapshot(out)

    rng = random.Random(SEED)
    seen = Counter()
    for i in range(KILLS):
        target = out if i % 2 == 0 else fresh
        delay = rng.uniform(0.05, 1.1 * duration)  # from interpreter start-up to past the final rename
        proc = start(big, target, "--force")
        time.sleep(delay)
        proc.kill()  # SIGKILL: no handler, no cleanup
        proc.wait()
        leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("out", "fresh"))
        if target == fresh:
            if fresh.exists():  # killed after its final rename
                assert verify_bundle(fresh) == []
                seen["fresh: complete"] += 1
            else:
                seen["fresh: absent"] += 1
        elif out.exists() and snapshot(out) == before:
            seen["replace: previous bundle intact"] += 1
        elif out.exists():  # killed after its final rename: the new bundle is complete
            assert verify_bundle(out) == []
            before = snapshot(out)
            seen["replace: new bundle complete"] += 1
        else:  # killed between --force's two renames: the old bundle waits beside OUT for the next run
            assert [n for n in leftovers if n.startswith(".out.old-")], leftovers
            seen["replace: between the renames"] += 1
        seen["left a temporary directory"] += any(".tmp-" in n for n in leftovers)
        assert all(n.startswith((".out.", ".fresh.")) for n in leftovers), leftovers
    print(f"\n{KILLS} kills (seed {SEED}, a run takes {duration:.1f} s): {dict(seen)}")
    assert seen["left a temporary directory"] >= 1, seen  # some kills did land mid-write

    # the next run for each OUT cleans up every dead run's leftovers and succeeds
    for target in (out, fresh):
        assert finish(start(big, target, "--force")) == (0, "")
        assert verify_bundle(target) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "out"]


def test_two_conversions_started_at_once(big, tmp_path):
    """Both started together: whichever locks OUT first is held there (SIGSTOP) until the other
    has finished, so the other meets the lock, never a finished OUT, on any machine."""
    out = tmp_path / "out"
    a, b = start(big, out), start(big, out)
    deadline = time.monotonic() + 120
    while True:
        held = next((p for p in (a, b) if (tmp_path / f".out.tmp-{p.pid}").exists()), None)
        if held is not None:
            break
        # the other may have met the lock and exited already: the holder takes the lock a moment
        # before it makes its temporary directory (a window a loaded machine widens)
        assert time.monotonic() < deadline and (a.poll() is None or b.poll() is None)
        time.sleep(0.01)
    held.send_signal(signal.SIGSTOP)
    other = b if held is a else a
    try:
        code, err = finish(other)
    finally:
        held.send_signal(signal.SIGCONT)
    assert code == 2 and err.splitlines() == [
        f"error: {out}: another conversion (pid {held.pid}) is writing this OUT; wait for it to finish or "
        "choose another OUT"], err
    assert finish(held) == (0, "")
    assert verify_bundle(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def writing(proc: subprocess.Popen, tmp_path: Path) -> None:
    """Wait for `proc` to be writing (its temporary directory exists: it holds the lock), then stop
    it there (SIGSTOP) until the caller resumes it, so what happens meanwhile does not depend on
    how fast either run is on a loaded machine."""
    deadline = time.monotonic() + 120
    while not (tmp_path / f".out.tmp-{proc.pid}").exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGSTOP)


def test_a_second_conversion_while_the_first_writes(big, tmp_path):
    """--force on both, the second started while the first writes (held there): refused at
    once, naming the first; the first, resumed, completes."""
    out = tmp_path / "out"
    first = start(big, out, "--force")
    writing(first, tmp_path)
    try:
        code, err = finish(start(big, out, "--force"))
    finally:
        first.send_signal(signal.SIGCONT)
    assert code == 2 and err.splitlines() == [
        f"error: {out}: another conversion (pid {first.pid}) is writing this OUT; wait for it to finish or "
        "choose another OUT"]
    assert finish(first) == (0, "")
    assert verify_bundle(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("writes_pid", [True, False])
def test_a_lock_met_before_its_holder_wrote_its_pid(tmp_path, writes_pid):
    """A run that meets the lock in the moment between the holder's flock and its pid write waits
    for the pid (at most two seconds) and names it; the holder here is this test, in the open."""
    import fcntl
    import os
    import threading

    from convert.errors import ConvertError
    from convert.pipeline import destination_lock

    out = tmp_path / "out"
    lock = tmp_path / ".out.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held, nothing written yet
    if writes_pid:
        threading.Timer(0.3, os.pwrite, (fd, b"4242", 0)).start()
    began = time.monotonic()
    with pytest.raises(ConvertError) as e:
        with destination_lock(out):
            pass
    waited = time.monotonic() - began
    os.close(fd)
    who = " (pid 4242)" if writes_pid else ""
    assert str(e.value) == (f"{out}: another conversion{who} is writing this OUT; wait for it to finish or "
                            "choose another OUT")
    assert (0.25 < waited < 1.9) if writes_pid else (1.9 < waited < 5), waited
