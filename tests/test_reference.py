"""The known answers' float32 numpy forward pass (convert/reference.py) against transformers'
Gemma3nForCausalLM in float32, as the runtime is held (tests/test_model_parity.py): same metric,
same bound, every position, and every layer's AltUp planes.

The reference reads a bundle's stored tensors; the transformers reference reads the source
checkpoint (dequantized with MLX where the bundle stores quantized weights), so a mistake in
un-transposing, splitting a fused record or dequantizing shows here.
"""

import json

import numpy as np
import pytest

import mlx.core as mx

from convert import gemma3n, reference
from convert.quantize import QuantSpec, not_quantized_because
from convert.reference import Forward, StoredTensors, dequantize
from manifests import PREFIX, read_manifest
from tests.checkpoints import checkpoint_tensors, full_config, make_checkpoint, tiny_text_config, write_tensors
from tests.runtime_helpers import convert, reference_model, relative_error, source_tensors

pytest.importorskip("transformers")

BOUND = 1e-4
BUNDLES = [("generic", "hf", ()), ("m5", "hf", ()), ("cuda", "hf", ()), ("m5", "mlx-vlm", ("--max-shard-size", "600KB")),
           ("cuda", "hf", ("--ple", "mapped"))]  # the per-layer table in a file of its own


@pytest.fixture(scope="module")
def ids():
    cfg = tiny_text_config()
    ids = np.random.default_rng(7).integers(0, cfg["vocab_size"], (2, 20))
    ids[0, 3] = 300  # beyond vocab_size_per_layer_input: reads per-layer row 0
    return ids


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    return root, {"hf": make_checkpoint(root / "src-hf", "hf"),
                  "mlx-vlm": make_checkpoint(root / "src-mlx-vlm", "mlx-vlm", shards=3)}


def transformers_run(text_config: dict, tensors: dict, ids: np.ndarray):
    """(logits [t, vocab], planes after each layer [layers][n, t, hidden]) of one sequence."""
    import torch

    model = reference_model(text_config, tensors)
    planes = []
    hooks = [layer.register_forward_hook(lambda m, i, out: planes.append(out[:, 0].numpy().copy()))
             for layer in model.model.layers]
    with torch.no_grad():
        logits = model(torch.from_numpy(ids[None])).logits[0].float().numpy()
    for hook in hooks:
        hook.remove()
    return logits, planes


def reference_run(bundle, ids: np.ndarray):
    manifest = read_manifest(bundle)
    planes = {}
    store = StoredTensors(bundle, manifest)
    logits = Forward(store, manifest["model"]["text_config"])(
        ids, list(range(len(ids))), lambda stage, p: planes.__setitem__(stage, p.copy()))
    store.close()
    return logits, planes


@pytest.mark.parametrize("target,naming,extra", BUNDLES, ids=lambda b: str(b) if isinstance(b, str) else "")
def test_every_position_and_layer_against_transformers(tmp_path, sources, ids, target, naming, extra):
    root, srcs = sources
    src = srcs[naming]
    text_config = json.loads((src / "config.json").read_text())["text_config"]
    bundle = convert(src, tmp_path / "bundle", target, *extra)
    for row in ids:
        want_logits, want_planes = transformers_run(text_config, source_tensors(src, naming), row)
        logits, planes = reference_run(bundle, row)
        assert relative_error(logits, want_logits) < BOUND
        assert len(planes) == len(want_planes) + 1  # and the planes entering layer 0
        for i, want in enumerate(want_planes):
            assert relative_error(planes[i], want) < BOUND, f"layer {i}"


def test_the_sliding_window_and_kv_sharing_are_what_it_computes(tmp_path, sources, ids):
    """Control: the 20-token rows are longer than the window (8), and the shared layers read
    their producers' K/V; a reference that ignored either would not match transformers."""
    root, srcs = sources
    text_config = json.loads((srcs["hf"] / "config.json").read_text())["text_config"]
    bundle = convert(srcs["hf"], tmp_path / "bundle", "generic")
    want, _ = transformers_run(text_config, source_tensors(srcs["hf"], "hf"), ids[0])
    manifest = read_manifest(bundle)
    for change in ({"sliding_window": 10_000}, {"num_kv_shared_layers": 0}):
        forward = Forward(StoredTensors(bundle, manifest), dict(manifest["model"]["text_config"], **change))
        if "num_kv_shared_layers" in change:  # the shared layers then read their own (absent) k/v
            with pytest.raises(Exception, match="no manifest record"):
                forward(ids[0], list(range(20)))
            continue
        assert relative_error(forward(ids[0], list(range(20))), want) > 10 * BOUND


def _dequantized(tensors: dict, spec: QuantSpec, text_config: dict) -> tuple[dict, dict]:
    """(MLX-quantized checkpoint tensors, the decoder's weights as MLX dequantizes them)."""
    stored, plain = {}, {}
    for key, w in tensors.items():
        path = key[len(PREFIX):]
        module = path[: -len(".weight")] if path.endswith(".weight") else None
        if module and not_quantized_because(gemma3n, module, w.shape, spec) is None:
            q, scales, biases = mx.quantize(w, group_size=spec.group_size, bits=spec.bits)
            stored.update({key: q, f"{PREFIX}{module}.scales": scales, f"{PREFIX}{module}.biases": biases})
            w = mx.dequantize(q, scales, biases, group_size=spec.group_size, bits=spec.bits)
        else:
            stored[key] = w
        plain[path] = np.array(w.astype(mx.float32))
    return stored, plain


@pytest.mark.parametrize("target,bits,group", [("cuda", 4, 32), ("generic", 8, 64)])
def test_quantized_bundles_against_transformers_on_the_dequantized_weights(tmp_path, ids, target, bits, group):
    """An MLX-quantized checkpoint passes through (`cuda` fuses its packed q/k/v, laurel-left and
    gate/up member by member); the reference dequantizes what is stored."""
    cfg = tiny_text_config()
    stored, plain = _dequantized(checkpoint_tensors(cfg, "mlx-lm", kv_shared_extras=False, seed=4),
                                 QuantSpec(bits, group), cfg)
    src = tmp_path / "quantized"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(dict(full_config(cfg, "mlx-lm"),
                                                     quantization={"group_size": group, "bits": bits})))
    write_tensors(src, stored)
    bundle = convert(src, tmp_path / "bundle", target)
    manifest = read_manifest(bundle)
    assert manifest["projections"]["lm_head"]["quantized"]
    assert (target == "cuda") == any(r.get("fused") for r in manifest["projections"].values())
    want, _ = transformers_run(cfg, plain, ids[1])
    logits, _ = reference_run(bundle, ids[1])
    assert relative_error(logits, want) < BOUND


def test_blocks_change_nothing(tmp_path, sources, ids, monkeypatch):
    """The LM head and dequantization run in blocks of rows to bound memory; tiny blocks give
    the same logits as one block."""
    _, srcs = sources
    bundle = convert(srcs["hf"], tmp_path / "bundle", "m5", "--quantize", "4", "--group-size", "32")
    whole, _ = reference_run(bundle, ids[0])
    monkeypatch.setattr(reference, "BLOCK_BYTES", 4096)
    blocked, _ = reference_run(bundle, ids[0])
    assert relative_error(blocked, whole) < 1e-5  # float32 summation order only


def test_only_the_prompts_embedding_rows_are_read(tmp_path, sources, ids, monkeypatch):
    _, srcs = sources
    bundle = convert(srcs["hf"], tmp_path / "bundle", "generic")
    asked = []
    rows = StoredTensors.rows

    def spy(self, key, which):
        asked.append((key, len(which)))
        return rows(self, key, which)

    monkeypatch.setattr(StoredTensors, "rows", spy)
    reference_run(bundle, ids[0])
    per_layer = [n for key, n in asked if key.endswith("embed_tokens_per_layer.weight")]
    in_table = ids[0][ids[0] < tiny_text_config()["vocab_size_per_layer_input"]]
    assert per_layer == [len(set(in_table.tolist()) | ({0} if len(in_table) < len(ids[0]) else set()))]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_dequantize_is_mlx_dequantize(bits, group):
    w = mx.random.normal((5, 256), key=mx.random.key(bits * group))
    q, scales, biases = mx.quantize(w, group_size=group, bits=bits)
    want = np.array(mx.dequantize(q, scales, biases, group_size=group, bits=bits))
    got = dequantize(np.array(q), np.array(scales), np.array(biases), bits, group)
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()
