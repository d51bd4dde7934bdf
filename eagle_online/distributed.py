"""All accelerate and DeepSpeed wiring: processes, the frozen target's ZeRO-3 sharding, the head's data
parallelism, and teardown. Nothing else in the package imports deepspeed.

docs/distributed.md: the same design at more length, with checkpoints and launchers.

The design, and why (measured on CPU with torch 2.13, accelerate 1.15, deepspeed 0.19.8):

- **The head is an ordinary accelerate-prepared module**: DDP over all ranks (plain on one). accelerate
  with DeepSpeed plugins would make the head a DeepSpeed engine as well, whose `backward`
  steps the optimizer itself and divides the loss by its own accumulation count; the trainer's step
  (no_sync, loss / accumulation, clip, step) and its checkpoints (model.safetensors, optimizer.safetensors) would
  all change with the sharding. Here they do not: `target.sharding` changes only the target.
- **The target never trains, so DeepSpeed only shards it.** While an `HfDeepSpeedConfig` is alive,
  transformers builds the model under `deepspeed.zero.Init` and loads the checkpoint into the partitions
  (rank 0 reads each tensor, every rank keeps its 1/N), so no rank ever holds the whole model. Then
  `deepspeed.initialize` without an optimizer registers the hooks that all-gather each module's
  parameters just before it runs and free them after. The engine wraps the *decoder*, because that is
  the module each step calls: DeepSpeed resets its prefetch trace in a hook on the module it wraps.
  `lm_head` is never called as a module (the teacher streams its rows); `full_params` gathers it.
- **One source of truth**: the recipe's `target.sharding`. The shipped accelerate configs
  (launch/accelerate/*.yaml) only say how many processes on how many machines; an accelerate DeepSpeed
  config is refused with a message, since it would wrap the head too.
- **CPU (tests, laptops)**: accelerate reports every torchrun rank as rank 0 of 1 unless told to use the
  CPU, so `cpu=True` is passed when there is no CUDA (gloo collectives); DeepSpeed's shared-memory
  collective op is skipped (a ~30 s JIT build on a fresh machine; gloo does the work). No DeepSpeed
  optimizer is ever configured, so fused_adam is never built either. A single process outside any
  launcher gets RANK/WORLD_SIZE/MASTER_* set, or DeepSpeed falls back to MPI discovery.

The order, as `Trainer.setup` applies it:

  1. `setup_distributed(recipe=..., run_dir=...)`: environment, Accelerator, the ZeRO-3 config;
  2. `dist.load_target(cfg)`: the target, partitioned from the start, then its gather hooks;
  3. `gathered_copy` / `full_params`: whole parameters where the head is built from the target's
     (embedding, draft-vocab lm_head rows). These are collectives: every rank makes the same calls;
  4. `dist.parallelize_head(head, param_groups=..., lr=...)`: the optimizer (ZeRO-1 sharded or not) and DDP;
  5. `dist.close()`: a barrier, then the process group is destroyed (without the barrier rank 0 was
     seen to abort in ~1 run of 6);
  6. `exit_process(code)` from the entry point: leaves without interpreter finalization (see there).
"""
from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedDataParallelKwargs
from torch import nn

from eagle_online.errors import UserError
from eagle_online.metrics import trackers
from eagle_online.recipe import Recipe, TargetConfig
from eagle_online.target import load_target_model, resolve_dtype

_closed_a_group = False  # set by Distributed.close: exit_process then skips interpreter finalization


class DistributedError(UserError, RuntimeError):
    """A launch that cannot run as asked (wrong launcher config, world size vs. partition size)."""


def zero3_config(cfg: TargetConfig, dtype: torch.dtype, world: int) -> dict:
    """The DeepSpeed config that shards the frozen target over `world` ranks: ZeRO-3, no optimizer."""
    z = cfg.zero3
    return {
        "train_micro_batch_size_per_gpu": 1,  # required by DeepSpeed even though this engine never trains
        "gradient_accumulation_steps": 1,
        "steps_per_print": 2**31 - 1,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": z.param_persistence_threshold,
            "stage3_prefetch_bucket_size": z.prefetch_bucket_size,
            "stage3_max_live_parameters": z.max_live_parameters,
            "zero_hpz_partition_size": effective_hpz(z.hpz_partition_size, world),
        },
    }


def effective_hpz(size: int, world: int) -> int:
    """hpZ's node-local partition size as used: off (1) when it spans the whole world, where the second
    partition would only duplicate the first."""
    return 1 if size >= world else size


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_env() -> None:
    """Outside a launcher DeepSpeed would look for MPI (`No module named 'mpi4py'`): describe a world of one."""
    if "RANK" in os.environ or "OMPI_COMM_WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def _skip_cpu_jit_ops() -> None:
    """On CPU DeepSpeed builds a shared-memory collective op at first use (~30 s of C++ on 2 cores); it is
    an optimisation over gloo, which then does the collectives."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class _WholeOptimizerState:
    """Checkpoints a ZeroRedundancyOptimizer as one whole state dict. The trainer calls state_dict on every
    rank and writes rank 0's, so the consolidation (a collective) happens on all ranks at once."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def state_dict(self) -> dict:
        self.optimizer.consolidate_state_dict(to=0)
        return self.optimizer.state_dict() if torch.distributed.get_rank() == 0 else {}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


@dataclass
class Distributed:
    """This process's place in the run and the handles the sharding keeps (see the module docstring)."""

    accelerator: Accelerator
    sharding: str
    optimizer_sharding: str = "none"
    target_engine: object | None = field(default=None, repr=False)
    # what a checkpoint saves and loads the optimizer through (state_dict/load_state_dict): set by parallelize_head
    optimizer_state: object | None = field(default=None, repr=False)

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    def load_target(self, cfg: TargetConfig) -> nn.Module:
        """The frozen target: whole on this rank (sharding none), or built partitioned under zero.Init
        with the hooks that gather each module's parameters while it runs (zero3)."""
        device = self.accelerator.device
        if self.sharding == "none":
            return load_target_model(cfg, device)

        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        if self.world % effective_hpz(cfg.zero3.hpz_partition_size, self.world):
            raise DistributedError(
                f"target.zero3.hpz_partition_size={cfg.zero3.hpz_partition_size} must divide the "
                f"{self.world} processes (set it to the GPUs per node)"
            )
        _single_process_env()
        config = zero3_config(cfg, resolve_dtype(cfg.dtype, device), self.world)
        # transformers builds under zero.Init while this object lives; dropped right after, so that no
        # later from_pretrained (an evaluation's draft, say) is partitioned by surprise.
        hf_config = HfDeepSpeedConfig(config)
        try:
            model = load_target_model(cfg, device, move=False)  # the partitions are already on this rank's device
        finally:
            del hf_config
        engine, *_ = deepspeed.initialize(model=model.get_decoder(), config=config)
        self.target_engine = engine
        return model

    def parallelize_head(self, head: nn.Module, *, param_groups: list[dict], lr: float, betas: tuple[float, float],
                         weight_decay: float) -> tuple[nn.Module, torch.optim.Optimizer]:
        """The head as every rank trains it, with its optimizer: the one place the head is wrapped.

        The optimizer is AdamW over `param_groups`; with training.optimizer_sharding=zero1 on several
        ranks, each rank keeps and steps the AdamW state of its share of the parameters and broadcasts
        them (ZeRO stage 1). The head is data-parallel over all ranks (DDP). A sharded optimizer stays
        outside accelerate (which would ask each rank for a whole state it does not have) and is
        checkpointed as one whole state instead: rank 0 writes it, every rank loads it and keeps its share."""
        adamw = {"lr": lr, "betas": betas, "weight_decay": weight_decay}
        if self.optimizer_sharding == "zero1" and self.world > 1:
            from torch.distributed.optim import ZeroRedundancyOptimizer

            optimizer = ZeroRedundancyOptimizer(list(param_groups), optimizer_class=torch.optim.AdamW, **adamw)
            head = self.accelerator.prepare(head)
            self.optimizer_state = _WholeOptimizerState(optimizer)
            return head, optimizer
        head, optimizer = self.accelerator.prepare(head, torch.optim.AdamW(param_groups, **adamw))
        self.optimizer_state = optimizer
        return head, optimizer

    def close(self) -> None:
        """Finish the trackers, wait for every rank, then destroy the process group. Call it on paths that
        every rank takes (the end of training, an interrupt all ranks agreed on), never after one rank's error."""
        acc = self.accelerator
        for tracker in acc.trackers:
            tracker.finish()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
            global _closed_a_group
            _closed_a_group = True


def exit_process(code: int) -> NoReturn:
    """Exit with `code`. After a process group was used, skip interpreter finalization (os._exit, once
    logs and streams are flushed): the DeepSpeed engine, the partitioned parameters and DDP still hold
    gloo process groups, and destroying those during finalization aborted a rank ("terminate called
    without an active exception", no Python frame) in 5 of 40 two-rank runs of a ZeRO-3 + DDP step on CPU
    whose rank 0 outlived rank 1 by a second (as it does when exporting). With os._exit: 0 of 24; deleting
    every such object before the teardown also gave 0 of 24, but the entry point cannot reach all of them."""
    if not _closed_a_group:
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def setup_distributed(*, recipe: Recipe, run_dir: str | Path) -> Distributed:
    """Step 1 of the module docstring's order: the environment, the Accelerator and the sharding choice.

    Raises DistributedError when launched with an accelerate DeepSpeed config (the recipe's
    target.sharding decides the sharding; the accelerate config only the processes)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise DistributedError(
            "accelerate was launched with a DeepSpeed config; eagle_online shards the target itself from the "
            "recipe (target.sharding=zero3) and trains the head data-parallel. Launch with one of "
            "launch/accelerate/*.yaml (distributed_type MULTI_GPU) instead"
        )
    cpu = not torch.cuda.is_available()
    if cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported; skips device probing
    if recipe.target.sharding == "zero3" and cpu:
        _skip_cpu_jit_ops()
    mixed = recipe.training.mixed_precision
    if mixed == "auto":
        mixed = "no" if cpu else "bf16"
    # On CPU every torchrun rank is rank 0 of 1 unless accelerate is told to use the CPU. The process
    # state is a singleton that the first caller configures, and building the trackers already asks
    # it who the main process is: so it is made here, first.
    cpu_ranks = cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1
    PartialState(cpu=cpu_ranks)
    accelerator = Accelerator(
        mixed_precision=mixed, cpu=cpu_ranks, log_with=trackers(run_dir, recipe.training.trackers),
        project_dir=str(run_dir),
        # gradients live in DDP's buckets instead of beside them: one copy of the head's gradients, not two
        kwargs_handlers=[DistributedDataParallelKwargs(gradient_as_bucket_view=True)],
    )
    return Distributed(
        accelerator=accelerator, sharding=recipe.target.sharding,
        optimizer_sharding=recipe.training.optimizer_sharding,
    )
