"""The per-layer embedding table placed `mapped`: written to a file of its own, memory-mapped and
gathered on the host, and computing what the resident table computes.

Bundles from one tiny checkpoint, converted with the real CLI: float32 `cuda` (fused) and 4-bit
`generic`, each resident and mapped. Checked: what the converter writes; the model against
transformers (eager and compiled), the 4-bit mapped table bit for bit against the 4-bit resident
one; that loading maps the file without reading it (and only the rows used are ever paged in);
`verify`; generation.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml

from manifests import ManifestError, read_manifest, validate_manifest
from manifests.format import EMBED_TOKENS_PER_LAYER, MAPPED_FILE, PREFIX
from manifests.manifest import needed_version
from manifests.records import MAPPED_EMBEDDINGS, records
from manifests.safetensors_header import read_header_file
from runtime.generate import generate_step
from runtime.mapped import MappedTable
from tests.checkpoints import make_checkpoint, tiny_text_config
from tests.runtime_helpers import (
    check_compiled_steps,
    convert,
    load_quietly,
    load_tensors,
    reference_logits,
    reference_model,
    relative_error,
    source_tensors,
)

BOUND = 1e-4
LENGTH, PREFILL = 20, 12
Q4 = ("--quantize", "4", "--group-size", "32")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("ple")
    src = make_checkpoint(root / "src", "hf", seed=5)
    return {
        "src": src,
        "resident": convert(src, root / "resident", "cuda"),
        "mapped": convert(src, root / "mapped", "cuda", "--ple", "mapped", "--max-shard-size", "600KB"),
        "q4-resident": convert(src, root / "q4-resident", "generic", *Q4),
        "q4-mapped": convert(src, root / "q4-mapped", "generic", "--ple", "mapped", *Q4),
    }


@pytest.fixture(scope="module")
def ids():
    cfg = tiny_text_config()
    ids = np.random.default_rng(8).integers(0, cfg["vocab_size"], (2, LENGTH))
    ids[0, 3] = 300  # beyond vocab_size_per_layer_input (256): reads per-layer row 0
    return ids


@pytest.fixture(scope="module")
def reference(bundles, ids):
    src = bundles["src"]
    text_config = json.loads((src / "config.json").read_text())["text_config"]
    return reference_logits(reference_model(text_config, source_tensors(src, "hf")), ids)


# -- what the converter writes ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mapped", "q4-mapped"])
def test_a_mapped_table_is_a_file_of_its_own(bundles, name):
    mapped, resident = bundles[name], bundles[name.replace("mapped", "resident")]
    manifest = read_manifest(mapped)
    # version 2 for the mapped table; the resident twin needs it only for what else it records
    assert manifest["format_version"] == 2
    assert read_manifest(resident)["format_version"] == needed_version({**read_manifest(resident), "format_version": 1})
    assert EMBED_TOKENS_PER_LAYER not in manifest["embeddings"]
    record = manifest["mapped_embeddings"][EMBED_TOKENS_PER_LAYER]
    assert record["file"] == MAPPED_FILE and MAPPED_FILE in manifest["files"]
    assert record == {**read_manifest(resident)["embeddings"][EMBED_TOKENS_PER_LAYER], "file": MAPPED_FILE}
    # the file holds the record's tensors alone, the shards none of them, the index does not name it
    entries, _, _ = read_header_file(mapped / MAPPED_FILE)
    stored = [t.key for t in MAPPED_EMBEDDINGS.stored(record)]
    assert [e.name for e in entries] == stored  # row-major, the packed weight first
    shards = [p for p in mapped.glob("model*.safetensors")]
    assert shards and not any(set(stored) & {e.name for e in read_header_file(p)[0]} for p in shards)
    index = mapped / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        assert MAPPED_FILE not in weight_map.values() and not set(stored) & set(weight_map)
    # the same bytes as the resident bundle's table
    mine, theirs = mx.load(str(mapped / MAPPED_FILE)), load_tensors(resident)
    assert all(bytes(memoryview(mine[k])) == bytes(memoryview(theirs[k])) for k in stored)
    assert len(stored) == (3 if name.startswith("q4") else 1)


def write_profile(path: Path, **content) -> Path:
    path.write_text(yaml.safe_dump({"name": "test-profile", "layouts": {}, **content}))
    return path


def test_the_profile_places_the_table_and_ple_overrides_it(bundles, tmp_path):
    profile = write_profile(tmp_path / "p.yaml", per_layer_embeddings="mapped")
    run = lambda out, *extra: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "convert", "--target-profile", str(profile), "--quiet", *extra, str(bundles["src"]),
         str(tmp_path / out)], capture_output=True, text=True)
    assert run("a").returncode == 0
    assert EMBED_TOKENS_PER_LAYER in read_manifest(tmp_path / "a")["mapped_embeddings"]
    assert run("b", "--ple", "resident").returncode == 0
    manifest = read_manifest(tmp_path / "b")
    assert "mapped_embeddings" not in manifest and EMBED_TOKENS_PER_LAYER in manifest["embeddings"]
    done = run("c", "--dry-run")
    assert "per-layer embeddings  mapped: in embed_tokens_per_layer.safetensors" in done.stdout
    assert not (tmp_path / "c").exists()
    # generic bundles load in mlx-lm, which reads the table from the shards: mapped, one does not
    done = subprocess.run([sys.executable, "-m", "convert", "--target", "generic", "--ple", "mapped", "--dry-run",
                           str(bundles["src"]), str(tmp_path / "d")], capture_output=True, text=True)
    assert "mlx-lm   cannot load it: the per-layer table mapped (--ple mapped)" in done.stdout, done.stdout


@pytest.mark.parametrize("args, profile, expected", [
    (("--ple", "sideways"), None, "'sideways' is not one of 'resident', 'mapped'"),
    ((), {"per_layer_embeddings": "sideways"}, "per_layer_embeddings: 'sideways' is not resident or mapped"),
    ((), {"per_layer_embeddings": "mapped", "mlx_lm": True}, "mlx-lm reads the per-layer embedding table from the shards"),
])
def test_a_bad_placement_is_one_line(bundles, tmp_path, args, profile, expected):
    extra = ["--target-profile", str(write_profile(tmp_path / "p.yaml", **profile))] if profile \
        else ["--target", "generic"]
    done = subprocess.run([sys.executable, "-m", "convert", *extra, *args, str(bundles["src"]), str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and expected in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


def test_a_manifest_that_records_a_table_twice_or_its_file_nowhere_is_refused(bundles):
    manifest = read_manifest(bundles["mapped"])
    twice = json.loads(json.dumps(manifest))
    twice["embeddings"][EMBED_TOKENS_PER_LAYER] = {k: v for k, v in
                                                   twice["mapped_embeddings"][EMBED_TOKENS_PER_LAYER].items() if k != "file"}
    with pytest.raises(ManifestError, match="recorded twice"):
        validate_manifest(twice)
    unlisted = json.loads(json.dumps(manifest))
    del unlisted["files"][MAPPED_FILE]
    with pytest.raises(ManifestError, match="not listed under files"):
        validate_manifest(unlisted)
    older = dict(json.loads(json.dumps(manifest)), format_version=1)
    with pytest.raises(ManifestError, match="format_version 1, but it records what version 2 added"):
        validate_manifest(older)


# -- the model on a mapped table ----------------------------------------------------------------

def test_mapped_float32_matches_transformers_eager_and_compiled(bundles, ids, reference):
    model, _ = load_quietly(bundles["mapped"])
    assert isinstance(model.model.language_model.embed_tokens_per_layer, MappedTable)
    assert relative_error(model(mx.array(ids)), reference) < BOUND
    cache = model.make_cache()
    model(mx.array(ids[:, :PREFILL]), cache=cache)
    for t in range(PREFILL, LENGTH):
        assert relative_error(model(mx.array(ids[:, t : t + 1]), cache=cache), reference[:, t : t + 1]) < BOUND, t
    for row in range(ids.shape[0]):
        check_compiled_steps(model, ids[row : row + 1], reference[row : row + 1], PREFILL, LENGTH, BOUND, 4,
                             f"row {row}: ")


def dequantized_weights(bundle: Path) -> dict[str, np.ndarray]:
    """The decoder's weights as a `generic` bundle stores them, quantized ones dequantized with
    mx.dequantize: shards and the mapped table's file alike (decoder-relative names, float32)."""
    manifest = read_manifest(bundle)
    stored = load_tensors(bundle)  # every *.safetensors: the shards and the mapped file
    out, used = {}, set()
    for where, kind, path, record in records(manifest):
        if path == "lm_head":
            continue  # tied: the embedding table
        tensors = kind.stored(record, where)
        used |= {t.key for t in tensors}
        parts = {t.part: stored[t.key] for t in tensors}
        q = record["quantized"]
        weight = parts["weight"] if not q else mx.dequantize(parts["weight"], parts["scales"], parts["biases"],
                                                             group_size=q["group_size"], bits=q["bits"])
        out[path[len(PREFIX):] + ".weight"] = np.array(weight.astype(mx.float32))
    for key, value in stored.items():
        if key not in used:
            out[key[len(PREFIX):]] = np.array(value.astype(mx.float32))
    return out


def test_mapped_4bit_matches_transformers_on_its_own_dequantized_weights(bundles, ids):
    model, _ = load_quietly(bundles["q4-mapped"])
    text_config = read_manifest(bundles["q4-mapped"])["model"]["text_config"]
    ref = reference_logits(reference_model(text_config, dequantized_weights(bundles["q4-mapped"])), ids)
    assert relative_error(model(mx.array(ids)), ref) < BOUND
    for row in range(ids.shape[0]):
        check_compiled_steps(model, ids[row : row + 1], ref[row : row + 1], PREFILL, LENGTH, BOUND, 32, f"row {row}: ")


def test_the_4bit_mapped_table_is_the_resident_one_bit_for_bit(bundles, ids):
    """The mapped table keeps the bundle's packing and is dequantized by the same mx.dequantize as
    the resident one: the same values, bit for bit, table rows, logits and compiled steps alike."""
    resident, _ = load_quietly(bundles["q4-resident"])
    mapped, _ = load_quietly(bundles["q4-mapped"])
    ple = lambda m: m.model.language_model.embed_tokens_per_layer  # noqa: E731
    every = mx.arange(256)
    assert mx.array_equal(ple(mapped)(every), ple(resident)(every)).item()
    assert mx.array_equal(mapped(mx.array(ids)), resident(mx.array(ids))).item()
    seq = ids[:1]
    caches = [resident.make_cache(), mapped.make_cache()]
    for model, cache in zip((resident, mapped), caches):
        model(mx.array(seq[:, :PREFILL]), cache=cache)
    from runtime.fast import CompiledDecoder

    decoders = [CompiledDecoder(m, c, capacity=16) for m, c in zip((resident, mapped), caches)]
    for t in range(PREFILL, LENGTH):
        a, b = (d(mx.array(seq[:, t])) for d in decoders)
        assert mx.array_equal(a, b).item(), t


def test_generation_on_a_mapped_table(bundles):
    """Compiled and eager decoding on the mapped table give the resident table's tokens."""
    prompt = [5, 17, 300, 2, 9, 100]
    run = lambda m, compiled: [t for t, _ in generate_step(prompt, m, max_tokens=24, compiled=compiled)]  # noqa: E731
    resident, _ = load_quietly(bundles["q4-resident"])
    mapped, _ = load_quietly(bundles["q4-mapped"])
    want = run(resident, True)
    assert run(mapped, True) == want and run(mapped, False) == want


# -- loading maps, never reads ------------------------------------------------------------------

def drop_from_page_cache(path: Path) -> None:
    """Evict the file's pages (written and closed: nothing dirty), so what a mapping touches later
    is what it reads."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def mapping_violations(table: MappedTable, bundle: Path) -> list[str]:
    """Everything about a loaded mapped table that is not a read-only map of its file's bytes."""
    problems = []
    raw = (bundle / MAPPED_FILE).read_bytes()
    entries, _, start = read_header_file(bundle / MAPPED_FILE)
    for part, entry in zip(table.parts, entries):
        rows = part.rows
        if rows.flags.writeable or rows.flags.owndata:
            problems.append(f"{entry.name}: not a read-only view")
        base = rows
        while isinstance(base, np.ndarray) and base.base is not None:
            base = base.base
        base = base.obj if isinstance(base, memoryview) else base  # np.frombuffer's buffer: the map
        if not isinstance(base, mmap.mmap):
            problems.append(f"{entry.name}: not a view of a memory map (base {type(base).__name__})")
        if rows.tobytes() != raw[start + entry.begin : start + entry.begin + entry.nbytes]:
            problems.append(f"{entry.name}: bytes differ from the file's")
    return problems


def test_loading_a_mapped_bundle_does_no_work_on_weights(bundles, monkeypatch, tmp_path):
    from tests.test_loader import load_violations

    for name in ("mapped", "q4-mapped"):
        assert load_violations(bundles[name], monkeypatch, tmp_path) == [], name
        model, _ = load_quietly(bundles[name])
        assert mapping_violations(model.model.language_model.embed_tokens_per_layer, bundles[name]) == [], name


def test_a_loader_that_reads_the_table_is_caught(bundles, monkeypatch):
    import runtime.mapped as mapped

    real = mapped.MappedTable.__init__

    def reading(self, *args, **kwargs):
        real(self, *args, **kwargs)
        object.__setattr__(self, "parts", tuple(mapped.Part(p.name, np.array(p.rows), p.start, p.dtype)
                                                for p in self.parts))

    monkeypatch.setattr(mapped.MappedTable, "__init__", reading)
    model, _ = load_quietly(bundles["q4-mapped"])
    problems = mapping_violations(model.model.language_model.embed_tokens_per_layer, bundles["q4-mapped"])
    assert any("not a read-only view" in p for p in problems) and any("memory map" in p for p in problems)


@pytest.mark.skipif(not Path("/proc/self/smaps").exists() or not hasattr(os, "posix_fadvise"),
                    reason="needs Linux's smaps and posix_fadvise")
def test_only_the_rows_used_are_ever_paged_in(tmp_path):
    """A table of 8192 rows (5 MB): nothing of it is resident after load, and a forward pass over
    three tokens pages in about their rows (MADV_RANDOM: no read-ahead), not the table."""
    cfg = tiny_text_config(vocab_size=8192, vocab_size_per_layer_input=8192)
    src = make_checkpoint(tmp_path / "src", "hf", text_config=cfg, seed=2)
    bundle = convert(src, tmp_path / "mapped", "generic", "--ple", "mapped")
    drop_from_page_cache(bundle / MAPPED_FILE)
    model, _ = load_quietly(bundle)
    table = model.model.language_model.embed_tokens_per_layer
    assert table.nbytes == 8192 * 160 * 4
    assert table.resident_pages() == 0  # mapping is not reading
    mx.eval(model(mx.array([[3000, 5000, 8000]])))  # far from the header, which load did read
    page = os.sysconf("SC_PAGE_SIZE")
    touched = table.resident_pages()
    assert 0 < touched <= 3 * (table.row_bytes // page + 2) * page, touched
    assert touched < table.nbytes / 50


# -- verify --------------------------------------------------------------------------------------

def verify(bundle: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime", "verify", str(bundle)], capture_output=True, text=True)


def test_verify_covers_the_mapped_file(bundles, tmp_path):
    import shutil

    done = verify(bundles["q4-mapped"])
    assert done.returncode == 0, done.stderr
    bundle = Path(shutil.copytree(bundles["q4-mapped"], tmp_path / "b"))
    data = bytearray((bundle / MAPPED_FILE).read_bytes())
    data[-1] ^= 0xFF
    (bundle / MAPPED_FILE).write_bytes(bytes(data))
    done = verify(bundle)
    assert done.returncode == 1 and f"{MAPPED_FILE}: sha256 differs" in done.stderr
    (bundle / MAPPED_FILE).unlink()
    done = verify(bundle)
    assert done.returncode == 1 and f"{MAPPED_FILE}: missing" in done.stderr
    assert "Traceback" not in done.stderr


# -- the m5 table stored once -------------------------------------------------------------------

def as_older_m5(bundle: Path) -> Path:
    """Rewrite a one-shard m5 bundle the way m5 bundles were written before the token embedding
    was read from the head: `embed_tokens.weight` stored too, its record without a layout, format
    version 1 (files, hashes and the manifest's digest made anew, so verify passes)."""
    import hashlib

    from manifests import write_manifest
    from manifests.format import EMBED_TOKENS

    shard = bundle / "model.safetensors"
    arrays = mx.load(str(shard))
    arrays[EMBED_TOKENS + ".weight"] = mx.contiguous(arrays["lm_head.weight_t"].T)
    mx.save_safetensors(str(shard), arrays, metadata={"format": "mlx"})
    manifest = read_manifest(bundle)
    record = manifest["embeddings"][EMBED_TOKENS]
    del record["layout"]
    record.update(key=EMBED_TOKENS + ".weight", shape=record["shape"][::-1])
    manifest["format_version"] = 1
    manifest["files"]["model.safetensors"] = {"sha256": hashlib.sha256(shard.read_bytes()).hexdigest(),
                                              "bytes": shard.stat().st_size}
    write_manifest(manifest, bundle)
    return bundle


def test_an_m5_bundle_stores_the_embedding_once_and_older_ones_still_load(bundles, tmp_path, ids):
    from manifests.format import EMBED_TOKENS
    from runtime.projections import Embedding, HeadColumns

    m5 = convert(bundles["src"], tmp_path / "m5", "m5")
    manifest = read_manifest(m5)
    assert manifest["embeddings"][EMBED_TOKENS]["key"] == "lm_head.weight_t" and manifest["format_version"] == 2
    stored = sum(math.prod(e.shape) * 4 for e in read_header_file(m5 / "model.safetensors")[0])
    source = source_tensors(bundles["src"], "hf")  # the decoder's tensors (float32 here, as the bundle)
    assert stored == sum(v.nbytes for v in source.values())  # no byte more than the source's text weights
    new, _ = load_quietly(m5)
    assert isinstance(new.model.language_model.embed_tokens, HeadColumns)

    older = as_older_m5(convert(bundles["src"], tmp_path / "older", "m5"))
    assert verify(older).returncode == 0
    old, _ = load_quietly(older)
    assert isinstance(old.model.language_model.embed_tokens, Embedding)
    assert mx.array_equal(old(mx.array(ids)), new(mx.array(ids))).item()
    run = lambda m: [t for t, _ in generate_step([5, 17, 300, 2], m, max_tokens=12)]  # noqa: E731
    assert run(old) == run(new)

    standard_head = json.loads(json.dumps(read_manifest(bundles["resident"])))
    standard_head["format_version"] = 2
    standard_head["embeddings"][EMBED_TOKENS].update(layout="pretransposed", key="lm_head.weight_t")
    with pytest.raises(ManifestError, match="only .*embed_tokens may be read from the pretransposed LM head"):
        validate_manifest(standard_head)


def test_known_answers_are_recorded_and_pass_on_a_mapped_bundle(bundles, tmp_path):
    """The numpy reference reads the mapped table from its file (records() walks every kind), and
    `verify --numeric` runs the eager and compiled paths on it against those answers."""
    import shutil

    bundle = Path(shutil.copytree(bundles["q4-mapped"], tmp_path / "b"))
    run = lambda *args: subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)  # noqa: E731
    done = run("convert", "known-answers", str(bundle))
    assert done.returncode == 0, done.stderr
    assert "known_answers" in read_manifest(bundle)
    done = run("runtime", "verify", "--numeric", str(bundle))
    assert done.returncode == 0, done.stderr + done.stdout
