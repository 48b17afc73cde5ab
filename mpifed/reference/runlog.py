"""The layout of run.h5 as Markdown, from the documented names in mpifed.runlog."""

from __future__ import annotations

from mpifed import runlog

_GROUPS = (
    ("Attributes of the file", "attrs", "", runlog.ATTRS),
    ("`/ranks`: one row per rank", "/ranks/<column>", "(N,)", runlog.RANK_DOCS),
    ("`/iter`: per round and rank", "/iter/<field>", "(T, N)", runlog.ITER_DOCS),
    ("`/server`: the server's series", "/server/<field>", "(T,)", runlog.SERVER_DOCS),
    ("`/eval`: one row per evaluation", "/eval/<field>", "(E,)", runlog.EVAL_DOCS),
    ("`/clients`: the sampled clients (pooled clients only)", "/clients/<field>", "(T, K)", runlog.CLIENT_DOCS),
    ("`/models`: attributes of the fitted models", "/models attrs <model>.<field>", "", runlog.MODELS_DOCS),
)


def runlog_reference() -> str:
    out = [f"Schema {runlog.SCHEMA}. N: ranks (`world_size`), T: rounds logged, E: evaluations, K: clients a "
           f"round (`clients.per_round`). The series of /iter, /server, /eval and /clients are float64; a value "
           f"not measured is NaN."]
    for title, where, shape, docs in _GROUPS:
        rows = "\n".join(f"| `{name}` | {' '.join(meaning.split())} |" for name, meaning in docs.items())
        place = f"`{where}`" + (f", shape {shape}" if shape else "")
        out.append(f"## {title}\n\n{place}\n\n| name | meaning |\n|---|---|\n{rows}")
    return "\n\n".join(out)
