"""Mask-free attention over packed conversations (eagle_online.attention): each kernel against
per-conversation sdpa, and the `varlen` target attention against transformers' own sdpa.

The CUDA varlen kernel and the bf16 target on CUDA are checked when a CUDA device is present (marker gpu).
"""
import pytest
import torch
import torch.nn.functional as F

from eagle_online.attention import KERNELS, DocumentLayout, causal_plus_diagonal_attention, pick_kernel
from eagle_online.target import FrozenTarget, resolve_attn_implementation

_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _packed(rows):
    return torch.tensor([[p for n in row for p in range(n)] for row in rows])


@pytest.mark.parametrize("kernel", ["cpu_flash", "math"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_kernel_forward_backward_match_per_conversation_sdpa(kernel, dtype):
    """Two rows of packed conversations (GQA: 4 query heads on 2 key heads). Each kernel's output and
    log-sum-exp, and its gradients from the output it returned, equal causal sdpa run conversation by
    conversation (fp64 reference)."""
    g = torch.Generator().manual_seed(0)
    pos = _packed([[5, 1, 4], [3, 7]])
    layout = DocumentLayout.from_position_ids(pos)
    n, h, kvh, d = pos.numel(), 4, 2, 8
    q, k, v = (torch.randn(n, heads, d, generator=g, dtype=torch.float64) for heads in (h, kvh, kvh))
    dout = torch.randn(n, h, d, generator=g, dtype=torch.float64)
    scale = 0.3

    ref_out, ref_lse, ref_grads = [], [], [torch.zeros_like(x) for x in (q, k, v)]
    cu = layout.cu_seqlens.tolist()
    for a, b in zip(cu[:-1], cu[1:]):
        qs, ks, vs = (x[a:b].detach().clone().requires_grad_(True) for x in (q, k, v))
        qt, kt, vt = (x.transpose(0, 1)[None] for x in (qs, ks, vs))
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True)[0]
        scores = (qt @ kt.repeat_interleave(h // kvh, 1).transpose(-1, -2))[0] * scale
        causal = torch.ones(b - a, b - a, dtype=torch.bool).tril()
        ref_lse.append(torch.logsumexp(scores.masked_fill(~causal, -torch.inf), -1).T)
        out = out.transpose(0, 1)
        (out * dout[a:b]).sum().backward()
        ref_out.append(out.detach())
        for acc, x in zip(ref_grads, (qs, ks, vs)):
            acc[a:b] = x.grad

    kern = KERNELS[kernel]
    args = [x.to(dtype) for x in (q, k, v)]
    out, lse = kern.forward(*args, layout, scale)
    grads = kern.backward(dout.to(dtype), *args, out, lse, layout, scale)
    tol = _TOL[dtype]
    torch.testing.assert_close(out.double(), torch.cat(ref_out), rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), torch.cat(ref_lse).detach(), rtol=tol, atol=tol)
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape and got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_layout_from_offsets_equals_layout_from_positions():
    pos = _packed([[5, 1, 4], [3, 7]])
    a = DocumentLayout.from_position_ids(pos)
    b = DocumentLayout.from_cu_seqlens(a.cu_seqlens, pos.shape)
    assert a.cu_seqlens.tolist() == [0, 5, 6, 10, 13, 20] and a.max_len == 7 and a.num_docs == 5
    assert torch.equal(a.doc, b.doc) and torch.equal(a.valid, b.valid) and a.max_len == b.max_len


def test_kernel_choice():
    assert pick_kernel(torch.zeros(1, 1, 1)).name == "cpu_flash"
    assert pick_kernel(torch.zeros(1, 1, 1), "math").name == "math"
    with pytest.raises(ValueError, match="cpu_flash"):
        pick_kernel(torch.zeros(1), "nope")
    assert pick_kernel(torch.zeros(1, 1, 1), window=4).name == "math"  # cpu_flash has no window
    with pytest.raises(ValueError, match="softcap"):
        pick_kernel(torch.zeros(1, 1, 1), "cpu_flash", softcap=1.0)


def test_auto_attention_resolution(tiny_llama):
    cpu = torch.device("cpu")
    assert resolve_attn_implementation("auto", cpu, tiny_llama.config) == "varlen"
    assert resolve_attn_implementation("sdpa", cpu, tiny_llama.config) == "sdpa"
    from transformers import Qwen2Config

    sliding = Qwen2Config(use_sliding_window=True, sliding_window=16, layer_types=["sliding_attention"] * 2,
                          num_hidden_layers=2)
    assert resolve_attn_implementation("auto", cpu, sliding) == "varlen"  # windows: tests/test_families.py


def _explicit(q, k, v, scale, window=None, softcap=None, sinks=None):
    """One conversation's attention written out: [n, H, d] queries over [n, kv, d] keys."""
    k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], 1) for x in (k, v))
    s = torch.einsum("ihc,jhc->hij", q, k) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    back = torch.arange(len(q))[:, None] - torch.arange(len(q))[None]
    s = s.masked_fill((back < 0) | (back >= (window or len(q))), -torch.inf)
    if sinks is not None:
        s = torch.cat([s, sinks[:, None, None].expand(-1, len(q), 1)], -1)
    return torch.einsum("hij,jhc->ihc", torch.softmax(s, -1)[..., : len(q)], v)


@pytest.mark.parametrize(("window", "softcap"), [(3, None), (None, 0.7), (4, 0.5)])
def test_math_kernel_window_and_softcap_forward_backward(window, softcap):
    """The math kernel with a sliding window and soft-capped scores (the target families' extras), and
    its backward, against the attention written out per conversation (fp64, autograd)."""
    from eagle_online.attention import packed_attention

    g = torch.Generator().manual_seed(0)
    pos = _packed([[9, 2, 6]])
    layout = DocumentLayout.from_position_ids(pos)
    n, h, kvh, d, scale = pos.numel(), 4, 2, 8, 0.9
    q, k, v = (torch.randn(n, heads, d, generator=g, dtype=torch.float64) for heads in (h, kvh, kvh))
    dout = torch.randn(n, h, d, generator=g, dtype=torch.float64)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    cu = layout.cu_seqlens.tolist()
    ref = torch.cat([_explicit(*(x[a:b] for x in leaves), scale, window, softcap) for a, b in zip(cu[:-1], cu[1:])])
    (ref * dout).sum().backward()
    assert pick_kernel(q, window=window, softcap=softcap).name == "math"
    out, lse = KERNELS["math"].forward(q, k, v, layout, scale, window, softcap)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(packed_attention(q, k, v, layout, scale, window, softcap), out, rtol=0, atol=0)
    grads = KERNELS["math"].backward(dout, q, k, v, out, lse, layout, scale, window, softcap)
    for got, leaf in zip(grads, leaves):
        torch.testing.assert_close(got, leaf.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window", [None, 3, 100])
def test_packed_attention_sinks(window):
    """Attention sinks (a per-head logit in every softmax's denominator, no value), applied to the
    fastest kernel's output through its log-sum-exp, equal the softmax with the sink column written out;
    a window longer than every conversation is dropped (cpu_flash runs) and changes nothing."""
    from eagle_online.attention import packed_attention

    g = torch.Generator().manual_seed(1)
    pos = _packed([[5, 8], [6, 7]])
    layout = DocumentLayout.from_position_ids(pos)
    n, h, kvh, d = pos.numel(), 4, 2, 8
    q, k, v = (torch.randn(n, heads, d, generator=g, dtype=torch.float64) for heads in (h, kvh, kvh))
    sinks = torch.randn(h, generator=g, dtype=torch.float64)
    cu = layout.cu_seqlens.tolist()
    ref = torch.cat([_explicit(q[a:b], k[a:b], v[a:b], 0.4, window, sinks=sinks) for a, b in zip(cu[:-1], cu[1:])])
    got = packed_attention(q, k, v, layout, 0.4, window, sinks=sinks)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    assert (got - packed_attention(q, k, v, layout, 0.4, window)).abs().max() > 1e-2


@pytest.mark.parametrize("with_layout", [True, False])
def test_varlen_target_equals_sdpa_target_on_packed_rows(tiny_llama, with_layout):
    """The frozen target with `varlen` attention gives the sdpa target's features and teacher on a
    packed row (conversation boundaries from the layout FrozenTarget builds, or from position_ids)."""
    draft_ids = torch.arange(0, 97, 3)
    pos = _packed([[7, 5, 9]])
    ids = torch.randint(0, 97, pos.shape, generator=torch.Generator().manual_seed(1))
    sdpa = FrozenTarget(tiny_llama, None, draft_ids)(ids, pos)
    tiny_llama.set_attn_implementation(resolve_attn_implementation("varlen", torch.device("cpu")))
    target = FrozenTarget(tiny_llama, None, draft_ids)
    if not with_layout:
        target._packing_kwargs = lambda position_ids: {}
    varlen = target(ids, pos)
    for name in ("aux_hidden", "last_hidden", "teacher_logits"):
        torch.testing.assert_close(getattr(varlen, name), getattr(sdpa, name), rtol=1e-5, atol=1e-5, msg=name)
    assert torch.equal(varlen.teacher_in_draft, sdpa.teacher_in_draft)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_varlen_target_equals_sdpa_target_in_bf16(device):
    """The bf16 target as training runs it (`varlen`: torch's CUDA flash varlen op on a GPU, the CPU flash
    kernel on CPU) against transformers' sdpa with its block-diagonal mask, on packed rows of head_dim 64.

    Tolerance: both run 8 bf16 layers whose every matmul output is rounded to 8 mantissa bits (relative
    2^-9), with different kernels summing in different orders, so they agree to a few bf16 ulps of the
    largest value, not bit for bit: features and logits within 3% of the tensor's largest magnitude, and
    the teacher's argmax test (is the top token a draft token) equal on at least 97% of positions (a
    near-tie may flip)."""
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config

    torch.manual_seed(0)
    config = tiny_llama_config(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                               vocab_size=512, max_position_embeddings=1024)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16).eval()
    draft_ids = torch.arange(0, 512, 3, device=device)
    pos = _packed([[70, 5, 181], [256]]).to(device)
    ids = torch.randint(0, 512, pos.shape, generator=torch.Generator().manual_seed(1)).to(device)
    sdpa = FrozenTarget(model, None, draft_ids)(ids, pos)
    model.set_attn_implementation(resolve_attn_implementation("varlen", torch.device(device)))
    varlen = FrozenTarget(model, None, draft_ids)(ids, pos)
    for name in ("aux_hidden", "last_hidden", "teacher_logits"):
        got, want = getattr(varlen, name), getattr(sdpa, name)
        assert got.dtype == torch.bfloat16, name
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0.03 * want.float().abs().max().item(),
                                   msg=name)
    agree = (varlen.teacher_in_draft == sdpa.teacher_in_draft).float().mean().item()
    assert agree >= 0.97, agree


def test_varlen_target_decodes_with_a_kv_cache_as_sdpa_does(tiny_llama):
    """Speculative decoding verifies through a KV cache (FrozenTarget.decode): with `varlen` attention,
    a prompt then chunks of 3 and 1 new tokens give the logits and aux features the sdpa target gives."""
    from transformers import DynamicCache

    draft_ids = torch.arange(0, 97, 3)
    ids = torch.randint(0, 97, (12,), generator=torch.Generator().manual_seed(2))
    chunks = [(0, 8), (8, 11), (11, 12)]

    def run(target):
        cache, steps = DynamicCache(), []
        for a, b in chunks:
            steps.append(target.decode(ids[a:b], torch.arange(a, b), cache))
        return steps

    sdpa = run(FrozenTarget(tiny_llama, None, draft_ids))
    tiny_llama.set_attn_implementation(resolve_attn_implementation("varlen", torch.device("cpu")))
    varlen = run(FrozenTarget(tiny_llama, None, draft_ids))
    for want, got in zip(sdpa, varlen):
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.aux_hidden, want.aux_hidden, rtol=1e-5, atol=1e-5)


def test_cuda_varlen_passes_what_the_installed_op_declares():
    """torch's private varlen op grew arguments between versions (published forms: scale and window_size
    without enable_gqa; 2.13's with enable_gqa and more): the call passes those the installed op's schema
    names, no more."""
    from types import SimpleNamespace

    from eagle_online.attention import CudaVarlen

    def op(*names):
        args = [SimpleNamespace(name=n) for n in ("query", "key", "value", "cu_seq_q", "cu_seq_k", *names)]
        return SimpleNamespace(default=SimpleNamespace(_schema=SimpleNamespace(arguments=args)))

    newest = op("max_q", "max_k", "is_causal", "scale", "window_size", "enable_gqa", "seqused_k")
    assert CudaVarlen.options(newest, 0.1, True) == {"scale": 0.1, "window_size": [-1, 0], "enable_gqa": True}
    older = op("max_q", "max_k", "is_causal", "scale", "window_size")
    assert CudaVarlen.options(older, 0.1, True) == {"scale": 0.1, "window_size": [-1, 0]}
    assert CudaVarlen.options(op("max_q", "max_k", "is_causal", "scale"), 0.1, False) == {"scale": 0.1}


@pytest.mark.gpu
def test_cuda_varlen_matches_math_kernel_with_diagonal_keys():
    """On a GPU: the TTT attention (step-0 keys through the CUDA varlen kernel, two diagonal steps merged
    through the log-sum-exp) and its gradients equal the same computed with the explicit math kernel
    (bf16 inputs, fp32 softmax in both; bf16 tolerance, relative to each tensor's largest entry)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    pos = _packed([[50, 3, 77], [130]]).cuda()
    layout = DocumentLayout.from_position_ids(pos)
    n, h, kvh, d = pos.numel(), 8, 2, 128

    def inputs():
        q = torch.randn(n, h, d, device="cuda", generator=g)
        kv = [torch.randn(n, kvh, d, device="cuda", generator=g) for _ in range(6)]
        return [x.bfloat16().requires_grad_(True) for x in (q, *kv)]

    base = inputs()
    dout = torch.randn(n, h, d, device="cuda", generator=g).bfloat16()
    results = []
    for kernel in ("cuda_varlen", "math"):
        xs = [x.detach().clone().requires_grad_(True) for x in base]
        q, k0, k1, k2, v0, v1, v2 = xs
        out = causal_plus_diagonal_attention(q, [k0, k1, k2], [v0, v1, v2], layout, d**-0.5, kernel)
        (out.float() * dout.float()).sum().backward()
        results.append([out, *[x.grad for x in xs]])
    for a, b in zip(*results):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.float().abs().max().item())


def test_document_layout_regroups_and_restores_tokens():
    # Two rows: the second starts mid-sequence with position 3 (still a new conversation for the row).
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [3, 4, 0, 1, 2, 3]])
    layout = DocumentLayout.from_position_ids(pos)
    assert layout.valid.sum(1).tolist() == [3, 2, 1, 2, 4]
    assert layout.doc.tolist() == [[0, 0, 0, 1, 1, 2], [3, 3, 4, 4, 4, 4]]
    tokens = torch.arange(12)
    padded = layout.pad(tokens)
    assert padded[layout.valid].tolist() == list(range(12))
    assert torch.equal(layout.unpad(padded), tokens)


@pytest.mark.gpu
def test_cuda_varlen_window_matches_math_kernel():
    """On a GPU: a sliding window through torch's CUDA varlen op (its window_size) equals the explicit
    math kernel's (bf16 inputs; bf16 tolerance relative to the largest entry), when the op takes one."""
    g = torch.Generator(device="cuda").manual_seed(0)
    pos = _packed([[50, 3, 77], [130]]).cuda()
    layout = DocumentLayout.from_position_ids(pos)
    n, h, kvh, d = pos.numel(), 8, 2, 128
    q, k, v = (torch.randn(n, heads, d, device="cuda", generator=g).bfloat16() for heads in (h, kvh, kvh))
    assert pick_kernel(q, window=16).name == "cuda_varlen", "the op takes no window_size: windows run the math kernel"
    out, _ = KERNELS["cuda_varlen"].forward(q, k, v, layout, d**-0.5, 16)
    ref, _ = KERNELS["math"].forward(q, k, v, layout, d**-0.5, 16)
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=2e-2 * float(ref.abs().max()))
