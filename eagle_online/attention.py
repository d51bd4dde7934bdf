"""Causal attention over packed conversations without dense masks, for the target and the draft head.

docs/traps.md: the attention and packing traps this module works around.

Packed rows hold whole conversations back to back (position_ids restart at 0); attention must stay
inside each one. Instead of a [T × T] block-diagonal mask (what transformers builds for sdpa from
packed position_ids, costing T² work and memory whatever the conversations' lengths), the work here
is Σ len², through one of three kernels with one contract — `forward(q, k, v) -> (out, lse)` and
`backward(dout, q, k, v, out, lse) -> (dq, dk, dv)` over token-major [N, heads, d] tensors, each also
taking the target families' extras as keywords, where `supports` says it can (`window`: a key j is seen by
query i only when i − j < window, Mistral's, Gemma's and gpt-oss's sliding windows; `softcap`: scores
become c·tanh(s/c), Gemma-2's):

  cuda_varlen  flash attention's varlen kernel as torch ships it (torch.nn.attention.varlen), CUDA,
               bf16/fp16: no padding, no mask; windows where the installed op takes one;
  cpu_flash    torch's CPU flash-attention kernel over the conversations regrouped one per row and
               padded at their end ([D, L] grid), causal: padding is never attended by real tokens;
  math         the same grid computed explicitly (any device and dtype, windows and soft-caps; the
               fallback).

gpt-oss's attention sinks (a per-head logit s that joins every softmax's denominator and contributes no
value) need no kernel: out·sigmoid(lse − s) from any kernel's output and log-sum-exp is exact
(`packed_attention`).

Both backward passes take the *final* output and log-sum-exp, so a softmax that spans these keys and
further ones (the TTT diagonal keys, merged through the log-sum-exp) gets exact gradients from the
kernel's own backward: the same identity ring attention uses, dS = P ∘ (dP − rowsum(dO ∘ O)).

`register_varlen_attention()` makes `varlen` an attention implementation transformers models accept
(`attn_implementation="varlen"`); it reads the conversation boundaries from a `document_layout`
kwarg (built once per forward by the caller), else from `cu_seq_lens_q` / `max_length_q` (the kwargs
transformers' flash-attention path reads too), else from `position_ids`. transformers builds no
mask at all for an implementation it has no mask function for.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from eagle_online.precision import accumulation_dtype


def _varlen_ops():
    """torch's private varlen ops (forward, backward), or None. torch >= 2.10 ships flash attention's varlen
    kernels as custom ops (CUDA only); their signatures grew between versions (scale and window_size came
    after the first, enable_gqa after those), so each call passes what the installed op declares."""
    try:
        import torch.nn.attention.varlen  # noqa: F401

        return torch.ops.torch_attn._varlen_attn, torch.ops.torch_attn._varlen_attn_backward
    except (ImportError, AttributeError):  # pragma: no cover - older torch
        return None


def _arguments(op) -> frozenset[str]:
    return frozenset(a.name for a in op.default._schema.arguments)


_VARLEN_OPS = _varlen_ops()
# Without a scale argument (the ops' first form) the kernel's own 1/sqrt(d) would be used: not taken.
_HAS_TORCH_VARLEN = _VARLEN_OPS is not None and all("scale" in _arguments(op) for op in _VARLEN_OPS)

VARLEN = "varlen"  # the attention implementation name registered with transformers


@dataclass
class DocumentLayout:
    """Where each packed conversation lies in the flat B·T tokens (rows flattened in order).

    `doc` [B, T] numbers each token's conversation (a row always starts one); `cu_seqlens` [D+1] int32
    are the conversations' offsets; `max_len` the longest; `valid` [D, L] marks real tokens in the grid
    of one conversation per row, padded at the end (L = max_len).
    """

    doc: torch.Tensor
    cu_seqlens: torch.Tensor
    max_len: int
    valid: torch.Tensor

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor) -> DocumentLayout:
        flat = position_ids.reshape(-1)
        starts = flat == 0
        starts[:: position_ids.shape[1]] = True  # a row always starts a conversation
        doc = torch.cumsum(starts.long(), 0) - 1
        lengths = torch.bincount(doc)
        return cls._build(doc.view_as(position_ids), lengths)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, shape: torch.Size, max_len: int | None = None
                        ) -> DocumentLayout:
        """The layout of conversations given by their offsets, over tokens of `shape` [B, T]."""
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        docs = torch.arange(len(lengths), device=lengths.device)
        doc = torch.repeat_interleave(docs, lengths, output_size=shape.numel())
        return cls._build(doc.view(shape), lengths, max_len)

    @classmethod
    def _build(cls, doc: torch.Tensor, lengths: torch.Tensor, max_len: int | None = None) -> DocumentLayout:
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=lengths.device)
        cu[1:] = torch.cumsum(lengths, 0)
        longest = int(lengths.max()) if max_len is None else int(max_len)
        valid = torch.arange(longest, device=lengths.device)[None, :] < lengths[:, None]
        return cls(doc=doc, cu_seqlens=cu, max_len=longest, valid=valid)

    @property
    def num_docs(self) -> int:
        return self.valid.shape[0]

    def pad(self, x: torch.Tensor, fill: float = 0) -> torch.Tensor:
        """[B·T, ...] in token order → [D, L, ...] one conversation per row, `fill` after its end."""
        out = x.new_full((*self.valid.shape, *x.shape[1:]), fill)
        out[self.valid] = x
        return out

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """[D, L, ...] → [B·T, ...] in token order."""
        return x[self.valid]


# ------------------------------------------------------------------------------------------ kernels
def _acc(x: torch.Tensor) -> torch.Tensor:
    """x in the dtype softmax arithmetic runs in."""
    return x.to(accumulation_dtype(x.dtype))


def _grouped(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[..., H, d] → [..., kv_heads, H / kv_heads, d]: the query heads sharing each key head."""
    return q.unflatten(-2, (kv_heads, q.shape[-2] // kv_heads))


class CudaVarlen:
    """Flash attention's varlen kernel through torch's custom ops: flat tokens, no padding, no mask."""

    name = "cuda_varlen"

    @staticmethod
    def supports(q: torch.Tensor, window: int | None = None, softcap: float | None = None) -> bool:
        return (_HAS_TORCH_VARLEN and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and softcap is None
                and (window is None or "window_size" in _arguments(_VARLEN_OPS[0])))

    @staticmethod
    def options(op, scale: float, gqa: bool, window: int | None = None) -> dict:
        """The keyword arguments `op` declares: the scale, causal as a window where it has one (the same
        thing as is_causal; `window` keys back, the query's own included, when given), and GQA's flag
        where it has one (the flash kernel takes fewer key heads as they are; the flag only gates other
        backends)."""
        names = _arguments(op)
        opts = {"scale": scale}
        if "window_size" in names:
            opts["window_size"] = [-1 if window is None else window - 1, 0]
        if "enable_gqa" in names:
            opts["enable_gqa"] = gqa
        return opts

    @staticmethod
    def forward(q, k, v, layout: DocumentLayout, scale: float, window: int | None = None, softcap=None):
        cu, n = layout.cu_seqlens, layout.max_len
        op = _VARLEN_OPS[0]
        out, lse, _ = op(q, k, v, cu, cu, n, n, True,
                         **CudaVarlen.options(op, scale, k.shape[1] != q.shape[1], window))
        return out, lse.transpose(0, 1)  # the kernel's lse is [heads, N]

    @staticmethod
    def backward(dout, q, k, v, out, lse, layout: DocumentLayout, scale: float, window: int | None = None,
                 softcap=None):
        cu, n = layout.cu_seqlens, layout.max_len
        rng = torch.zeros(2, dtype=torch.uint64, device=q.device)  # no dropout
        op = _VARLEN_OPS[1]
        return op(dout.contiguous(), q, k, v, out.contiguous(), lse.transpose(0, 1).contiguous(), cu, cu, n, n, True,
                  rng, **CudaVarlen.options(op, scale, k.shape[1] != q.shape[1], window))


class CpuFlash:
    """torch's CPU flash-attention kernel, causal, over the conversations padded one per row."""

    name = "cpu_flash"

    @staticmethod
    def supports(q: torch.Tensor, window: int | None = None, softcap: float | None = None) -> bool:
        return q.device.type == "cpu" and window is None and softcap is None

    @staticmethod
    def forward(q, k, v, layout: DocumentLayout, scale: float, window=None, softcap=None):  # both None: supports
        grid = [layout.pad(x).transpose(1, 2) for x in (q, k, v)]  # [D, heads, L, d]
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*grid, 0.0, True, scale=scale)
        return layout.unpad(out.transpose(1, 2)), layout.unpad(lse.transpose(1, 2))

    @staticmethod
    def backward(dout, q, k, v, out, lse, layout: DocumentLayout, scale: float, window=None, softcap=None):
        # Padding rows get zero dout, so they send nothing into the real keys they can see.
        grid = [layout.pad(x).transpose(1, 2) for x in (dout, q, k, v, out)]
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            *grid, layout.pad(lse).transpose(1, 2), 0.0, True, scale=scale
        )
        return tuple(layout.unpad(g.transpose(1, 2)) for g in grads)


class MathAttention:
    """The padded grid computed with explicit scores: any device and dtype (fp32 softmax), windows and
    soft-caps."""

    name = "math"

    @staticmethod
    def supports(q: torch.Tensor, window: int | None = None, softcap: float | None = None) -> bool:
        return True

    @staticmethod
    def _scores(q, k, layout: DocumentLayout, scale: float, window: int | None, softcap: float | None):
        """The masked scores [D, kv, g, L, L], the queries and keys they came from, and tanh(s/c) where
        soft-capped (its derivative is needed by backward)."""
        qg = _acc(_grouped(layout.pad(q), k.shape[1]))  # [D, L, kv, g, d]
        kg = _acc(layout.pad(k))  # [D, L, kv, d]
        s = torch.einsum("dikgc,djkc->dkgij", qg, kg) * scale
        tanh = None
        if softcap is not None:
            tanh = torch.tanh(s / softcap)
            s = tanh * softcap
        return s.masked_fill(~_visible(layout.max_len, layout.max_len, window, q.device), -math.inf), qg, kg, tanh

    @staticmethod
    def forward(q, k, v, layout: DocumentLayout, scale: float, window: int | None = None,
                softcap: float | None = None):
        s, _, _, _ = MathAttention._scores(q, k, layout, scale, window, softcap)
        lse = torch.logsumexp(s, dim=-1)  # [D, kv, g, L]
        out = torch.einsum("dkgij,djkc->dikgc", torch.exp(s - lse[..., None]), _acc(layout.pad(v)))
        lse = lse.permute(0, 3, 1, 2).flatten(2)  # [D, L, H]
        return layout.unpad(out.flatten(2, 3)).to(q.dtype), layout.unpad(lse)

    @staticmethod
    def backward(dout, q, k, v, out, lse, layout: DocumentLayout, scale: float, window: int | None = None,
                 softcap: float | None = None):
        s, qg, kg, tanh = MathAttention._scores(q, k, layout, scale, window, softcap)
        kv = k.shape[1]
        lse_g = _grouped(layout.pad(lse)[..., None], kv)[..., 0].permute(0, 2, 3, 1)  # [D, kv, g, L]
        p = torch.exp(s - lse_g[..., None])
        do = _acc(_grouped(layout.pad(dout), kv))  # [D, L, kv, g, d]
        delta = (do * _acc(_grouped(layout.pad(out), kv))).sum(-1).permute(0, 2, 3, 1)  # [D, kv, g, L]
        dv = torch.einsum("dkgij,dikgc->djkc", p, do)
        dp = torch.einsum("dikgc,djkc->dkgij", do, _acc(layout.pad(v)))
        ds = p * (dp - delta[..., None]) * scale
        if tanh is not None:
            ds = ds * (1 - tanh.square())
        dq = torch.einsum("dkgij,djkc->dikgc", ds, kg).flatten(2, 3)
        dk = torch.einsum("dkgij,dikgc->djkc", ds, qg)
        return tuple(layout.unpad(g).to(q.dtype) for g in (dq, dk, dv))


def _visible(queries: int, keys: int, window: int | None, device) -> torch.Tensor:
    """[queries, keys] bool: which keys each query sees when the queries are the last `queries` of `keys`
    positions: causally, and within `window` positions (its own included) when given."""
    back = torch.arange(keys - queries, keys, device=device)[:, None] - torch.arange(keys, device=device)[None]
    return (back >= 0) & (back < window) if window is not None else back >= 0


KERNELS = {kernel.name: kernel for kernel in (CudaVarlen, CpuFlash, MathAttention)}


def pick_kernel(q: torch.Tensor, name: str | None = None, window: int | None = None, softcap: float | None = None):
    """The kernel `name`, or the first of cuda_varlen, cpu_flash, math that supports `q` with `window` and
    `softcap`."""
    if name is not None:
        if name not in KERNELS:
            raise ValueError(f"unknown attention kernel {name!r}; known: {sorted(KERNELS)}")
        if not KERNELS[name].supports(q, window, softcap):
            raise ValueError(f"attention kernel {name!r} cannot run window={window}, softcap={softcap} here")
        return KERNELS[name]
    return next(kernel for kernel in KERNELS.values() if kernel.supports(q, window, softcap))


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: DocumentLayout, scale: float,
                     window: int | None = None, softcap: float | None = None,
                     sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention inside each packed conversation, forward only (the frozen target's): q [N, H, d],
    k/v [N, kv_heads, d] → [N, H, d], with a sliding `window`, soft-capped scores and per-head attention
    `sinks` [H] as the target's family defines them. A window no conversation outgrows changes nothing
    and is dropped, so that the fastest kernel runs."""
    if window is not None and window >= layout.max_len:
        window = None
    out, lse = pick_kernel(q, window=window, softcap=softcap).forward(q, k, v, layout, scale, window, softcap)
    if sinks is not None:  # the sink joins the denominator: Σ exp(s) becomes Σ exp(s) + exp(sink)
        out = (_acc(out) * torch.sigmoid(_acc(lse) - _acc(sinks))[..., None]).to(q.dtype)
    return out


# ---------------------------------------------------------------- step-0 keys + diagonal keys (TTT)
class _CausalPlusDiagonal(torch.autograd.Function):
    """softmax over the causal in-conversation keys k0 and, per query, one extra key from each later
    step (k_j at the query's own position), computed as the kernel's attention over k0 merged with
    the diagonal scores through the log-sum-exp."""

    @staticmethod
    def forward(ctx, kernel, layout, scale, q, k0, v0, *diagonal):
        ks, vs = diagonal[: len(diagonal) // 2], diagonal[len(diagonal) // 2 :]
        out, lse = kernel.forward(q, k0, v0, layout, scale)
        if ks:
            kv = k0.shape[1]
            qg = _acc(_grouped(q, kv))
            scores = [(qg * _acc(k[:, :, None])).sum(-1).flatten(1) * scale for k in ks]  # [N, H] each
            total = torch.logsumexp(torch.stack([lse, *scores]), dim=0)
            merged = torch.exp(lse - total)[..., None] * _acc(out)
            for s, v in zip(scores, vs):
                merged += (_grouped(torch.exp(s - total)[..., None], kv) * _acc(v[:, :, None])).flatten(1, 2)
            out, lse = merged.to(q.dtype), total
        ctx.save_for_backward(q, k0, v0, out, lse, *diagonal)
        ctx.kernel, ctx.layout, ctx.scale = kernel, layout, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k0, v0, out, lse, *diagonal = ctx.saved_tensors
        ks, vs = diagonal[: len(diagonal) // 2], diagonal[len(diagonal) // 2 :]
        scale, kv = ctx.scale, k0.shape[1]
        dq, dk0, dv0 = ctx.kernel.backward(dout, q, k0, v0, out, lse, ctx.layout, scale)
        dks, dvs = [], []
        if ks:
            do = _acc(_grouped(dout, kv))  # [N, kv, g, d]
            qg = _acc(_grouped(q, kv))
            delta = (do * _acc(_grouped(out, kv))).sum(-1)  # rowsum(dO ∘ O), [N, kv, g]
            lse_g = _grouped(lse[..., None], kv)[..., 0]
            dq = _acc(dq)
            for k, v in zip(ks, vs):
                kf, vf = _acc(k[:, :, None]), _acc(v[:, :, None])
                p = torch.exp((qg * kf).sum(-1) * scale - lse_g)  # [N, kv, g]
                ds = p * ((do * vf).sum(-1) - delta) * scale
                dq += (ds[..., None] * kf).flatten(1, 2)
                dks.append((ds[..., None] * qg).sum(2).to(k.dtype))
                dvs.append((p[..., None] * do).sum(2).to(v.dtype))
            dq = dq.to(q.dtype)
        return (None, None, None, dq, dk0, dv0, *dks, *dvs)


@torch.compiler.disable  # a compiled head runs the kernels as they are (their layouts are data-dependent)
def causal_plus_diagonal_attention(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                                   layout: DocumentLayout, scale: float, kernel: str | None = None) -> torch.Tensor:
    """Attention of q [N, H, d] over keys[0]/values[0] [N, kv_heads, d] causally inside each conversation,
    plus, for each later entry j, the single key keys[j] at the query's own position. Returns [N, H, d]."""
    chosen = pick_kernel(q, kernel)
    return _CausalPlusDiagonal.apply(chosen, layout, scale, q, keys[0], values[0], *keys[1:], *values[1:])


# ----------------------------------------------------------------------- transformers integration
def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """A transformers attention function: causal attention inside each packed conversation, no mask.

    query [B, H, T, d], key/value [B, kv_heads, T, d]; returns ([B, T, H, d], None). Inference only
    (the target is frozen); padding masks are not supported (rows are packed, never padded). The
    families' extras come as the model passes them: `sliding_window`, `softcap` (Gemma-2) and `s_aux`
    (gpt-oss's sinks). With a KV cache (keys longer than queries: speculative decoding's verification,
    one sequence) it is causal attention over the cache, or the 4D mask given (a draft tree's: each node
    sees its ancestors).
    """
    cached = key.shape[2] != query.shape[2]
    if attention_mask is not None and not (cached and attention_mask.dim() == 4):
        raise ValueError("varlen attention reads conversation boundaries from position_ids, not an attention mask")
    window, softcap, sinks = kwargs.get("sliding_window"), kwargs.get("softcap"), kwargs.get("s_aux")
    b, h, t, d = query.shape
    scale = scaling if scaling is not None else d**-0.5
    if cached:
        return _cached_attention(query, key, value, attention_mask, scale, window, softcap, sinks), None
    layout, cu = kwargs.get("document_layout"), kwargs.get("cu_seq_lens_q")
    if layout is None and cu is not None:
        layout = DocumentLayout.from_cu_seqlens(cu, torch.Size((b, t)), kwargs.get("max_length_q"))
    elif layout is None:
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(t, device=query.device).expand(b, t)
        layout = DocumentLayout.from_position_ids(positions.expand(b, t))
    q, k, v = (x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (query, key, value))
    out = packed_attention(q, k, v, layout, scale, window, softcap, sinks)
    return out.view(b, t, h, d), None


def _cached_attention(query, key, value, attention_mask, scale: float, window: int | None,
                      softcap: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
    """One sequence's new queries (its last t positions) over its KV cache: [1, H, t, d] → [1, t, H, d].
    Causal, or the additive 4D mask given; with the family's window, soft-cap and sinks computed
    explicitly (fp32 scores: t is a few drafted tokens)."""
    b, h, t, d = query.shape
    if b != 1:
        raise ValueError("varlen attention decodes one sequence at a time with a KV cache")
    total, groups = key.shape[2], h // key.shape[1]
    if attention_mask is not None and window is not None and total > window:
        # A tree's nodes sit at positions their indices do not give: a window counted in indices is wrong.
        raise ValueError(f"a draft tree cannot be verified through a {window}-token sliding window over "
                         f"{total} tokens: measure chain τ on this target")
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    if window is None and softcap is None and sinks is None:
        mask = attention_mask[:, :, :, :total] if attention_mask is not None else (
            _visible(t, total, None, query.device))
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
        return out.transpose(1, 2)
    s = torch.einsum("bhic,bhjc->bhij", _acc(query), _acc(key)) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if attention_mask is not None:
        s = s + attention_mask[:, :, :, :total]
    s = s.masked_fill(~_visible(t, total, window, query.device), -math.inf)
    if sinks is not None:  # one more logit per head, with no value
        s = torch.cat([s, _acc(sinks)[None, :, None, None].expand(b, h, t, 1)], dim=-1)
    p = torch.softmax(s, dim=-1)[..., :total]
    return torch.einsum("bhij,bhjc->bihc", p, _acc(value)).to(query.dtype)


def register_varlen_attention() -> None:
    """Make `varlen` an attention implementation transformers models accept (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
