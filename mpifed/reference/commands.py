"""Every `mpifed` command and option as Markdown, read from click's own objects (what `--help` shows)."""

from __future__ import annotations

import inspect

import click


def commands_reference() -> str:
    from mpifed.cli import main

    return "\n\n".join(_sections(main, click.Context(main, info_name="mpifed", **main.context_settings)))


def command_paths() -> dict[str, click.Command]:
    """'mpifed bench clients' -> its click command, for every command (groups included)."""
    from mpifed.cli import main

    out = {"mpifed": main}

    def walk(group: click.Group, path: str) -> None:
        for name in group.list_commands(click.Context(group)):
            command = group.get_command(click.Context(group), name)
            out[f"{path} {name}"] = command
            if isinstance(command, click.Group):
                walk(command, f"{path} {name}")

    walk(main, "mpifed")
    return out


def _sections(command: click.Command, ctx: click.Context) -> list[str]:
    path = ctx.command_path
    usage = " ".join([path, *command.collect_usage_pieces(ctx)])
    text = [f"## `{path}`", f"```\n{usage}\n```", _help(command.help or "")]
    rows = [record for param in command.get_params(ctx)  # arguments: in the usage line
            if isinstance(param, click.Option) and (record := param.get_help_record(ctx))]
    if rows:
        text.append("| option | meaning |\n|---|---|\n" + "\n".join(f"| `{opts}` | {_cell(help_)} |"
                                                               for opts, help_ in rows))
    out = ["\n\n".join(part for part in text if part)]
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            out += _sections(sub, click.Context(sub, info_name=name, parent=ctx))
    return out


def _help(text: str) -> str:
    """A docstring's paragraphs; click's \\b (keep these lines as they are) becomes a code block."""
    paragraphs = []
    for paragraph in inspect.cleandoc(text).split("\n\n"):
        if paragraph.startswith("\b"):
            paragraphs.append("```\n" + paragraph.lstrip("\b\n") + "\n```")
        else:
            paragraphs.append(" ".join(paragraph.split()))
    return "\n\n".join(paragraphs)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")
