"""The MLP speculator (IBM, "Accelerating Production LLMs with Combined Token/Embedding Speculators",
arXiv 2404.19124) in the layout vLLM serves as `"method": "mlp_speculator"`.

    s_{-1} = h_t                             the target's final (post-norm) hidden state at t
             (scale_input: h_t / rms(h_t) / √2)
    s_i    = GELU(ln_i(proj_i(s_{i-1}) + emb_i(y_i) · emb_weight / state_weight))
    logits_i = head_i(s_i)                    over the target's whole vocabulary

with state_weight = 0.5 ** (0.5 / n_predict), emb_weight = sqrt((1 − state_weight²) · inner_dim / 2) and
ln_i an RMS norm (eps 1e-6) followed by an elementwise weight and bias. Stage 0 reads y_0 = x_{t+1}, the
token the target produced at t; stage i reads the token stage i−1 proposed. Training (teacher forcing)
feeds stage i the true x_{t+1+i} and matches the teacher at t+1+i (the token x_{t+2+i}), as EAGLE-3's
step k does.

Checked against vLLM's vllm/model_executor/models/mlp_speculator.py (MLPSpeculator, generate_proposals,
MLPSpeculatorLayerNorm, load_weights stripping `speculator.`) and
vllm/transformers_utils/configs/mlp_speculator.py (MLPSpeculatorConfig: `len(top_k_tokens_per_head)` must
equal n_predict; `inner_dim` 0 means emb_dim). vLLM builds `num_speculative_tokens` stages when it is
given (num_lookahead_tokens), so a checkpoint is served with num_speculative_tokens = n_predict.

The head holds nothing of the target (its embeddings and heads are its own, vocab × inner); a fresh head
starts from copies of the target's embedding and lm_head when inner_dim equals the hidden size.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig

from eagle_online.errors import RecipeError
from eagle_online.heads.base import Drafter, DraftHead, DraftStep, HeadOutput
from eagle_online.heads.eagle3 import DocumentLayout, scored_rows, shift_left
from eagle_online.layout import ExportError, check_tensors, dtype_name, load_state, served_tensors, text_config
from eagle_online.losses import StepMetrics, TeacherTargets, linear_distillation

ARCHITECTURE = "MLPSpeculatorPreTrainedModel"
MODEL_TYPE = "mlp_speculator"
N_PREDICT = 3  # draft.n_predict's default
PREFIX = "speculator."  # IBM's fms checkpoints may carry it; vLLM's load_weights strips it
EPS = 1e-6  # MLPSpeculatorLayerNorm's
SQRT2 = math.sqrt(2.0)
# The config.json fields of vLLM's MLPSpeculatorConfig
CONFIG_FIELDS = ("vocab_size", "emb_dim", "inner_dim", "n_predict", "top_k_tokens_per_head", "n_candidates",
                 "tie_weights", "scale_input")


def tensor_table(n_predict: int) -> dict[str, tuple[str, ...]]:
    """The served tensors of n_predict stages in layout.expected_shapes' symbols: H is emb_dim (the target's
    hidden size), I inner_dim (the config's intermediate_size), V the vocabulary."""
    table: dict[str, tuple[str, ...]] = {}
    for i in range(n_predict):
        table[f"emb.{i}.weight"] = ("V", "I")
        table[f"proj.{i}.weight"] = ("I", "H" if i == 0 else "I")
        table[f"ln.{i}.weight"] = ("I",)
        table[f"ln.{i}.bias"] = ("I",)
        table[f"head.{i}.weight"] = ("V", "I")
    return table


def speculator_config(vocab_size: int, emb_dim: int, inner_dim: int = 0, n_predict: int = N_PREDICT,
                      scale_input: bool = True, top_k_tokens_per_head: list[int] | None = None,
                      n_candidates: int = 5) -> LlamaConfig:
    """The head's config: a LlamaConfig as a container (it saves and loads as draft_config.json like the
    other heads'), with vLLM's fields; hidden_size is emb_dim and intermediate_size the inner width, so the
    layout's shape table reads them. `inner_dim` 0 is emb_dim, as in vLLM."""
    inner = inner_dim or emb_dim
    if top_k_tokens_per_head is None:  # unused by vLLM, but its config asserts one entry per stage
        top_k_tokens_per_head = [max(1, 5 - i) for i in range(n_predict)]
    return LlamaConfig(
        architectures=[ARCHITECTURE], hidden_size=emb_dim, intermediate_size=inner, num_hidden_layers=n_predict,
        num_attention_heads=1, vocab_size=vocab_size, draft_vocab_size=vocab_size, tie_word_embeddings=False,
        emb_dim=emb_dim, inner_dim=inner, n_predict=n_predict, scale_input=scale_input, tie_weights=False,
        top_k_tokens_per_head=list(top_k_tokens_per_head), n_candidates=n_candidates,
    )


class SpeculatorNorm(nn.Module):
    """vLLM's MLPSpeculatorLayerNorm: x / sqrt(mean(x²) + eps), then · weight + bias."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)) + self.bias


class MLPSpeculatorHead(DraftHead):
    """n_predict stages of (emb, proj, ln, GELU, head); see the module docstring."""

    ARCHITECTURE = ARCHITECTURE
    LM_HEAD = "full"  # its heads cover the whole vocabulary (a fresh one starts from the target's lm_head)
    SERVE_METHOD = (None, "mlp_speculator")  # SGLang has no MLP speculator
    SETTINGS = ("n_predict", "loss_decay")
    SHOWN_SETTINGS = ("n_predict",)

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        n, h, inner, v = config.n_predict, config.emb_dim, config.inner_dim, config.vocab_size
        self.n_predict, self.scale_input = n, bool(config.scale_input)
        self.loss_decay = 1.0
        self.state_weight = 0.5 ** (0.5 / n)
        self.emb_weight = math.sqrt((1 - self.state_weight**2) * (inner / 2))
        self.emb = nn.ModuleList(nn.Embedding(v, inner) for _ in range(n))
        self.proj = nn.ModuleList(nn.Linear(h if i == 0 else inner, inner, bias=False) for i in range(n))
        self.ln = nn.ModuleList(SpeculatorNorm(inner) for _ in range(n))
        self.head = nn.ModuleList(nn.Linear(inner, v, bias=False) for _ in range(n))

    @classmethod
    def config_for(cls, target_config, draft, vocab_size: int) -> LlamaConfig:
        """Over the target's whole vocabulary: draft.draft_vocab_size must be the target's vocab_size."""
        if draft.draft_vocab_size != vocab_size:
            raise RecipeError(f"draft.draft_vocab_size={draft.draft_vocab_size}: the MLP speculator drafts over the "
                              f"target's whole vocabulary (vLLM's layout has no vocabulary map); set "
                              f"draft.draft_vocab_size={vocab_size}")
        return speculator_config(vocab_size, text_config(target_config).hidden_size, n_predict=draft.n_predict)

    def configure_training(self, draft) -> None:
        super().configure_training(draft)
        self.loss_decay = draft.loss_decay

    @torch.no_grad()
    def init_from_target(self, embed_weight, lm_head_weight, d2t=None, t2d=None) -> None:
        """When inner_dim is the target's hidden size, every stage's emb and head start as copies of the
        target's embedding and lm_head (trained from there: token geometry the target already has); else
        they keep their random init. ln starts at weight 1, bias 0; proj at nn.Linear's init."""
        if self.config.inner_dim != self.config.emb_dim:
            return
        for i in range(self.n_predict):
            self.emb[i].weight.copy_(embed_weight)
            if lm_head_weight is not None:
                self.head[i].weight.copy_(lm_head_weight)

    # -- the forward, shared by training and the drafter
    def first_state(self, hidden: torch.Tensor) -> torch.Tensor:
        """The state stage 0 reads: the target's hidden state, RMS-normalised and / √2 with scale_input."""
        hidden = hidden.to(self.proj[0].weight.dtype)
        if self.scale_input:
            hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + EPS) / SQRT2
        return hidden

    def stage(self, i: int, state: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Stage i's state from the previous state and the tokens it reads."""
        z = self.emb[i](tokens).to(state.dtype)
        return F.gelu(self.ln[i](self.proj[i](state) + z * (self.emb_weight / self.state_weight)))

    def forward(self, target, batch) -> HeadOutput:
        """Stage i at position t reads x_{t+1+i} (teacher forcing) and matches the teacher at t+1+i, scored
        where x_{t+2+i} is trained in t's conversation (scored_rows, k = i). loss = Σ_i decay^i · loss_i."""
        input_ids, loss_mask = batch.input_ids, batch.loss_mask
        b, t = input_ids.shape
        docs = DocumentLayout.from_position_ids(batch.position_ids).doc
        teacher = TeacherTargets.from_logits(target.teacher_logits.reshape(b * t, -1))
        if teacher.logits.shape[-1] != self.config.vocab_size:
            raise ValueError(f"the teacher covers {teacher.logits.shape[-1]} tokens; the MLP speculator needs the "
                             f"whole vocabulary ({self.config.vocab_size}): draft.draft_vocab_size must equal it")
        state = self.first_state(target.last_hidden)
        loss = state.new_zeros((), dtype=torch.float32)
        steps, counts = [], []
        for i in range(self.n_predict):
            state = self.stage(i, state, shift_left(input_ids, 1 + i))
            rows = scored_rows(loss_mask, docs, target.teacher_in_draft, i)
            step = linear_distillation(state.reshape(b * t, -1)[rows], self.head[i].weight, teacher, rows + 1 + i,
                                       self.objective)
            loss = loss + (self.loss_decay**i) * step.loss
            steps.append(step)
            counts.append(len(rows))
        return HeadOutput(loss=loss, metrics=StepMetrics.of(steps, counts))

    # -- checkpoints and serving
    @classmethod
    def from_checkpoint(cls, config, tensors):
        return load_state(cls(config), tensors, tensors["head.0.weight"].dtype)

    def serving_layout(self, aux_layer_ids=None, target_num_layers=None):
        """config.json as vLLM's MLPSpeculatorConfig reads it, and every stage's tensors under vLLM's names."""
        tensors = served_tensors(self, leave_out=())
        check_tensors(tensors, self.config, allow_embed=False, required=tensor_table(self.n_predict))
        c = self.config
        config = {key: getattr(c, key) for key in CONFIG_FIELDS}
        config.update(architectures=[ARCHITECTURE], model_type=MODEL_TYPE, tie_weights=False,
                      torch_dtype=dtype_name(tensors["head.0.weight"].dtype))
        return config, tensors

    @classmethod
    def reads(cls, raw_config: dict) -> bool:
        return raw_config.get("model_type") == MODEL_TYPE or super().reads(raw_config)

    @classmethod
    def from_layout(cls, raw_config, tensors, where, embed_weight=None, lm_head_weight=None):
        """Our export or any MLPSpeculatorConfig checkpoint (IBM's accelerators): names with or without
        `speculator.`; tied weights (tie_weights) are read as untied copies of the shared stages, which
        compute the same and train (and export) untied."""
        try:
            n, v, emb_dim = int(raw_config["n_predict"]), int(raw_config["vocab_size"]), int(raw_config["emb_dim"])
        except (KeyError, TypeError, ValueError) as e:
            raise ExportError(f"{where}: an MLP speculator config needs integer n_predict, vocab_size and emb_dim "
                              f"({e})") from None
        top_k = raw_config.get("top_k_tokens_per_head")
        config = speculator_config(v, emb_dim, int(raw_config.get("inner_dim") or 0), n,
                                   bool(raw_config.get("scale_input", False)),
                                   list(top_k) if top_k and len(top_k) == n else None,
                                   int(raw_config.get("n_candidates", 5)))
        tensors = {k.removeprefix(PREFIX): t for k, t in tensors.items()}
        if raw_config.get("tie_weights", False):
            tensors = _untied(tensors, n)
        try:
            check_tensors(tensors, config, allow_embed=False, required=tensor_table(n))
        except ExportError as e:
            raise ExportError(f"{where}: {e}") from None
        return load_state(cls(config), tensors, tensors["head.0.weight"].dtype)


def _untied(tensors: dict[str, torch.Tensor], n_predict: int) -> dict[str, torch.Tensor]:
    """A tie_weights checkpoint's tensors for every stage: emb, ln and head of stage 0 and proj of stage 1
    shared by the later stages (vLLM's MLPSpeculator with tie_weights), where a stage's own are absent."""
    out = dict(tensors)
    for i in range(1, n_predict):
        for name, source in ((f"emb.{i}.weight", "emb.0.weight"), (f"ln.{i}.weight", "ln.0.weight"),
                             (f"ln.{i}.bias", "ln.0.bias"), (f"head.{i}.weight", "head.0.weight"),
                             *(((f"proj.{i}.weight", "proj.1.weight"),) if i > 1 else ())):
            if name not in out and source in out:
                out[name] = out[source].clone()
    return out


class MLPSpeculatorDrafter(Drafter):
    """vLLM's greedy proposal: `extend` runs stage 0 on the target's hidden state at the last committed
    position and the last committed token; each `chain` runs the next stage on the previous state and
    the token just proposed. vLLM refuses more speculative tokens than stages, and so does `chain`."""

    feature = "last_hidden"

    def __init__(self, head: MLPSpeculatorHead):
        self.head = head.eval()
        self.reset()

    def reset(self) -> None:
        self._state = self._committed = None
        self._stage = 0

    def _propose(self) -> DraftStep:
        return DraftStep(logits=self.head.head[self._stage](self._state[0]).float())

    @torch.no_grad()
    def extend(self, features, tokens, positions) -> DraftStep:
        head = self.head
        self._stage = 0
        self._state = self._committed = head.stage(0, head.first_state(features[-1:]), tokens[-1:])
        return self._propose()

    def rewind(self) -> None:
        self._state, self._stage = self._committed, 0

    @torch.no_grad()
    def chain(self, token: int, position: int) -> DraftStep:
        if self._stage + 1 >= self.head.n_predict:
            raise ValueError(f"the MLP speculator has {self.head.n_predict} stages (n_predict): it drafts at most "
                             f"{self.head.n_predict} tokens per step, as vLLM does; lower the number of draft tokens")
        self._stage += 1
        token_ids = torch.tensor([token], device=self._state.device)
        self._state = self.head.stage(self._stage, self._state, token_ids)
        return self._propose()
