"""The `runtime` CLI end to end: a tiny random checkpoint with a real tokenizer.json, converted by
the real converter, driven through `python -m runtime` in a subprocess, compared with the Python
API on the same bundle."""

import os
import subprocess
import sys
import time

import pytest

from runtime import load
from runtime.generate import ChatSession, generate
from runtime.kernels import compiled_kernel_names
from runtime.sampling import SamplingParams
from tests.checkpoints import make_checkpoint
from tests.test_tokenizer import byte_level_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::runtime.loader.TargetMismatchWarning")

PROMPT = "Beautiful is better than"


def run(*args, env=None, stdin=None):
    full_env = {k: v for k, v in os.environ.items() if k not in ("MTL_CAPTURE_ENABLED", "MLX_PREPARED_CAPTURE_DECODE")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=full_env,
                          input=stdin, timeout=300)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    src = make_checkpoint(root / "src")
    byte_level_tokenizer().save(str(src / "tokenizer.json"))
    out = root / "bundle"
    r = run("convert", "--target", "generic", str(src), str(out))
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def loaded(bundle):
    return load(bundle)


def stats_line(r) -> str:
    """The one stats line of a generate run (a note about a background compilation may follow it)."""
    lines = [line for line in r.stderr.splitlines() if line.startswith("prompt: ")]
    assert len(lines) == 1, r.stderr
    return lines[0]


def assert_one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for needle in needles:
        assert needle in lines[0]


def test_generate_streams_what_the_api_generates(bundle, loaded):
    model, tokenizer = loaded
    r = run("runtime", "generate", str(bundle), "--prompt", PROMPT, "--max-tokens", "12")
    assert r.returncode == 0, r.stderr
    expected = generate(model, tokenizer, PROMPT, max_tokens=12)
    assert r.stdout == expected + "\n"
    stats = stats_line(r)
    assert stats.startswith(f"prompt: {len(tokenizer.encode(PROMPT))} tokens")
    assert "decode: " in stats and "tok/s" in stats
    assert "peak memory" in stats


def test_generate_chat_format_with_prompt_from_stdin(bundle, loaded):
    model, tokenizer = loaded
    r = run("runtime", "generate", str(bundle), "--prompt", "-", "--chat", "--max-tokens", "8", stdin=PROMPT)
    assert r.returncode == 0, r.stderr
    assert r.stdout == generate(model, tokenizer, PROMPT, max_tokens=8, chat=True) + "\n"
    chat_prompt = tokenizer.encode("<start_of_turn>user\n" + PROMPT + "<end_of_turn>\n<start_of_turn>model\n")
    assert stats_line(r).startswith(f"prompt: {len(chat_prompt)} tokens")


def test_seeded_sampling_through_the_cli(bundle, loaded):
    model, tokenizer = loaded
    args = ("runtime", "generate", str(bundle), "--prompt", PROMPT, "--max-tokens", "10", "--temp", "1.5",
            "--top-k", "50", "--top-p", "0.95", "--seed", "11")
    a, b = run(*args), run(*args)
    assert a.returncode == 0, a.stderr
    params = SamplingParams(temperature=1.5, top_k=50, top_p=0.95, seed=11)
    assert a.stdout == b.stdout == generate(model, tokenizer, PROMPT, max_tokens=10, sampling=params) + "\n"
    greedy = generate(model, tokenizer, PROMPT, max_tokens=10)
    assert a.stdout != greedy + "\n"


def test_chat_with_piped_input_keeps_the_cache(bundle, loaded):
    model, tokenizer = loaded
    r = run("runtime", "chat", str(bundle), "--max-tokens", "6", stdin="Simple is better\n\nthan complex\n")
    assert r.returncode == 0, r.stderr
    session = ChatSession(model, tokenizer, max_tokens=6)
    replies = ["".join(x.text for x in session.send(m)) for m in ("Simple is better", "than complex")]
    assert r.stdout == "".join(reply + "\n" for reply in replies)
    assert sum("tok/s" in line for line in r.stderr.splitlines()) == 2


def test_bench_reports_first_call_and_steady_state(bundle):
    r = run("runtime", "bench", str(bundle), "--prompt-tokens", "16", "--generation-tokens", "8", "--runs", "2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    header = next(line for line in lines if "first call" in line)
    assert "steady (median of 2)" in header
    rows = {line.split("  ")[0]: line.split()[-1] for line in lines}
    load_row = next(line for line in lines if line.startswith("load to ready (s)"))
    assert float(load_row.split()[-1]) > 0
    decode_row = next(line for line in lines if line.startswith("decode tok/s (8 tokens)"))
    first, steady = (float(x) for x in decode_row.split()[-2:])
    assert first > 0 and steady > 0
    assert any(k.startswith("peak memory") for k in rows)


def test_verify_clean_then_tampered(bundle, tmp_path):
    r = run("runtime", "verify", str(bundle))
    assert r.returncode == 0, r.stderr
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    r = run("runtime", "verify", str(copy))
    assert r.returncode == 1
    assert "model.safetensors" in r.stderr


def test_not_a_bundle_is_one_line_with_the_convert_command(tmp_path):
    src = make_checkpoint(tmp_path / "src")
    r = run("runtime", "generate", str(src), "--prompt", "x")
    assert_one_line_error(r, str(src), "python -m convert --target")


def test_bundle_without_tokenizer(tmp_path):
    src = make_checkpoint(tmp_path / "src")
    out = tmp_path / "bundle"
    assert run("convert", "--target", "generic", str(src), str(out)).returncode == 0
    r = run("runtime", "generate", str(out), "--prompt", "x")
    assert_one_line_error(r, "tokenizer.json")


def test_strict_target_refuses_a_foreign_bundle(bundle):
    from runtime.bundle import device_target
    if device_target() == "generic":
        pytest.skip("this device's target is generic")
    r = run("runtime", "generate", str(bundle), "--prompt", "x", "--strict-target")
    assert_one_line_error(r, "generic")


def test_capture_env_without_metal_is_a_clear_error(bundle, tmp_path):
    import mlx.core as mx
    if mx.metal.is_available():
        pytest.skip("this machine has Metal")
    env = {"MTL_CAPTURE_ENABLED": "1", "MLX_PREPARED_CAPTURE_DECODE": str(tmp_path / "d.gputrace")}
    r = run("runtime", "generate", str(bundle), "--prompt", "x", "--max-tokens", "4", env=env)
    assert_one_line_error(r, "Metal is not available")
    r = run("runtime", "generate", str(bundle), "--prompt", "x", "--max-tokens", "4",
            env={"MLX_PREPARED_CAPTURE_DECODE": str(tmp_path / "d.gputrace")})
    assert r.returncode == 0, r.stderr


def test_warmup_compiles_what_the_next_generate_needs(bundle, tmp_path):
    """`runtime warmup` on a fresh machine (a fresh `$TMPDIR`: MLX's CPU kernel cache) compiles
    the decode step's kernels; a generate after it compiles nothing, where without it the
    generate is what compiles them."""
    warm, cold = tmp_path / "warm", tmp_path / "cold"
    warm.mkdir()
    cold.mkdir()
    r = run("runtime", "warmup", str(bundle), env={"TMPDIR": str(warm)})
    assert r.returncode == 0 and r.stdout == "" and r.stderr.splitlines()[-1].startswith("warm in "), r.stderr
    compiled = compiled_kernel_names(warm)
    assert len(compiled) >= 5, compiled
    for tmp in (warm, cold):
        r = run("runtime", "generate", str(bundle), "--prompt", PROMPT, "--max-tokens", "8", env={"TMPDIR": str(tmp)})
        assert r.returncode == 0, r.stderr
    assert compiled_kernel_names(warm) == compiled and compiled_kernel_names(cold) == compiled


def test_the_compile_note_names_where_a_kernel_was_written(tmp_path, monkeypatch):
    """The note waits for a kernel, not a directory: a command makes MLX's CPU cache directory
    (empty) before loading (its cache check), which on an H100 made the note name that CPU
    directory as where the GPU's kernels went. Then a kernel in the PTX cache: named."""
    import threading

    import runtime.kernels as kernels

    cpu, ptx = tmp_path / "cpu", tmp_path / "ptx"
    monkeypatch.setattr(kernels, "kernel_cache_dirs", lambda: [cpu, ptx])
    monkeypatch.setattr(kernels, "_noted", threading.Event())
    said = []
    with kernels.noting_compilation(said.append, poll_s=0.01):
        cpu.mkdir()
        ptx.mkdir()
        time.sleep(0.2)
        assert said == []
        (ptx / "kernel.ptx").write_text("a kernel")
        deadline = time.monotonic() + 10
        while not said and time.monotonic() < deadline:
            time.sleep(0.01)
    assert said == [kernels.compile_note(ptx)]


@pytest.mark.parametrize("temp", ["missing", "a file"])
def test_the_python_api_refuses_compiled_decoding_with_such_a_directory_before_any_work(bundle, tmp_path, temp):
    """The same through the Python API: MLX's own failure was a RuntimeError that named no path
    ("filesystem error: temp_directory_path: No such file or directory"), raised by the first
    compiled step, after stream_generate had given the prompt's first token. Now a
    KernelCacheError (a RuntimeError) with the command's line, before the first token; eager
    decoding, which compiles nothing, still runs."""
    value = str(tmp_path / ("nope" if temp == "missing" else "file"))
    (tmp_path / "file").write_text("not a directory")
    env = {k: v for k, v in os.environ.items() if k not in ("TMPDIR", "TMP", "TEMP", "TEMPDIR")}
    env["TMPDIR"] = value
    script = (
        "import sys, warnings\n"
        "warnings.simplefilter('ignore')\n"
        "import runtime\n"
        "from runtime.kernels import KernelCacheError\n"
        "model, tokenizer = runtime.load(sys.argv[1])\n"
        "got = []\n"
        "try:\n"
        "    for r in runtime.stream_generate(model, tokenizer, 'Hello', max_tokens=4):\n"
        "        got.append(r.text)\n"
        "except KernelCacheError as e:\n"
        "    assert isinstance(e, RuntimeError)\n"
        "    print('refused after', len(got), 'tokens:', e)\n"
        "print('eager:', repr(runtime.generate(model, tokenizer, 'Hello', max_tokens=4, compiled=False)))\n"
    )
    r = subprocess.run([sys.executable, "-c", script, str(bundle)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    refused, eager = r.stdout.splitlines()
    assert refused == (f"refused after 0 tokens: TMPDIR={value!r} is not a directory; MLX keeps the kernels "
                       "it compiles under it; point TMPDIR at a writable directory"), refused
    assert eager.startswith("eager: '") and len(eager) > len("eager: ''"), eager


def test_warmup_refuses_a_missing_bundle_in_one_line(tmp_path):
    assert_one_line_error(run("runtime", "warmup", str(tmp_path / "nope")), str(tmp_path / "nope"))


@pytest.mark.parametrize("command", [["generate", "--prompt", PROMPT, "--max-tokens", "3"], ["warmup"], ["bench"],
                                     ["verify", "--numeric"]])
@pytest.mark.parametrize("temp", ["missing", "empty", "a file", "TMP missing"])
def test_a_temporary_directory_mlx_cannot_use_is_one_line(bundle, tmp_path, command, temp):
    """MLX keeps the kernels it compiles under C++'s temporary directory (TMPDIR, else TMP, TEMP,
    TEMPDIR, taken as set, with no fallback): one it cannot use failed the first compiled step
    with a C++ filesystem error, a traceback after the prompt. Now refused where the command
    starts, naming the variable."""
    env = {k: v for k, v in os.environ.items() if k not in ("TMPDIR", "TMP", "TEMP", "TEMPDIR")}
    name, value = {"missing": ("TMPDIR", str(tmp_path / "nope")), "empty": ("TMPDIR", ""),
                   "a file": ("TMPDIR", str(tmp_path / "file")), "TMP missing": ("TMP", str(tmp_path / "gone"))}[temp]
    (tmp_path / "file").write_text("not a directory")
    env[name] = value
    r = subprocess.run([sys.executable, "-m", "runtime", command[0], str(bundle), *command[1:]], capture_output=True,
                       text=True, env=env, timeout=300)
    assert_one_line_error(r, f"{name}={value!r}", f"point {name} at a writable directory")
