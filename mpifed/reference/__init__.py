"""The documentation's reference pages, generated from the code so that they cannot drift from it.

Each page is written by hand around one generated part, between BEGIN and END: the job fields
(mpifed.config), every command and option (click's own objects) and the run log's layout
(mpifed.runlog). `python -m mpifed.reference` rewrites the generated parts; tests/test_docs.py fails
while a page differs from what the code gives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

BEGIN = "<!-- generated from the code by `python -m mpifed.reference`: edit the code, not this part -->"
END = "<!-- end of the generated part -->"


def _job_fields() -> str:
    from mpifed.config import job_reference

    return job_reference()


def _commands() -> str:
    from mpifed.reference.commands import commands_reference

    return commands_reference()


def _run_log() -> str:
    from mpifed.reference.runlog import runlog_reference

    return runlog_reference()


# page under docs/ -> the function that generates its part
PAGES: dict[str, Callable[[], str]] = {
    "reference/job.md": _job_fields,
    "reference/commands.md": _commands,
    "reference/run-log.md": _run_log,
}


def generated_part(page: str) -> str:
    """The text between the markers of a page ('' when it has none)."""
    if BEGIN not in page or END not in page:
        return ""
    return page.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def with_part(page: str, part: str) -> str:
    """The page with its generated part replaced by `part`."""
    head, rest = page.split(BEGIN, 1)
    return f"{head}{BEGIN}\n\n{part.strip()}\n\n{END}{rest.split(END, 1)[1]}"


def write_pages(docs: Path) -> list[str]:
    """Rewrite every page's generated part; return the pages that changed."""
    changed = []
    for name, generate in PAGES.items():
        path = docs / name
        page = path.read_text()
        new = with_part(page, generate())
        if new != page:
            path.write_text(new)
            changed.append(name)
    return changed
