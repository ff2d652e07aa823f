"""Shipping bundles through the model hub.

The hub's network is not reachable from this machine. Downloads are tested against what the hub
client leaves on disk (its cache layout: refs/, snapshots/<commit>/) with HF_HUB_OFFLINE=1, so the
real `snapshot_download` runs. Uploads mock only the network-facing HfApi methods and assert the
files, commit message and model card that would be sent.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from datetime import datetime, timezone

import mlx.core as mx
import pytest
import yaml

from convert import convert_checkpoint
from manifests import read_manifest
from runtime.hub import HubError, choose_variant, is_hub_id, resolve_bundle
from runtime.publish import model_card, publish_bundle
from tests.checkpoints import make_checkpoint, write_tokenizer
from tests.runtime_helpers import nudge

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "acme/gemma-3n-tiny-prepared"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub-bundles")
    src = write_tokenizer(make_checkpoint(root / "src", "hf"))
    return {
        "m5": convert_checkpoint(src, root / "m5", target="m5", dtype="float32", known_answers=True),
        "generic": convert_checkpoint(src, root / "generic", target="generic", dtype="float32", known_answers=True),
        # the per-layer embedding table in a file of its own (runtime/mapped.py), which must travel too
        "mapped": convert_checkpoint(src, root / "mapped", target="generic", dtype="float32", ple="mapped",
                                     known_answers=True),
    }


def fake_hub_cache(cache, bundles: dict, repo=REPO, commit=COMMIT):
    """Lay out what `hf download` leaves behind for a repo with one folder per variant."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    snap = repo_dir / "snapshots" / commit
    for variant, bundle in bundles.items():
        shutil.copytree(bundle, snap / variant)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snap


@pytest.fixture
def offline_cache(tmp_path, monkeypatch, bundles):
    cache = tmp_path / "hub"
    snap = fake_hub_cache(cache, bundles)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    return cache, snap


def test_hub_id_or_path(tmp_path):
    assert is_hub_id("google/gemma-3n-E2B-it")
    assert is_hub_id("acme/model:m5")
    assert not is_hub_id(str(tmp_path))
    assert not is_hub_id("just-a-name")
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert not is_hub_id("org/name")  # an existing local folder wins
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize(
    "arch, wanted, expect",
    [
        ("applegpu_g17s", None, "m5"),
        ("applegpu_g14s", None, "generic"),
        ("x86_64", None, "generic"),  # no cpu variant: generic
        ("x86_64", "m5", "m5"),
    ],
)
def test_choose_variant(arch, wanted, expect):
    assert choose_variant({"m5": "m5", "generic": "generic"}, {"architecture": arch}, wanted) == expect


def test_choose_variant_refuses_unknown():
    with pytest.raises(HubError, match="no variant 'cuda'.*generic, m5"):
        choose_variant({"m5": "m5", "generic": "generic"}, {"architecture": "x86_64"}, "cuda")
    with pytest.raises(HubError, match="name one of"):
        choose_variant({"m5": "m5", "cuda": "cuda"}, {"architecture": "x86_64"})


def test_resolve_from_offline_cache_picks_device_variant(offline_cache):
    cache, snap = offline_cache
    path = resolve_bundle(REPO, device_info={"architecture": "applegpu_g17s"})
    assert path == snap / "m5"
    assert read_manifest(path)["target"]["name"] == "m5"
    assert resolve_bundle(REPO + ":generic", device_info={"architecture": "applegpu_g17s"}) == snap / "generic"


def test_resolve_asks_only_for_the_chosen_variant(offline_cache, monkeypatch):
    import huggingface_hub

    asked = []
    real = huggingface_hub.snapshot_download

    def spy(*args, **kwargs):  # the real download (offline, from the cache), patterns recorded
        asked.append(kwargs.get("allow_patterns"))
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    resolve_bundle(REPO, device_info={"architecture": "applegpu_g17s"})
    first, second = asked
    assert all("manifest.yaml" in p or p == "config.json" for p in first)  # small files only, first
    assert second and all(p.startswith("m5/") for p in second)
    manifest = read_manifest(offline_cache[1] / "m5")
    assert sorted(second) == sorted(["m5/manifest.yaml", "m5/manifest.sha256"] + [f"m5/{f}" for f in manifest["files"]])
    assert (offline_cache[1] / "m5" / "manifest.sha256").is_file()


def test_offline_and_not_cached_says_so(offline_cache):
    with pytest.raises(HubError, match="not in the local hub cache"):
        resolve_bundle("acme/absent-model")


def test_runtime_loads_a_hub_id_offline(offline_cache, bundles):
    from runtime import load

    model, _ = load(REPO + ":generic")
    assert model.bundle_path == offline_cache[1] / "generic"


def test_cli_generates_from_hub_id_offline(offline_cache):
    cache, _ = offline_cache
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    import os

    r = subprocess.run([sys.executable, "-m", "runtime", "generate", REPO + ":m5", "--prompt", "the quick",
                        "--max-tokens", "3"],
                       capture_output=True, text=True, env={**os.environ, **env})
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "runtime", "generate", "acme/absent-model", "--prompt", "x"],
                       capture_output=True, text=True, env={**os.environ, **env})
    assert r.returncode == 2
    assert "acme/absent-model" in r.stderr and "Traceback" not in r.stderr


def test_tampered_cached_bundle_is_refused(offline_cache):
    from runtime import load

    _, snap = offline_cache
    manifest = read_manifest(snap / "m5")
    shard = snap / "m5" / sorted(n for n in manifest["files"] if n.endswith(".safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(Exception, match="sha256|hash"):
        load(REPO + ":m5")


class FakeApi:
    """Stands in for the hub's network API only; records what would be sent."""

    def __init__(self, existing=()):
        self.existing = list(existing)
        self.created, self.commits = [], []

    def create_repo(self, repo_id, **kwargs):
        self.created.append((repo_id, kwargs))

    def list_repo_files(self, repo_id, revision=None):
        return self.existing

    def create_commit(self, repo_id, operations, commit_message, revision=None):
        self.commits.append({"repo_id": repo_id, "ops": operations, "message": commit_message})
        return "commit-info"


def _card_meta(card: str) -> dict:
    _, front, _ = card.split("---", 2)
    return yaml.safe_load(front)


def test_publish_uploads_verified_bundle_with_card(bundles):
    api = FakeApi(existing=["README.md", "generic/manifest.yaml", "generic/model.safetensors"])
    publish_bundle(bundles["m5"], REPO, base_model="google/gemma-3n-E2B-it", api=api)
    assert api.created == [(REPO, {"private": False, "exist_ok": True})]
    (commit,) = api.commits
    manifest = read_manifest(bundles["m5"])
    paths = sorted(op.path_in_repo for op in commit["ops"])
    assert paths == sorted(["README.md", "m5/manifest.yaml", "m5/manifest.sha256"]
                           + [f"m5/{f}" for f in manifest["files"]])
    assert "m5" in commit["message"] and manifest["tool"]["version"] in commit["message"]
    card = next(op for op in commit["ops"] if op.path_in_repo == "README.md").path_or_fileobj.decode()
    meta = _card_meta(card)
    assert meta["base_model"] == "google/gemma-3n-E2B-it"
    assert meta["base_model_relation"] == "quantized"
    assert "target-generic" in meta["tags"] and "target-m5" in meta["tags"]
    assert "`generic/`" in card and "`m5/`" in card  # variants find each other
    assert "lm_head, mlp.gate_proj, mlp.up_proj" in card  # what the layout means here
    assert manifest["versions"]["mlx"] in card
    assert f"runtime generate {REPO}:m5" in card
    numeric = card.split("## Numeric check", 1)[1].split("##", 1)[0]  # where it passed, with what, when
    assert "`runtime verify --numeric` passed on **cpu (" in numeric
    assert f"with MLX {mx.__version__} on {datetime.now(timezone.utc):%Y-%m-%d}" in numeric


def test_publish_refuses_a_bundle_whose_numeric_check_fails_here(bundles, tmp_path):
    """A weight nudged with every hash recomputed passes `verify`, not the numeric check."""
    nudged = shutil.copytree(bundles["generic"], tmp_path / "nudged")
    nudge(nudged, "model.language_model.layers.2.mlp.up_proj.weight", (3, 4), 0.05)
    api = FakeApi()
    with pytest.raises(HubError, match="refusing to publish: the numeric check failed on this machine .*cpu.* "
                                       "eager run 1: layer 2 diverges first"):
        publish_bundle(nudged, REPO, api=api)
    assert api.commits == [] and api.created == []


def test_publish_refuses_a_bundle_without_known_answers(tmp_path):
    src = make_checkpoint(tmp_path / "src", "hf")
    bundle = convert_checkpoint(src, tmp_path / "b", target="generic", dtype="float32")
    api = FakeApi()
    with pytest.raises(HubError,
                       match=f"records no known answers; add them with: python -m convert known-answers {bundle}"):
        publish_bundle(bundle, REPO, api=api)
    assert api.commits == []


def test_publish_refuses_a_bundle_that_fails_verify(bundles, tmp_path):
    broken = shutil.copytree(bundles["generic"], tmp_path / "broken")
    (broken / "config.json").write_text("{}")
    api = FakeApi()
    with pytest.raises(HubError, match="verify failed.*config.json"):
        publish_bundle(broken, REPO, api=api)
    assert api.commits == [] and api.created == []


@pytest.mark.parametrize("edit, says", [
    (lambda ka: ka.__setitem__("prompt", [2, -1]), "known_answers.prompt[1]: must be >= 0"),
    (lambda ka: ka["tolerance"].pop("values"), "known_answers.tolerance: missing required field 'values'"),
    (lambda ka: ka.__setitem__("coordinates", "x"), "known_answers.coordinates: expected array"),
])
def test_publish_refuses_a_manifest_its_schema_refuses_in_one_line(bundles, tmp_path, edit, says):
    """A known_answers section of the wrong type (digest recomputed) escaped `publish` as a
    ManifestError traceback, where `verify --numeric` said the same in one line."""
    from tests.test_fused import edit_manifest

    bad = shutil.copytree(bundles["generic"], tmp_path / "bad")
    edit_manifest(bad, lambda m: edit(m["known_answers"]))
    api = FakeApi()
    with pytest.raises(HubError, match="refusing to publish: .*" + re.escape(says)):
        publish_bundle(bad, REPO, api=api)
    assert api.commits == [] and api.created == []
    r = subprocess.run([sys.executable, "-m", "runtime", "publish", str(bad), REPO], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and says in r.stderr


class FailingApi(FakeApi):
    """The hub refusing, as it does offline or without a token."""

    def create_repo(self, repo_id, **kwargs):
        from huggingface_hub.errors import OfflineModeIsEnabled

        raise OfflineModeIsEnabled("Cannot reach https://huggingface.co/api/repos/create: offline mode is enabled.")


@pytest.mark.parametrize("repo_id, kwargs, says", [
    ("not a repo!!", {}, "'not a repo!!': not a hub repo id"),
    ("org/../x", {}, "not a hub repo id"),
    (REPO, {"variant": "../../etc"}, "--variant '../../etc': not a folder name"),
    (REPO, {"variant": "a/b"}, "not a folder name"),
    (REPO, {"base_model": "x y"}, "--base-model 'x y': not a hub repo id"),
])
def test_publish_checks_its_names_before_anything_else(bundles, repo_id, kwargs, says):
    """The hub's validator raised a bad repo id as a traceback, after the numeric check had run."""
    api = FakeApi()
    with pytest.raises(HubError, match=re.escape(says)):
        publish_bundle(bundles["m5"], repo_id, api=api, **kwargs)
    assert api.created == [] and api.commits == []


def test_publish_reports_a_hub_failure_in_one_line(bundles):
    """Offline, without a token, a network error: the hub's exception was a traceback."""
    with pytest.raises(HubError, match=f"{REPO}: creating the repo failed \\(OfflineModeIsEnabled: Cannot reach"):
        publish_bundle(bundles["m5"], REPO, api=FailingApi())


def test_card_for_hub_source_names_revision(bundles):
    manifest = read_manifest(bundles["generic"])
    manifest["source"] = {"kind": "hub", "repo_id": "google/gemma-3n-E4B-it", "revision": "v1",
                          "commit": COMMIT, "naming": "hf", "files": {}}
    card = model_card(manifest, REPO, "generic", ["generic"])
    assert _card_meta(card)["base_model"] == "google/gemma-3n-E4B-it"
    assert COMMIT in card and "`v1`" in card


def test_publish_cli_refuses_non_bundle(tmp_path):
    r = subprocess.run([sys.executable, "-m", "runtime", "publish", str(tmp_path), REPO],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "not a bundle" in r.stderr and "Traceback" not in r.stderr


def test_edited_manifest_in_cache_is_refused(offline_cache):
    """The manifest's own digest travels with the bundle, so a hub bundle's manifest is checked too."""
    from runtime import load

    _, snap = offline_cache
    manifest = snap / "generic" / "manifest.yaml"
    manifest.write_text(manifest.read_text() + "# an edit that leaves the content valid\n")
    with pytest.raises(Exception, match="manifest.yaml.*(sha256|digest)"):
        load(REPO + ":generic")


def test_card_names_fused_modules(tmp_path):
    """A bundle converted for a fusing target says so in its card; a generic one says none."""
    from tests.runtime_helpers import convert

    src = make_checkpoint(tmp_path / "src", "hf")
    fused = read_manifest(convert(src, tmp_path / "cuda", "cuda"))
    plain = read_manifest(convert(src, tmp_path / "generic", "generic"))
    row = lambda card: next(line for line in card.splitlines() if line.startswith("| `v/`"))  # noqa: E731
    assert "| gate_up_proj, q_laurel_proj, qkv_laurel_proj |" in row(model_card(fused, REPO, "v", ["v"]))
    assert "| none | float32 |" in row(model_card(plain, REPO, "v", ["v"]))


def test_a_mapped_table_travels_with_its_bundle(offline_cache, bundles, monkeypatch):
    """`publish` uploads the mapped table's own file and `load` of the hub id downloads it (it is
    listed under the manifest's files like every other) and maps it where the hub cache keeps it."""
    from runtime import load
    from runtime.mapped import MappedTable

    api = FakeApi()
    publish_bundle(bundles["mapped"], REPO, variant="mapped", api=api)
    (commit,) = api.commits
    assert "mapped/embed_tokens_per_layer.safetensors" in {op.path_in_repo for op in commit["ops"]}
    card = next(op for op in commit["ops"] if op.path_in_repo == "README.md").path_or_fileobj.decode()
    assert "is placed `mapped`: stored in `embed_tokens_per_layer.safetensors`" in card

    import huggingface_hub

    asked, real = [], huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda *a, **k: asked.append(k.get("allow_patterns")) or real(*a, **k))
    model, _ = load(REPO + ":mapped")
    assert "mapped/embed_tokens_per_layer.safetensors" in asked[-1]
    table = model.model.language_model.embed_tokens_per_layer
    assert isinstance(table, MappedTable)
    assert table.file == offline_cache[1] / "mapped" / "embed_tokens_per_layer.safetensors"


def test_a_hub_checkpoint_is_answered_with_the_convert_command(tmp_path, monkeypatch):
    """No network: the real hub client (HF_HUB_OFFLINE=1) reads a cache laid out as `hf download`
    of a model's own repo leaves it, a checkpoint without manifest.yaml; the real CLI runs on it."""
    import os

    from runtime.bundle import device_target

    cache = tmp_path / "hub"
    repo_dir = cache / "models--acme--raw-gemma"
    make_checkpoint(repo_dir / "snapshots" / COMMIT, "hf")
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    target = device_target()
    r = subprocess.run([sys.executable, "-m", "runtime", "generate", "acme/raw-gemma", "--prompt", "x"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "error: acme/raw-gemma: a model checkpoint at revision main, not an mlx-prepared bundle (no manifest.yaml); "
        f"prepare it first: python -m convert --target {target} acme/raw-gemma raw-gemma-{target}"]
    # Offline and not in the cache at all: the hint is the command that makes a bundle, not `hf download`.
    r = subprocess.run([sys.executable, "-m", "runtime", "generate", "acme/absent", "--prompt", "x"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "error: acme/absent: not in the local hub cache, and the hub is unreachable or HF_HUB_OFFLINE is set; once "
        "online, `runtime generate acme/absent ...` downloads a bundle, and an original checkpoint needs preparing "
        f"first: python -m convert --target {target} acme/absent absent-{target}"]
    assert "hf download" not in r.stderr
