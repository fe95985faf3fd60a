#!/usr/bin/env bash
# The GPU path in one command, on one CUDA GPU with torch and triton (issue 11). In at most 9
# minutes, each step under its own time limit, it runs and records:
#   pytest_gpu       pytest -m gpu (over 8 processes with pytest-xdist), which holds the kernel tests
#                    and the training checks of tests/test_gpu_engine.py (resume, GpuEngine vs
#                    CpuEngine, dp=2 / cp=2 on the one GPU)
#   attention_s2     bench_attention, bf16 b=4 h=16 d=128, block 64, 512-token window, stride 16,
#                    32k and 64k: S2 Triton vs SDPA flash and cuDNN and compiled FlexAttention
#   attention_dense  the same with stride 1 (the dense pattern): S2 Triton vs SDPA flash
#   training_32k     bench_training: dense vs hybrid step, llama_1p3b_32k shape, 8 of its 24 layers
# A failed or timed-out step is recorded and the next one runs; the exit status is 1 if any failed.
# Last it prints a summary (scripts/gpu_check_summary.py) and writes summary.json and summary.md
# into OUT_DIR, with every step's log and output.
#
#   scripts/fetch_gpu_wheels.sh     # where pip reaches a registry: megatron-core, hydra into .whl
#   scripts/gpu_check.sh [OUT_DIR]  # on the GPU machine, from a copy of the repo with .whl in it
#
# Wheels in $WHEELS (default .whl) are installed into a temporary folder, without network, and put
# on PYTHONPATH with the repository and kernels/ (which holds the s2attn package).
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "${1:-runs/gpu_check}")
wheels=$(realpath -m "${WHEELS:-$root/.whl}")
python=${PYTHON:-python3}
budget=540
deadline=$((SECONDS + budget))
cd "$root" || exit 2
mkdir -p "$out" || exit 2
: > "$out/steps.jsonl"

record() {  # record STEP STATUS SECONDS DETAIL
    printf '{"step": "%s", "status": "%s", "seconds": %d, "detail": "%s"}\n' "$1" "$2" "$3" "${4//\"/\'}" \
        >> "$out/steps.jsonl"
    echo "== $1: $2 ($3 s) $4"
}

step() {  # step NAME LIMIT_S COMMAND...: run under min(LIMIT_S, time left), log to OUT/NAME.log
    local name=$1 limit=$2 left=$((deadline - SECONDS)) start=$SECONDS rc
    shift 2
    if ((left < 20)); then record "$name" skipped 0 "no time left of the ${budget} s budget"; return; fi
    ((limit > left)) && limit=$left
    echo "== $name (limit $limit s): $*"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/$name.log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) record "$name" passed $((SECONDS - start)) "" ;;
        124 | 137) record "$name" timeout $((SECONDS - start)) "stopped at its $limit s limit" ;;
        *) record "$name" failed $((SECONDS - start)) "exit status $rc" ;;
    esac
}

# -- environment: carried wheels, s2attn, the repository ------------------------------------------
site=$(mktemp -d)
if compgen -G "$wheels/*.whl" > /dev/null; then
    step wheels 60 "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target "$site/packages" "$wheels"/*.whl
else
    record wheels skipped 0 "no wheels in $wheels (scripts/fetch_gpu_wheels.sh makes them)"
fi
export PYTHONPATH="$site/packages:$root/kernels:$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

has_cuda=$("$python" -c "import torch; print(int(torch.cuda.is_available()))" 2> /dev/null || echo 0)
has_megatron=$("$python" -c "import megatron.core" > /dev/null 2>&1 && echo 1 || echo 0)
no_cuda="no CUDA device (torch.cuda.is_available() is False)"

# -- 1 (and 3-5): pytest -m gpu ----------------------------------------------------------------------
workers=()
"$python" -c "import xdist" 2> /dev/null && workers=(-n 8)
step pytest_gpu 200 "$python" -m pytest -m gpu "${workers[@]}" -q -rs -p no:cacheprovider \
    --junitxml="$out/pytest_gpu.xml"

# -- 2: attention kernels ---------------------------------------------------------------------------
if ((has_cuda)); then
    step attention_s2 160 "$python" scripts/bench_attention.py --preset gpu \
        --methods sdpa_flash sdpa_cudnn s2_triton flex_attention \
        --json "$out/attention_s2.json" --figure "$out/attention_s2.png"
    step attention_dense 60 "$python" scripts/bench_attention.py --preset gpu --vert-stride 1 \
        --methods sdpa_flash s2_triton --memory-seq-len 0 --json "$out/attention_dense.json" --figure ""
else
    record attention_s2 skipped 0 "$no_cuda"
    record attention_dense skipped 0 "$no_cuda"
fi

# -- 6: hybrid vs dense training step at 32k ---------------------------------------------------------
if ((!has_cuda)); then
    record training_32k skipped 0 "$no_cuda"
elif ((!has_megatron)); then
    record training_32k skipped 0 "megatron-core is not importable (carry wheels: scripts/fetch_gpu_wheels.sh)"
else
    step training_32k 120 "$python" scripts/bench_training.py --device cuda --seq-lengths 32768 \
        --hidden-size 2048 --num-attention-heads 16 --num-query-groups 8 --ffn-hidden-size 5632 --swiglu \
        --block-size 64 --local-blocks 16 --vert-stride 16 --s2 head_sharding=query \
        --layouts DDDDDDDD DSSSDSSS --warmup-steps 1 --steps 3 --rounds 1 \
        --out "$out/training_32k.json" --figure "$out/training_32k.png"
fi

# -- summary -----------------------------------------------------------------------------------------
echo
"$python" scripts/gpu_check_summary.py "$out"
rm -rf "$site"
! grep -q -E '"status": "(failed|timeout)"' "$out/steps.jsonl"
