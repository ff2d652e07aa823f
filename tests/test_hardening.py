"""A catalogue of bad input, for `convert` and for the runtime's `load` and `verify`.

Every case is refused in one line naming the file (and the tensor, where there is one): the
converter exits 2 with no traceback and leaves nothing at OUT (no OUT, no `.OUT.*` temporary or
lock); the runtime raises one BundleError/ManifestError line, and `verify` reports the file.

Cases that tests/test_convert.py already holds through the real command (config.json missing,
invalid or of another architecture; pickle-only; truncated shard; header not JSON; unknown dtype;
shapes and tensor counts against the config; index entries naming a missing file, an absolute
path, `..` or a symlink out; OUT existing or inside SOURCE) and the reader-level header defects of
tests/test_convert_io.py are not repeated. docs/RELIABILITY.md lists every case and its test.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import mlx.core as mx
import pytest
import yaml
from click.testing import CliRunner

from convert import convert_checkpoint
from convert.cli import command
from manifests import FORMAT_VERSION, ManifestError
from runtime.loader import BundleError
from runtime.verify import verify_bundle, verify_command
from tests.checkpoints import make_checkpoint
from tests.runtime_helpers import load_quietly

REPO = Path(__file__).resolve().parents[1]
UP = "model.language_model.layers.3.mlp.up_proj.weight"
GATE = "model.language_model.layers.0.mlp.gate_proj.weight"


# --- raw safetensors surgery -------------------------------------------------------------------

def read_doc(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_doc(path: Path, doc: dict | bytes, body: bytes) -> None:
    text = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)


def in_data_order(doc: dict) -> list[str]:
    return sorted((k for k in doc if k != "__metadata__"), key=lambda k: doc[k]["data_offsets"][0])


def damage(path: Path, kind: str) -> list[str]:
    """Break one safetensors file `kind`'s way; return what the refusal must name."""
    doc, body = read_doc(path)
    order = in_data_order(doc)
    first, second, last = order[0], order[1], order[-1]
    if kind == "header length larger than the file":
        data = path.read_bytes()
        path.write_bytes(struct.pack("<Q", len(data)) + data[8:])
        return ["runs past the end"]
    if kind == "header claiming hundreds of MB":
        data = path.read_bytes()
        path.write_bytes(struct.pack("<Q", 400_000_000) + data[8:])
        return ["400000000", "exceeds the"]
    if kind == "offsets overlap":
        begin = doc[first]["data_offsets"][0] + 4
        span = doc[second]["data_offsets"][1] - doc[second]["data_offsets"][0]
        doc[second]["data_offsets"] = [begin, begin + span]
        write_doc(path, doc, body)
        return [second, "overlaps", first]
    if kind == "offsets leave a hole":
        doc[last]["data_offsets"] = [o + 8 for o in doc[last]["data_offsets"]]
        write_doc(path, doc, body + bytes(8))
        return [last, "8 unindexed bytes before its data"]
    if kind == "offsets run past the end":
        doc[last]["data_offsets"] = [o + 8 for o in doc[last]["data_offsets"]]
        write_doc(path, doc, body)
        return [last, "past the end"]
    if kind == "offsets disagree with dtype x shape":
        doc[first]["shape"] = [2 * doc[first]["shape"][0], *doc[first]["shape"][1:]]
        write_doc(path, doc, body)
        return [first, "data_offsets span", "needs"]
    if kind == "unknown dtype":
        doc[last]["dtype"] = "F12"
        write_doc(path, doc, body)
        return [last, "unknown dtype 'F12'"]
    if kind == "a tensor listed twice in one header":
        text = json.dumps(doc).encode()
        text = text[:-1] + b", " + json.dumps(first).encode() + b": " + json.dumps(doc[first]).encode() + b"}"
        write_doc(path, text, body)
        return [first, "listed twice"]
    if kind == "header not JSON":
        data = path.read_bytes()
        path.write_bytes(data[:8] + b"\xff" + data[9:])
        return ["not valid JSON"]
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
        return ["past the end", "truncated"]
    if kind == "trailing bytes":
        with path.open("ab") as f:
            f.write(bytes(16))
        return ["16 unindexed bytes after tensor", last]
    raise AssertionError(kind)


# --- convert ------------------------------------------------------------------------------------

def no_leftovers(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")] == []


def names_all(line: str, parts) -> None:
    assert "\n" not in line, line
    missing = [part for part in parts if part not in line]
    assert not missing, (missing, line)


def refused(result, parts, out: Path, warned: int = 0) -> str:
    """One error line naming `parts` (after `warned` warning lines), exit 2, nothing left at OUT."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert all(line.startswith("warning: ") for line in lines[:warned]), result.output
    lines = lines[warned:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    names_all(lines[0], parts)
    no_leftovers(out.parent, out.name)
    return lines[0]


SOURCE_HEADER_CASES = ["header length larger than the file", "header claiming hundreds of MB", "offsets overlap",
                       "offsets leave a hole", "offsets run past the end", "offsets disagree with dtype x shape",
                       "a tensor listed twice in one header"]


@pytest.mark.parametrize("kind", SOURCE_HEADER_CASES)
def test_convert_refuses_a_damaged_source_header(tmp_path, kind):
    src = make_checkpoint(tmp_path / "src", "hf", extra_files=False)
    parts = [str(src / "model.safetensors")] + damage(src / "model.safetensors", kind)
    tracemalloc.start()
    try:
        result = CliRunner().invoke(command, ["--target", "m5", str(src), str(tmp_path / "out")])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    refused(result, parts, tmp_path / "out")
    assert peak < 16_000_000, peak  # a 400 MB claim is refused before anything of its size exists


def test_convert_refuses_the_same_tensor_in_two_shards(tmp_path):
    src = make_checkpoint(tmp_path / "src", "hf", shards=3, extra_files=False)
    weight_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    key = next(iter(weight_map))
    home = weight_map[key]
    other = next(n for n in sorted(set(weight_map.values())) if n != home)
    tensors = mx.load(str(src / other))
    tensors[key] = mx.load(str(src / home))[key]
    mx.save_safetensors(str(src / other), tensors)
    result = CliRunner().invoke(command, ["--target", "generic", str(src), str(tmp_path / "out")])
    first, second = sorted([home, other])
    refused(result, [f"{src}/{second}", repr(key), "also in", first], tmp_path / "out")


def _poison(src: Path, key: str, values: dict) -> None:
    tensors = mx.load(str(src / "model.safetensors"))
    a = tensors[key].astype(mx.float32)
    for (i, j), v in values.items():
        a[i, j] = v
    tensors[key] = a.astype(tensors[key].dtype)
    mx.save_safetensors(str(src / "model.safetensors"), tensors)


@pytest.mark.parametrize("key, target, extra, counts", [
    (UP, "generic", [], "1 NaN and 2 infinite values"),                       # copied as is
    (GATE, "m5", [], "1 NaN and 2 infinite values"),                          # transposed in bands
    (UP, "generic", ["--dtype", "bfloat16"], "1 NaN and 2 infinite values"),  # cast
])
def test_check_finite_names_the_tensor(tmp_path, key, target, extra, counts):
    src = make_checkpoint(tmp_path / "src", "hf", extra_files=False)
    _poison(src, key, {(0, 3): float("nan"), (1, 2): float("inf"), (2, 2): -float("inf")})
    out = tmp_path / "out"
    result = CliRunner().invoke(command, ["--target", target, *extra, "--check-finite", str(src), str(out)])
    refused(result, [f"{src}/model.safetensors", f"tensor {key!r}", counts, "--check-finite"], out)
    # the option is what refuses: without it the same source converts
    assert CliRunner().invoke(command, ["--target", target, *extra, "-q", str(src), str(out)]).exit_code == 0


QPROJ = "model.language_model.layers.1.self_attn.q_proj.weight"


@pytest.mark.parametrize("key, target, extra", [
    (UP, "generic", ["--quantize", "4"]),                          # packed integers hold no NaN
    (UP, "generic", ["--quantize", "8", "--dtype", "bfloat16"]),   # cast, then quantized
    (GATE, "m5", ["--quantize", "4", "--group-size", "32"]),       # a layout that would transpose
    (QPROJ, "cuda", ["--quantize", "4"]),                          # fused with k, v, laurel-left, quantized
    (QPROJ, "cuda", []),                                           # fused, float
])
def test_check_finite_covers_every_write_path(tmp_path, key, target, extra):
    """A NaN must not vanish through --quantize (mx.quantize turns a group's NaN into finite
    scales), nor through a fused projection: the values quantized or stacked are counted."""
    src = make_checkpoint(tmp_path / "src", "hf", extra_files=False)
    _poison(src, key, {(0, 3): float("nan")})
    out = tmp_path / "out"
    result = CliRunner().invoke(command, ["--target", target, *extra, "--check-finite", str(src), str(out)])
    refused(result, [f"{src}/model.safetensors", repr(key), "1 NaN and 0 infinite values", "--check-finite"], out)
    assert CliRunner().invoke(command, ["--target", target, *extra, "-q", str(src), str(out)]).exit_code == 0


MLX_QUANTIZED = "model.language_model.layers.2.mlp.up_proj"


def mlx_quantized_source(path: Path, quantization: dict, nan_in_scales: bool = False) -> Path:
    """A tiny mlx-lm checkpoint with one 4-bit, group-32 module (MLX_QUANTIZED)."""
    from tests.checkpoints import checkpoint_tensors, full_config, tiny_text_config, write_tensors

    tc = tiny_text_config()
    tensors = checkpoint_tensors(tc, "mlx-lm", dtype=mx.bfloat16)
    w, scales, biases = mx.quantize(tensors[MLX_QUANTIZED + ".weight"], group_size=32, bits=4)
    if nan_in_scales:
        scales[1, 1] = float("nan")
    tensors.update({MLX_QUANTIZED + ".weight": w, MLX_QUANTIZED + ".scales": scales,
                    MLX_QUANTIZED + ".biases": biases})
    path.mkdir()
    (path / "config.json").write_text(json.dumps(dict(full_config(tc, "mlx-lm"), quantization=quantization)))
    write_tensors(path, tensors)
    return path


def test_a_quantization_block_mlx_cannot_compute_with_is_refused(tmp_path):
    """The same rule as a manifest record's (manifests/config.py check_quantization)."""
    src = mlx_quantized_source(tmp_path / "src", {"group_size": 32, "bits": 4, "mode": "fp3"})
    result = CliRunner().invoke(command, ["--target", "generic", str(src), str(tmp_path / "out")])
    refused(result, [f"{src}/model.safetensors", f"tensor '{MLX_QUANTIZED}.weight'",
                     "config.json's quantization: mode 'fp3' is not one MLX quantizes with"], tmp_path / "out")


def test_a_quantization_block_without_quantized_tensors_is_refused(tmp_path):
    """Copied with config.json, such a block made a generic bundle that mlx-lm's loader builds
    with quantized layers for float weights (it was converted without a word)."""
    from tests.checkpoints import make_checkpoint

    src = make_checkpoint(tmp_path / "src", "mlx-lm")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(config, quantization={"group_size": 7, "bits": 3})))
    result = CliRunner().invoke(command, ["--target", "generic", str(src), str(tmp_path / "out")])
    refused(result, [f"{src}/config.json: has a quantization block, but no tensor is quantized"], tmp_path / "out")


def test_check_finite_covers_mlx_quantized_pass_through(tmp_path):
    """An MLX-quantized source is copied byte for byte: a NaN in its float scales is counted."""
    module = MLX_QUANTIZED
    src = mlx_quantized_source(tmp_path / "src", {"group_size": 32, "bits": 4, "mode": "affine"}, nan_in_scales=True)
    out = tmp_path / "out"
    result = CliRunner().invoke(command, ["--target", "generic", "--check-finite", str(src), str(out)])
    refused(result, [f"{src}/model.safetensors", f"tensor '{module}.scales'", "1 NaN and 0 infinite values"], out)
    assert CliRunner().invoke(command, ["--target", "generic", "-q", str(src), str(out)]).exit_code == 0


def test_check_finite_catches_overflow_of_a_narrowing_cast(tmp_path):
    src = make_checkpoint(tmp_path / "src", "hf", extra_files=False)
    _poison(src, UP, {(0, 0): 1e6})  # finite in float32, infinite in float16
    out = tmp_path / "out"
    result = CliRunner().invoke(command, ["--target", "generic", "--dtype", "float16", "--check-finite",
                                          str(src), str(out)])
    refused(result, [f"tensor {UP!r}", "0 NaN and 1 infinite values after narrowing F32 to F16"], out,
            warned=1)  # --dtype float16's warning, then the error


def test_out_whose_parent_is_a_file(tmp_path):
    src = make_checkpoint(tmp_path / "src", "hf", extra_files=False)
    (tmp_path / "file").write_text("not a directory")
    out = tmp_path / "file" / "out"
    result = CliRunner().invoke(command, ["--target", "generic", str(src), str(out)])
    assert result.exit_code == 2 and result.output.strip().splitlines() == [
        f"error: {out}: cannot be created, {tmp_path / 'file'} is not a directory"]


def test_out_not_writable(tmp_path):
    """A read-only directory as an ordinary user; as root (who may write anywhere) a read-only
    tmpfs in a private mount namespace of the child."""
    src = make_checkpoint(tmp_path / "src", "hf", extra_files=False)
    ro = tmp_path / "ro"
    ro.mkdir()
    convert = [sys.executable, "-m", "convert", "--target", "generic", str(src), str(ro / "out")]
    if os.geteuid() != 0:
        ro.chmod(0o555)
        r = subprocess.run(convert, capture_output=True, text=True, cwd=REPO)
    else:
        if not shutil.which("unshare") or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
            pytest.skip("root without mount namespaces: no way to make a directory unwritable")
        script = f"mount -t tmpfs -o ro,size=1m tmpfs {ro} && exec \"$@\""
        r = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *convert], capture_output=True, text=True,
                           cwd=REPO)
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == [f"error: {ro / 'out'}: cannot be created, {ro} is not writable"]
    assert list(ro.iterdir()) == []


def _fsize_limit(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so a write past the limit fails with EFBIG
    return apply


def test_disk_filling_up_mid_write(tmp_path):
    """A 1 MB file-size limit stops the 1.8 MB shard mid-write: one line naming the shard inside OUT
    and the tensor being written, nothing at OUT; with --force the previous bundle stays intact."""
    src = make_checkpoint(tmp_path / "src", "hf", extra_files=False)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "convert", "--target", "generic", str(src), str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, preexec_fn=_fsize_limit(1_000_000))
    assert r.returncode == 2, r.stderr
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"error: {out}/model.safetensors: out of disk space or over the file-size limit ("), line
    assert "while writing tensor 'model.language_model." in line and line.endswith(f"; {out} was left as it was")
    no_leftovers(tmp_path, "out")

    convert_checkpoint(src, out, target="generic", max_shard_size="500KB")  # shards small enough to fit
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = subprocess.run(cmd + ["--force"], capture_output=True, text=True, cwd=REPO,
                       preexec_fn=_fsize_limit(1_000_000))
    assert r.returncode == 2 and "out of disk space" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


# --- runtime: load and verify ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hardening")
    src = make_checkpoint(root / "src", "hf", seed=3)
    return convert_checkpoint(src, root / "bundle", target="generic", max_shard_size="700KB")


@pytest.fixture
def bundle(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "bundle", symlinks=True))


def shards(bundle: Path) -> list[Path]:
    return sorted(bundle.glob("model-*.safetensors"))


def edit_index(bundle: Path, name: str) -> str:
    """Point the first tensor of the index at `name`; return that tensor's key."""
    index = json.loads((bundle / "model.safetensors.index.json").read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = name
    (bundle / "model.safetensors.index.json").write_text(json.dumps(index))
    return key


def edit_manifest_text(bundle: Path, edit) -> None:
    """Change manifest.yaml without re-recording its digest (what a stray edit does)."""
    doc = yaml.safe_load((bundle / "manifest.yaml").read_text())
    edit(doc)
    (bundle / "manifest.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def break_bundle(bundle: Path, kind: str) -> tuple:
    """(what a plain load's refusal names, or None where a plain load may succeed, then what each
    of verify's problem lines must name: one list per line)."""
    victim = shards(bundle)[1]
    if kind in ("header length larger than the file", "header claiming hundreds of MB", "offsets overlap",
                "offsets leave a hole", "offsets run past the end", "offsets disagree with dtype x shape",
                "unknown dtype", "a tensor listed twice in one header", "header not JSON", "truncated",
                "trailing bytes"):
        parts = [str(victim)] + damage(victim, kind)
        return parts, parts
    if kind == "the same tensor in two shards":
        first = shards(bundle)[0]
        key = next(iter(mx.load(str(first))))
        tensors = mx.load(str(victim))
        tensors[key] = mx.load(str(first))[key]
        mx.save_safetensors(str(victim), tensors, metadata={"format": "mlx"})
        parts = [str(victim), key, "also in", first.name]
        return parts, parts
    if kind == "index names a missing file":
        edit_index(bundle, "model-00009-of-00009.safetensors")
        return ["model-00009-of-00009.safetensors"], [str(bundle / "model-00009-of-00009.safetensors"), "missing"]
    if kind in ("index names an absolute path", "index names a path with .."):
        outside = bundle.parent / "elsewhere"
        outside.mkdir()
        shutil.copy(victim, outside / victim.name)
        name = str(outside / victim.name) if "absolute" in kind else f"../elsewhere/{victim.name}"
        edit_index(bundle, name)
        parts = ["model.safetensors.index.json", repr(name), "outside the bundle"]
        return parts, parts
    if kind == "a shard symlinked outside the bundle":
        outside = bundle.parent / "elsewhere"
        outside.mkdir()
        victim.rename(outside / victim.name)
        victim.symlink_to(outside / victim.name)
        parts = [str(victim), "symlink", str(outside / victim.name), "outside the bundle"]
        return parts, parts
    if kind == "manifest of a newer format":
        edit_manifest_text(bundle, lambda m: m.update(format_version=FORMAT_VERSION + 1))
        parts = ["manifest.yaml", f"format_version {FORMAT_VERSION + 1}", "upgrade mlx-prepared"]
        return parts, parts
    if kind == "manifest of another architecture":
        edit_manifest_text(bundle, lambda m: m["model"].update(architecture="llama"))
        parts = ["manifest.yaml", "model.architecture", "'gemma3n'", "'llama'"]
        return parts, parts
    if kind == "an edited manifest":
        edit_manifest_text(bundle, lambda m: m["tool"].update(version="9.9.9"))
        return None, [str(bundle / "manifest.yaml"), "sha256 differs from manifest.sha256"]
    if kind == "a flipped byte":
        data = bytearray(victim.read_bytes())
        data[-5] ^= 0x10
        victim.write_bytes(bytes(data))
        return None, [str(victim), "sha256 differs from manifest.yaml"]
    if kind == "swapped shards":
        first = shards(bundle)[0]
        tmp = bundle / "swap"
        first.rename(tmp)
        victim.rename(first)
        tmp.rename(victim)
        return None, [str(first)], [str(victim)]
    raise AssertionError(kind)


RUNTIME_CASES = ["truncated", "header length larger than the file", "header claiming hundreds of MB",
                 "header not JSON", "offsets overlap", "offsets leave a hole", "offsets run past the end",
                 "trailing bytes", "offsets disagree with dtype x shape", "unknown dtype",
                 "a tensor listed twice in one header", "the same tensor in two shards",
                 "index names a missing file", "index names an absolute path", "index names a path with ..",
                 "a shard symlinked outside the bundle", "manifest of a newer format",
                 "manifest of another architecture", "an edited manifest", "a flipped byte", "swapped shards"]


@pytest.mark.parametrize("kind", RUNTIME_CASES)
def test_runtime_refuses_a_damaged_bundle(bundle, kind, monkeypatch):
    load_parts, *verify_lines = break_bundle(bundle, kind)

    # verify: every way the bundle differs, one line each; the expected one among them
    try:
        problems = verify_bundle(bundle)
    except ManifestError as e:  # a manifest it cannot read at all: one line, as verify_command prints it
        problems = [str(e)]
    assert all("\n" not in p for p in problems), problems
    for parts in verify_lines:
        assert any(all(part in p for part in parts) for p in problems), (parts, problems)

    # load(verify=True): refused before a model is built
    import runtime.model

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built from a bundle that fails verification")

    with monkeypatch.context() as m:
        m.setattr(runtime.model, "Model", no_model)
        with pytest.raises(ManifestError) as e:
            load_quietly(bundle, verify=True)
    assert "\n" not in str(e.value)

    # a plain load refuses what would give wrong weights or read outside the bundle (a manifest it
    # cannot take is a ManifestError, anything else about the bundle a BundleError, its subclass)
    if load_parts is None:
        load_quietly(bundle)
        return
    with pytest.raises(ManifestError if kind.startswith("manifest") else BundleError) as e:
        load_quietly(bundle)
    names_all(str(e.value), load_parts)


def test_a_bundle_without_its_manifest_digest(bundle, capsys):
    """manifest.sha256 is additive (format_version 1 without it is valid): verify passes the
    files and says the manifest itself went unchecked; a malformed digest file is a problem."""
    (bundle / "manifest.sha256").unlink()
    assert verify_bundle(bundle) == []
    assert verify_command(bundle) == 0
    assert "no manifest.sha256: manifest.yaml itself is unchecked" in capsys.readouterr().out
    (bundle / "manifest.sha256").write_text("not a digest\n")
    assert verify_bundle(bundle) == [f"{bundle / 'manifest.sha256'}: not a '<sha256>  manifest.yaml' line"]


def run_runtime(*args):
    env = {k: v for k, v in os.environ.items() if k not in ("MTL_CAPTURE_ENABLED", "MLX_PREPARED_CAPTURE_DECODE")}
    return subprocess.run([sys.executable, "-m", "runtime", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)


def errors(r) -> list[str]:
    assert "Traceback" not in r.stderr, r.stderr
    return [line for line in r.stderr.splitlines() if line.startswith("error:")]


def test_the_runtime_cli_refuses_an_edited_manifest_with_verify(bundle):
    edit_manifest_text(bundle, lambda m: m["tool"].update(version="9.9.9"))
    r = run_runtime("verify", bundle)
    assert r.returncode == 1
    assert r.stderr.splitlines() == [f"{bundle / 'manifest.yaml'}: sha256 differs from manifest.sha256 "
                                     "(edited after conversion)"]
    for command_ in (["generate", bundle, "--prompt", "hi", "--verify"], ["chat", bundle, "--verify"],
                     ["bench", bundle, "--verify"]):
        r = run_runtime(*command_)
        assert r.returncode == 2 and errors(r) == [f"error: {bundle / 'manifest.yaml'}: sha256 differs from "
                                                   "manifest.sha256 (edited after conversion)"], r.stderr
        assert r.stdout.strip() == ""


def test_the_runtime_cli_names_a_damaged_shard(bundle):
    victim = shards(bundle)[0]
    damage(victim, "offsets overlap")
    r = run_runtime("generate", bundle, "--prompt", "hi")
    (line,) = errors(r)
    assert r.returncode == 2 and line.startswith(f"error: {victim}: malformed safetensors header (tensor ")
    assert "overlaps" in line
    r = run_runtime("verify", bundle)
    assert r.returncode == 1 and any(line.startswith(f"{victim}: malformed") for line in r.stderr.splitlines())
