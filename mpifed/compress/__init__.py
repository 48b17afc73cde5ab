"""Gradient codecs, registered by name and chosen in the job file, and error-feedback memory.

    codec = make_codec("topk", density=0.01)
    codec = make_codec("powersgd", layers=[(name, p.shape) for name, p in model.named_parameters()], rank=4)

`codec.summable` picks the transport: True -> MPI Reduce/Allreduce of `codec.exchange` payloads,
False -> Gatherv of `codec.encode` payloads and `aggregate.aggregate` on the server. See base.py.
make_codec checks each option against the type its constructor declares (bool, int, float, str).
"""

from __future__ import annotations

import inspect
import json
import math
import numbers
import typing
from typing import Any, Sequence

from mpifed.compress.base import (
    CODECS, Codec, Exchanged, GatherCodec, OneShot, OneShotReduce, PayloadError, ReduceCodec,
    RoundContext, register_codec,
)
from mpifed.compress.feedback import ErrorFeedback
# Importing the codec modules fills CODECS.
from mpifed.compress import halfprec, none, powersgd, qsgd, randomk, sign, topk  # noqa: F401,E402

Layers = Sequence[tuple[str, Sequence[int]]]


def codec_names() -> list[str]:
    return sorted(CODECS)


def codec_options(name: str) -> list[str]:
    """Option names the job file may set for codec `name`."""
    cls, preset = _lookup(name)
    params = inspect.signature(cls.__init__).parameters
    return [p for p in params if p not in ("self", "layers") and p not in preset]


def make_codec(name: str, *, layers: Layers | None = None, **options: Any) -> Codec:
    """Build codec `name` with job-file `options`; `layers` [(name, shape), ...] for codecs that need them."""
    cls, preset = _lookup(name)
    valid = codec_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"codec {name!r} has no option {', '.join(map(repr, unknown))}; "
                         f"its options are: {', '.join(valid) or '(none)'}")
    wrong = _option_errors(name, options)
    if wrong:
        raise ValueError("; ".join(wrong))
    kwargs = {**preset, **options}
    if cls.needs_layers:
        if layers is None:
            raise ValueError(f"codec {name!r} needs the layer shapes: make_codec({name!r}, layers="
                             "[(name, shape) for name, p in model.named_parameters()], ...)")
        kwargs["layers"] = layers
    return cls(**kwargs)


# What each declared option type accepts, and how an error says it. make_codec checks every option
# against it before the constructor runs: job values arrive as typed, and bool("false") is True.
OPTION_KINDS: dict[type, tuple[tuple[type, ...], str]] = {
    bool: ((bool,), "a boolean (true or false)"),
    int: ((numbers.Integral,), "an integer"),
    float: ((numbers.Real,), "a number"),
    str: ((str,), "a string"),
}


def option_types(name: str) -> dict[str, type]:
    """Declared type of each option the job file may set for codec `name`."""
    return {option: kind for option, (kind, _) in _declared(name).items()}


def _declared(name: str) -> dict[str, tuple[type, bool]]:
    """(type, whether None is allowed) per option, from the constructor's annotations: a new codec is
    checked by annotating its options, with no code here."""
    cls, _ = _lookup(name)
    hints = typing.get_type_hints(cls.__init__)
    declared = {}
    for option in codec_options(name):
        hint = hints.get(option)
        kinds = [t for t in typing.get_args(hint) or [hint] if t is not type(None)]
        if len(kinds) != 1 or kinds[0] not in OPTION_KINDS:
            raise TypeError(f"codec {name!r} option {option!r} must be annotated as one of "
                            f"{', '.join(t.__name__ for t in OPTION_KINDS)} (or that | None), got {hint!r}")
        declared[option] = (kinds[0], type(None) in typing.get_args(hint))
    return declared


def _option_errors(name: str, options: dict[str, Any]) -> list[str]:
    """Why each given option does not fit its declared type; empty when all do."""
    errors = []
    for option, (kind, nullable) in _declared(name).items():
        if option not in options or (options[option] is None and nullable):  # None: the codec's default
            continue
        value = options[option]
        accepted, expected = OPTION_KINDS[kind]
        ok = isinstance(value, accepted) and (kind is bool or not isinstance(value, bool))
        if ok and kind is float and not math.isfinite(value):
            expected, ok = "a finite number", False
        if not ok:
            errors.append(f"compress.options.{option} = {_shown(value)}: must be {expected} for codec {name}")
    return errors


def _shown(value: Any) -> str:
    """`value` as the job file writes it (TOML), e.g. "false" for a string, false for a boolean."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def _lookup(name: str) -> tuple[type[Codec], dict[str, Any]]:
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; choose one of: {', '.join(codec_names())}")
    return CODECS[name]


__all__ = [
    "CODECS", "Codec", "ErrorFeedback", "Exchanged", "GatherCodec", "OneShot", "OneShotReduce",
    "PayloadError", "ReduceCodec", "RoundContext", "codec_names", "codec_options", "make_codec",
    "option_types", "register_codec",
]
