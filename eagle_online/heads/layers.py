"""Head layers that keep less for backward: RMSNorm and the SwiGLU MLP.

Each computes what its transformers counterpart computes, with the same parameter names (so
checkpoints and exports are unchanged), but saves only what backward cannot cheaply recompute.
The head runs its layer 7 times per step (TTT), so every byte saved per token counts 7 times.

RMSNorm: transformers' LlamaRMSNorm is written as separate ops, so autograd keeps an fp32 copy of the input
and the normalised input besides the input itself, for each of the head's four norms at each of the
7 TTT steps: measured at Llama-3.1-8B shapes under bf16 autocast, 308 KiB per token more saved
activations (5 GB at 16k tokens). This computes the same function (same parameter name, same output
dtype) and recomputes the normalised input in backward from the saved input and 1/rms.
"""
from __future__ import annotations

import torch
from torch import nn

from eagle_online.precision import CHUNK_ELEMENTS, accumulation_dtype, matmul_dtype


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        # Only linears read the head's norms, and autocast would cast y for each of them (q, k and
        # v: three saved copies of one input): cast it once here, to the same values.
        out_dtype = matmul_dtype(x) if torch.is_autocast_enabled(x.device.type) else None
        with torch.autocast(x.device.type, enabled=False):
            xa = x.to(accumulation_dtype(x.dtype))
            rstd = torch.rsqrt(xa.pow(2).mean(-1, keepdim=True) + eps)
            y = weight * (xa * rstd).to(x.dtype)
            if out_dtype is not None:
                y = y.to(out_dtype)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        acc = accumulation_dtype(x.dtype)
        xhat = x.to(acc) * rstd
        dy = dy.to(acc)
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (dy * xhat.to(x.dtype).to(acc)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        g = dy * weight.to(acc)  # the gradient with respect to the normalised input
        dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        return dx.to(x.dtype), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight · (x / rms(x)), computed in fp32 (fp64 for fp64) and cast back to x's dtype before the
    weight, as LlamaRMSNorm does; under autocast the result is in autocast's dtype (what a linear
    reading it casts it to), not fp32."""
    return _RMSNorm.apply(x, weight, eps)


class RMSNorm(nn.Module):
    """LlamaRMSNorm's function and state (`weight`, `variance_epsilon`), with a lean backward."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"




class _SwiGLUDown(torch.autograd.Function):
    """down(silu(gate) · up), keeping gate and up but not the [T, intermediate] product, which is
    recomputed in backward (elementwise) instead of being saved twice (by the mul and by down_proj)."""

    @staticmethod
    def forward(ctx, gate, up, down_weight):
        dtype = matmul_dtype(gate)
        with torch.autocast(gate.device.type, enabled=False):
            w = down_weight.to(dtype)
            h = (torch.nn.functional.silu(gate) * up).to(dtype)
            y = h @ w.T
        ctx.save_for_backward(gate, up, down_weight)  # the parameter, not its cast: no copy per TTT step
        ctx.dtype = dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up, down_weight = ctx.saved_tensors
        w = down_weight.to(ctx.dtype)
        width = gate.shape[-1]
        g_rows, u_rows = gate.reshape(-1, width), up.reshape(-1, width)
        dy = dy.reshape(-1, dy.shape[-1]).to(w.dtype)
        # Elementwise work goes a chunk of rows at a time: fp32 [tokens × intermediate] temporaries
        # would be ~1 GB each at 16k tokens. Compiled, it is one pass: inductor fuses it into kernels
        # without temporaries, and a loop over a dynamic length would pin the compiled graph's shape.
        if torch.compiler.is_compiling():
            chunks = [slice(None)]
        else:
            step = max(1, CHUNK_ELEMENTS // width)
            chunks = [slice(s, s + step) for s in range(0, len(g_rows), step)]
        h = torch.empty(g_rows.shape, dtype=w.dtype, device=w.device)
        for c in chunks:  # the forward's product, recomputed the same way
            h[c] = (torch.nn.functional.silu(g_rows[c]) * u_rows[c]).to(w.dtype)
        dw = (dy.T @ h).to(down_weight.dtype)
        del h
        dh = dy @ w
        dgate, dup = torch.empty_like(g_rows), torch.empty_like(u_rows)
        acc = accumulation_dtype(gate.dtype)
        for c in chunks:
            g = g_rows[c].to(acc)
            sig = torch.sigmoid(g)
            d = dh[c].to(acc)
            dup[c] = d * g * sig
            dgate[c] = d * u_rows[c].to(acc) * sig * (1 + g * (1 - sig))
        return dgate.view_as(gate), dup.view_as(up), dw


class SwiGLUMLP(nn.Module):
    """LlamaMLP with the SiLU activation (`gate_proj`, `up_proj`, `down_proj`): saves gate and up for
    backward, 2 × intermediate values per token, instead of 4 (measured at Llama-3.1-8B shapes, bf16:
    392 KiB per token fewer saved activations over 7 TTT steps, 6.6 GB at 16k tokens)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _SwiGLUDown.apply(self.gate_proj(x), self.up_proj(x), self.down_proj.weight)
        return y if self.down_proj.bias is None else y + self.down_proj.bias
