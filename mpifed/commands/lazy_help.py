"""An option whose help text is computed when the help is shown.

Some help names what only a torch import can tell (the model registry, the memory model's defaults);
computing it on demand keeps `mpifed --help` and the commands' import free of torch.
"""

from __future__ import annotations

from typing import Callable

import click


class LazyHelpOption(click.Option):
    """click.Option with `help_text`, a function that returns the help, called only to show it."""

    def __init__(self, *args, help_text: Callable[[], str], **kwargs):
        super().__init__(*args, **kwargs)
        self.help_text = help_text

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        self.help = self.help_text()
        return super().get_help_record(ctx)
