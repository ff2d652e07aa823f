"""The converter's building blocks: safetensors header parsing and writing, hashing reads, dtype
casts (against torch as the reference), the tiled transpose, size parsing."""

import hashlib
import json
import struct

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as st_load_numpy
from safetensors.numpy import save_file as st_save_numpy

from convert.dtypes import cast
from convert.errors import ConvertError
from convert.planning import parse_size
from convert.safetensors_io import (
    HEADER_LIMIT,
    HashingReader,
    SafetensorsError,
    SafetensorsWriter,
    read_header,
)
from convert.transpose import transpose_into


def _raw(path, header: dict, data: bytes = b"", length: int | None = None) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)


def test_header_of_a_file_written_by_the_safetensors_library(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.arange(5, dtype=np.int64)
    st_save_numpy({"a": a, "b": b}, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    h = read_header(tmp_path / "x.safetensors")
    assert h.metadata == {"format": "pt"}
    assert {k: (t.dtype, t.shape, t.nbytes) for k, t in h.tensors.items()} == {
        "a": ("F32", (3, 4), 48), "b": ("I64", (5,), 40)}
    raw = (tmp_path / "x.safetensors").read_bytes()
    assert raw[h.tensors["a"].offset:h.tensors["a"].offset + 48] == a.tobytes()


GOOD = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "v": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}


@pytest.mark.parametrize(
    "header, data, length, message",
    [
        (GOOD, bytes(24), 10**6, "runs past the end"),
        (GOOD, bytes(24), HEADER_LIMIT + 1, "exceeds the"),
        (GOOD, bytes(24), 2**63, "exceeds the"),
        ({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}}, bytes(2), None,
         "tensor 'w': unknown dtype 'Q4'"),
        ({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 16]}}, bytes(16), None,
         "tensor 'w': data_offsets span 16 bytes but F32 x [2, 3] needs 24"),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
          "v": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, bytes(16), None, "overlaps"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "v": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}}, bytes(20), None,
         "tensor 'v': 4 unindexed bytes"),
        (GOOD, bytes(20), None, "tensor 'v': data ends at byte"),
        (GOOD, bytes(30), None, "6 unindexed bytes after tensor 'v'"),
        ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), None, "tensor 'w': shape"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8), None, "tensor 'w': data_offsets"),
        ({"w": {"dtype": "F32", "shape": [2]}}, bytes(8), None, "tensor 'w': entry must have"),
        ({"__metadata__": {"a": 1}}, b"", None, "__metadata__"),
    ],
)
def test_malformed_headers_are_refused_naming_file_and_tensor(tmp_path, header, data, length, message):
    path = tmp_path / "bad.safetensors"
    _raw(path, header, data, length)
    with pytest.raises(SafetensorsError) as e:
        read_header(path)
    assert message in str(e.value)
    assert str(path) in str(e.value)
    assert "\n" not in str(e.value)
    assert e.value.exit_code == 2


def test_header_that_is_not_json(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(SafetensorsError, match="not valid JSON"):
        read_header(path)
    path.write_bytes(b"abc")
    with pytest.raises(SafetensorsError, match="too short"):
        read_header(path)


def test_writer_round_trips_through_the_safetensors_library(tmp_path):
    a = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    b = np.arange(7, dtype=np.uint16)  # odd byte count: the f32 goes first to stay aligned
    written = []
    w = SafetensorsWriter(tmp_path / "o.safetensors", [("a", "F32", (3, 5)), ("b", "U16", (7,))],
                          metadata={"format": "mlx"}, on_write=written.append)
    w.begin("a")
    w.write(a[:1])
    w.write(a[1:])
    w.begin("b")
    w.write(b)
    sha, n = w.close()
    raw = (tmp_path / "o.safetensors").read_bytes()
    assert (sha, n) == (hashlib.sha256(raw).hexdigest(), len(raw))
    assert sum(written) == a.nbytes + b.nbytes
    back = st_load_numpy(str(tmp_path / "o.safetensors"))
    assert np.array_equal(back["a"], a) and np.array_equal(back["b"], b)
    assert (8 + struct.unpack("<Q", raw[:8])[0]) % 8 == 0


def test_writer_refuses_out_of_order_and_overlong_writes(tmp_path):
    w = SafetensorsWriter(tmp_path / "o.safetensors", [("a", "F32", (2,)), ("b", "F32", (2,))])
    with pytest.raises(RuntimeError, match="out of order"):
        w.begin("b")
    w.begin("a")
    with pytest.raises(RuntimeError, match="remain"):
        w.write(bytes(12))
    w.write(bytes(4))
    with pytest.raises(RuntimeError, match="unwritten"):
        w.begin("b")
    with pytest.raises(RuntimeError, match="before every tensor"):
        w.close()


def test_hashing_reader_hashes_the_whole_file_whatever_the_read_order(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {f"t{i}": rng.standard_normal(1000 + i).astype(np.float32) for i in range(6)}
    tensors["t6"] = rng.standard_normal(400_000).astype(np.float32)  # big enough to hash on the helper thread
    path = tmp_path / "x.safetensors"
    st_save_numpy(tensors, str(path))
    header = read_header(path)
    want = hashlib.sha256(path.read_bytes()).hexdigest()
    for order in (["t0", "t1", "t2"], ["t5", "t0", "t3", "t3"], [], ["t6", "t1", "t6"], ["t0", "t6"]):
        with HashingReader(header, bytearray(100)) as reader:  # a tiny scratch: many gap reads
            for name in order:
                t = header.tensors[name]
                got = reader.read_into(t.offset, memoryview(bytearray(t.nbytes)))
                assert np.array_equal(np.frombuffer(got, np.float32), tensors[name])
            assert reader.finish() == want


def _torch_bits(values: np.ndarray, dtype) -> np.ndarray:
    return torch.from_numpy(values).to(dtype).view(torch.int16).numpy().view(np.uint16)


SPECIAL = np.array([0.0, -0.0, 1.0, -1.5, np.inf, -np.inf, np.nan, 3.4e38, -3.4e38, 1e-40, -1e-45, 65504.0,
                    70000.0, 6e-8], dtype=np.float32)


def _f32_sample():
    rng = np.random.default_rng(2)
    normal = (rng.standard_normal(5000) * 10.0 ** rng.integers(-30, 30, 5000)).astype(np.float32)
    # Exact ties: the dropped half is 0x8000, with the kept half's last bit odd and even.
    ties = (np.array([0x3F808000, 0x3F818000, 0xC0008000, 0x7F7F8000], dtype=np.uint32)).view(np.float32)
    return np.concatenate([SPECIAL, normal, ties])


def test_float32_to_bfloat16_rounds_to_nearest_even_like_torch():
    x = _f32_sample()
    got = cast(x, "F32", "BF16", np.empty(x.size, np.uint16))
    want = _torch_bits(x, torch.bfloat16)
    nan = np.isnan(x)
    assert np.array_equal(got[~nan], want[~nan])
    # NaN stays NaN: exponent all ones, mantissa non-zero.
    assert np.all((got[nan] & 0x7F80) == 0x7F80) and np.all(got[nan] & 0x7F)


def test_bfloat16_widens_exactly_and_narrows_back():
    bits = np.arange(0, 1 << 16, dtype=np.uint16)
    wide = cast(bits, "BF16", "F32", np.empty(bits.size, np.float32))
    ref = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).to(torch.float32).numpy()
    assert np.array_equal(wide.view(np.uint32), ref.view(np.uint32))
    back = cast(wide, "F32", "BF16", np.empty(bits.size, np.uint16))
    finite = ~np.isnan(wide)
    assert np.array_equal(back[finite], bits[finite])


def test_float16_casts_match_torch():
    x = _f32_sample()
    with np.errstate(over="ignore"):
        half = cast(x, "F32", "F16", np.empty(x.size, np.float16))
    want = torch.from_numpy(x).to(torch.float16).numpy()
    same = ~np.isnan(x)
    assert np.array_equal(half[same].view(np.uint16), want[same].view(np.uint16))
    bf = _torch_bits(x, torch.bfloat16)
    got = cast(bf, "BF16", "F16", np.empty(x.size, np.float16))
    ref = torch.from_numpy(bf.view(np.int16)).view(torch.bfloat16).to(torch.float16).numpy()
    assert np.array_equal(got[same].view(np.uint16), ref[same].view(np.uint16))
    got = cast(half, "F16", "BF16", np.empty(x.size, np.uint16))
    ref = _torch_bits(half.astype(np.float32), torch.bfloat16)
    assert np.array_equal(got[same], ref[same])


@pytest.mark.parametrize("shape", [(1, 1), (17, 3), (33, 2049), (5000, 40)])
def test_tiled_transpose(shape):
    a = np.random.default_rng(3).integers(0, 60000, shape).astype(np.uint16)
    out = np.empty(shape[::-1], np.uint16)
    transpose_into(a, out)
    assert np.array_equal(out, a.T)
    # into a strided band of a wider buffer, from a column slice, as the writer uses it
    band = np.zeros((shape[1], shape[0] + 7), np.uint16)
    transpose_into(a[:, :], band[:, 3:3 + shape[0]])
    assert np.array_equal(band[:, 3:3 + shape[0]], a.T) and not band[:, :3].any()


@pytest.mark.parametrize("text, n", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30),
                                     ("1.5 GB", 15 * 10**8), ("1000", 1000), (4096, 4096)])
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["5XB", "GB", "-1GB", "0"])
def test_parse_size_refuses(text):
    with pytest.raises(ConvertError):
        parse_size(text)
