"""runtime.load: manifest first, target check, and the promise of zero work at load.

The zero-work check (`load_violations`) looks at what `load` produced from three sides, so no
single way of sneaking in a transform escapes it:
- the graph: loaded lazily, every parameter must be the unevaluated output of an `mx.load`
  (`Load` primitive) with nothing in between (mx.export_to_dot shows any Transpose, AsType,
  Copy, Contiguous, Slice, Concatenate ... node);
- the calls: MLX transform functions and array methods are counted during a normal load;
- the bytes: every parameter equals, byte for byte and shape for shape, the tensor the
  safetensors header of its shard describes (read here without MLX).
Then variants of the loader that each add one transform must all be caught.
"""

import json
import re
import shutil
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml
from mlx.utils import tree_flatten

import runtime
import runtime.assemble as assemble
import runtime.loader as loader
from manifests import FORMAT_VERSION, target_for_device
from runtime.loader import BundleError, TargetMismatchWarning
from runtime.projections import Pretransposed, Standard
from tests.runtime_helpers import load_quietly, source_and_bundles

M5_DEVICE = {"architecture": "applegpu_g17s", "device_name": "recorded M5 Max"}
M1_DEVICE = {"architecture": "applegpu_g13s", "device_name": "recorded M1"}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    return source_and_bundles(tmp_path_factory.mktemp("loader"), seed=1)


@pytest.fixture
def copy_of(bundles, tmp_path):
    def make(name):
        return Path(shutil.copytree(bundles[name], tmp_path / name))
    return make


# -- the zero-work check ------------------------------------------------------------------------

def shard_bytes(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """key -> (dtype code, shape, raw bytes), straight from each shard's safetensors header."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        raw = f.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        header.pop("__metadata__", None)
        for key, info in header.items():
            start, end = info["data_offsets"]
            out[key] = (info["dtype"], info["shape"], raw[8 + n + start : 8 + n + end])
    return out


def graph_problems(params: dict[str, mx.array], where: Path) -> list[str]:
    dot = where / "params.dot"
    mx.export_to_dot(str(dot), *params.values())
    text = dot.read_text()
    primitives = re.findall(r'\[label ="([^"]+)"', text)
    problems = [f"graph: {name} between a shard and a parameter" for name in sorted(set(primitives) - {"Load"})]
    if "rank=source" in text:
        problems.append("graph: a parameter was evaluated (or made) before it reached the model")
    if primitives.count("Load") != len(params):
        problems.append(f"graph: {primitives.count('Load')} loads for {len(params)} parameters")
    return problems


TRANSFORMS = ["transpose", "swapaxes", "moveaxis", "contiguous", "concatenate", "stack", "copy", "reshape",
              "flatten", "view", "as_strided", "split", "take", "dequantize", "quantize"]
METHODS = ["astype", "transpose", "swapaxes", "moveaxis", "reshape", "flatten", "view", "split", "__getitem__"]


def counted_calls(monkeypatch) -> dict[str, int]:
    """Count calls of MLX functions and array methods that transform an array."""
    calls = {}

    def wrap(owner, name, label):
        original = getattr(owner, name)

        def counting(*args, **kwargs):
            calls[label] = calls.get(label, 0) + 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counting)

    for name in TRANSFORMS:
        if hasattr(mx, name):
            wrap(mx, name, f"mx.{name}")
    for name in METHODS:
        wrap(mx.array, name, f"array.{name}")
    original_t = mx.array.T

    def counting_t(self):
        calls["array.T"] = calls.get("array.T", 0) + 1
        return original_t.__get__(self)

    monkeypatch.setattr(mx.array, "T", property(counting_t))
    return calls


def load_violations(bundle: Path, monkeypatch, tmp_path: Path) -> list[str]:
    """Everything `runtime.load` does to weights beyond putting mx.load's arrays in place."""
    try:
        lazy_model, _ = load_quietly(bundle, lazy=True)
    except BundleError as e:  # the loader's own checks noticed what it did to the arrays
        return [f"refused: {e}"]
    problems = graph_problems(dict(tree_flatten(lazy_model.parameters())), tmp_path)

    with monkeypatch.context() as m:
        calls = counted_calls(m)
        model, _ = load_quietly(bundle)
    problems += [f"calls: {name} x{n} during load" for name, n in sorted(calls.items())]

    stored = shard_bytes(bundle)
    params = dict(tree_flatten(model.parameters()))
    for key, value in params.items():
        code, shape, raw = stored[key]
        if list(value.shape) != shape:
            problems.append(f"bytes: {key} is {list(value.shape)}, stored {shape}")
            continue
        mine = np.array(value.view(mx.uint8)).tobytes()
        if mine != raw:
            problems.append(f"bytes: {key} differs from its shard ({code})")
    return problems


@pytest.mark.parametrize("name", ["m5", "generic"])
def test_load_does_no_work_on_weights(bundles, name, monkeypatch, tmp_path):
    assert load_violations(bundles[name], monkeypatch, tmp_path) == []


def _transpose_square(arrays):
    return {k: (mx.transpose(v) if v.ndim == 2 and v.shape[0] == v.shape[1] else v) for k, v in arrays.items()}


def _T_square(arrays):
    return {k: (v.T if v.ndim == 2 and v.shape[0] == v.shape[1] else v) for k, v in arrays.items()}


def _transpose_eagerly(arrays):
    out = _T_square(arrays)
    mx.eval(list(out.values()))
    return out


def _contiguous_copy_of_transposed(arrays):
    """A load-time habit of runtimes that pretranspose: bring tables back to [out, in]... and back again."""
    return {k: (mx.contiguous(v.T).T if k.endswith(".weight_t") else v) for k, v in arrays.items()}


def _cast(arrays):
    return {k: v.astype(mx.bfloat16) for k, v in arrays.items()}


def _concatenate(arrays):
    return {k: (mx.concatenate([v[:1], v[1:]]) if v.ndim == 2 else v) for k, v in arrays.items()}


@pytest.mark.parametrize("variant", [_transpose_square, _T_square, _transpose_eagerly,
                                     _contiguous_copy_of_transposed, _cast, _concatenate])
def test_a_loader_that_transforms_weights_is_caught(bundles, variant, monkeypatch, tmp_path):
    real = assemble.read_shards

    def regressed(path, names):
        arrays, origin = real(path, names)
        return variant(arrays), origin

    monkeypatch.setattr(assemble, "read_shards", regressed)
    problems = load_violations(bundles["m5"], monkeypatch, tmp_path)
    assert problems, f"{variant.__name__} went unnoticed"


def test_every_check_alone_sees_a_transpose(bundles, monkeypatch, tmp_path):
    """Graph, calls and bytes each flag a square transpose on their own."""
    real = assemble.read_shards

    def regressed(path, names):
        arrays, origin = real(path, names)
        return _T_square(arrays), origin

    monkeypatch.setattr(assemble, "read_shards", regressed)
    kinds = {problem.split(":")[0] for problem in load_violations(bundles["m5"], monkeypatch, tmp_path)}
    assert kinds == {"graph", "calls", "bytes"}


def test_loaded_projections_follow_the_manifest(bundles):
    model, tokenizer = load_quietly(bundles["m5"])
    assert tokenizer is None  # the tiny checkpoint ships no tokenizer.json
    for path, record in model.manifest["projections"].items():
        if path == "lm_head":
            module = model.lm_head
        else:
            module = model
            for part in path.split("."):
                module = module[int(part)] if part.isdigit() else getattr(module, part)
        want = Pretransposed if record["layout"] == "pretransposed" else Standard
        assert type(module) is want, path


# -- manifest and target ------------------------------------------------------------------------

def test_a_checkpoint_without_manifest_names_the_command(bundles):
    here = target_for_device(mx.device_info())
    with pytest.raises(BundleError) as e:
        runtime.load(bundles["src"])
    message = str(e.value)
    assert "manifest.yaml" in message
    assert f"python -m convert --target {here} {bundles['src']} " in message
    assert "\n" not in message


def test_a_missing_directory_is_refused(tmp_path):
    with pytest.raises(BundleError, match="no such bundle"):
        runtime.load(tmp_path / "nowhere")


def test_a_newer_format_asks_for_an_upgrade(copy_of):
    bundle = copy_of("generic")
    manifest = yaml.safe_load((bundle / "manifest.yaml").read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (bundle / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    with pytest.raises(Exception, match="upgrade mlx-prepared"):
        load_quietly(bundle)


def test_target_mismatch_warns_with_the_command_for_this_device(bundles, monkeypatch):
    monkeypatch.setattr(loader.mx, "device_info", lambda: M1_DEVICE)  # recorded info, not the hardware
    with pytest.warns(TargetMismatchWarning) as record:
        runtime.load(bundles["m5"])
    message = str(record[0].message)
    assert "'m5'" in message and "runs correctly here" in message
    assert f"python -m convert --target generic {bundles['src']} src-generic" in message  # OUT in the current dir
    assert record[0].filename == __file__  # the warning points at the caller's line


@pytest.mark.parametrize("source,command", [
    ({"kind": "hub", "repo_id": "org/gemma-x", "revision": "main", "commit": "c0ffee", "path": "/cache/snapshots/c0"},
     "python -m convert --target generic org/gemma-x --revision c0ffee gemma-x-generic"),
    ({"kind": "local", "path": "/the/publishers/own/gemma-x"},
     "python -m convert --target generic CHECKPOINT OUT, CHECKPOINT being a copy of the checkpoint it was "
     "converted from (/the/publishers/own/gemma-x, not on this machine)"),
], ids=["hub-source", "source-elsewhere"])
def test_the_proposed_command_works_for_where_the_source_is(copy_of, monkeypatch, tmp_path, source, command):
    """A bundle converted from a hub repo names the repo at its commit, not the hub cache's folder
    (OUT would land inside the cache); one converted from a folder of another machine (a bundle
    from the hub) does not name that folder as if it were here. OUT is in the current directory."""
    bundle = copy_of("m5")
    manifest = yaml.safe_load((bundle / "manifest.yaml").read_text())
    manifest["source"] = dict(source, naming="hf", files={})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BundleError) as e:
        loader.check_target(manifest, bundle, strict=True, device_info=M1_DEVICE)
    assert str(e.value).endswith("for weights laid out for this device ('generic', applegpu_g13s): " + command)


def test_the_proposed_out_is_beside_the_source_when_run_inside_it(bundles, monkeypatch):
    from runtime.bundle import convert_command

    monkeypatch.chdir(bundles["src"])
    assert convert_command(".", "m5") == f"python -m convert --target m5 . {bundles['src'].parent / 'src-m5'}"


def test_strict_target_makes_the_mismatch_an_error(bundles, monkeypatch):
    monkeypatch.setattr(loader.mx, "device_info", lambda: M1_DEVICE)
    with pytest.raises(BundleError, match="convert --target generic"):
        runtime.load(bundles["m5"], strict_target=True)


def test_the_right_target_loads_silently(bundles, monkeypatch, recwarn):
    monkeypatch.setattr(loader.mx, "device_info", lambda: M5_DEVICE)
    runtime.load(bundles["m5"], strict_target=True)
    monkeypatch.setattr(loader.mx, "device_info", lambda: M1_DEVICE)
    runtime.load(bundles["generic"], strict_target=True)
    assert not [w for w in recwarn if issubclass(w.category, TargetMismatchWarning)]


def test_a_calibrated_bundle_loads_silently_on_its_own_device(copy_of, monkeypatch):
    """A bundle converted with a profile `runtime calibrate` measured on this device is this
    device's, whatever the profile's name; on another device it still warns."""
    from runtime.loader import made_for_this_device

    bundle = copy_of("generic")
    manifest = yaml.safe_load((bundle / "manifest.yaml").read_text())
    profile = {"name": "calibrated-x", "device": dict(M5_DEVICE), "device_class": "m5", "layouts": {}}
    assert made_for_this_device(profile, M5_DEVICE, "m5")
    assert made_for_this_device(dict(profile, device={"device_name": "other", "architecture": "?"}), M5_DEVICE, "m5")
    assert not made_for_this_device(dict(profile, device_class="cuda"), M1_DEVICE, "generic")
    manifest["target"].update(name="calibrated-x", profile=profile)
    monkeypatch.setattr(loader.mx, "device_info", lambda: M5_DEVICE)
    loader.check_target(manifest, bundle, strict=True)  # no error
    monkeypatch.setattr(loader.mx, "device_info", lambda: M1_DEVICE)
    with pytest.raises(BundleError, match="calibrated-x"):
        loader.check_target(manifest, bundle, strict=True)


# -- a manifest that disagrees with the stored tensors ------------------------------------------

GATE = "model.language_model.layers.0.mlp.gate_proj"


def edit_manifest(bundle: Path, edit) -> None:
    manifest = yaml.safe_load((bundle / "manifest.yaml").read_text())
    edit(manifest)
    (bundle / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda m: m["projections"][GATE].update(shape=m["projections"][GATE]["source_shape"]),
         [f"projections.{GATE}", f"{GATE}.weight_t", "model-0000"]),
        (lambda m: m["projections"][GATE].update(dtype="bfloat16"), [f"projections.{GATE}", "bfloat16", "float32"]),
        (lambda m: m["projections"][GATE].update(key=GATE + ".weight"), [f"projections.{GATE}", GATE + ".weight"]),
        (lambda m: m["projections"][GATE].update(layout="standard"), [f"projections.{GATE}", "standard"]),
        (lambda m: m["projections"].pop(GATE), [GATE]),
        (lambda m: m["embeddings"]["model.language_model.embed_tokens"].update(shape=[10, 64]),
         ["embeddings.model.language_model.embed_tokens", "[10, 64]"]),
    ],
    ids=["shape", "dtype", "key", "layout", "missing-entry", "embedding-shape"],
)
def test_a_manifest_entry_that_disagrees_is_an_error_naming_both(copy_of, edit, expected):
    bundle = copy_of("m5")
    edit_manifest(bundle, edit)
    with pytest.raises(BundleError) as e:
        load_quietly(bundle)
    message = str(e.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, (part, message)


def test_a_tensor_the_model_has_no_place_for_is_an_error(copy_of):
    bundle = copy_of("generic")
    shard = bundle / "model.safetensors"
    arrays = mx.load(str(shard))
    arrays["model.language_model.layers.9.self_attn.x_proj.weight"] = mx.zeros((32, 64))
    mx.save_safetensors(str(shard), arrays)
    with pytest.raises(BundleError, match="no place for .*layers.9.self_attn.x_proj.weight"):
        load_quietly(bundle)


def test_tensors_kept_for_mlx_lm_stay_out_of_the_model_and_are_checked(bundles, copy_of):
    """A generic bundle keeps the KV-shared layers' K/V for mlx-lm's loader (the manifest's
    `unread`): they are stored as recorded, never reach the model, and a stored one that differs
    from its entry is refused by load and reported by verify."""
    from runtime.verify import verify_bundle

    manifest = yaml.safe_load((bundles["generic"] / "manifest.yaml").read_text())
    unread = manifest["unread"]
    model, _ = load_quietly(bundles["generic"])
    params = {k for k, _ in tree_flatten(model.parameters())}
    assert len(unread) == 3 * model.config.num_kv_shared_layers and not set(unread) & params
    assert not yaml.safe_load((bundles["m5"] / "manifest.yaml").read_text()).get("unread")

    bundle = copy_of("generic")
    key = next(k for k in unread if k.endswith("v_proj.weight"))
    arrays = mx.load(str(bundle / "model.safetensors"))
    arrays[key] = arrays[key][:-1]
    mx.save_safetensors(str(bundle / "model.safetensors"), arrays)
    with pytest.raises(BundleError, match=f"unread.{re.escape(key)} says {key} is float32 "):
        load_quietly(bundle)
    assert any(f"unread.{key}:" in p and "the manifest says" in p for p in verify_bundle(bundle))


def test_a_missing_shard_is_named(copy_of):
    bundle = copy_of("m5")
    victim = sorted(bundle.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(BundleError, match=re.escape(victim.name)):
        load_quietly(bundle)


def test_verify_runs_first_when_asked(copy_of):
    bundle = copy_of("generic")
    with (bundle / "config.json").open("a") as f:
        f.write(" ")
    load_quietly(bundle)  # the weights are intact: a plain load does not re-hash
    with pytest.raises(BundleError, match="config.json"):
        load_quietly(bundle, verify=True)


@pytest.mark.parametrize("kwargs, says", [
    ({"verify": "yes"}, "verify must be True or False, not str 'yes'"),
    ({"strict_target": "no"}, "strict_target must be True or False, not str 'no'"),  # "no" was strict
    ({"lazy": 1}, "lazy must be True or False, not int 1"),
    ({"revision": 3}, "revision must be a str"),
])
def test_load_options_are_checked_at_the_door(bundles, kwargs, says):
    """load's flags were read for their truth: verify="yes" verified, strict_target="no" refused
    the bundle for another device class; now a TypeError naming the option."""
    with pytest.raises(TypeError, match=re.escape(says)):
        runtime.load(bundles["m5"], **kwargs)


@pytest.mark.parametrize("revision", ["x\x00", "", "a b", "main\n", "x" * 256])
def test_a_revision_that_no_hub_could_hold_is_refused_at_the_door(revision):
    """A NUL, a newline or a space in a revision went on to the hub client (a HubError when offline,
    whatever the revision); now a ValueError naming it, before the hub or its cache is asked. The
    same rule for convert's --revision (one line, exit 2)."""
    with pytest.raises(ValueError, match="is not a branch, tag or commit name"):
        runtime.load("acme/gemma-3n-tiny-prepared", revision=revision)


def test_convert_refuses_such_a_revision_in_one_line(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "convert", "--revision", "x\ny", "acme/gemma-3n", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr == ("error: --revision: 'x\\ny' is not a branch, tag or commit name "
                                                    "(printable ASCII, no spaces, 1-255 characters)\n"), done.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("path", [None, 5, b"/tmp"])
def test_load_path_must_be_a_str_or_a_path(path):
    with pytest.raises(TypeError, match="path must be a bundle directory or a hub id"):
        runtime.load(path)
