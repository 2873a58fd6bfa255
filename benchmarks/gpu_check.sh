#!/usr/bin/env bash
# The GPU checks of training past one device, in one go (under 10 minutes on a lent GPU machine):
#
#   1. multi-GPU (2+ GPUs): tests/test_distributed.py on 2 GPUs with NCCL -- every training verb under
#      DDP and FSDP equals one GPU (per-step losses, gradient norms, checkpoints); kill -9 of rank 1,
#      then --resume auto, is exact; runs resume across process counts; FSDP offload, checkpointing, bf16
#   2. single GPU: the same file as one process (DDP/FSDP as one process accumulating to the same global
#      batch; FSDP's CPU offload on a GPU)
#   3. decode: benchmarks.bench_generate --compile in bf16 at batch 1 and 8 (ours eager and compiled with
#      CUDA graphs vs HF generate, dynamic and static cache, and the linear-layer ceiling; greedy tokens
#      of the compiled step checked against eager)
#   4. MFU: benchmarks.bench_training --suite train (ours and a plain transformers loop, eager and compiled,
#      and Trainer: tokens/s, MFU)
#   5. memory: benchmarks/bench_memory.py --measure on the GPU (allocated per process)
#
#   benchmarks/gpu_check.sh                      # on the GPU machine, from the repository root
#   GPU_CHECK_DEVICE=cpu benchmarks/gpu_check.sh # rehearsal on CPUs: gloo, the GPU figures skipped
#
# PYTHON (default: python) is the interpreter with gpt2ft's test extra installed. Each step has its
# own time limit (seconds: STEP1 STEP2 MEMORY MFU DECODE below) and the script goes on after a failed one; it
# exits non-zero if any step failed. Figures are printed; copy them into docs/benchmarks.md.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
STEP1=${STEP1:-160} STEP2=${STEP2:-100} MEMORY=${MEMORY:-100} MFU=${MFU:-200} DECODE=${DECODE:-160}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
failed=()

step() {  # step NAME SECONDS COMMAND...: run it with a time limit, report its time and status
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    timeout --signal=TERM --kill-after=10 "$limit" "$@"
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start))s"
    [ "$rc" -eq 0 ] || failed+=("$name (exit $rc)")
}

if [ "$DEVICE" = cuda ]; then
    GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
    nvidia-smi -L || true
else
    GPUS=2  # the CPU rehearsal runs two gloo processes
fi
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl',
torch.cuda.nccl.version() if torch.cuda.is_available() else None)"
echo "device $DEVICE, $GPUS GPU(s)"

if [ "$GPUS" -ge 2 ]; then
    GPT2FT_TEST_DEVICE=$DEVICE GPT2FT_TEST_NPROC=2 \
        step "1. two GPUs vs one (NCCL)" "$STEP1" $PY -m pytest tests/test_distributed.py -o addopts= -q -p no:cacheprovider
else
    echo "=== 1. skipped: $GPUS GPU(s), two are needed"
fi
if [ "$GPUS" -ge 1 ]; then
    GPT2FT_TEST_DEVICE=$DEVICE GPT2FT_TEST_NPROC=1 \
        step "2. one GPU: DDP/FSDP as one process, offload" "$STEP2" \
        $PY -m pytest tests/test_distributed.py -o addopts= -q -p no:cacheprovider
fi
if [ "$DEVICE" = cuda ]; then  # the figures first, the memory table last
    TORCH_LOGS=recompiles,perf_hints step "3. decode (bf16, compiled step with CUDA graphs)" "$DECODE" \
        $PY -m benchmarks.bench_generate \
        --dtype bfloat16 --compile --batch 1 8 --rounds 5
    step "4. training MFU" "$MFU" $PY -m benchmarks.bench_training --suite train --rounds 1 --steps 8
else
    echo "=== 3., 4. skipped on CPU (GPU figures)"
fi
if [ "$GPUS" -ge 1 ]; then
    nproc=$(( GPUS >= 2 ? 2 : 1 ))
    preset=$([ "$DEVICE" = cuda ] && echo gpt2-medium || echo gpt2) length=$([ "$DEVICE" = cuda ] && echo 1024 || echo 128)
    step "5. memory per device ($preset, $nproc process(es))" "$MEMORY" $PY -m benchmarks.bench_memory \
        --measure "$preset" --device "$DEVICE" --nproc "$nproc" --length "$length" \
        --layouts single,fsdp,fsdp+fsdp-offload,fsdp+gradient-checkpointing
fi

if [ ${#failed[@]} -gt 0 ]; then
    printf 'FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "all GPU checks passed"
