"""Gradient codecs, registered by name and chosen in the job file, and error-feedback memory.

    codec = make_codec("topk", density=0.01)
    codec = make_codec("powersgd", layers=[(name, p.shape) for name, p in model.named_parameters()], rank=4)

`codec.summable` picks the transport: True -> MPI Reduce/Allreduce of `codec.exchange` payloads,
False -> Gatherv of `codec.encode` payloads and `aggregate.aggregate` on the server. See base.py.
"""

from __future__ import annotations

import inspect
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
    kwargs = {**preset, **options}
    if cls.needs_layers:
        if layers is None:
            raise ValueError(f"codec {name!r} needs the layer shapes: make_codec({name!r}, layers="
                             "[(name, shape) for name, p in model.named_parameters()], ...)")
        kwargs["layers"] = layers
    return cls(**kwargs)


def _lookup(name: str) -> tuple[type[Codec], dict[str, Any]]:
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; choose one of: {', '.join(codec_names())}")
    return CODECS[name]


__all__ = [
    "CODECS", "Codec", "ErrorFeedback", "Exchanged", "GatherCodec", "OneShot", "OneShotReduce",
    "PayloadError", "ReduceCodec", "RoundContext", "codec_names", "codec_options", "make_codec",
    "register_codec",
]
