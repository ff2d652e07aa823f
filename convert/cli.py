"""`convert [OPTIONS] SOURCE OUT` (also `python -m convert`): the command over `convert.pipeline`."""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import click

from convert.errors import ConvertError
from convert.pipeline import execute, plan, preflight, run_report
from convert.planning import BAND_BYTES, DTYPE_OPTIONS, READ_BLOCK, human, parse_size
from manifests import known_targets
from manifests.cli import WARNING_PREFIX, run_program
from manifests.format import PLACEMENTS


def _size(ctx, param, value):
    if value is None:
        return None
    try:
        return parse_size(value)
    except ConvertError as e:
        raise click.BadParameter(e.message.split(": ", 1)[-1]) from None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--target", default=None, metavar="NAME",
              help=f"Device class to prepare for: auto (this machine, the default) or one of "
                   f"{', '.join(known_targets())}.")
@click.option("--target-profile", type=click.Path(path_type=Path), metavar="FILE",
              help="A target profile YAML file instead of a built-in target.")
@click.option("--dtype", type=click.Choice(DTYPE_OPTIONS), default="keep", show_default=True,
              help="Float dtype to write (quantized weights always pass through); for Gemma, bfloat16 "
                   "rather than float16, which its activations can overflow.")
@click.option("--quantize", type=click.Choice(["4", "8"]), default=None,
              help="Quantize the projections and embeddings to this many bits (MLX affine), as mlx-lm does; "
                   "norms and AltUp coefficients/router stay float.")
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default=None,
              help="Elements sharing one scale and bias with --quantize  [default: 64]")
@click.option("--quant-mode", type=click.Choice(["affine"]), default=None,
              help="Quantization mode with --quantize  [default: affine]")
@click.option("--fuse/--no-fuse", default=None,
              help="Store q/k/v (with LAuReL's left projection) and gate/up as one projection each (--fuse) "
                   "or apart (--no-fuse), "
                   "whatever the target profile's `fuse` says  [default: as the profile says]")
@click.option("--ple", type=click.Choice(PLACEMENTS), default=None,
              help="Place the per-layer embedding table resident (loaded like every weight) or mapped (a file of "
                   "its own, memory-mapped; each token's row gathered on the host), whatever the target "
                   "profile's `per_layer_embeddings` says  [default: as the profile says, else resident]")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) when SOURCE is a repo id.")
@click.option("--max-shard-size", default="5GB", show_default=True, callback=_size,
              help="Largest shard, e.g. 500MB, 2GB.")
@click.option("--force", is_flag=True, help="Replace OUT if it is a bundle (only once the new one is complete).")
@click.option("--check-finite", is_flag=True,
              help="Refuse a tensor holding NaN or infinite values, naming it (checked while streaming).")
@click.option("--known-answers", is_flag=True,
              help="Record what the written weights compute on a fixed prompt (a float32 reference), for "
                   "`runtime verify --numeric`; `convert known-answers BUNDLE` adds them later.")
@click.option("--dry-run", is_flag=True, help="Print the plan and write nothing.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary.")
@click.option("--read-block-size", default=None, callback=_size, hidden=True)
@click.option("--band-size", default=None, callback=_size, hidden=True)
def command(source, out, target, target_profile, dtype, quantize, group_size, quant_mode, fuse, ple, revision,
            max_shard_size, force, check_finite, known_answers, dry_run, quiet, read_block_size, band_size):
    """Convert the Gemma3n checkpoint SOURCE (a directory or a hub repo id like org/name) into a
    bundle at OUT whose projections have the layout TARGET decodes fastest."""
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:  # each one line, before the plan or the run
        warnings.simplefilter("always")
        p = plan(source, out, target=target, target_profile=target_profile, dtype=dtype, revision=revision,
                 max_shard_size=max_shard_size, read_block=read_block_size or READ_BLOCK,
                 band_bytes=band_size or BAND_BYTES, quantize=quantize and int(quantize),
                 group_size=group_size and int(group_size), quant_mode=quant_mode, fuse=fuse, ple=ple)
    for w in caught:
        click.echo(f"{WARNING_PREFIX}{w.message}", err=True)
    if dry_run:
        click.echo(p.summary())
        return
    preflight(p, out, force=force)
    if quiet:
        execute(p, out, force=force, check_finite=check_finite, known_answers=known_answers)
        return
    if not sys.stderr.isatty():  # a log file gets the summary line, not a frozen bar
        done = execute(p, out, force=force, check_finite=check_finite, known_answers=known_answers)
        click.echo(run_report(p, done, time.perf_counter() - started))
        return
    with click.progressbar(length=p.tensor_bytes_out, label=f"converting to {p.profile.name}", file=sys.stderr,
                           show_eta=True, show_percent=True,
                           item_show_func=lambda _: None) as bar:
        done = execute(p, out, force=force, on_write=bar.update, check_finite=check_finite,
                       known_answers=known_answers)
    click.echo(run_report(p, done, time.perf_counter() - started))


def main(args=None, prog_name: str | None = None):
    """The `convert` program: one-line errors, and Ctrl-C unwinds like SIGTERM (the temporary
    directory and the lock are removed on the way out) and exits 130 (manifests/cli.py).
    `convert known-answers BUNDLE` runs convert/known_answers.py's command (a SOURCE directory
    named `known-answers` is reached as `./known-answers`)."""
    args = sys.argv[1:] if args is None else list(args)
    if args[:1] == ["known-answers"]:
        from convert.known_answers import command as known_answers_command

        sys.exit(run_program(known_answers_command, args[1:], f"{prog_name or 'convert'} known-answers"))
    sys.exit(run_program(command, args, prog_name or "convert"))


__all__ = ["command", "main", "human"]
