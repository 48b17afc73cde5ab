"""Every `mpifed` command and option as Markdown, read from click's own objects (what `--help` shows)."""

from __future__ import annotations

import inspect

import click


def commands_reference() -> str:
    from mpifed.cli import main

    return "\n\n".join(_sections(main, _root_context(main)))


def command_paths() -> dict[str, click.Command]:
    """'mpifed bench clients' -> its click command, for every command (groups included)."""
    from mpifed.cli import main

    out = {"mpifed": main}

    def walk(group: click.Group, ctx: click.Context) -> None:
        for name in group.list_commands(ctx):
            command = group.get_command(ctx, name)
            out[f"{ctx.command_path} {name}"] = command
            if isinstance(command, click.Group):
                walk(command, click.Context(command, info_name=name, parent=ctx))

    walk(main, _root_context(main))
    return out


def _root_context(main: click.Group) -> click.Context:
    """The context `mpifed` runs in. Every context made here descends from it: click caches a command's
    help option with the names of the first context that asks (a parentless one, as a test invoking a
    subcommand directly makes, would fix `--help` alone where the command line takes `-h, --help`)."""
    return click.Context(main, info_name="mpifed", **main.context_settings)


def _sections(command: click.Command, ctx: click.Context) -> list[str]:
    path = ctx.command_path
    usage = " ".join([path, *command.collect_usage_pieces(ctx)])
    text = [f"## `{path}`", f"```\n{usage}\n```", _help(command.help or "")]
    rows = [record for param in command.params  # arguments: in the usage line
            if isinstance(param, click.Option) and (record := param.get_help_record(ctx))]
    if command.add_help_option and ctx.help_option_names:  # not click's cached help option: see _root_context
        rows.append((", ".join(ctx.help_option_names), "Show this message and exit."))
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
