"""The converter end to end: tiny real checkpoints in every naming, converted for m5 and generic,
read back with mx.load and checked tensor by tensor, hash by hash, against the source."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from convert import ConvertError, convert_checkpoint, plan
from convert.cli import command
from convert.gemma3n import expected_tensors, kv_shared_unused, projection_role
from manifests import PREFIX, known_targets, load_profile, read_manifest
from tests.checkpoints import (
    PREFIXES,
    TOWER_PREFIXES,
    TOWER_TENSORS,
    checkpoint_tensors,
    full_config,
    make_checkpoint,
    tiny_text_config,
    write_tensors,
)
from tests.runtime_helpers import raw

REPO = Path(__file__).resolve().parents[1]
NAMINGS = ("hf", "mlx-lm", "mlx-vlm", "hf-text")
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")


def run_cli(*args, env=None, timeout=120):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "convert", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=full_env, timeout=timeout)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_dir(directory: Path) -> dict[str, mx.array]:
    """Every tensor of a checkpoint or bundle directory, through mx.load (index or single file)."""
    index = directory / "model.safetensors.index.json"
    names = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else ["model.safetensors"])
    out = {}
    for name in names:
        part = mx.load(str(directory / name))
        assert not set(part) & set(out)
        out.update(part)
    return out


def as_bits(a: mx.array) -> np.ndarray:
    """The array's elements as unsigned integers of the same width: exact comparison, NaN included."""
    width = {2: mx.uint16, 4: mx.uint32, 1: mx.uint8}[a.itemsize]
    return np.array(a.view(width))


def source_key(bundle_key: str, naming: str) -> str:
    if bundle_key == "lm_head.weight_t":
        return PREFIXES[naming] + "embed_tokens.weight"
    path = bundle_key[len(PREFIX):]
    if path.endswith(".weight_t"):
        path = path[: -len("_t")]
    return PREFIXES[naming] + path


# Targets whose bundles mlx-lm's own loader reads (every projection standard, none fused): they
# keep the K/V of KV-shared layers (zeros where the source has none) and complete config.json.
MLX_LM_TARGETS = ("generic",)


def expected_bundle_keys(text_config: dict, target: str) -> set[str]:
    keys = {PREFIX + name for name in kv_shared_unused(text_config)} if target in MLX_LM_TARGETS else set()
    for name in expected_tensors(text_config):
        module = name.rsplit(".", 1)[0]
        role = projection_role(module)
        if target == "m5" and role in GATE_UP:
            keys.add(PREFIX + module + ".weight_t")
        else:
            keys.add(PREFIX + name)
    if target == "m5":  # the head pretransposed, and the token embedding read from it: stored once
        keys.add("lm_head.weight_t")
        keys.discard(PREFIX + "embed_tokens.weight")
    return keys


def check_bundle(src: Path, out: Path, naming: str, target: str, *, text_config=None, dtype_check=None):
    """Everything the issue promises about a converted bundle, checked against its source."""
    text_config = text_config or tiny_text_config()
    manifest = read_manifest(out)  # validates against the schema
    bundle, source = load_dir(out), load_dir(src)

    assert set(bundle) == expected_bundle_keys(text_config, target)
    unread = manifest.get("unread") or {}
    assert set(unread) == (set(bundle) - expected_bundle_keys(text_config, "m5" if target == "m5" else "cuda"))
    for key, arr in bundle.items():
        if key in unread and unread[key]["source_key"] is None:  # not in the source: zeros for mlx-lm's loader
            assert source_key(key, naming) not in source and not np.any(np.array(arr)), key
            assert [list(arr.shape), str(arr.dtype).rsplit(".")[-1]] == [unread[key]["shape"], unread[key]["dtype"]]
            continue
        original = source[source_key(key, naming)]
        if dtype_check is not None:
            dtype_check(key, arr, original)
        elif key.endswith(".weight_t"):
            assert arr.shape == original.shape[::-1] and arr.dtype == original.dtype, key
            assert np.array_equal(as_bits(arr), as_bits(original).T), key
        else:
            assert arr.shape == original.shape and arr.dtype == original.dtype, key
            assert raw(arr) == raw(original), key

    # projections: every linear module and the LM head, layout by target, keys that exist
    modules = {n.rsplit(".", 1)[0] for n in expected_tensors(text_config)}
    linear = {PREFIX + m for m in modules if projection_role(m)} | {"lm_head"}
    assert set(manifest["projections"]) == linear
    for name, p in manifest["projections"].items():
        transposed = target == "m5" and (p["role"] in GATE_UP or name == "lm_head")
        assert p["layout"] == ("pretransposed" if transposed else "standard"), name
        assert list(bundle[p["key"]].shape) == p["shape"], name
        assert p["shape"] == (p["source_shape"][::-1] if transposed else p["source_shape"])
        assert p["source_key"] in source and list(source[p["source_key"]].shape) == p["source_shape"]
        assert p["quantized"] is None
    lm = manifest["projections"]["lm_head"]
    assert lm["key"] == ("lm_head.weight_t" if target == "m5" else PREFIX + "embed_tokens.weight")
    assert set(manifest["embeddings"]) == {PREFIX + "embed_tokens", PREFIX + "embed_tokens_per_layer"}
    for e in manifest["embeddings"].values():
        assert list(bundle[e["key"]].shape) == e["shape"]

    # files: every bundle file but the manifest, with its real hash and size
    on_disk = {p.name for p in out.iterdir()} - {"manifest.yaml", "manifest.sha256"}  # the manifest and its own digest
    assert set(manifest["files"]) == on_disk
    for name, f in manifest["files"].items():
        assert f == {"sha256": sha256(out / name), "bytes": (out / name).stat().st_size}, name
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        if name == "config.json" and target in MLX_LM_TARGETS:  # completed for mlx-lm's loader, nothing else
            want = json.loads((src / name).read_text())
            text = want.get("text_config", want)
            text.update(rope_theta=1e6, rope_local_base_freq=1e4)  # tiny_text_config's rope_parameters
            assert json.loads((out / name).read_text()) == want
            continue
        assert (out / name).read_bytes() == (src / name).read_bytes()
    # source: every file read, hashed
    assert manifest["source"]["files"] == {p.name: sha256(p) for p in src.iterdir()}
    assert manifest["source"]["naming"] == naming

    # dropped: exactly the towers and the unused K/V of KV-shared layers
    kept = {source_key(k, naming) for k in bundle}
    assert {d["key"] for d in manifest["dropped"]} == set(source) - kept
    expect_dropped = (set() if target in MLX_LM_TARGETS
                      else {PREFIXES[naming] + n for n in kv_shared_unused(text_config)})
    if naming in TOWER_PREFIXES:
        expect_dropped |= {TOWER_PREFIXES[naming] + n for n in TOWER_TENSORS}
    assert {d["key"] for d in manifest["dropped"]} == expect_dropped

    assert manifest["target"]["name"] == target
    assert manifest["target"]["profile_sha256"] == load_profile(target).sha256
    assert manifest["target"]["profile"] == load_profile(target).content
    assert manifest["model"]["text_config"]["num_hidden_layers"] == text_config["num_hidden_layers"]
    assert manifest["model"]["eos_token_ids"] == [1, 106]
    assert set(manifest["versions"]) >= {"mlx", "python", "numpy", "safetensors"}
    return manifest


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {(naming, shards): make_checkpoint(root / f"{naming}-{shards}", naming, shards=shards)
            for naming in NAMINGS for shards in (1, 3)}


def _no_leftovers(parent: Path, out_name: str) -> None:
    assert not (parent / out_name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{out_name}.")]


# --- every naming, single file and sharded, m5 and generic (library API) ---------------------

@pytest.mark.parametrize("target", ["m5", "generic"])
@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("naming", NAMINGS)
def test_convert_every_naming(checkpoints, tmp_path, naming, shards, target):
    src = checkpoints[naming, shards]
    out = convert_checkpoint(src, tmp_path / "bundle", target=target, max_shard_size=300_000)
    manifest = check_bundle(src, out, naming, target)
    assert len([f for f in manifest["files"] if f.endswith(".safetensors")]) > 1  # the small shard size
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(load_dir(out))


# --- the real command line ------------------------------------------------------------------

@pytest.mark.parametrize("naming, shards, target", [("hf", 1, "m5"), ("mlx-vlm", 3, "m5"), ("hf-text", 3, "generic")])
def test_cli_converts(checkpoints, tmp_path, naming, shards, target):
    src = checkpoints[naming, shards]
    r = run_cli("--target", target, src, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "peak memory" in r.stdout
    manifest = check_bundle(src, tmp_path / "out", naming, target)
    assert list(manifest["files"]).count("model.safetensors") == 1  # default 5GB: one shard, no index
    assert manifest["source"] == {"kind": "local", "path": str(src.resolve()), "naming": naming,
                                  "files": manifest["source"]["files"]}


def test_cli_target_auto_records_this_device(checkpoints, tmp_path):
    src = checkpoints["mlx-lm", 1]
    r = run_cli("--quiet", src, tmp_path / "out")
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
    manifest = read_manifest(tmp_path / "out")
    device = dict(mx.device_info())
    assert manifest["target"]["device"]["architecture"] == device["architecture"]
    from manifests import target_for_device

    assert manifest["target"]["name"] == target_for_device(device)


def test_auto_maps_a_recorded_m5_and_prefers_a_saved_calibration(checkpoints, tmp_path, monkeypatch):
    src = checkpoints["hf", 1]
    m5 = {"architecture": "applegpu_g17s", "device_name": "Apple M5 Max", "memory_size": 128 << 30}
    out = convert_checkpoint(src, tmp_path / "a", target="auto", device_info=m5)
    manifest = check_bundle(src, out, "hf", "m5")
    assert manifest["target"]["device"] == m5

    saved = tmp_path / "profiles"
    monkeypatch.setenv("MLX_PREPARED_PROFILE_DIR", str(saved))
    saved.mkdir()
    (saved / "mine.yaml").write_text(
        "name: calibrated-here\nlayouts: {attn.o_proj: pretransposed}\n"
        "device: {architecture: applegpu_g17s, device_name: Apple M5 Max}\n")
    manifest = read_manifest(convert_checkpoint(src, tmp_path / "b", target="auto", device_info=m5))
    assert manifest["target"]["name"] == "calibrated-here"
    layouts = {p["role"]: p["layout"] for p in manifest["projections"].values()}
    assert layouts["attn.o_proj"] == "pretransposed" and layouts["mlp.gate_proj"] == "standard"


def test_target_profile_file(checkpoints, tmp_path):
    src = checkpoints["hf", 1]
    profile = tmp_path / "p.yaml"
    profile.write_text("name: custom\nlayouts:\n  attn.o_proj: pretransposed\n"
                       "  lm_head: {float32: standard, default: pretransposed}\n")
    r = run_cli("--target-profile", profile, "-q", src, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    manifest = read_manifest(tmp_path / "out")
    assert manifest["target"]["profile_sha256"] == hashlib.sha256(profile.read_bytes()).hexdigest()
    assert manifest["target"]["device"] is None
    bundle, source = load_dir(tmp_path / "out"), load_dir(src)
    key = PREFIX + "layers.3.self_attn.o_proj"
    assert manifest["projections"][key]["layout"] == "pretransposed"
    assert np.array_equal(np.array(bundle[key + ".weight_t"]), np.array(source[key + ".weight"]).T)
    assert manifest["projections"]["lm_head"]["layout"] == "standard"  # float32 rule of the profile


def test_dry_run_prints_the_plan_and_writes_nothing(checkpoints, tmp_path):
    src = checkpoints["hf", 3]
    r = run_cli("--dry-run", "--target", "m5", src, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines() if line.strip()}
    assert rows["mlp.gate_proj"] == ["0", "10"] and rows["mlp.up_proj"] == ["0", "10"]
    assert rows["lm_head"] == ["0", "1"] and rows["attn.q_proj"] == ["10", "0"]
    assert rows["attn.k_proj"] == ["6", "0"]  # the 4 KV-shared layers have none
    for field in ("bytes in", "bytes out", "peak memory at most", "disk needed"):
        assert field in r.stdout
    assert list(tmp_path.iterdir()) == []


# --- dtype --------------------------------------------------------------------------------------

def test_bfloat16_source_to_float32(tmp_path):
    src = make_checkpoint(tmp_path / "src", "hf", dtype=mx.bfloat16)

    def check(key, arr, original):
        assert original.dtype == mx.bfloat16 and arr.dtype == mx.float32, key
        want = np.array(original.astype(mx.float32))  # widening is exact
        assert np.array_equal(np.array(arr), want.T if key.endswith("_t") else want), key

    check_bundle(src, convert_checkpoint(src, tmp_path / "out", target="m5", dtype="float32"), "hf", "m5",
                 dtype_check=check)
    assert read_manifest(tmp_path / "out")["projections"]["lm_head"]["dtype"] == "float32"


@pytest.mark.parametrize("dtype, torch_dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_float32_source_narrowed_like_torch(checkpoints, tmp_path, dtype, torch_dtype):
    src = checkpoints["mlx-vlm", 3]

    def check(key, arr, original):
        assert arr.dtype == getattr(mx, dtype), key
        ref = torch.from_numpy(np.array(original)).to(torch_dtype).view(torch.int16).numpy().view(np.uint16)
        assert np.array_equal(as_bits(arr), ref.T if key.endswith("_t") else ref), key

    manifest = check_bundle(src, convert_checkpoint(src, tmp_path / "out", target="m5", dtype=dtype), "mlx-vlm",
                            "m5", dtype_check=check)
    assert manifest["dtype"] == dtype
    assert {p["dtype"] for p in manifest["projections"].values()} == {dtype}


# --- MLX-quantized sources pass through ---------------------------------------------------------

def test_quantized_weights_pass_through_byte_for_byte(tmp_path):
    tc = tiny_text_config()
    tensors = checkpoint_tensors(tc, "mlx-lm", dtype=mx.bfloat16)
    p = PREFIXES["mlx-lm"]
    quantized = [k[: -len(".weight")] for k in tensors
                 if k.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                                "self_attn.q_proj.weight", "embed_tokens.weight"))]
    override = p + "layers.0.mlp.down_proj"  # 8-bit, said so in the quantization block
    inferred = p + "layers.1.mlp.down_proj"  # 8-bit, not said: read off the shapes as mlx-lm does
    eight = (override, inferred)
    for module in quantized:
        bits = 8 if module in eight else 4
        w, s, b = mx.quantize(tensors[module + ".weight"], group_size=32, bits=bits)
        tensors.update({module + ".weight": w, module + ".scales": s, module + ".biases": b})
    src = tmp_path / "src"
    src.mkdir()
    config = full_config(tc, "mlx-lm")
    config["quantization"] = {"group_size": 32, "bits": 4, "mode": "affine", override: {"group_size": 32, "bits": 8}}
    (src / "config.json").write_text(json.dumps(config))
    write_tensors(src, tensors, shards=2)

    out = convert_checkpoint(src, tmp_path / "out", target="m5", dtype="float32")
    manifest = read_manifest(out)
    bundle = load_dir(out)
    for module in quantized:
        for leaf in ("weight", "scales", "biases"):
            key = PREFIX + module[len(p):] + "." + leaf
            assert raw(bundle[key]) == raw(tensors[module + "." + leaf]), key  # untouched by --dtype
    for module in quantized:
        name = PREFIX + module[len(p):]
        want = {"bits": 8 if module in eight else 4, "group_size": 32, "mode": "affine"}
        if name.endswith("embed_tokens"):
            assert manifest["embeddings"][name]["quantized"] == want
            name = "lm_head"
        entry = manifest["projections"][name]
        assert entry["layout"] == "standard" and entry["quantized"] == want, name  # quantized: never transposed
        assert entry["key"] == PREFIX + module[len(p):] + ".weight" and entry["dtype"] == "uint32"
    assert not [k for k in bundle if k.endswith("_t")]
    # unquantized tensors did get the dtype
    assert bundle[PREFIX + "layers.0.self_attn.o_proj.weight"].dtype == mx.float32
    assert manifest["projections"][PREFIX + "layers.0.self_attn.o_proj"]["quantized"] is None

    # a packed weight that fits no bit width of its config is refused, naming it
    bad = dict(tensors)
    bad[p + "layers.2.mlp.up_proj.weight"] = bad[p + "layers.2.mlp.up_proj.weight"][:, :3]
    write_tensors(src, bad, shards=1)
    (src / "model.safetensors.index.json").unlink()
    with pytest.raises(ConvertError) as e:
        convert_checkpoint(src, tmp_path / "out2", target="m5")
    assert (f"{src}/model.safetensors: tensor 'model.language_model.layers.2.mlp.up_proj.weight': shape [128, 3] "
            "but config.json implies [128, 8]") in str(e.value)
    _no_leftovers(tmp_path, "out2")


# --- the hub (its network replaced by an offline cache laid out on disk) -------------------------

def _fake_hub_cache(cache: Path, repo_id: str, checkpoint: Path, commit: str) -> Path:
    """Lay out `checkpoint` the way huggingface_hub caches a download: blobs named by hash and a
    snapshot folder of relative symlinks to them, plus refs/main. This replaces the hub's network:
    with HF_HUB_OFFLINE=1, snapshot_download resolves the repo from this cache alone."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    (storage / "blobs").mkdir(parents=True)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(commit)
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in checkpoint.iterdir():
        blob = hashlib.sha256(f.read_bytes()).hexdigest()
        (storage / "blobs" / blob).write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / blob)
    return snapshot


def test_hub_repo_id_from_an_offline_cache(checkpoints, tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    src = checkpoints["hf", 3]
    _fake_hub_cache(tmp_path / "hub", "acme/tiny-gemma3n", src, commit)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "hf-home")}
    r = run_cli("--target", "m5", "-q", "acme/tiny-gemma3n", tmp_path / "out", env=env)
    assert r.returncode == 0, r.stderr
    manifest = check_bundle(src, tmp_path / "out", "hf", "m5")
    source = manifest["source"]
    assert (source["kind"], source["repo_id"], source["revision"], source["commit"]) == \
        ("hub", "acme/tiny-gemma3n", "main", commit)

    r = run_cli("--target", "m5", "-q", "--revision", commit, "acme/tiny-gemma3n", tmp_path / "out2", env=env)
    assert r.returncode == 0, r.stderr
    assert read_manifest(tmp_path / "out2")["source"]["revision"] == commit

    r = run_cli("--target", "m5", "--revision", "v9", "acme/tiny-gemma3n", tmp_path / "out3", env=env)
    assert r.returncode == 2 and "acme/tiny-gemma3n" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    _no_leftovers(tmp_path, "out3")


# --- bad input: one line naming file and tensor, exit code 2, nothing at OUT -------------------

def _edit_header(path: Path, edit) -> None:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (n - len(text))
    assert len(text) == n
    path.write_bytes(data[:8] + text + data[8 + n:])


def _first_key(src: Path, suffix: str) -> str:
    data = (src / "model.safetensors").read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    return next(k for k in header if k.endswith(suffix))


def _bad(kind: str, src: Path, tmp: Path) -> tuple[list[str], list[str]]:
    """Break `src` (a fresh single-file hf checkpoint) one way; return (extra args, message parts)."""
    st = src / "model.safetensors"
    if kind == "no config":
        (src / "config.json").unlink()
        return [], ["config.json", "missing"]
    if kind == "config not json":
        (src / "config.json").write_text("{nope")
        return [], ["config.json", "not valid JSON"]
    if kind == "config nested too deeply":  # a RecursionError traceback
        (src / "config.json").write_text("[" * 100_000 + "]" * 100_000)
        return [], ["config.json", "not valid JSON (nested too deeply)"]
    if kind == "config integer of 5000 digits":  # a ValueError traceback (Python's digit limit)
        (src / "config.json").write_text('{"model_type": ' + "9" * 5000 + "}")
        return [], ["config.json", "not valid JSON (Exceeds the limit (4300 digits)"]
    if kind == "not gemma3n":
        (src / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
        return [], ["config.json", "'llama'", "LlamaForCausalLM", "not Gemma3n"]
    if kind == "text config incomplete":
        cfg = json.loads((src / "config.json").read_text())
        del cfg["text_config"]["hidden_size"]
        (src / "config.json").write_text(json.dumps(cfg))
        return [], ["config.json", "hidden_size"]
    if kind == "pickle only":
        st.unlink()
        (src / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
        return [], ["pytorch_model.bin", "convert it to safetensors"]
    if kind == "truncated":
        st.write_bytes(st.read_bytes()[:-1000])
        return [], ["model.safetensors", "tensor", "truncated"]
    if kind == "header not json":
        data = st.read_bytes()
        st.write_bytes(data[:8] + b"#" + data[9:])
        return [], ["model.safetensors", "not valid JSON"]
    if kind == "unknown dtype":
        key = _first_key(src, "q_norm.weight")
        _edit_header(st, lambda h: h[key].update(dtype="F7"))
        return [], ["model.safetensors", key, "unknown dtype 'F7'"]
    if kind == "wrong shape":
        key = _first_key(src, "layers.2.mlp.up_proj.weight")
        _edit_header(st, lambda h: h[key].update(shape=h[key]["shape"][::-1]))
        return [], ["model.safetensors", key, "config.json implies"]
    if kind == "shape vs config":
        cfg = json.loads((src / "config.json").read_text())
        cfg["text_config"]["intermediate_size"] = [128] * 10
        (src / "config.json").write_text(json.dumps(cfg))
        return [], ["model.safetensors", "tensor 'model.language_model.layers.",
                    "shape [96, 64] but config.json implies [128, 64]"]
    if kind == "missing tensor":
        tensors = mx.load(str(st))
        del tensors["model.language_model.layers.4.laurel.linear_left.weight"]
        mx.save_safetensors(str(st), tensors)
        return [], ["model.safetensors", "model.language_model.layers.4.laurel.linear_left.weight", "missing"]
    if kind == "unexpected tensor":
        tensors = mx.load(str(st))
        tensors["model.language_model.layers.0.mystery.weight"] = mx.zeros((2,))
        mx.save_safetensors(str(st), tensors)
        return [], ["model.safetensors", "model.language_model.layers.0.mystery.weight", "unexpected"]
    if kind == "out inside source":
        return ["OUT=" + str(src / "bundle")], [str(src / "bundle"), "inside SOURCE"]
    if kind == "unknown target":
        return ["--target", "m9"], ["m9"] + known_targets()
    if kind == "out exists":
        (tmp / "out").mkdir()
        (tmp / "out" / "keep.txt").write_text("mine")
        return [], [str(tmp / "out"), "--force"]
    if kind == "force on a non-bundle":
        (tmp / "out").mkdir()
        (tmp / "out" / "keep.txt").write_text("mine")
        return ["--force"], [str(tmp / "out"), "not a bundle"]
    raise AssertionError(kind)


def _sharded_bad(kind: str, src: Path, tmp: Path) -> tuple[list[str], list[str]]:
    """Break a 3-shard checkpoint's index one way."""
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = next(iter(index["weight_map"]))
    shard = index["weight_map"][key]
    if kind == "missing shard":
        (src / shard).unlink()
        return [], ["model.safetensors.index.json", key, shard, "missing"]
    if kind in ("absolute path", "dot-dot path"):
        outside = tmp / "elsewhere"
        outside.mkdir()
        (outside / shard).write_bytes((src / shard).read_bytes())
        target = str(outside / shard) if kind == "absolute path" else f"../elsewhere/{shard}"
        index["weight_map"] = {k: (target if v == shard else v) for k, v in index["weight_map"].items()}
        index_path.write_text(json.dumps(index))
        return [], ["model.safetensors.index.json", key, "outside SOURCE"]
    if kind == "symlink escape":
        outside = tmp / "elsewhere"
        outside.mkdir()
        (src / shard).rename(outside / shard)
        (src / shard).symlink_to(outside / shard)
        return [], ["model.safetensors.index.json", key, shard, "outside SOURCE"]
    raise AssertionError(kind)


BAD_SINGLE = ["no config", "config not json", "config nested too deeply", "config integer of 5000 digits",
              "not gemma3n", "text config incomplete", "pickle only", "truncated",
              "header not json", "unknown dtype", "wrong shape", "shape vs config", "missing tensor",
              "unexpected tensor", "out inside source", "unknown target", "out exists", "force on a non-bundle"]
BAD_SHARDED = ["missing shard", "absolute path", "dot-dot path", "symlink escape"]


@pytest.mark.parametrize("kind", BAD_SINGLE + BAD_SHARDED)
def test_bad_input_is_refused_in_one_line(tmp_path, kind):
    sharded = kind in BAD_SHARDED
    src = make_checkpoint(tmp_path / "src", "hf", shards=3 if sharded else 1)
    args, parts = (_sharded_bad if sharded else _bad)(kind, src, tmp_path)
    out = tmp_path / "out"
    if args and args[0].startswith("OUT="):
        out, args = Path(args[0][4:]), args[1:]
    before = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
    result = CliRunner().invoke(command, ["--target", "m5", *args, str(src), str(out)])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for part in parts:
        assert part in lines[0], (part, lines[0])
    if before is None:
        _no_leftovers(out.parent, out.name)
    else:
        assert sorted(p.name for p in out.iterdir()) == before  # untouched


@pytest.mark.parametrize("where", ["source path", "copied file", "index file name"])
def test_a_name_the_manifest_records_must_be_utf8(tmp_path, where):
    """SOURCE's path and the names of the files read or copied go into the manifest as text: a
    byte that is not UTF-8 in one of them was a traceback from the YAML writer."""
    bad = os.fsdecode(b"\xff")  # how Python hands such a byte over: a lone surrogate
    src = make_checkpoint(tmp_path / "src", "hf", shards=3 if where == "index file name" else 1)
    if where == "source path":
        src = src.rename(tmp_path / f"src{bad}")
    elif where == "copied file":
        (src / f"chat_template{bad}.jinja").write_text("{{ messages }}")
    else:
        index = json.loads((src / "model.safetensors.index.json").read_text())
        first = sorted(set(index["weight_map"].values()))[0]
        (src / first).rename(src / f"{first}{bad}")
        index["weight_map"] = {k: v + bad if v == first else v for k, v in index["weight_map"].items()}
        (src / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    result = CliRunner().invoke(command, ["--target", "generic", str(src), str(out)])
    assert result.exit_code == 2 and (result.exception is None or isinstance(result.exception, SystemExit)), \
        result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "is not valid UTF-8 (byte 0xff at offset" in lines[0], result.output
    _no_leftovers(tmp_path, "out")


def test_bad_input_through_the_real_cli(tmp_path):
    src = make_checkpoint(tmp_path / "src", "mlx-vlm")
    _edit_header(src / "model.safetensors", lambda h: h["language_model.model.norm.weight"].update(dtype="Q4"))
    r = run_cli("--target", "generic", src, tmp_path / "out")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        f"error: {src}/model.safetensors: tensor 'language_model.model.norm.weight': unknown dtype 'Q4' "
        "(known: BOOL, U8, I8, F8_E4M3, F8_E5M2, I16, U16, F16, BF16, I32, U32, F32, I64, U64, F64)"]
    _no_leftovers(tmp_path, "out")


def test_stray_lm_head_of_a_tied_model_is_dropped_and_an_untied_one_refused(tmp_path):
    src = make_checkpoint(tmp_path / "src", "mlx-vlm")
    tensors = mx.load(str(src / "model.safetensors"))
    tensors["language_model.lm_head.weight"] = tensors["language_model.model.embed_tokens.weight"]
    mx.save_safetensors(str(src / "model.safetensors"), tensors)
    manifest = read_manifest(convert_checkpoint(src, tmp_path / "out", target="generic"))
    [entry] = [d for d in manifest["dropped"] if d["key"] == "language_model.lm_head.weight"]
    assert "tied" in entry["reason"]

    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"]["tie_word_embeddings"] = False
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConvertError, match="language_model.lm_head.weight'.*untied"):
        convert_checkpoint(src, tmp_path / "out2", target="generic")


def test_source_inside_out_is_refused(tmp_path):
    src = make_checkpoint(tmp_path / "out" / "src", "hf")
    (tmp_path / "out" / "manifest.yaml").write_text("x")
    with pytest.raises(ConvertError, match="SOURCE .* is inside OUT"):
        convert_checkpoint(src, tmp_path / "out", target="m5", force=True)
    assert (src / "model.safetensors").exists()


# --- atomic output ------------------------------------------------------------------------------

def test_force_replaces_a_bundle(checkpoints, tmp_path):
    out = convert_checkpoint(checkpoints["hf", 1], tmp_path / "out", target="generic")
    with pytest.raises(ConvertError, match="--force"):
        convert_checkpoint(checkpoints["hf", 1], out, target="m5")
    assert read_manifest(out)["target"]["name"] == "generic"
    convert_checkpoint(checkpoints["hf", 1], out, target="m5", force=True)
    check_bundle(checkpoints["hf", 1], out, "hf", "m5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    """About 270 MB: the 256 MB float32 embedding makes a run last long enough to be killed, and
    is larger than the memory a bounded conversion may use."""
    cfg = tiny_text_config(vocab_size=1 << 20)
    return make_checkpoint(tmp_path_factory.mktemp("big") / "src", "hf", text_config=cfg), cfg


def test_sigkill_leaves_out_as_it_was(big_checkpoint, checkpoints, tmp_path):
    import signal
    import time

    src, _ = big_checkpoint
    out = convert_checkpoint(checkpoints["hf", 1], tmp_path / "out", target="generic")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = subprocess.Popen([sys.executable, "-m", "convert", "--target", "m5", "--force", "-q", str(src), str(out)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tmp = tmp_path / f".out.tmp-{proc.pid}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        shard = tmp / "model.safetensors"
        if shard.exists() and shard.stat().st_size > 20_000_000:  # well into writing
            break
        time.sleep(0.005)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert tmp.exists()  # the dead run's partial work, beside OUT, never at it
    # the next run cleans it up and (with --force) replaces OUT once complete
    convert_checkpoint(checkpoints["hf", 1], out, target="m5", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert read_manifest(out)["target"]["name"] == "m5"


def test_sigterm_cleans_up_on_the_way_out(big_checkpoint, tmp_path):
    import signal
    import time

    src, _ = big_checkpoint
    proc = subprocess.Popen([sys.executable, "-m", "convert", "--target", "m5", "-q", str(src), str(tmp_path / "out")],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    shard = tmp_path / f".out.tmp-{proc.pid}" / "model.safetensors"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if shard.exists() and shard.stat().st_size > 20_000_000:
            break
        time.sleep(0.005)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


def test_peak_memory_stays_bounded_below_the_tensor_size(big_checkpoint, tmp_path):
    """With 4 MB read blocks and 32 MB transpose bands, converting a 256 MB embedding (written
    as is and transposed as the LM head) must not hold it: the child's peak RSS, measured by a
    wrapper process, stays far below 256 MB, and the plan predicted it."""
    src, cfg = big_checkpoint
    wrapper = ("import resource, subprocess, sys\n"
               "r = subprocess.run([sys.executable, '-m', 'convert', *sys.argv[1:]])\n"
               "k = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
               "print(k if sys.platform == 'darwin' else k * 1024)\n"
               "sys.exit(r.returncode)\n")
    args = ["--target", "m5", "-q", "--read-block-size", "4MiB", "--band-size", "32MiB",
            str(src), str(tmp_path / "out")]
    r = subprocess.run([sys.executable, "-c", wrapper, *args], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    peak = int(r.stdout.strip().splitlines()[-1])
    embed = 4 * cfg["vocab_size"] * cfg["hidden_size"]
    assert peak < embed * 0.6, peak
    predicted = plan(src, target="m5", read_block=4 << 20, band_bytes=32 << 20).predicted_peak
    assert peak < predicted + 32_000_000, (peak, predicted)
    bundle = load_dir(tmp_path / "out")
    source = mx.load(str(src / "model.safetensors"))
    assert np.array_equal(np.array(bundle["lm_head.weight_t"]),
                          np.array(source["model.language_model.embed_tokens.weight"]).T)
