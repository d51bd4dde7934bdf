"""Parameters that ZeRO-3 may have partitioned across ranks: their whole shape, whole values for a
block, a whole copy, and how many elements this rank stores.

A leaf module (torch and, lazily, deepspeed's parameter status only) so that the target, which reads
whole lm_head rows, and the distributed wiring, which loads the target, both import it without a loop.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn


def is_partitioned(param: torch.Tensor) -> bool:
    """Whether ZeRO-3 partitions this parameter (its `.data` is then an empty placeholder)."""
    return hasattr(param, "ds_id")


def full_shape(param: torch.Tensor) -> torch.Size:
    """A parameter's whole shape, partitioned or not."""
    return param.ds_shape if is_partitioned(param) else param.shape


@contextlib.contextmanager
def full_params(*params: torch.Tensor):
    """Inside the block, the given parameters are whole on every rank (gathered under ZeRO-3 and
    partitioned again after; read-only). A collective when any is partitioned: every rank must enter."""
    # Frozen parameters only, so nothing is written back. Gathered the way the forward hooks gather
    # (all_gather_coalesced), which reads the node-local secondary partition under hpZ, where
    # GatheredParameters would gather across all ranks. Persistent parameters are already whole.
    todo = sorted({id(p): p for p in params if is_partitioned(p)}.values(), key=lambda p: p.ds_id)
    if todo:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        todo = [p for p in todo if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    if not todo:
        yield
        return
    todo[0].all_gather_coalesced(todo).wait()
    try:
        yield
    finally:
        todo[0].partition(param_list=todo)


def gathered_copy(param: torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """A whole copy of a parameter on `device` (a collective under ZeRO-3: every rank calls it)."""
    with full_params(param):
        return param.detach().to(device, copy=True)


@dataclass
class ParamCounts:
    """How many of a model's parameter elements this rank stores, of how many in all."""

    local: int  # this rank's ZeRO-3 partitions (or every element, unsharded)
    secondary: int  # its hpZ node-local partitions (0 without hpZ)
    total: int


def parameter_counts(model: nn.Module) -> ParamCounts:
    """Elements this rank holds (its ZeRO-3 partitions, or everything) and the model's total."""
    local = secondary = total = 0
    for p in model.parameters():
        if is_partitioned(p):
            local += p.ds_tensor.numel()
            secondary += p.ds_secondary_tensor.numel() if p.ds_secondary_tensor is not None else 0
            total += p.ds_numel
        else:
            local += p.numel()
            total += p.numel()
    return ParamCounts(local=local, secondary=secondary, total=total)
