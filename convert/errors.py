"""The converter's one error type: a sentence a user can act on, naming the file and tensor."""

from __future__ import annotations

import click


class ConvertError(click.ClickException, ValueError):
    """Bad input (or a destination we must not touch). The CLI prints one line and exits 2.

    It is a `click.ClickException` so the command line shows `Error: <message>` without a
    traceback, and a ValueError so library callers catch it as the bad value it reports.
    """

    exit_code = 2

    def __init__(self, message: str):
        # One line, always: a multi-line message from a lower layer is folded.
        super().__init__(" ".join(str(message).split()))
