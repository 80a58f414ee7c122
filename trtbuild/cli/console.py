"""What every command shares: the console, one-line errors, and which options the user typed."""

from __future__ import annotations

import shlex
import sys

import click
from click.core import ParameterSource
from rich.console import Console

from trtbuild.errors import TrtbuildError

console = Console(stderr=True)


class TrtbuildGroup(click.Group):
    """Prints a TrtbuildError as one red line and exits 2, never with a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except TrtbuildError as e:
            console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            sys.exit(2)


def given(options: dict, names=None) -> list[str]:
    """Which of `names` (default: all of `options`) the user typed rather than left at their defaults."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return []
    names = options if names is None else names
    return [k for k in names if k in options and ctx.get_parameter_source(k) not in (ParameterSource.DEFAULT, None)]


def invocation(ctx: click.Context) -> str:
    """The command line, rebuilt from the values given (not the defaults), for generated-file headers."""
    words = ["trtbuild", ctx.info_name]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if isinstance(param, click.Argument):
            words.append(str(value))
        elif ctx.get_parameter_source(param.name) not in (ParameterSource.DEFAULT, None):
            if param.name == "notes":
                continue  # printed in the header already
            if param.is_flag:
                words.append(param.opts[0] if value else (param.secondary_opts or param.opts)[0])
            elif param.multiple:
                words += [w for v in value for w in (param.opts[0], str(v))]
            else:
                words += [param.opts[0], str(value)]
    return shlex.join(words)
