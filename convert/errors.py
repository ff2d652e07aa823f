"""The converter's one error type: a sentence a user can act on, naming the file and tensor."""

from __future__ import annotations

from manifests.cli import CommandError


class ConvertError(CommandError, ValueError):
    """Bad input (or a destination we must not touch). The CLI prints one line and exits 2.

    It is a `click.ClickException` (a CommandError) so the command line shows `error: <message>`
    (the spelling of both programs, manifests/cli.py) without a traceback, and a ValueError so
    library callers catch it as the bad value it reports.
    """

    def __init__(self, message: str):
        # One line, always: a multi-line message from a lower layer is folded.
        super().__init__(" ".join(str(message).split()))


class Float16Warning(UserWarning):
    """`--dtype float16` for a model family whose activations overflow float16."""
