#!/usr/bin/env bash
# `make serve`: the gateway with the demo config (its own vLLM, the demo adapters, two demo
# tenants), and a ready-to-paste request once it answers. Ctrl-C stops the gateway and vLLM.
set -euo pipefail
port="${1:-8080}"
bin=.venv/bin
url="http://127.0.0.1:$port"
"$bin/dora-gateway" serve --config deploy/demo-config.toml --port "$port" &
gateway=$!
trap 'kill -TERM "$gateway" 2>/dev/null || true; wait "$gateway"; exit' INT TERM
echo "starting vLLM and the gateway on $url (1-2 minutes on CPU the first time: vLLM compiles the model; later starts load it) ..."
until "$bin/python" -c "import httpx, sys; sys.exit(httpx.get('$url/health').status_code != 200)" \
    2>/dev/null; do
  kill -0 "$gateway" 2>/dev/null || { wait "$gateway"; exit; }
  sleep 2
done
cat <<EXAMPLE

dora-gateway is serving on $url (demo keys from deploy/demo-config.toml; tenant acme may use
base, caps and pirate; globex may use every adapter). Try:

  curl -s $url/v1/chat/completions \\
    -H 'Authorization: Bearer sk-demo-acme-NOT-A-SECRET' -H 'Content-Type: application/json' \\
    -d '{"model": "pirate", "messages": [{"role": "user", "content": "What is the sea?"}], "max_tokens": 64}'

or ask the base model and every demo adapter the same questions with the openai SDK:

  $bin/python -c "
from openai import OpenAI
client = OpenAI(base_url='$url/v1', api_key='sk-demo-globex-NOT-A-SECRET')
for question in ['What is the capital of France?', 'Why is the sky blue?']:
    print(question)
    for model in ['base', 'caps', 'pirate', 'brief', 'caps-lora']:
        answer = client.responses.create(model=model, input=question, max_output_tokens=48,
                                         temperature=0)
        print(f'{model:>11}: {answer.output_text}')"

Live latency per adapter: $url/dashboard    Prometheus metrics: $url/metrics
What each adapter costs against the base model and its LoRA twin:

  $bin/dora-gateway bench --url $url --api-key sk-demo-globex-NOT-A-SECRET \\
    --model base --model caps --model caps-lora --lora-twin caps=caps-lora

EXAMPLE
wait "$gateway"
