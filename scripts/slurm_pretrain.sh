#!/usr/bin/env bash
# Multi-node pretraining through torchrun's c10d rendezvous: one torchrun per node, one worker per GPU.
#   cd megatron-s2 && sbatch --nodes=8 scripts/slurm_pretrain.sh --config-name=llama_7b_128k \
#       data.prefixes=[/data/corpus_text_document] data.tokenizer=/models/tokenizer run.dir=/ckpt/7b
# Arguments are Hydra overrides for scripts/pretrain.py. run.dir (and checkpoint.dir, and
# data.cache_dir) must be on a filesystem every node shares: the run checks it before the first
# step and refuses otherwise.
#
# Stopping before the time limit: 300 s before it, Slurm sends SIGUSR1 to each node's step task
# (--signal=USR1@300), the shell below, which passes it to torchrun's workers and not to torchrun
# (whose own shutdown would SIGKILL the workers 30 s after its SIGTERM). The workers finish the
# current step, save and exit 0, and so does the job (tests/test_stopping.py runs this script with
# stand-ins for srun and scontrol). Choose the lead time above a step plus a save, or stop from
# inside with train.exit_duration_in_mins (Megatron's --exit-duration-in-mins) below the time limit.
# A requeued or resubmitted job resumes from the newest complete checkpoint.
#SBATCH --job-name=megatron-s2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail

if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "error: scripts/slurm_pretrain.sh is a Slurm batch script: run this under sbatch (sbatch --nodes=N scripts/slurm_pretrain.sh key=value ...)" >&2
    exit 2
fi

# sbatch runs a copy of this script: find the repository from where the job was submitted.
repo=${SLURM_SUBMIT_DIR:-$(pwd)}
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export CUDA_DEVICE_MAX_CONNECTIONS=1   # Megatron overlaps TP communication with compute

# One job step per node: torchrun in the background, this shell waiting for it. Slurm signals a
# step's tasks (this shell), not their children (cgroup.conf's SignalChildrenProcesses is off by
# default): SIGUSR1 goes on to the workers, SIGTERM (the time limit, scancel) to torchrun.
run_torchrun() {
    torchrun "$@" &
    local torchrun=$! status
    trap "pkill -USR1 -P $torchrun" USR1
    trap "kill -TERM $torchrun" TERM
    while :; do
        wait "$torchrun"
        status=$?
        kill -0 "$torchrun" 2>/dev/null || return "$status"    # else a trapped signal ended the wait
    done
}
export -f run_torchrun
srun --kill-on-bad-exit=1 bash -c 'run_torchrun "$@"' run_torchrun \
    --nnodes="$SLURM_NNODES" --nproc_per_node="${SLURM_GPUS_ON_NODE:-8}" \
    --rdzv_backend=c10d --rdzv_endpoint="$head_node:${MASTER_PORT:-29500}" --rdzv_id="$SLURM_JOB_ID" \
    "$repo/scripts/pretrain.py" "$@"
