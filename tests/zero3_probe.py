"""One rank of a ZeRO-3 probe, started by tests/test_distributed.py under a real launcher.

Builds the tiny target the way the trainer does (distributed.setup_distributed, then load_target),
runs FrozenTarget over fixed packed rows, and writes what this rank saw to OUT/rank{R}.pt: how many
target elements it stores, the features and teacher it computed, and the bytes its all-gathers brought
in per forward. Usage: zero3_probe.py OUT [key=value recipe overrides]
"""
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

from eagle_online.distributed import setup_distributed
from eagle_online.recipe import load_recipe
from eagle_online.sharded import parameter_counts
from eagle_online.target import FrozenTarget

FORWARDS = 3


def probe_inputs():
    """Two packed rows of three conversations each (position ids restart), the same on every rank."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4096, (2, 48), generator=gen)
    pos = torch.cat([torch.arange(20), torch.arange(12), torch.arange(16)]).repeat(2, 1)
    return ids, pos


def draft_ids():
    return torch.arange(0, 4096, 3)


def main():
    out = Path(sys.argv[1])
    recipe = load_recipe("tiny_eagle3", [f"run.output_dir={out}", "target.sharding=zero3", *sys.argv[2:]])
    d = setup_distributed(recipe=recipe, run_dir=out)
    model = d.load_target(recipe.target)
    target = FrozenTarget(model, None, draft_ids())
    counts = parameter_counts(model)

    # Count what every all-gather delivers from other ranks: the output tensor minus this rank's own share.
    received: Counter = Counter()
    groups: set = set()
    forward = [-1]

    def counting(fn):
        def wrapper(*args, **kwargs):
            output = kwargs.get("output_tensor", args[0] if args else None)
            group = kwargs.get("group")
            n = dist.get_world_size(group)
            groups.add(n)
            received[forward[0]] += output.numel() * output.element_size() * (n - 1) / n
            return fn(*args, **kwargs)
        return wrapper

    import deepspeed.comm.comm as ds_comm

    # DeepSpeed's backend keeps its own reference to torch's all_gather_into_tensor; other paths call torch's.
    ds_comm.cdb.all_gather_function = counting(ds_comm.cdb.all_gather_function)
    dist.all_gather_into_tensor = counting(dist.all_gather_into_tensor)
    ids, pos = probe_inputs()
    outputs = []
    for i in range(FORWARDS):
        forward[0] = i
        outputs.append(target(ids, pos))
    last = outputs[-1]
    torch.save({
        "rank": d.accelerator.process_index, "world": d.world, "counts": counts,
        "received_per_forward": [received[i] for i in range(FORWARDS)], "group_sizes": sorted(groups),
        "aux_hidden": last.aux_hidden, "teacher_logits": last.teacher_logits,
        "teacher_in_draft": last.teacher_in_draft, "lm_head_draft": target.lm_head_draft,
        "repeatable": all(torch.equal(o.aux_hidden, last.aux_hidden) for o in outputs),
    }, out / f"rank{d.accelerator.process_index}.pt")
    d.close()


if __name__ == "__main__":
    main()
