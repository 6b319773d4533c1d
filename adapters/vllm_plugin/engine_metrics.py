"""The engine's own account of what each adapter costs, on vLLM's `/metrics`.

A step is timed in the model runner, from `execute_model` (inputs, the forward pass with the
LoRA op timing each adapter's group) to the end of `sample_tokens`; `step_meter` closes it
into sums per adapter name. The steps run in vLLM's worker process, while `/metrics` is served
by its API server process, so the counters use prometheus_client's multiprocess mode: with
`PROMETHEUS_MULTIPROC_DIR` set (the gateway sets a fresh one for each engine it starts; vLLM
sets its own when it runs several API servers), vLLM's `/metrics` sums the files every
process writes. Without it the worker's counters cannot reach `/metrics`, and the plugin
says so once.

Only the grouped CPU LoRA path is timed. With vLLM's other punica wrappers (GPUs) the LoRA
kernels run asynchronously (and inside CUDA graphs), so host timers would measure nothing
true: there the plugin exports no cost figures and logs once that they are not measured
(`docs/design.md` says how they could be obtained).

Counters (`lora_name`: the name vLLM loaded the adapter under):

- `dora_engine_steps_total`, `dora_engine_step_seconds_total`, `dora_engine_step_tokens_total`
- `dora_engine_adapter_tokens_total`, `dora_engine_adapter_seconds_total`,
  `dora_engine_dora_seconds_total` per `lora_name`: all steps
- `dora_engine_uniform_adapter_seconds_total`, `dora_engine_uniform_dora_seconds_total`,
  `dora_engine_uniform_base_seconds_total` per `lora_name`: the uniform steps the added-cost
  figure is made of (`step_meter`): added cost = uniform adapter / uniform base seconds.

Sums are flushed to the counters by a background thread every `FLUSH_S` (or by `CLOCK.flush`),
so a step pays only for a few additions.
"""

from __future__ import annotations

import os
import threading
import time
from time import perf_counter

from prometheus_client import Counter
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from adapters import engine_metric_names as names
from adapters.plugin_env import METRICS_DIR
from adapters.vllm_plugin import logger
from adapters.vllm_plugin.batch_plan import BatchPlan
from adapters.vllm_plugin.layers import PLAN_ATTRIBUTE
from adapters.vllm_plugin.step_meter import StepTotals, is_uniform

FLUSH_S = 0.5


class EngineCounters:
    """The Prometheus counters, made in the process that measures (an API server process
    that made them would export zeros)."""

    def __init__(self) -> None:
        def counter(name: str, documentation: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(f"{names.PREFIX}{name}", documentation, labels)

        label = (names.ADAPTER_LABEL,)
        self.steps = counter(names.STEPS, "Engine steps timed")
        self.step_seconds = counter(names.STEP_SECONDS,
                                    "Engine step time: inputs, forward pass and sampling")
        self.step_tokens = counter(names.STEP_TOKENS, "Tokens of all timed steps")
        self.tokens = counter(names.TOKENS, "Tokens that ran an adapter", label)
        self.seconds = counter(names.SECONDS,
                               "Adapter work (LoRA shrink and expand, DoRA scale)", label)
        self.dora_seconds = counter(names.DORA_SECONDS, "Of the adapter work, DoRA's scale",
                                    label)
        self.uniform_seconds = counter(names.UNIFORM_SECONDS, "Adapter work in uniform steps",
                                       label)
        self.uniform_dora_seconds = counter(names.UNIFORM_DORA_SECONDS,
                                            "DoRA's scale in uniform steps", label)
        self.uniform_base_seconds = counter(names.UNIFORM_BASE_SECONDS,
                                            "Base work attributed to the adapter's tokens in "
                                            "uniform steps", label)

    def add(self, totals: StepTotals) -> None:
        if not totals.steps:
            return
        self.steps.inc(totals.steps)
        self.step_seconds.inc(totals.seconds)
        self.step_tokens.inc(totals.tokens)
        for name, adapter in totals.adapters.items():
            self.tokens.labels(name).inc(adapter.tokens)
            self.seconds.labels(name).inc(adapter.seconds)
            self.dora_seconds.labels(name).inc(adapter.dora_seconds)
            self.uniform_seconds.labels(name).inc(adapter.uniform_seconds)
            self.uniform_dora_seconds.labels(name).inc(adapter.uniform_dora_seconds)
            self.uniform_base_seconds.labels(name).inc(adapter.uniform_base_seconds)


class StepClock:
    """Times the steps of one model runner and keeps their sums until the flusher takes
    them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals = StepTotals()
        self._names: dict[int, str] = {}  # lora id -> name, as vLLM was given it
        self._plan: BatchPlan | None = None
        self._started: float | None = None
        self._tokens = 0
        self._steps = 0
        self._uniform = True
        self._flusher: threading.Thread | None = None
        self._counters: EngineCounters | None = None  # made by the process that measures
        self._said_unmeasured = False

    def begin(self, runner: GPUModelRunner, scheduled_tokens: list[int]) -> None:
        self._started = None
        plan = self._plan = measured_plan(runner)
        if plan is None:
            self._say_unmeasured(runner)
            return
        if not scheduled_tokens:
            return
        plan.work.clear()
        self._steps += 1
        plan.rotate_groups(self._steps)
        self._tokens = sum(scheduled_tokens)
        self._uniform = is_uniform(scheduled_tokens)
        self._started = perf_counter()

    def end(self, runner: GPUModelRunner) -> None:
        if self._started is None:
            return
        seconds = perf_counter() - self._started
        self._started = None
        plan = self._plan
        groups = {self._name(runner, group.slot): (group.end - group.start,
                                                   plan.work.seconds[group.slot],
                                                   plan.work.dora_seconds[group.slot])
                  for group in plan.groups}
        with self._lock:
            self._totals.close_step(seconds, self._tokens, self._uniform, groups)
        if self._flusher is None:
            self._start_flusher()

    def _say_unmeasured(self, runner: GPUModelRunner) -> None:
        """Once, where LoRA runs on vLLM's own kernels: no figure rather than a false one."""
        manager = getattr(runner, "lora_manager", None)
        if manager is None or self._said_unmeasured:
            return
        wrappers = manager._adapter_manager.punica_wrapper_mapping.values()
        logger.info("dora-gateway: adapter cost is not measured with %s (its LoRA kernels run "
                    "asynchronously): vLLM's /metrics carries no %s figures",
                    ", ".join({type(w).__name__ for w in wrappers}), names.PREFIX)
        self._said_unmeasured = True

    def _name(self, runner: GPUModelRunner, slot: int) -> str:
        lora_id = runner.lora_manager._adapter_manager.lora_index_to_id[slot]
        if lora_id not in self._names:
            request = runner.input_batch.lora_id_to_lora_request.get(lora_id)
            if request is None:
                return str(lora_id)
            self._names[lora_id] = request.lora_name
        return self._names[lora_id]

    def flush(self) -> None:
        """Add the sums of the steps closed since the last flush to the counters."""
        with self._lock:
            if self._counters is None:
                self._counters = EngineCounters()
            totals = self._totals.take()
        self._counters.add(totals)

    def _start_flusher(self) -> None:
        if METRICS_DIR not in os.environ:
            logger.warning("dora-gateway: %s is not set, so vLLM's /metrics cannot show the "
                           "engine's adapter-cost counters (they live in the worker process)",
                           METRICS_DIR)

        def flush_often() -> None:
            while True:
                time.sleep(FLUSH_S)
                self.flush()

        self._flusher = threading.Thread(target=flush_often, name="dora-engine-metrics",
                                         daemon=True)
        self._flusher.start()


# One per process: vLLM runs one model runner in each worker.
CLOCK = StepClock()


def measured_plan(runner: GPUModelRunner) -> BatchPlan | None:
    """The batch plan the grouped CPU LoRA op times its groups into: None without LoRA, or
    where vLLM's own LoRA kernels run instead (any punica wrapper but the CPU one)."""
    manager = getattr(runner, "lora_manager", None)
    if manager is None:
        return None
    return next((getattr(wrapper, PLAN_ATTRIBUTE)
                 for wrapper in manager._adapter_manager.punica_wrapper_mapping.values()
                 if isinstance(wrapper, PunicaWrapperCPU) and hasattr(wrapper, PLAN_ATTRIBUTE)),
                None)


def patch_step_clock() -> None:
    """Time every step of the model runner where the grouped CPU LoRA op runs."""
    clock = CLOCK
    original_execute = GPUModelRunner.execute_model
    original_sample = GPUModelRunner.sample_tokens

    def execute_model(self, scheduler_output, *args, **kwargs):
        clock.begin(self, list(scheduler_output.num_scheduled_tokens.values()))
        output = original_execute(self, scheduler_output, *args, **kwargs)
        if output is not None:  # no sampling step follows
            clock.end(self)
        return output

    def sample_tokens(self, *args, **kwargs):
        output = original_sample(self, *args, **kwargs)
        clock.end(self)
        return output

    GPUModelRunner.execute_model = execute_model
    GPUModelRunner.sample_tokens = sample_tokens
