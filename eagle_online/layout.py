"""What every serving layout shares: file names, tensor tables filled in from a head's config and checked
before anything is written or loaded, and the config fields engines on older transformers still read.

docs/serving.md: the layouts, the layer-id trap and what is checked.

Each head writes and reads its own layout (`DraftHead.serving_layout` / `from_layout`, in its module) with
these checks; export.py does the file work (atomic writes, reading tensors) for all of them. A leaf
module: heads, export and the trainer import it, it imports none of them.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from eagle_online.errors import UserError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Both engines take the target's embedding (vLLM would keep a checkpoint's copy if it differed), so an
# export omits it; a checkpoint being loaded may carry it.
EMBED_NAME = "embed_tokens.weight"
EMBED_SHAPE = ("V", "H")
# Exact dtypes of the vocabulary maps; every other tensor must be floating point.
INDEX_DTYPES = {"d2t": torch.int64, "t2d": torch.bool}
# Where an EAGLE-3 config.json names aux layer ids other than the defaults (docs/serving.md: the trap)
ID_KEY = "eagle_aux_hidden_state_layer_ids"


class ExportError(UserError, ValueError):
    """A checkpoint that would not serve correctly (wrong names, shapes, dtypes, layer ids) or cannot be read."""


# export.format: the layout SGLang and vLLM's EAGLE loaders read (each head's own: `eagle3` names it after
# the main one), vLLM's speculators format (EAGLE-3 only; it names its target), or both
FORMATS = ("eagle3", "speculators", "both")
SPECULATORS_SUFFIX = "_speculators"  # export.format=both: the speculators copy beside the export, DIR_speculators


@dataclass(frozen=True)
class Verifier:
    """What a speculators-format export says about its target (vLLM serves it as the verifier) and how many
    tokens it drafts per step."""

    name_or_path: str
    architectures: tuple[str, ...] = ()
    speculative_tokens: int = 3


def default_aux_layer_ids(num_layers: int) -> list[int]:
    """EAGLE-3's default feature layers [2, N//2, N-3] (both engines' defaults)."""
    return [2, num_layers // 2, num_layers - 3]


def check_aux_layer_ids(aux_layer_ids, target_num_layers: int) -> list[int]:
    """Three distinct ids of the target's decoder layers (id i = the residual stream entering layer i)."""
    ids = [int(i) for i in aux_layer_ids]
    if len(ids) != 3 or len(set(ids)) != 3 or min(ids) < 0 or max(ids) >= target_num_layers:
        raise ExportError(
            f"aux layer ids {ids} must be 3 distinct ids in [0, {target_num_layers}) "
            "(the defaults [2, N//2, N-3] repeat for targets with fewer than 7 layers: no engine serves them)"
        )
    return ids


def aux_layer_ids_of(config) -> list[int] | None:
    """The explicit aux layer ids a loaded EAGLE-3 head was trained with (None: the defaults)."""
    ids = getattr(config, ID_KEY, None)
    return [int(i) for i in ids] if ids else None


def text_config(config):
    """The text model's config of a target's (a multimodal config nests it; a text model's is itself)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def expected_shapes(config, table: Mapping[str, tuple[str, ...]]) -> dict[str, tuple[int, ...]]:
    """A tensor table (name → symbolic shape, plus the optional embedding) with the config's dimensions
    filled in: H hidden, Ht target hidden, A = heads·head_dim, KV = kv_heads·head_dim, I intermediate,
    V target vocab, Vd draft vocab; `2*H` is twice H."""
    h = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    dims = {
        "H": h,
        "Ht": getattr(config, "target_hidden_size", None) or h,
        "A": config.num_attention_heads * head_dim,
        "KV": kv_heads * head_dim,
        "I": config.intermediate_size,
        "V": config.vocab_size,
        "Vd": getattr(config, "draft_vocab_size", None),
    }

    def dim(expr: str) -> int:
        factor, _, symbol = expr.rpartition("*")
        return int(factor or 1) * dims[symbol]

    shapes = {name: tuple(dim(e) for e in rule) for name, rule in table.items()}
    shapes[EMBED_NAME] = tuple(dim(e) for e in EMBED_SHAPE)
    return shapes


def check_tensors(tensors: Mapping[str, torch.Tensor], config, *, allow_embed: bool,
                  required: Mapping[str, tuple[str, ...]],
                  optional: Mapping[str, tuple[str, ...]] | None = None) -> None:
    """Raise ExportError naming every missing, unexpected, mis-shaped or mis-typed tensor of a layout's
    table, and checking that d2t and t2d describe the same draft vocabulary when the table has them."""
    optional = dict(optional or {})
    shapes = expected_shapes(config, {**required, **optional})
    allowed = set(required) | set(optional) | ({EMBED_NAME} if allow_embed else set())
    problems = [f"missing tensor {name}" for name in required if name not in tensors]
    problems += [f"unexpected tensor {name}" for name in tensors if name not in allowed]
    for name, t in tensors.items():
        if name not in allowed:
            continue
        if tuple(t.shape) != shapes[name]:
            problems.append(f"tensor {name} has shape {list(t.shape)}, expected {list(shapes[name])}")
        want = INDEX_DTYPES.get(name)
        if want is not None and t.dtype != want:
            problems.append(f"tensor {name} has dtype {t.dtype}, expected {want}")
        if want is None and not t.dtype.is_floating_point:
            problems.append(f"tensor {name} has dtype {t.dtype}, expected a floating-point dtype")
    if problems:
        raise ExportError("; ".join(problems))
    if "d2t" in required:
        check_vocab_maps(tensors["d2t"], tensors["t2d"])


def draft_ids(d2t: torch.Tensor) -> torch.Tensor:
    """The target ids of the draft vocabulary: draft id i is target id i + d2t[i]."""
    return torch.arange(len(d2t), device=d2t.device) + d2t


def vocab_maps_problem(d2t: torch.Tensor, t2d: torch.Tensor) -> str | None:
    """What is wrong with a pair of vocabulary maps (None: nothing): draft id i is target id i + d2t[i],
    and t2d marks exactly those target ids. A head whose maps were never filled in (all zeros) fails."""
    ids, t2d = draft_ids(d2t.cpu()), t2d.cpu()
    if len(ids) and (ids.min() < 0 or ids.max() >= len(t2d)):
        return f"tensor d2t maps draft ids outside the target vocabulary [0, {len(t2d)})"
    if int(t2d.sum()) != len(d2t) or not bool(t2d[ids].all()):
        return ("tensors d2t and t2d disagree: t2d must be True exactly at the target ids arange + d2t "
                "(was the head's vocabulary map initialised, e.g. by init_from_target?)")
    return None


def check_vocab_maps(d2t: torch.Tensor, t2d: torch.Tensor) -> None:
    """Raise ExportError for maps that would serve wrong tokens."""
    problem = vocab_maps_problem(d2t, t2d)
    if problem is not None:
        raise ExportError(problem)


def served_tensors(head: torch.nn.Module, leave_out: tuple[str, ...] = (EMBED_NAME,)) -> dict[str, torch.Tensor]:
    """A head's state as an export writes it: on CPU, contiguous, without the names left out (the
    target's own weights, which the engines take from the target)."""
    return {name: t.detach().to("cpu").contiguous() for name, t in head.state_dict().items() if name not in leave_out}


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` → `bfloat16`, as config.json's `dtype` spells it."""
    return str(dtype).removeprefix("torch.")


def add_legacy_rope(cfg: dict) -> None:
    """transformers 5 writes only `rope_parameters`; engines running transformers 4.x read `rope_theta` and
    `rope_scaling` and would otherwise fall back to theta 10000. Both spellings load the same in 5.x."""
    rope = cfg.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope:
        return  # absent, or per-layer-type parameters: leave as is
    cfg["rope_theta"] = rope["rope_theta"]
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    cfg["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling


def with_embedding(tensors: dict, shape: tuple[int, ...], dtype: torch.dtype, name: str,
                   weight: torch.Tensor | None, what: str) -> None:
    """Put the target's `weight` under `name` when the checkpoint lacks it (checked against `shape`)."""
    if name in tensors:
        return
    if weight is None:
        raise ExportError(f"the checkpoint has no {name}: pass the target's {what}")
    if tuple(weight.shape) != tuple(shape):
        raise ExportError(f"the target's {what} has shape {list(weight.shape)}, expected {list(shape)}")
    tensors[name] = weight.detach().to("cpu", dtype)


def cast_parameters(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`module` with its parameters in `dtype` and its buffers as they were: `module.to(dtype)` would also
    round RoPE's inv_freq to bf16, whose angles at position p are then off by up to p·f·2⁻⁹ radians."""
    for p in module.parameters():
        p.data = p.data.to(dtype)
    return module


def load_state(head: torch.nn.Module, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype):
    """`head` holding `tensors` exactly (strict), its parameters in `dtype`; returns it."""
    cast_parameters(head, dtype).load_state_dict(dict(tensors), strict=True)
    return head
