"""Documented, checked dataclass fields: what the job schema is built from.

A field states its documentation, unit, choices and bounds once, in its metadata. `mpifed
job-reference` prints the documentation; `value_problem` enforces the rest, both for a job file being
loaded and for a config built in code, so the two can never disagree.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any


def opt(default: Any, doc: str, *, choices: tuple = (), minimum: float | None = None, above: float | None = None,
        maximum: float | None = None, below: float | None = None, unit: str = "") -> Any:
    """A config field with its documentation and the checks `value_problem` applies to it.

    minimum and maximum are inclusive bounds, above and below exclusive ones; give at most one of each pair.
    """
    if minimum is not None and above is not None or maximum is not None and below is not None:
        raise TypeError("give at most one lower bound (minimum or above) and one upper (maximum or below)")
    meta = {"doc": doc, "choices": choices, "minimum": minimum, "above": above, "maximum": maximum,
            "below": below, "unit": unit}
    if isinstance(default, (dict, list, tuple)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def value_problem(meta: dict, value: Any) -> str | None:
    """What `value` must be instead ('must be ...') when it breaks the field's choices or bounds, else None."""
    choices = meta.get("choices")
    if choices and value not in choices:
        return f"must be one of {', '.join(map(str, choices))}"
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    if not math.isfinite(value):  # nan passes every bound check
        return "must be a finite number"
    low = _bound(meta, "minimum", ">=", "[") or _bound(meta, "above", ">", "(")
    high = _bound(meta, "maximum", "<=", "]") or _bound(meta, "below", "<", ")")
    if (low and not low.holds(value)) or (high and not high.holds(value)):
        if low and high:
            return f"must be in {low.bracket}{low.limit}, {high.limit}{high.bracket}"
        return f"must be {(low or high).relation} {(low or high).limit}"
    return None


def field_problems(config: Any, where: str) -> list[str]:
    """Every field of the dataclass instance `config` that breaks its metadata, as 'where.name = value: ...'."""
    problems = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        problem = value_problem(f.metadata, value)
        if problem:
            problems.append(f"{where}.{f.name} = {value!r}: {problem}")
    return problems


@dataclasses.dataclass(frozen=True)
class _Bound:
    limit: float
    relation: str
    bracket: str

    def holds(self, value: float) -> bool:
        return _RELATIONS[self.relation](value, self.limit)


_RELATIONS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


def _bound(meta: dict, key: str, relation: str, bracket: str) -> _Bound | None:
    return None if meta.get(key) is None else _Bound(meta[key], relation, bracket)
