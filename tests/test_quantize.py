"""Quantized bundles: `convert --quantize`, MLX-quantized sources passing through, and the runtime
on both, against transformers' Gemma3nForCausalLM in float32.

The reference never reads a bundle: it is the float source checkpoint with each weight that
should be quantized (by this file's own rule, not the converter's) replaced by
`mx.dequantize(mx.quantize(w))`, or, for an MLX-quantized source, by the dequantized source
tensors. Which tensors were quantized is then checked against the manifest separately.
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
from click.testing import CliRunner

from convert.cli import command
from manifests import PREFIX, read_manifest
from runtime.projections import (
    Embedding,
    HeadColumns,
    Pretransposed,
    QuantizedEmbedding,
    QuantizedStandard,
    Standard,
)
from tests.checkpoints import checkpoint_tensors, full_config, make_checkpoint, tiny_text_config, write_tensors
from tests.runtime_helpers import (
    convert,
    load_quietly,
    load_tensors,
    raw,
    reference_logits,
    reference_model,
    relative_error,
    source_tensors,
)

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
BOUND = 1e-4
LENGTH, PREFILL = 20, 12
FLOAT_ONLY = ("altup.correction_coefs", "altup.prediction_coefs", "altup.modality_router")
# (target, bits, group size): every quantizable tensor of the tiny model (32 divides 64, 96, 128
# and 160); gate/up, down of layers 0-4 and the embedding at 64 but not the per-layer table (160)
# nor down of layers 5-9 (96); and at 128 only down of layers 0-4.
BUNDLES = [("generic", 4, 32), ("m5", 8, 64), ("m5", 4, 128)]


def should_quantize(name: str, shape: tuple[int, ...], group: int) -> bool:
    """This test's own rule: every matrix of the decoder (linear weights and embedding tables)
    but AltUp's coefficients and router, when its rows split into whole groups."""
    return len(shape) == 2 and not any(f in name for f in FLOAT_ONLY) and shape[1] % group == 0


def dequantized(w: np.ndarray, bits: int, group: int, dtype=mx.float32) -> np.ndarray:
    parts = mx.quantize(mx.array(w).astype(dtype), group_size=group, bits=bits)
    return np.array(mx.dequantize(*parts, group_size=group, bits=bits).astype(mx.float32))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("qsrc") / "src", "hf", seed=3)


@pytest.fixture(scope="module")
def bundles(source):
    root = source.parent
    return {b: convert(source, root / f"{b[0]}-q{b[1]}-g{b[2]}", b[0], "--quantize", str(b[1]), "--group-size",
                       str(b[2]), "--max-shard-size", "300KB") for b in BUNDLES}


@pytest.fixture(scope="module")
def ids():
    cfg = tiny_text_config()
    ids = np.random.default_rng(8).integers(0, cfg["vocab_size"], (2, LENGTH))
    ids[0, 3] = 300  # beyond the per-layer table: reads its row 0
    return ids


@pytest.fixture(scope="module")
def references(source, ids):
    """Per bundle: the reference logits on the dequantized weights, and on the float weights."""
    text_config = tiny_text_config()
    floats = source_tensors(source, "hf")
    out = {}
    for target, bits, group in BUNDLES:
        tensors = {n: dequantized(w, bits, group) if should_quantize(n, w.shape, group) else w
                   for n, w in floats.items()}
        out[target, bits, group] = reference_logits(reference_model(text_config, tensors), ids)
    out["float"] = reference_logits(reference_model(text_config, floats), ids)
    return out


# --- mx.quantize works per row: a block of rows quantizes to those rows of the whole ------------

@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("bits, group", [(4, 32), (4, 64), (8, 128), (4, 128)])
def test_row_blocks_quantize_to_the_rows_of_the_whole(dtype, bits, group):
    rng = np.random.default_rng(bits * group)
    w = mx.array(rng.standard_normal((301, 2 * group)) * rng.uniform(0.01, 10, (301, 1))).astype(dtype)
    whole = mx.quantize(w, group_size=group, bits=bits)
    for step in (1, 7, 64, 300):
        blocks = [mx.quantize(w[r:r + step], group_size=group, bits=bits) for r in range(0, 301, step)]
        for k in range(3):
            assert raw(mx.concatenate([b[k] for b in blocks])) == raw(whole[k]), (step, k)


# --- the converter writes exactly mx.quantize of each whole tensor -------------------------------

@pytest.mark.parametrize("dtype_option, written", [("keep", mx.bfloat16), ("float16", mx.float16)])
def test_quantized_tensors_are_mx_quantize_of_the_whole_tensor(tmp_path, dtype_option, written):
    """bfloat16 source, 1 kB read blocks (a few rows per block) and 60 kB shards (scales and
    biases land in later shards than their weight): every quantized tensor must equal, bit for bit,
    mx.quantize of the whole source tensor cast to the written dtype; every other tensor is the
    source's (cast as asked)."""
    src = make_checkpoint(tmp_path / "src", "mlx-vlm", dtype=mx.bfloat16, seed=5)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "convert", "--target", "generic", "-q", "--quantize", "4",
                        "--group-size", "32", "--dtype", dtype_option, "--read-block-size", "1KB",
                        "--max-shard-size", "60KB", str(src), str(out)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    bundle, source = load_tensors(out), load_tensors(src)
    assert len(list(out.glob("*.safetensors"))) > 5
    manifest = read_manifest(out)
    checked = 0
    for name, shape in ((k[len("language_model.model."):], v.shape) for k, v in source.items()
                        if k.startswith("language_model.model.")):
        key = PREFIX + name
        if key in (manifest.get("unread") or {}):  # K/V of a KV-shared layer, kept for mlx-lm: as it was
            assert raw(bundle[key]) == raw(source["language_model.model." + name].astype(written)), key
            assert PREFIX + name.rsplit(".", 1)[0] + ".scales" not in bundle, key
        elif name.endswith(".weight") and should_quantize(name, shape, 32):
            w, s, b = mx.quantize(source["language_model.model." + name].astype(written), group_size=32, bits=4)
            module = key[: -len(".weight")]
            assert raw(bundle[key]) == raw(w) and bundle[key].dtype == mx.uint32, key
            assert raw(bundle[module + ".scales"]) == raw(s) and bundle[module + ".scales"].dtype == written, key
            assert raw(bundle[module + ".biases"]) == raw(b) and bundle[module + ".biases"].dtype == written, key
            checked += 1
        elif key in bundle:
            assert raw(bundle[key]) == raw(source["language_model.model." + name].astype(written)), key
            assert PREFIX + name.rsplit(".", 1)[0] + ".scales" not in bundle, key
    recorded = [p for p, r in [*manifest["projections"].items(), *manifest["embeddings"].items()] if r["quantized"]]
    assert checked == len(recorded) - 1  # the LM head is the embedding
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no spill left behind
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# --- what the manifest says ----------------------------------------------------------------------

def test_the_manifest_records_what_was_quantized_and_what_was_not(source, bundles):
    floats = source_tensors(source, "hf")
    for (_target, bits, group), out in bundles.items():
        manifest = read_manifest(out)
        bundle = load_tensors(out)
        record = {"bits": bits, "group_size": group, "mode": "affine"}
        for path, p in manifest["projections"].items():
            name = "embed_tokens.weight" if path == "lm_head" else path[len(PREFIX):] + ".weight"
            shape = floats[name].shape
            if should_quantize(name, shape, group):
                assert p["quantized"] == record and p["layout"] == "standard", path
                assert p["dtype"] == "uint32" and p["shape"] == [shape[0], shape[1] * bits // 32], path
                assert p["source_shape"] == list(shape) and p["key"] == PREFIX + name, path
                module = PREFIX + name[: -len(".weight")]
                assert bundle[module + ".scales"].shape == (shape[0], shape[1] // group), path
            else:
                assert p["quantized"] is None and p["dtype"] == "float32", path
                assert not any(k.startswith(PREFIX + name[: -len("weight")] + "scales") for k in bundle), path
        for path, e in manifest["embeddings"].items():
            name = path[len(PREFIX):] + ".weight"
            quantized = should_quantize(name, floats[name].shape, group)
            assert e["quantized"] == (record if quantized else None), path
            assert e["dtype"] == ("uint32" if quantized else "float32"), path
        # never quantized: norms, AltUp coefficients and router, written as they were
        for name, w in floats.items():
            if w.ndim == 1 or any(f in name for f in FLOAT_ONLY):
                assert np.array_equal(np.array(bundle[PREFIX + name]), w), name
                if w.ndim == 2:
                    assert manifest["projections"][PREFIX + name[: -len(".weight")]]["quantized"] is None
        # Every file but the manifest and its own digest.
        on_disk = {p.name for p in out.iterdir()} - {"manifest.yaml", "manifest.sha256"}
        assert set(manifest["files"]) == on_disk


def test_dry_run_says_what_will_be_quantized(source, tmp_path):
    r = subprocess.run([sys.executable, "-m", "convert", "--dry-run", "--target", "m5", "--quantize", "4",
                        "--group-size", "128", str(source), str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "quantize 4-bit affine, group size 128: 5 tensors" in r.stdout  # down_proj of layers 0-4
    assert "30  AltUp coefficients and router stay float" in r.stdout
    assert list(tmp_path.iterdir()) == []


# --- the runtime: module classes from the manifest, logits against transformers ------------------

def test_mixed_bundles_load_with_the_right_projection_types(bundles):
    mlp = lambda m, i: m.model.language_model.layers[i].mlp  # noqa: E731
    lm = lambda m: m.model.language_model  # noqa: E731

    every, _ = load_quietly(bundles["generic", 4, 32])
    assert isinstance(mlp(every, 0).gate_proj, QuantizedStandard) and mlp(every, 0).gate_proj.bits == 4
    assert isinstance(lm(every).embed_tokens, QuantizedEmbedding) and every.tied_head
    assert isinstance(lm(every).embed_tokens_per_layer, QuantizedEmbedding)
    assert isinstance(every.layers[0].laurel.linear_right, Standard)  # in = 8
    assert isinstance(every.layers[0].altup.modality_router, Standard)

    # m5 at group 64: quantized gate/up stay standard, the tied head is the quantized embedding
    m5_64, _ = load_quietly(bundles["m5", 8, 64])
    gate = mlp(m5_64, 7).gate_proj
    assert isinstance(gate, QuantizedStandard) and (gate.bits, gate.group_size) == (8, 64)
    assert isinstance(mlp(m5_64, 2).down_proj, QuantizedStandard)
    assert type(mlp(m5_64, 7).down_proj) is Standard  # in = 96
    assert isinstance(lm(m5_64).embed_tokens, QuantizedEmbedding) and m5_64.tied_head
    assert not hasattr(m5_64, "lm_head")
    assert type(lm(m5_64).embed_tokens_per_layer) is Embedding  # 160 columns

    # m5 at group 128: gate/up (in = 64) stay float and get the m5 layout, as does the LM head
    m5_128, _ = load_quietly(bundles["m5", 4, 128])
    assert isinstance(mlp(m5_128, 0).gate_proj, Pretransposed) and isinstance(mlp(m5_128, 0).up_proj, Pretransposed)
    assert isinstance(mlp(m5_128, 0).down_proj, QuantizedStandard) and mlp(m5_128, 0).down_proj.group_size == 128
    assert type(mlp(m5_128, 5).down_proj) is Standard
    assert type(lm(m5_128).embed_tokens) is HeadColumns  # the float table stored once, as the head
    assert not m5_128.tied_head and isinstance(m5_128.lm_head, Pretransposed)


@pytest.fixture(scope="module", params=BUNDLES, ids=lambda b: f"{b[0]}-q{b[1]}-g{b[2]}")
def case(request, bundles, references, ids):
    model, _ = load_quietly(bundles[request.param])
    return model, ids, references[request.param]


def test_logits_equal_transformers_on_the_dequantized_weights(case):
    model, ids, ref = case
    assert relative_error(model(mx.array(ids)), ref) < BOUND


def test_cached_decoding_equals_transformers_on_the_dequantized_weights(case):
    model, ids, ref = case
    cache = model.make_cache()
    assert relative_error(model(mx.array(ids[:, :PREFILL]), cache=cache), ref[:, :PREFILL]) < BOUND
    for t in range(PREFILL, LENGTH):
        assert relative_error(model(mx.array(ids[:, t:t + 1]), cache=cache), ref[:, t:t + 1]) < BOUND, t


def test_quantization_matters_here(bundles, references, ids):
    """Control: the float weights' logits are far from every quantized bundle's."""
    for b in BUNDLES:
        model, _ = load_quietly(bundles[b])
        assert relative_error(model(mx.array(ids)), references["float"]) > 10 * BOUND, b


def test_a_prefill_multiplies_its_tokens_as_one_matrix(bundles, ids, monkeypatch):
    """Every quantized product of a prefill gets its rows as one `[rows, in]` matrix, never one
    batch entry per token (the model keeps each token's activations as `[1, h]`): MLX's CUDA kernel
    tiles each batch entry on its own, so 64 tokens took 64 tiles of 16-64 rows, one row used
    (3.4x the device time, measured on the H100). The logits are checked above; here the shapes."""
    seen = []
    real = mx.quantized_matmul

    def recording(x, *args, **kwargs):
        seen.append(tuple(x.shape))
        return real(x, *args, **kwargs)

    model, _ = load_quietly(bundles["generic", 4, 32])
    monkeypatch.setattr(mx, "quantized_matmul", recording)
    mx.eval(model(mx.array(ids), cache=model.make_cache()))
    several = [shape for shape in seen if int(np.prod(shape[:-1])) > 1]
    assert several, "no quantized product over several rows: nothing checked"
    batched = [shape for shape in several if int(np.prod(shape[:-2])) > 1]
    assert not batched, f"{len(batched)} of {len(several)} products batch their rows, e.g. {batched[0]}"
    assert all(shape[0] == ids.size for shape in several)


def test_the_record_decides_not_the_shapes(bundles, tmp_path):
    """A record claiming another group size than the stored scales is an error, not a guess."""
    import shutil

    from runtime.loader import BundleError

    out = tmp_path / "bundle"
    shutil.copytree(bundles["generic", 4, 32], out)
    text = (out / "manifest.yaml").read_text()
    key = "model.language_model.layers.3.mlp.up_proj"
    manifest = read_manifest(out)
    manifest["projections"][key]["quantized"]["group_size"] = 64
    from manifests import write_manifest

    write_manifest(manifest, out)
    assert (out / "manifest.yaml").read_text() != text
    with pytest.raises(BundleError, match="up_proj"):
        load_quietly(out)


# --- MLX-quantized sources (the mlx-community layout) pass through ------------------------------

VLM = "language_model.model."


def mlx_community_checkpoint(path: Path, dtype, seed: int = 6) -> tuple[Path, dict[str, dict], dict[str, mx.array]]:
    """What mlx-vlm writes for Gemma3n at 4 bits, group 64: mlx-vlm naming, every Linear and
    Embedding whose rows split into groups quantized (AltUp's router too, towers too; AltUp's
    coefficients and down_proj of layers 5-9 cannot be), per-module overrides in the
    quantization block, `false` for modules left float, and the K/V of KV-shared layers.
    Returns (dir, {quantized module: params}, the tensors written)."""
    tc = tiny_text_config()
    tensors = checkpoint_tensors(tc, "mlx-vlm", dtype=dtype, seed=seed)
    block: dict = {"group_size": 64, "bits": 4}
    overrides = {VLM + "layers.0.mlp.down_proj": {"group_size": 64, "bits": 8},
                 VLM + "layers.1.self_attn.o_proj": {"group_size": 32, "bits": 8},
                 VLM + "embed_tokens_per_layer": {"group_size": 32, "bits": 4}}
    quantized = {}
    for key in [k for k in tensors if k.endswith(".weight") and tensors[k].ndim == 2]:
        module = key[: -len(".weight")]
        params = overrides.get(module, block)
        if tensors[key].shape[1] % params["group_size"]:
            block[module] = False
            continue
        w, s, b = mx.quantize(tensors[key], group_size=params["group_size"], bits=params["bits"])
        tensors.update({module + ".weight": w, module + ".scales": s, module + ".biases": b})
        quantized[module] = {"bits": params["bits"], "group_size": params["group_size"], "mode": "affine"}
    block.update(overrides)
    path.mkdir(parents=True)
    config = dict(full_config(tc, "mlx-vlm"), quantization=block, quantization_config=block)
    (path / "config.json").write_text(json.dumps(config))
    write_tensors(path, tensors, shards=2)
    return path, quantized, tensors


def test_an_mlx_community_checkpoint_passes_through_byte_for_byte(tmp_path):
    src, quantized, tensors = mlx_community_checkpoint(tmp_path / "src", mx.bfloat16)
    assert VLM + "layers.0.altup.modality_router" in quantized and "embed_vision.embedding_projection" in quantized
    out = convert(src, tmp_path / "out", "m5")  # --dtype float32: quantized tensors keep theirs
    manifest, bundle = read_manifest(out), load_tensors(out)
    kept = 0
    for module, params in quantized.items():
        if not module.startswith(VLM) or module.endswith(("6.self_attn.k_proj", "7.self_attn.k_proj",
                                                          "8.self_attn.k_proj", "9.self_attn.k_proj",
                                                          "6.self_attn.v_proj", "7.self_attn.v_proj",
                                                          "8.self_attn.v_proj", "9.self_attn.v_proj")):
            for leaf in ("weight", "scales", "biases"):
                assert PREFIX + module.split(".", 2)[-1] + "." + leaf not in bundle  # towers, shared K/V
            assert any(d["key"] == module + ".scales" for d in manifest["dropped"]), module
            continue
        name = PREFIX + module[len(VLM):]
        for leaf in ("weight", "scales", "biases"):
            assert raw(bundle[name + "." + leaf]) == raw(tensors[module + "." + leaf]), (name, leaf)
        section = "embeddings" if name.endswith(("embed_tokens", "embed_tokens_per_layer")) else "projections"
        assert manifest[section][name]["quantized"] == params, name
        kept += 1
    assert kept > 60
    assert manifest["projections"]["lm_head"]["quantized"] == quantized[VLM + "embed_tokens"]
    assert manifest["projections"]["lm_head"]["layout"] == "standard"
    float_only = [p for p in manifest["projections"] if "coefs" in p or "layers.7.mlp.down_proj" in p]
    assert float_only and all(manifest["projections"][p]["quantized"] is None for p in float_only)
    assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes()

    model, _ = load_quietly(out)
    layers = model.model.language_model.layers
    assert isinstance(layers[0].mlp.down_proj, QuantizedStandard) and layers[0].mlp.down_proj.bits == 8
    assert layers[1].self_attn.o_proj.group_size == 32 and layers[2].self_attn.o_proj.group_size == 64
    assert isinstance(layers[0].altup.modality_router, QuantizedStandard)
    assert type(layers[0].altup.prediction_coefs) is Standard
    assert isinstance(layers[0].mlp.gate_proj, QuantizedStandard)  # m5, but quantized: standard
    assert type(layers[7].mlp.down_proj) is Standard
    per_layer = model.model.language_model.embed_tokens_per_layer
    assert isinstance(per_layer, QuantizedEmbedding) and per_layer.group_size == 32
    assert model.tied_head


def test_an_mlx_community_checkpoint_matches_transformers_on_its_dequantized_weights(tmp_path, ids):
    src, quantized, tensors = mlx_community_checkpoint(tmp_path / "src", mx.float32, seed=9)
    decoder = {}
    for key, w in tensors.items():
        if not key.startswith(VLM) or key.endswith((".scales", ".biases")):
            continue
        module = key[: -len(".weight")]
        if module in quantized:
            q = quantized[module]
            w = mx.dequantize(w, tensors[module + ".scales"], tensors[module + ".biases"],
                              group_size=q["group_size"], bits=q["bits"])
        decoder[key[len(VLM):]] = np.array(w)
    from convert.gemma3n import expected_tensors

    decoder = {k: v for k, v in decoder.items() if k in expected_tensors(tiny_text_config())}
    ref = reference_logits(reference_model(tiny_text_config(), decoder), ids)
    model, _ = load_quietly(convert(src, tmp_path / "out", "generic"))
    assert relative_error(model(mx.array(ids)), ref) < BOUND
    cache = model.make_cache()
    model(mx.array(ids[:, :PREFILL]), cache=cache)
    for t in range(PREFILL, LENGTH):
        assert relative_error(model(mx.array(ids[:, t:t + 1]), cache=cache), ref[:, t:t + 1]) < BOUND, t


def test_requantizing_a_quantized_source_is_refused(tmp_path):
    src, _, _ = mlx_community_checkpoint(tmp_path / "src", mx.bfloat16)
    r = subprocess.run([sys.executable, "-m", "convert", "--target", "generic", "--quantize", "4", str(src),
                        str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    [line] = r.stderr.strip().splitlines()
    assert line.startswith(f"error: {src}/model-0000") and "tensor 'language_model.model." in line
    assert "already MLX-quantized" in line and "--quantize" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("args, message", [
    (["--group-size", "32"], "--group-size applies only with --quantize"),
    (["--quant-mode", "affine"], "--quant-mode applies only with --quantize"),
])
def test_quantization_options_without_quantize_are_refused(source, tmp_path, args, message):
    result = CliRunner().invoke(command, ["--target", "m5", *args, str(source), str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: {message} 4 or --quantize 8"]
    assert list(tmp_path.iterdir()) == []


def test_unsupported_bits_and_group_sizes_are_usage_errors(source, tmp_path):
    for args in (["--quantize", "3"], ["--quantize", "4", "--group-size", "48"], ["--quant-mode", "mxfp4"]):
        result = CliRunner().invoke(command, ["--target", "m5", *args, str(source), str(tmp_path / "out")])
        assert result.exit_code == 2 and "Invalid value" in result.output, args
    assert list(tmp_path.iterdir()) == []


# --- streaming: memory bounded below the tensor -------------------------------------------------

def test_quantizing_streams_with_bounded_memory(tmp_path):
    """A 256 MB float32 embedding quantized to 8 bits with 4 MB read blocks: the converter's peak
    RSS (measured by a wrapper, as in test_convert) stays far below the tensor, and near the plan's
    prediction; the result is mx.quantize of the whole table."""
    from convert import plan

    cfg = tiny_text_config(vocab_size=1 << 20)
    src = make_checkpoint(tmp_path / "src", "hf", text_config=cfg)
    wrapper = ("import resource, subprocess, sys\n"
               "r = subprocess.run([sys.executable, '-m', 'convert', *sys.argv[1:]])\n"
               "k = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
               "print(k if sys.platform == 'darwin' else k * 1024)\n"
               "sys.exit(r.returncode)\n")
    args = ["--target", "m5", "-q", "--quantize", "8", "--read-block-size", "4MiB", str(src), str(tmp_path / "out")]
    r = subprocess.run([sys.executable, "-c", wrapper, *args], capture_output=True, text=True, cwd=REPO,
                       env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    peak = int(r.stdout.strip().splitlines()[-1])
    embed = 4 * cfg["vocab_size"] * cfg["hidden_size"]
    assert peak < embed * 0.6, peak
    predicted = plan(src, target="m5", read_block=4 << 20, quantize=8).predicted_peak
    assert peak < predicted + 32_000_000, (peak, predicted)
    bundle = load_tensors(tmp_path / "out")
    table = mx.load(str(src / "model.safetensors"))["model.language_model.embed_tokens.weight"]
    w, s, b = mx.quantize(table, group_size=64, bits=8)
    key = PREFIX + "embed_tokens"
    assert raw(bundle[key + ".weight"]) == raw(w) and raw(bundle[key + ".scales"]) == raw(s)
    assert raw(bundle[key + ".biases"]) == raw(b)
    assert "lm_head.weight_t" not in bundle  # the tied head is the quantized embedding
