"""How both commands (`convert`, `runtime`) behave as programs, in one place.

- Every error is one line on stderr and an exit code: 2 for bad input, usage errors included
  (click would print the usage and a hint as well: three lines).
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


def _unwind(signum, frame):
    raise SystemExit(128 + signum)


def run_program(command: click.Command, args, prog_name: str, prefix: str) -> int:
    """Run `command` as a program: the exit code (`prefix` starts a usage error's line)."""
    signal.signal(signal.SIGINT, _unwind)
    signal.signal(signal.SIGTERM, _unwind)
    try:
        code = command.main(args=args, prog_name=prog_name, standalone_mode=False)
    except click.UsageError as e:
        click.echo(f"{prefix}{e.format_message()}", err=True)
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Abort:  # EOF at a prompt
        click.echo("Aborted!", err=True)
        return 1
    return code if isinstance(code, int) else 0
