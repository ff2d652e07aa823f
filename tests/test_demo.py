"""The embedded demo: examples/zen-gemma3n, converted by the real CLI for m5 and generic, continues
the Zen of Python exactly under greedy `runtime generate`.

The expected text is the standard library's `this` module, decoded here, not a copy.
"""

import codecs
import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parent.parent / "examples" / "zen-gemma3n"
PROMPT = "Beautiful is better than"
WORDS = 30
MAX_TOKENS = 64  # about 1.6 tokens a word with the demo's tokenizer: enough for WORDS words


def zen() -> str:
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    return codecs.decode(this.s, "rot13")


def continuation() -> str:
    text = zen()
    return text[text.index(PROMPT) + len(PROMPT):]


def run(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)


def test_demo_checkpoint_is_small_and_in_hugging_face_layout():
    files = {p.name for p in DEMO.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= files
    assert sum(p.stat().st_size for p in DEMO.iterdir()) < 8 * 2**20
    config = json.loads((DEMO / "config.json").read_text())
    assert config["architectures"] == ["Gemma3nForConditionalGeneration"]
    from safetensors import safe_open
    with safe_open(str(DEMO / "model.safetensors"), "np") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("model.language_model.") for k in keys)
    from convert.gemma3n import expected_tensors
    assert {k[len("model.language_model."):] for k in keys} == set(expected_tensors(config["text_config"]))


def test_demo_tokenizer_round_trips_the_text():
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    text = zen() + "\nany text: naïve café 日本語 🙂"
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text


@pytest.mark.parametrize("target", ["m5", "generic"])
def test_demo_continues_the_zen_of_python(target, tmp_path):
    bundle = tmp_path / f"demo-{target}"
    r = run("convert", "--target", target, str(DEMO), str(bundle))
    assert r.returncode == 0, r.stderr
    manifest = (bundle / "manifest.yaml").read_text()
    assert f"name: {target}" in manifest
    r = run("runtime", "generate", str(bundle), "--prompt", PROMPT, "--max-tokens", str(MAX_TOKENS))
    assert r.returncode == 0, r.stderr
    # The quick start's first run, on any machine: the stats line, and calm notes only: at most
    # one where the bundle is laid out for another device (it runs correctly; only the layouts
    # differ), and on a machine that never ran this model, that its kernels compile in the background.
    lines = r.stderr.splitlines()
    stats = [line for line in lines if line.startswith("prompt: ")]
    notes = [line for line in lines if not line.startswith("prompt: ")]
    assert len(stats) == 1, r.stderr
    layout = [n for n in notes if "runs correctly here" in n]
    background = [n for n in notes if "background" in n]
    assert len(layout) <= 1 and len(layout) + len(background) == len(notes), r.stderr
    assert all(n.startswith("note: ") and "failed" not in n for n in notes), r.stderr
    assert r.stdout.endswith("\n")
    generated = r.stdout[:-1]
    expected = continuation()
    assert generated.split()[:WORDS] == expected.split()[:WORDS]
    assert expected.startswith(generated), (generated, expected[:len(generated) + 20])


def test_transformers_reproduces_the_demo_too():
    """The committed weights, read by the reference implementation, continue the text the same
    way: the checkpoint is a valid Gemma3n, not something only our runtime accepts."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    config = json.loads((DEMO / "config.json").read_text())
    model = transformers.Gemma3nForCausalLM(transformers.Gemma3nTextConfig(**config["text_config"])).eval()
    state = {"model." + k[len("model.language_model."):]: v
             for k, v in load_file(str(DEMO / "model.safetensors")).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    tok = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    ids = tok.encode(PROMPT).ids
    with torch.no_grad():
        for _ in range(MAX_TOKENS):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    text = tok.decode(ids[len(tok.encode(PROMPT).ids):])
    assert text.split()[:WORDS] == continuation().split()[:WORDS]
