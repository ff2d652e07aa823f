"""Property tests (hypothesis) over the readers that face untrusted bytes first.

- the safetensors header reader, through both of its entry points: the converter's
  (`convert.safetensors_io.read_header`, which raises SafetensorsError) and the runtime's
  (`runtime.verify.read_header`, which raises HeaderError, a ValueError);
- the manifest reader (`manifests.load_manifest`, which raises ManifestError).

For random bytes, valid files with random byte-level mutations, and valid headers/manifests with
random structural edits, each reader must return or raise its own error type with a one-line
message: never another exception (a crash), never more than a deadline (a hang), and never an
allocation beyond a small multiple of the file it was given (a claimed length is not trusted).
And whatever the header reader accepts, the reference `safetensors` library reads the same way.

Example counts: 600 per header test and 150 per manifest test (derandomized: CI runs the same
examples every time); FUZZ_SCALE multiplies them and FUZZ_RANDOM=1 draws new ones each run.
docs/RELIABILITY.md records the CI counts and those of the larger offline run
(`FUZZ_SCALE=20 FUZZ_RANDOM=1 python -m pytest tests/test_fuzz.py`).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import tracemalloc
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from convert.safetensors_io import SafetensorsError
from convert.safetensors_io import read_header as convert_read_header
from manifests import ManifestError, dump_manifest, load_manifest
from manifests.safetensors_header import ITEMSIZE, HeaderError
from runtime.verify import read_header as runtime_read_header

SCALE = float(os.environ.get("FUZZ_SCALE", "1"))
HEADER_EXAMPLES = int(600 * SCALE)
MANIFEST_EXAMPLES = int(150 * SCALE)


def fuzz(examples: int):
    return settings(
        max_examples=examples,
        deadline=2000,  # ms per example: far above the few ms a reader needs, far below a hang
        derandomize=not os.environ.get("FUZZ_RANDOM"),  # CI runs the same examples every time
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        database=None,
    )


FUZZ = fuzz(HEADER_EXAMPLES)
FUZZ_MANIFEST = fuzz(MANIFEST_EXAMPLES)

# Python objects built from a header (dict entries, strings, small ints) cost a bounded multiple of
# its text; what must never happen is an allocation sized by a number the file merely claims.
ALLOWED = lambda size: 64 * 1024 + 48 * size  # noqa: E731

_SCRATCH = Path(tempfile.mkdtemp(prefix="fuzz-"))


def _file(data: bytes, name: str = "x.safetensors") -> Path:
    path = _SCRATCH / name
    path.write_bytes(data)
    return path


def _traced(fn, *args):
    """(result or exception, peak bytes allocated by Python while fn ran)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        try:
            out = fn(*args)
        except Exception as e:  # judged by the caller
            out = e
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _check_both_readers(data: bytes):
    """Both entry points on one file: clean outcome, same verdict, bounded allocation."""
    path = _file(data)
    a, peak_a = _traced(convert_read_header, path)
    b, peak_b = _traced(runtime_read_header, path)
    for result, allowed in ((a, SafetensorsError), (b, HeaderError)):
        if isinstance(result, Exception):
            assert isinstance(result, allowed), repr(result)
            assert "\n" not in str(result) and len(str(result)) < 600, str(result)
    assert isinstance(a, Exception) == isinstance(b, Exception), (a, b)
    if isinstance(a, SafetensorsError):  # the same words, the converter's prefixed by the file (and folded)
        assert str(a) == " ".join(f"{path}: {b}".split())
    assert max(peak_a, peak_b) <= ALLOWED(len(data)), (peak_a, peak_b, len(data))
    if not isinstance(a, Exception):
        _agrees_with_reference(path, a)
    return a


def _agrees_with_reference(path: Path, header) -> None:
    with safe_open(str(path), framework="numpy") as f:
        assert sorted(f.keys()) == sorted(header.tensors)
        for key in f.keys():
            part = f.get_slice(key)
            assert tuple(part.get_shape()) == header.tensors[key].shape
            assert part.get_dtype() == header.tensors[key].dtype


# --- strategies --------------------------------------------------------------------------------

def _build(entries: list[tuple[str, str, list[int]]], metadata: dict | None = None, pad: int = 0) -> bytes:
    doc, cursor = ({"__metadata__": metadata} if metadata is not None else {}), 0
    for name, dtype, shape in entries:
        n = ITEMSIZE[dtype]
        for d in shape:
            n *= d
        doc[name] = {"dtype": dtype, "shape": shape, "data_offsets": [cursor, cursor + n]}
        cursor += n
    text = json.dumps(doc).encode() + b" " * pad
    return struct.pack("<Q", len(text)) + text + bytes(range(256)) * (cursor // 256) + bytes(cursor % 256)


names = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=12).filter(
    lambda n: n != "__metadata__")
entries = st.lists(st.tuples(names, st.sampled_from(sorted(ITEMSIZE)), st.lists(st.integers(0, 6), max_size=3)),
                   max_size=6, unique_by=lambda e: e[0])
valid_files = st.builds(_build, entries, st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=5)),
                        st.integers(0, 16))


@st.composite
def mutated_files(draw):
    """A valid file with a few byte-level edits: flips, truncation, insertion, a new length field."""
    data = bytearray(draw(valid_files))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "length", "delete"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 8))]
        elif op == "length" and len(data) >= 8:
            data[:8] = struct.pack("<Q", draw(st.one_of(st.integers(0, 2 * len(data)), st.integers(0, 2**64 - 1))))
    return bytes(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def edited_headers(draw):
    """A valid header whose JSON has one field of one entry replaced by an arbitrary JSON value."""
    data = draw(valid_files)
    n = struct.unpack("<Q", data[:8])[0]
    doc, body = json.loads(data[8:8 + n]), data[8 + n:]
    names_ = [k for k in doc if k != "__metadata__"]
    if names_:
        entry = doc[draw(st.sampled_from(names_))]
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))
        entry[field] = draw(json_values)
    else:
        doc[draw(names)] = draw(json_values)
    text = json.dumps(doc).encode()
    return struct.pack("<Q", len(text)) + text + body


# --- the safetensors header reader -------------------------------------------------------------

@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes(data):
    _check_both_readers(data)


@FUZZ
@given(st.integers(0, 2**64 - 1), st.binary(max_size=512))
def test_random_length_then_random_bytes(length, rest):
    _check_both_readers(struct.pack("<Q", length) + rest)


@FUZZ
@given(valid_files)
def test_valid_files_are_read_as_the_reference_reads_them(data):
    assert not isinstance(_check_both_readers(data), Exception)


@FUZZ
@given(mutated_files())
def test_mutated_files(data):
    _check_both_readers(data)


@FUZZ
@given(edited_headers())
def test_headers_with_one_field_replaced(data):
    _check_both_readers(data)


def test_claims_beyond_the_file_cost_nothing():
    """Targeted examples of what a fuzzer rarely builds: a lone surrogate escape in a tensor name,
    a header length of hundreds of MB in a 1 kB file, a shape whose element count has thousands of digits, JSON nested 100 000 deep,
    an integer past Python's digit limit. Each is refused fast and without a large allocation."""
    text = json.dumps({"w": {"dtype": "F32", "shape": [2**62] * 5000, "data_offsets": [0, 4]}}).encode()
    lone = b'{"\\ud800": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'
    cases = [
        struct.pack("<Q", len(lone)) + lone + bytes(1),  # found by the offline run: the reference refuses it
        struct.pack("<Q", 300_000_000) + b"{}" + bytes(1000),
        struct.pack("<Q", len(text)) + text + bytes(4),
        struct.pack("<Q", 200_000) + b"[" * 100_000 + b"]" * 100_000,
        struct.pack("<Q", 5010) + b'{"w": ' + b"9" * 5000 + b"}" + b"   ",
    ]
    for data in cases:
        assert isinstance(_check_both_readers(data), SafetensorsError)


# --- the manifest reader -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def manifest_text(tmp_path_factory) -> str:
    """A real manifest (the converter's, sharded, m5 layouts), cut to a few records of each
    kind so that an example takes milliseconds; it still validates."""
    from convert import convert_checkpoint
    from tests.checkpoints import make_checkpoint

    root = tmp_path_factory.mktemp("fuzz-manifest")
    src = make_checkpoint(root / "src", "hf", extra_files=False)
    out = convert_checkpoint(src, root / "out", target="m5", max_shard_size="700KB")
    doc = load_manifest(out / "manifest.yaml")
    for section, keep in (("projections", ["lm_head", "model.language_model.layers.0.mlp.gate_proj",
                                           "model.language_model.layers.0.self_attn.q_proj"]),
                          ("files", None), ("embeddings", None)):
        names = keep or sorted(doc[section])[:3]
        doc[section] = {k: doc[section][k] for k in names}
    doc["dropped"] = doc["dropped"][:2]
    doc["source"]["files"] = dict(list(doc["source"]["files"].items())[:2])
    return dump_manifest(_still_valid(doc))


def _still_valid(doc: dict) -> dict:
    text = dump_manifest(doc)
    assert load_manifest(_file(text.encode(), "manifest.yaml")) == doc
    return doc


def _check_manifest(data: bytes):
    path = _file(data, "manifest.yaml")
    result, peak = _traced(load_manifest, path)
    if isinstance(result, Exception):
        assert isinstance(result, ManifestError), repr(result)
        assert "\n" not in str(result), str(result)
    else:
        assert isinstance(result, dict) and result["format_version"] in (1, 2)  # 2: a mutated "1" still reads
    # YAML builds many small objects; still bounded by the text, not by anything it claims
    assert peak <= 256 * 1024 + 200 * len(data), (peak, len(data))
    return result


@FUZZ_MANIFEST
@given(st.binary(max_size=2048))
def test_manifest_random_bytes(data):
    _check_manifest(data)


@FUZZ_MANIFEST
@given(data=st.data())
def test_manifest_byte_mutations(manifest_text, data):
    raw = bytearray(manifest_text.encode())
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        op = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        if op == "flip":
            raw[at] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "truncate":
            del raw[at:]
        elif op == "insert":
            raw[at:at] = data.draw(st.sampled_from([b"&a ", b"*a", b"{", b"[", b": ", b"\n  - ", b"!!python/object ",
                                                    b"\t", b"\x00", b"---\n", b"? "]))
        else:
            del raw[at:at + data.draw(st.integers(1, 40))]
        if not raw:
            break
    _check_manifest(bytes(raw))


@FUZZ_MANIFEST
@given(data=st.data())
def test_manifest_with_one_value_replaced(manifest_text, data):
    """Walk to a random place of a real manifest and put an arbitrary YAML value there."""
    doc = yaml.load(manifest_text, Loader=yaml.CSafeLoader)
    node = doc
    for _ in range(data.draw(st.integers(0, 4))):
        if isinstance(node, dict) and node:
            key = data.draw(st.sampled_from(sorted(node, key=str)))
            if not isinstance(node[key], (dict, list)) or data.draw(st.booleans()):
                node[key] = data.draw(json_values)
                break
            node = node[key]
        elif isinstance(node, list) and node:
            node = node[data.draw(st.integers(0, len(node) - 1))]
        else:
            break
    _check_manifest(yaml.dump(doc, Dumper=yaml.CSafeDumper).encode())
