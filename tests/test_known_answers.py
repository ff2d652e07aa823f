"""Known answers in the manifest: `convert --known-answers`, `convert known-answers BUNDLE`, and
the optional `known_answers` section of the schema (manifests/known_answers.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from convert.reference import PROMPT_LENGTH, RECORDED_POSITIONS, TOP_K, known_answers
from manifests import ManifestError, read_manifest, validate_manifest
from manifests.known_answers import check_section
from runtime.verify import verify_bundle
from tests.checkpoints import make_checkpoint
from tests.runtime_helpers import convert, edit_manifest


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("known-answers")
    src = make_checkpoint(root / "src", "hf")
    return {"with": convert(src, root / "with", "m5", "--known-answers", "--max-shard-size", "700KB"),
            "without": convert(src, root / "without", "m5", "--max-shard-size", "700KB")}


def add(bundle):
    return subprocess.run([sys.executable, "-m", "convert", "known-answers", str(bundle)],
                          capture_output=True, text=True)


def without_timing(section: dict) -> dict:
    return {k: v for k, v in section.items() if k != "reference"}


def test_convert_records_the_references_answers(bundles):
    manifest = read_manifest(bundles["with"])
    section = manifest["known_answers"]
    assert len(section["prompt"]) == PROMPT_LENGTH
    assert section["positions"] == list(range(PROMPT_LENGTH - RECORDED_POSITIONS, PROMPT_LENGTH))
    assert [len(e["ids"]) for e in section["logits"]] == [TOP_K] * RECORDED_POSITIONS
    assert len(section["hidden"]["layers"]) == manifest["model"]["text_config"]["num_hidden_layers"]
    assert section["tolerance"]["activations"] == "float32" and "tf32" in section["tolerance"]
    assert section["reference"]["name"] == "numpy-float32" and section["reference"]["seconds"] >= 0
    check_section(section, manifest["model"]["text_config"], "manifest.yaml")
    # The answers are what the reference computes from the bundle's files, nothing else.
    assert without_timing(known_answers(bundles["with"], manifest)) == without_timing(section)
    assert verify_bundle(bundles["with"]) == []


def test_the_subcommand_adds_them_without_copying_a_weight(bundles, tmp_path):
    bundle = shutil.copytree(bundles["without"], tmp_path / "b")
    assert "known_answers" not in read_manifest(bundle)
    inodes = {p.name: p.stat().st_ino for p in bundle.glob("*.safetensors")}
    done = add(bundle)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"added known answers to {bundle}: 12-token prompt, top-8 logits at 4 positions, "
                                  "10 layers; reference ")
    assert "peak memory" in done.stdout
    section = read_manifest(bundle)["known_answers"]
    assert without_timing(section) == without_timing(read_manifest(bundles["with"])["known_answers"])
    assert {p.name: p.stat().st_ino for p in bundle.glob("*.safetensors")} == inodes  # hard links, not copies
    assert verify_bundle(bundle) == []  # manifest.sha256 was renewed with the manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temporary, .old- or lock left beside it
    assert add(bundle).returncode == 0  # again: renewed in place


@pytest.mark.parametrize("damage", ["edited shard", "stray file", "edited manifest"])
def test_a_bundle_that_is_not_what_its_manifest_says_is_refused(bundles, tmp_path, damage):
    bundle = shutil.copytree(bundles["without"], tmp_path / "b")
    if damage == "edited shard":
        shard = sorted(bundle.glob("*.safetensors"))[0]
        data = bytearray(shard.read_bytes())
        data[-1] ^= 1
        shard.write_bytes(bytes(data))
        said = f"{shard}: differs from manifest.yaml (size or sha256)"
    elif damage == "stray file":
        (bundle / "notes.txt").write_text("mine")
        said = f"{bundle}: not as converted ({bundle / 'notes.txt'} is not listed in its manifest.yaml)"
    else:
        (bundle / "manifest.yaml").write_text((bundle / "manifest.yaml").read_text() + "# edited\n")
        said = (f"{bundle}: not as converted ({bundle / 'manifest.yaml'} differs from manifest.sha256 "
                "(edited after conversion))")
    before = (bundle / "manifest.yaml").read_bytes()
    done = add(bundle)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: {said}; known answers vouch for the weights as converted; "
                                                "convert the bundle again"]
    assert (bundle / "manifest.yaml").read_bytes() == before


GATE = "model.language_model.layers.1.mlp.gate_proj"
UP = "model.language_model.layers.1.mlp.up_proj"


@pytest.mark.parametrize("edit, says", [
    (lambda m: m["projections"][GATE].update(shape=m["projections"][GATE]["shape"][::-1]),
     f"manifest.yaml: projections.{GATE}: model-00002-of-00003.safetensors holds {GATE}.weight_t as float32 "
     "[64, 128], the manifest says float32 [128, 64]"),
    (lambda m: m["projections"][GATE].update(shape=[2**62, 2**62]), "the manifest says float32 [4611686018427387904"),
    (lambda m: m["projections"][GATE].update(key=UP + ".weight_t"),
     f"key '{UP}.weight_t' is not where a pretransposed record at {GATE} lives ('{GATE}.weight_t')"),
    (lambda m: m["projections"][GATE].update(quantized={"bits": 8, "group_size": 64, "mode": "affine"}),
     f"manifest.yaml: projections.{GATE}: "),
])
def test_records_that_disagree_with_the_stored_tensors_are_refused(bundles, tmp_path, edit, says):
    """The digest recorded again, so only the reference's own door can see it: shapes that do not
    stack or allocate were numpy tracebacks, a record over another's tensor gave answers for
    weights that are not the model's."""
    bundle = shutil.copytree(bundles["without"], tmp_path / "b")
    edit_manifest(bundle, edit)
    before = (bundle / "manifest.yaml").read_bytes()
    done = add(bundle)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(f"error: {bundle}/") and says in lines[0], lines[0]
    assert (bundle / "manifest.yaml").read_bytes() == before


def _double(field):
    def edit(m):
        c = m["model"]["text_config"]
        c[field] = [2 * x for x in c[field]] if isinstance(c[field], list) else 2 * c[field]
    return edit


@pytest.mark.parametrize("field, says", [
    ("laurel_rank", "layers.4.laurel.linear_right is [out, in] [64, 8], and the text config implies [out, in] "
                    "[64, 16]"),
    ("intermediate_size", "layers.4.mlp.down_proj is [out, in] [64, 128], and the text config implies [out, in] "
                          "[64, 256]"),
    ("vocab_size", "projections.lm_head: lm_head is [out, in] [320, 64], and the text config implies [out, in] "
                   "[640, 64]"),
])
def test_a_text_config_that_disagrees_with_the_records_is_refused(bundles, tmp_path, field, says):
    """The text config edited, the records and files left (digest recomputed): the reference
    computed answers for a model that `load` and `verify` then refuse; now it refuses first, as
    they do, naming the record."""
    bundle = shutil.copytree(bundles["without"], tmp_path / "b")
    edit_manifest(bundle, _double(field))
    assert verify_bundle(bundle) != []  # the runtime's view of the same bundle
    before = (bundle / "manifest.yaml").read_bytes()
    done = add(bundle)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(f"error: {bundle}/manifest.yaml: ") and says in lines[0], lines[0]
    assert lines[0].endswith("; convert the bundle again"), lines[0]
    assert (bundle / "manifest.yaml").read_bytes() == before


def test_not_a_bundle(tmp_path):
    done = add(tmp_path / "missing")
    assert done.returncode == 2 and "not a bundle directory" in done.stderr and "Traceback" not in done.stderr
    (tmp_path / "empty").mkdir()
    done = add(tmp_path / "empty")
    assert done.returncode == 2 and "no manifest" in done.stderr and "Traceback" not in done.stderr


def test_a_source_named_like_the_subcommand_is_reached_by_its_path(tmp_path):
    src = make_checkpoint(tmp_path / "known-answers", "hf")
    done = subprocess.run([sys.executable, "-m", "convert", "--target", "generic", "--quiet", "./known-answers", "out"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "manifest.yaml").is_file() and src.is_dir()


def test_the_section_is_optional_and_checked(bundles):
    plain = read_manifest(bundles["without"])
    validate_manifest(plain)  # a bundle without known answers stays valid
    manifest = read_manifest(bundles["with"])
    broken = dict(manifest, known_answers={k: v for k, v in manifest["known_answers"].items() if k != "tolerance"})
    with pytest.raises(ManifestError, match="known_answers: missing required field 'tolerance'"):
        validate_manifest(broken)


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.__setitem__("prompt", [0, 10_000]), r"known_answers.prompt: needs token ids in \[0, 320\)"),
    (lambda s: s.__setitem__("positions", [8, 9, 10]), "must ascend, start after position 0 and end at"),
    (lambda s: s["hidden"]["layers"].pop(), "known_answers.hidden.layers: 9 entries for 10 layers"),
    (lambda s: s["hidden"]["input"]["values"].pop(), r"known_answers.hidden.input: needs 8 values and 4 planes_rms"),
    (lambda s: s["logits"][0]["values"].__setitem__(0, float("nan")), "holds a NaN or infinite value"),
    (lambda s: s["tolerance"].__setitem__("hidden", 0.0), "tolerance: logits, hidden, values must be positive"),
    (lambda s: s["coordinates"].__setitem__(0, 64), r"known_answers.coordinates: need coordinates in \[0, 64\)"),
    (lambda s: s.__setitem__("prompt", [2] * 1025), r"known_answers.prompt: 1025 tokens; at most 1024"),
])
def test_check_section_names_what_is_wrong(bundles, edit, message):
    import copy

    manifest = read_manifest(bundles["with"])
    section = copy.deepcopy(manifest["known_answers"])
    edit(section)
    with pytest.raises(ManifestError, match=message):
        check_section(section, manifest["model"]["text_config"], "manifest.yaml")


def _long_prompt(manifest, n=200_000):
    section = manifest["known_answers"]
    section["prompt"] = [2] * n
    section["positions"] = [n - 1]
    section["logits"] = [dict(section["logits"][0], position=n - 1)]


def test_a_prompt_of_any_length_is_one_line_not_a_crash(bundles, tmp_path):
    """A 200,000-token known-answers prompt (digest recomputed) crashed `verify --numeric` with a
    segfault, and 20,000 tokens ran for minutes: the prompt is capped where the section is checked."""
    bad = shutil.copytree(bundles["with"], tmp_path / "long")
    edit_manifest(bad, _long_prompt)
    r = subprocess.run([sys.executable, "-m", "runtime", "verify", "--numeric", str(bad)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-500:]
    assert r.stderr.strip().splitlines() == [
        f"error: {bad}/manifest.yaml: known_answers.prompt: 200000 tokens; at most 1024"]


def test_a_killed_rewrite_is_put_back_by_the_next_run(bundles, tmp_path):
    """Killed between its two renames, the rewrite leaves the bundle under `.b.old-<pid>`; the next
    run (any run for that directory) puts it back before doing anything else."""
    bundle = shutil.copytree(bundles["without"], tmp_path / "b")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    os.rename(bundle, tmp_path / f".b.old-{int(dead.stdout)}")
    done = add(bundle)
    assert done.returncode == 0, done.stderr
    assert "known_answers" in read_manifest(bundle) and verify_bundle(bundle) == []
