"""runtime.verify: replaying the manifest against a bundle made by the real converter."""

import json
import shutil
from pathlib import Path

import pytest

from runtime.verify import verify_bundle, verify_command
from tests.runtime_helpers import convert, edit_manifest, load_quietly, source_and_bundles

GATE = "model.language_model.layers.1.mlp.gate_proj"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    return source_and_bundles(tmp_path_factory.mktemp("verify"), seed=2)


@pytest.fixture
def m5(bundles, tmp_path) -> Path:
    return Path(shutil.copytree(bundles["m5"], tmp_path / "m5"))


def shards(bundle: Path) -> list[Path]:
    return sorted(bundle.glob("model-*.safetensors"))


@pytest.mark.parametrize("name", ["m5", "generic"])
def test_a_fresh_bundle_verifies(bundles, name, capsys):
    assert verify_bundle(bundles[name]) == []
    assert verify_command(bundles[name]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("ok: ") and err == ""


def test_a_flipped_byte_names_its_file(m5, capsys):
    victim = shards(m5)[1]
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0x01  # inside the last tensor's data: the header stays valid
    victim.write_bytes(bytes(data))
    problems = verify_bundle(m5)
    assert problems == [f"{victim}: sha256 differs from manifest.yaml"]
    assert verify_command(m5) == 1
    assert capsys.readouterr().err.splitlines() == problems


def test_a_truncated_shard(m5):
    victim = shards(m5)[0]
    victim.write_bytes(victim.read_bytes()[:-100])
    problems = verify_bundle(m5)
    assert problems[0].startswith(f"{victim}: ") and "bytes, manifest.yaml says" in problems[0]
    assert any("truncated" in p and str(victim) in p for p in problems)


def test_missing_and_unlisted_files(m5):
    (m5 / "generation_config.json").unlink()
    (m5 / "stray.safetensors").write_bytes(b"")
    problems = verify_bundle(m5)
    assert f"{m5 / 'generation_config.json'}: missing (listed in manifest.yaml)" in problems
    assert f"{m5 / 'stray.safetensors'}: not listed in manifest.yaml" in problems


def test_a_layout_that_does_not_match_the_stored_shape(m5):
    """A pretransposed [in, out] tensor recorded as standard must be [out, in]: flagged."""
    edit_manifest(m5, lambda m: m["projections"][GATE].update(layout="standard"))
    problems = verify_bundle(m5)
    assert len(problems) == 1
    assert f"projections.{GATE}" in problems[0] and f"{GATE}.weight_t" in problems[0]
    assert "source shape [128, 64] means it should be [128, 64]" in problems[0]


def test_a_recorded_shape_that_is_not_stored(m5):
    edit_manifest(m5, lambda m: m["projections"][GATE].update(shape=[128, 64]))
    (problem,) = verify_bundle(m5)
    assert f"holds {GATE}.weight_t as float32 [64, 128], the manifest says float32 [128, 64]" in problem


def test_a_key_missing_from_the_index(m5):
    index = json.loads((m5 / "model.safetensors.index.json").read_text())
    shard = index["weight_map"].pop(GATE + ".weight_t")
    (m5 / "model.safetensors.index.json").write_text(json.dumps(index))
    problems = verify_bundle(m5)
    assert problems[0].endswith("model.safetensors.index.json: sha256 differs from manifest.yaml") or \
        "bytes, manifest.yaml says" in problems[0]
    assert f"{m5 / shard}: tensor {GATE}.weight_t is not where model.safetensors.index.json says (None)" in problems


def test_a_recorded_key_that_no_shard_holds(m5):
    edit_manifest(m5, lambda m: m["projections"][GATE].update(key=GATE + ".weight"))
    assert verify_bundle(m5) == [f"manifest.yaml: projections.{GATE}: tensor {GATE}.weight is in no shard"]


UP = "model.language_model.layers.1.mlp.up_proj"


@pytest.mark.parametrize("edit, says", [
    (lambda m: m["projections"][GATE].update(key=UP + ".weight_t"),
     f"projections.{GATE}: key '{UP}.weight_t' is not where a pretransposed projection at {GATE} lives"),
    (lambda m: m["projections"].pop(GATE), f"no projection entry for {GATE}"),
    (lambda m: m["model"]["text_config"].update(vocab_size=1000),
     "embeddings.model.language_model.embed_tokens: shape [64, 320] disagrees with the model config, which "
     "implies [64, 1000]"),
])
def test_what_only_the_model_shows_is_a_problem_too(m5, edit, says):
    """Every record matching its tensors, but not the model the config builds (a key where the
    model does not look, a module without a record, a config whose shapes are not stored): verify
    said ok, then the bundle did not load."""
    edit_manifest(m5, edit)
    (problem,) = verify_bundle(m5)
    assert says in problem, problem
    with pytest.raises(ValueError) as loading:
        load_quietly(m5)
    assert says in str(loading.value)


@pytest.fixture(scope="module")
def q4(bundles, tmp_path_factory) -> Path:
    return convert(bundles["src"], tmp_path_factory.mktemp("verify-q4") / "q4", "generic", "--quantize", "4")


def test_scales_that_do_not_fit_the_recorded_quantization(q4, tmp_path):
    """The packed weight's shape does not show the group size; its scales do. A record that says
    32 where 64 was written is named by verify at the scales, and refused by load."""
    bundle = Path(shutil.copytree(q4, tmp_path / "q4"))
    edit_manifest(bundle, lambda m: m["projections"][GATE]["quantized"].update(group_size=32))
    assert verify_bundle(bundle) == [f"manifest.yaml: projections.{GATE}: model.safetensors holds {GATE}.scales "
                                     "as [128, 1], where the record means [128, 2]"]
    with pytest.raises(ValueError, match=f"{GATE}.scales"):
        load_quietly(bundle)


def test_not_a_bundle(bundles, capsys):
    assert verify_command(bundles["src"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "python -m convert --target" in err and err.count("\n") == 1
