"""`runtime verify --numeric` and `runtime.verify_numeric`: a bundle's known answers on this device.

Shown to work where plain `verify` cannot: a weight nudged with every hash and the manifest
digest recomputed passes `verify` and fails `--numeric`, naming its layer; so do test doubles of
a wrong kernel (monkeypatched in this process: an eager RoPE, a compiled-step rotation) and of a
kernel that answers differently on each run (the run-to-run identity check).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from itertools import count

import mlx.core as mx
import pytest

import runtime
from runtime.numeric import NoKnownAnswers, verify_numeric
from tests.checkpoints import make_checkpoint
from tests.runtime_helpers import convert, edit_manifest, nudge

LAYER3_DOWN = "model.language_model.layers.3.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("numeric")
    src = make_checkpoint(root / "src", "hf")
    return {
        "src": src,
        "float32": convert(src, root / "f32", "generic", "--known-answers"),
        "fused": convert(src, root / "cuda", "cuda", "--known-answers"),
        "q4-bf16": convert(src, root / "q4", "cuda", "--dtype", "bfloat16", "--quantize", "4", "--group-size", "32",
                           "--known-answers"),
        "plain": convert(src, root / "plain", "m5"),
    }


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "runtime", *map(str, args)], capture_output=True, text=True)


def test_the_cli_passes_and_states_where_time_and_memory(bundles):
    done = run_cli("verify", "--numeric", bundles["float32"])
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "cpu (" in out and f"MLX {mx.__version__}" in out
    for run in ("eager run 1", "eager run 2", "compiled run 1", "compiled run 2"):
        assert run in out
    assert out.count("identical to") == 2
    assert "ok: numeric check passed in " in out and "peak memory" in out and "(load " in out


@pytest.mark.parametrize("name", ["fused", "q4-bf16"])
def test_the_api_passes_on_fused_and_quantized_bundles(bundles, name):
    report = runtime.verify_numeric(bundles[name])
    assert report.passed, str(report)
    assert [c.name for c in report.checks] == ["eager run 1", "eager run 2", "compiled run 1", "compiled run 2"]
    want = "bfloat16" if name == "q4-bf16" else "float32"
    assert report.tolerance["activations"] == want and report.seconds > 0 and report.peak_rss > 0


def test_a_bundle_without_known_answers_names_the_command_that_adds_them(bundles, tmp_path):
    bundle = shutil.copytree(bundles["plain"], tmp_path / "plain")
    done = run_cli("verify", "--numeric", bundle)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {bundle}: manifest.yaml records no known answers; add them with: "
        f"python -m convert known-answers {bundle}"]
    with pytest.raises(NoKnownAnswers):
        verify_numeric(bundle)
    added = subprocess.run([sys.executable, "-m", "convert", "known-answers", str(bundle)],
                           capture_output=True, text=True)
    assert added.returncode == 0, added.stderr
    assert run_cli("verify", "--numeric", bundle).returncode == 0


def test_a_nudged_weight_passes_verify_and_fails_numeric_at_its_layer(bundles, tmp_path):
    bundle = shutil.copytree(bundles["float32"], tmp_path / "nudged")
    nudge(bundle, LAYER3_DOWN, (5, 7), 0.01)  # the weights are N(0, 1/128): 0.01 is an eighth of one
    assert run_cli("verify", bundle).returncode == 0
    done = run_cli("verify", "--numeric", bundle)
    assert done.returncode == 1, done.stdout
    assert "eager run 1     FAIL  layer 3 diverges first:" in done.stdout
    assert "FAIL: numeric check failed (eager run 1: layer 3 diverges first" in done.stdout


def test_a_nudge_below_float32_rounding_passes(bundles, tmp_path):
    """Control: the check is not a hash in disguise; a change at the size of float32 rounding
    (one unit in the last place of the element) is within tolerance."""
    bundle = shutil.copytree(bundles["float32"], tmp_path / "ulp")
    nudge(bundle, LAYER3_DOWN, (5, 7), 1e-8)
    assert verify_numeric(bundle).passed


def test_a_wrong_rope_kernel_fails_at_the_first_full_attention_layer(bundles, monkeypatch):
    """A test double of a wrong eager kernel: RoPE with interleaved pairs at the full-attention
    base (layers 4 and 9 here), the right one elsewhere."""
    rope = mx.fast.rope

    def wrong(x, dims, *, traditional, base, scale, offset, **kw):
        return rope(x, dims, traditional=traditional or base > 1e5, base=base, scale=scale, offset=offset, **kw)

    monkeypatch.setattr(mx.fast, "rope", wrong)
    report = verify_numeric(bundles["float32"])
    assert not report.passed
    assert report.checks[0].name == "eager run 1" and not report.checks[0].passed
    assert report.checks[0].detail.startswith("layer 4 diverges first:")


def test_a_wrong_compiled_kernel_fails_the_compiled_runs_only(bundles, monkeypatch):
    """A test double of a wrong compiled-step kernel: the rotation's sine term with its sign flipped."""
    from runtime.fast import DecodeStep

    rotate = DecodeStep._scale_and_rotate

    def wrong(x, position, table):
        freq, scale, swapped = table
        return rotate(x, position, (freq, scale, -swapped))

    monkeypatch.setattr(DecodeStep, "_scale_and_rotate", staticmethod(wrong))
    report = verify_numeric(bundles["fused"])
    assert [c.passed for c in report.checks] == [True, True, False, True]
    assert "compiled run 1" in str(report) and "FAIL: numeric check failed (compiled run 1:" in str(report)


def test_a_kernel_that_answers_differently_each_run_fails_the_identity_check(bundles, monkeypatch):
    """A test double of a racy kernel: the activation off by a different rounding-sized amount on
    every call (one bfloat16 step). Each run is within tolerance of the known answers; the second
    is not the first."""
    import runtime.model as model

    gelu, calls = model.gelu_tanh, count()
    monkeypatch.setattr(model, "gelu_tanh", lambda x: gelu(x) * (1 + 2**-7 * (next(calls) % 3 - 1)))
    report = verify_numeric(bundles["q4-bf16"])
    first, second = report.checks[:2]
    assert first.passed, first.detail
    assert not second.passed and "differs from eager run 1 from " in second.detail


def test_a_malformed_section_is_refused_in_one_line(bundles, tmp_path):
    bundle = shutil.copytree(bundles["float32"], tmp_path / "bad")
    edit_manifest(bundle, lambda m: m["known_answers"].__setitem__("positions", [3, 99]))
    done = run_cli("verify", "--numeric", bundle)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "known_answers.positions" in done.stderr


def test_not_a_bundle(tmp_path):
    done = run_cli("verify", "--numeric", tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr


@pytest.mark.parametrize("runs", [0, 1, "2", True, 10**20])
def test_runs_is_a_count_from_2_to_1000(bundles, runs):
    """10**20 ran for ever (one check after another); refused before the bundle is read."""
    with pytest.raises(ValueError, match=r"runs must be an integer from 2 \(the second checks the first\) to 1000"):
        verify_numeric(bundles["float32"], runs=runs)
