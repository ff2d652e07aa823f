"""Build small, real Gemma3n checkpoints on disk for tests: real safetensors, real config.json.

One builder for every accepted naming, so converter and runtime tests speak of the same thing:

- ``hf``:      ``model.language_model.*`` plus vision/audio towers (Gemma3nForConditionalGeneration)
- ``mlx-lm``:  ``model.language_model.*`` without towers (what mlx_lm.convert writes)
- ``mlx-vlm``: ``language_model.model.*`` plus towers at the top level
- ``hf-text``: ``model.*`` with the text config at top level (Gemma3nForCausalLM)
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from convert.gemma3n import expected_tensors, kv_shared_unused

# At least one full and one sliding layer before the KV-shared ones (docs/GEMMA3N.md, pitfalls); the
# window (8) is shorter than the test sequences; the first half of the layers is sparse.
TINY_TEXT_CONFIG = {
    "model_type": "gemma3n_text",
    "vocab_size": 320,
    "vocab_size_per_layer_input": 256,
    "hidden_size": 64,
    "hidden_size_per_layer_input": 16,
    "intermediate_size": [128] * 5 + [96] * 5,
    "num_hidden_layers": 10,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "num_kv_shared_layers": 4,
    "laurel_rank": 8,
    "altup_num_inputs": 4,
    "altup_active_idx": 0,
    "altup_coef_clip": 120.0,
    "altup_correct_scale": True,
    "sliding_window": 8,
    "layer_types": ["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(10)],
    "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
    },
    "activation_sparsity_pattern": [0.95] * 5 + [0.0] * 5,
    "final_logit_softcapping": 30.0,
    "rms_norm_eps": 1e-6,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
}

PREFIXES = {
    "hf": "model.language_model.",
    "mlx-lm": "model.language_model.",
    "mlx-vlm": "language_model.model.",
    "hf-text": "model.",
}
TOWER_PREFIXES = {"hf": "model.", "mlx-vlm": ""}

TOWER_TENSORS = {
    "vision_tower.timm_model.conv_stem.conv.weight": (8, 3, 3, 3),
    "vision_tower.timm_model.blocks.0.0.conv_exp.weight": (16, 8, 3, 3),
    "audio_tower.subsample_conv_projection.conv_0.conv.weight": (8, 1, 3, 3),
    "audio_tower.conformer.0.attention.attn.q_proj.weight": (16, 16),
    "embed_vision.embedding.weight": (16, 64),
    "embed_vision.embedding_projection.weight": (64, 64),
    "embed_audio.embedding.weight": (16, 64),
    "embed_audio.embedding_projection.weight": (64, 64),
}


def tiny_text_config(**overrides) -> dict:
    cfg = json.loads(json.dumps(TINY_TEXT_CONFIG))
    cfg.update(overrides)
    return cfg


def random_weight(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Values that keep a tiny model numerically tame: norm scales near 1, projections small."""
    if name.endswith("norm.weight") or name.endswith("correct_output_scale"):
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    fan_in = shape[-1] if len(shape) > 1 else 1
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def full_config(text_config: dict, naming: str) -> dict:
    if naming == "hf-text":
        return dict(text_config, architectures=["Gemma3nForCausalLM"])
    return {
        "architectures": ["Gemma3nForConditionalGeneration"],
        "model_type": "gemma3n",
        "text_config": text_config,
        "vision_config": {"model_type": "gemma3n_vision", "hidden_size": 64},
        "audio_config": {"model_type": "gemma3n_audio", "hidden_size": 16},
        "eos_token_id": [1, 106],
        "tie_word_embeddings": True,
    }


def checkpoint_tensors(text_config: dict, naming: str = "hf", *, towers: bool | None = None,
                       kv_shared_extras: bool = True, seed: int = 0, dtype=mx.float32) -> dict[str, mx.array]:
    """Source key -> array for one checkpoint, without writing it."""
    rng = np.random.default_rng(seed)
    prefix = PREFIXES[naming]
    shapes = expected_tensors(text_config)
    out = {prefix + name: mx.array(random_weight(name, shape, rng)).astype(dtype) for name, shape in shapes.items()}
    if kv_shared_extras:
        # Hub checkpoints carry K/V for KV-shared layers (newer transformers saves none); the model never reads them.
        for name, shape in kv_shared_unused(text_config).items():
            out[prefix + name] = mx.array(random_weight(name, shape, rng)).astype(dtype)
    if towers is None:
        towers = naming in TOWER_PREFIXES
    if towers:
        tp = TOWER_PREFIXES.get(naming, "model.")
        for name, shape in TOWER_TENSORS.items():
            out[tp + name] = mx.array(random_weight(name, shape, rng)).astype(dtype)
    return out


def write_tensors(path: Path, tensors: dict[str, mx.array], shards: int = 1) -> None:
    names = list(tensors)
    if shards == 1:
        mx.save_safetensors(str(path / "model.safetensors"), tensors, metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, chunk in enumerate(np.array_split(np.arange(len(names)), shards)):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {names[j]: tensors[names[j]] for j in chunk}
        mx.save_safetensors(str(path / fname), part, metadata={"format": "pt"})
        for k, v in part.items():
            weight_map[k] = fname
            total += v.nbytes
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def make_checkpoint(path, naming: str = "hf", *, shards: int = 1, text_config: dict | None = None,
                    towers: bool | None = None, kv_shared_extras: bool = True, seed: int = 0,
                    dtype=mx.float32, extra_files: bool = True) -> Path:
    """Write a random tiny Gemma3n checkpoint to `path` and return it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    text_config = text_config or tiny_text_config()
    (path / "config.json").write_text(json.dumps(full_config(text_config, naming), indent=2))
    tensors = checkpoint_tensors(text_config, naming, towers=towers, kv_shared_extras=kv_shared_extras,
                                 seed=seed, dtype=dtype)
    write_tensors(path, tensors, shards)
    if extra_files:
        (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 106], "bos_token_id": 2}))
        (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
    return path


def write_tokenizer(path, vocab_size: int = 300, text: str = "the quick brown fox jumps over the lazy dog " * 20) -> Path:
    """A small byte-level BPE tokenizer.json (Gemma's special tokens first) for checkpoints that need text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    path = Path(path)
    tok.save(str(path / "tokenizer.json"))
    return path
