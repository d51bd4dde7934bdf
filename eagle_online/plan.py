"""Scale on paper: per-GPU memory and communication per optimizer step for a recipe on a GPU layout.

Arithmetic from the target's shapes, not a measurement. What it counts, per GPU:

- the target's weights: whole (sharding none); or its ZeRO-3 partition (1/N), plus whole copies of the
  parameters under `param_persistence_threshold`, plus with hpZ a second, node-local partition (1/hpz);
- the ZeRO-3 gather peak: the largest set of whole parameters alive at once — a decoder layer in use
  plus the prefetch bucket, or the vocabulary matrix (embedding in the forward, lm_head in the teacher's
  argmax scan), whichever is larger;
- the head (EAGLE-3, fp32 master weights): weights, gradients (in DDP's buckets), AdamW's two moments
  (divided by N with training.optimizer_sharding=zero1) and its frozen fp32 copy of the embedding;
- the teacher's draft-vocab rows of lm_head;
- the target forward's transient tensors at data.tokens_per_batch: one layer's working set (residual,
  norm, q/k/v, attention output, 3 MLP intermediates), the captured features, the teacher's draft-vocab
  logits (in the target's dtype, with an fp32 log-sum-exp per token) and one chunk of the
  full-vocabulary argmax scan.

- the head's activations: what autograd keeps for the EAGLE-3 head's backward over its TTT unroll under
  bf16 autocast, with every position trained (an upper bound: chat data trains 70-80% of them). The
  count follows heads/eagle3.py tensor by tensor; tests/test_plan.py checks it byte for byte against
  saved-tensor hooks, and `bench.py throughput` measures it on any run (`head_saved_bytes`).

Not counted: backward's transient tensors (activation gradients, the fused loss's chunk), allocator
slack, the CUDA context. `headroom_gb` is what an 80 GB GPU has left for those.

Communication, bytes each GPU receives per optimizer step (gradient_accumulation_steps micro-steps):
ZeRO-3 gathers every non-persistent target parameter once per micro-step (ring all-gather: (n-1)/n of
it, n = the gathering group: all N ranks, or the hpz node-local group once the first step has built the
secondary partitions); DDP all-reduces the head's fp32 gradients once per step (ring: 2(N-1)/N); zero1
adds a broadcast of the updated head weights ((N-1)/N).
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
    """The dimensions of a Llama-style decoder that the arithmetic needs."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool = False
    attention_bias: bool = False

    @classmethod
    def from_config(cls, cfg: dict) -> TargetShapes:
        """From a HF config.json mapping (the text config of a multimodal one)."""
        cfg = cfg.get("text_config", cfg)
        heads = cfg["num_attention_heads"]
        return cls(
            hidden=cfg["hidden_size"], layers=cfg["num_hidden_layers"], intermediate=cfg["intermediate_size"],
            heads=heads, kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, vocab=cfg["vocab_size"],
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
        )

    def layer_tensors(self) -> list[int]:
        """Element counts of one decoder layer's parameters."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        out = [h * q, h * kv, h * kv, q * h, h * self.intermediate, h * self.intermediate,
               self.intermediate * h, h, h]
        if self.attention_bias:
            out += [q, kv, kv]
        return out

    def tensors(self) -> list[int]:
        """Element counts of every parameter: embedding, layers, final norm, lm_head (unless tied)."""
        vocab = [self.vocab * self.hidden]
        return vocab + self.layer_tensors() * self.layers + [self.hidden] + ([] if self.tied_embeddings else vocab)

    @property
    def params(self) -> int:
        return sum(self.tensors())


# Used when a hub name is not in the local Hugging Face cache (--plan never downloads). From the models'
# published config.json files.
KNOWN_SHAPES: dict[str, TargetShapes] = {
    "meta-llama/Llama-3.1-8B-Instruct": TargetShapes(4096, 32, 14336, 32, 8, 128, 128256),
    "meta-llama/Llama-3.3-70B-Instruct": TargetShapes(8192, 80, 28672, 64, 8, 128, 128256),
    "Qwen/Qwen3-8B": TargetShapes(4096, 36, 12288, 32, 8, 128, 151936),
    "Qwen/Qwen2.5-7B-Instruct": TargetShapes(3584, 28, 18944, 28, 4, 128, 152064, attention_bias=True),
}


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
        layer = sum(x for x in t.layer_tensors() if x > z.param_persistence_threshold)
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
    layer_working = tokens * (4 * t.hidden + 3 * t.intermediate + (2 * t.heads + 2 * t.kv_heads) * t.head_dim) * b
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
    lines = [
        f"Plan for recipe {recipe.run.name}: target {recipe.target.model} ({_count(t.params)} parameters, "
        f"{recipe.target.dtype}), EAGLE-3 head {eagle3_head_params(t, recipe.draft.draft_vocab_size) / 1e6:.0f}M "
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
