"""benchmarks/bench_graphs.py: the settings it compares are the ones each side runs with."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_graphs import environment, parse_try  # noqa: E402
from common import CUDA_GRAPH_VARS  # noqa: E402


def test_a_setting_for_both_sides_and_for_ours_only():
    name, ours, peer = parse_try("2000/300")
    assert name == "2000/300 for both"
    assert ours == peer == {"MLX_MAX_OPS_PER_BUFFER": "2000", "MLX_CUDA_GRAPH_CACHE_SIZE": "300"}
    name, ours, peer = parse_try("ours:20/2000")
    assert name == "20/2000 for ours only"
    assert ours == {"MLX_MAX_OPS_PER_BUFFER": "20", "MLX_CUDA_GRAPH_CACHE_SIZE": "2000"} and peer == {}


@pytest.mark.parametrize("text", ["2000", "a/b", "ours:", "1/2/3"])
def test_a_malformed_setting_is_refused(text):
    with pytest.raises(SystemExit, match="expected OPS/CACHE"):
        parse_try(text)


def test_a_worker_does_not_inherit_the_callers_settings(monkeypatch):
    # `MLX defaults` must mean unset in the worker, whatever the shell running the benchmark set.
    for var in CUDA_GRAPH_VARS:
        monkeypatch.setenv(var, "7")
    assert not set(CUDA_GRAPH_VARS) & set(environment({}))
    assert environment({"MLX_MAX_OPS_PER_BUFFER": "20"})["MLX_MAX_OPS_PER_BUFFER"] == "20"
