"""The bundle contract: target profiles, device mapping, manifest schema."""

import pytest
import yaml

from manifests import (
    FORMAT_VERSION,
    ManifestError,
    ProfileError,
    dump_manifest,
    known_targets,
    load_manifest,
    load_profile,
    load_profile_file,
    target_for_device,
)
from manifests.profiles import ROLES
from tests.checkpoints import tiny_text_config


@pytest.mark.parametrize(
    "arch, target",
    [
        ("applegpu_g13s", "generic"),  # M1 family
        ("applegpu_g13g", "generic"),
        ("applegpu_g14s", "generic"),  # M2
        ("applegpu_g15s", "generic"),  # M3
        ("applegpu_g16s", "generic"),  # M4
        ("applegpu_g17s", "m5"),  # M5 Pro / Max
        ("applegpu_g17g", "m5"),  # base M5
        ("applegpu_g17p", "generic"),  # A-series phone: not M5-class
        ("sm_90", "cuda"),
        ("x86_64", "cpu-x86_64"),
        ("riscv64", "generic"),
    ],
)
def test_target_for_recorded_devices(arch, target):
    assert target_for_device({"architecture": arch, "device_name": "recorded"}) == target


def test_every_device_target_is_shipped():
    for arch in ("applegpu_g17s", "applegpu_g13s", "sm_90", "x86_64"):
        assert target_for_device({"architecture": arch}) in known_targets()


def test_m5_pretransposes_gate_up_and_lm_head_only():
    m5 = load_profile("m5")
    for role in ROLES:
        want = "pretransposed" if role in ("mlp.gate_proj", "mlp.up_proj", "lm_head") else "standard"
        for dtype in ("bfloat16", "float16", "float32"):
            assert m5.layout_for(role, dtype) == want, (role, dtype)


def test_generic_transposes_nothing():
    generic = load_profile("generic")
    assert {generic.layout_for(r, "float32") for r in ROLES} == {"standard"}


def test_dtype_rules():
    cpu = load_profile("cpu-x86_64")
    assert cpu.layout_for("mlp.up_proj", "float32") == "pretransposed"
    assert cpu.layout_for("mlp.up_proj", "bfloat16") == "standard"


def test_unknown_target_lists_known_ones():
    with pytest.raises(ProfileError) as e:
        load_profile("m9")
    assert "m9" in str(e.value)
    for name in known_targets():
        assert name in str(e.value)


@pytest.mark.parametrize(
    "content, message",
    [
        ("[1, 2]", "mapping"),
        ("layouts: {}", "name"),
        ("name: x\nlayouts: {mlp.gate: standard}", "unknown role"),
        ("name: x\nlayouts: {lm_head: sideways}", "unknown layout"),
        ("name: x\nlayouts: {lm_head: {int4: standard}}", "unknown dtype"),
        ("name: x\ndevice: 7", "`device` must be a mapping, got 7"),
        ("name: x\ndevice_class: 5", "`device_class` must be a string, got 5"),
        ("name: x\ndescription: [1]", "`description` must be a string"),
        ("name: x\ncalibration: 5", "`calibration` must be a mapping"),
        ("name: [", "not valid YAML"),
        ("name: " + "9" * 5000, "not valid YAML \\(Exceeds the limit"),
        ("[" * 100_000 + "]" * 100_000, "not valid YAML"),
    ],
)
def test_bad_profile_file(tmp_path, content, message):
    path = tmp_path / "p.yaml"
    path.write_text(content)
    with pytest.raises(ProfileError, match=message):
        load_profile_file(path)


def _minimal_manifest():
    return {
        "format_version": FORMAT_VERSION,
        "tool": {"name": "mlx-prepared", "version": "0"},
        "versions": {"mlx": "0", "python": "3"},
        "source": {"kind": "local", "path": "/x", "naming": "hf", "files": {"config.json": "ab"}},
        "model": {"architecture": "gemma3n", "model_type": "gemma3n", "text_config": tiny_text_config()},
        "target": {"name": "m5", "profile": {}, "profile_sha256": "00", "device": None},
        "dtype": "keep",
        "projections": {
            "lm_head": {"role": "lm_head", "layout": "pretransposed", "key": "lm_head.weight_t",
                        "source_key": "e", "shape": [2, 3], "source_shape": [3, 2], "dtype": "float32",
                        "bias": None, "quantized": None}
        },
        "embeddings": {},
        "dropped": [],
        "files": {"model.safetensors": {"sha256": "00", "bytes": 1}},
    }


def test_manifest_round_trip(tmp_path):
    m = _minimal_manifest()
    (tmp_path / "manifest.yaml").write_text(dump_manifest(m))
    assert load_manifest(tmp_path / "manifest.yaml") == m


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.pop("files"), "missing required field 'files'"),
        (lambda m: m["projections"]["lm_head"].update(layout="diagonal"), "projections.lm_head.layout"),
        (lambda m: m["projections"]["lm_head"].update(shape="2x3"), "projections.lm_head.shape"),
        (lambda m: m.update(format_version=FORMAT_VERSION + 1), "upgrade mlx-prepared"),
        (lambda m: m["model"].update(architecture="llama"), "model.architecture"),
    ],
)
def test_manifest_refused(tmp_path, edit, message):
    m = _minimal_manifest()
    edit(m)
    (tmp_path / "manifest.yaml").write_text(yaml.safe_dump(m))
    with pytest.raises(ManifestError, match=message):
        load_manifest(tmp_path / "manifest.yaml")


@pytest.mark.parametrize("text, message", [
    ("format_version: [", "not valid YAML"),
    # an integer past Python's digit limit was a bare ValueError (a traceback in `runtime verify`)
    ("format_version: " + "9" * 6000, r"not valid YAML \(Exceeds the limit \(4300 digits\)"),
])
def test_manifest_not_yaml(tmp_path, text, message):
    (tmp_path / "manifest.yaml").write_text(text)
    with pytest.raises(ManifestError, match=message) as caught:
        load_manifest(tmp_path / "manifest.yaml")
    assert "\n" not in str(caught.value) and "set_int_max_str_digits" not in str(caught.value)
