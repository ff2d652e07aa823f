"""manifests/records.py: the one description of what a manifest record stores.

Checked against what it describes, not against itself: the shapes, parts and dtypes mx.quantize
really makes, and the tensors the real converter really writes (every tensor of every shard is
some record's, no record names a tensor that is not there) for every layout, quantization and
fused group it writes.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from manifests import ManifestError, read_manifest
from manifests.format import EMBED_TOKENS, LM_HEAD, PRETRANSPOSED, STANDARD
from manifests.records import EMBEDDINGS, PROJECTIONS, Quantization, Storage, records, unread
from manifests.safetensors_header import DTYPE_NAMES, read_header_file
from tests.checkpoints import make_checkpoint
from tests.runtime_helpers import convert

GATE = "model.language_model.layers.0.mlp.gate_proj"


@pytest.mark.parametrize("mode,bits,group_size", [("affine", 4, 32), ("affine", 4, 64), ("affine", 8, 128),
                                                  ("mxfp4", 4, 32), ("mxfp8", 8, 32)])
def test_quantized_tensors_are_what_mx_quantize_makes(mode, bits, group_size):
    out_dims, in_dims = 48, 256
    made = mx.quantize(mx.ones((out_dims, in_dims), mx.bfloat16), group_size=group_size, bits=bits, mode=mode)
    storage = Storage(STANDARD, Quantization(bits, group_size, mode))
    described = storage.tensors("m", out_dims, in_dims, "bfloat16")
    assert [t.part for t in described] == ["weight", "scales", "biases"][: len(made)]
    assert [t.key for t in described] == [f"m.{t.part}" for t in described]
    for tensor, array in zip(described, made):
        assert tensor.shape == tuple(array.shape), tensor
        if tensor.dtype is not None:
            assert tensor.dtype == str(array.dtype).rsplit(".", 1)[-1], tensor
    assert storage.dims(described[0].shape) == (out_dims, in_dims)


@pytest.mark.parametrize("layout,quantized", [(STANDARD, None), (PRETRANSPOSED, None),
                                              (STANDARD, Quantization(4, 64)), (STANDARD, Quantization(8, 32))])
def test_dims_undo_the_stored_shape(layout, quantized):
    storage = Storage(layout, quantized)
    for out_dims, in_dims in ((128, 64), (64, 256), (2048, 256)):
        assert storage.dims(storage.weight_shape(out_dims, in_dims)) == (out_dims, in_dims)
    assert Storage(PRETRANSPOSED).weight_shape(8, 64) == (64, 8)


def test_keys_of_each_kind_of_record():
    assert PROJECTIONS.weight_key(GATE, STANDARD) == GATE + ".weight"
    assert PROJECTIONS.weight_key(GATE, PRETRANSPOSED) == GATE + ".weight_t"
    assert PROJECTIONS.weight_key(LM_HEAD, STANDARD) == EMBED_TOKENS + ".weight"  # tied: the table itself
    assert PROJECTIONS.weight_key(LM_HEAD, PRETRANSPOSED) == "lm_head.weight_t"
    assert EMBEDDINGS.weight_key(EMBED_TOKENS) == EMBED_TOKENS + ".weight"
    with_bias = PROJECTIONS.expected(GATE, Storage(PRETRANSPOSED, bias=True), 32, 16, "float16")
    assert [(t.key, t.shape, t.dtype) for t in with_bias] == [(GATE + ".weight_t", (16, 32), "float16"),
                                                               (GATE + ".bias", (32,), "float16")]


@pytest.mark.parametrize("record,message", [
    ({"layout": "sideways"}, "unknown layout 'sideways'"),
    ({"layout": PRETRANSPOSED, "quantized": {"bits": 4, "group_size": 64, "mode": "affine"}},
     "a quantized projection must be standard"),
])
def test_storage_no_writer_makes_is_refused_naming_the_record(record, message):
    with pytest.raises(ManifestError, match=f"^manifest.yaml: projections.x: {message}$"):
        Storage.of(record, "manifest.yaml: projections.x")


def test_a_quantization_that_does_not_pack_is_refused():
    record = {"key": GATE + ".weight", "shape": [128, 8], "dtype": "uint32", "layout": STANDARD,
              "quantized": {"bits": 4, "group_size": 48, "mode": "affine"}}
    with pytest.raises(ManifestError, match="^here: quantized 128x64 with bits=4, group_size=48 does not pack$"):
        PROJECTIONS.stored(record, "here")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("records")
    src = make_checkpoint(root / "src", "hf", seed=3)
    return {
        "m5": convert(src, root / "m5", "m5"),  # gate/up and the head pretransposed
        "cuda": convert(src, root / "cuda", "cuda"),  # q/k/v + laurel, q + laurel, gate/up fused
        "q4-cuda": convert(src, root / "q4-cuda", "cuda", "--quantize", "4", "--group-size", "32"),
        "q8": convert(src, root / "q8", "generic", "--quantize", "8"),
    }


@pytest.mark.parametrize("name", ["m5", "cuda", "q4-cuda", "q8"])
def test_the_records_describe_exactly_the_stored_tensors(bundles, name):
    """Every matrix of every shard belongs to a record (what has none are the norms' vectors);
    every tensor a record describes is stored with the described shape (and dtype, where the
    record says it)."""
    manifest = read_manifest(bundles[name])
    stored = {}
    for f in bundles[name].glob("*.safetensors"):
        stored.update({e.name: (e.shape, DTYPE_NAMES[e.dtype]) for e in read_header_file(f)[0]})
    described = {}
    for where, kind, path, record in records(manifest):
        tensors = kind.stored(record, where)
        assert tensors[0].key == kind.weight_key(path, record.get("layout", STANDARD)), where
        for t in tensors:
            assert t.key in stored, (where, t)
            assert stored[t.key][0] == t.shape and t.dtype in (None, stored[t.key][1]), (where, t, stored[t.key])
            described[t.key] = t
    for where, key, entry in unread(manifest):  # kept for mlx-lm's loader (a generic bundle), never read here
        assert stored[key] == (tuple(entry["shape"]), entry["dtype"]), where
        described[key] = entry
    assert {key for key, (shape, _) in stored.items() if len(shape) != 1} == {
        key for key in described if len(stored[key][0]) != 1}
    assert bool(manifest.get("unread")) == (name == "q8")  # the generic bundle keeps the KV-shared K/V
    assert any(t.part == "scales" for t in described.values()) == name.startswith("q")
