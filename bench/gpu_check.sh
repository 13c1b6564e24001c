#!/usr/bin/env bash
# GPU check for the inference engines (run from the repository root on a CUDA machine).
#
# Runs the torch engine on SmolLM2 on the GPU through the Engine interface at several batch
# sizes and prints tokens/s per batch size; then does the same with vLLM when it is installed
# (`pip install -e .[gpu]`). Also runs the engine unit tests on the GPU's torch build.
# Budget: a few minutes. Override with MODEL=gemma3-270m BATCHES=1,16,64 TOKENS=128.
set -euo pipefail
PY="${PYTHON:-python}"
MODEL="${MODEL:-smollm2-135m}"
BATCHES="${BATCHES:-1,8,32,64}"
TOKENS="${TOKENS:-64}"

$PY - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
PY

echo "== torch engine (cuda) =="
$PY -m bench.engine_throughput --engine torch --device cuda --model "$MODEL" --batches "$BATCHES" --tokens "$TOKENS"

if $PY -c "import vllm" 2>/dev/null; then
    echo "== vLLM engine =="
    $PY -m bench.engine_throughput --engine vllm --model "$MODEL" --batches "$BATCHES" --tokens "$TOKENS"
else
    echo "== vLLM not installed: skipped =="
fi

echo "== engine unit tests =="
$PY -m pytest -q -p no:cacheprovider tests/unit/engines
