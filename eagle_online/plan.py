"""Scale on paper: per-GPU memory and communication per optimizer step for a recipe on a GPU layout.

Arithmetic from the target's shapes, not a measurement. What it counts, per GPU:

- the target's weights: whole (sharding none); or its ZeRO-3 partition (1/N), plus whole copies of the
  parameters under `param_persistence_threshold`, plus with hpZ a second, node-local partition (1/hpz);
- the ZeRO-3 gather peak: the largest set of whole parameters alive at once — a decoder layer in use
  plus the prefetch bucket, or the vocabulary matrix (embedding in the forward, lm_head in the teacher's
  argmax scan), whichever is larger; a mixture-of-experts layer with all its experts, since ZeRO-3
  gathers whole modules whichever experts the tokens are routed to;
- the head (EAGLE-3, fp32 master weights): weights, gradients (in DDP's buckets), AdamW's two moments
  (divided by N with training.optimizer_sharding=zero1) and its frozen fp32 copy of the embedding;
- the teacher's draft-vocab rows of lm_head;
- the target forward's transient tensors at data.tokens_per_batch: one layer's working set (residual,
  norm, q/k/v, attention output, 3 MLP intermediates, or an MoE layer's router logits and, per routed
  expert, the token's copy, 3 intermediates and the output), the captured features, the teacher's
  draft-vocab logits (in the target's dtype, with an fp32 log-sum-exp per token) and one chunk of the
  full-vocabulary argmax scan.

- the head's activations: what autograd keeps for the EAGLE-3 head's backward over its TTT unroll under
  bf16 autocast, with every position trained (an upper bound: chat data trains 70-80% of them). The
  count follows heads/eagle3.py tensor by tensor; tests/test_plan.py checks it byte for byte against
  saved-tensor hooks, and `bench.py throughput` measures it on any run (`head_saved_bytes`).

Not counted: backward's transient tensors (activation gradients, the fused loss's chunk), allocator
slack, the CUDA context. `headroom_gb` is what an 80 GB GPU has left for those.

Communication, bytes each GPU receives per optimizer step (gradient_accumulation_steps micro-steps):
ZeRO-3 gathers every non-persistent target parameter once per micro-step, an MoE target's every expert
(ring all-gather: (n-1)/n of it, n = the gathering group: all N ranks, or the hpz node-local group once
the first step has built the secondary partitions); DDP all-reduces the head's fp32 gradients once per
step (ring: 2(N-1)/N); zero1 adds a broadcast of the updated head weights ((N-1)/N).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from eagle_online.distributed import effective_hpz
from eagle_online.recipe import Recipe, TargetConfig, resolve_target

GPU_MEMORY_GB = 80
GB = 1e9
ARGMAX_CHUNK = 16384  # FrozenTarget.forward's vocab_chunk
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}  # auto is bf16 on a GPU


@dataclass(frozen=True)
class TargetShapes:
    """The dimensions of a decoder-only target that the arithmetic needs: Llama-style by default, with
    the extras of the families people train drafts for (each field says which), dense or
    mixture-of-experts. `from_config` reads them from a HF config.json."""

    hidden: int
    layers: int
    intermediate: int  # the dense MLP's width (an MoE model's dense layers; the EAGLE-3 head's MLP)
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2.5; with o_bias, gpt-oss and Llama's attention_bias)
    o_bias: bool = False
    mlp_bias: bool = False  # Llama's mlp_bias
    qk_norm: bool = False  # Qwen3, Gemma-3: an RMS norm over each head's q and k
    sandwich_norms: bool = False  # Gemma-2/3: norms before and after the MLP too (4 per layer)
    fused_projections: bool = False  # Phi-3/4: qkv_proj and gate_up_proj (the same counts in fewer tensors)
    sinks: bool = False  # gpt-oss: one learned sink logit per head
    experts: int = 0  # routed experts per MoE layer; 0: dense
    experts_per_token: int = 0
    expert_intermediate: int = 0
    moe_bias: bool = False  # gpt-oss: the router's and the experts' biases
    dense_layers: tuple[int, ...] = ()  # an MoE model's layers with a dense MLP (Qwen3-MoE's mlp_only_layers, ...)

    @classmethod
    def from_config(cls, cfg: dict) -> TargetShapes:
        """From a HF config.json mapping (the text config of a multimodal one). ValueError for a
        mixture-of-experts family whose layout is not known here (counting it as dense would be wrong)."""
        outer, cfg = cfg, cfg.get("text_config", cfg)
        kind = cfg.get("model_type") or outer.get("model_type", "")
        heads, layers = cfg["num_attention_heads"], cfg["num_hidden_layers"]
        gemma = kind.startswith("gemma")
        # Qwen2 always has q/k/v biases and no o_proj bias; Mistral, Mixtral and Phi-3 have none whatever the
        # config says; the others put attention_bias on all four projections.
        bias = bool(cfg.get("attention_bias", False)) and kind not in ("mistral", "mixtral", "phi3")
        experts = cfg.get("num_experts", cfg.get("num_local_experts")) or 0
        moe = dict(experts_per_token=cfg.get("num_experts_per_tok") or cfg.get("experts_per_token") or 0)
        if kind == "qwen3_moe":
            step, only = cfg.get("decoder_sparse_step", 1), set(cfg.get("mlp_only_layers") or ())
            moe.update(expert_intermediate=cfg["moe_intermediate_size"],
                       dense_layers=tuple(i for i in range(layers) if i in only or (i + 1) % step != 0))
        elif kind in ("mixtral", "gpt_oss"):
            moe.update(expert_intermediate=cfg["intermediate_size"], moe_bias=kind == "gpt_oss")
        elif experts or "moe" in kind or any(k in cfg for k in ("n_routed_experts", "moe_intermediate_size")):
            raise ValueError(f"no parameter layout for the mixture-of-experts model_type {kind!r} (known: qwen3_moe, "
                             "mixtral, gpt_oss); counting it as a dense model would be wrong")
        return cls(
            hidden=cfg["hidden_size"], layers=layers, intermediate=cfg["intermediate_size"],
            heads=heads, kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, vocab=cfg["vocab_size"],
            # Gemma ties its embeddings unless told otherwise; the others untie them in their config.json.
            tied_embeddings=bool(cfg.get("tie_word_embeddings", outer.get("tie_word_embeddings", gemma))),
            attention_bias=kind == "qwen2" or bias, o_bias=bias, mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=kind in ("qwen3", "qwen3_moe", "gemma3", "gemma3_text"),
            sandwich_norms=kind in ("gemma2", "gemma3", "gemma3_text"), fused_projections=kind == "phi3",
            sinks=kind == "gpt_oss", experts=experts if moe.get("expert_intermediate") else 0, **moe,
        )

    def is_moe(self, layer: int) -> bool:
        """Whether decoder layer `layer` routes its MLP through experts."""
        return self.experts > 0 and layer not in self.dense_layers

    def layer_tensors(self, layer: int = 0) -> list[int]:
        """Element counts of decoder layer `layer`'s parameters, tensor by tensor as transformers builds
        them: an MoE layer's router, then its experts' gate and up projections as one [E, 2I, H] tensor
        and their down projections as one [E, H, I] (every expert: ZeRO-3 gathers a whole module,
        whichever experts the tokens are routed to)."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        out = [h * (q + 2 * kv), q * h] if self.fused_projections else [h * q, h * kv, h * kv, q * h]
        out += [q, kv, kv] if self.attention_bias else []
        out += [h] if self.o_bias else []
        out += [self.head_dim, self.head_dim] if self.qk_norm else []
        out += [self.heads] if self.sinks else []
        if self.is_moe(layer):
            e, ie = self.experts, self.expert_intermediate
            out += [e * h, e * 2 * ie * h, e * ie * h]
            out += [e, e * 2 * ie, e * h] if self.moe_bias else []
        else:
            out += [2 * h * i, i * h] if self.fused_projections else [h * i, h * i, i * h]
            out += [i, i, h] if self.mlp_bias else []
        return out + [h] * (4 if self.sandwich_norms else 2)

    def tensors(self) -> list[int]:
        """Element counts of every parameter: embedding, layers, final norm, lm_head (unless tied)."""
        vocab = [self.vocab * self.hidden]
        layers = [x for layer in range(self.layers) for x in self.layer_tensors(layer)]
        return vocab + layers + [self.hidden] + ([] if self.tied_embeddings else vocab)

    @property
    def params(self) -> int:
        return sum(self.tensors())

    @property
    def active_params(self) -> int:
        """Parameters a token runs through: all but the experts it is not routed to (embeddings counted)."""
        e, k = self.experts, self.experts_per_token
        unrouted = sum(self.experts_per_layer_params(layer) for layer in range(self.layers))
        return self.params - (unrouted * (e - k) // e if e else 0)

    def experts_per_layer_params(self, layer: int) -> int:
        """Elements of layer `layer`'s experts (router excluded); 0 in a dense layer."""
        if not self.is_moe(layer):
            return 0
        h, ie = self.hidden, self.expert_intermediate
        return self.experts * (3 * ie * h + (2 * ie + h if self.moe_bias else 0))

    def mlp_working(self, layer: int) -> int:
        """Elements per token of layer `layer`'s MLP intermediates: gate, up and their product; in an MoE
        layer the router's logits and, for each of the k experts the token goes to, its copy of the
        token, those three and the expert's output."""
        if not self.is_moe(layer):
            return 3 * self.intermediate
        return self.experts + self.experts_per_token * (3 * self.expert_intermediate + 2 * self.hidden)


# Used when a hub name is not in the local Hugging Face cache (--plan never downloads). The first four
# from the models' published config.json files; the rest are built by TargetShapes.from_config from the
# published config.json's values (PUBLISHED_CONFIGS: each file's relevant keys as published).
KNOWN_SHAPES: dict[str, TargetShapes] = {
    "meta-llama/Llama-3.1-8B-Instruct": TargetShapes(4096, 32, 14336, 32, 8, 128, 128256),
    "meta-llama/Llama-3.3-70B-Instruct": TargetShapes(8192, 80, 28672, 64, 8, 128, 128256),
    "Qwen/Qwen3-8B": TargetShapes(4096, 36, 12288, 32, 8, 128, 151936, qk_norm=True),
    "Qwen/Qwen2.5-7B-Instruct": TargetShapes(3584, 28, 18944, 28, 4, 128, 152064, attention_bias=True),
}

PUBLISHED_CONFIGS: dict[str, dict] = {
    # huggingface.co/Qwen/Qwen3-30B-A3B/blob/main/config.json: 30.5B parameters, 3.3B activated
    "Qwen/Qwen3-30B-A3B": dict(
        model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[], vocab_size=151936,
        tie_word_embeddings=False),
    # huggingface.co/Qwen/Qwen3-235B-A22B/blob/main/config.json: 235B parameters, 22B activated
    "Qwen/Qwen3-235B-A22B": dict(
        model_type="qwen3_moe", hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536,
        num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[], vocab_size=151936,
        tie_word_embeddings=False),
    # huggingface.co/openai/gpt-oss-20b/blob/main/config.json (the experts ship in MXFP4; a bf16 target
    # holds them dequantised, which is what is counted): 20.9B parameters, 3.6B active
    "openai/gpt-oss-20b": dict(
        model_type="gpt_oss", hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
        num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4,
        attention_bias=True, vocab_size=201088, tie_word_embeddings=False),
    # huggingface.co/openai/gpt-oss-120b/blob/main/config.json: 116.8B parameters, 5.1B active
    "openai/gpt-oss-120b": dict(
        model_type="gpt_oss", hidden_size=2880, intermediate_size=2880, num_hidden_layers=36,
        num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=128, num_experts_per_tok=4,
        attention_bias=True, vocab_size=201088, tie_word_embeddings=False),
    # huggingface.co/mistralai/Mixtral-8x7B-Instruct-v0.1/blob/main/config.json: 46.7B parameters, 12.9B active
    "mistralai/Mixtral-8x7B-Instruct-v0.1": dict(
        model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        vocab_size=32000, tie_word_embeddings=False),
    # huggingface.co/google/gemma-3-27b-it/blob/main/config.json, its text_config (the language model; the
    # SigLIP vision tower beside it, ~0.4B, is not counted); the embeddings are tied (Gemma's default)
    "google/gemma-3-27b-it": dict(
        model_type="gemma3", text_config=dict(
            model_type="gemma3_text", hidden_size=5376, intermediate_size=21504, num_hidden_layers=62,
            num_attention_heads=32, num_key_value_heads=16, head_dim=128, vocab_size=262208)),
}
KNOWN_SHAPES.update({name: TargetShapes.from_config(cfg) for name, cfg in PUBLISHED_CONFIGS.items()})


def target_shapes(model: str, gguf_file: str | None = None) -> tuple[TargetShapes, str]:
    """The target's shapes and where they came from: a local config.json (built-in and GGUF targets:
    their materialised checkpoint's), the local Hugging Face cache (never the network), or the built-in
    KNOWN_SHAPES table. ValueError when none has it."""
    path = Path(resolve_target(TargetConfig(model=model, gguf_file=gguf_file)))
    if (path / "config.json").is_file():
        return TargetShapes.from_config(json.loads((path / "config.json").read_text())), f"{path / 'config.json'}"
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "config.json")
    except Exception:  # not a repo id, or no hub library: fall through to the table
        cached = None
    if isinstance(cached, str):
        return TargetShapes.from_config(json.loads(Path(cached).read_text())), f"{cached} (local cache)"
    if model in KNOWN_SHAPES:
        return KNOWN_SHAPES[model], "eagle_online.plan.KNOWN_SHAPES (not in the local cache; no download tried)"
    raise ValueError(
        f"no shapes for target {model!r}: not a local directory, not in the local Hugging Face cache, not in "
        f"eagle_online.plan.KNOWN_SHAPES ({sorted(KNOWN_SHAPES)}); give target.model as a directory with config.json"
    )


def eagle3_head_params(t: TargetShapes, draft_vocab: int) -> int:
    """Trainable elements of the EAGLE-3 head (heads/eagle3.py): fc, one 2H-input decoder layer, norms,
    the draft lm_head. The frozen embedding copy is not included."""
    h, q, kv = t.hidden, t.heads * t.head_dim, t.kv_heads * t.head_dim
    return 3 * h * h + 2 * h * (q + 2 * kv) + q * h + 3 * h * t.intermediate + 4 * h + draft_vocab * h


def eagle3_head_activation_bytes(t: TargetShapes, draft_vocab: int, tokens: int, ttt_length: int,
                                 scored_rows: int | None = None) -> int:
    """Bytes the EAGLE-3 head (heads/eagle3.py) keeps for backward on a packed micro-batch of `tokens`,
    bf16 autocast, unrolled `ttt_length` steps; `scored_rows` is the number of (position, step) pairs
    the loss scores over all steps (default: every position at every step, an upper bound).

    What is kept, all bf16 unless named. Per token and TTT step: the MLP's gate and up (2 × I); tensors 6·H
    wide in all (the 2H-wide attention input, norm outputs, residual, layer output); q and the
    attention output (2 × heads·head_dim); k and v (2 × kv_heads·head_dim); rotary cos and sin
    (2 × head_dim); fp32 log-sum-exp per head and three fp32 1/rms. Per scored row: the normed hidden
    state twice, its int64 index and an fp32 scale. Per step: the fused loss's [draft vocab × H] lm_head
    gradient. Once: fc's 3H input and one H-wide tensor per token, and autocast's cached bf16 copies of
    q/k/v_proj (2H inputs) and two H × I MLP weights."""
    h, i = t.hidden, t.intermediate
    q, kv = t.heads * t.head_dim, t.kv_heads * t.head_dim
    scored = tokens * ttt_length if scored_rows is None else scored_rows
    per_token_step = 4 * i + 12 * h + 4 * q + 4 * kv + 4 * t.head_dim + 4 * t.heads + 12
    per_step = tokens * per_token_step + 2 * draft_vocab * h
    once = tokens * 8 * h + 2 * (2 * h * q + 4 * h * kv + 2 * h * i)
    return ttt_length * per_step + scored * (4 * h + 12) + once


@dataclass(frozen=True)
class Layout:
    """GPUs in all and per node; hpz is the node-local partition size (1 = off)."""

    gpus: int
    gpus_per_node: int
    sharding: str
    hpz: int = 1

    @property
    def nodes(self) -> int:
        return max(1, self.gpus // self.gpus_per_node)

    def describe(self) -> str:
        where = f"{self.nodes}x{self.gpus_per_node}" if self.nodes > 1 else f"{self.gpus}"
        hpz = f", hpZ {self.hpz}" if effective_hpz(self.hpz, self.gpus) > 1 else ""
        return f"{where} GPU{'s' if self.gpus > 1 else ''}, {self.sharding}{hpz}"


@dataclass
class MemoryPlan:
    """Per-GPU figures for one recipe on one layout (bytes, or GB where named so)."""

    layout: str
    target_weights: int
    target_gather_peak: int
    head_states: int
    teacher_rows: int
    target_activations: int
    head_activations: int
    allgather_bytes: int  # received per GPU per optimizer step
    allgather_internode_bytes: int  # of which from other nodes
    head_comm_bytes: int  # DDP gradient all-reduce (+ zero1 broadcast), received per GPU per step

    @property
    def total(self) -> int:
        return (self.target_weights + self.target_gather_peak + self.head_states + self.teacher_rows
                + self.target_activations + self.head_activations)

    @property
    def headroom_gb(self) -> float:
        return GPU_MEMORY_GB - self.total / GB

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total, "headroom_gb": self.headroom_gb}


def plan(recipe: Recipe, layout: Layout, shapes: TargetShapes) -> MemoryPlan:
    """The per-GPU memory and per-step traffic of `recipe` run on `layout` (see the module docstring)."""
    t, z = shapes, recipe.target.zero3
    b = _BYTES[recipe.target.dtype]
    n = layout.gpus
    hpz = effective_hpz(layout.hpz, n)
    tensors = t.tensors()
    if layout.sharding == "zero3":
        # The decoder's small parameters stay whole; lm_head is outside the engine's module (never persistent).
        decoder = tensors[:-1] if not t.tied_embeddings else tensors
        persistent = sum(x for x in decoder if x <= z.param_persistence_threshold)
        gathered = t.params - persistent
        weights = (gathered / n + persistent + (gathered / hpz if hpz > 1 else 0)) * b
        layer = max(sum(x for x in t.layer_tensors(i) if x > z.param_persistence_threshold)
                    for i in range(t.layers))  # an MoE layer's: every expert
        gather_peak = max(t.vocab * t.hidden, layer + min(z.prefetch_bucket_size, layer)) * b
        group = hpz if hpz > 1 else n
        per_forward = gathered * b * (group - 1) / group
        internode = 0.0 if hpz > 1 and layout.gpus_per_node % hpz == 0 else (
            gathered * b * (n - min(n, layout.gpus_per_node)) / n)
    else:
        weights, gather_peak, per_forward, internode = t.params * b, 0, 0.0, 0.0
    ga = recipe.training.gradient_accumulation_steps

    head = eagle3_head_params(t, recipe.draft.draft_vocab_size)
    adam = 8 * head / (n if recipe.training.optimizer_sharding == "zero1" else 1)
    head_states = 4 * head + 4 * head + adam + 4 * t.vocab * t.hidden  # weights, grads, AdamW, fp32 embedding
    head_comm = 0.0
    if n > 1:
        head_comm = 2 * (n - 1) / n * 4 * head
        if recipe.training.optimizer_sharding == "zero1":
            head_comm += (n - 1) / n * 4 * head

    tokens = recipe.data.tokens_per_batch
    mlp = max(t.mlp_working(i) for i in range(t.layers))
    layer_working = tokens * (4 * t.hidden + mlp + (2 * t.heads + 2 * t.kv_heads) * t.head_dim) * b
    features = tokens * 4 * t.hidden * b  # low‖mid‖high and the last hidden state
    teacher = tokens * recipe.draft.draft_vocab_size * b + tokens * 4 + tokens * min(ARGMAX_CHUNK, t.vocab) * b
    return MemoryPlan(
        layout=layout.describe(),
        target_weights=round(weights),
        target_gather_peak=round(gather_peak),
        head_states=round(head_states),
        teacher_rows=recipe.draft.draft_vocab_size * t.hidden * b,
        target_activations=round(layer_working + features + teacher),
        head_activations=eagle3_head_activation_bytes(t, recipe.draft.draft_vocab_size, tokens,
                                                      recipe.draft.ttt_length),
        allgather_bytes=round(per_forward * ga),
        allgather_internode_bytes=round(internode * ga),
        head_comm_bytes=round(head_comm),
    )


def standard_layouts(recipe: Recipe, gpus_per_node: int = 8) -> list[Layout]:
    """The layouts SCALING.md compares: 1 GPU, one node, two nodes; unsharded and ZeRO-3 (with and without
    node-local hpZ across nodes)."""
    g = gpus_per_node
    return [
        Layout(1, 1, "none"),
        Layout(g, g, "none"),
        Layout(g, g, "zero3"),
        Layout(2 * g, g, "zero3"),
        Layout(2 * g, g, "zero3", hpz=g),
    ]


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _gb(x: float) -> str:
    return f"{x / GB:.1f}"


def format_plan(recipe: Recipe, shapes: TargetShapes, source: str, gpus_per_node: int = 8) -> str:
    """The plan as the markdown table `launch/train.py --plan` prints and launch/SCALING.md shows."""
    t = shapes
    moe = (f"mixture of {t.experts} experts, {t.experts_per_token} per token: {_count(t.active_params)} active, "
           "all gathered by ZeRO-3; " if t.experts else "")
    lines = [
        f"Plan for recipe {recipe.run.name}: target {recipe.target.model} ({_count(t.params)} parameters, "
        f"{moe}{recipe.target.dtype}), EAGLE-3 head {eagle3_head_params(t, recipe.draft.draft_vocab_size) / 1e6:.0f}M "
        f"trainable, {recipe.data.tokens_per_batch} tokens per micro-step, gradient accumulation "
        f"{recipe.training.gradient_accumulation_steps}, optimizer sharding {recipe.training.optimizer_sharding}.",
        f"Shapes from {source}. GB = 1e9 bytes, per GPU; traffic is received per GPU per optimizer step.",
        "",
        "| layout | target weights | gather peak | head states | teacher rows | target activations "
        "| head activations | total | left of 80 GB | all-gather | of it across nodes | head grads comm |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for layout in standard_layouts(recipe, gpus_per_node):
        p = plan(recipe, layout, shapes)
        own = layout.sharding == recipe.target.sharding and (layout.sharding == "none" or effective_hpz(
            layout.hpz, layout.gpus) == effective_hpz(recipe.target.zero3.hpz_partition_size, layout.gpus))
        lines.append(
            f"| {p.layout}{' *' if own else ''} | {_gb(p.target_weights)} | {_gb(p.target_gather_peak)} "
            f"| {_gb(p.head_states)} | {_gb(p.teacher_rows)} | {_gb(p.target_activations)} "
            f"| {_gb(p.head_activations)} | {_gb(p.total)} "
            f"| {p.headroom_gb:.1f} | {_gb(p.allgather_bytes)} | {_gb(p.allgather_internode_bytes)} "
            f"| {_gb(p.head_comm_bytes)} |"
        )
    lines += [
        "",
        "* = the recipe's own target.sharding / hpz_partition_size. 'head activations': every position "
        "trained, bf16 autocast (an upper bound). 'left of 80 GB' is what remains for backward's transient "
        "tensors, allocator slack and the CUDA context.",
    ]
    return "\n".join(lines)
