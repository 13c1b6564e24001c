#!/usr/bin/env bash
# GPU check of the serving path (run from the repository root on a CUDA machine, `pip install -e .[gpu]`).
#
# For both catalogued models: tokens/s per batch size of the torch engine (fp32 and bf16) and of the
# vLLM engine, each plain and with a LoRA adapter on every other row (mixed batches); then the
# scheduling benchmark's `real` section (FCFS vs SLO-goodput on the live engine, wall-clock
# arrivals) on the GPU; then the engine unit tests (the vLLM engine's included). Prints JSON lines.
# Budget: about 10 minutes on one GPU. Override with MODELS="smollm2-135m" BATCHES=1,16,64 TOKENS=128.
set -euo pipefail
PY="${PYTHON:-python}"
MODELS="${MODELS:-smollm2-135m gemma3-270m}"
BATCHES="${BATCHES:-1,8,32,64}"
TOKENS="${TOKENS:-64}"
export VLLM_ENABLE_V1_MULTIPROCESSING="${VLLM_ENABLE_V1_MULTIPROCESSING:-0}"  # the bench drives every step

$PY - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
PY

for model in $MODELS; do
    echo "== torch engine (cuda), $model: tokens/s per batch size, plain and with LoRA =="
    $PY -m bench.engine --engine torch --device cuda --model "$model" --variants float32,bfloat16 \
        --batches "$BATCHES" --tokens "$TOKENS" --rounds 2 --lora
    if $PY -c "import vllm" 2>/dev/null; then
        echo "== vLLM engine, $model: tokens/s per batch size, plain and with LoRA =="
        $PY -m bench.engine --engine vllm --model "$model" --batches "$BATCHES" --tokens "$TOKENS" --rounds 2 --lora
    else
        echo "== vLLM not installed: skipped =="
    fi
done

echo "== scheduling benchmark, real section on the GPU (poisson_95 and overload_120) =="
$PY -m flywheel.cli bench scheduling --json --device cuda --real-only --real-requests 200

echo "== engine unit tests =="
$PY -m pytest -q -p no:cacheprovider tests/unit/engines
