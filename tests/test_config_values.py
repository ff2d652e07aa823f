"""Config and manifest values: manifests/config.py checks every text-config field the decoder reads,
for `convert` (the source's config.json) and for every manifest read (the runtime's load,
`verify`). A bad value is one line naming the field and the value; `convert` refuses it with
exit 2 and nothing at OUT, and a manifest edited with its digest recomputed is refused at load
with exit 2, never a traceback. tests/test_config_fuzz.py mutates the same values at random.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from convert.cli import command
from manifests import ManifestError, manifest_digest_line
from manifests.config import DEFAULTS, MAX_DIM, MAX_LAYERS, MAX_WINDOW, REQUIRED, checked_text_config
from runtime.model import TextConfig
from tests.checkpoints import make_checkpoint, tiny_text_config
from tests.runtime_helpers import convert, text_checkpoint

REPO = Path(__file__).resolve().parents[1]

# (field, bad value, what the one line must say after "<field>: ")
BAD = [
    ("hidden_size", 0, "must be an integer from 1 to"),
    ("hidden_size", -64, "must be an integer from 1 to"),
    ("hidden_size", 64.0, "must be an integer from 1 to"),
    ("hidden_size", "64", "must be an integer from 1 to"),
    ("hidden_size", True, "must be an integer from 1 to"),
    ("vocab_size", 10**18, "must be an integer from 1 to"),
    ("num_hidden_layers", 10**9, f"must be an integer from 1 to {MAX_LAYERS}"),
    ("num_hidden_layers", None, "must be an integer from 1 to"),
    ("intermediate_size", [128] * 3, "needs one entry per layer (10), got 3"),
    ("intermediate_size", [128] * 9 + [0], "must be an integer from 1 to"),
    ("num_attention_heads", 0, "must be an integer from 1 to"),
    ("num_key_value_heads", 3, "must be an integer from 1 to 2"),
    ("head_dim", 33, "must be even"),
    ("head_dim", -32, "must be an integer from 2 to"),
    ("rms_norm_eps", "tiny", "must be a finite number in (0, 1]"),
    ("rms_norm_eps", 0.0, "must be a finite number in (0, 1]"),
    ("rms_norm_eps", math.nan, "must be a finite number in (0, 1]"),
    ("rms_norm_eps", math.inf, "must be a finite number in (0, 1]"),
    ("sliding_window", 0, f"must be an integer from 1 to {MAX_WINDOW}"),
    ("sliding_window", -8, "must be an integer from 1 to"),
    ("sliding_window", 1 << 40, f"must be an integer from 1 to {MAX_WINDOW}"),
    ("altup_active_idx", 4, "must be an integer from 0 to 3"),
    ("altup_active_idx", -1, "must be an integer from 0 to 3"),
    ("altup_num_inputs", 0, "must be an integer from 1 to 16"),
    ("num_kv_shared_layers", 10, "must be an integer from 0 to 9"),
    ("num_kv_shared_layers", -1, "must be an integer from 0 to 9"),
    ("num_kv_shared_layers", 9, "KV-shared layer 4 (full_attention) has no earlier full_attention layer"),
    ("layer_types", ["full_attention"] * 9, "must be a list of one entry per layer (10)"),
    ("layer_types", ["global"] * 10, "must be 'full_attention' or 'sliding_attention'"),
    ("activation_sparsity_pattern", [0.95] * 4, "needs one entry per layer (10), got 4"),
    ("activation_sparsity_pattern", 1.0, "must be a finite number in [0, 1)"),
    ("activation_sparsity_pattern", [math.nan] * 10, "must be a finite number in [0, 1)"),
    ("final_logit_softcapping", 0, "must be a finite number in (0,"),
    ("final_logit_softcapping", -math.inf, "must be a finite number in (0,"),
    ("hidden_activation", "relu", "must be one of gelu_pytorch_tanh"),
    ("altup_correct_scale", "yes", "must be true or false"),
    ("attention_bias", True, "must be false"),
    ("rope_parameters", {"full_attention": {"rope_theta": math.inf}}, "rope_theta of full_attention: must be"),
    ("rope_parameters", [1, 2], "rope_parameters: must be a mapping"),
    ("rope_parameters", {"full_attention": {"rope_type": "yarn"}},
     "rope_type of full_attention: 'yarn' is not supported"),
    ("laurel_rank", 0, "must be an integer from 1 to"),
]


def ids(case) -> str:
    return f"{case[0]}={case[1]!r}"[:40]


@pytest.mark.parametrize("field, value, says", BAD, ids=[ids(c) for c in BAD])
def test_each_bad_value_is_one_line_naming_field_and_value(field, value, says):
    with pytest.raises(ManifestError) as e:
        checked_text_config(tiny_text_config(**{field: value}), "SRC/config.json: text_config")
    line = str(e.value)
    assert "\n" not in line and line.startswith("SRC/config.json: text_config: "), line
    assert says in line, line
    assert field in line or "rope" in line, line


def test_products_that_would_overflow_a_dimension_are_refused():
    cfg = tiny_text_config(num_attention_heads=1 << 12, num_key_value_heads=1, head_dim=1 << 13)
    with pytest.raises(ManifestError, match=f"num_attention_heads x head_dim is {1 << 25}, more than the {MAX_DIM}"):
        checked_text_config(cfg)


@pytest.mark.parametrize("field", REQUIRED)
def test_a_missing_required_field_is_named(field):
    cfg = tiny_text_config()
    del cfg[field]
    with pytest.raises(ManifestError, match=f"the text config has no '{field}'"):
        checked_text_config(cfg)


def test_the_runtime_reads_the_defaults_the_checker_checked():
    """A field a config lacks takes one default on both sides (transformers' Gemma3nTextConfig)."""
    import transformers

    required = {k: v for k, v in tiny_text_config().items() if k in REQUIRED}
    ours = TextConfig.from_dict(dict(required, num_kv_shared_layers=0))
    hf = transformers.Gemma3nTextConfig()
    for name, value in DEFAULTS.items():
        if name in ("num_kv_shared_layers",) or name.startswith("rope") or value is None:
            continue
        assert getattr(ours, name) == value == getattr(hf, name), name
    assert DEFAULTS["num_kv_shared_layers"] == hf.num_kv_shared_layers


def test_bad_config_values_through_convert(tmp_path):
    src = make_checkpoint(tmp_path / "src", "hf", extra_files=False)
    config = json.loads((src / "config.json").read_text())
    for field, value, says in BAD:
        config["text_config"] = tiny_text_config(**{field: value})
        (src / "config.json").write_text(json.dumps(config))
        r = CliRunner().invoke(command, ["--target", "generic", str(src), str(tmp_path / "out")])
        lines = r.output.strip().splitlines()
        assert r.exit_code == 2 and (r.exception is None or isinstance(r.exception, SystemExit)), (field, r.output)
        assert len(lines) == 1 and lines[0].startswith(f"error: {src}/config.json: text_config: "), lines
        assert says in lines[0], (says, lines[0])
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("file, value", [
    ("generation_config.json", "x"),  # skipped without a word
    ("generation_config.json", [1, -5]),  # "internal error, manifest does not validate" at the end
    ("generation_config.json", [1, 10**6]),
    ("config.json", True),
    ("text_config", [1.5]),
])
def test_stop_ids_are_checked_at_the_door(tmp_path, file, value):
    src = make_checkpoint(tmp_path / "src", "hf")
    name = "config.json" if file == "text_config" else file
    config = json.loads((src / name).read_text()) if (src / name).exists() else {}
    (config["text_config"] if file == "text_config" else config)["eos_token_id"] = value
    (src / name).write_text(json.dumps(config))
    r = CliRunner().invoke(command, ["--target", "generic", str(src), str(tmp_path / "out")])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and (r.exception is None or isinstance(r.exception, SystemExit)), r.output
    assert len(lines) == 1 and lines[0].startswith(f"error: {src}/{name}"), lines
    assert "eos_token_id: must be a token id or a list of token ids in [0, 320) (vocab_size)" in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("config-values")
    return convert(text_checkpoint(root / "src"), root / "bundle", "generic")


def edit_manifest(bundle: Path, edit) -> None:
    """Change manifest.yaml and record its digest again: what a careful editor (or an attacker) does."""
    doc = yaml.safe_load((bundle / "manifest.yaml").read_text())
    edit(doc)
    data = yaml.safe_dump(doc, sort_keys=False).encode()
    (bundle / "manifest.yaml").write_bytes(data)
    (bundle / "manifest.sha256").write_text(manifest_digest_line(data))
    assert hashlib.sha256(data).hexdigest() in (bundle / "manifest.sha256").read_text()


def run_runtime(*args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MTL_CAPTURE_ENABLED", "MLX_PREPARED_CAPTURE_DECODE")}
    return subprocess.run([sys.executable, "-m", "runtime", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)


@pytest.mark.parametrize("field, value, says", [
    ("rms_norm_eps", "not a number", "must be a finite number"),
    ("altup_active_idx", 7, "must be an integer from 0 to 3"),
    ("sliding_window", 0, "must be an integer from 1 to"),
    ("num_hidden_layers", 10**9, "must be an integer from 1 to 256"),
    ("final_logit_softcapping", math.nan, "must be a finite number"),
])
def test_an_edited_manifest_with_its_digest_recomputed_is_one_line_at_load(pristine, tmp_path, field, value, says):
    bundle = Path(shutil.copytree(pristine, tmp_path / "bundle"))
    edit_manifest(bundle, lambda m: m["model"]["text_config"].update({field: value}))
    for args in (["generate", bundle, "--prompt", "hi", "--max-tokens", "2"], ["verify", bundle]):
        r = run_runtime(*args)
        assert "Traceback" not in r.stderr, r.stderr
        (line,) = r.stderr.splitlines()
        assert r.returncode == 2, r.stderr
        assert line.startswith(f"error: {bundle / 'manifest.yaml'}: model.text_config: {field}: {says}"), line


def test_a_default_the_source_leaves_out_converts_to_a_bundle_that_loads(tmp_path):
    """A config without head_dim: the converter and the runtime both take transformers' 256 (the
    converter used to take hidden_size // num_attention_heads, the runtime 256: such a bundle did
    not load)."""
    text = tiny_text_config(head_dim=DEFAULTS["head_dim"])
    src = make_checkpoint(tmp_path / "src", "hf", text_config=text, extra_files=False)
    config = json.loads((src / "config.json").read_text())
    del config["text_config"]["head_dim"]
    (src / "config.json").write_text(json.dumps(config))
    bundle = convert(src, tmp_path / "bundle", "generic")
    r = run_runtime("generate", bundle, "--prompt", "-", "--max-tokens", "2")
    assert "Traceback" not in r.stderr
    assert r.returncode == 2 and "no tokenizer.json" in r.stderr  # loaded; only the text needs a tokenizer


Q = "model.language_model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("edit, says", [
    (lambda m: m["target"]["profile"].update(device="x"), "target.profile.device: expected object or null, got str"),
    (lambda m: m["target"]["profile"].update(device_class=["x"]),
     "target.profile.device_class: expected string or null"),
    (lambda m: m["model"].update(eos_token_ids=[1, -5]), "model.eos_token_ids[1]: must be >= 0, got -5"),
    (lambda m: m["projections"][Q].update(quantized={"bits": 4, "group_size": 0, "mode": "affine"}),
     f"projections.{Q}.quantized: group_size 0 is not one affine takes (32, 64, 128)"),
    (lambda m: m["projections"][Q].update(quantized={"bits": 7, "group_size": 64, "mode": "affine"}),
     f"projections.{Q}.quantized: bits 7 is not one affine takes (1, 2, 3, 4, 5, 6, 8)"),
    (lambda m: m["embeddings"]["model.language_model.embed_tokens"].update(
        quantized={"bits": 4, "group_size": 32, "mode": "fp3"}),
     "embeddings.model.language_model.embed_tokens.quantized: mode 'fp3' is not one MLX quantizes with"),
], ids=["profile device", "profile device_class", "negative eos", "group size 0", "bits 7", "mode"])
def test_other_manifest_values_the_runtime_reads_are_checked_at_load(pristine, tmp_path, edit, says):
    """Found by tests/test_config_fuzz.py's larger offline runs or by hand: the target profile's
    device (read to tell whether the bundle was made here), the stop ids, a record's quantization."""
    from runtime.loader import load_model

    bundle = Path(shutil.copytree(pristine, tmp_path / "bundle"))
    edit_manifest(bundle, edit)
    with pytest.raises(ManifestError) as e:
        load_model(bundle)
    assert str(e.value) == f"{bundle / 'manifest.yaml'}: {says}" or str(e.value).startswith(
        f"{bundle / 'manifest.yaml'}: {says}"), str(e.value)
