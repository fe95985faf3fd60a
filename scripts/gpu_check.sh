#!/usr/bin/env bash
# The GPU path on one CUDA GPU with torch and triton, in two parts that run separately, each within
# a 240 s budget with compilation (step limits are cut to the time left), so that both parts and a
# rerun of either fit a 15-minute lease of a GPU machine with its start-up:
#   correctness  pytest_gpu       pytest -m gpu (over 8 processes with pytest-xdist, each test at most
#                                 150 s with pytest-timeout): the kernels against the float64
#                                 reference, and the training checks of tests/test_gpu_engine.py
#                                 (bf16 resume, GpuEngine vs CpuEngine, dp=2 / cp=2 / tp=2 on one GPU)
#   speed        attention_s2     bench_attention, bf16 b=4 h=16 d=128, block 64, 512-token window,
#                                 stride 16, 32k and 64k: S2 Triton vs SDPA flash and cuDNN and
#                                 compiled FlexAttention on the same block mask
#                attention_dense  the same with stride 1 (the dense pattern): S2 Triton vs SDPA flash
#                training_32k     bench_training: dense vs hybrid step, llama_1p3b_32k shape, 8 of its
#                                 24 layers
# A step stopped at its limit gets SIGINT (pytest still writes its JUnit XML; the attention benchmark
# has written the lengths it finished), SIGKILL 15 s later, and then whatever it left in its process
# group is killed. A failed or stopped step is recorded and the next one runs; the exit status is 1
# if any failed. Without CUDA the speed steps run at CPU sizes instead (a dry run of the steps, the
# summary and the archive; the GPU targets stay unmeasured).
#
# OUT_DIR receives at most four files: summary.json and summary.md (scripts/gpu_check_summary.py: the
# section for docs/BENCHMARKS.md, the targets judged), steps.jsonl (one line per step), and
# PART.tar.gz with every log, JUnit XML, benchmark JSON and figure. steps.jsonl and the archive are
# refreshed after every step, so a run stopped from outside still leaves what it did.
#
#   scripts/fetch_gpu_wheels.sh                      # where pip reaches a registry: megatron-core, hydra into .whl
#   scripts/gpu_check.sh correctness|speed OUT_DIR   # on the GPU machine, from a copy of the repo with .whl in it
#
# Wheels in $WHEELS (default .whl) are installed into a temporary folder, without network, and put
# on PYTHONPATH with the repository and kernels/ (which holds the s2attn package).
set -uo pipefail

part=${1:-}
if [[ $part != correctness && $part != speed ]] || (($# != 2)); then
    echo "usage: scripts/gpu_check.sh correctness|speed OUT_DIR" >&2
    exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "$2")
wheels=$(realpath -m "${WHEELS:-$root/.whl}")
python=${PYTHON:-python3}
budget=240
deadline=$((SECONDS + budget))
cd "$root" || exit 2
mkdir -p "$out" || exit 2
work=$(mktemp -d)               # logs, XML, JSON, figures: archived into OUT_DIR after every step
scratch=$(mktemp -d)            # the installed wheels, the running step's process id
trap 'rm -rf "$work" "$scratch"' EXIT
: > "$work/steps.jsonl"

snapshot() {  # steps.jsonl and the archive into OUT_DIR, each replaced whole
    cp "$work/steps.jsonl" "$out/steps.jsonl.partial" && mv "$out/steps.jsonl.partial" "$out/steps.jsonl"
    tar -czf "$out/$part.tar.gz.partial" -C "$work" . && mv "$out/$part.tar.gz.partial" "$out/$part.tar.gz"
}

record() {  # record STEP STATUS SECONDS DETAIL
    printf '{"step": "%s", "status": "%s", "seconds": %d, "detail": "%s"}\n' "$1" "$2" "$3" "${4//\"/\'}" \
        >> "$work/steps.jsonl"
    echo "== $1: $2 ($3 s) $4"
    snapshot
}

step() {  # step NAME LIMIT_S COMMAND...: run under min(LIMIT_S, time left), log to NAME.log
    local name=$1 limit=$2 left=$((deadline - SECONDS)) start=$SECONDS rc
    shift 2
    if ((left < 20)); then record "$name" skipped 0 "no time left of the part's ${budget} s budget"; return; fi
    ((limit > left)) && limit=$left
    echo "== $name (limit $limit s): $*"
    # timeout leads a process group of its own: its process id, kept here, names the group.
    sh -c 'echo $$ > "$0" && exec "$@"' "$scratch/pid" timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 |
        tee "$work/$name.log"
    rc=${PIPESTATUS[0]}
    kill -KILL -- "-$(cat "$scratch/pid")" 2> /dev/null     # whatever the step left behind
    case $rc in
        0) record "$name" passed $((SECONDS - start)) "" ;;
        124 | 137) record "$name" timeout $((SECONDS - start)) "stopped at its $limit s limit (SIGINT)" ;;
        *) record "$name" failed $((SECONDS - start)) "exit status $rc" ;;
    esac
}

# -- environment: carried wheels, s2attn, the repository ------------------------------------------
site="$scratch/site"
if compgen -G "$wheels/*.whl" > /dev/null; then
    step wheels 40 "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target "$site" "$wheels"/*.whl
else
    record wheels skipped 0 "no wheels in $wheels (scripts/fetch_gpu_wheels.sh makes them)"
fi
export PYTHONPATH="$site:$root/kernels:$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
has() { "$python" -c "import $1" > /dev/null 2>&1; }
has_cuda=$("$python" -c "import torch; print(int(torch.cuda.is_available()))" 2> /dev/null || echo 0)

if [[ $part == correctness ]]; then
    options=(-m gpu -q -rs --durations=15 -p no:cacheprovider --junitxml="$work/pytest_gpu.xml")
    has xdist && options+=(-n 8)
    has pytest_timeout && options+=(--timeout=150)      # tests' own launches time out at 120 s
    step pytest_gpu 200 "$python" -m pytest "${options[@]}"
else
    if ((has_cuda)); then
        attention=(--preset gpu)
        methods=(sdpa_flash sdpa_cudnn s2_triton flex_attention) dense_methods=(sdpa_flash s2_triton)
        training=(--device cuda --seq-lengths 32768 --hidden-size 2048 --num-attention-heads 16
                  --num-query-groups 8 --ffn-hidden-size 5632 --swiglu --block-size 64 --local-blocks 16
                  --vert-stride 16 --s2 head_sharding=query --layouts DDDDDDDD DSSSDSSS
                  --warmup-steps 1 --steps 3 --rounds 1)
    else    # a dry run at CPU sizes
        attention=(--preset cpu --seq-lens 1024 2048 --repeats 1 --memory-seq-len 0)
        methods=(sdpa_causal s2_torch flex_attention) dense_methods=(sdpa_causal s2_torch)
        training=(--device cpu --seq-lengths 1024 --hidden-size 64 --num-attention-heads 4 --vert-stride 4
                  --layouts DDDD DSSS --warmup-steps 1 --steps 1 --rounds 1)
    fi
    step attention_s2 100 "$python" scripts/bench_attention.py "${attention[@]}" --methods "${methods[@]}" \
        --json "$work/attention_s2.json" --figure "$work/attention_s2.png"
    step attention_dense 45 "$python" scripts/bench_attention.py "${attention[@]}" --vert-stride 1 \
        --methods "${dense_methods[@]}" --memory-seq-len 0 --json "$work/attention_dense.json" \
        --figure "$work/attention_dense.png"
    if has megatron.core; then
        step training_32k 90 "$python" scripts/bench_training.py "${training[@]}" \
            --out "$work/training_32k.json" --figure "$work/training_32k.png"
    else
        record training_32k skipped 0 "megatron-core is not importable (carry wheels: scripts/fetch_gpu_wheels.sh)"
    fi
fi

# -- summary -----------------------------------------------------------------------------------------
echo
"$python" scripts/gpu_check_summary.py "$work" --part "$part" && cp "$work"/summary.json "$work"/summary.md "$out"/
snapshot
! grep -q -E '"status": "(failed|timeout)"' "$work/steps.jsonl"
