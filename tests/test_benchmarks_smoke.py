"""The benchmark generator at tiny size: the checkpoint it streams is one the converter and mlx-lm
accept, with exactly the names and shapes of `convert.gemma3n.expected_tensors`.

The full-size runs are benchmarks (benchmarks/, docs/BENCHMARKS.md), not tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from convert.gemma3n import expected_tensors, kv_shared_unused
from manifests import read_manifest
from tests.runtime_helpers import load_tensors

ROOT = Path(__file__).resolve().parents[1]
GENERATOR = ROOT / "benchmarks" / "make_checkpoint.py"
PREFIX = "model.language_model."


def generate(out: Path, *args: str) -> None:
    r = subprocess.run([sys.executable, str(GENERATOR), "--size", "tiny", "--quiet", *args, str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_names_shapes_dtype_and_values(tmp_path):
    ckpt = tmp_path / "ckpt"
    generate(ckpt, "--no-kv-shared-extras")
    text = json.loads((ckpt / "config.json").read_text())["text_config"]
    tensors = load_tensors(ckpt)
    want = {PREFIX + k: v for k, v in expected_tensors(text).items()}
    assert {k: tuple(v.shape) for k, v in tensors.items()} == want
    assert {v.dtype for v in tensors.values()} == {mx.bfloat16}
    for name, value in tensors.items():
        assert mx.all(mx.isfinite(value)).item(), name
    # Tame values (docs/GEMMA3N.md, pitfalls): unit norm scales, q/k norms head_dim^-1/4, projections
    # with std 1/sqrt(fan_in).
    hd = text["head_dim"]
    assert np.allclose(np.array(tensors[PREFIX + "norm.weight"].astype(mx.float32)), 1.0)
    q_norm = np.array(tensors[PREFIX + "layers.0.self_attn.q_norm.weight"].astype(mx.float32))
    assert np.allclose(q_norm, hd ** -0.25, rtol=1e-2)
    gate = np.array(tensors[PREFIX + "layers.0.mlp.gate_proj.weight"].astype(mx.float32))
    assert abs(gate.std() * np.sqrt(text["hidden_size"]) - 1.0) < 0.1
    assert len(np.unique(gate)) > 1000  # random, not a constant fill


def test_sharded_with_towers_and_kv_extras_converts_for_m5(tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "bundle"
    generate(ckpt, "--towers", "--dtype", "float32", "--max-shard-size", "0.0005")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in ckpt.glob("*.safetensors"))
    assert len(files) > 1 and set(index["weight_map"].values()) == set(files)
    text = json.loads((ckpt / "config.json").read_text())["text_config"]
    tensors = load_tensors(ckpt)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
    extras = {PREFIX + k for k in kv_shared_unused(text)}
    towers = {k for k in tensors if not k.startswith(PREFIX)}
    assert extras <= set(tensors) and towers

    r = subprocess.run([sys.executable, "-m", "convert", "--target", "m5", "--quiet", str(ckpt), str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    manifest = read_manifest(out)
    dropped = {d["key"] for d in manifest["dropped"]}
    assert towers | extras <= dropped
    gate = manifest["projections"][PREFIX + "layers.0.mlp.gate_proj"]
    assert gate["layout"] == "pretransposed" and gate["shape"] == gate["source_shape"][::-1]


def test_mlx_lm_loads_the_checkpoint(tmp_path):
    mlx_lm = pytest.importorskip("mlx_lm")
    ckpt = tmp_path / "ckpt"
    generate(ckpt, "--towers")
    model, tokenizer = mlx_lm.load(str(ckpt))  # strict: every weight matched by name and shape
    logits = model(mx.array([[2, 10, 11]]), cache=model.make_cache())
    assert logits.shape == (1, 3, 320) and mx.all(mx.isfinite(logits)).item()
    assert tokenizer.encode("w1 w2", add_special_tokens=False) == [5, 6]


def test_refuses_to_overwrite(tmp_path):
    ckpt = tmp_path / "ckpt"
    generate(ckpt)
    r = subprocess.run([sys.executable, str(GENERATOR), "--size", "tiny", "--quiet", str(ckpt)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "already holds" in r.stderr and "Traceback" not in r.stderr


def test_fills_an_empty_directory_and_never_a_users_files(tmp_path):
    """A new or empty directory is filled; one with anything in it is refused, left as it was,
    and nothing of the attempt stays beside it."""
    empty = tmp_path / "empty"
    empty.mkdir()
    generate(empty)
    assert (empty / "config.json").is_file() and (empty / "model.safetensors").is_file()
    users = tmp_path / "users"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    r = subprocess.run([sys.executable, str(GENERATOR), "--size", "tiny", "--quiet", str(users)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not an empty directory" in r.stderr and len(r.stderr.splitlines()) == 1
    assert [p.name for p in users.iterdir()] == ["notes.txt"] and (users / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "users"]


def test_a_failed_write_leaves_no_checkpoint_behind(tmp_path, monkeypatch):
    """The checkpoint is written into a hidden sibling and renamed into place whole: a write that
    fails part-way (here the second tensor's values) leaves neither the directory a later run
    would take for a checkpoint (h100.sh makes one only where none exists) nor the partial one."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_checkpoint_under_test", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    real, calls = module._write_values, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*args)

    monkeypatch.setattr(module, "_write_values", failing)
    with pytest.raises(OSError, match="No space left"):
        module.make_checkpoint(tmp_path / "ckpt", "tiny")
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("given", [None, "0123abc"])
def test_a_result_names_the_commit_and_the_device_it_ran_on(tmp_path, given):
    """A benchmark's JSON says which code and which device it measured (benchmarks/common.py):
    the commit from git, or from BENCH_COMMIT in a copy of the tree without git."""
    import mlx.core as mx

    from tests.runtime_helpers import demo_bundle

    bundle, out = demo_bundle(tmp_path), tmp_path / "graph.json"
    env = {k: v for k, v in os.environ.items() if k != "BENCH_COMMIT"} | ({"BENCH_COMMIT": given} if given else {})
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_graph.py"), str(bundle), "--no-mlx-lm",
                        "--json", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    facts = json.loads(out.read_text())["facts"]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if given:
        assert facts["commit"] == given
    elif head.returncode == 0:
        assert facts["commit"].removesuffix("-dirty") == head.stdout.strip()
    else:
        assert facts["commit"] == "unknown"
    assert facts["device"]["default_device"] == str(mx.default_device())
    assert facts["device"]["device_name"] == mx.device_info()["device_name"]


def test_ab_trees_runs_two_trees_on_one_checkpoint(tmp_path):
    """benchmarks/ab_trees.sh with the same tree on both sides, at test size: each side converts
    its own bundle and decodes it in fresh processes; the table names both trees."""
    env = {**os.environ, "AB_DATA": str(tmp_path / "ab"), "TOKENS": "4",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "ab_trees.sh"), str(ROOT), str(ROOT), "tiny", "1"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith(f"old {ROOT}: median ") and lines[1].startswith(f"new {ROOT}: median "), r.stdout
    assert lines[2].startswith("new / old: ")
    for side in ("old", "new"):
        run = json.loads((tmp_path / "ab" / f"{side}-1.json").read_text())
        assert len(run["decode_tps"]) == 3 and min(run["decode_tps"]) > 0
        assert read_manifest(tmp_path / "ab" / f"tiny-{side}")["target"]["name"] == "cuda"
    missing = subprocess.run(["bash", str(ROOT / "benchmarks" / "ab_trees.sh"), str(tmp_path / "nope"), str(ROOT)],
                             capture_output=True, text=True, env=env, timeout=60)
    assert missing.returncode != 0


@pytest.mark.parametrize("impls", ["foo", "ours,x", ""])
def test_bench_coldstart_refuses_an_unknown_implementation(impls):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_coldstart.py"), "A", "B", "--impls", impls],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--impls" in r.stderr and "not one of ours, ours-foreground, mlx-lm" in r.stderr
    assert "Traceback" not in r.stderr


def test_bench_qmm_rows_compares_both_layouts_and_checks_its_arguments():
    """benchmarks/bench_qmm_rows.py at a small size: a row per dtype, both layouts timed, the same
    answers from both; a size it cannot run is one usage line."""
    script = str(ROOT / "benchmarks" / "bench_qmm_rows.py")
    r = subprocess.run([sys.executable, script, "--rows", "4", "--out", "128", "--in", "128", "--repeats", "2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    body = [line for line in r.stdout.splitlines() if line.startswith(("| float32", "| bfloat16"))]
    assert len(body) == 2, r.stdout
    for line in body:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[1]) > 0 and float(cells[2]) > 0 and cells[4] == "yes", line
    for bad in (["--rows", "0"], ["--in", "100"], ["--repeats", "-1"]):
        r = subprocess.run([sys.executable, script, *bad], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "usage:" in r.stderr and "Traceback" not in r.stderr, bad


H100 = ROOT / "benchmarks" / "h100.sh"


def h100(tmp_path, *args, busy=""):
    """benchmarks/h100.sh with a stand-in `nvidia-smi` first on PATH (this machine has no GPU):
    it names a fake card and, where `busy` is given, one process using it."""
    return subprocess.run(["bash", str(H100), *args], capture_output=True, text=True,
                          env=h100_env(tmp_path, busy), timeout=60, cwd=ROOT)


def h100_env(tmp_path, busy=""):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text('#!/bin/sh\ncase "$*" in *compute-apps*) [ -n "$FAKE_BUSY" ] && echo "$FAKE_BUSY" ;; '
                   '*) echo "Fake GPU, 1 MiB, 0" ;; esac\nexit 0\n')
    smi.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "FAKE_BUSY": busy, "OUT": str(tmp_path / "out")}
    env.pop("BUSY_OK", None)
    env.pop("BENCH_DATA", None)
    return env


@pytest.mark.parametrize("args, named", [(["e3b", "decode"], "unknown size 'e3b'"),
                                         (["e2b", "decode", "speed"], "unknown step 'speed'")])
def test_h100_script_refuses_an_unknown_size_or_step_before_any_work(tmp_path, args, named):
    r = h100(tmp_path, *args)
    assert r.returncode == 2 and named in r.stderr
    assert "Fake GPU" not in r.stdout  # stopped before it looked at the machine


@pytest.mark.parametrize("env, named", [
    ({"ROUNDS": "two"}, "ROUNDS='two'"), ({"TOKENS": "0"}, "TOKENS='0'"), ({"JOBS": "-4"}, "JOBS='-4'"),
    ({"ROUNDS": "nan"}, "ROUNDS='nan'"), ({"RUNS": "9" * 50}, "RUNS='" + "9" * 40 + "'"),
    ({"ROUND_FROM": "2"}, "ROUND_FROM=2 needs ROUNDS"), ({"ROUND_FROM": "3", "ROUNDS": "2"}, "ROUND_FROM=3 needs"),
])
def test_h100_script_refuses_a_bad_count_before_any_work(tmp_path, monkeypatch, env, named):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    r = h100(tmp_path, "e2b-narrow", "blocks")
    assert r.returncode == 2 and named in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert "Fake GPU" not in r.stdout


def test_h100_script_refuses_a_busy_gpu(tmp_path):
    """A process left on the GPU (a run cut off by its time limit) would share it with the
    measurement: refused, the process named, before any checkpoint is made."""
    r = h100(tmp_path, "e2b-narrow", "cuda-tests", busy="4242, python3, 9000 MiB")
    assert r.returncode == 2
    assert "busy" in r.stderr and "4242, python3, 9000 MiB" in r.stderr


def test_h100_script_refuses_an_ab_step_without_the_other_tree(tmp_path):
    r = h100(tmp_path, "e2b-narrow", "ab")
    assert r.returncode == 2 and "step ab needs AB_TREE" in r.stderr and "AB_COMMIT" in r.stderr
    assert "Fake GPU" not in r.stdout


def test_h100_prepare_twice_at_once_makes_the_data_once(tmp_path):
    """Two `prepare`s of one size at once (a background one and a step that needs its data): the
    second waits for the first's lock and finds whole directories, so both succeed and the data
    is made once. Without the lock both would write the checkpoint and the second's rename, or
    its conversion into the same bundle, would fail. `prepare` measures nothing, so a busy GPU
    does not stop it."""
    data = tmp_path / "data"
    env = {**h100_env(tmp_path, busy="4242, python3, 9000 MiB"), "BENCH_DATA": str(data)}
    runs = [subprocess.Popen(["bash", str(H100), "e2b-narrow", "prepare"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT) for _ in range(2)]
    results = [(p.wait(timeout=600), *p.communicate()) for p in runs]
    for rc, out, err in results:
        assert rc == 0 and "prepared:" in out, err
    assert sorted(p.name for p in data.iterdir()) == [
        ".lock-e2b-narrow", "e2b-narrow", "e2b-narrow-cuda", "e2b-narrow-generic"]
    for target in ("cuda", "generic"):
        assert read_manifest(data / f"e2b-narrow-{target}")["target"]["name"] == target

