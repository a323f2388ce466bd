"""How every CLI reports an error a user can cause: one line on stderr, exit status 2."""
from __future__ import annotations

import click


class UserError(click.ClickException):
    """One line, exit status 2 (click's own usage errors also exit 2)."""

    exit_code = 2

    def show(self, file=None) -> None:
        # on a line of its own, even when a progress bar was drawing on stderr
        click.echo(f"\nError: {self.format_message()}", err=True)
