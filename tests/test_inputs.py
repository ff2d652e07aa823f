"""Values a caller hands the runtime: token ids, prompts, sampling values, counts, and Ctrl-C.

Each public door (runtime.generate, stream_generate, ChatSession, generate_step, SamplingParams)
refuses a bad value with a TypeError or ValueError saying what is wrong, before the model reads a
table with it; the CLI prints the same line and exits 2. Before this, `[2, 10**6]` segfaulted and
`[2, 600]` on the 512-token demo read past the embedding table (a different text on each run);
`prefill_step_size=0` looped forever; a NaN temperature sampled garbage.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import tokenizers
from click.testing import CliRunner

import runtime
from convert.cli import command as convert_command
from runtime.generate import ChatSession, generate_step, stream_generate
from runtime.sampling import SamplingParams
from runtime.verify import verify_bundle
from tests.checkpoints import make_checkpoint, tiny_text_config
from tests.runtime_helpers import convert, load_quietly, text_checkpoint

REPO = Path(__file__).resolve().parents[1]
VOCAB = tiny_text_config()["vocab_size"]  # 320


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return text_checkpoint(tmp_path_factory.mktemp("inputs") / "src")


@pytest.fixture(scope="module")
def bundle(source, tmp_path_factory) -> Path:
    return convert(source, tmp_path_factory.mktemp("inputs-b") / "bundle", "generic")


@pytest.fixture(scope="module")
def loaded(bundle):
    return load_quietly(bundle)


BAD_IDS = [
    ([2, 10**6], ValueError, "token id 1000000 at position 1 is outside the model's vocabulary [0, 320)"),
    ([2, VOCAB], ValueError, "token id 320 at position 1 is outside the model's vocabulary [0, 320)"),
    ([2, -1], ValueError, "token id -1 at position 1 is outside"),
    ([2, 2**63], ValueError, f"token id {2**63} at position 1 is outside"),
    ([2, 2.0], TypeError, "token ids must be integers; position 1 holds float 2.0"),
    ([2, True], TypeError, "position 1 holds a bool"),
    ([2, "7"], TypeError, "position 1 holds str '7'"),
    ([2, None], TypeError, "position 1 holds NoneType None"),
    (b"\x02\x07", TypeError, "token ids must be a sequence of integers, not bytes"),
    (42, TypeError, "token ids must be a sequence of integers, not int"),
    (mx.array([2, 400]), ValueError, "token id 400 at position 1 is outside"),
    (mx.array([[2, 5], [7, -3]]), ValueError, "token id -3 at position 3 is outside"),
    (mx.array([[[2, 5]]]), ValueError, "token ids must be an array [n] or [batch, n], not one of shape (1, 1, 2)"),
    # generation decodes one sequence: a batch's rows were once joined into one prompt
    (mx.array([[2, 10, 20], [2, 30, 40]]), ValueError, "a prompt is one sequence of token ids ([n] or [1, n]); "
     "got a batch of shape (2, 3)"),
    (mx.array([2.0, 5.0]), TypeError, "token ids must be integers, not an array of mlx.core.float32"),
    (np.array([2, 999]), ValueError, "token id 999 at position 1 is outside"),
]


@pytest.mark.parametrize("ids, error, says", BAD_IDS, ids=[str(i) for i in range(len(BAD_IDS))])
def test_every_door_refuses_bad_token_ids(loaded, ids, error, says):
    model, tok = loaded
    doors = {
        "generate": lambda: runtime.generate(model, tok, ids, max_tokens=2),
        "stream_generate": lambda: next(stream_generate(model, tok, ids, max_tokens=2)),
        "generate_step": lambda: next(generate_step(ids, model, max_tokens=2)),
    }
    for name, call in doors.items():
        with pytest.raises(error) as e:
            call()
        assert says in str(e.value) and "\n" not in str(e.value), (name, str(e.value))


class _Spy:
    """A model that records every id it is given (the eager path), so a test can tell that no id
    outside the vocabulary ever reached an embedding table."""

    def __init__(self, model):
        self.model, self.fed = model, []

    def __call__(self, ids, cache=None):
        self.fed += ids.reshape(-1).tolist()
        return self.model(ids, cache=cache)

    def __getattr__(self, name):
        return getattr(self.model, name)


WIDEN = [lambda tokens, logits: mx.concatenate([logits, mx.full((1, 8), 1e9, logits.dtype)], axis=-1)]
BAD_SAMPLERS = [
    ({"sampler": lambda lp: mx.array([10**6])}, ValueError,
     "the sampler returned token id 1000000, outside the model's vocabulary [0, 320)"),
    ({"sampler": lambda lp: mx.array([-1], mx.int32)}, ValueError, "the sampler returned token id -1, outside"),
    ({"logits_processors": WIDEN}, ValueError, "the sampler returned token id 320, outside"),  # logits widened
    ({"sampler": lambda lp: "7"}, TypeError, "sampler must return an integer mx.array of token ids, not str"),
    ({"sampler": lambda lp: mx.array([1.0])}, TypeError, "not an array of mlx.core.float32"),
    ({"sampler": lambda lp: mx.array([1, 2])}, ValueError, "one token id for the one sequence, not an array of shape"),
    ({"sampler": 5}, TypeError, "sampler must be callable"),
    # A processor's result (an IndexError, an argmax TypeError, an MLX "length-1 arrays" error):
    ({"logits_processors": [lambda t, logits: logits.sum()]}, TypeError,
     "must return an mx.array of logits [1, vocab], not an array of shape ()"),
    ({"logits_processors": [lambda t, logits: None]}, TypeError, "[1, vocab], not NoneType"),
    ({"logits_processors": [lambda t, logits: mx.concatenate([logits, logits])]}, TypeError,
     "[1, vocab], not an array of shape (2, 320)"),
]


@pytest.mark.parametrize("kwargs, error, says", BAD_SAMPLERS, ids=[str(i) for i in range(len(BAD_SAMPLERS))])
def test_ids_a_callers_sampler_chooses_are_checked_before_the_model_reads_them(loaded, kwargs, error, says):
    """A caller's sampler (mlx-lm's `sampler=`) is a door too: an id it returned outside the
    vocabulary was fed to the embedding table (a read past it, a segfault), a str was an
    AttributeError. The id is refused where it is handed out; until then the model reads 0."""
    model, _ = loaded
    spy = _Spy(model)
    for subject, compiled in ((model, None), (spy, False)):
        with pytest.raises(error) as e:
            list(generate_step([2, 17, 33], subject, max_tokens=4, compiled=compiled, **kwargs))
        assert says in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert all(0 <= i < VOCAB for i in spy.fed), spy.fed


def test_good_ids_in_any_container_generate_the_same(loaded):
    model, tok = loaded
    want = runtime.generate(model, tok, [2, 17, 33, VOCAB - 1], max_tokens=4)
    for ids in ((2, 17, 33, VOCAB - 1), np.array([2, 17, 33, VOCAB - 1]), mx.array([2, 17, 33, VOCAB - 1]),
                mx.array([[2, 17, 33, VOCAB - 1]]), [np.int64(2), 17, 33, VOCAB - 1]):
        assert runtime.generate(model, tok, ids, max_tokens=4) == want
    steps = [t for t, _ in generate_step([2, 17, 33, VOCAB - 1], model, max_tokens=4)]
    for compiled in (True, False):  # a [1, n] array is the same one sequence through generate_step
        assert [t for t, _ in generate_step(mx.array([[2, 17, 33, VOCAB - 1]]), model, max_tokens=4,
                                            compiled=compiled)] == steps


def test_chat_refuses_ids_its_tokenizer_makes_outside_the_vocabulary(loaded, bundle, tmp_path):
    """A tokenizer with added tokens past vocab_size: the session says so and stays usable."""
    model, tok = loaded
    backend = tokenizers.Tokenizer.from_str(tok.backend.to_str())
    backend.add_tokens([f"<extra_{i}>" for i in range(40)])  # ids 292..331, past 320
    wide = runtime.tokenizer.Tokenizer(backend, eos_token_ids=tok.eos_token_ids)
    session = ChatSession(model, wide, max_tokens=2)
    with pytest.raises(ValueError, match=r"token id 3[23]\d at position \d+ is outside the model's vocabulary"):
        list(session.send("hi <extra_39>"))
    assert session._turns == 0  # refused before the session changed
    assert len(list(session.send("hi"))) >= 1


@pytest.mark.parametrize("message, error, says", [
    ("caf\udce9", ValueError, "message is not valid UTF-8 (byte 0xe9 at character 3)"),
    ("\ud800", ValueError, "message is not valid UTF-8 (lone surrogate \\ud800 at character 0)"),
    (b"hi", TypeError, "message must be a str, not bytes"),
])
def test_chat_refuses_text_that_is_not_unicode(loaded, message, error, says):
    model, tok = loaded
    with pytest.raises(error) as e:
        list(ChatSession(model, tok, max_tokens=2).send(message))
    assert str(e.value) == says


def test_a_text_prompt_must_be_valid_unicode(loaded):
    model, tok = loaded
    with pytest.raises(ValueError, match=r"prompt is not valid UTF-8 \(byte 0xff at character 2\)"):
        runtime.generate(model, tok, "hi\udcff", max_tokens=2)


@pytest.mark.parametrize("kwargs, error, says", [
    (dict(prefill_step_size=0), ValueError, "prefill_step_size must be >= 1, got 0"),
    (dict(prefill_step_size=2.5), TypeError, "prefill_step_size must be an integer, not float 2.5"),
    (dict(max_tokens=-1), ValueError, "max_tokens must be >= 0, got -1"),
    (dict(max_tokens="4"), TypeError, "max_tokens must be an integer, not str '4'"),
    (dict(max_tokens=True), TypeError, "max_tokens must be an integer, not bool True"),
    (dict(temperature=math.nan), ValueError, "temperature must be a finite number, got nan"),
    (dict(temperature=math.inf), ValueError, "temperature must be a finite number, got inf"),
    (dict(top_p=math.nan), ValueError, "top_p must be a finite number, got nan"),
    (dict(min_p=-math.inf), ValueError, "min_p must be a finite number, got -inf"),
    (dict(repetition_penalty=math.inf), ValueError, "repetition_penalty must be a finite number, got inf"),
    (dict(temperature="hot"), TypeError, "temperature must be a number, not str 'hot'"),
    (dict(top_k=1.5), TypeError, "top_k must be an integer, not float 1.5"),
    (dict(seed=-1), ValueError, "seed must be >= 0, got -1"),
    (dict(seed=2**64), ValueError, f"seed must be in [0, 2^64), got {2**64}"),
    (dict(seed="42"), TypeError, "seed must be an integer, not str '42'"),
    (dict(sampling="greedy"), TypeError, "sampling must be a SamplingParams, not str"),
])
def test_counts_and_sampling_values_are_checked_at_the_door(loaded, kwargs, error, says):
    model, tok = loaded
    with pytest.raises(error) as e:
        runtime.generate(model, tok, [2, 17, 33], max_tokens=kwargs.pop("max_tokens", 2), **kwargs)
    assert str(e.value) == says


@pytest.mark.parametrize("size", [2**31, 10**30])
def test_a_repetition_context_past_any_index_is_refused(loaded, size):
    """repetition_context_size=10**30 reached the history slice: a C++ std::bad_cast."""
    model, tok = loaded
    with pytest.raises(ValueError, match=f"repetition_context_size must be at most {2**31 - 1}, got {size}"):
        runtime.generate(model, tok, [2, 17, 33], max_tokens=2,
                         sampling=SamplingParams(repetition_penalty=1.2, repetition_context_size=size))


@pytest.mark.parametrize("kwargs, error, says", [
    (dict(cache="abc"), TypeError, "cache must be a list of per-layer caches from model.make_cache(), not str"),
    (dict(cache=[1, 2, 3]), TypeError, "cache must be a list of per-layer caches"),
    (dict(cache=[]), TypeError, "cache must be a list of per-layer caches"),
    (dict(capture="x.gputrace"), TypeError, "capture must be a DecodeCapture, not str"),
])
def test_cache_and_capture_are_checked_at_the_door(loaded, kwargs, error, says):
    """cache="abc", cache=[1, 2, 3], capture="x": AttributeErrors deep in the decode loop."""
    model, tok = loaded
    with pytest.raises(error, match=re.escape(says)):
        list(runtime.stream_generate(model, tok, [2, 17, 33], max_tokens=2, **kwargs))
    with pytest.raises(error, match=re.escape(says)):
        list(generate_step([2, 17, 33], model, max_tokens=2, **kwargs))


def test_a_cache_for_another_model_is_refused(loaded):
    model, tok = loaded
    with pytest.raises(ValueError, match="layer caches, but this model has"):
        list(runtime.stream_generate(model, tok, [2, 17, 33], max_tokens=2, cache=model.make_cache()[:-1]))


def test_the_largest_seed_is_taken():
    assert SamplingParams(temperature=1.0, seed=2**64 - 1).seed == 2**64 - 1


# --- the command line --------------------------------------------------------------------------

def run_runtime(*args, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MTL_CAPTURE_ENABLED", "MLX_PREPARED_CAPTURE_DECODE")}
    return subprocess.run([sys.executable, "-m", "runtime", *args], capture_output=True, cwd=REPO, env=env,
                          timeout=120, input=stdin)


def error_line(r) -> str:
    err = r.stderr.decode()
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]  # (a chat turn's stats before)
    assert r.returncode == 2 and len(lines) == 1 and err.splitlines()[-1] == lines[0], (r.returncode, err)
    return lines[0]


@pytest.mark.parametrize("args, stdin, says", [
    ([b"generate", b"B", b"--prompt", b"caf\xe9"], None,
     "error: --prompt is not valid UTF-8 (byte 0xe9 at character 3)"),
    ([b"generate", b"B", b"--prompt", b"-"], b"\xffhello",
     "error: --prompt - (stdin) is not valid UTF-8 (byte 0xff at offset 0)"),
    ([b"chat", b"B"], b"hello\n\xc3(\n", "error: chat line 2 is not valid UTF-8 (byte 0xc3 at offset 0)"),
    ([b"generate", b"B", b"--prompt", b"hi", b"--temp", b"nan"], None,
     "error: --temp must be a finite number, got nan"),
    ([b"generate", b"B", b"--prompt", b"hi", b"--top-p", b"nan"], None,
     "error: --top-p must be a finite number, got nan"),
    ([b"generate", b"B", b"--prompt", b"hi", b"--repetition-penalty", b"inf"], None,
     "error: --repetition-penalty must be a finite number, got inf"),
    ([b"chat", b"B", b"--seed", b"-1"], b"hi\n", "error: --seed must be >= 0, got -1"),
    ([b"generate", b"B", b"--prompt", b"hi", b"--seed", str(2**64).encode()], None,
     f"error: --seed must be in [0, 2^64), got {2**64}"),
    ([b"generate", b"B", b"--prompt", b"hi", b"--prefill-step-size", b"0"], None,
     "error: Invalid value for '--prefill-step-size': 0 is not in the range x>=1."),
    ([b"generate", b"B", b"--prompt", b"hi", b"--max-tokens", b"many"], None,
     "error: Invalid value for '--max-tokens': 'many' is not a valid integer range."),
    ([], None,  # click printed the whole help after "error: Usage:"
     "error: missing command: one of bench, calibrate, chat, generate, publish, serve, verify, warmup "
     "(runtime --help says more)"),
    ([b"serve", b"B", b"--client-timeout", b"nan"], None, "error: --client-timeout must be a number, got nan"),
    ([b"serve", b"B", b"--host", b"\xff", b"--port", b"0"], None,  # a TypeError from bind() before
     "error: --host is not valid UTF-8 (byte 0xff at character 0)"),
    # bench's prompt is made in memory at once: 10**12 tokens was a numpy MemoryError traceback;
    # a count of runs mistyped ran for ever
    ([b"bench", b"B", b"--prompt-tokens", b"1000000000000"], None,
     "error: Invalid value for '--prompt-tokens': 1000000000000 is not in the range 1<=x<=1048576."),
    ([b"bench", b"B", b"--runs", b"100000000000000000000"], None,
     "error: Invalid value for '--runs': 100000000000000000000 is not in the range 1<=x<=1000."),
    ([b"verify", b"--numeric", b"--runs", b"100000000000000000000", b"B"], None,
     "error: Invalid value for '--runs': 100000000000000000000 is not in the range 2<=x<=1000."),
])
def test_bad_cli_input_is_one_line_and_exit_2(bundle, args, stdin, says):
    args = [str(bundle).encode() if a == b"B" else a for a in args]
    line = error_line(run_runtime(*args, stdin=stdin))
    assert line == says


def test_convert_usage_errors_are_one_line(source, tmp_path):
    r = subprocess.run([sys.executable, "-m", "convert", "--dtype", "int3", str(source), str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "error: Invalid value for '--dtype': 'int3' is not one of 'keep', 'bfloat16', 'float16', 'float32'."]


def wait_for(predicate, proc, what: str) -> None:
    deadline = time.monotonic() + 60
    while not predicate():
        assert proc.poll() is None and time.monotonic() < deadline, (what, proc.communicate())
        time.sleep(0.01)


def test_ctrl_c_exits_130_after_cleanup(source, bundle, tmp_path):
    """SIGINT, as the terminal sends on Ctrl-C: generation stops with 130 (not click's "Aborted!"
    and 1); a conversion removes its temporary directory and lock first."""
    gen = subprocess.Popen([sys.executable, "-m", "runtime", "generate", str(bundle), "--prompt", "hi",
                            "--max-tokens", "100000", "--temp", "1", "--seed", "3"], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.set_blocking(gen.stdout.fileno(), False)
    got = bytearray()
    wait_for(lambda: got.extend(gen.stdout.read() or b"") or len(got) > 20, gen, "generating")
    gen.send_signal(signal.SIGINT)
    _, err = gen.communicate(timeout=60)
    assert gen.returncode == 130 and b"Aborted" not in err and b"Traceback" not in err, err

    big = make_checkpoint(tmp_path / "big", "hf", text_config=tiny_text_config(vocab_size=1 << 19), extra_files=False)
    conv = subprocess.Popen([sys.executable, "-m", "convert", "--target", "m5", "-q", str(big), str(tmp_path / "out")],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    shard = tmp_path / f".out.tmp-{conv.pid}" / "model.safetensors"
    wait_for(lambda: shard.exists() and shard.stat().st_size > 1_000_000, conv, "writing")
    conv.send_signal(signal.SIGINT)
    _, err = conv.communicate(timeout=60)
    assert conv.returncode == 130 and b"Aborted" not in err and b"Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big"]


# --- a tokenizer whose ids reach past the model's vocabulary ---------------------------------------

def widen(tokenizer_json: Path, extra: int = 40) -> None:
    backend = tokenizers.Tokenizer.from_file(str(tokenizer_json))
    backend.add_tokens([f"<extra_{i}>" for i in range(extra)])  # ids 292..331 for 40
    backend.save(str(tokenizer_json))


def test_convert_refuses_a_tokenizer_with_ids_past_the_vocabulary(source, tmp_path):
    src = Path(shutil.copytree(source, tmp_path / "src"))
    widen(src / "tokenizer.json")
    r = CliRunner().invoke(convert_command, ["--target", "generic", str(src), str(tmp_path / "out")])
    assert r.exit_code == 2 and r.output.strip().splitlines() == [
        f"error: {src}/tokenizer.json: token '<extra_39>' has id 331 (12 tokens at or past 320), outside the "
        "model's vocabulary [0, 320): the model has no embedding for it (config.json vocab_size)"]
    assert not (tmp_path / "out").exists()
    (src / "tokenizer.json").write_text("{not json")
    r = CliRunner().invoke(convert_command, ["--target", "generic", str(src), str(tmp_path / "out")])
    assert r.exit_code == 2 and "tokenizer.json: not a valid tokenizer.json" in r.output


def test_verify_reports_a_tokenizer_with_ids_past_the_vocabulary(bundle, tmp_path):
    b = Path(shutil.copytree(bundle, tmp_path / "bundle"))
    widen(b / "tokenizer.json")
    problems = verify_bundle(b)
    assert (f"{b / 'tokenizer.json'}: token '<extra_39>' has id 331 (12 tokens at or past 320), outside the "
            "model's vocabulary [0, 320): the model has no embedding for it") in problems, problems
    r = run_runtime("verify", str(b))
    assert r.returncode == 1 and b"outside the model's vocabulary" in r.stderr


@pytest.mark.parametrize("kwargs, says", [
    (dict(quantize="four"), "--quantize 'four' --group-size None: use integers"),
    (dict(dtype=5), "--dtype 5: use one of keep, bfloat16, float16, float32"),
    (dict(max_shard_size=-5), "--max-shard-size -5: must be positive"),
])
def test_the_converter_api_refuses_bad_values_with_a_value_error(source, tmp_path, kwargs, says):
    """convert_checkpoint's ConvertError is a ValueError too, so API callers catch it as one."""
    from convert import convert_checkpoint

    with pytest.raises(ValueError) as e:
        convert_checkpoint(source, tmp_path / "out", target="generic", **kwargs)
    assert str(e.value).endswith(says) or says in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists()

@pytest.mark.parametrize("model", [None, 42, "bundle-dir", object()])
def test_every_generation_door_refuses_what_is_not_a_model(loaded, model):
    """None, a path or a number as the model was an AttributeError from deep in the loop."""
    _, tok = loaded
    doors = {
        "generate": lambda: runtime.generate(model, tok, [2, 5], max_tokens=2),
        "stream_generate": lambda: next(stream_generate(model, tok, [2, 5], max_tokens=2)),
        "generate_step": lambda: next(generate_step([2, 5], model, max_tokens=2)),
        "ChatSession": lambda: ChatSession(model, tok),
    }
    for name, call in doors.items():
        with pytest.raises(TypeError) as e:
            call()
        assert str(e.value) == ("model must be a loaded model (runtime.load, or mlx-lm's load), not "
                                f"{type(model).__name__}"), (name, str(e.value))
