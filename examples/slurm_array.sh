#!/usr/bin/env bash
# One manifest over a SLURM job array: each array task runs its shard of the jobs, then one job joins the reports.
#
#   sbatch --array=0-7 examples/slurm_array.sh jobs.yaml
#
# Task K of N runs the jobs at manifest positions K+1, K+1+N, ... (`avatarcli batch --shard K/N`, read here from
# SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT / SLURM_ARRAY_TASK_MIN, so --array=1-8 works too) and writes its own
# report, jobs.report.shard-K-of-N.json beside the manifest. When every task has ended, a dependent job runs
# `--merge-reports`: one summary table (in its log), jobs.report.json, and the exit code of the whole batch.
#
# Inputs, outputs, the weights and the resume states (.NAME.resume/ beside each output) must be on storage every node
# sees. With --requeue a preempted task starts again and --resume continues its jobs where they were saved (every
# AVATARCLI_SAVE_EVERY seconds of work; Ctrl-C / SIGTERM also save).
#
#SBATCH --job-name=avatarcli-batch
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --signal=B:TERM@120
#SBATCH --output=avatarcli-%A_%a.log
set -euo pipefail
manifest=${1:?usage: sbatch --array=0-N examples/slurm_array.sh JOBS.yaml}

# The merge waits for every task of this array (afterany: failed tasks too, so their jobs are reported); the first
# task submits it, once (not again when requeued).
if [[ "$SLURM_ARRAY_TASK_ID" == "${SLURM_ARRAY_TASK_MIN:-0}" && "${SLURM_RESTART_COUNT:-0}" == 0 ]]; then
  sbatch --dependency="afterany:$SLURM_ARRAY_JOB_ID" --job-name=avatarcli-merge --output=avatarcli-%j-merge.log \
    --wrap "avatarcli batch '$manifest' --merge-reports --report '${manifest%.*}.report.json'"
fi

# `exec` so that SLURM's SIGTERM (preemption, --signal) reaches avatarcli: the running job saves its state.
exec avatarcli batch "$manifest" --resume --continue-on-error
