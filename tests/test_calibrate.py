"""`runtime calibrate`: measured GEMV times -> a target profile the converter reads.

The layout rule is checked with an injected timer (so either outcome can be forced); the real
timer runs once at tiny shapes through the real command, and its profile must say what its own
measurements say.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from convert.gemma3n import expected_tensors, projection_role
from manifests.format import PRETRANSPOSED, STANDARD
from manifests.profiles import (
    PROFILE_DIR_ENV,
    ProfileError,
    load_profile,
    load_profile_file,
    save_user_profile,
    saved_profile_for_device,
    user_profile_dir,
    user_profile_path,
)
from runtime.calibrate import (
    CALIBRATED_ROLES,
    DEFAULT_CONFIGS,
    Settings,
    calibrate,
    choose,
    merge_shapes,
    profile_text,
    role_shapes,
)
from tests.checkpoints import make_checkpoint, tiny_text_config

CPU = {"architecture": "x86_64", "device_name": "AMD EPYC"}


def fake_timer(faster: dict[tuple[str, str], float]):
    """Standard takes 1 ms per GEMV; pretransposed takes `ratio` ms for (role-by-shape, dtype)."""
    calls = []

    def measure(shape, dtype):
        calls.append((shape, dtype))
        ratio = faster.get((shape, dtype), 1.0)
        out = {}
        for layout, base in ((STANDARD, 1e-3), (PRETRANSPOSED, 1e-3 * ratio)):
            out[layout] = [base * 1.1, base, base * 0.95]  # median is `base`
        return out

    return measure, calls


def test_role_shapes_agree_with_the_converters_tensor_list():
    cfg = tiny_text_config()
    shapes = role_shapes(cfg)
    seen: dict[str, set] = {}
    for name, shape in expected_tensors(cfg).items():
        role = projection_role(name[: -len(".weight")]) if name.endswith(".weight") else None
        if role in CALIBRATED_ROLES:
            seen.setdefault(role, set()).add(tuple(shape))
    seen["lm_head"] = {tuple(expected_tensors(cfg)["embed_tokens.weight"])}
    assert {r: set(s) for r, s in shapes.items()} == seen


def test_default_shapes_cover_e2b_and_e4b_mlp_sizes():
    shapes = merge_shapes(DEFAULT_CONFIGS.values())
    assert shapes["mlp.gate_proj"] == [(8192, 2048), (16384, 2048)]
    assert shapes["mlp.down_proj"] == [(2048, 8192), (2048, 16384)]
    assert shapes["lm_head"] == [(262400, 2048)]
    assert shapes["per_layer_model_projection"] == [(30 * 256, 2048), (35 * 256, 2048)]


@pytest.mark.parametrize("ratio, expected", [(0.5, PRETRANSPOSED), (2.0, STANDARD), (0.99, STANDARD)])
def test_layout_follows_the_measured_times(ratio, expected, tmp_path):
    shapes = {"mlp.gate_proj": [(128, 64)], "lm_head": [(320, 64)]}
    measure, calls = fake_timer({((128, 64), "float32"): ratio})
    profile = calibrate(shapes, ["float32", "bfloat16"], measure=measure, info=CPU)
    assert profile["layouts"]["mlp.gate_proj"]["float32"] == expected
    # Everything else measured equal: a tie keeps the layout that needs no conversion.
    assert profile["layouts"]["mlp.gate_proj"]["bfloat16"] == STANDARD
    assert profile["layouts"]["lm_head"] == {"float32": STANDARD, "bfloat16": STANDARD, "default": STANDARD}
    assert len(calls) == 2 * 2  # roles x dtypes, both layouts per call
    row = profile["measurements"]["mlp.gate_proj"]["float32"][0]
    assert row["standard_us"] == pytest.approx(1000.0)
    assert row["pretransposed_us"] == pytest.approx(1000.0 * ratio)

    path = tmp_path / "p.yaml"
    path.write_text(profile_text(profile))
    loaded = load_profile_file(path)
    assert loaded.layout_for("mlp.gate_proj", "float32") == expected
    assert loaded.layout_for("mlp.gate_proj", "float16") == STANDARD  # not measured
    assert loaded.content["device"] == CPU
    assert loaded.content["device_class"] == "cpu-x86_64"
    assert loaded.content["mlx_version"]
    # GEMV timing cannot decide fusion: the calibrated profile keeps its device class's groups.
    assert loaded.fuse == load_profile("cpu-x86_64").fuse != ()


def test_a_role_with_several_shapes_is_decided_on_their_total():
    shapes = {"mlp.up_proj": [(8, 4), (16, 4)]}
    # Small shape 2x faster pretransposed, large one 3x slower: the total says standard.
    measure, _ = fake_timer({((8, 4), "float32"): 0.5, ((16, 4), "float32"): 3.0})
    assert calibrate(shapes, ["float32"], measure=measure, info=CPU)["layouts"]["mlp.up_proj"]["float32"] == STANDARD
    measure, _ = fake_timer({((8, 4), "float32"): 0.5, ((16, 4), "float32"): 0.9})
    layouts = calibrate(shapes, ["float32"], measure=measure, info=CPU)["layouts"]
    assert layouts["mlp.up_proj"]["float32"] == PRETRANSPOSED


def test_choose_margin():
    assert choose(1.0, 0.96, 0.03) == PRETRANSPOSED
    assert choose(1.0, 0.98, 0.03) == STANDARD
    assert choose(1.0, 0.98, 0.0) == PRETRANSPOSED


def test_real_timer_through_the_command_writes_a_profile_that_follows_its_measurements(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", "hf")
    out = tmp_path / "calibrated.yaml"
    r = subprocess.run(
        [sys.executable, "-m", "runtime.calibrate", "--config", str(ckpt), "--dtype", "float32",
         "--role", "mlp.gate_proj", "--role", "lm_head", "--repeats", "2", "--cache-mb", "1",
         "--out", str(out), "--quiet"],
        capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    profile = load_profile_file(out)
    content = profile.content
    assert set(content["layouts"]) == {"mlp.gate_proj", "lm_head"}
    assert content["measurements"]["mlp.gate_proj"]["float32"][0]["shape"] == [128, 64]
    assert content["measurements"]["lm_head"]["float32"][0]["shape"] == [320, 64]
    margin = content["calibration"]["margin"]
    for role, per_dtype in content["measurements"].items():
        rows = per_dtype["float32"]
        std = sum(r["standard_us"] for r in rows)
        pre = sum(r["pretransposed_us"] for r in rows)
        assert std > 0 and pre > 0
        assert profile.layout_for(role, "float32") == choose(std, pre, margin)


def test_command_refuses_a_config_that_is_not_gemma3n(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    r = subprocess.run([sys.executable, "-m", "runtime.calibrate", "--config", str(cfg), "--quiet"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "llama" in r.stderr and str(cfg) in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("kind, says", [("fifo", "a FIFO, not a regular file"), ("huge int", "not valid JSON (Exceeds"),
                                        ("nested", "not valid JSON (nested too deeply)")])
def test_command_refuses_a_config_file_it_cannot_read_in_one_line(tmp_path, kind, says):
    """--config through the small-file door and the one JSON parser: a FIFO blocked forever, an
    integer of 5000 digits and nesting 100 000 deep were tracebacks."""
    import os

    cfg = tmp_path / "config.json"
    if kind == "fifo":
        os.mkfifo(cfg)
    else:
        cfg.write_text('{"a": ' + "9" * 5000 + "}" if kind == "huge int" else "[" * 100_000 + "]" * 100_000)
    r = subprocess.run([sys.executable, "-m", "runtime.calibrate", "--config", str(cfg), "--quiet"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and says in r.stderr and str(cfg) in r.stderr


@pytest.mark.parametrize("option", ["--margin", "--placement-floor"])
def test_command_refuses_nan_for_a_fraction(option):
    """click's FloatRange lets NaN through: --margin nan chose standard for every role and wrote
    `margin: .nan` into the profile, after the whole measurement."""
    r = subprocess.run([sys.executable, "-m", "runtime.calibrate", option, "nan", "--quiet"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == f"error: {option} must be a number, got nan", r.stderr


@pytest.mark.parametrize("option, value, bound", [("--repeats", "10000000000", "1<=x<=1000"),
                                                  ("--cache-mb", "99999999", "1<=x<=65536")])
def test_command_bounds_its_counts(option, value, bound):
    """--repeats 10**10 was accepted and would have measured for ever; --cache-mb without bound
    asked for that much memory."""
    r = subprocess.run([sys.executable, "-m", "runtime.calibrate", option, value, "--quiet"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == (f"error: Invalid value for '{option}': {value} is not in the "
                                                      f"range {bound}."), r.stderr


@pytest.mark.parametrize("where", ["out: no such parent", "save: dir is a file", "save: ~nosuchuser"])
def test_command_that_cannot_write_its_profile_says_so_in_one_line(tmp_path, where):
    """--out into a missing directory, --save where the profile directory is a file or names an
    unknown user's home: FileNotFoundError, FileExistsError and ProfileError tracebacks, after
    the whole measurement."""
    import os

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "gemma3n", "text_config": tiny_text_config()}))
    (tmp_path / "a-file").write_text("x")
    env = dict(os.environ)
    args = [sys.executable, "-m", "runtime.calibrate", "--config", str(cfg), "--role", "lm_head",
            "--repeats", "1", "--cache-mb", "1", "--quiet"]
    if where.startswith("out"):
        args += ["--out", str(tmp_path / "nope" / "p.yaml")]
    else:
        args += ["--save"]
        env[PROFILE_DIR_ENV] = str(tmp_path / "a-file") if "file" in where else "~no-such-user-here/p"
    r = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("error: ")


def test_user_profile_dir_lookup(tmp_path, monkeypatch):
    monkeypatch.setenv(PROFILE_DIR_ENV, str(tmp_path / "profiles"))
    assert user_profile_dir() == tmp_path / "profiles"
    assert saved_profile_for_device(CPU) is None  # no directory yet

    measure, _ = fake_timer({((320, 64), "float32"): 0.5})
    profile = calibrate({"lm_head": [(320, 64)]}, ["float32"], measure=measure, info=CPU)
    path = save_user_profile(profile_text(profile), CPU)
    assert path == user_profile_path(CPU) and path.parent == tmp_path / "profiles"

    found = saved_profile_for_device(dict(CPU, memory_size=123))
    assert found is not None and found.layout_for("lm_head", "float32") == PRETRANSPOSED
    # Exact device match only: another name or another architecture is not this device.
    assert saved_profile_for_device({"architecture": "x86_64", "device_name": "Intel Xeon"}) is None
    assert saved_profile_for_device({"architecture": "aarch64", "device_name": "AMD EPYC"}) is None
    assert saved_profile_for_device({}) is None


def test_a_profile_dir_naming_an_unknown_user_is_a_profile_error(monkeypatch):
    monkeypatch.setenv(PROFILE_DIR_ENV, "~no-such-user-here/profiles")
    with pytest.raises(ProfileError, match=PROFILE_DIR_ENV):
        user_profile_dir()
    with pytest.raises(ProfileError, match=PROFILE_DIR_ENV):
        saved_profile_for_device(CPU)


def test_user_profile_dir_defaults_under_xdg_config(tmp_path, monkeypatch):
    monkeypatch.delenv(PROFILE_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert user_profile_dir() == tmp_path / "mlx-prepared" / "profiles"


def test_a_malformed_saved_profile_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv(PROFILE_DIR_ENV, str(tmp_path))
    bad = tmp_path / "broken.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "layouts": {"mlp.gate_proj": "sideways"}}))
    with pytest.raises(ProfileError, match="broken.yaml"):
        saved_profile_for_device(CPU)
    with pytest.raises(ProfileError):
        save_user_profile("name: y\nlayouts: {nope: standard}\n", CPU)



@pytest.mark.parametrize("dtype, expected", [("float32", PRETRANSPOSED), ("bfloat16", STANDARD)])
def test_a_calibrated_profile_converts_a_bundle_whose_layouts_follow_it(tmp_path, dtype, expected):
    # Measured: gate_proj 2x faster pretransposed in float32 only; lm_head slower pretransposed.
    cfg = tiny_text_config()
    shapes = {role: s for role, s in role_shapes(cfg).items() if role in ("mlp.gate_proj", "lm_head")}
    timings = {(s, "float32"): 0.5 for s in shapes["mlp.gate_proj"]}
    timings.update({(s, d): 2.0 for s in shapes["lm_head"] for d in ("float32", "bfloat16")})
    measure, _ = fake_timer(timings)
    profile_path = tmp_path / "calibrated.yaml"
    profile_path.write_text(profile_text(calibrate(shapes, ["float32", "bfloat16"], measure=measure, info=CPU)))

    ckpt, out = make_checkpoint(tmp_path / "ckpt", "hf"), tmp_path / "bundle"
    r = subprocess.run([sys.executable, "-m", "convert", "--target-profile", str(profile_path), "--dtype", dtype,
                        "--quiet", str(ckpt), str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    manifest = yaml.safe_load((out / "manifest.yaml").read_text())
    layouts = {p: rec["layout"] for p, rec in manifest["projections"].items()}
    # The CPU class fuses gate/up where both share a layout (bfloat16 here); otherwise they stay apart.
    gates = [layout for p, layout in layouts.items() if p.endswith(("mlp.gate_proj", "mlp.gate_up_proj"))]
    assert len(gates) == cfg["num_hidden_layers"] and set(gates) == {expected}
    assert layouts["lm_head"] == STANDARD
    ups = {layout for p, layout in layouts.items() if p.endswith(("mlp.up_proj", "mlp.gate_up_proj"))}
    assert ups == {STANDARD}
    assert any(p.endswith("gate_up_proj") for p in layouts) == (expected == STANDARD)
    assert manifest["target"]["name"] == "calibrated-x86-64-amd-epyc"


# -- the placement of the per-layer embedding table (with a bundle) ------------------------------

@pytest.fixture(scope="module")
def ple_bundles(tmp_path_factory):
    from tests.runtime_helpers import convert

    root = tmp_path_factory.mktemp("calibrate-ple")
    src = make_checkpoint(root / "src", "hf", seed=6)
    q4 = ("--quantize", "4", "--group-size", "32")
    return {"resident": convert(src, root / "resident", "generic"),
            "q4-mapped": convert(src, root / "q4-mapped", "generic", "--ple", "mapped", *q4)}


@pytest.mark.parametrize("name", ["resident", "q4-mapped"])
def test_both_placements_are_made_from_the_bundle_and_compute_the_same(ple_bundles, name):
    import mlx.core as mx

    from manifests.format import MAPPED, RESIDENT
    from runtime.calibrate import placement_tables
    from runtime.mapped import MappedTable
    from tests.runtime_helpers import load_quietly

    model, _ = load_quietly(ple_bundles[name])
    tables = placement_tables(model)
    assert isinstance(tables[MAPPED], MappedTable) and not isinstance(tables[RESIDENT], MappedTable)
    every = mx.arange(256)
    assert mx.array_equal(tables[RESIDENT](every), tables[MAPPED](every)).item()


@pytest.mark.parametrize("mapped_rate, expected", [(95.0, "mapped"), (80.0, "resident")])
def test_the_placement_follows_the_measured_rates(ple_bundles, mapped_rate, expected):
    from runtime.calibrate import measure_placement
    from runtime.mapped import MappedTable
    from tests.runtime_helpers import load_quietly

    model, _ = load_quietly(ple_bundles["q4-mapped"])
    original = model.model.language_model.embed_tokens_per_layer
    seen = []

    def rate(m, tokens, prompt):  # resident 100 tok/s, mapped `mapped_rate`
        mapped = isinstance(m.model.language_model.embed_tokens_per_layer, MappedTable)
        seen.append(mapped)
        return mapped_rate if mapped else 100.0

    result = measure_placement(model, Settings(placement_rounds=2), rate=rate)
    assert result["per_layer_embeddings"] == expected
    assert result["measurement"]["ratio"] == pytest.approx(mapped_rate / 100)
    assert seen.count(True) == seen.count(False) == 3  # a warm-up and two rounds each, alternating
    assert model.model.language_model.embed_tokens_per_layer is original  # put back


def test_calibrate_with_a_bundle_writes_the_placement_it_measured(ple_bundles, tmp_path):
    from runtime.calibrate import choose_placement

    out = tmp_path / "p.yaml"
    cmd = [sys.executable, "-m", "runtime", "calibrate", "--config", str(ple_bundles["q4-mapped"]), "--role",
           "lm_head", "--repeats", "1", "--cache-mb", "8", "--quiet", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    profile = load_profile_file(out)
    m = profile.content["placement_measurement"]
    assert profile.per_layer_embeddings == choose_placement(m["resident_tok_s"], m["mapped_tok_s"], m["floor"])
    assert m["resident_tok_s"] > 0 and m["mapped_tok_s"] > 0 and "Per-layer embeddings" in profile.content["evidence"]
    done = subprocess.run(cmd + ["--no-placement"], capture_output=True, text=True)
    assert done.returncode == 0 and "per_layer_embeddings" not in yaml.safe_load(out.read_text())


def test_progress_counts_rows_and_estimates_the_time_left():
    """Each row measured is one stderr line: its number of the total and the time left, from the
    mean row so far (a clock that advances 10 s per row here; 60 s on the third)."""
    from runtime.calibrate import calibrate

    shapes = {"mlp.gate_proj": [(128, 64), (256, 64)], "lm_head": [(320, 64)]}
    measure, _ = fake_timer({})
    now = [0.0]

    def timed(shape, dtype):
        now[0] += 60.0 if shape == (320, 64) else 10.0
        return measure(shape, dtype)

    lines = []
    calibrate(shapes, ["float32"], measure=timed, info=CPU, progress=lines.append, clock=lambda: now[0])
    assert [(line[:5], line.split("  ")[-1]) for line in lines] == [
        ("[1/3]", "about 20 s left"), ("[2/3]", "about 10 s left"), ("[3/3]", "done in 80 s")]
    assert "mlp.gate_proj" in lines[0] and "(256, 64)" in lines[1] and "lm_head" in lines[2]


def test_help_says_how_long_the_defaults_take():
    """The numbers `runtime calibrate --help` gives are the ones the defaults measure."""
    from runtime.calibrate import DEFAULT_DTYPES, Settings, calibrate_command, streamed_bytes

    rows = sum(len(s) for s in merge_shapes(DEFAULT_CONFIGS.values()).values()) * len(DEFAULT_DTYPES)
    text = " ".join(calibrate_command.help.split())
    assert f"streams about {streamed_bytes(Settings()) / 1e9:.1f} GB of weights" in text  # 7.0
    assert f"The defaults measure {rows} rows" in text and "minutes" in text


def test_cli_progress_goes_to_stderr_one_line_per_row(tmp_path):
    r = subprocess.run([sys.executable, "-m", "runtime", "calibrate", "--role", "attn.k_proj", "--role",
                        "attn.v_proj", "--dtype", "float32", "--cache-mb", "1", "--repeats", "1", "--out",
                        str(tmp_path / "p.yaml")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout == "", r.stderr
    lines = r.stderr.splitlines()
    assert "2 rows (role, shape, dtype), each streaming 10 MB of weights" in lines[0]  # 2 x ((1 + 1) x 2 + 1) MiB
    assert lines[1].startswith("[1/2] attn.k_proj") and " left" in lines[1]
    assert lines[2].startswith("[2/2] attn.v_proj") and "  done in " in lines[2]
