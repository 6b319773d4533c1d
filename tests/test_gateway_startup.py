"""Start-up failures a new user can cause, each found before vLLM starts and naming its fix.

(vLLM dying at start is in test_engine_gateway_refusals.py: it needs a real vLLM.)
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.serve import serve
from gateway.startup_checks import StartupError

KEY = "sk-acme-0123456789abcdef"


def write_config(tmp_path: Path, model: str | None = None, port: int = 8080) -> Path:
    """A config over the demo adapters; `model` None leaves `[model] path` to the default.
    Its one backend is never reached: every failure here comes before it would be."""
    path = tmp_path / "gateway.toml"
    model_table = f"[model]\npath = {json.dumps(model)}\n" if model else ""
    path.write_text(f"""{model_table}
[server]
port = {port}
[engine]
backends = ["http://127.0.0.1:9"]
[tenants.acme]
api_keys = ["{KEY}"]
""")
    return path


def start_failure(config: Path) -> str:
    with pytest.raises(StartupError) as caught:
        serve(load_config(config))
    return str(caught.value)


def test_the_default_model_not_prepared_names_the_command(tmp_path):
    home = tmp_path / "home"
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(write_config(tmp_path))],
        capture_output=True, text=True, check=False, timeout=300,
        env={"PATH": "/usr/bin:/bin", "DORA_GATEWAY_HOME": str(home)})
    assert result.returncode == 1
    assert result.stderr.startswith("dora-gateway serve: the default model is not prepared")
    assert "run `dora-gateway prepare-model`" in result.stderr
    assert str(home / "models" / "SmolLM2-135M-Instruct") in result.stderr
    assert "Traceback" not in result.stderr


def test_a_model_directory_without_config_json(tmp_path):
    (tmp_path / "weights-only").mkdir()
    (tmp_path / "weights-only" / "model.safetensors").write_bytes(b"")
    message = start_failure(write_config(tmp_path, "weights-only"))
    assert message == (f"[model] path {tmp_path / 'weights-only'} has no config.json: it must "
                       f"be a Hugging Face model directory (config.json and safetensors "
                       f"weights, as save_pretrained writes it)")


def test_a_missing_model_directory(tmp_path):
    message = start_failure(write_config(tmp_path, "nowhere"))
    assert message.startswith(f"[model] path {tmp_path / 'nowhere'} is not a directory: set it "
                              f"in {tmp_path / 'gateway.toml'}")


def test_a_model_without_safetensors_weights(tmp_path):
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text("{}")
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"")
    message = start_failure(write_config(tmp_path, "pickled"))
    assert message.endswith("has no safetensors weights: save the model with "
                            "safe_serialization=True")


def test_a_port_in_use(tmp_path, llama_base):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        message = start_failure(write_config(tmp_path, str(llama_base), port))
    assert message == (f"port {port} on 127.0.0.1 is already in use (another gateway or "
                       f"server listens there): stop it, or choose another port with --port "
                       f"or [server] port")
