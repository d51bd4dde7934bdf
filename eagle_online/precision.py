"""Which dtype a computation runs in, decided once for the head's custom autograd Functions."""
from __future__ import annotations

import torch

# Elements per fp32 temporary that a chunked computation holds at once: 2^26 (256 MB). The fused loss
# chunks its [rows × vocab] logits by it, SwiGLU's backward its [rows × intermediate] products.
CHUNK_ELEMENTS = 1 << 26


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where softmax, norms and sums accumulate: fp32, or fp64 for fp64 inputs (the exact tests)."""
    return torch.promote_types(dtype, torch.float32)


def matmul_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on `t` runs in: autocast's when it is on for t's device (what nn.Linear would
    cast to), else t's own."""
    device_type = t.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else t.dtype
