"""Draft heads, registered by the architecture name their exported config.json carries.

Every head is trained the same way, `head(target_out, batch) -> HeadOutput` (heads/base.py), and run at
inference by its drafter class. `build_head` makes one from the recipe's `draft` section and the
target's config.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from eagle_online.heads.base import Drafter
from eagle_online.heads.eagle import ARCHITECTURE as EAGLE
from eagle_online.heads.eagle import EagleDrafter, EagleHead, eagle_config
from eagle_online.heads.eagle3 import ARCHITECTURE as EAGLE3
from eagle_online.heads.eagle3 import Eagle3Head, eagle3_config
from eagle_online.heads.eagle3_decode import Eagle3Drafter
from eagle_online.heads.mlp import ARCHITECTURE as MLP
from eagle_online.heads.mlp import MLPDrafter, MLPHead, mlp_config


@dataclass(frozen=True)
class HeadSpec:
    """A registered head: its module class and the drafter that runs it at inference."""

    head: type[nn.Module]
    drafter: type[Drafter]


HEADS: dict[str, HeadSpec] = {
    EAGLE3: HeadSpec(Eagle3Head, Eagle3Drafter),
    EAGLE: HeadSpec(EagleHead, EagleDrafter),
    MLP: HeadSpec(MLPHead, MLPDrafter),
}


def head_spec(architecture: str) -> HeadSpec:
    """The registered head for an architecture name, or an error listing the known ones."""
    try:
        return HEADS[architecture]
    except KeyError:
        raise ValueError(f"unknown draft architecture {architecture!r}; known: {sorted(HEADS)}") from None


def head_class(architecture: str) -> type[nn.Module]:
    """The head class for an architecture name, or an error listing the known ones."""
    return head_spec(architecture).head


def architecture_of(config) -> str:
    """The registered architecture a head config names (the first registered one of its list)."""
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in HEADS:
            return name
    raise ValueError(f"config architectures {names} name no known draft head; known: {sorted(HEADS)}")


def draft_config(architecture: str, target_config, draft_cfg, vocab_size: int):
    """The head's config for a target, from the recipe's `draft` section (`draft_cfg`)."""
    if architecture == EAGLE3:
        config = eagle3_config(target_config, draft_cfg.draft_vocab_size)
    elif architecture == EAGLE:
        config = eagle_config(target_config, fc_bias=draft_cfg.fc_bias)
    elif architecture == MLP:
        config = mlp_config(target_config, draft_cfg.draft_vocab_size, draft_cfg.mlp_blocks)
    else:
        head_spec(architecture)  # raises, naming the known ones
    config.vocab_size = vocab_size
    return config


def build_head(config, draft_cfg=None) -> nn.Module:
    """A fresh head for `config`, with the recipe's training settings when `draft_cfg` is given."""
    head = head_spec(architecture_of(config)).head(config)
    if draft_cfg is not None:
        configure_training(head, draft_cfg)
    return head


def configure_training(head: nn.Module, draft_cfg) -> None:
    """Set the recipe's training-forward settings on a head (built fresh or loaded from a checkpoint)."""
    if isinstance(head, Eagle3Head):
        head.ttt_length, head.loss_decay = draft_cfg.ttt_length, draft_cfg.loss_decay
    elif isinstance(head, EagleHead):
        head.noise = draft_cfg.feature_noise


def drafter_for(head: nn.Module) -> Drafter:
    """The inference-time drafter of a head."""
    return head_spec(architecture_of(head.config)).drafter(head)
