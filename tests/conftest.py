"""Shared fixtures: the prepared default model and tiny random base models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapters import paths
from adapters.default_model import prepare_default_model
from tests.factories import tiny_gpt2, tiny_llama


@pytest.fixture(scope="session")
def default_model() -> Path:
    """The default model (prepared by `make test` before pytest; verified here)."""
    return prepare_default_model(paths.default_model_dir())


@pytest.fixture(scope="session")
def llama_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def llama_bias_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("llama-bias"), bias=True)


@pytest.fixture(scope="session")
def llama_bf16_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("llama-bf16"), dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def gpt2_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_gpt2(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="session")
def demo_adapters() -> Path:
    return paths.demo_adapters_dir()
