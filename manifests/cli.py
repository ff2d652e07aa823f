"""How both commands (`convert`, `runtime`) behave as programs, in one place.

- Every error is one line on stderr, `error: <what is wrong>` in both programs, and an exit code:
  2 for bad input, usage errors included (click would print the usage and a hint as well: three
  lines, and its own `Error:` spelling).
- Ctrl-C and SIGTERM unwind like an exception (SystemExit), so every `finally` and cleanup on the
  way runs (a conversion's temporary directory and lock, a generator's caches), then the program
  exits 128 + the signal: 130 for Ctrl-C, 143 for SIGTERM (click alone prints "Aborted!" and
  exits 1).

Installed by the programs' entry points only, not by the click commands, which tests invoke
in-process.
"""

from __future__ import annotations

import signal

import click

ERROR_PREFIX = "error: "
WARNING_PREFIX = "warning: "
NOTE_PREFIX = "note: "  # what a user may want to know while waiting: not a problem


def show_error(message: str) -> None:
    """The one line an error is, on stderr (also for commands invoked in-process)."""
    click.echo(f"{ERROR_PREFIX}{message}", err=True)


class CommandError(click.ClickException):
    """Bad input a user can fix: one `error:` line, exit code 2, however the command is invoked."""

    exit_code = 2

    def show(self, file=None):
        show_error(self.format_message())


def not_nan(ctx, param, value):
    """A click callback for a float option: click's FloatRange lets NaN through (every comparison
    with it is false), so the option refuses it here, as one line."""
    if value != value:
        raise CommandError(f"--{param.name.replace('_', '-')} must be a number, got nan")
    return value


def _unwind(signum, frame):
    raise SystemExit(128 + signum)


def run_program(command: click.Command, args, prog_name: str, prefix: str = ERROR_PREFIX) -> int:
    """Run `command` as a program: the exit code (`prefix` starts an error's line)."""
    signal.signal(signal.SIGINT, _unwind)
    signal.signal(signal.SIGTERM, _unwind)
    try:
        code = command.main(args=args, prog_name=prog_name, standalone_mode=False)
    except getattr(click.exceptions, "NoArgsIsHelpError", ()) as e:  # a group without its command: not the help
        names = ", ".join(sorted(getattr(e.ctx.command, "commands", {}))) if e.ctx else ""
        click.echo(f"{prefix}missing command{f': one of {names}' if names else ''} ({prog_name} --help says more)",
                   err=True)
        return 2
    except click.UsageError as e:
        click.echo(f"{prefix}{e.format_message()}", err=True)
        return e.exit_code
    except click.ClickException as e:  # the commands' own errors, whatever their class
        click.echo(f"{prefix}{e.format_message()}", err=True)
        return e.exit_code
    except click.exceptions.Abort:  # EOF at a prompt
        click.echo("Aborted!", err=True)
        return 1
    return code if isinstance(code, int) else 0
