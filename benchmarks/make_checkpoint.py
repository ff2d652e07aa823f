"""Write a random Gemma3n checkpoint at the real E2B or E4B size, streaming, like a hub download.

    python3 benchmarks/make_checkpoint.py --size e2b ~/bench-data/e2b-bf16
    python3 benchmarks/make_checkpoint.py --size e4b --dtype float32 --towers OUT

The names, shapes and config are those of google/gemma-3n-E2B-it / E4B-it (Hugging Face naming,
`Gemma3nForConditionalGeneration`), the tensor list comes from `convert.gemma3n.expected_tensors`,
and the files are sharded like the hub's (`model-0000i-of-0000n.safetensors` up to
`--max-shard-size`, plus `model.safetensors.index.json`).

Nothing close to a whole model is ever in memory: each shard is written header first, then its
tensors in blocks of `--block-mb`, each block drawn from a numpy generator of its own (seeded by
`--seed`, the tensor and the block, so threads draw several blocks at once): float32 normal
times a per-tensor scale (bfloat16 keeps the upper 16 bits, so every value is finite). Needs
only numpy and this repository's packages (`convert/gemma3n.py` for the tensors,
`manifests/gemma3n.py` for the published sizes; no safetensors, no MLX), so it runs on bare
benchmark machines too.

Values are tame on purpose (docs/GEMMA3N.md, pitfalls): projections N(0, 1/fan_in), norm scales 1 and
q/k norm scales head_dim^-1/4 (`--random-norms` draws them around 1 instead). Random weights
are still numerically meaningless; they exist for timing and memory figures, and for parity
checks between two implementations that read the same bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from convert.gemma3n import expected_tensors, kv_shared_unused  # noqa: E402
from manifests.gemma3n import layer_types, published_text_config  # noqa: E402

PREFIX = "model.language_model."
INDEX_NAME = "model.safetensors.index.json"

SAFETENSORS_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}

def text_config(size: str) -> dict:
    """The Gemma3n text config of `size` (e2b, e4b, their -narrow variants, or tiny for tests)."""
    if size == "tiny":
        return _tiny_text_config()
    if size.endswith("-narrow"):
        return _narrow_text_config(size.removesuffix("-narrow"))
    return published_text_config(size.upper())


def _tiny_text_config() -> dict:
    # Same rules as the full sizes, at test scale: a full and a sliding layer before the
    # KV-shared ones (docs/GEMMA3N.md, pitfalls), window shorter than a test sequence.
    cfg = text_config("e2b")
    cfg.update({
        "activation_sparsity_pattern": [0.95] * 5 + [0.0] * 5,
        "head_dim": 32,
        "hidden_size": 64,
        "hidden_size_per_layer_input": 16,
        "intermediate_size": [128] * 10,
        "laurel_rank": 8,
        "layer_types": layer_types(10),
        "max_position_embeddings": 512,
        "num_attention_heads": 2,
        "num_hidden_layers": 10,
        "num_key_value_heads": 1,
        "num_kv_shared_layers": 4,
        "query_pre_attn_scalar": 32,
        "sliding_window": 8,
        "vocab_size": 320,
        "vocab_size_per_layer_input": 256,
    })
    return cfg


def _narrow_text_config(size: str) -> dict:
    # Every layer, KV sharing, sparsity and AltUp plane of the real size, at widths where the
    # weights (~20 MB) cost nothing to read: what is left of a decode step is its launch cost,
    # the number of kernels and graph nodes per token (benchmarks/bench_graph.py).
    cfg = text_config(size)
    layers = cfg["num_hidden_layers"]
    cfg.update({
        "head_dim": 64,
        "hidden_size": 256,
        "hidden_size_per_layer_input": 32,
        "intermediate_size": [512] * layers,
        "laurel_rank": 16,
        "query_pre_attn_scalar": 64,
        "vocab_size": 2048,
        "vocab_size_per_layer_input": 2048,
    })
    return cfg


def full_config(text: dict, dtype: str) -> dict:
    text = dict(text, torch_dtype=dtype)
    return {
        "architectures": ["Gemma3nForConditionalGeneration"],
        "model_type": "gemma3n",
        "text_config": text,
        # Stand-ins: the converter drops the towers; only their presence matters here.
        "vision_config": {"model_type": "gemma3n_vision", "architecture": "mobilenetv5_300m_enc",
                          "hidden_size": 2048, "vocab_size": 128, "vocab_offset": 262144},
        "audio_config": {"model_type": "gemma3n_audio", "hidden_size": 1536, "vocab_size": 128,
                         "vocab_offset": 262272},
        "audio_soft_tokens_per_image": 188,
        "vision_soft_tokens_per_image": 256,
        "boi_token_id": 255999,
        "eoi_token_id": 262144,
        "boa_token_id": 256000,
        "eoa_token_id": 262272,
        "image_token_id": 262145,
        "audio_token_id": 262273,
        "eos_token_id": [1, 106],
        "initializer_range": 0.02,
        "torch_dtype": dtype,
        "transformers_version": "4.53.0.dev0",
    }


# Stand-in tower tensors with names of the real towers (a small sample, not all ~1e3 of them),
# to exercise the converter's dropping of vision/audio weights.
TOWER_TENSORS = {
    "model.vision_tower.timm_model.conv_stem.conv.weight": (64, 3, 3, 3),
    "model.vision_tower.timm_model.blocks.0.0.conv_exp.weight": (128, 64, 3, 3),
    "model.vision_tower.timm_model.msfa.ffn.pw_proj.conv.weight": (2048, 8192, 1, 1),
    "model.audio_tower.subsample_conv_projection.conv_0.conv.weight": (128, 1, 3, 3),
    "model.audio_tower.conformer.0.attention.attn.q_proj.weight": (1536, 1536),
    "model.audio_tower.conformer.0.ffw_layer_start.ffw_layer_1.weight": (6144, 1536),
    "model.embed_vision.embedding.weight": (128, 2048),
    "model.embed_vision.embedding_projection.weight": (2048, 2048),
    "model.embed_audio.embedding.weight": (128, 1536),
    "model.embed_audio.embedding_projection.weight": (2048, 1536),
}


def tensor_list(text: dict, *, towers: bool, kv_shared_extras: bool) -> dict[str, tuple[int, ...]]:
    """Full key -> shape, in the order they are written."""
    shapes = expected_tensors(text)
    out = {PREFIX + k: v for k, v in shapes.items()}
    if kv_shared_extras:
        # Hub checkpoints carry K/V for KV-shared layers although the model never reads them
        # (mlx-lm's loader requires them: the converter keeps them in bundles mlx-lm can read).
        out.update({PREFIX + name: shape for name, shape in kv_shared_unused(text).items()})
    if towers:
        small = int(text["hidden_size"]) < 2048
        out.update({k: tuple(min(d, 16) for d in v) if small else v for k, v in TOWER_TENSORS.items()})
    return out


def value_rule(name: str, shape: tuple[int, ...], head_dim: int, random_norms: bool) -> tuple[float, float]:
    """(mean, std) of the values of one tensor."""
    if name.endswith(("q_norm.weight", "k_norm.weight")) and not random_norms:
        return head_dim ** -0.25, 0.0
    if name.endswith(("norm.weight", "correct_output_scale")):
        return (1.0, 0.1) if random_norms else (1.0, 0.0)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
    return 0.0, 1.0 / math.sqrt(fan_in)


def plan_shards(tensors: dict[str, tuple[int, ...]], dtype: str, max_shard_bytes: int) -> list[list[str]]:
    """Greedy, in order, like transformers' sharding: a tensor larger than the limit gets its own."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in tensors.items():
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _header(names: list[str], tensors: dict, dtype: str) -> tuple[bytes, int]:
    header, offset = {}, 0
    for name in names:
        nbytes = math.prod(tensors[name]) * ITEMSIZE[dtype]
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(tensors[name]),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return len(raw).to_bytes(8, "little") + raw, offset


def _values(n: int, mean: float, std: float, dtype: str, seed: tuple[int, ...]) -> bytes:
    """One block's bytes: `n` values ~ N(mean, std) from a generator of its own (`seed`), so
    blocks can be drawn in parallel and still come out the same whatever the thread count."""
    if std == 0.0:
        values = np.full(n, mean, dtype=np.float32)
    else:
        values = np.random.default_rng(seed).standard_normal(n, dtype=np.float32)
        values *= std
        if mean:
            values += mean
    if dtype == "bfloat16":
        # The upper half of a little-endian float32 is its bfloat16 truncation.
        return values.view(np.uint16)[1::2].tobytes()
    if dtype == "float16":
        return values.astype(np.float16).tobytes()
    return values.tobytes()


def _write_values(f, count: int, mean: float, std: float, dtype: str, seed: tuple[int, ...], block: int,
                  pool: ThreadPoolExecutor) -> None:
    """The tensor's values, block by block (numpy draws them with the GIL released, so the pool's
    threads fill several blocks at once), written in order."""
    starts = range(0, count, block)
    window = 2 * pool._max_workers  # blocks in flight: memory stays a few blocks whatever the tensor
    for w in range(0, len(starts), window):
        for data in pool.map(lambda i: _values(min(block, count - starts[i]), mean, std, dtype, (*seed, i)),
                             range(w, min(w + window, len(starts)))):
            f.write(data)


def make_checkpoint(out: str | os.PathLike, size: str = "e2b", *, dtype: str = "bfloat16",
                    towers: bool = False, kv_shared_extras: bool = True, random_norms: bool = False,
                    max_shard_bytes: int = 5 * 10**9, block_bytes: int = 64 << 20, seed: int = 0,
                    quiet: bool = True) -> Path:
    """Write the checkpoint into `out`: new, or an empty directory; never over files.

    It is written into a hidden sibling (`.NAME.partial-PID`) and renamed into place whole, so a
    killed or failed run leaves no `out` that a later run would take for a checkpoint (a failed
    run removes its partial directory; a killed one leaves it, hidden, under its own name).
    """
    out = Path(out)
    if (out / "config.json").exists():
        raise FileExistsError(f"{out} already holds a checkpoint")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    partial.mkdir()
    try:
        _write_checkpoint(partial, size, dtype=dtype, towers=towers, kv_shared_extras=kv_shared_extras,
                          random_norms=random_norms, max_shard_bytes=max_shard_bytes,
                          block_bytes=block_bytes, seed=seed, quiet=quiet)
        try:
            os.rename(partial, out)  # replaces an empty directory, never one that filled meanwhile
        except OSError as e:
            raise FileExistsError(f"{out} was filled while the checkpoint was written ({e.strerror})") from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # ours: made above under this process's id
        raise
    return out


def _write_checkpoint(out: Path, size: str, *, dtype: str, towers: bool, kv_shared_extras: bool,
                      random_norms: bool, max_shard_bytes: int, block_bytes: int, seed: int,
                      quiet: bool) -> None:
    text = text_config(size)
    tensors = tensor_list(text, towers=towers, kv_shared_extras=kv_shared_extras)
    shards = plan_shards(tensors, dtype, max_shard_bytes)
    block = max(1, block_bytes // 4)
    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    weight_map, total, t0 = {}, 0, time.perf_counter()
    for i, names in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, nbytes = _header(names, tensors, dtype)
        with open(out / fname, "wb") as f:
            f.write(header)
            for name in names:
                mean, std = value_rule(name, tensors[name], int(text["head_dim"]), random_norms)
                _write_values(f, math.prod(tensors[name]), mean, std, dtype, (seed, len(weight_map)), block, pool)
                weight_map[name] = fname
        total += nbytes
        if not quiet:
            print(f"{fname}: {len(names)} tensors, {nbytes / 1e9:.2f} GB "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(full_config(text, dtype), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0, "do_sample": False}, indent=2) + "\n")
    _write_tokenizer(out, int(text["vocab_size"]))


def _write_tokenizer(out: Path, vocab_size: int) -> None:
    """A small word-level tokenizer, so tools that insist on one (mlx_lm.convert) can run.

    Its ids cover only a sliver of the 262 400-entry vocabulary (benchmarks feed token ids), and
    never reach past the model's `vocab_size` (the converter refuses a tokenizer that does).
    """
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    words = specials + [f"w{i}" for i in range(min(1000, vocab_size - len(specials)))]
    words[105], words[106] = "<start_of_turn>", "<end_of_turn>"  # Gemma's turn markers' ids
    vocab = {w: i for i, w in enumerate(words)}
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": vocab[t], "content": t, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}
                         for t in specials + ["<start_of_turn>", "<end_of_turn>"]],
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }
    (out / "tokenizer.json").write_text(json.dumps(tokenizer))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": 32768}, indent=2) + "\n")


def checkpoint_bytes(size: str, dtype: str = "bfloat16", *, towers: bool = False,
                     kv_shared_extras: bool = True) -> int:
    tensors = tensor_list(text_config(size), towers=towers, kv_shared_extras=kv_shared_extras)
    return sum(math.prod(s) for s in tensors.values()) * ITEMSIZE[dtype]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="directory to write (created)")
    p.add_argument("--size", choices=["e2b", "e4b", "e2b-narrow", "e4b-narrow", "tiny"], default="e2b")
    p.add_argument("--dtype", choices=list(SAFETENSORS_DTYPES), default="bfloat16")
    p.add_argument("--towers", action="store_true", help="add stand-in vision/audio tower tensors")
    p.add_argument("--no-kv-shared-extras", dest="kv_shared_extras", action="store_false",
                   help="leave out the unused K/V of KV-shared layers (hub checkpoints carry them; "
                        "mlx-lm's loader needs them)")
    p.add_argument("--random-norms", action="store_true",
                   help="norm scales ~N(1, 0.1) instead of 1 (and q/k norms head_dim^-1/4)")
    p.add_argument("--max-shard-size", type=float, default=5.0, metavar="GB")
    p.add_argument("--block-mb", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    need = checkpoint_bytes(a.size, a.dtype, towers=a.towers, kv_shared_extras=a.kv_shared_extras)
    out = Path(a.out)
    probe = out.absolute()
    while not probe.exists():  # the free space where the checkpoint will go
        probe = probe.parent
    free = os.statvfs(probe).f_bavail * os.statvfs(probe).f_frsize
    if need > free:
        print(f"{out}: needs {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free", file=sys.stderr)
        return 2
    try:
        t0 = time.perf_counter()
        make_checkpoint(out, a.size, dtype=a.dtype, towers=a.towers, kv_shared_extras=a.kv_shared_extras,
                        random_norms=a.random_norms, max_shard_bytes=int(a.max_shard_size * 1e9),
                        block_bytes=a.block_mb << 20, seed=a.seed, quiet=a.quiet)
    except (FileExistsError, NotADirectoryError) as e:
        print(str(e), file=sys.stderr)
        return 2
    if not a.quiet:
        print(f"{out}: {a.size} {a.dtype}, {need / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
