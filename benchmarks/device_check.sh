#!/usr/bin/env bash
# The device check of issue 34: one script, at most 8 minutes on one GPU, every figure into one file.
#
#   1. TokenCut / forward with each solver (exact, iterative; auto picks iterative on CUDA): ViT-S/16 and ViT-S/8 at
#      224, batch 256, random weights (benchmarks/fiedler_bench.py)
#   2. DINO (and TokenCut, Grad-CAM) / forward, ViT-S/16 batch 256 (benchmarks/discovery_bench.py)
#   3. end-to-end discovery (tokencut, dino) over 2000 generated JPEGs with this node's loader workers (CPUs - 1)
#      against the forward (benchmarks/discovery_throughput.py)
#   4. ViT-B/16 MAE at batch 256 in bf16 (precision auto on CUDA): guided / vanilla step with its A/A control,
#      agmae (fused attention) / official MAE (plain attention) step, compiled / eager (benchmarks/train_bench.py)
#
# Each part runs under its own time limit (they add up to under 8 minutes) and a failed or timed-out part does not
# stop the others; its exit status is written after it.
#
#   benchmarks/device_check.sh [--smoke] [OUTPUT]
#
# OUTPUT defaults to $OUT/device_check-<UTC date>.txt ($OUT: the device machine's return folder), else
# ./device_check-<UTC date>.txt. --smoke runs every part on the CPU at tiny sizes, to check the script itself.
# PYTHON selects the interpreter (default .venv/bin/python, else python).
set -u
cd "$(dirname "$0")/.."

smoke=0
if [ "${1:-}" = "--smoke" ]; then
    smoke=1
    shift
fi
stamp=$(date -u +%Y%m%dT%H%MZ)
output=${1:-${OUT:-.}/device_check-$stamp.txt}
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=python
workers=$(( $("$python" -c "import os; print(len(os.sched_getaffinity(0)))") - 1 ))
[ "$workers" -ge 1 ] || workers=1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

part() {  # part LIMIT_SECONDS TITLE COMMAND...
    local limit=$1 title=$2
    shift 2
    echo "== $title  [$(date -u +%T), limit ${limit}s] $*" >> "$output"
    timeout "$limit" "$@" >> "$output" 2>&1
    echo "== exit status $?, ${SECONDS}s since the start" >> "$output"
    echo >> "$output"
}

{
    echo "agmae device check $(date -u '+%Y-%m-%d %H:%M UTC')$([ $smoke = 1 ] && echo ', SMOKE RUN (CPU, tiny sizes): not a measurement')"
    echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "$(nproc) CPUs, loader workers $workers"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
    echo
} > "$output" 2>&1

if [ $smoke = 1 ]; then
    part 300 "TokenCut / forward, each solver (smoke)" \
        "$python" benchmarks/fiedler_bench.py --smoke --device cpu
    part 300 "DINO / forward (smoke)" \
        "$python" benchmarks/discovery_bench.py --iters 1 --batch-size 2 --reference-images 1 --device cpu
    part 300 "end-to-end discovery (smoke)" \
        "$python" benchmarks/discovery_throughput.py --quick --workers 1 --methods "tokencut dino" \
        --work "$work/discovery" --device cpu
    part 600 "guided / vanilla and agmae / official MAE step, ViT-B/16 (smoke: batch 2, eager)" \
        "$python" benchmarks/train_bench.py --models mae_vit_base_patch16 --base-batch 2 --steps 2 --device cpu
    part 900 "compiled / eager step (smoke: the demo MAE, batch 8)" \
        "$python" benchmarks/train_bench.py --models mae_vit_demo_patch8 --demo-batch 8 --steps 2 --compile \
        --device cpu
else
    part 130 "TokenCut / forward, each solver: ViT-S/16, ViT-S/8, batch 256" \
        "$python" benchmarks/fiedler_bench.py --vits-only --batch 256 --iters 1 --device cuda
    part 35 "DINO / forward, ViT-S/16 batch 256" \
        "$python" benchmarks/discovery_bench.py --iters 5 --batch-size 256 --device cuda
    part 100 "end-to-end discovery, 2000 JPEGs, $workers loader workers" \
        "$python" benchmarks/discovery_throughput.py --images 2000 --workers "$workers" --batch-size 256 \
        --methods "tokencut dino" --iters 3 --decode-images 100 --work "$work/discovery" --device cuda
    part 200 "guided / vanilla, agmae / official MAE, compiled / eager step: ViT-B/16 batch 256 bf16" \
        "$python" benchmarks/train_bench.py --models mae_vit_base_patch16 --base-batch 256 --steps 10 --compile \
        --device cuda
fi
echo "done in ${SECONDS}s" >> "$output"
echo "$output"
