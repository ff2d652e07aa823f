"""Property test (hypothesis): mutated config.json and manifest values never crash either program.

Each example changes one or two values of a tiny checkpoint's config.json (its text config) or of
a converted bundle's manifest.yaml (whose digest is then recorded again, as a careful editor
would): a type, a sign, zero, a huge number, NaN or infinity, a list of the wrong length, a field
deleted. Then it runs the real command:

- `convert --target generic SRC OUT`: exit 0, or exit 2 with one `error:` line. When it succeeds,
  `runtime generate OUT` must succeed as well: convert never writes a bundle the runtime cannot
  load.
- `runtime generate BUNDLE --prompt hi`: exit 0, or exit 2 with one `error:` line.

Never a traceback, never a signal (the worker process would die), never a hang (each command gets
TIMEOUT seconds), never an allocation beyond the bounds: the worker runs under an address-space
limit (RLIMIT_AS, ADDRESS_LIMIT), so an attempt to allocate gigabytes fails there, and its peak
resident memory must stay under RSS_LIMIT.

The commands run in one long-lived child (tests/cli_worker.py) through the same entry the
programs use, so an example costs a fraction of a second instead of an interpreter start. Example
counts are fixed and derandomized (CI runs the same examples every time): FUZZ_SCALE multiplies
them and FUZZ_RANDOM=1 draws new ones, as in tests/test_fuzz.py.
"""

from __future__ import annotations

import json
import math
import os
import resource
import select
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from manifests import manifest_digest_line
from manifests.config import DEFAULTS, REQUIRED
from tests.runtime_helpers import convert, text_checkpoint

REPO = Path(__file__).resolve().parents[1]
SCALE = float(os.environ.get("FUZZ_SCALE", "1"))
CONFIG_EXAMPLES = int(24 * SCALE)
MANIFEST_EXAMPLES = int(40 * SCALE)
TIMEOUT = 60  # seconds per command: far above the second a tiny one takes, far below a hang
ADDRESS_LIMIT = 3 << 30  # the worker's whole address space (Python, MLX and threads take ~0.6 GB)
RSS_LIMIT = 1 << 30  # the worker's peak resident memory after any example

FIELDS = sorted(set(REQUIRED) | set(DEFAULTS) | {"tie_word_embeddings", "model_type", "max_position_embeddings"})
LIST_FIELDS = ("intermediate_size", "layer_types", "activation_sparsity_pattern")

SPECIAL = [0, -1, 1, 2, 3, 7, 8, 64, 255, 2**31, 2**63, -(2**63), 10**30, math.nan, math.inf, -math.inf, 0.0,
           -0.5, 0.5, 1.0, 1e-300, 1e300, True, False, None, "", "64", "nan", "full_attention",
           "sliding_attention", "gelu_new", "default", [], {}, {"rope_type": "default"},
           {"rope_theta": math.nan}, {"full_attention": {"rope_theta": -1}}, [64] * 10, [[1]]]
VALUES = st.one_of(
    st.sampled_from(SPECIAL),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.one_of(st.integers(-4, 300), st.floats(-2, 2), st.sampled_from(["full_attention", "sliding_attention"])),
             max_size=14),
    st.dictionaries(st.text(max_size=6), st.one_of(st.integers(-5, 10**6), st.floats(), st.text(max_size=4)),
                    max_size=3),
)


def near(value) -> list:
    """Values one edit away from `value`: its sign flipped, zero, one off, huge, NaN or infinite,
    the same number as another type, wrapped in a list, None. A random value rarely lands on a
    boundary; these do, so a fixed number of examples covers each field's edges."""
    if isinstance(value, bool):
        return [not value, 0, 1, "true", None, [value]]
    if isinstance(value, int):
        return [0, -value, -1, value - 1, value + 1, 2 * value, 10**12, 2**63, math.nan, math.inf, float(value),
                str(value), [value], None, True]
    if isinstance(value, float):
        return [0.0, -value, math.nan, math.inf, -math.inf, 1e300, 1e-300, 1.0, str(value), [value], None, 1]
    if isinstance(value, str):
        return ["", value + "x", value.upper(), 0, None, [value]]
    if isinstance(value, list):
        return [[], value[:-1], value + value[-1:], [None] * len(value), [str(v) for v in value],
                value[0] if value else 0, None, {"0": value}]
    if isinstance(value, dict):  # one of its entries made wrong, or the whole of it
        return [{}, None, [], "x"] + [dict(value, **{k: bad}) for k in value for bad in ("x", -1, None, 0, 10**12)]
    return [{}, "x", 0, math.nan, {"rope_type": "x"}, {"rope_theta": 0}, {"bits": 4, "group_size": 0, "mode": "affine"},
            {"bits": 0, "group_size": 64, "mode": "affine"}, {"bits": 4, "group_size": 64, "mode": "x"}]


def text_mutation():
    """One change to a text config: move a field's value one edit away (`near`), set it to an
    arbitrary value, delete it, or change one entry or the length of a per-layer list."""
    return st.one_of(
        st.tuples(st.just("near"), st.sampled_from(FIELDS), st.integers(0, 15)),
        st.tuples(st.just("near"), st.sampled_from(FIELDS), st.integers(0, 15)),
        st.tuples(st.just("set"), st.sampled_from(FIELDS), VALUES),
        st.tuples(st.just("delete"), st.sampled_from(FIELDS), st.none()),
        st.tuples(st.just("element"), st.sampled_from(LIST_FIELDS), st.tuples(st.integers(0, 9), VALUES)),
        st.tuples(st.just("resize"), st.sampled_from(LIST_FIELDS), st.integers(0, 12)),
    )


def apply_text(config: dict, mutation) -> None:
    kind, field, value = mutation
    if kind == "near":
        options = near(config.get(field, DEFAULTS.get(field)))
        config[field] = options[value % len(options)]
    elif kind == "set":
        config[field] = value
    elif kind == "delete":
        config.pop(field, None)
    elif isinstance(config.get(field), list):
        if kind == "element":
            i, v = value
            if config[field]:
                config[field][i % len(config[field])] = v
        else:
            config[field] = (config[field] * 2)[:value] if config[field] else [1] * value


# Manifest values besides the text config that the runtime reads.
Q = "model.language_model.layers.0.self_attn.q_proj"
E = "model.language_model.embed_tokens"
MANIFEST_PATHS = [("projections", "lm_head", "shape"), ("projections", Q, "shape"), ("projections", Q, "dtype"),
                  ("projections", Q, "layout"), ("projections", Q, "quantized"), ("projections", Q, "key"),
                  ("projections", Q, "bias"), ("embeddings", E, "shape"), ("embeddings", E, "dtype"),
                  ("embeddings", E, "quantized"), ("model", "eos_token_ids"), ("target", "profile"),
                  ("target", "name"), ("target", "profile", "device"), ("target", "profile", "device_class"),
                  ("files", "model.safetensors", "bytes"), ("dtype",)]


def manifest_mutation():
    return st.one_of(
        st.tuples(st.just("text"), text_mutation()),
        st.tuples(st.just("near"), st.tuples(st.sampled_from(MANIFEST_PATHS), st.integers(0, 40))),
        st.tuples(st.just("set"), st.tuples(st.sampled_from(MANIFEST_PATHS), VALUES)),
    )


def apply_manifest(doc: dict, mutation) -> None:
    kind, change = mutation
    if kind == "text":
        apply_text(doc["model"]["text_config"], change)
        return
    path, value = change
    where = doc
    for key in path[:-1]:
        where = where[key]
    if kind == "near":
        options = near(where.get(path[-1]))
        value = options[value % len(options)]
    where[path[-1]] = value


class Worker:
    """tests/cli_worker.py in a child under RLIMIT_AS; `run` answers one command or fails."""

    def __init__(self):
        self.proc = None
        self.start()

    def start(self):
        def limit():
            resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_LIMIT, ADDRESS_LIMIT))

        env = {k: v for k, v in os.environ.items() if k not in ("MTL_CAPTURE_ENABLED", "MLX_PREPARED_CAPTURE_DECODE")}
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.cli_worker"], cwd=REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     preexec_fn=limit, text=True, bufsize=1)

    def run(self, program: str, argv: list[str]) -> dict:
        self.proc.stdin.write(json.dumps({"program": program, "argv": argv}) + "\n")
        self.proc.stdin.flush()
        while True:
            ready, _, _ = select.select([self.proc.stdout], [], [], TIMEOUT)
            if not ready:
                self.proc.kill()
                self.proc.wait()
                self.start()
                raise AssertionError(f"{program} {argv}: no answer within {TIMEOUT} s (a hang)")
            line = self.proc.stdout.readline()
            if not line:
                code = self.proc.wait()
                err = self.proc.stderr.read()[-2000:]
                self.start()
                raise AssertionError(f"{program} {argv}: the process died (exit {code}, a signal if "
                                     f"negative): {err}")
            if line.startswith("@@result "):
                return json.loads(line[len("@@result "):])

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("config-fuzz")
    src = text_checkpoint(root / "src")
    # the manifest's records are quantized ones, whose bits, group size and mode the runtime reads too
    return {"src": src, "bundle": convert(src, root / "bundle", "generic", "--quantize", "4", "--group-size", "32")}


def linked_copy(src: Path, dst: Path, except_: tuple[str, ...]) -> Path:
    """`src`'s files hard-linked into `dst` (nothing copied), but for the ones to be rewritten."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in except_:
            os.link(f, dst / f.name)
    return dst


def judged(result: dict, what: str, prefix: str) -> int:
    """The exit code, once the property holds: 0, or 2 with exactly one error line."""
    assert result["traceback"] is None, f"{what}: a traceback\n{result['traceback']}"
    assert result["peak_rss"] < RSS_LIMIT, f"{what}: peak resident memory {result['peak_rss']} bytes"
    code, lines = result["code"], result["stderr"].splitlines()
    errors = [line for line in lines if line.startswith(prefix)]
    if code == 0:
        assert not errors, (what, lines)
        return 0
    assert code == 2, (what, code, lines)
    assert len(errors) == 1 and lines[-1] == errors[0], (what, lines)
    others = [line for line in lines[:-1] if not line.startswith("warning:")]
    assert not others, (what, lines)
    return 2


def fuzz(examples: int):
    return settings(max_examples=examples, deadline=None, derandomize=not os.environ.get("FUZZ_RANDOM"),
                    database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@fuzz(CONFIG_EXAMPLES)
@given(mutations=st.lists(text_mutation(), min_size=1, max_size=2))
def test_mutated_config_json_converts_or_is_one_line(worker, base, mutations):
    with tempfile.TemporaryDirectory(dir=base["src"].parent) as tmp:
        src = linked_copy(base["src"], Path(tmp) / "src", ("config.json",))
        config = json.loads((base["src"] / "config.json").read_text())
        for m in mutations:
            apply_text(config["text_config"], m)
        (src / "config.json").write_text(json.dumps(config))
        out = Path(tmp) / "out"
        what = f"convert with {mutations}"
        code = judged(worker.run("convert", ["--target", "generic", "-q", str(src), str(out)]), what, "error: ")
        if code == 0:  # convert never writes a bundle the runtime cannot load
            result = worker.run("runtime", ["generate", str(out), "--prompt", "hi", "--max-tokens", "3"])
            assert judged(result, f"generate after {what}", "error: ") == 0, result["stderr"]
        else:
            assert not out.exists()


@fuzz(MANIFEST_EXAMPLES)
@given(mutations=st.lists(manifest_mutation(), min_size=1, max_size=2))
def test_mutated_manifest_values_load_or_are_one_line(worker, base, mutations):
    with tempfile.TemporaryDirectory(dir=base["bundle"].parent) as tmp:
        bundle = linked_copy(base["bundle"], Path(tmp) / "bundle", ("manifest.yaml", "manifest.sha256"))
        doc = yaml.safe_load((base["bundle"] / "manifest.yaml").read_text())
        for m in mutations:
            apply_manifest(doc, m)
        data = yaml.safe_dump(doc, sort_keys=False).encode()
        (bundle / "manifest.yaml").write_bytes(data)
        (bundle / "manifest.sha256").write_text(manifest_digest_line(data))
        result = worker.run("runtime", ["generate", str(bundle), "--prompt", "hi", "--max-tokens", "3"])
        judged(result, f"generate with {mutations}", "error: ")
