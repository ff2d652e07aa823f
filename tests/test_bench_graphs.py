"""benchmarks/bench_graphs.py, run as a user runs it (`--dry-run`): the settings it compares are
the ones each side's workers get, whatever the shell running the benchmark set."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_graphs.py"
OPS, CACHE, GRAPHS = "MLX_MAX_OPS_PER_BUFFER", "MLX_CUDA_GRAPH_CACHE_SIZE", "MLX_USE_CUDA_GRAPHS"


def dry_run(*tries: str, **env: str) -> subprocess.CompletedProcess:
    args = [a for t in tries for a in ("--try", t)]
    clean = {k: v for k, v in os.environ.items() if k not in (OPS, CACHE, GRAPHS)}
    return subprocess.run([sys.executable, str(SCRIPT), "OURS", "PEER", *args, "--dry-run"], capture_output=True,
                          text=True, env={**clean, **env})


def test_a_setting_for_both_sides_and_for_ours_only():
    done = dry_run("2000/300", "ours:20/2000")
    assert done.returncode == 0, done.stderr
    settings = json.loads(done.stdout)
    assert settings["2000/300 for both"] == {"ours": {OPS: "2000", CACHE: "300"}, "mlx-lm": {OPS: "2000", CACHE: "300"}}
    assert settings["20/2000 for ours only"] == {"ours": {OPS: "20", CACHE: "2000"}, "mlx-lm": {}}


@pytest.mark.parametrize("text", ["2000", "a/b", "ours:", "1/2/3"])
def test_a_malformed_setting_is_refused(text):
    done = dry_run(text)
    assert done.returncode != 0 and "expected [ours:]OPS/CACHE" in done.stderr


def test_no_cuda_graphs_for_both_sides_and_for_ours_only():
    settings = json.loads(dry_run("nographs", "ours:nographs").stdout)
    assert settings["no CUDA graphs for both"] == {"ours": {GRAPHS: "0"}, "mlx-lm": {GRAPHS: "0"}}
    assert settings["no CUDA graphs for ours only"] == {"ours": {GRAPHS: "0"}, "mlx-lm": {}}


def test_a_worker_does_not_inherit_the_callers_settings():
    # `MLX defaults` must mean unset in the worker, whatever the shell running the benchmark set.
    done = dry_run("ours:20/2000", **{OPS: "7", CACHE: "7", GRAPHS: "0"})
    settings = json.loads(done.stdout)
    assert settings["MLX defaults"] == {"ours": {}, "mlx-lm": {}}
    assert settings["20/2000 for ours only"] == {"ours": {OPS: "20", CACHE: "2000"}, "mlx-lm": {}}
