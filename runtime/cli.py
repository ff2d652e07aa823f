"""`runtime`: generate, chat, bench and verify on a prepared bundle.

Text goes to stdout, everything else (speeds, memory, warnings, errors) to stderr, so the
output can be piped. Errors a user can fix are one line and exit code 2.
"""

from __future__ import annotations

import contextlib
import functools
import os
import statistics
import sys
import time
import warnings

import click
import mlx.core as mx
import numpy as np

from manifests import ManifestError
from manifests.cli import NOTE_PREFIX, WARNING_PREFIX, CommandError, not_nan, run_program
from runtime.chat import user_and_system
from runtime.generate import (
    CAPTURE_PATH_ENV,
    DEFAULT_MAX_TOKENS,
    DEFAULT_PREFILL_STEP,
    CaptureError,
    ChatSession,
    ContextLengthWarning,
    GenerationResponse,
    stream_generate,
    warm_up,
)
from runtime.inputs import BadType, BadValue, check_text, decode_text
from runtime.kernels import kernel_cache_problem, noted, noting_compilation
from runtime.numeric import MAX_RUNS
from runtime.sampling import SamplingParams


class UserError(CommandError):
    """Bad input: one `error:` line, exit 2 (manifests/cli.py)."""


def _set_strict(ctx, param, value):
    ctx.meta["runtime.strict"] = ctx.meta.get("runtime.strict", False) or value


def _strict() -> bool:
    """Whether --strict was given: every warning refuses instead (see strict_option)."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.meta.get("runtime.strict"))


strict_option = click.option(
    "--strict", is_flag=True, expose_value=False, callback=_set_strict,
    help="refuse instead of warning: a bundle prepared for another device class (as --strict-target), "
         "a prompt plus the tokens to generate past the model's context")


@contextlib.contextmanager
def _generation_warnings():
    """Generation's warnings (a prompt past the model's context) each one `warning:` line as they
    come, once; with --strict, the error instead."""
    shown = set()

    def show(message, *args, **kwargs):
        if str(message) not in shown:
            shown.add(str(message))
            click.echo(f"{WARNING_PREFIX}{message}", err=True)

    with warnings.catch_warnings():
        warnings.simplefilter("error" if _strict() else "always", ContextLengthWarning)
        warnings.showwarning = show
        try:
            yield
        except ContextLengthWarning as e:
            raise UserError(f"{e} (--strict)") from None


def _kernel_cache() -> None:
    """Before a command that runs the model: MLX must be able to keep the kernels it compiles."""
    problem = kernel_cache_problem()
    if problem:
        raise UserError(problem)


def _load(bundle: str, strict_target: bool = False, verify: bool = False):
    from runtime.loader import TargetMismatchWarning, load

    _kernel_cache()
    strict_target = strict_target or _strict()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model, tokenizer = load(bundle, strict_target=strict_target, verify=verify)
        except (ManifestError, ValueError, OSError) as e:
            raise UserError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    for w in caught:
        note = issubclass(w.category, TargetMismatchWarning)  # about speed: the bundle runs correctly
        click.echo(f"{'note' if note else 'warning'}: {w.message}", err=True)
    return model, tokenizer


@contextlib.contextmanager
def _compiling_in_background(model, enabled: bool, wait: bool = True):
    """Around a command's generations: where this machine lacks the model's decode kernels, a
    child compiles them while decoding runs eagerly (runtime/precompile.py); yields it, or None.
    At the end the command waits for it (`wait`: generate, chat), so that the next run starts
    compiled (Ctrl-C skips the wait), or ends it (serve); on any way out it is stopped."""
    from runtime import precompile

    job = precompile.start(model) if enabled else None
    if job is None:
        yield None
        return
    interrupted = False
    try:
        noted()  # this note replaces the one about MLX compiling in this process
        click.echo(f"{NOTE_PREFIX}this model's decode kernels were never compiled on this machine: a background "
                   "process compiles them (once; minutes on a GPU) while decoding runs without them, more slowly",
                   err=True)
        yield job
        if wait and not job.finish(timeout=2):
            click.echo(f"{NOTE_PREFIX}waiting for the background compilation to finish, so that the next run "
                       "starts fast (Ctrl-C skips)", err=True)
            job.finish()
    except KeyboardInterrupt:
        interrupted = True  # the child had the same Ctrl-C: its failure is no news
        raise
    finally:
        job.stop()  # a child still compiling is ended: the next start begins again
        if job.failure and not interrupted:
            click.echo(f"{NOTE_PREFIX}the background compilation failed ({job.failure}); kernels compile in "
                       "this process instead, at its first compiled step", err=True)


BACKGROUND_HELP = ("on a machine that never ran this model, compile its decode kernels in this process "
                   "(the generation stalls for them) instead of in a background one while decoding eagerly")


def _verified(bundle: str) -> None:
    """The `--verify` of a command whose load is timed: the bundle is checked before the clock."""
    from runtime.hub import is_hub_id
    from runtime.verify import verify_bundle

    if is_hub_id(bundle):
        return  # a bundle from the hub is always verified as it is loaded
    try:
        problems = verify_bundle(bundle)
    except ManifestError as e:
        raise UserError(str(e)) from None
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(problems[0] + more)


def _need_tokenizer(tokenizer, bundle: str, what: str):
    if tokenizer is None:
        raise UserError(f"{bundle}: no tokenizer.json in the bundle; {what} needs one to encode text")


def bundle_argument(f):
    """BUNDLE, the command's first argument; `--model BUNDLE`, mlx-lm's spelling, is taken for it too."""
    @functools.wraps(f)
    def command(*args, bundle=None, model=None, **kwargs):
        if bundle is not None and model is not None:
            raise UserError(f"the bundle is given twice ({bundle} and --model {model}); give it once")
        if bundle is None and model is None:
            raise click.UsageError("missing BUNDLE: a bundle directory or a hub id (org/name), first after "
                                   "the command")
        return f(*args, bundle=model if bundle is None else bundle, **kwargs)

    kind = click.Path(file_okay=False)
    command = click.option("--model", type=kind, metavar="BUNDLE",
                           help="the bundle, as mlx-lm spells it (the same as BUNDLE)")(command)
    return click.argument("bundle", type=kind, required=False, metavar="BUNDLE")(command)


def sampling_options(f):
    """The options every generating command shares."""
    options = [
        click.option("--max-tokens", type=click.IntRange(1), default=DEFAULT_MAX_TOKENS, show_default=True,
                     help="most tokens to generate"),
        click.option("--temp", type=click.FloatRange(0.0), default=0.0, show_default=True,
                     help="sampling temperature; 0 is greedy"),
        click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=1.0, show_default=True,
                     help="keep the fewest most likely tokens whose probabilities reach this; 1: off"),
        click.option("--top-k", type=click.IntRange(0), default=0, show_default=True, help="0: off"),
        click.option("--min-p", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True,
                     help="drop tokens less likely than this fraction of the most likely one; 0: off"),
        click.option("--repetition-penalty", type=click.FloatRange(0.0, min_open=True), default=1.0,
                     show_default=True, help="penalize tokens among the last 64 by this factor "
                                            "(above 1 repeats less); 1: off"),
        click.option("--seed", type=int, default=None, help="seed for sampling (reproducible runs)"),
        click.option("--prefill-step-size", type=click.IntRange(1), default=DEFAULT_PREFILL_STEP,
                     show_default=True, help="prompt tokens per prefill chunk"),
        click.option("--strict-target", is_flag=True,
                     help="refuse a bundle prepared for another device class instead of noting it"),
        strict_option,
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _params(temp, top_p, top_k, min_p, repetition_penalty, seed) -> SamplingParams:
    try:  # click's ranges let NaN and infinities through, and any seed: runtime/inputs.py does not
        return SamplingParams(temperature=temp, top_p=top_p, top_k=top_k, min_p=min_p,
                              repetition_penalty=repetition_penalty, seed=seed)
    except (TypeError, ValueError) as e:
        raise UserError(_option_names(str(e))) from None


def _option_names(message: str) -> str:
    """The API's field names as the options that set them."""
    for field, option in (("temperature", "--temp"), ("top_p", "--top-p"), ("top_k", "--top-k"),
                          ("min_p", "--min-p"), ("repetition_penalty", "--repetition-penalty"), ("seed", "--seed")):
        if message.startswith(field + " "):
            return option + message[len(field):]
    return message


def _text(value: str | bytes, what: str) -> str:
    """An argument (str, undecodable bytes kept as surrogate escapes) or bytes read from stdin, as
    valid UTF-8 text; one line and exit 2 otherwise."""
    try:
        return decode_text(value, what) if isinstance(value, bytes) else check_text(value, what)
    except ValueError as e:
        raise UserError(str(e)) from None


def _stdin_prompt() -> str:
    """`--prompt -`: stdin without the one final newline (LF or CRLF) that `echo` or a file's last
    line adds, so a piped prompt is the one typed; any newlines before it are kept."""
    text = _text(sys.stdin.buffer.read(), "--prompt - (stdin)")
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def _stats_line(last: GenerationResponse) -> str:
    return (f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s | "
            f"decode: {last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s | "
            f"peak memory: {last.peak_memory_gb:.3f} GB")


def _stream_to_stdout(responses) -> GenerationResponse | None:
    last = None
    try:
        with _generation_warnings():
            for last in responses:
                if last.text:
                    sys.stdout.write(last.text)
                    sys.stdout.flush()
    except (CaptureError, BadValue, BadType) as e:  # e.g. a token id the tokenizer made outside the vocabulary
        raise UserError(str(e)) from None
    return last


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def main(ctx):
    """Run Gemma3n text generation from a prepared bundle (see `python -m convert`)."""
    # A first run on a machine stalls while MLX compiles kernels: say so once, as it happens.
    ctx.with_resource(noting_compilation(lambda note: click.echo(f"{NOTE_PREFIX}{note}", err=True)))


SYSTEM_HELP = "a system prompt; Gemma has no system role, so it opens the first user turn"


@main.command()
@bundle_argument
@click.option("--prompt", required=True, help="the prompt text; '-' reads it from stdin (less one final newline)")
@click.option("--chat", is_flag=True, help="wrap the prompt in Gemma's chat turn format")
@click.option("--system", default=None, help=SYSTEM_HELP + " (implies --chat)")
@click.option("--verify", is_flag=True, help="check every file's hash against the manifest before loading")
@click.option("--no-background-compile", is_flag=True, help=BACKGROUND_HELP)
@sampling_options
def generate(bundle, prompt, chat, system, verify, no_background_compile, max_tokens, temp, top_p, top_k, min_p,
             repetition_penalty, seed, prefill_step_size, strict_target):
    """Stream a continuation of --prompt to stdout; speeds and peak memory go to stderr."""
    params = _params(temp, top_p, top_k, min_p, repetition_penalty, seed)
    prompt = _stdin_prompt() if prompt == "-" else _text(prompt, "--prompt")
    system = None if system is None else _text(system, "--system")
    mx.reset_peak_memory()
    model, tokenizer = _load(bundle, strict_target=strict_target, verify=verify)
    _need_tokenizer(tokenizer, bundle, "generate")
    text = {"messages": user_and_system(prompt, system)} if chat or system is not None else {"prompt": prompt}
    with _compiling_in_background(model, not no_background_compile):  # its wait, if any, after the stats
        last = _stream_to_stdout(stream_generate(model, tokenizer, **text, max_tokens=max_tokens, sampling=params,
                                                 prefill_step_size=prefill_step_size))
        sys.stdout.write("\n")
        sys.stdout.flush()
        if last is None:
            return
        if last.finish_reason == "capture":
            click.echo(f"captured decode step 2 to {os.environ.get(CAPTURE_PATH_ENV)}", err=True)
        click.echo(_stats_line(last), err=True)


@main.command()
@bundle_argument
@click.option("--system", default=None, help=SYSTEM_HELP)
@click.option("--verify", is_flag=True, help="check every file's hash against the manifest before loading")
@click.option("--no-background-compile", is_flag=True, help=BACKGROUND_HELP)
@sampling_options
def chat(bundle, system, verify, no_background_compile, max_tokens, temp, top_p, top_k, min_p, repetition_penalty,
         seed, prefill_step_size, strict_target):
    """Chat on stdin, one message per line; the cache is kept across turns. End with EOF (Ctrl-D)."""
    params = _params(temp, top_p, top_k, min_p, repetition_penalty, seed)
    system = None if system is None else _text(system, "--system")
    model, tokenizer = _load(bundle, strict_target=strict_target, verify=verify)
    _need_tokenizer(tokenizer, bundle, "chat")
    session = ChatSession(model, tokenizer, max_tokens=max_tokens, sampling=params,
                          prefill_step_size=prefill_step_size, system=system)
    with _compiling_in_background(model, not no_background_compile):
        interactive = sys.stdin.isatty()
        number = 0
        while True:
            if interactive:
                click.echo(">> ", nl=False, err=True)
            line = sys.stdin.buffer.readline()
            if not line:
                break
            number += 1
            message = _text(line, f"chat line {number}").rstrip("\n")
            if not message.strip():
                continue
            last = _stream_to_stdout(session.send(message))
            sys.stdout.write("\n")
            sys.stdout.flush()
            if last is not None:
                click.echo(_stats_line(last), err=True)


@main.command()
@bundle_argument
@click.option("--verify", is_flag=True, help="check every file's hash against the manifest before loading")
@click.option("--strict-target", is_flag=True,
              help="refuse a bundle prepared for another device class instead of warning")
def warmup(bundle, verify, strict_target):
    """Compile the kernels BUNDLE's decode step needs on this machine now, for a provisioning
    script: MLX compiles them at a model's first run on a machine (minutes on a GPU) and keeps
    them on disk, so the first `generate` after this does not wait for them. `serve` does this
    itself before it serves."""
    model, _ = _load(bundle, strict_target=strict_target, verify=verify)
    click.echo(f"warm in {warm_up(model):.1f} s", err=True)


@main.command()
@bundle_argument
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on; the default answers this machine only (there is no authentication)")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="0: any free port")
@click.option("--max-tokens", type=click.IntRange(1), default=DEFAULT_MAX_TOKENS, show_default=True,
              help="tokens to generate for a request that does not say")
@click.option("--max-body-bytes", type=click.IntRange(1), default=1 << 20, show_default=True,
              help="largest request body accepted (larger ones get 413)")
@click.option("--client-timeout", type=click.FloatRange(0.1, 3600), default=30.0, show_default=True,
              callback=not_nan,
              help="seconds a client may send or read nothing before it is dropped (a body must arrive whole "
                   "within twice this)")
@click.option("--no-cache-reuse", is_flag=True, help="prefill every request from scratch (for measurements)")
@click.option("--verify", is_flag=True, help="check every file's hash against the manifest before loading")
@click.option("--strict-target", is_flag=True,
              help="refuse a bundle prepared for another device class instead of warning")
@click.option("--no-warmup", is_flag=True,
              help="serve at once; the first request then waits while MLX compiles the decode kernels "
                   "(once per machine: minutes on a GPU)")
@click.option("--no-background-compile", is_flag=True,
              help="on a machine that never ran this model, compile its decode kernels before serving "
                   "(minutes on a GPU) instead of serving at once, decoding more slowly until a background "
                   "process has compiled them")
def serve(bundle, host, port, max_tokens, max_body_bytes, client_timeout, no_cache_reuse, verify, strict_target,
          no_warmup, no_background_compile):
    """Serve BUNDLE over an OpenAI-compatible HTTP API: /v1/models, /v1/chat/completions,
    /v1/completions (streamed or not). One generation at a time, in arrival order."""
    from runtime.server import make_server
    from runtime.server import serve as serve_until_stopped

    host = _text(host, "--host")  # undecodable bytes: socket.bind's TypeError, after the whole load
    model, tokenizer = _load(bundle, strict_target=strict_target, verify=verify)
    _need_tokenizer(tokenizer, bundle, "serve")
    model_id = bundle.rstrip("/")
    try:
        server = make_server(model, tokenizer, model_id, host, port, default_max_tokens=max_tokens,
                             max_body_bytes=max_body_bytes, reuse_cache=not no_cache_reuse,
                             client_timeout=client_timeout)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"warning: listening on {host}: anyone who can reach it can use the model "
                   "(there is no authentication)", err=True)
    # On a cold machine a child compiles the decode kernels, ended on any way out (a signal during
    # the warm-up included); the warm-up then runs eagerly, compiling what eager steps need.
    with _compiling_in_background(model, not (no_warmup or no_background_compile), wait=False) as job:
        if not no_warmup:  # connections wait in the listen queue meanwhile
            if job is None:
                click.echo("warming up: running the decode step once, so that no request waits for kernels "
                           "to compile", err=True)
            click.echo(f"warm in {warm_up(model):.1f} s", err=True)
        bound_host, bound_port = server.server_address[:2]
        click.echo(f"serving {model_id} on http://{bound_host}:{bound_port}/v1 (Ctrl-C stops)", err=True)
        serve_until_stopped(server)  # until Ctrl-C or SIGTERM, which unwind it (manifests/cli.py)


def _median(values):
    return statistics.median(values) if values else float("nan")


# Bounds of bench's counts, far past any real use (Gemma3n's context is 32768 tokens): its prompt is
# made in memory at once (10**12 tokens was a numpy MemoryError traceback), and a mistyped count
# of runs would run for ever.
MAX_BENCH_TOKENS = 1 << 20

# The decode rate is (tokens - 1) steps over their time: fewer steps than this are a sample or
# a few, not a rate (one step has read five times the rate eight steps give).
MIN_DECODE_STEPS = 4


def _decode_cells(first, steady, generation_tokens: int) -> tuple[str, str]:
    """The decode row's two figures, or n/a (and one warning saying why) for too few steps."""
    steps = generation_tokens - 1
    if steps < MIN_DECODE_STEPS:
        click.echo(f"{WARNING_PREFIX}--generation-tokens {generation_tokens} decodes "
                   f"{steps} step{'s' if steps > 1 else ''} "
                   f"after the prefill: {'one sample' if steps == 1 else 'a few samples'}, not a rate; "
                   f"give {MIN_DECODE_STEPS + 1} or more for a decode rate", err=True)
        return "n/a", "n/a"
    return f"{first.generation_tps:.1f}", f"{_median([r.generation_tps for r, _ in steady]):.1f}"


@main.command()
@bundle_argument
@click.option("--prompt-tokens", type=click.IntRange(1, MAX_BENCH_TOKENS), default=128, show_default=True,
              help="length of the prompt (random token ids) each run prefills")
@click.option("--generation-tokens", type=click.IntRange(2, MAX_BENCH_TOKENS), default=64, show_default=True,
              help=f"tokens each run generates (a decode rate needs {MIN_DECODE_STEPS + 1} or more)")
@click.option("--runs", type=click.IntRange(1, MAX_RUNS), default=3, show_default=True,
              help="steady-state runs after the first")
@click.option("--prefill-step-size", type=click.IntRange(1), default=DEFAULT_PREFILL_STEP, show_default=True,
              help="prompt tokens per prefill chunk")
@click.option("--strict-target", is_flag=True,
              help="refuse a bundle prepared for another device class instead of warning")
@strict_option
@click.option("--verify", is_flag=True, help="check every file's hash against the manifest before loading "
              "(not counted in the load time)")
def bench(bundle, prompt_tokens, generation_tokens, runs, prefill_step_size, strict_target, verify):
    """Load-to-ready time, prompt and decode tok/s and peak memory, first call vs steady state.

    The prompt is random token ids (fixed seed) and no token stops generation, so every run
    does the same work; the first call includes MLX's one-time kernel setup.
    """
    if verify:
        _verified(bundle)
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    model, _ = _load(bundle, strict_target=strict_target)
    load_s = time.perf_counter() - t0
    load_peak = mx.get_peak_memory() / 1e9
    prompt = np.random.default_rng(0).integers(3, model.config.vocab_size, size=prompt_tokens).tolist()

    def run():
        t = time.perf_counter()
        last = None
        for response in stream_generate(model, None, prompt, max_tokens=generation_tokens, eos_token_ids=[],
                                        prefill_step_size=prefill_step_size):
            last = response
        return last, time.perf_counter() - t

    with _generation_warnings():
        first, first_s = run()
        steady = [run() for _ in range(runs)]
    rows = [
        ("load to ready (s)", f"{load_s:.3f}", ""),
        (f"prompt tok/s ({prompt_tokens} tokens)", f"{first.prompt_tps:.1f}",
         f"{_median([r.prompt_tps for r, _ in steady]):.1f}"),
        (f"decode tok/s ({generation_tokens} tokens)", *_decode_cells(first, steady, generation_tokens)),
        ("generation wall time (s)", f"{first_s:.3f}", f"{_median([s for _, s in steady]):.3f}"),
        ("peak memory (GB)", f"{load_peak:.3f} at load", f"{mx.get_peak_memory() / 1e9:.3f} overall"),
    ]
    header = ("", "first call", f"steady (median of {runs})")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(3)]
    click.echo(f"bundle: {bundle}  device: {mx.default_device()}")
    for row in [header] + rows:
        click.echo("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                             for i, (cell, w) in enumerate(zip(row, widths, strict=True))))


@main.command()
@bundle_argument
@click.option("--numeric", is_flag=True, help="then run the bundle's known answers on this device, eager and "
              "compiled, twice each (exit 1 if they differ; 2 if it has none)")
@click.option("--runs", type=click.IntRange(2, MAX_RUNS), default=None,
              help="with --numeric: runs of each path  [default: 2]")
def verify(bundle, numeric, runs):
    """Check the bundle's files and tensors against its manifest (hashes, shapes, dtypes)."""
    from runtime.verify import verify_command

    if runs is not None and not numeric:
        raise UserError("--runs applies only with --numeric")
    code = verify_command(bundle)
    if numeric and code == 0:
        from runtime.numeric import numeric_command

        _kernel_cache()
        code = numeric_command(bundle, runs or 2)
    sys.exit(code)


def _add_commands():
    """Commands defined beside the code they drive."""
    from runtime.calibrate import calibrate_command
    from runtime.publish import publish_command

    main.add_command(calibrate_command, "calibrate")
    main.add_command(publish_command, "publish")


_add_commands()


def run(args=None, prog_name: str | None = None):
    """The `runtime` program: one-line errors, Ctrl-C exits 130 after unwinding (manifests/cli.py)."""
    sys.exit(run_program(main, args, prog_name or "runtime"))
