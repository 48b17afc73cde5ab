#!/usr/bin/env bash
# The runs a restructure must leave bit for bit the same, made with the code at CODE into OUT:
#
#   git worktree add /tmp/before <old commit>
#   bash analysis/same_results_runs.sh /tmp/before runs/before     # the old code
#   bash analysis/same_results_runs.sh .           runs/after      # the new code
#   python analysis/same_results.py runs/before runs/after
#
# Each run is short (a few rounds of the embedded default job on 4 ranks) and together they pass every
# path of a round: the reduced dense update, a gathered codec with error feedback and checkpoints, a
# corrupt payload the server rejects, FedAvg (E=2), the teacher's per-coordinate variances, two allreduces
# (powersgd), heterogeneous clients with a planned start-up, and a resume with momentum and residuals.
# `python -P`: CODE's mpifed, not the one in the folder the script is started from (-m would put it first).
set -euo pipefail
CODE=$(cd "$1" && pwd); OUT=$2
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
train() {  # train NAME [ARGS...]: one run of CODE's mpifed on 4 ranks into OUT/NAME
    local name=$1; shift
    echo "== $name"
    PYTHONPATH="$CODE" mpirun -n 4 python -P -m mpifed train --out "$OUT" --name "$name" --progress off \
        --set run.timestamp=false --set train.rounds=8 --set train.eval_every=4 "$@" >"$OUT/$name.log" 2>&1 \
        || { tail -20 "$OUT/$name.log"; exit 1; }
}
train default
train topk --set compress.codec=topk --set 'compress.options={density = 0.05, error_feedback = true}' \
    --set checkpoint.every=3 --set debug.corrupt_rank=2 --set debug.corrupt_round=5
train fedavg --set train.local_steps=2 --set optim.server_momentum=0.5
train teacher --set scaling.method=teacher --set scaling.small_batch=8 --set scaling.per_layer=false \
    --set scaling.warmup=2 --set scaling.window=2 --set compress.codec=qsgd
train powersgd --set compress.codec=powersgd --set 'compress.options={rank = 2}' --set optim.nesterov=true
train hetero --set clients.count=3 --set plan.mode=predict --set plan.points=2 --set plan.repeats=1 \
    --set data.partition=dirichlet --set 'profiles.slow={speed = 0.5, data = 2.0, batch = 16}' \
    --set 'clients.groups=[{count = 1, profile = "slow"}]'
train resume --set checkpoint.every=5 --set train.rounds=10 --set compress.codec=efsign \
    --set optim.schedule=constant
echo "== resume (continued)"
PYTHONPATH="$CODE" mpirun -n 4 python -P -m mpifed train --resume "$OUT/resume" --progress off \
    --set train.rounds=16 >"$OUT/resume-continued.log" 2>&1 || { tail -20 "$OUT/resume-continued.log"; exit 1; }
