"""Fused projections: `fuse: [qkv, gate_up]` in a profile, written by the real convert CLI.

Bundles of one tiny Hugging Face checkpoint (float32): `standard` (a profile fusing q/k/v and
gate/up, every projection standard), `cpu-x86_64` (fused, float32 pretransposed, several shards),
and 4-bit `standard` with and without `--no-fuse`; then the `cuda` target, which also fuses
laurel's left projection with q/k/v (`qkv_laurel`, `q_laurel` in KV-shared layers), in float32
and 4-bit. Checked: the manifest records, the fused tensors against the source members'
bytes, the logits against transformers' Gemma3nForCausalLM in float32 (prefill, cached decode),
4-bit fused against 4-bit unfused, an MLX-quantized source, profiles and the one-line errors of
manifests that cover a projection twice, miss one, or miscount rows.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml

from manifests import PREFIX, ManifestError, ProfileError, manifest_digest_line, read_manifest
from manifests.profiles import _from_text
from runtime.projections import Pretransposed, QuantizedStandard, Standard
from runtime.verify import verify_bundle
from tests.checkpoints import checkpoint_tensors, full_config, make_checkpoint, tiny_text_config, write_tensors
from tests.runtime_helpers import (
    check_compiled_steps,
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

BOUND = 1e-4  # the parity bound of tests/test_model_parity.py
LENGTH, PREFILL = 20, 12
CFG = tiny_text_config()
LAYERS = CFG["num_hidden_layers"]
FIRST_SHARED = LAYERS - CFG["num_kv_shared_layers"]
Q_OUT = CFG["num_attention_heads"] * CFG["head_dim"]
KV_OUT = CFG["num_key_value_heads"] * CFG["head_dim"]
HIDDEN = CFG["hidden_size"]
L = PREFIX + "layers."


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("fused") / "src", "hf", seed=11)


QKV_PROFILE = "name: qkv-gate-up\nfuse: [qkv, gate_up]\n"


def convert_with(source: Path, out: Path, profile_text: str, *extra: str) -> Path:
    """The real CLI with `--target-profile` (a file next to `out`), as a user runs it."""
    profile = out.parent / f"{out.name}.profile.yaml"
    profile.write_text(profile_text)
    cmd = [sys.executable, "-m", "convert", "--target-profile", str(profile), "--dtype", "float32", "--quiet",
           *extra, str(source), str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def bundles(source):
    root = source.parent
    return {
        "standard": convert_with(source, root / "qkv", QKV_PROFILE),
        "pretransposed": convert(source, root / "cpu", "cpu-x86_64", "--max-shard-size", "300KB"),
        "q4": convert_with(source, root / "qkv-q4", QKV_PROFILE, "--quantize", "4", "--group-size", "32"),
        "q4-unfused": convert(source, root / "cuda-q4-apart", "cuda", "--quantize", "4", "--group-size", "32",
                              "--no-fuse"),
        "laurel": convert(source, root / "cuda", "cuda"),
        "laurel-q4": convert(source, root / "cuda-q4", "cuda", "--quantize", "4", "--group-size", "32"),
    }


@pytest.fixture(scope="module")
def ids():
    ids = np.random.default_rng(12).integers(0, CFG["vocab_size"], (2, LENGTH))
    ids[0, 3] = 300  # beyond the per-layer table
    return ids


@pytest.fixture(scope="module")
def reference(source, ids):
    return reference_logits(reference_model(CFG, source_tensors(source, "hf")), ids)


def edit_manifest(bundle: Path, edit) -> None:
    """Edit the manifest and re-record its digest, so only the edit itself can be objected to."""
    manifest = yaml.safe_load((bundle / "manifest.yaml").read_text())
    edit(manifest)
    text = yaml.safe_dump(manifest, sort_keys=False)
    (bundle / "manifest.yaml").write_text(text)
    (bundle / "manifest.sha256").write_text(manifest_digest_line(text.encode()))


# -- what convert writes ----------------------------------------------------------------------------

@pytest.mark.parametrize("name,layout", [("standard", "standard"), ("pretransposed", "pretransposed")])
def test_the_manifest_records_fused_groups(bundles, name, layout):
    projections = read_manifest(bundles[name])["projections"]
    for i in range(LAYERS):
        base = f"{L}{i}."
        inter = CFG["intermediate_size"][i]
        gate_up = projections[base + "mlp.gate_up_proj"]
        suffix = ".weight" if layout == "standard" else ".weight_t"
        assert gate_up["layout"] == layout and gate_up["role"] == "mlp.gate_up_proj"
        assert gate_up["key"] == base + "mlp.gate_up_proj" + suffix
        assert gate_up["shape"] == ([2 * inter, HIDDEN] if layout == "standard" else [HIDDEN, 2 * inter])
        assert gate_up["source_shape"] == [2 * inter, HIDDEN] and gate_up["dtype"] == "float32"
        assert [(m["path"], m["out"]) for m in gate_up["fused"]] == [
            (base + "mlp.gate_proj", inter), (base + "mlp.up_proj", inter)]
        assert base + "mlp.gate_proj" not in projections and base + "mlp.up_proj" not in projections
        if i >= FIRST_SHARED:  # KV-shared: a lone q_proj, nothing fused
            assert base + "self_attn.qkv_proj" not in projections
            assert "fused" not in projections[base + "self_attn.q_proj"]
            continue
        qkv = projections[base + "self_attn.qkv_proj"]
        rows = Q_OUT + 2 * KV_OUT
        assert qkv["layout"] == layout and qkv["key"] == base + "self_attn.qkv_proj" + suffix
        assert qkv["shape"] == ([rows, HIDDEN] if layout == "standard" else [HIDDEN, rows])
        assert [(m["path"], m["out"]) for m in qkv["fused"]] == [
            (base + "self_attn.q_proj", Q_OUT), (base + "self_attn.k_proj", KV_OUT),
            (base + "self_attn.v_proj", KV_OUT)]
        assert qkv["fused"][1]["source_key"] == base + "self_attn.k_proj.weight"
        for member in ("q_proj", "k_proj", "v_proj"):
            assert base + "self_attn." + member not in projections
    assert len(list(bundles["pretransposed"].glob("model-*.safetensors"))) > 1


@pytest.mark.parametrize("name", ["standard", "pretransposed"])
def test_fused_tensors_are_the_members_concatenated(source, bundles, name):
    src = source_tensors(source, "hf")  # float32 source, so the bundle keeps its bytes
    bundle = load_tensors(bundles[name])
    groups = [("mlp.gate_up_proj", ["mlp.gate_proj", "mlp.up_proj"], range(LAYERS)),
              ("self_attn.qkv_proj", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
               range(FIRST_SHARED))]
    checked = 0
    for fused, members, layers in groups:
        for i in layers:
            rows = np.concatenate([src[f"layers.{i}.{m}.weight"] for m in members])
            if name == "standard":
                want, key = rows, f"{L}{i}.{fused}.weight"
            else:
                want, key = np.ascontiguousarray(rows.T), f"{L}{i}.{fused}.weight_t"
            assert list(bundle[key].shape) == list(want.shape), key
            assert raw(bundle[key]) == want.tobytes(), key
            for m in members:
                assert f"{L}{i}.{m}.weight" not in bundle and f"{L}{i}.{m}.weight_t" not in bundle
            checked += 1
    assert checked == LAYERS + FIRST_SHARED


def test_dry_run_shows_the_fused_groups(source, tmp_path):
    done = subprocess.run([sys.executable, "-m", "convert", "--target", "cuda", "--dry-run", str(source),
                           str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (f"fuse     qkv_laurel {FIRST_SHARED} layers, q_laurel {LAYERS - FIRST_SHARED} layers, "
            f"gate_up {LAYERS} layers") in done.stdout, done.stdout
    assert "layer.qkv_laurel_proj" in done.stdout and "mlp.gate_up_proj" in done.stdout
    assert not (tmp_path / "out").exists()


def test_profiles_without_fuse_write_members_apart(source, tmp_path):
    projections = read_manifest(convert(source, tmp_path / "generic", "generic"))["projections"]
    assert not any("fused" in r for r in projections.values())
    assert f"{L}0.self_attn.k_proj" in projections and f"{L}0.mlp.up_proj" in projections
    forced = read_manifest(convert(source, tmp_path / "forced", "generic", "--fuse"))["projections"]
    assert f"{L}0.qkv_laurel_proj" in forced and f"{L}0.self_attn.k_proj" not in forced
    assert f"{L}{LAYERS - 1}.q_laurel_proj" in forced and f"{L}0.mlp.gate_up_proj" in forced


# -- the runtime on fused bundles --------------------------------------------------------------------

@pytest.mark.parametrize("name,cls", [("standard", Standard), ("pretransposed", Pretransposed)])
def test_the_model_has_fused_modules_and_split_points(bundles, name, cls):
    model, _ = load_quietly(bundles[name])
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        inter = CFG["intermediate_size"][i]
        assert type(mlp.gate_up_proj) is cls and layer.fused["mlp.gate_up_proj"].outs == (inter, inter)
        assert "gate_proj" not in mlp and "up_proj" not in mlp
        if i >= FIRST_SHARED:
            assert type(attn.q_proj) is cls and "qkv_proj" not in attn
            assert list(layer.fused) == ["mlp.gate_up_proj"]
            continue
        assert type(attn.qkv_proj) is cls and layer.fused["self_attn.qkv_proj"].outs == (Q_OUT, KV_OUT, KV_OUT)
        assert not any(m in attn for m in ("q_proj", "k_proj", "v_proj"))


@pytest.mark.parametrize("name", ["standard", "pretransposed", "laurel", "laurel-q4"])
def test_load_does_no_work_on_fused_weights(bundles, name, monkeypatch, tmp_path):
    from tests.test_loader import load_violations

    assert load_violations(bundles[name], monkeypatch, tmp_path) == []


@pytest.mark.parametrize("name", ["standard", "pretransposed"])
def test_fused_logits_match_transformers(bundles, reference, ids, name):
    model, _ = load_quietly(bundles[name])
    assert relative_error(model(mx.array(ids)), reference) < BOUND
    cache = model.make_cache()
    prefill = model(mx.array(ids[:, :PREFILL]), cache=cache)
    assert relative_error(prefill, reference[:, :PREFILL]) < BOUND
    for t in range(PREFILL, LENGTH):  # past the sliding window (8), through the KV-shared layers
        step = model(mx.array(ids[:, t:t + 1]), cache=cache)
        assert relative_error(step, reference[:, t:t + 1]) < BOUND, f"decode step at position {t}"


@pytest.mark.parametrize("name", ["standard", "laurel"])
def test_every_projection_reads_row_major_rows(bundles, ids, name, monkeypatch):
    """MLX's matmul copies an input whose row stride is not its width (one kernel more per
    projection on a GPU). A slice of a fused module's output keeps the fused row's stride, even
    for one decode row, and so does gelu(gate) * up over such slices: LAuReL's right projection
    and the down projection read them. Every projection a layer multiplies by gets rows laid out
    row-major, in a prefill and in a decode row (strides read from the evaluated inputs)."""
    from runtime import model as runtime_model

    seen = []
    forward = runtime_model.DecoderLayer.forward

    def recording_forward(self, planes, per_layer_input, attend, plane_mask, linear=runtime_model.call):
        def recording_linear(module, x):
            mx.eval(x)
            seen.append((x.shape, memoryview(x).strides, x.itemsize))
            return linear(module, x)
        return forward(self, planes, per_layer_input, attend, plane_mask, linear=recording_linear)

    monkeypatch.setattr(runtime_model.DecoderLayer, "forward", recording_forward)
    model, _ = load_quietly(bundles[name])
    cache = model.make_cache()
    for rows in (ids[:1, :PREFILL], ids[:1, PREFILL:PREFILL + 1]):
        seen.clear()
        model(mx.array(rows), cache=cache)
        assert len(seen) >= 6 * LAYERS  # o_proj, laurel's right, down, routers, coefficients, per-layer ones
        strided = [(shape, strides) for shape, strides, size in seen
                   if strides[-1] != size or strides[-2] != shape[-1] * size]
        assert strided == [], f"{len(rows[0])} rows"


def test_the_sparse_gates_deviations_are_row_major():
    """The Gaussian top-k's variance is the deviations' dot product with themselves, a matmul
    that copies operands whose row stride is not their width. A decode row's gate, cut from a
    fused gate/up output, has the fused row's stride; the element-wise results over it would keep
    it (what the top-k returns shows which strides its deviations had). Same values either way."""
    from runtime.model import gaussian_top_k

    rng = np.random.default_rng(5)
    fused = mx.array(rng.standard_normal((1, 1, 1, 2 * 96)).astype(np.float32))
    gate = mx.split(fused, 2, axis=-1)[0]
    got = gaussian_top_k(gate, 1.6448536)
    mx.eval(got)
    assert memoryview(got).strides == (96 * 4,) * 3 + (4,)
    g = np.array(fused)[0, 0, 0, :96].astype(np.float64)
    dev = g - g.mean()
    want = np.maximum(dev - np.sqrt(dev @ dev / 96) * 1.6448536, 0)
    assert np.abs(np.array(got)[0, 0, 0] - want).max() < 1e-5


def test_greedy_generation_follows_transformers(source, bundles):
    """runtime.generate's decode loop (the compiled step, which equals the eager forward on fused
    bundles too: test_fast.py) on a fused bundle picks the tokens transformers' greedy argmax
    picks, step by step."""
    from runtime.generate import generate_step

    ref = reference_model(CFG, source_tensors(source, "hf"))
    sequence = [2, 17, 33, 250, 9]
    want = []
    for _ in range(10):
        logits = reference_logits(ref, np.array([sequence]))[0, -1]
        want.append(int(np.argmax(logits)))
        sequence.append(want[-1])
    model, _ = load_quietly(bundles["standard"])
    got = [int(t) for t, _ in generate_step(sequence[:5], model, max_tokens=10)]
    assert got == want


# -- quantized ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (8, 32), (8, 128)])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_quantizing_the_concatenation_is_concatenating_the_quantized_rows(bits, group, dtype):
    rng = np.random.default_rng(bits * group)
    members = [mx.array(rng.standard_normal((rows, 256)).astype(np.float32)).astype(dtype) for rows in (64, 32, 32)]
    whole = mx.quantize(mx.concatenate(members), group_size=group, bits=bits)
    parts = [mx.quantize(m, group_size=group, bits=bits) for m in members]
    for i, name in enumerate(("weight", "scales", "biases")):
        assert raw(whole[i]) == raw(mx.concatenate([p[i] for p in parts])), name


def test_quantized_fused_rows_are_the_unfused_rows(bundles):
    fused, apart = load_tensors(bundles["q4"]), load_tensors(bundles["q4-unfused"])
    manifest = read_manifest(bundles["q4"])["projections"]
    for i in range(LAYERS):
        groups = [("mlp.gate_up_proj", ["mlp.gate_proj", "mlp.up_proj"])]
        if i < FIRST_SHARED:
            groups.append(("self_attn.qkv_proj", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]))
        for module, members in groups:
            record = manifest[f"{L}{i}.{module}"]
            assert record["quantized"] == {"bits": 4, "group_size": 32, "mode": "affine"}
            assert record["layout"] == "standard" and record["dtype"] == "uint32"
            for leaf in ("weight", "scales", "biases"):
                want = b"".join(raw(apart[f"{L}{i}.{m}.{leaf}"]) for m in members)
                assert raw(fused[f"{L}{i}.{module}.{leaf}"]) == want, (i, module, leaf)


def test_quantized_fused_logits_equal_unfused(bundles, ids):
    fused, _ = load_quietly(bundles["q4"])
    apart, _ = load_quietly(bundles["q4-unfused"])
    assert isinstance(fused.layers[0].self_attn.qkv_proj, QuantizedStandard)
    assert isinstance(apart.layers[0].self_attn.k_proj, QuantizedStandard)
    want = np.array(apart(mx.array(ids)))
    assert relative_error(fused(mx.array(ids)), want) < 1e-6
    caches = fused.make_cache(), apart.make_cache()
    fused(mx.array(ids[:, :PREFILL]), cache=caches[0])
    apart(mx.array(ids[:, :PREFILL]), cache=caches[1])
    for t in range(PREFILL, LENGTH):
        step = np.array(apart(mx.array(ids[:, t:t + 1]), cache=caches[1]))
        assert relative_error(fused(mx.array(ids[:, t:t + 1]), cache=caches[0]), step) < 1e-6, t


def mlx_quantized_source(path: Path) -> tuple[Path, dict[str, mx.array]]:
    """An mlx-lm style 4-bit checkpoint (group 64) in which layer 2's k_proj is 8-bit, so that
    layer's q/k/v cannot be fused; modules whose rows do not split into groups stay float."""
    tensors = checkpoint_tensors(CFG, "mlx-lm", kv_shared_extras=False, seed=13)
    block: dict = {"group_size": 64, "bits": 4}
    odd = f"{L}2.self_attn.k_proj"
    for key in [k for k in tensors if k.endswith(".weight") and tensors[k].ndim == 2]:
        module = key[: -len(".weight")]
        params = {"group_size": 64, "bits": 8} if module == odd else block
        if tensors[key].shape[1] % 64 or "coefs" in module:
            block[module] = False
            continue
        w, s, b = mx.quantize(tensors[key], group_size=params["group_size"], bits=params["bits"])
        tensors.update({module + ".weight": w, module + ".scales": s, module + ".biases": b})
    block[odd] = {"group_size": 64, "bits": 8}
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(dict(full_config(CFG, "mlx-lm"), quantization=block)))
    write_tensors(path, tensors)
    return path, tensors


def test_an_mlx_quantized_source_is_fused_byte_for_byte(tmp_path, ids):
    src, tensors = mlx_quantized_source(tmp_path / "src")
    fused_dir = convert_with(src, tmp_path / "fused", QKV_PROFILE)
    apart_dir = convert(src, tmp_path / "apart", "cuda", "--no-fuse")
    projections, bundle = read_manifest(fused_dir)["projections"], load_tensors(fused_dir)
    for leaf in ("weight", "scales", "biases"):
        want = b"".join(raw(tensors[f"{L}0.self_attn.{m}.{leaf}"]) for m in ("q_proj", "k_proj", "v_proj"))
        assert raw(bundle[f"{L}0.self_attn.qkv_proj.{leaf}"]) == want, leaf
        want = b"".join(raw(tensors[f"{L}3.mlp.{m}.{leaf}"]) for m in ("gate_proj", "up_proj"))
        assert raw(bundle[f"{L}3.mlp.gate_up_proj.{leaf}"]) == want, leaf
    assert projections[f"{L}0.self_attn.qkv_proj"]["quantized"] == {"bits": 4, "group_size": 64, "mode": "affine"}
    # Layer 2's members differ in bits: left apart, as they came.
    assert f"{L}2.self_attn.qkv_proj" not in projections
    assert projections[f"{L}2.self_attn.k_proj"]["quantized"]["bits"] == 8
    assert projections[f"{L}2.self_attn.q_proj"]["quantized"]["bits"] == 4
    done = subprocess.run([sys.executable, "-m", "convert", "--target", "cuda", "--dry-run", str(src),
                           str(tmp_path / "x")], capture_output=True, text=True)
    assert "qkv_laurel: members' quantizations differ" in done.stdout, done.stdout
    fused, _ = load_quietly(fused_dir)
    apart, _ = load_quietly(apart_dir)
    assert "k_proj" in fused.layers[2].self_attn and "qkv_proj" in fused.layers[1].self_attn
    assert relative_error(fused(mx.array(ids)), np.array(apart(mx.array(ids)))) < 1e-6


# -- profiles ----------------------------------------------------------------------------------------

def test_a_group_whose_members_disagree_on_layout_stays_apart(source, tmp_path):
    profile = tmp_path / "split.yaml"
    profile.write_text("name: split\nfuse: [qkv, gate_up]\nlayouts:\n  attn.k_proj: pretransposed\n"
                       "  mlp.gate_proj: pretransposed\n  mlp.up_proj: pretransposed\n")
    cmd = [sys.executable, "-m", "convert", "--target-profile", str(profile), "--dtype", "float32", "--quiet"]
    done = subprocess.run(cmd[:-1] + ["--dry-run", str(source), str(tmp_path / "x")], capture_output=True, text=True)
    assert f"unfused     {FIRST_SHARED}  qkv: members' layouts differ (q_proj standard, k_proj pretransposed, " \
           "v_proj standard)" in done.stdout, done.stdout
    assert subprocess.run(cmd + [str(source), str(tmp_path / "out")]).returncode == 0
    projections = read_manifest(tmp_path / "out")["projections"]
    assert projections[f"{L}0.self_attn.k_proj"]["layout"] == "pretransposed"
    assert projections[f"{L}0.self_attn.q_proj"]["layout"] == "standard"
    assert projections[f"{L}0.mlp.gate_up_proj"]["layout"] == "pretransposed"


@pytest.mark.parametrize("text,message", [
    ("name: x\nfuse: [qkv, bogus]\n", "fuse: unknown group 'bogus' (known: qkv, gate_up, qkv_laurel, q_laurel)"),
    ("name: x\nfuse: [qkv, qkv_laurel]\n", "fuse: qkv and qkv_laurel fuse the same projections; list one"),
    ("name: x\nfuse: qkv\n", "`fuse` must be a list of group names"),
    ("name: x\nfuse: [qkv, qkv]\n", "fuse: a group is listed twice"),
])
def test_a_bad_fuse_list_is_refused(text, message):
    with pytest.raises(ProfileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _from_text(text, "p.yaml")


def test_only_cuda_and_cpu_fuse():
    from manifests import load_profile

    assert load_profile("cuda").fuse == ("qkv_laurel", "q_laurel", "gate_up")
    assert load_profile("cpu-x86_64").fuse == ("qkv", "gate_up")
    assert load_profile("m5").fuse == () and load_profile("generic").fuse == ()


# -- bad manifests and verify ------------------------------------------------------------------------

QKV0 = f"{L}0.self_attn.qkv_proj"


def _cover_q_twice(m):
    qkv = m["projections"][QKV0]
    m["projections"][f"{L}0.self_attn.q_proj"] = {k: v for k, v in qkv.items() if k != "fused"}


def _drop_member(m):
    m["projections"][QKV0]["fused"].pop(2)


def _wrong_out(m):
    m["projections"][QKV0]["fused"][0]["out"] = Q_OUT - 1


def _swap_members(m):
    f = m["projections"][QKV0]["fused"]
    f[1], f[2] = f[2], f[1]


def _fuse_unknown(m):
    m["projections"][f"{L}0.self_attn.o_proj"]["fused"] = m["projections"][QKV0]["fused"]


@pytest.mark.parametrize("edit,message", [
    (_cover_q_twice, f"projections.{L}0.self_attn.q_proj: covered twice, by its own record and as a member of {QKV0}"),
    (_drop_member, f"projections.{QKV0}: fused record lacks member {L}0.self_attn.v_proj"),
    (_wrong_out, f"projections.{QKV0}: member outs [{Q_OUT - 1}, {KV_OUT}, {KV_OUT}] sum to "
                 f"{Q_OUT - 1 + 2 * KV_OUT}, but the standard shape [{Q_OUT + 2 * KV_OUT}, {HIDDEN}] has "
                 f"{Q_OUT + 2 * KV_OUT} output rows"),
    (_swap_members, f"projections.{QKV0}: fused members"),
    (_fuse_unknown, f"projections.{L}0.self_attn.o_proj: fused, but not a module that fuses"),
])
def test_a_bad_fused_record_is_one_line_naming_it(bundles, tmp_path, edit, message):
    bundle = Path(shutil.copytree(bundles["standard"], tmp_path / "b"))
    edit_manifest(bundle, edit)
    with pytest.raises(ManifestError) as e:
        load_quietly(bundle)
    assert str(e.value).startswith(f"{bundle / 'manifest.yaml'}: ") and message in str(e.value)
    assert "\n" not in str(e.value)
    done = subprocess.run([sys.executable, "-m", "runtime", "verify", str(bundle)], capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [f"error: {e.value}"]


def test_a_missing_group_names_the_projection_the_model_needs(bundles, tmp_path):
    bundle = Path(shutil.copytree(bundles["standard"], tmp_path / "b"))
    edit_manifest(bundle, lambda m: m["projections"].pop(QKV0))
    with pytest.raises(ManifestError, match=f"manifest.yaml: no projection entry for {L}0.self_attn.q_proj$"):
        load_quietly(bundle)


def test_members_that_disagree_with_the_config_are_named(bundles, tmp_path):
    """Outs that add up but split the rows wrongly (q 48, k 48): the config says 64/32/32."""
    bundle = Path(shutil.copytree(bundles["standard"], tmp_path / "b"))

    def edit(m):
        m["projections"][QKV0]["fused"][0].update(out=48, source_shape=[48, HIDDEN])
        m["projections"][QKV0]["fused"][1].update(out=48, source_shape=[48, HIDDEN])
    edit_manifest(bundle, edit)
    with pytest.raises(ManifestError, match=f"projections.{QKV0}: fused members .* disagree with the model config"):
        load_quietly(bundle)


@pytest.mark.parametrize("name", ["standard", "pretransposed", "q4"])
def test_fused_bundles_verify_and_a_flipped_byte_is_caught(bundles, tmp_path, name):
    assert verify_bundle(bundles[name]) == []
    bundle = Path(shutil.copytree(bundles[name], tmp_path / "b"))
    key = f"{L}0.self_attn.qkv_proj" + (".weight_t" if name == "pretransposed" else ".weight")
    for shard in sorted(bundle.glob("*.safetensors")):
        data = bytearray(shard.read_bytes())
        (n,) = np.frombuffer(bytes(data[:8]), "<u8")
        header = json.loads(data[8:8 + n])
        if key in header:
            data[8 + n + header[key]["data_offsets"][0] + 5] ^= 0x10
            shard.write_bytes(bytes(data))
            break
    else:
        raise AssertionError(f"{key} in no shard")
    assert verify_bundle(bundle) == [f"{shard}: sha256 differs from manifest.yaml"]


def test_check_finite_names_the_members_of_a_fused_tensor(tmp_path):
    tensors = checkpoint_tensors(CFG, "hf")
    k = f"{L}1.self_attn.k_proj.weight"
    bad = np.array(tensors[k])
    bad[3, 4] = np.nan
    tensors[k] = mx.array(bad)
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(full_config(CFG, "hf")))
    write_tensors(src, tensors)
    done = subprocess.run([sys.executable, "-m", "convert", "--target", "cuda", "--check-finite", "-q", str(src),
                           str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 2 and not (tmp_path / "out").exists()
    assert done.stderr.splitlines() == [
        f"error: {src}/model.safetensors: one of tensors '{L}1.self_attn.q_proj.weight', '{k}', "
        f"'{L}1.self_attn.v_proj.weight', '{L}1.laurel.linear_left.weight' (fused into {L}1.qkv_laurel_proj.weight): "
        f"1 NaN and 0 infinite values (--check-finite); {tmp_path / 'out'} was left as it was"]


def test_small_blocks_and_bands_write_the_same_fused_bytes(source, bundles, tmp_path):
    """Read blocks and transpose bands far smaller than one member: blocks and bands then cross
    member boundaries in every way, and the bytes must not change."""
    small = ("--read-block-size", "2KB", "--band-size", "3KB")
    for name, target, extra in (("pretransposed", "cpu-x86_64", ()),
                                ("laurel-q4", "cuda", ("--quantize", "4", "--group-size", "32"))):
        again = load_tensors(convert(source, tmp_path / name, target, *small, *extra))
        want = load_tensors(bundles[name])
        fused = [k for k in want if "qkv_proj" in k or "gate_up_proj" in k or "laurel_proj" in k]
        assert len(fused) >= LAYERS + FIRST_SHARED
        for key in fused:
            assert raw(again[key]) == raw(want[key]), (name, key)


# -- laurel's left projection with q/k/v (the cuda target) ------------------------------------------

RANK = CFG["laurel_rank"]


def laurel_groups(i: int) -> tuple[str, list[tuple[str, int]]]:
    """(fused module, [(member, out)]) of layer i's q/k/v (q) + laurel-left group."""
    q, left = ("self_attn.q_proj", Q_OUT), ("laurel.linear_left", RANK)
    if i >= FIRST_SHARED:
        return "q_laurel_proj", [q, left]
    return "qkv_laurel_proj", [q, ("self_attn.k_proj", KV_OUT), ("self_attn.v_proj", KV_OUT), left]


def test_the_cuda_target_fuses_laurel_left_with_q_k_v(bundles):
    projections = read_manifest(bundles["laurel"])["projections"]
    for i in range(LAYERS):
        base = f"{L}{i}."
        module, members = laurel_groups(i)
        record = projections[base + module]
        rows = sum(o for _, o in members)
        assert record["role"] == "layer." + module and record["layout"] == "standard"
        assert record["key"] == base + module + ".weight" and record["shape"] == [rows, HIDDEN]
        assert [(m["path"], m["out"]) for m in record["fused"]] == [(base + p, o) for p, o in members]
        for p, _ in members:
            assert base + p not in projections
        assert base + "self_attn.qkv_proj" not in projections and base + "mlp.gate_up_proj" in projections


def test_laurel_fused_tensors_are_the_members_concatenated(source, bundles):
    src, bundle = source_tensors(source, "hf"), load_tensors(bundles["laurel"])
    for i in range(LAYERS):
        module, members = laurel_groups(i)
        want = np.concatenate([src[f"layers.{i}.{p}.weight"] for p, _ in members])
        assert raw(bundle[f"{L}{i}.{module}.weight"]) == want.tobytes(), (i, module)
        assert f"{L}{i}.laurel.linear_left.weight" not in bundle


def test_the_model_takes_q_k_v_and_laurel_left_from_one_module(bundles):
    model, _ = load_quietly(bundles["laurel"])
    for i, layer in enumerate(model.layers):
        module, members = laurel_groups(i)
        assert type(layer[module]) is Standard
        assert (layer.fused[module].members, layer.fused[module].outs) == tuple(zip(*members, strict=True))
        assert not any(p in layer.self_attn for p in ("q_proj", "k_proj", "v_proj", "qkv_proj"))
        assert "linear_left" not in layer.laurel and "linear_right" in layer.laurel


def test_laurel_fused_logits_match_transformers(bundles, reference, ids):
    """Prefill and cached decoding; the compiled step on a cuda bundle equals this eager forward
    (test_fast.py)."""
    model, _ = load_quietly(bundles["laurel"])
    assert relative_error(model(mx.array(ids)), reference) < BOUND
    cache = model.make_cache()
    model(mx.array(ids[:, :PREFILL]), cache=cache)
    for t in range(PREFILL, LENGTH):
        step = model(mx.array(ids[:, t:t + 1]), cache=cache)
        assert relative_error(step, reference[:, t:t + 1]) < BOUND, f"eager decode step at position {t}"


def test_quantized_laurel_fused_rows_and_logits_are_the_unfused_ones(bundles, ids):
    fused, apart = load_tensors(bundles["laurel-q4"]), load_tensors(bundles["q4-unfused"])
    for i in range(LAYERS):
        module, members = laurel_groups(i)
        for leaf in ("weight", "scales", "biases"):
            want = b"".join(raw(apart[f"{L}{i}.{p}.{leaf}"]) for p, _ in members)
            assert raw(fused[f"{L}{i}.{module}.{leaf}"]) == want, (i, module, leaf)
    model, _ = load_quietly(bundles["laurel-q4"])
    plain, _ = load_quietly(bundles["q4-unfused"])
    assert isinstance(model.layers[0].qkv_laurel_proj, QuantizedStandard)
    assert relative_error(model(mx.array(ids)), np.array(plain(mx.array(ids)))) < 1e-6


def test_a_quantized_prefill_multiplies_each_run_of_members_on_its_own(bundles, ids, monkeypatch):
    """A fused quantized module multiplies several rows (a prefill) run of members by run (its
    q/k/v, then LAuReL's left; gate, then up), never at the fused width: MLX's CUDA build takes its
    fast tiled kernel only for widths that are multiples of 128, which q/k/v's are and q/k/v plus
    LAuReL's 64 is not. One row (a decode step) stays one product. The same logits either way."""
    model, _ = load_quietly(bundles["laurel-q4"])
    plain, _ = load_quietly(bundles["q4-unfused"])
    fused_widths = {sum(f.outs) for layer in model.layers for f in layer.fused.values()}
    member_widths = {o for layer in model.layers for f in layer.fused.values() for o in f.outs}
    assert fused_widths and not fused_widths & member_widths  # what the test tells apart
    want = np.array(plain(mx.array(ids)))
    model(mx.array(ids))  # the device's quirk probes (runtime/quirks.py) run once, here, not under the spy
    calls, real = [], mx.quantized_matmul

    def spy(x, w, *args, **kwargs):
        calls.append((x.size // x.shape[-1], w.shape[0]))
        return real(x, w, *args, **kwargs)

    monkeypatch.setattr(mx, "quantized_matmul", spy)
    logits = model(mx.array(ids))
    several = {n for r, n in calls if r > 1}
    assert several & member_widths and not several & fused_widths, sorted(several)
    assert relative_error(logits, want) < 1e-6
    calls.clear()
    model(mx.array(ids[:1, :1]))
    assert {n for r, n in calls if r == 1} >= fused_widths


def test_a_laurel_group_in_the_wrong_kind_of_layer_is_named(bundles, tmp_path):
    """A KV-shared layer's q_laurel_proj renamed into a layer with its own K/V: one line naming it."""
    bundle = Path(shutil.copytree(bundles["laurel"], tmp_path / "b"))
    last = f"{L}{LAYERS - 1}."

    def edit(m):
        record = m["projections"].pop(last + "q_laurel_proj")
        m["projections"].pop(f"{L}0.qkv_laurel_proj")
        for member in record["fused"]:
            member["path"] = member["path"].replace(last, f"{L}0.")
        m["projections"][f"{L}0.q_laurel_proj"] = record
    edit_manifest(bundle, edit)
    with pytest.raises(ManifestError, match=f"projections.{L}0.q_laurel_proj: layer 0 has k/v of its own, "
                                            "so it needs qkv_laurel_proj"):
        load_quietly(bundle)


def test_a_projection_in_two_fused_records_is_named(bundles, tmp_path):
    """Layer 0's q/k/v both in its qkv_laurel_proj and in an added self_attn.qkv_proj."""
    bundle = Path(shutil.copytree(bundles["laurel"], tmp_path / "b"))
    first = f"{L}0.qkv_laurel_proj"

    def edit(m):
        record = dict(m["projections"][first], fused=m["projections"][first]["fused"][:3])
        m["projections"][f"{L}0.self_attn.qkv_proj"] = record
    edit_manifest(bundle, edit)
    with pytest.raises(ManifestError, match=f"projections.{L}0.self_attn.q_proj: covered twice, as a member of "
                                            f"{first} and of {L}0.self_attn.qkv_proj"):
        load_quietly(bundle)


def test_a_new_group_is_a_change_of_data_alone(source, reference, ids, monkeypatch, tmp_path):
    """k and v as one `self_attn.kv_proj`, added to manifests/format.py's tables and nowhere else:
    convert writes it (in layers with their own K/V only), the manifest reader checks it, and the
    eager model and the compiled step read it (q on its own, k and v from one GEMV) and still
    match transformers."""
    import manifests.format as fmt
    from convert import convert_checkpoint

    monkeypatch.setitem(fmt.FUSED_GROUPS, "kv", ("self_attn.kv_proj", ("self_attn.k_proj", "self_attn.v_proj")))
    monkeypatch.setitem(fmt.FUSED_ROLES, "kv", "attn.kv_proj")
    monkeypatch.setattr(fmt, "FUSED_OWN_KV_ONLY", (*fmt.FUSED_OWN_KV_ONLY, "kv"))
    profile = tmp_path / "kv.yaml"
    profile.write_text("name: kv-test\nfuse: [kv]\n")
    bundle = convert_checkpoint(source, tmp_path / "kv", target_profile=profile, dtype="float32")
    projections = read_manifest(bundle)["projections"]
    for i in range(LAYERS):
        kv = projections.get(f"{L}{i}.self_attn.kv_proj")
        if i >= FIRST_SHARED:
            assert kv is None
            continue
        assert [(m["path"], m["out"]) for m in kv["fused"]] == [(f"{L}{i}.self_attn.k_proj", KV_OUT),
                                                               (f"{L}{i}.self_attn.v_proj", KV_OUT)]
        assert f"{L}{i}.self_attn.k_proj" not in projections and f"{L}{i}.self_attn.q_proj" in projections
    model, _ = load_quietly(bundle)
    attn = model.layers[0].self_attn
    assert type(attn.kv_proj) is Standard and "k_proj" not in attn and "v_proj" not in attn and "q_proj" in attn
    assert relative_error(model(mx.array(ids)), reference) < BOUND
    check_compiled_steps(model, ids[:1], reference[:1], PREFILL, LENGTH, BOUND, 16)
