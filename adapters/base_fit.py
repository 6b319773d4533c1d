"""Checking that an adapter was trained for the base model it is about to be applied to."""

from __future__ import annotations

from adapters.base_checkpoint import BaseCheckpoint
from adapters.errors import AdapterError
from adapters.peft_adapter import PeftAdapter


def base_weight_name(module: str) -> str:
    return f"{module}.weight"


def linear_shape(adapter: PeftAdapter, base: BaseCheckpoint, module: str) -> tuple[int, int]:
    """(out, in) of the base layer, undoing the [in, out] storage of fan_in_fan_out layers."""
    rows, cols = base.shape(base_weight_name(module))
    return (cols, rows) if adapter.settings.fan_in_fan_out else (rows, cols)


def check_fits(adapter: PeftAdapter, base: BaseCheckpoint) -> None:
    """Raise one `AdapterError` listing every way the adapter does not fit `base`."""
    problems = []
    if base.is_quantized:
        problems.append(f"base model {base.directory} is quantized; DoRA needs its exact weights")
    for module, weights in adapter.modules.items():
        name = base_weight_name(module)
        if not base.has(name):
            problems.append(f"{module}: the base model has no tensor {name!r}")
            continue
        if len(base.shape(name)) != 2:
            problems.append(f"{module}: base tensor {name!r} is not a linear weight")
            continue
        out_features, in_features = linear_shape(adapter, base, module)
        if weights.lora_a.shape[1] != in_features:
            problems.append(f"{module}: lora_A takes {weights.lora_a.shape[1]} inputs, "
                            f"the base layer has {in_features}")
        if weights.lora_b.shape[0] != out_features:
            problems.append(f"{module}: lora_B gives {weights.lora_b.shape[0]} outputs, "
                            f"the base layer has {out_features}")
    if problems:
        name = adapter.settings.base_model_name_or_path or "an unnamed model"
        problems.insert(0, f"it does not match base model {base.directory} "
                           f"(the adapter was trained on {name})")
        raise AdapterError(str(adapter.directory), problems)
