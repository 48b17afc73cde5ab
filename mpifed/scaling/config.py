"""The `[scaling]` table of a job and its cross-field checks: torch-free, so a job is checked before
any rank imports torch (mpifed.jobcheck). The policy that acts on it is mpifed.scaling.policy."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mpifed.fields import opt

WINDOWS_PER_RUN = 50
"""scaling.window's default: a run of train.rounds rounds holds this many detection windows (300
rounds: windows of 6), so the detector sees the run's phases whatever its length."""
WARMUP_WINDOWS = 5
"""scaling.warmup's default, in windows: Goyal et al.'s 5 epochs, with a window standing for an epoch."""

METHODS = ("none", "step", "teacher", "step+teacher")
STATS_KEYS = ("grad_norm", "rel_change", "critical", "scale", "noise_scale", "sigma_trace", "signal_sq",
              "teacher_std")


@dataclass(frozen=True)
class ScalingConfig:
    """The `[scaling]` table of a job. Cross-field checks: `check_scaling`."""

    method: str = opt("none", "none: aggregate used as is (statistics are still logged); step: multiply "
                      "by `scale` outside critical phases (Tyagi 2025); teacher: add small-batch noise; "
                      "step+teacher: both, noise first.", choices=METHODS)
    scale: float = opt(0.0, "Step factor s applied outside critical phases (dimensionless). 0 = the "
                       "square-root rule sqrt(B / small_batch) of Hoffer et al. (2017), which matches "
                       "the small batch's step noise.", minimum=0.0)
    small_batch: int = opt(0, "b, samples: the small batch the teacher imitates and the sqrt rule "
                           "refers to; must be below the global batch B. 0 = unset, allowed only when "
                           "neither needs it. No default exists in the literature: use the batch the "
                           "small-batch baseline trains with.", minimum=0)
    window: int = opt(0, "Detection window, rounds. Accordion compares per-epoch gradient norms; 100 is about "
                      "one CIFAR-10 epoch at B = 512 (50000 / 512). 0 = follow the run's length: train.rounds / "
                      "50, at least 1, set when the job loads (the job the run stores holds the number; the default "
                      "was 100 before it followed the run). Before "
                      "two windows close every round is critical, so the step and the teacher wait for them.",
                      minimum=0)
    threshold: float = opt(0.5, "Relative change of the window-mean gradient norm that marks a critical "
                           "phase; 0.5 is Accordion's (Agarwal et al., MLSys 2021) value.", above=0.0)
    warmup: int = opt(-1, "Leading rounds that are always critical. Goyal et al. (2017) warm up for 5 epochs, "
                      "which Accordion also uses: 500 rounds at B = 512 on CIFAR-10. -1 = five windows (with "
                      "the window's default, a tenth of train.rounds), set when the job loads (the default was 500 "
                      "before it followed the run). A warmup as "
                      "long as the run leaves the step and the teacher nothing to act on: the job warns.",
                      minimum=-1)
    only_outside_critical: bool = opt(True, "Teacher noise only outside critical phases, where the large "
                                      "batch is otherwise left alone; false = every iteration.")
    per_layer: bool = opt(True, "Teacher uses each layer's mean variance; false = the per-coordinate "
                          "diagonal, which needs sum_k b_k g_k^2 per coordinate: gather codecs give it "
                          "for free (the server decodes every client), summable codecs add one dense "
                          "float32 vector to each client's upload (2x the uncompressed bytes).")
    noise_ema: float = opt(0.95, "EMA decay per round of tr(Sigma) and |G|^2 for the logged noise scale; "
                           "McCandlish et al. (2018) smooth both but give no value; 0.95 (~20 rounds) "
                           "is this project's choice.", minimum=0.0, below=1.0)
    grow_batch: bool = opt(False, "Let the batch controller grow the global batch towards the noise "
                           "scale, within the clients' memory limits (McCandlish et al. 2018).")
    batch_rate: float = opt(0.1, "Batch controller: fraction of the gap to the noise scale closed per "
                            "round; 0.1 is this project's choice (slow next to noise_ema).", above=0.0,
                            maximum=1.0)

    def for_rounds(self, rounds: int) -> ScalingConfig:
        """This table with window and warmup set from a run of `rounds` rounds where the job left them to
        follow it (window 0, warmup -1); given values stay."""
        window = self.window or max(1, rounds // WINDOWS_PER_RUN)
        warmup = self.warmup if self.warmup >= 0 else WARMUP_WINDOWS * window
        return dataclasses.replace(self, window=window, warmup=warmup)

    def first_scaled_round(self) -> int:
        """The first round (counted from 1) that can be outside a critical phase: after the warmup and
        once two windows have closed (the detector compares their means; mpifed.scaling.detector)."""
        return max(self.warmup + 1, 2 * self.window)

    @property
    def uses_step(self) -> bool:
        return self.method in ("step", "step+teacher")

    @property
    def uses_teacher(self) -> bool:
        return self.method in ("teacher", "step+teacher")

    @property
    def per_coordinate(self) -> bool:
        """The teacher needs sum_k (b_k / B) g_k^2 per coordinate (the full diagonal)."""
        return self.uses_teacher and not self.per_layer


def check_scaling(cfg: ScalingConfig, global_batch: int | None = None,
                  clients: int | None = None) -> list[str]:
    """Problems between `cfg`'s fields, and with B and K when known; messages name the field. Each field's
    own choices and bounds are its metadata's, checked when a job loads (and by `field_problems`)."""
    errors = []
    needs_small = cfg.uses_teacher or (cfg.uses_step and cfg.scale == 0)
    if needs_small and cfg.small_batch == 0:
        why = "the teacher imitates it" if cfg.uses_teacher else "scale = 0 selects sqrt(B / small_batch)"
        errors.append(f"scaling.small_batch is unset but method = {cfg.method!r} needs it ({why}); set it "
                      f"to the small-batch baseline's batch" + ("" if cfg.uses_teacher else
                                                                 ", or give scaling.scale"))
    if needs_small and global_batch is not None and cfg.small_batch >= global_batch:
        errors.append(f"scaling.small_batch = {cfg.small_batch} must be below the global batch "
                      f"{global_batch}")
    if cfg.uses_teacher and clients is not None and clients < 2:
        errors.append(f"scaling.method = {cfg.method!r} needs >= 2 clients to estimate the gradient "
                      f"covariance, the job has {clients}")
    return errors
