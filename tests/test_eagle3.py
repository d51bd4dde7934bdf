"""The EAGLE-3 head and its TTT unroll, against references written independently here."""

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from eagle_online.heads import head_class
from eagle_online.heads.eagle3 import DocumentLayout, Eagle3Head, TTTAttention, eagle3_config
from eagle_online.losses import soft_cross_entropy
from tests.conftest import tiny_llama_config


def _packed_positions(lengths):
    return torch.cat([torch.arange(n) for n in lengths])[None]


# Tolerances per dtype against the fp64 dense reference: fp64 agrees to rounding; fp32 and bf16 are
# the kernels' own precision (bf16 inputs and outputs carry 8 bits of mantissa).
_TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 4e-2}


@pytest.mark.parametrize("kernel", ["cpu_flash", "math"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_ttt_attention_matches_dense_reference(kernel, dtype):
    """Step k's query i sees step-0 keys j <= i of its own conversation and the keys of steps 1..k at
    position i only. The reference flattens all steps into one sequence with that mask (fp64, dense),
    and autograd through it gives the reference gradients of inputs and projection weights."""
    torch.manual_seed(0)
    cfg = eagle3_config(tiny_llama_config(), 40)
    attn = TTTAttention(cfg).double()
    attn.kernel = kernel
    head = Eagle3Head(cfg).double()
    steps, lengths = 4, [5, 3, 6]
    pos = _packed_positions(lengths)
    t = pos.shape[1]
    docs = torch.cumsum(pos == 0, dim=-1)  # conversation of each token
    layout = DocumentLayout.from_position_ids(pos)
    xs = [torch.randn(1, t, 2 * cfg.hidden_size, dtype=torch.double, requires_grad=True) for _ in range(steps)]
    grad_out = [torch.randn(1, t, cfg.hidden_size, dtype=torch.double) for _ in range(steps)]
    test_attn = TTTAttention(cfg).to(dtype)
    test_attn.load_state_dict(attn.state_dict())
    test_attn.kernel = kernel
    test_xs = [x.detach().to(dtype).requires_grad_(True) for x in xs]
    cache, outs = [], []
    for k, x in enumerate(test_xs):
        cos, sin = head.rotary_emb(x, pos + k)
        outs.append(test_attn(x, cos.to(dtype), sin.to(dtype), cache, layout))
    sum((o.double() * g).sum() for o, g in zip(outs, grad_out)).backward()

    # Dense reference over the flattened (step, position) sequence.
    h, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    qs, ks, vs = [], [], []
    for k, x in enumerate(xs):
        cos, sin = head.rotary_emb(x, pos + k)
        q = attn.q_proj(x).view(1, t, h, d).transpose(1, 2)
        kk = attn.k_proj(x).view(1, t, kvh, d).transpose(1, 2)
        q, kk = apply_rotary_pos_emb(q, kk, cos, sin)
        qs.append(q)
        ks.append(kk.repeat_interleave(h // kvh, dim=1))
        vs.append(attn.v_proj(x).view(1, t, kvh, d).transpose(1, 2).repeat_interleave(h // kvh, dim=1))
    q, k_all, v_all = torch.cat(qs, 2), torch.cat(ks, 2), torch.cat(vs, 2)
    n = steps * t
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for s in range(steps):
        for i in range(t):
            for s2 in range(steps):
                for j in range(t):
                    if s2 == 0:
                        ok = j <= i and docs[0, i] == docs[0, j]
                    else:
                        ok = 1 <= s2 <= s and j == i
                    allowed[s * t + i, s2 * t + j] = ok
    ref = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=allowed)
    ref = attn.o_proj(ref.transpose(1, 2).reshape(1, n, h * d))
    (ref * torch.cat(grad_out, 1)).sum().backward()
    tol = _TOL[dtype]
    for s in range(steps):
        torch.testing.assert_close(outs[s].double(), ref[:, s * t : (s + 1) * t], rtol=tol, atol=tol)
        torch.testing.assert_close(test_xs[s].grad.double(), xs[s].grad, rtol=tol, atol=tol)
    for name, p in attn.named_parameters():
        torch.testing.assert_close(dict(test_attn.named_parameters())[name].grad.double(), p.grad, rtol=tol,
                                   atol=tol * max(1.0, p.grad.abs().max().item()), msg=name)


def _head_and_batch(lengths=(9, 7), device="cpu", **config):
    """A random EAGLE-3 head (the tiny target's shapes, or `config` overrides) and a packed batch, on `device`."""
    torch.manual_seed(0)
    cfg = eagle3_config(tiny_llama_config(**config), 40)
    head = Eagle3Head(cfg)
    pos = _packed_positions(list(lengths))
    t = pos.shape[1]
    batch = dict(
        aux_hidden=torch.randn(1, t, 3 * cfg.hidden_size),
        input_ids=torch.randint(0, cfg.vocab_size, (1, t)),
        position_ids=pos,
        loss_mask=torch.ones(1, t, dtype=torch.long),
        teacher_logits=torch.randn(1, t, 40),
        teacher_in_draft=torch.ones(1, t, dtype=torch.bool),
    )
    return head.to(device), {k: v.to(device) for k, v in batch.items()}


def test_ttt_step_zero_is_plain_next_next_token_prediction():
    """Step 0 of the unroll: position t reads (g_t, x_{t+1}) and is scored against the teacher at t+1,
    never across a conversation boundary; each later step counts one position fewer per conversation."""
    head, b = _head_and_batch()
    out = head.unroll(**b, ttt_length=3)
    # Conversation of n tokens: predictions of x_{t+2+k} inside it give n-2-k positions.
    assert out.metrics.counts == [(9 - 2 - k) + (7 - 2 - k) for k in range(3)]
    # Recompute step 0 by hand with causal attention inside each conversation.
    hidden = head.fc(b["aux_hidden"])
    step0_logits = []
    for start, n in ((0, 9), (9, 7)):
        sl = slice(start, start + n)
        ids = b["input_ids"][:, sl]
        nxt = torch.cat([ids[:, 1:], torch.zeros(1, 1, dtype=torch.long)], 1)
        pos = b["position_ids"][:, sl]
        step0 = head.step(hidden[:, sl], nxt, pos, [], DocumentLayout.from_position_ids(pos))
        step0_logits.append(head.logits(step0)[0, : n - 2])  # positions whose x_{t+2} is in the conversation
    logits = torch.cat(step0_logits, 0)
    targets = torch.cat([b["teacher_logits"][0, 1:8], b["teacher_logits"][0, 10:15]], 0).softmax(-1)
    ref = soft_cross_entropy(logits, targets)
    assert out.metrics.losses[0].item() == pytest.approx(ref.item(), rel=1e-5)


def test_ttt_loss_is_decayed_sum_and_masks_apply():
    head, b = _head_and_batch()
    out = head.unroll(**b, ttt_length=3, loss_decay=0.8)
    expected = sum(0.8**k * out.metrics.losses[k] for k in range(3))
    assert out.loss.item() == pytest.approx(float(expected), rel=1e-6)
    # Untrained tokens and teacher argmaxes outside the draft vocab remove positions.
    b["loss_mask"][0, 5] = 0
    b["teacher_in_draft"][0, 3] = False
    masked = head.unroll(**b, ttt_length=1)
    assert masked.metrics.counts == [out.metrics.counts[0] - 2]
    # Gradients reach every trained parameter but never the frozen embedding.
    out.loss.backward()
    assert head.embed_tokens.weight.grad is None
    for name, p in head.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def _plain_unroll(head, aux_hidden, input_ids, position_ids, loss_mask, teacher_logits, teacher_in_draft,
                  ttt_length, loss_decay):
    """The TTT unroll written plainly from the EAGLE-3 paper: every step's attention is one dense masked
    softmax over the keys of all steps so far, and every step materialises its logits and the
    teacher's probabilities. Returns (loss, per-step losses)."""
    layer, attn = head.midlayer, head.midlayer.self_attn
    h, kvh, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    t = input_ids.shape[1]
    docs = torch.cumsum(position_ids == 0, dim=-1)[0]
    teacher = teacher_logits[0].softmax(-1)
    same_doc_causal = (docs[:, None] == docs[None, :]) & torch.ones(t, t, dtype=torch.bool).tril()
    hidden = head.fc(aux_hidden)
    ks, vs, losses = [], [], []
    loss = 0.0
    for k in range(ttt_length):
        nxt = torch.cat([input_ids[:, 1 + k :], torch.zeros(1, 1 + k, dtype=torch.long)], 1)
        x = torch.cat([layer.input_layernorm(head.embed_tokens(nxt)), layer.hidden_norm(hidden)], -1)
        cos, sin = head.rotary_emb(x, position_ids + k)
        q = attn.q_proj(x).view(1, t, h, d).transpose(1, 2)
        kk = attn.k_proj(x).view(1, t, kvh, d).transpose(1, 2)
        q, kk = apply_rotary_pos_emb(q, kk, cos, sin)
        ks.append(kk.repeat_interleave(h // kvh, 1))
        vs.append(attn.v_proj(x).view(1, t, kvh, d).transpose(1, 2).repeat_interleave(h // kvh, 1))
        allowed = torch.cat([same_doc_causal] + [torch.eye(t, dtype=torch.bool)] * k, dim=1)
        a = F.scaled_dot_product_attention(q, torch.cat(ks, 2), torch.cat(vs, 2), attn_mask=allowed)
        hidden = hidden + attn.o_proj(a.transpose(1, 2).reshape(1, t, h * d))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        logits = head.lm_head(head.norm(hidden))[0]
        terms = []
        for i in range(t - 2 - k):
            if loss_mask[0, i + 2 + k] and docs[i + 2 + k] == docs[i] and teacher_in_draft[0, i + 1 + k]:
                terms.append(-(teacher[i + 1 + k] * logits[i].log_softmax(-1)).sum())
        step = torch.stack(terms).mean()
        losses.append(step)
        loss = loss + loss_decay**k * step
    return loss, losses


def test_head_loss_and_gradients_match_the_plain_unroll():
    """The lean unroll (mask-free attention, fused chunked soft-CE) computes the plain unroll's loss
    and parameter gradients, in fp64 to rounding (1e-9) and in fp32 to 1e-4."""
    head, b = _head_and_batch((9, 4, 7))
    b["loss_mask"][0, [3, 12]] = 0
    b["teacher_in_draft"][0, [5, 17]] = False
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        head = head.to(dtype)
        args = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in b.items()}
        head.zero_grad()
        ref, ref_steps = _plain_unroll(head, **args, ttt_length=4, loss_decay=0.8)
        ref.backward()
        ref_grads = {n: p.grad.clone() for n, p in head.named_parameters() if p.requires_grad}
        head.zero_grad()
        out = head.unroll(**args, ttt_length=4, loss_decay=0.8)
        out.loss.backward()
        torch.testing.assert_close(out.loss.to(dtype), ref, rtol=tol, atol=tol)
        for got, want in zip(out.metrics.losses, ref_steps):
            torch.testing.assert_close(got.to(dtype), want.detach(), rtol=tol, atol=tol)
        for name, grad in ref_grads.items():
            got = dict(head.named_parameters())[name].grad
            torch.testing.assert_close(got, grad, rtol=tol, atol=tol * max(1.0, grad.abs().max().item()), msg=name)


def test_head_registry():
    assert head_class("LlamaForCausalLMEagle3") is Eagle3Head
    with pytest.raises(ValueError, match="LlamaForCausalLMEagle3"):
        head_class("NoSuchHead")


def test_draft_config_follows_target():
    tc = tiny_llama_config()
    cfg = eagle3_config(tc, 40)
    assert cfg.architectures == ["LlamaForCausalLMEagle3"]
    assert (cfg.num_hidden_layers, cfg.draft_vocab_size, cfg.vocab_size, cfg.target_hidden_size) == (1, 40, 97, 32)
    assert cfg.tie_word_embeddings is False and cfg.norm_before_residual is False
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 8)


# CPU: AOTAutograd without inductor's code generation (CI stays fast), so the same kernels run and the
# results agree to fp32 rounding. CUDA: inductor, as draft.compile runs on a GPU: its generated kernels
# fuse and reorder the elementwise work and reductions, so fp32 results agree to ~1e-6 relative (TF32
# is off, torch's default); 1e-4 relative (gradients: of each tensor's largest entry too) leaves a wide margin.
@pytest.mark.parametrize("device, backend, rtol", [
    ("cpu", "aot_eager", 1e-5),
    pytest.param("cuda", "inductor", 1e-4, marks=pytest.mark.gpu),
])
def test_compiled_layer_gives_the_same_loss_gradients_and_names(device, backend, rtol):
    """`draft.compile`: the decoder layer compiled in place trains as the eager one and keeps the export's
    tensor names."""
    head, b = _head_and_batch((30, 12, 21), device)
    names = list(head.state_dict())
    ref = head.unroll(**b, ttt_length=3)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in head.named_parameters() if p.grad is not None}
    head.zero_grad()
    head.compile_layer(backend=backend)
    try:
        for lengths in ((30, 12, 21), (17, 25)):  # a second packed shape reuses the dynamic graph
            _, batch = _head_and_batch(lengths, device)
            out = head.unroll(**batch, ttt_length=3)
            if lengths == (30, 12, 21):
                out.loss.backward()
                torch.testing.assert_close(out.loss, ref.loss, rtol=rtol, atol=1e-6)
                for name, p in head.named_parameters():
                    if name in ref_grads:
                        want = ref_grads[name]
                        atol = 1e-7 if device == "cpu" else rtol * want.abs().max().item()
                        torch.testing.assert_close(p.grad, want, rtol=rtol, atol=atol, msg=name)
        assert list(head.state_dict()) == names
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_head_in_bf16_autocast_matches_fp32(device):
    """The head as training runs it on a GPU (fp32 weights, bf16 autocast, the bf16 target's aux features and
    teacher logits) against the same head and inputs in fp32, forward and backward, TTT 7, head_dim 32.

    Tolerances: bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 0.2%) and every matmul output is
    rounded, through 7 chained TTT steps of one decoder layer; softmax, norms and the loss accumulate in
    fp32 (eagle_online.precision). Measured on CPU: loss 1e-5 relative, gradients 0.2-1.1% relative L2
    error, one argmax flip in 100 positions. Asserted with ~5x margin for other kernels (CUDA): the loss
    within 0.5%, each step's accuracy within 0.05, each gradient within 5% of its fp32 norm (a relative L2
    error: per-element errors are bf16-sized relative to the tensor's scale, not to its tiny entries); and
    every gradient fp32, finite and on the parameter's device (no dtype leaks into the optimizer)."""
    head, b = _head_and_batch((40, 25, 63), device, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                              num_key_value_heads=2)
    ref = head.unroll(**b, ttt_length=7)
    ref.loss.backward()
    want = {n: p.grad.clone() for n, p in head.named_parameters() if p.grad is not None}
    head.zero_grad()
    bf16 = dict(b, aux_hidden=b["aux_hidden"].bfloat16(), teacher_logits=b["teacher_logits"].bfloat16())
    with torch.autocast(device, dtype=torch.bfloat16):
        out = head.unroll(**bf16, ttt_length=7)
    out.loss.backward()
    assert out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=5e-3)
    for got, exp in zip(out.metrics.accuracies, ref.metrics.accuracies):
        assert abs(float(got) - float(exp)) <= 0.05
    assert want.keys() == {n for n, p in head.named_parameters() if p.grad is not None}
    for name, p in head.named_parameters():
        if name in want:
            g = p.grad
            assert g.dtype == torch.float32 and g.device == p.device and torch.isfinite(g).all(), name
            err = ((g - want[name]).norm() / want[name].norm()).item()
            assert err < 0.05, (name, err)
