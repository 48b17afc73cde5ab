"""Large-batch gradient scaling on the server (Tyagi 2025) and the statistics that drive it.

detector.py    critical-phase detector on the aggregated gradient norm (Accordion's rule)
step.py        step-function scaling: factor s outside critical phases, 1 inside
noisescale.py  unbiased diag(Sigma), tr(Sigma), |G|^2 and the noise scale (McCandlish et al. 2018)
teacher.py     small-batch noise added to the large-batch gradient
batch.py       optional controller that grows the global batch towards the noise scale
config.py      ScalingConfig ([scaling] in the job) and its checks, free of torch
policy.py      ServerScalingPolicy, called once per round

All of it is arithmetic on tensors and floats; nothing here touches MPI. The names below are
imported when first used, so a job's [scaling] table (scaling.config) is read without torch.
"""

import importlib

_HOMES = {
    "batch": ("BatchController", "split_batch"),
    "detector": ("CriticalPhaseDetector",),
    "noisescale": ("NoiseEstimate", "NoiseScaleTracker", "estimate_from_gradients", "estimate_from_norms"),
    "config": ("METHODS", "STATS_KEYS", "ScalingConfig", "check_scaling"),
    "policy": ("ClientRound", "ServerScalingPolicy"),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}

__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
