"""Which LoRA slot each token of a batch uses, written once per batch mapping into tensors
that live as long as the engine.

vLLM's compiled mode traces the model once and drops the guards, and a CUDA graph replays
the addresses it captured: a layer that read batch state from a Python attribute, or from a
tensor made anew per batch, would keep serving the batch it was traced on. So the plan is a
few persistent tensors, rewritten in place whenever vLLM maps a new batch:

- `rows [max_tokens]`: each token's row of a layer's scale table: 0 for the base model (the
  table's row 0 is all ones), slot + 1 for an adapter. A gather by `rows` needs no branch,
  and rows past the batch keep valid old values, so padded tokens index safely.
- `order [max_tokens]`: the batch's token positions grouped by slot (stable).

Beside them, host-side state: `groups`, one `TokenGroup` per slot present (its tokens are
order[start:end]; base-model tokens form no group and get nothing), read by the CPU LoRA op,
which runs outside any trace (it is opaque to Dynamo); and `has_dora`, `single_slot`, which
serve eager mode's fast paths only and which traced code never reads.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from adapters.vllm_plugin.step_meter import AdapterWork

_PLANS: weakref.WeakValueDictionary[int, BatchPlan] = weakref.WeakValueDictionary()


@dataclass
class TokenGroup:
    slot: int
    start: int
    end: int
    first: int  # -1 when the group's tokens are not contiguous
    is_dora: bool


class BatchPlan:
    """The persistent per-token tensors that the LoRA layers of one punica wrapper read."""

    def __init__(self, max_tokens: int, max_loras: int, device: torch.device | str) -> None:
        self.rows = torch.zeros(max_tokens, dtype=torch.long, device=device)
        self.order = torch.zeros(max_tokens, dtype=torch.long, device=device)
        self.groups: list[TokenGroup] = []  # in the order the CPU op runs them
        self._slot_order: list[TokenGroup] = []
        self.dora_slots: set[int] = set()  # slots whose adapter is DoRA (see `mark_dora`)
        self.present: set[int] = set()
        self.tokens = 0  # in the current batch
        self.work = AdapterWork(max_loras)  # the CPU LoRA op's seconds per slot, this step
        _PLANS[self.order.data_ptr()] = self
        self.has_dora = False
        self.single_slot: int | None = None

    def write(self, token_slots: torch.Tensor, present: set[int], with_groups: bool) -> None:
        """Record a new batch: `token_slots [tokens]` is punica's slot per token (-1: none),
        `present` the slots in it (known on the host, so no device sync). Groups are only
        needed by the CPU LoRA path."""
        self.rows[: token_slots.shape[0]].copy_(token_slots + 1)
        self.tokens = token_slots.shape[0]
        self.present = present
        self.has_dora = bool(present & self.dora_slots)
        self.single_slot = next(iter(present)) if len(present) == 1 and -1 not in present \
            else None
        if with_groups:
            self._write_groups(token_slots)

    def rotate_groups(self, step: int) -> None:
        """Start engine step `step` at group `step % groups` (of the groups in slot order).
        A layer's first group pays to bring the layer's input and output back into cache
        (an identical group cost twice as much first as second here): turning the order
        spreads that over the adapters present instead of charging it to the lowest slot.
        Groups touch disjoint rows, so the outputs do not change."""
        count = len(self._slot_order)
        if count > 1:
            first = step % count
            self.groups = self._slot_order[first:] + self._slot_order[:first]

    def mark_dora(self, slot: int, is_dora: bool) -> None:
        """Record whether `slot` now holds a DoRA adapter, also in the current batch's groups:
        vLLM may fill a slot without mapping a new batch."""
        if (slot in self.dora_slots) == is_dora:
            return
        if is_dora:
            self.dora_slots.add(slot)
        else:
            self.dora_slots.discard(slot)
        self.has_dora = bool(self.present & self.dora_slots)
        for group in self.groups:
            if group.slot == slot:
                group.is_dora = is_dora

    def _write_groups(self, token_slots: torch.Tensor) -> None:
        order, self.groups = group_tokens(token_slots, self.dora_slots)
        self._slot_order = list(self.groups)
        self.order[: order.shape[0]].copy_(order)


def plan_by_order(order: torch.Tensor) -> BatchPlan:
    """The plan whose `order` tensor this is (the CPU LoRA op is given tensors only)."""
    return _PLANS[order.data_ptr()]


def group_tokens(token_slots: torch.Tensor, dora_slots: set[int],
                 ) -> tuple[torch.Tensor, list[TokenGroup]]:
    """Semantics: order = argsort(token_slots, stable); one group per slot s >= 0 present,
    in slot order, whose tokens are order[start:end]."""
    order = torch.argsort(token_slots, stable=True)
    slots, counts = torch.unique_consecutive(token_slots[order], return_counts=True)
    groups, start = [], 0
    positions = order.tolist()
    for slot, count in zip(slots.tolist(), counts.tolist(), strict=True):
        end = start + count
        if slot >= 0:
            contiguous = positions[end - 1] - positions[start] == count - 1
            groups.append(TokenGroup(slot, start, end, positions[start] if contiguous else -1,
                                     slot in dora_slots))
        start = end
    return order, groups
