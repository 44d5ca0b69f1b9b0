#!/usr/bin/env bash
# One long video over several machines: `animate`'s window parallelism (as --gpus N on one machine) with torchrun
# starting the processes on every node, meeting at a c10d rendezvous on the first node.
#
#   sbatch --nodes=2 examples/slurm_multinode.sh portrait.png speech.wav out.mp4
#
# Rank 0 (on whichever node torchrun gives it) decodes and writes the video, so the inputs and the output must be on
# storage every node sees. All processes run the same command; --resume needs one process, so a multi-node run
# is not resumable: split very long audio, or use `batch` for many videos.
#
#SBATCH --job-name=avatarcli-animate
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
#SBATCH --output=avatarcli-%j.log
set -euo pipefail
portrait=${1:?usage: sbatch --nodes=M examples/slurm_multinode.sh PORTRAIT AUDIO OUTPUT.mp4}
audio=${2:?usage: sbatch --nodes=M examples/slurm_multinode.sh PORTRAIT AUDIO OUTPUT.mp4}
output=${3:?usage: sbatch --nodes=M examples/slurm_multinode.sh PORTRAIT AUDIO OUTPUT.mp4}
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

srun torchrun --nnodes "$SLURM_JOB_NUM_NODES" --nproc-per-node 8 \
  --rdzv-backend c10d --rdzv-endpoint "$head:29500" --rdzv-id "$SLURM_JOB_ID" \
  -m avatarcli animate "$portrait" --audio "$audio" -o "$output"
