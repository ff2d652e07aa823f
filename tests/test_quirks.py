"""The quantized-matmul fault of some MLX builds (runtime/quirks.py): detected, and routed around.

The fault itself lives on MLX's CUDA build (several rows of a 64-wide input give wrong or
changing answers); this machine's kernel is right. So a test double plays the faulty kernel:
`mx.quantized_matmul` replaced by one that is right for one row and wrong (a different answer
each call) for several rows of a narrow input, as measured on the H100
(benchmarks/cuda_qmm_sweep.py). The probe must see it, and a quantized model must then give the
logits the correct kernel gives.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import runtime.quirks as quirks
from runtime.quirks import rows, wrong_multirow
from tests.checkpoints import make_checkpoint, tiny_text_config
from tests.runtime_helpers import convert, load_quietly

REAL = mx.quantized_matmul


def faulty_quantized_matmul(x, w, *args, **kwargs):
    """Right for one row; for several rows of an input at most 64 wide, noise of the answers'
    size that changes from call to call, as MLX 0.32.4's CUDA kernel behaves."""
    y = REAL(x, w, *args, **kwargs)
    if rows(x) > 1 and x.shape[-1] <= 64:
        y = y + mx.random.normal(y.shape).astype(y.dtype) * (mx.abs(y).max() + 1)
    return y


@pytest.fixture
def fresh_probe():
    wrong_multirow.cache_clear()
    yield
    wrong_multirow.cache_clear()


@pytest.mark.parametrize("bits", [4, 8])
def test_the_probe_finds_this_kernel_right_for_narrow_widths(fresh_probe, bits):
    for width in (64, 128, 192):
        assert not wrong_multirow(width, bits, 64, "affine", "bfloat16")


def test_the_probe_finds_a_faulty_kernel_for_narrow_inputs_only(fresh_probe, monkeypatch):
    monkeypatch.setattr(mx, "quantized_matmul", faulty_quantized_matmul)
    assert wrong_multirow(64, 4, 64, "affine", "bfloat16")
    assert wrong_multirow(64, 8, 64, "affine", "float32")
    assert not wrong_multirow(256, 4, 64, "affine", "bfloat16")


@pytest.fixture(scope="module")
def narrow_bundle(tmp_path_factory):
    """A 4-bit bundle whose projections read inputs 64 (hidden) and 32 (LAuReL rank) wide."""
    root = tmp_path_factory.mktemp("quirks")
    source = make_checkpoint(root / "src", text_config=tiny_text_config(laurel_rank=32), seed=3)
    return convert(source, root / "q4", "generic", "--quantize", "4", "--group-size", "32")


def prefill_logits(model, ids) -> np.ndarray:
    return np.array(model(mx.array(ids)[None], cache=model.make_cache())[0])


def test_a_faulty_kernel_is_routed_around_in_a_prefill(fresh_probe, narrow_bundle, monkeypatch):
    model, _ = load_quietly(narrow_bundle)
    ids = [2, 17, 40, 99, 5, 64, 31, 7]
    right = prefill_logits(model, ids)
    wrong_multirow.cache_clear()  # the probe answered for the right kernel: ask again below
    monkeypatch.setattr(mx, "quantized_matmul", faulty_quantized_matmul)
    with monkeypatch.context() as m:  # without the workaround the fault shows in the logits
        m.setattr(quirks, "wrong_multirow", lambda *a: False)
        m.setattr("runtime.projections.wrong_multirow", lambda *a: False)
        broken = prefill_logits(model, ids)
    assert np.abs(broken - right).max() > 1.0
    routed = prefill_logits(model, ids)
    assert np.abs(routed - right).max() < 1e-4 * np.abs(right).max()


def test_one_row_keeps_the_quantized_kernel(fresh_probe, narrow_bundle, monkeypatch):
    """Decoding (one row) never asks the probe: the kernel is right there, and fast."""
    model, _ = load_quietly(narrow_bundle)
    asked = []
    monkeypatch.setattr("runtime.projections.wrong_multirow", lambda *a: asked.append(a) or True)
    model(mx.array([[5]]), cache=model.make_cache())
    assert asked == []
    model(mx.array([[5, 6]]), cache=model.make_cache())
    assert asked
