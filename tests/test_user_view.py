"""What a user sees from both programs, through the real CLI (`python -m convert`,
`python -m runtime` in a subprocess): the words, the stream they go to, the exit code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.checkpoints import make_checkpoint

REPO = Path(__file__).resolve().parents[1]


def run(*args, stdin=None, env=None, cwd=None):
    full_env = {k: v for k, v in os.environ.items() if k not in ("MTL_CAPTURE_ENABLED", "MLX_PREPARED_CAPTURE_DECODE")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True, input=stdin,
                          env=full_env, cwd=cwd or REPO, timeout=300)


def one_error(r, code: int = 2) -> str:
    """The one line stderr holds, which must be an `error:` line, with exit code `code`."""
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


@pytest.mark.parametrize("args", [
    ("convert", "--target", "generic", "no/such/dir/x", "OUT"),                    # a ConvertError
    ("convert", "--dtype", "int3", "SRC", "OUT"),                                   # a usage error
    ("runtime", "generate", "no-such-bundle", "--prompt", "hi"),                   # a load error
    ("runtime", "generate", "B", "--prompt", "hi", "--top-p", "2"),                # a usage error
    ("runtime", "publish", "SRC", "acme/x"),                                       # the hub's error
    ("runtime", "calibrate", "--config", "SRC/nothing.json"),                       # calibrate's error
    ("runtime", "verify", "SRC"),                                                   # verify's own line
])
def test_both_programs_spell_an_error_the_same_way(tmp_path, args):
    src = make_checkpoint(tmp_path / "src")
    args = [str(src) if a == "SRC" else str(tmp_path / "out") if a == "OUT" else a for a in args]
    args = [str(tmp_path / "b") if a == "B" else a for a in args]
    one_error(run(*args))
