"""What a user sees from both programs, through the real CLI (`python -m convert`,
`python -m runtime` in a subprocess): the words, the stream they go to, the exit code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.checkpoints import make_checkpoint

REPO = Path(__file__).resolve().parents[1]


def run(*args, stdin=None, env=None, cwd=None):
    full_env = {k: v for k, v in os.environ.items() if k not in ("MTL_CAPTURE_ENABLED", "MLX_PREPARED_CAPTURE_DECODE")}
    full_env.update(env or {})
    full_env = {k: v for k, v in full_env.items() if v is not None}  # None: unset
    return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True, input=stdin,
                          env=full_env, cwd=cwd or REPO, timeout=300)


def one_error(r, code: int = 2) -> str:
    """The one line stderr holds, which must be an `error:` line, with exit code `code`."""
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


@pytest.mark.parametrize("args", [
    ("convert", "--target", "generic", "no/such/dir/x", "OUT"),                    # a ConvertError
    ("convert", "--dtype", "int3", "SRC", "OUT"),                                   # a usage error
    ("runtime", "generate", "no-such-bundle", "--prompt", "hi"),                   # a load error
    ("runtime", "generate", "B", "--prompt", "hi", "--top-p", "2"),                # a usage error
    ("runtime", "publish", "SRC", "acme/x"),                                       # the hub's error
    ("runtime", "calibrate", "--config", "SRC/nothing.json"),                       # calibrate's error
    ("runtime", "verify", "SRC"),                                                   # verify's own line
])
def test_both_programs_spell_an_error_the_same_way(tmp_path, args):
    src = make_checkpoint(tmp_path / "src")
    args = [str(src) if a == "SRC" else str(tmp_path / "out") if a == "OUT" else a for a in args]
    args = [str(tmp_path / "b") if a == "B" else a for a in args]
    one_error(run(*args))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny checkpoint and its generic bundle, made by the real CLI."""
    root = tmp_path_factory.mktemp("user-view")
    src = make_checkpoint(root / "src")
    from tests.test_tokenizer import byte_level_tokenizer

    byte_level_tokenizer().save(str(src / "tokenizer.json"))
    r = run("convert", "--target", "generic", src, root / "bundle")
    assert r.returncode == 0, r.stderr
    return src, root / "bundle"


def test_a_bundle_given_to_convert_is_named_as_one(tiny, tmp_path):
    src, bundle = tiny
    line = one_error(run("convert", "--target", "generic", bundle, tmp_path / "again"))
    assert line == (f"error: {bundle}: a prepared bundle (manifest.yaml), not a checkpoint: convert wants the "
                    f"original checkpoint it was made from ({src.resolve()}); a bundle runs as it is: "
                    f"python -m runtime generate {bundle} --prompt ...")
    assert not (tmp_path / "again").exists()
    # A bundle whose manifest cannot be read is still named a bundle (without its origin).
    import shutil

    broken = shutil.copytree(bundle, tmp_path / "broken")
    (broken / "manifest.yaml").write_text("not: [a manifest")
    line = one_error(run("convert", "--target", "generic", broken, tmp_path / "again"))
    assert line.startswith(f"error: {broken}: a prepared bundle (manifest.yaml), not a checkpoint: convert wants "
                           "the original checkpoint; ")


def _commands(command, path=()):
    """(path, command) for a click command and, for a group, every command under it."""
    import click

    yield path, command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _commands(sub, path + (name,))


def test_every_option_of_every_command_says_what_it_does():
    import click

    from convert.cli import command as convert_command
    from runtime.cli import main as runtime_main

    silent = []
    for program, root in (("convert", convert_command), ("runtime", runtime_main)):
        for path, command in _commands(root, (program,)):
            for param in command.params:
                if isinstance(param, click.Option) and not param.hidden and not (param.help or "").strip():
                    silent.append(" ".join(path) + " " + "/".join(param.opts))
    assert silent == [], f"options without help text: {silent}"
    assert len(list(_commands(runtime_main))) >= 7  # generate, chat, bench, verify, calibrate, publish: walked


def test_model_option_is_taken_for_the_bundle_as_mlx_lm_users_type_it(tiny):
    _, bundle = tiny
    plain = run("runtime", "generate", bundle, "--prompt", "abc", "--max-tokens", "5")
    habit = run("runtime", "generate", "--model", bundle, "--prompt", "abc", "--max-tokens", "5")
    assert plain.returncode == habit.returncode == 0, (plain.stderr, habit.stderr)
    assert habit.stdout == plain.stdout
    r = run("runtime", "verify", "--model", bundle)
    assert r.returncode == 0 and r.stdout.startswith(f"ok: {bundle}: "), r.stderr
    assert one_error(run("runtime", "generate", "--model", bundle, bundle, "--prompt", "abc")) == (
        f"error: the bundle is given twice ({bundle} and --model {bundle}); give it once")
    assert one_error(run("runtime", "bench", "--runs", "1")) == (
        "error: missing BUNDLE: a bundle directory or a hub id (org/name), first after the command")


def _prompt_tokens(r) -> int:
    stats = [line for line in r.stderr.splitlines() if line.startswith("prompt: ")]  # notes may follow it
    assert len(stats) == 1, r.stderr
    return int(stats[0].split()[1])


def test_prompt_from_stdin_loses_one_final_newline(tiny):
    _, bundle = tiny
    typed = run("runtime", "generate", bundle, "--prompt", "abc", "--max-tokens", "6")
    for stdin in ("abc\n", "abc\r\n", "abc"):  # `echo abc |`, a file from Windows, `printf abc |`
        piped = run("runtime", "generate", bundle, "--prompt", "-", "--max-tokens", "6", stdin=stdin)
        assert piped.returncode == 0, piped.stderr
        assert (piped.stdout, _prompt_tokens(piped)) == (typed.stdout, _prompt_tokens(typed)), repr(stdin)
    two = run("runtime", "generate", bundle, "--prompt", "-", "--max-tokens", "6", stdin="abc\n\n")
    assert _prompt_tokens(two) == _prompt_tokens(typed) + 1  # only one newline is the shell's


def _decode_row(r) -> list[str]:
    return next(line for line in r.stdout.splitlines() if line.startswith("decode tok/s")).split()[-2:]


def test_bench_gives_no_decode_rate_from_one_step(tiny):
    _, bundle = tiny
    args = ("runtime", "bench", bundle, "--prompt-tokens", "8", "--runs", "1")
    one = run(*args, "--generation-tokens", "2")
    assert one.returncode == 0, one.stderr
    assert _decode_row(one) == ["n/a", "n/a"]
    warned = [line for line in one.stderr.splitlines() if line.startswith("warning: --generation-tokens")]
    assert warned == ["warning: --generation-tokens 2 decodes 1 step after the prefill: one sample, not a rate; "
                      "give 5 or more for a decode rate"]
    enough = run(*args, "--generation-tokens", "5")
    assert enough.returncode == 0, enough.stderr
    assert all(float(x) > 0 for x in _decode_row(enough)) and "--generation-tokens" not in enough.stderr


def test_float16_is_warned_once_with_the_advice_to_use_bfloat16(tiny, tmp_path):
    import warnings

    from convert import plan
    from convert.errors import Float16Warning

    src, _ = tiny
    r = run("convert", "--target", "generic", "--dtype", "float16", src, tmp_path / "f16")
    assert r.returncode == 0, r.stderr
    warned = [line for line in r.stderr.splitlines() if line.startswith("warning: ")]
    assert warned == ["warning: --dtype float16: Gemma models can overflow float16 (activations past its largest "
                      "value, 65504, turn infinite, then NaN); use --dtype bfloat16, the same size"]
    r = run("convert", "--target", "generic", "--dtype", "bfloat16", "--dry-run", src, tmp_path / "bf16")
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    with pytest.warns(Float16Warning, match="use --dtype bfloat16"):  # the API's category
        plan(src, target="generic", dtype="float16")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Float16Warning)
        plan(src, target="generic", dtype="bfloat16")


@pytest.fixture(scope="module")
def short_context(tmp_path_factory):
    """A bundle of a model whose context (max_position_embeddings) is 24 tokens."""
    from tests.checkpoints import tiny_text_config
    from tests.test_tokenizer import byte_level_tokenizer

    root = tmp_path_factory.mktemp("short-context")
    src = make_checkpoint(root / "src", text_config=tiny_text_config(max_position_embeddings=24))
    byte_level_tokenizer().save(str(src / "tokenizer.json"))
    r = run("convert", "--target", "auto", src, root / "bundle")  # this device's: --strict refuses no target
    assert r.returncode == 0, r.stderr
    return root / "bundle"


def test_a_prompt_past_the_context_is_warned_or_refused_with_strict(short_context):
    bundle = short_context
    within = run("runtime", "generate", bundle, "--prompt", "abcdef", "--max-tokens", "8")
    assert within.returncode == 0 and "warning" not in within.stderr, within.stderr  # nor a target warning
    prompt_tokens = _prompt_tokens(within)
    args = ("runtime", "generate", bundle, "--prompt", "abcdef", "--max-tokens", str(25 - prompt_tokens))
    past = run(*args)
    assert past.returncode == 0, past.stderr
    warned = [line for line in past.stderr.splitlines() if line.startswith("warning: a prompt")]
    assert warned == [f"warning: a prompt of {prompt_tokens} tokens plus up to {25 - prompt_tokens} generated is 25 "
                      "tokens, past the model's context of 24 (max_position_embeddings), where its text is unreliable"]
    refused = one_error(run(*args, "--strict"))
    assert refused == warned[0].replace("warning: ", "error: ", 1) + " (--strict)"
    # bench prefills and generates the same counts run after run: warned once, not once per run
    r = run("runtime", "bench", bundle, "--prompt-tokens", "20", "--generation-tokens", "5", "--runs", "2")
    assert r.returncode == 0 and r.stderr.count("past the model's context of 24") == 1, r.stderr


def test_the_api_warns_with_a_category_that_can_refuse(short_context):
    import warnings

    from runtime import load
    from runtime.generate import ChatSession, ContextLengthWarning, generate

    model, tokenizer = load(short_context)
    with pytest.warns(ContextLengthWarning, match="is 30 tokens, past the model's context of 24"):
        generate(model, tokenizer, list(range(3, 13)), max_tokens=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ContextLengthWarning)
        with pytest.raises(ContextLengthWarning):
            generate(model, tokenizer, list(range(3, 13)), max_tokens=20)
        generate(model, tokenizer, list(range(3, 13)), max_tokens=14)  # 24: within
        session = ChatSession(model, tokenizer, max_tokens=4)
        "".join(r.text for r in session.send("ab"))
        with pytest.raises(ContextLengthWarning, match="in the cache"):  # what the cache holds counts
            "".join(r.text for r in session.send("abcdefgh"))


def test_convert_and_verify_count_a_bundle_in_the_same_words(tmp_path):
    import re

    src = make_checkpoint(tmp_path / "src", "mlx-lm")
    plan = run("convert", "--target", "m5", "--dry-run", src, tmp_path / "b")
    assert plan.returncode == 0, plan.stderr
    naming = next(line for line in plan.stdout.splitlines() if line.startswith("naming "))
    # The README's words for this naming (Hugging Face's, without the towers), not an internal code.
    assert naming == ("naming   Hugging Face, model.language_model.*, without the vision/audio towers "
                      "(as mlx-lm saves it)")
    planned = re.search(r"tensors  (\d+) written \((\d+) manifest records\)", plan.stdout).groups()
    wrote = run("convert", "--target", "m5", src, tmp_path / "b")
    assert wrote.returncode == 0, wrote.stderr
    converted = re.search(rf"wrote {tmp_path / 'b'}: (\d+) tensors \((\d+) manifest records\) in 1 shard",
                          wrote.stdout).groups()
    ok = run("runtime", "verify", tmp_path / "b")
    verified = re.fullmatch(rf"ok: {tmp_path / 'b'}: \d+ files, (\d+) tensors and (\d+) manifest records match "
                            r"manifest.yaml; manifest.yaml matches manifest.sha256\n", ok.stdout).groups()
    assert planned == converted == verified
    import safetensors

    with safetensors.safe_open(tmp_path / "b" / "model.safetensors", "np") as f:
        assert int(verified[0]) == len(list(f.keys()))  # tensors: what the shards hold


@pytest.mark.parametrize("where", ["background", "here"])
def test_a_first_run_says_kernels_are_compiling_and_a_warm_one_does_not(tiny, tmp_path, where):
    """MLX writes the kernels it compiles under $TMPDIR/mlx/<version>/: an empty TMPDIR is a
    machine where this model never ran (a real compilation, tens of seconds on 2 cores). By
    default a background process compiles them (runtime/precompile.py); with
    --no-background-compile this one does, at its first compiled step."""
    import mlx.core as mx

    if mx.metal.is_available():
        pytest.skip("Metal compiles in-process and caches nothing under TMPDIR")
    _, bundle = tiny
    env = {"TMPDIR": str(tmp_path), "MLX_PTX_CACHE_DIR": None}  # CUDA's cache under TMPDIR too
    args = ("runtime", "generate", bundle, "--prompt", "abc", "--max-tokens", "2",
            *(["--no-background-compile"] if where == "here" else []))
    cold, warm = run(*args, env=env), run(*args, env=env)
    assert cold.returncode == warm.returncode == 0, (cold.stderr, warm.stderr)
    cache = tmp_path / "mlx" / mx.__version__ / ("cpu" if mx.default_device() == mx.cpu else "ptx")
    notes = [line for line in cold.stderr.splitlines()
             if line.startswith("note: ") and "runs correctly here" not in line]  # not the layout note
    if where == "here":
        assert notes == ["note: MLX is compiling kernels this model needs for the first time on this machine (up to "
                         f"two minutes on a GPU, once: they are cached in {cache})"]
    else:
        assert notes[0] == ("note: this model's decode kernels were never compiled on this machine: a background "
                            "process compiles them (once; minutes on a GPU) while decoding runs without them, more "
                            "slowly"), cold.stderr
        assert notes[1:] in ([], ["note: waiting for the background compilation to finish, so that the next run "
                                  "starts fast (Ctrl-C skips)"]), cold.stderr
    assert any(cache.iterdir())  # what the note rests on
    warm_notes = [n for n in warm.stderr.splitlines() if n.startswith("note: ") and "runs correctly" not in n]
    assert warm_notes == [] and warm.stdout == cold.stdout, warm.stderr


def _megabytes(text: str) -> float:
    value, unit = text.split()
    return float(value) * {"kB": 1e-3, "MB": 1.0, "GB": 1e3}[unit]


@pytest.fixture(scope="module")
def buffer_heavy(tmp_path_factory):
    """A checkpoint whose writer buffers dominate a run's memory: a 64 MB bfloat16 embedding,
    8 MB projections (150 MB in all)."""
    import mlx.core as mx

    from tests.checkpoints import tiny_text_config

    n = 5
    config = tiny_text_config(num_hidden_layers=n, hidden_size=2048, intermediate_size=[512] * n,
                              layer_types=["sliding_attention"] * 4 + ["full_attention"], num_kv_shared_layers=0,
                              activation_sparsity_pattern=[0.0] * n, vocab_size=16384, head_dim=64,
                              num_attention_heads=2, num_key_value_heads=1)
    return make_checkpoint(tmp_path_factory.mktemp("buffer-heavy") / "src", "mlx-lm", text_config=config,
                           dtype=mx.bfloat16)


@pytest.mark.parametrize("options", [["--target", "generic"], ["--target", "m5"],
                                     ["--target", "m5", "--dtype", "float32"],
                                     ["--target", "cuda", "--quantize", "4"]])
def test_the_dry_runs_peak_memory_is_a_bound_on_the_runs(buffer_heavy, tmp_path, options):
    """The peak `--dry-run` predicts is not exceeded by the real run's (the resident high-water
    mark). Before the writer's buffers were mapped (malloc kept outgrown ones for reuse) and
    counted by name, the generic run here peaked 0.4 MB above the prediction, and a full-size
    E2B for m5 25 MB above (686 MB for 661)."""
    import re

    src = buffer_heavy
    planned = run("convert", *options, "--dry-run", src, tmp_path / "out")
    assert planned.returncode == 0, planned.stderr
    bound = _megabytes(re.search(r"peak memory at most  (.+)", planned.stdout).group(1))
    done = run("convert", *options, src, tmp_path / "out")
    assert done.returncode == 0, done.stderr
    peak = _megabytes(re.search(r"peak memory (\S+ \S+) \(planned: at most ", done.stdout).group(1))
    assert peak <= bound, (peak, bound)
    if "--quantize" not in options:  # and a useful bound (MLX's share of a quantization is guessed high)
        assert bound <= peak * 1.1, (peak, bound)
