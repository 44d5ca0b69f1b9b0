#!/usr/bin/env bash
# One manifest over a Ray cluster: one actor per GPU, each loading a model set once; jobs go to whichever actor is
# free, and a job whose actor dies (a lost node, an out-of-memory kill) continues on another from its saved state.
#
#   on the head node:     ray start --head --port=6379
#   on every other node:  ray start --address=HEAD:6379
#   then, on the head:    examples/ray_cluster.sh HEAD:6379 jobs.yaml
#
# Every node needs the same avatarcli, with its Ray extra (pip install "avatarcli[ray]"), and the same Ray version.
# Inputs, outputs, the weights and the resume states (.NAME.resume/ beside each output) must be on storage every
# node sees at the same path. The summary table, the report and the exit code are those of a one-machine batch.
# --device cpu gives one actor per CPU slot instead (for trying it out: `ray start --head --num-cpus 2`).
set -euo pipefail
address=${1:?usage: examples/ray_cluster.sh HEAD:6379 JOBS.yaml}
manifest=${2:?usage: examples/ray_cluster.sh HEAD:6379 JOBS.yaml}

# A state saved after at most a minute of work, so a lost actor costs at most that much of its job.
export AVATARCLI_SAVE_EVERY=${AVATARCLI_SAVE_EVERY:-60}
avatarcli batch "$manifest" --ray "$address" --resume --continue-on-error --report "${manifest%.*}.report.json"
