"""Admission against the fake vLLM: what the engines cannot serve is refused when it is added
(every reason listed, nothing compiled or registered), and an adapter that an engine still
refuses at load time is unservable, with the engine's reason. The same refusals coming from
a real vLLM are in test_engine_gateway_admission.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file, save_file

from adapters.base_checkpoint import BaseCheckpoint
from gateway.config import EngineConfig
from gateway.engine.admission import engine_refusals
from gateway.engine.limits import EngineLimits
from gateway.errors import AdapterUnavailable
from tests.factories import LLAMA_TARGETS, random_adapter, tiny_mixtral_for_vllm
from tests.gateway_fakes import ADMIN_KEY, GLOBEX_KEY, FakeVllm, make_gateway

pytestmark = pytest.mark.anyio
ADAPTERS = "/admin/adapters"
CHAT = "/v1/chat/completions"
FILES = ("adapter_config.json", "adapter_model.safetensors")
RANK_REFUSAL = "LoRA rank 32 is greater than max_lora_rank 16"


def wide_adapter(base: Path, directory: Path, **lora_kwargs) -> Path:
    """A sound DoRA adapter of rank 32 (unless `lora_kwargs` say otherwise)."""
    settings = {"r": 32, "lora_alpha": 32, "target_modules": LLAMA_TARGETS, "use_dora": True}
    return random_adapter(base, directory, **{**settings, **lora_kwargs})


def edit_config(directory: Path, **changes: object) -> Path:
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return directory


def dora_adapter(directory: Path, shapes: dict[str, tuple[int, int]], rank: int = 4) -> Path:
    """A PEFT-format DoRA adapter on `shapes` (module -> (out, in)), written directly."""
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for module, (out_features, in_features) in shapes.items():
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator)
        tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator)
        tensors[f"{key}.lora_magnitude_vector"] = torch.rand(out_features, generator=generator)
    directory.mkdir(parents=True)
    save_file(tensors, directory / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "use_dora": True,
              "target_modules": sorted({module.rsplit(".", 1)[-1] for module in shapes})}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def names(gateway) -> list[str]:
    return [entry.name for entry in gateway.registry.entries()]


async def add(gateway, name: str, path: Path):
    async with gateway.client(ADMIN_KEY) as client:
        return await client.post(ADAPTERS, json={"name": name, "path": str(path)})


async def test_a_rank_over_the_limit_is_refused_with_every_other_reason(gateway, llama_base,
                                                                      store_dir):
    source = wide_adapter(llama_base, gateway.config.adapters.roots[1] / "wide")
    tensors = load_file(source / "adapter_model.safetensors")
    name = next(key for key in tensors if key.endswith("lora_B.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, source / "adapter_model.safetensors")
    store_before = sorted(store_dir.iterdir())
    before = names(gateway)

    refused = await add(gateway, "wide", source)
    async with gateway.client(ADMIN_KEY) as client:
        uploaded = await client.post(f"{ADAPTERS}/wide/upload", files=[
            (file, (file, (source / file).read_bytes())) for file in FILES])

    for response in (refused, uploaded):
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_adapter" and error["type"] == "invalid_request_error"
        assert any(problem.startswith(RANK_REFUSAL) and "[engine] max_lora_rank" in problem
                   for problem in error["problems"])
        assert any("NaN or Inf" in problem for problem in error["problems"])
    assert names(gateway) == before and gateway.vllm.requests == []
    assert sorted(store_dir.iterdir()) == store_before
    assert not (gateway.config.adapters.dir / "wide").exists()


@pytest.mark.parametrize(("engine", "status"), [("", 400), ("max_lora_rank = 32", 201)])
async def test_rank_pattern_ranks_count_against_the_configured_limit(
        tmp_path, llama_base, demo, store_dir, engine, status):
    gateway = await make_gateway(tmp_path, llama_base, demo, store_dir, engine=engine)
    source = wide_adapter(llama_base, gateway.config.adapters.roots[1] / "patterned", r=8,
                          rank_pattern={"q_proj": 32})
    response = await add(gateway, "patterned", source)
    await gateway.pool.aclose()
    assert response.status_code == status, response.text
    assert (status == 400) == any(problem.startswith(RANK_REFUSAL) for problem in
                                  response.json().get("error", {}).get("problems", []))


@pytest.mark.parametrize(("changes", "refusal"), [
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa' changes the base model"),
    ({"init_lora_weights": "olora"}, "init_lora_weights='olora' changes the base model"),
    ({"use_qalora": True}, "vLLM does not support QALoRA"),
    ({"use_bdlora": {"nblocks": 2}}, "vLLM does not support block-diagonal LoRA"),
    ({"init_lora_weights": "gaussian"}, None),
    ({"init_lora_weights": False}, None),
])
async def test_peft_features_vllm_refuses_are_refused(gateway, demo, changes, refusal):
    source = shutil.copytree(demo / "plain", gateway.config.adapters.roots[1] / "featured")
    response = await add(gateway, "featured", edit_config(source, **changes))
    if refusal is None:
        assert response.status_code == 201, response.text
        return
    assert response.status_code == 400, response.text
    assert any(refusal in problem for problem in response.json()["error"]["problems"])
    assert "featured" not in names(gateway)


def test_local_engine_limits_follow_its_extra_args(llama_base, tmp_path):
    engine = EngineConfig(extra_args=("--max-lora-rank=8", "--fully-sharded-loras",
                                      "--quantization", "fp8"))
    limits = EngineLimits.from_config(engine)
    assert limits == EngineLimits(8, fully_sharded_loras=True, quantization="fp8",
                                  source="the local vLLM's --max-lora-rank in [engine] "
                                         "extra_args")
    assert EngineLimits.from_config(EngineConfig(max_lora_rank=32)).max_lora_rank == 32
    external = EngineLimits.from_config(EngineConfig(max_lora_rank=64, extra_args=(
        "--fully-sharded-loras",), backends=("http://vllm:8000",)))
    assert external.max_lora_rank == 64 and not external.fully_sharded_loras
    base = BaseCheckpoint(llama_base)
    dora = wide_adapter(llama_base, tmp_path / "dora", r=16)
    lora = wide_adapter(llama_base, tmp_path / "lora", r=16, use_dora=False)
    dora_refusals = engine_refusals(dora, base, limits)
    assert [problem.split(" (")[0] for problem in dora_refusals] == [
        "LoRA rank 16 is greater than max_lora_rank 8",
        "DoRA is not supported on quantized base layers",
        "DoRA is not supported with fully sharded LoRA"]
    assert engine_refusals(lora, base, limits) == dora_refusals[:1]
    assert engine_refusals(dora, base, EngineLimits()) == []


def test_dora_on_moe_experts_and_routers_is_refused(default_model, tmp_path):
    base = BaseCheckpoint(tiny_mixtral_for_vllm(tmp_path / "moe", default_model))
    experts = [f"model.layers.0.block_sparse_moe.experts.{expert}.w1" for expert in range(4)]
    adapter = dora_adapter(tmp_path / "a", {
        **dict.fromkeys(experts, (256, 256)),
        "model.layers.0.block_sparse_moe.gate": (4, 256),
        "model.layers.0.self_attn.q_proj": (256, 256)})
    assert engine_refusals(adapter, base, EngineLimits()) == [
        f"DoRA is not supported on MoE expert layers (vLLM runs them as one fused MoE layer): "
        f"{', '.join(experts[:3])} and 1 more",
        "DoRA is not supported on MoE routers (replicated linear layers): "
        "model.layers.0.block_sparse_moe.gate"]


def scraped(text: str, name: str, **labels: str) -> float:
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == name and set(labels.items()) <= set(sample.labels.items()))


async def test_an_adapter_the_engine_refuses_at_load_is_unservable_with_its_reason(gateway,
                                                                                  vllm):
    vllm.load_error = "LoRA rank 32 is greater than max_lora_rank 16."
    async with gateway.client(GLOBEX_KEY) as client:
        answers = [await client.post(CHAT, json={"model": "caps", "messages": []})
                   for _ in range(2)]
        listed = [card["id"] for card in (await client.get("/v1/models")).json()["data"]]
        card = await client.get("/v1/models/caps")
    for answer in answers:
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"] == {
            "message": "The model backend refused to load the adapter: LoRA rank 32 is "
                       "greater than max_lora_rank 16.",
            "type": "invalid_request_error", "param": "model", "code": "adapter_unavailable"}
    assert len(vllm.received("/v1/load_lora_adapter")) == 1
    assert "caps" not in listed and "pirate" in listed and card.status_code == 404
    async with gateway.client(ADMIN_KEY) as client:
        adapters = {item["name"]: item for item in (await client.get(ADAPTERS)).json()["data"]}
        metrics = (await client.get("/metrics")).text
    assert adapters["caps"]["servable"] is False
    assert adapters["caps"]["refused_by"] == {"backend": vllm.url, "reason": vllm.load_error}
    assert adapters["pirate"]["servable"] and adapters["pirate"]["refused_by"] is None
    assert scraped(metrics, "dora_gateway_adapter_load_refusals_total", adapter="caps",
                   adapter_type="dora") == 1
    assert scraped(metrics, "dora_gateway_requests_total", adapter="caps", status="400") == 2


async def test_a_backend_dying_during_a_load_is_not_the_adapters_fault(gateway, vllm):
    vllm.dies_on_load = True
    async with gateway.client(GLOBEX_KEY) as client:
        answer = await client.post(CHAT, json={"model": "caps", "messages": []})
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "backend_unavailable"
    assert gateway.registry.refusal(gateway.registry.get("caps")) is None


async def test_a_refusal_by_one_backend_makes_the_adapter_unservable_on_all(
        tmp_path, llama_base, demo, store_dir):
    first, second = FakeVllm("http://vllm-a:8000"), FakeVllm("http://vllm-b:8000")
    gateway = await make_gateway(tmp_path, llama_base, demo, store_dir, first, second)
    caps, (a, b) = gateway.registry.get("caps"), gateway.pool.backends
    await gateway.registry.ensure_loaded(caps, a)
    second.load_error = "DoRA is not supported on quantized base layers (AWQLinearMethod)"
    for backend in (b, a):
        with pytest.raises(AdapterUnavailable, match="quantized base layers"):
            await gateway.registry.ensure_loaded(caps, backend)
    assert gateway.registry.refusal(caps).backend == second.url
    await gateway.pool.aclose()
