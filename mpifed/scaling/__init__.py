"""Large-batch gradient scaling on the server (Tyagi 2025) and the statistics that drive it.

detector.py    critical-phase detector on the aggregated gradient norm (Accordion's rule)
step.py        step-function scaling: factor s outside critical phases, 1 inside
noisescale.py  unbiased diag(Sigma), tr(Sigma), |G|^2 and the noise scale (McCandlish et al. 2018)
teacher.py     small-batch noise added to the large-batch gradient
batch.py       optional controller that grows the global batch towards the noise scale
policy.py      ScalingConfig ([scaling] in the job) and ServerScalingPolicy, called once per round

All of it is arithmetic on tensors and floats; nothing here touches MPI.
"""

from mpifed.scaling.batch import BatchController, split_batch
from mpifed.scaling.detector import CriticalPhaseDetector
from mpifed.scaling.noisescale import (NoiseEstimate, NoiseScaleTracker, estimate_from_gradients,
                                       estimate_from_norms)
from mpifed.scaling.policy import (METHODS, STATS_KEYS, ClientRound, ScalingConfig, ServerScalingPolicy,
                                   check_scaling)

__all__ = ["BatchController", "ClientRound", "CriticalPhaseDetector", "METHODS", "NoiseEstimate",
           "NoiseScaleTracker", "STATS_KEYS", "ScalingConfig", "ServerScalingPolicy", "check_scaling",
           "estimate_from_gradients", "estimate_from_norms", "split_batch"]
