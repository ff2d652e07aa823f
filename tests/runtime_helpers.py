"""Shared pieces of the runtime tests: bundles made by the real converter, and the reference.

The reference is transformers' Gemma3nForCausalLM in float32 with eager attention, loaded
from the *source* checkpoint's files (renamed to `model.*`, LM head tied), so it shares no code
with the converter or the runtime.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np

from convert.gemma3n import expected_tensors
from manifests.safetensors_header import read_header_file
from tests.checkpoints import PREFIXES, make_checkpoint, write_tokenizer

DEMO = Path(__file__).resolve().parent.parent / "examples" / "zen-gemma3n"


# The embedded demo (examples/README.md): a trained Gemma3n, so unlike a random tiny checkpoint
# its logits are well conditioned (bfloat16 rounding is not amplified tenfold).
DEMO = Path(__file__).resolve().parent.parent / "examples" / "zen-gemma3n"


def zen_of_python() -> str:
    """The text the demo was trained on: the standard library's `this`, decoded."""
    import codecs
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        import this
    return codecs.decode(this.s, "rot13")


def convert(source: Path, out: Path, target: str, *extra: str) -> Path:
    """The real CLI, as a user runs it."""
    cmd = [sys.executable, "-m", "convert", "--target", target, "--dtype", "float32", "--quiet",
           *extra, str(source), str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return out


def load_quietly(path, **kwargs):
    """runtime.load, without the target-mismatch warning every non-CPU bundle gives here."""
    import runtime
    from runtime.loader import TargetMismatchWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TargetMismatchWarning)
        return runtime.load(path, **kwargs)


def load_tensors(directory: Path) -> dict[str, mx.array]:
    """Every tensor of every `*.safetensors` file in `directory` (a checkpoint or a bundle), by key."""
    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def raw(a: mx.array) -> bytes:
    """An array's bytes as stored (for byte-for-byte comparisons)."""
    return bytes(memoryview(a))


def source_tensors(source: Path, naming: str) -> dict[str, np.ndarray]:
    """The decoder's tensors of a source checkpoint, decoder-relative names, float32 numpy."""
    config = json.loads((source / "config.json").read_text())
    text_config = config.get("text_config", config)
    wanted = expected_tensors(text_config)
    prefix = PREFIXES[naming]
    out = {}
    for f in sorted(source.glob("*.safetensors")):
        for key, value in mx.load(str(f)).items():
            name = key[len(prefix):] if key.startswith(prefix) else None
            if name in wanted:
                out[name] = np.array(value.astype(mx.float32))
    assert out.keys() == wanted.keys()
    return out


def reference_model(text_config: dict, tensors: dict[str, np.ndarray]):
    import torch
    import transformers

    config = transformers.Gemma3nTextConfig(**text_config)
    config._attn_implementation = "eager"
    ref = transformers.Gemma3nForCausalLM(config).float().eval()
    state = {"model." + k: torch.from_numpy(v) for k, v in tensors.items()}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected, (missing, unexpected)
    assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr(), "LM head must be tied"
    assert ref.config._attn_implementation == "eager"
    return ref


def reference_logits(ref, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return ref(torch.from_numpy(ids)).logits.float().numpy()


def relative_error(ours, ref: np.ndarray) -> float:
    """max |ours - ref| / max |ref|: the parity metric of every runtime test."""
    ours = np.array(ours, dtype=np.float32)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def check_compiled_steps(model, seq: np.ndarray, ref: np.ndarray, prefill: int, end: int, bound: float,
                         capacity: int, label: str = ""):
    """One sequence (`seq` `[1, length]`, `ref` its logits): an eager prefill of `prefill` tokens,
    then every position up to `end` through the compiled decode step, each within `bound` of
    `ref`. Returns the decoder (for a hand-over back to the eager caches)."""
    from runtime.fast import CompiledDecoder

    cache = model.make_cache()
    model(mx.array(seq[:, :prefill]), cache=cache)
    decoder = CompiledDecoder(model, cache, capacity=capacity)
    for t in range(prefill, end):
        step = decoder(mx.array(seq[:, t]))
        assert relative_error(step[:, None, :], ref[:, t : t + 1]) < bound, f"{label}compiled step at position {t}"
    return decoder


def edit_manifest(bundle: Path, edit) -> None:
    """Edit the manifest and re-record its digest, so that only the edited records disagree
    (an edit without the new digest is caught on its own: tests/test_hardening.py)."""
    import yaml

    from manifests import manifest_digest_line

    manifest = yaml.safe_load((bundle / "manifest.yaml").read_text())
    edit(manifest)
    text = yaml.safe_dump(manifest, sort_keys=False)
    (bundle / "manifest.yaml").write_text(text)
    (bundle / "manifest.sha256").write_text(manifest_digest_line(text.encode()))


def nudge(bundle: Path, key: str, index: tuple[int, int], delta: float) -> None:
    """Add `delta` to one float32 element of a stored tensor, then re-record the shard's size and
    sha256 and the manifest's digest, so that plain `verify` finds nothing."""
    for shard in bundle.glob("*.safetensors"):
        entries, _, start = read_header_file(shard)
        entry = next((e for e in entries if e.name == key), None)
        if entry is not None:
            break
    else:
        raise KeyError(key)
    assert entry.dtype == "F32"
    data = bytearray(shard.read_bytes())
    at = start + entry.begin + 4 * (index[0] * entry.shape[1] + index[1])
    value = np.frombuffer(data[at:at + 4], np.float32)[0]
    data[at:at + 4] = np.float32(value + delta).tobytes()
    shard.write_bytes(bytes(data))
    record = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    edit_manifest(bundle, lambda m: m["files"].__setitem__(shard.name, record))


def make_sources(root: Path, seed: int = 0) -> dict[str, Path]:
    """Tiny checkpoints: Hugging Face naming in one file, mlx-vlm naming in three shards."""
    return {
        "hf": make_checkpoint(root / "src-hf", "hf", seed=seed),
        "mlx-vlm": make_checkpoint(root / "src-mlx-vlm", "mlx-vlm", shards=3, seed=seed),
    }


def source_and_bundles(root: Path, seed: int) -> dict[str, Path]:
    """A tiny Hugging Face checkpoint and its m5 (several shards) and generic bundles."""
    src = make_checkpoint(root / "src", "hf", seed=seed)
    return {
        "src": src,
        "m5": convert(src, root / "m5", "m5", "--max-shard-size", "700KB"),
        "generic": convert(src, root / "generic", "generic"),
    }


def demo_bundle(root: Path, target: str = "generic") -> Path:
    """The embedded demo checkpoint (a trained tiny Gemma3n with Gemma's tokenizer files and chat
    template), converted by the real CLI."""
    return convert(DEMO, Path(root) / f"demo-{target}", target)


def text_checkpoint(path: Path) -> Path:
    """A tiny Hugging Face checkpoint with a tokenizer.json, for tests that generate from text."""
    src = make_checkpoint(path, "hf")
    write_tokenizer(src)
    return src

