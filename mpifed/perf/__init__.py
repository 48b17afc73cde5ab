"""Parallel performance model and batch planner.

curves.py   per-client step time vs batch, fitted from a short profile
comm.py     alpha-beta cost of the round's collectives, fitted from a short MPI measurement
round.py    predicted round time, throughput, bound; MdAPE of predictions vs measurements
straggler.py  the slowest of K jittering clients (median of the max), and each client's own jitter
planner.py  per-client batches that equalise finish times; throughput-maximising global batch
online.py   the start-up model with per-term factors that follow the measured rounds
replan.py   dead-banded re-planning over the corrected curves when measured times drift
profile_file.py / report.py   the JSON profile file and what `mpifed plan` prints
"""

from mpifed.perf.comm import (KINDS, CollectiveCost, CollectiveSample, CommModel, fit_collective,
                              measure_collectives)
from mpifed.perf.curves import ComputeCurve
from mpifed.perf.planner import Plan, plan_batches, plan_throughput, uniform_split
from mpifed.perf.profile_file import ClientProfile, Profile, load_profile, save_profile
from mpifed.perf.online import Calibration, OnlineModel
from mpifed.perf.replan import Replanner
from mpifed.perf.round import RoundPrediction, mdape, predict_round
from mpifed.perf.straggler import slowest_median, spreads

__all__ = [
    "KINDS", "CollectiveCost", "CollectiveSample", "CommModel", "fit_collective", "measure_collectives",
    "ComputeCurve", "Plan", "plan_batches", "plan_throughput",
    "uniform_split", "ClientProfile", "Profile", "load_profile", "save_profile", "Replanner",
    "Calibration", "OnlineModel",
    "RoundPrediction", "mdape", "predict_round", "slowest_median", "spreads",
]
