#!/usr/bin/env bash
# Multi-node pretraining through torchrun's c10d rendezvous: one torchrun per node, 8 GPUs each.
#   cd megatron-s2 && sbatch --nodes=8 scripts/slurm_pretrain.sh --config-name=llama_7b_128k \
#       data.prefixes=[/data/corpus_text_document] data.tokenizer=/models/tokenizer run.dir=/ckpt/7b
# Arguments are Hydra overrides for scripts/pretrain.py. run.dir must be on a shared filesystem:
# every rank writes its checkpoint shards there and all ranks must agree on it. A requeued or
# resubmitted job resumes from the newest complete checkpoint; SLURM's SIGTERM before the time
# limit (--signal) makes the run save and exit cleanly.
#SBATCH --job-name=megatron-s2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail

# sbatch runs a copy of this script: find the repository from where the job was submitted.
repo=${SLURM_SUBMIT_DIR:-$(pwd)}
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
overrides=$(printf ' %q' "$@")
export OMP_NUM_THREADS=8
export CUDA_DEVICE_MAX_CONNECTIONS=1   # Megatron overlaps TP communication with compute

# exec inside srun so that SIGTERM reaches torchrun, which forwards it to every rank.
srun --kill-on-bad-exit=1 bash -c "exec torchrun \
    --nnodes=$SLURM_NNODES --nproc_per_node=8 \
    --rdzv_backend=c10d --rdzv_endpoint=$head_node:29500 --rdzv_id=$SLURM_JOB_ID \
    $repo/scripts/pretrain.py $overrides"
