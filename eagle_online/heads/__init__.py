"""Draft heads, registered by the architecture name their exported config.json carries.

Every head is a DraftHead (heads/base.py): trained the same way, `head(target_out, batch) -> HeadOutput`,
built, calibrated, exported and loaded through its own methods, and run at inference by its drafter
class. A new head is one module plus one line in HEADS; the recipe's `draft.architecture` takes the
names registered here.
"""
from __future__ import annotations

from dataclasses import dataclass

from eagle_online.heads.base import Drafter, DraftHead
from eagle_online.heads.eagle import EagleDrafter, EagleHead
from eagle_online.heads.eagle3 import Eagle3Head
from eagle_online.heads.eagle3_decode import Eagle3Drafter
from eagle_online.heads.mlp import MLPDrafter, MLPHead
from eagle_online.heads.mlp_speculator import MLPSpeculatorDrafter, MLPSpeculatorHead


@dataclass(frozen=True)
class HeadSpec:
    """A registered head: its module class and the drafter that runs it at inference."""

    head: type[DraftHead]
    drafter: type[Drafter]


HEADS: dict[str, HeadSpec] = {spec.head.ARCHITECTURE: spec for spec in (
    HeadSpec(Eagle3Head, Eagle3Drafter),
    HeadSpec(EagleHead, EagleDrafter),
    HeadSpec(MLPHead, MLPDrafter),
    HeadSpec(MLPSpeculatorHead, MLPSpeculatorDrafter),
)}
EAGLE3 = Eagle3Head.ARCHITECTURE


def head_spec(architecture: str) -> HeadSpec:
    """The registered head for an architecture name, or an error listing the known ones."""
    try:
        return HEADS[architecture]
    except KeyError:
        raise ValueError(f"unknown draft architecture {architecture!r}; known: {sorted(HEADS)}") from None


def head_class(architecture: str) -> type[DraftHead]:
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
    return head_class(architecture).config_for(target_config, draft_cfg, vocab_size)


def build_head(config, draft_cfg=None) -> DraftHead:
    """A fresh head for `config`, with the recipe's training settings when `draft_cfg` is given."""
    head = head_class(architecture_of(config))(config)
    if draft_cfg is not None:
        head.configure_training(draft_cfg)
    return head


def drafter_for(head: DraftHead) -> Drafter:
    """The inference-time drafter of a head."""
    return head_spec(architecture_of(head.config)).drafter(head)
