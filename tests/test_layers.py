"""The head's RMSNorm against transformers' LlamaRMSNorm: same function, state and gradients,
keeping less for backward."""
import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from eagle_online.heads.layers import RMSNorm


def _saved_bytes(fn):
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def _run(module, x, dy, autocast):
    """(output, input grad, parameter grads, bytes saved for backward) of module(x) against dy."""
    xi = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y, saved = _saved_bytes(lambda: module(xi))
    (y.to(dy.dtype) * dy).sum().backward()
    return y, xi.grad, [p.grad for p in module.parameters()], saved


# fp32 inputs agree to summation order; bf16 inputs (under autocast, as in training) to bf16 rounding:
# both round the normalised input to bf16, LlamaRMSNorm also rounds its input's gradient on the way back.
@pytest.mark.parametrize("dtype, autocast, tol", [(torch.float32, False, 1e-6), (torch.bfloat16, True, 2e-2)])
def test_rmsnorm_matches_llama(dtype, autocast, tol):
    g = torch.Generator().manual_seed(0)
    ours, theirs = RMSNorm(48, eps=1e-5), LlamaRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        ours.weight.normal_(generator=g)
    theirs.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight"]
    x = (3 * torch.randn(2, 33, 48, generator=g)).to(dtype)
    dy = torch.randn(2, 33, 48, generator=g)
    (y, dx, (dw,), saved), (ry, rdx, (rdw,), rsaved) = (_run(norm, x, dy, autocast) for norm in (ours, theirs))
    if autocast:  # ours hands the next linear the bf16 it would cast LlamaRMSNorm's fp32 output to
        assert y.dtype == torch.bfloat16 and torch.equal(y, ry.to(torch.bfloat16))
    assert y.dtype == (torch.bfloat16 if autocast else ry.dtype) and dx.dtype == rdx.dtype
    for a, b in ((y, ry), (dx, rdx), (dw, rdw)):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * b.abs().max().item())
    assert saved < rsaved  # the input and 1/rms per row, not fp32 copies of the input and its normalisation
    assert saved <= x.untyped_storage().nbytes() + ours.weight.untyped_storage().nbytes() + 2 * 33 * 4


def test_rmsnorm_fp64_gradients():
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    norm = RMSNorm(7).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    assert torch.autograd.gradcheck(norm, (x,))


@pytest.mark.parametrize("dtype, autocast, tol", [(torch.float64, False, 1e-12), (torch.float32, False, 1e-5),
                                                  (torch.float32, True, 2e-2)])
@pytest.mark.parametrize("chunked", [False, True])
def test_swiglu_mlp_matches_llama_mlp(dtype, autocast, tol, chunked, monkeypatch):
    """Same output and gradients as LlamaMLP (silu), with backward's rows in one chunk or several;
    fewer bytes saved for backward."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from eagle_online.heads import layers
    from eagle_online.heads.layers import SwiGLUMLP

    if chunked:
        monkeypatch.setattr(layers, "CHUNK_ELEMENTS", 56 * 5)  # 5 of the 33 rows at a time

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=24, intermediate_size=56, hidden_act="silu", num_attention_heads=4)
    theirs = LlamaMLP(config).to(dtype)
    ours = SwiGLUMLP(24, 56).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(3, 11, 24, dtype=dtype)
    dy = torch.randn(3, 11, 24, dtype=dtype)
    (y, dx, grads, saved), (ry, rdx, rgrads, rsaved) = (_run(mlp, x, dy, autocast) for mlp in (ours, theirs))
    for a, b in zip([y, dx, *grads], [ry, rdx, *rgrads]):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())
    assert saved < rsaved
