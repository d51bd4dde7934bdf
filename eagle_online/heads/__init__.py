"""Draft heads, registered by the architecture name their exported config.json carries."""
from __future__ import annotations

from torch import nn

from eagle_online.heads.eagle3 import ARCHITECTURE as EAGLE3
from eagle_online.heads.eagle3 import Eagle3Head

HEADS: dict[str, type[nn.Module]] = {EAGLE3: Eagle3Head}


def head_class(architecture: str) -> type[nn.Module]:
    """The head class for an architecture name, or an error listing the known ones."""
    try:
        return HEADS[architecture]
    except KeyError:
        raise ValueError(f"unknown draft architecture {architecture!r}; known: {sorted(HEADS)}") from None
