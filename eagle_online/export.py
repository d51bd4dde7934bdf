"""EAGLE-3 checkpoints in the layout SGLang and vLLM serve, and loading such checkpoints back.

docs/serving.md: the layouts, the layer-id trap and what is checked.

An export is a directory with `config.json` (the head's LlamaConfig) and `model.safetensors` holding the
serving names exactly: both engines skip names they do not know without a word, and a skipped tensor
serves at τ = 1. So every name, shape and dtype is checked before anything is written, and the directory
appears only once complete.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig

from eagle_online.checkpoint import MANIFEST, damage, disk_full
from eagle_online.errors import UserError
from eagle_online.heads import HEADS, architecture_of
from eagle_online.heads.eagle import ARCHITECTURE as EAGLE
from eagle_online.heads.eagle import VLLM_ARCHITECTURE as EAGLE_VLLM
from eagle_online.heads.eagle import EagleHead
from eagle_online.heads.eagle3 import ARCHITECTURE, Eagle3Head
from eagle_online.heads.mlp import ARCHITECTURE as MLP
from eagle_online.heads.mlp import MLPHead
from eagle_online.target import default_aux_layer_ids

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

# Serving name → shape, in the head config's dimensions: H hidden, Ht target hidden, A = heads·head_dim,
# KV = kv_heads·head_dim, I intermediate, V target vocab, Vd draft vocab. q/k/v read cat(embed, feature): 2H.
REQUIRED_TENSORS: dict[str, tuple[str, ...]] = {
    "fc.weight": ("H", "3*Ht"),
    "midlayer.input_layernorm.weight": ("H",),
    "midlayer.hidden_norm.weight": ("H",),
    "midlayer.self_attn.q_proj.weight": ("A", "2*H"),
    "midlayer.self_attn.k_proj.weight": ("KV", "2*H"),
    "midlayer.self_attn.v_proj.weight": ("KV", "2*H"),
    "midlayer.self_attn.o_proj.weight": ("H", "A"),
    "midlayer.post_attention_layernorm.weight": ("H",),
    "midlayer.mlp.gate_proj.weight": ("I", "H"),
    "midlayer.mlp.up_proj.weight": ("I", "H"),
    "midlayer.mlp.down_proj.weight": ("H", "I"),
    "norm.weight": ("H",),
    "lm_head.weight": ("Vd", "H"),
    "d2t": ("Vd",),
    "t2d": ("V",),
}
# EAGLE-1/2 (LlamaForCausalLMEagle / EagleLlamaForCausalLM): layer 0 without input_layernorm, fc over
# cat(embed, feature), no norm and no lm_head (both engines use the target's lm_head and embedding).
# `fc.bias` is written when the head has one (EAGLE_OPTIONAL).
EAGLE_TENSORS: dict[str, tuple[str, ...]] = {
    "fc.weight": ("H", "2*H"),
    "layers.0.self_attn.q_proj.weight": ("A", "H"),
    "layers.0.self_attn.k_proj.weight": ("KV", "H"),
    "layers.0.self_attn.v_proj.weight": ("KV", "H"),
    "layers.0.self_attn.o_proj.weight": ("H", "A"),
    "layers.0.post_attention_layernorm.weight": ("H",),
    "layers.0.mlp.gate_proj.weight": ("I", "H"),
    "layers.0.mlp.up_proj.weight": ("I", "H"),
    "layers.0.mlp.down_proj.weight": ("H", "I"),
}
EAGLE_OPTIONAL = {"fc.bias": ("H",)}
# Both engines take the target's embedding (vLLM would keep a checkpoint's copy if it differed), so an
# export omits it; a checkpoint being loaded may carry it.
EMBED_NAME = "embed_tokens.weight"
EMBED_SHAPE = ("V", "H")
# Exact dtypes of the vocabulary maps; every other tensor must be floating point.
INDEX_DTYPES = {"d2t": torch.int64, "t2d": torch.bool}

_ID_KEY = "eagle_aux_hidden_state_layer_ids"


class ExportError(UserError, ValueError):
    """A checkpoint that would not serve correctly (wrong names, shapes, dtypes, layer ids) or cannot be read."""


def expected_shapes(config, table: Mapping[str, tuple[str, ...]] = REQUIRED_TENSORS) -> dict[str, tuple[int, ...]]:
    """A tensor table (REQUIRED_TENSORS by default, plus the optional embedding) with the config's
    dimensions filled in."""
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
                  required: Mapping[str, tuple[str, ...]] = REQUIRED_TENSORS,
                  optional: Mapping[str, tuple[str, ...]] | None = None) -> None:
    """Raise ExportError naming every missing, unexpected, mis-shaped or mis-typed tensor of a table
    (EAGLE-3's by default), and checking that d2t and t2d describe the same draft vocabulary."""
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
        _check_vocab_maps(tensors["d2t"], tensors["t2d"])


def _check_vocab_maps(d2t: torch.Tensor, t2d: torch.Tensor) -> None:
    """Draft id i is target id i + d2t[i]; t2d marks exactly those target ids. A head whose maps were
    never filled in (all zeros) fails here rather than serving wrong tokens."""
    ids = torch.arange(len(d2t)) + d2t.cpu()
    if len(ids) and (ids.min() < 0 or ids.max() >= len(t2d)):
        raise ExportError(f"tensor d2t maps draft ids outside the target vocabulary [0, {len(t2d)})")
    t2d = t2d.cpu()
    if int(t2d.sum()) != len(d2t) or not bool(t2d[ids].all()):
        raise ExportError(
            "tensors d2t and t2d disagree: t2d must be True exactly at the target ids arange + d2t "
            "(was the head's vocabulary map initialised, e.g. by init_from_target?)"
        )


def check_aux_layer_ids(aux_layer_ids, target_num_layers: int) -> list[int]:
    """Three distinct ids of the target's decoder layers (id i = the residual stream entering layer i)."""
    ids = [int(i) for i in aux_layer_ids]
    if len(ids) != 3 or len(set(ids)) != 3 or min(ids) < 0 or max(ids) >= target_num_layers:
        raise ExportError(
            f"aux layer ids {ids} must be 3 distinct ids in [0, {target_num_layers}) "
            "(the defaults [2, N//2, N-3] repeat for targets with fewer than 7 layers: no engine serves them)"
        )
    return ids


def serving_config(config, aux_layer_ids, target_num_layers: int, dtype: torch.dtype) -> dict:
    """The config.json dict both engines read, including the layer-id trap:

    with the default ids no id is written anywhere (both engines' defaults agree); with other ids the
    top-level field gets them as given (vLLM) and `eagle_config` gets them minus one (SGLang adds one),
    with a warning because SGLang's reading changed across versions."""
    ids = check_aux_layer_ids(aux_layer_ids, target_num_layers)
    cfg = config.to_dict()  # every field explicit: engine and transformers defaults differ across versions
    cfg.update(
        architectures=[ARCHITECTURE],
        num_hidden_layers=1,
        draft_vocab_size=config.draft_vocab_size,
        target_hidden_size=getattr(config, "target_hidden_size", None) or config.hidden_size,
        tie_word_embeddings=False,  # true would make SGLang use the embedding as lm_head
        norm_before_residual=False,  # vLLM's speculators format defaults it to True
        dtype=str(dtype).removeprefix("torch."),
    )
    _add_legacy_rope(cfg)
    # Drop ids the head's config may carry (e.g. loaded from another checkpoint) before deciding.
    cfg.pop(_ID_KEY, None)
    eagle_config = dict(cfg.pop("eagle_config", None) or {})
    eagle_config.pop(_ID_KEY, None)
    default = default_aux_layer_ids(target_num_layers)
    if ids != default:
        if min(ids) < 1:
            raise ExportError(
                f"aux layer id 0 cannot be written for SGLang, which reads eagle_config ids as id - 1: got {ids}"
            )
        cfg[_ID_KEY] = ids
        eagle_config[_ID_KEY] = [i - 1 for i in ids]
        warnings.warn(
            f"explicit aux layer ids {ids} (the defaults for a {target_num_layers}-layer target are {default}): "
            f"wrote {_ID_KEY}={ids} at the top level for vLLM and eagle_config.{_ID_KEY}={[i - 1 for i in ids]} "
            "for SGLang, which adds 1. SGLang's reading depends on its version (a 2026-05 change adds 1 only "
            "when the first id is 1): check the acceptance rate after serving, a layer off gives ~1%.",
            stacklevel=3,
        )
    if eagle_config:
        cfg["eagle_config"] = eagle_config
    return cfg


def _add_legacy_rope(cfg: dict) -> None:
    """transformers 5 writes only `rope_parameters`; engines running transformers 4.x read `rope_theta` and
    `rope_scaling` and would otherwise fall back to theta 10000. Both spellings load the same in 5.x."""
    rope = cfg.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope:
        return  # absent, or per-layer-type parameters: leave as is
    cfg["rope_theta"] = rope["rope_theta"]
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    cfg["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling


def export_eagle3(head: Eagle3Head, out_dir, aux_layer_ids: list[int], target_num_layers: int,
                  extra_files: Mapping[str, str] | None = None) -> Path:
    """Write a directory SGLang and vLLM load as an EAGLE-3 draft: config.json and model.safetensors with
    the serving names, without the embedding (both engines use the target's).

    Everything is checked first (ExportError names the offending tensor), written into a temporary
    sibling directory, and renamed into place; an existing export is replaced only once the new one is
    complete, and nothing half-written is left behind on error. `extra_files` (name → text: the card) are
    written beside them, in the same temporary directory."""
    state = head.state_dict()
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state.items() if name != EMBED_NAME}
    check_tensors(tensors, head.config, allow_embed=False)
    config = serving_config(head.config, aux_layer_ids, target_num_layers, tensors["fc.weight"].dtype)

    return _write_export(out_dir, config, tensors, extra_files)


def export_eagle(head: EagleHead, out_dir, extra_files: Mapping[str, str] | None = None) -> Path:
    """Write an EAGLE-1/2 draft both engines load (module docstring of heads/eagle.py): config.json
    naming both engines' architectures and the layer-0 tensors, without embedding or lm_head."""
    state = head.state_dict()
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state.items()
               if name not in (EMBED_NAME, "lm_head.weight")}
    check_tensors(tensors, head.config, allow_embed=False, required=EAGLE_TENSORS, optional=EAGLE_OPTIONAL)
    config = head.config.to_dict()
    config.update(
        architectures=[EAGLE, EAGLE_VLLM],
        num_hidden_layers=1,
        tie_word_embeddings=False,  # SGLang would read its lm_head from the embedding
        eagle_fc_bias="fc.bias" in tensors,
        dtype=str(tensors["fc.weight"].dtype).removeprefix("torch."),
    )
    # No `bias` key: vLLM's Llama layers read it as attention_bias.
    config.pop("bias", None)
    _add_legacy_rope(config)
    return _write_export(out_dir, config, tensors, extra_files)


def export_mlp(head: MLPHead, out_dir, extra_files: Mapping[str, str] | None = None) -> Path:
    """Write the MLP baseline in our own layout (no engine serves it): config.json, and the blocks,
    draft-vocabulary lm_head rows and vocab maps, without the embedding."""
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in head.state_dict().items() if name != EMBED_NAME}
    config = head.config.to_dict()
    config["dtype"] = str(tensors["lm_head.weight"].dtype).removeprefix("torch.")
    return _write_export(out_dir, config, tensors, extra_files)


def export_head(head, out_dir, aux_layer_ids: list[int], target_num_layers: int,
                extra_files: Mapping[str, str] | None = None) -> Path:
    """Export any registered head in its serving layout (the layer ids matter to EAGLE-3 only)."""
    if isinstance(head, Eagle3Head):
        return export_eagle3(head, out_dir, aux_layer_ids, target_num_layers, extra_files)
    if isinstance(head, EagleHead):
        return export_eagle(head, out_dir, extra_files)
    if isinstance(head, MLPHead):
        return export_mlp(head, out_dir, extra_files)
    raise ExportError(f"no exporter for {type(head).__name__}")


def _write_export(out_dir, config: dict, tensors: dict[str, torch.Tensor],
                  extra_files: Mapping[str, str] | None = None) -> Path:
    def write(tmp: Path) -> None:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)

    out = Path(out_dir).resolve()  # through a symlink: the export it points at is replaced
    _write_atomically(out, write)
    return out


def _is_replaceable(path: Path) -> bool:
    """Only an empty directory or an earlier draft export may be replaced (never, say, the target's own
    model directory given by mistake)."""
    if not path.is_dir():
        return False
    if not any(path.iterdir()):
        return True
    try:
        names = json.loads((path / CONFIG_NAME).read_text()).get("architectures", [])
        return any(name in HEADS or name == EAGLE_VLLM for name in names)
    except (OSError, ValueError, AttributeError):
        return False


def _write_atomically(out: Path, write: Callable[[Path], None]) -> None:
    """Fill a temporary sibling of `out`, then rename it into place, replacing `out` only after."""
    if out.exists() and not _is_replaceable(out):
        raise ExportError(f"refusing to replace {out}: it is neither empty nor a draft export")
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out.with_name(f".{out.name}.tmp-{tag}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()  # honours the umask, unlike tempfile.mkdtemp's 0700
        write(tmp)
        if out.exists():
            # POSIX has no atomic swap of two directories: the old one steps aside, the new one takes
            # its name, and on failure the old one comes back.
            old = out.with_name(f".{out.name}.old-{tag}")
            out.rename(old)
            try:
                tmp.rename(out)
            except BaseException:
                old.rename(out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) or disk_full(e):  # a full disk, a read-only folder: nothing was replaced
            full = " (the disk is full)" if disk_full(e) else ""
            raise ExportError(f"could not write {out}{full}: {e}; nothing there was replaced") from None
        raise


def read_tensors(path) -> dict[str, torch.Tensor]:
    """A checkpoint directory's tensors on CPU, names as stored: model.safetensors, a sharded safetensors
    index, or pytorch_model.bin (as the original EAGLE releases ship)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if (path / WEIGHTS_NAME).exists():
        return load_file(str(path / WEIGHTS_NAME))
    if index.exists():
        tensors = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            tensors.update(load_file(str(path / shard)))
        return tensors
    if (path / "pytorch_model.bin").exists():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ExportError(f"no {WEIGHTS_NAME}, sharded safetensors or pytorch_model.bin in {path}")


def _with_embedding(tensors: dict, shape: tuple[int, ...], dtype: torch.dtype, name: str,
                    weight: torch.Tensor | None, what: str) -> None:
    """Put the target's `weight` under `name` when the checkpoint lacks it (checked against `shape`)."""
    if name in tensors:
        return
    if weight is None:
        raise ExportError(f"the checkpoint has no {name}: pass the target's {what}")
    if tuple(weight.shape) != tuple(shape):
        raise ExportError(f"the target's {what} has shape {list(weight.shape)}, expected {list(shape)}")
    tensors[name] = weight.detach().to("cpu", dtype)


def _load_state(head: torch.nn.Module, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype):
    for p in head.parameters():  # parameters only: RoPE's inv_freq buffer stays fp32
        p.data = p.data.to(dtype)
    head.load_state_dict(dict(tensors), strict=True)
    return head


def head_from_tensors(config, tensors: Mapping[str, torch.Tensor], embed_weight: torch.Tensor | None = None):
    """An Eagle3Head holding `tensors` (checked first), in their floating-point dtype. The embedding is
    the checkpoint's when it has one, else `embed_weight` (the target's)."""
    check_tensors(tensors, config, allow_embed=True)
    tensors = dict(tensors)
    dtype = tensors["fc.weight"].dtype
    _with_embedding(tensors, expected_shapes(config)[EMBED_NAME], dtype, EMBED_NAME, embed_weight, "embedding")
    return _load_state(Eagle3Head(config), tensors, dtype)


def _read_config(path: Path) -> dict:
    if not (path / CONFIG_NAME).exists():
        raise ExportError(f"no {CONFIG_NAME} in {path}")
    try:
        return json.loads((path / CONFIG_NAME).read_text())
    except ValueError as e:
        raise ExportError(f"{path / CONFIG_NAME}: not valid JSON: {e}") from None


def _speculators_eagle3_config(raw: dict, where: Path) -> LlamaConfig:
    """The LlamaConfig of a vLLM speculators EAGLE-3 config.json (`speculators_model_type: eagle3`, the
    layer's fields nested under `transformer_layer_config`; speculators/models/eagle3 config.py)."""
    layer = raw.get("transformer_layer_config")
    if not isinstance(layer, dict):
        raise ExportError(f"{where}: a speculators config needs a `transformer_layer_config` mapping")
    if raw.get("norm_before_residual", False):
        raise ExportError(f"{where}: norm_before_residual is true; this head implements the original EAGLE-3 "
                          "layer (hidden_norm after the residual is taken) only")
    fields = {k: v for k, v in layer.items() if k not in ("architectures", "model_type", "transformers_version")}
    config = LlamaConfig(**fields)
    config.architectures = [ARCHITECTURE]
    config.num_hidden_layers = 1
    config.draft_vocab_size = raw.get("draft_vocab_size")
    config.target_hidden_size = raw.get("target_hidden_size") or config.hidden_size
    config.norm_before_residual = False
    config.tie_word_embeddings = False
    if raw.get(_ID_KEY):  # vLLM's convention: captured as given, like ours
        config.eagle_aux_hidden_state_layer_ids = list(raw[_ID_KEY])
    return config


def _eagle3_layer_ids(config) -> None:
    """Normalise a loaded config's explicit aux layer ids to ours (HF hidden_states index) at the top
    level: vLLM reads the top-level field as given, SGLang reads `eagle_config`'s and adds one."""
    top = getattr(config, _ID_KEY, None)
    nested = (getattr(config, "eagle_config", None) or {}).get(_ID_KEY)
    if not top and nested:
        config.eagle_aux_hidden_state_layer_ids = [int(i) + 1 for i in nested]


def aux_layer_ids_of(config) -> list[int] | None:
    """The explicit aux layer ids a loaded EAGLE-3 head was trained with (None: the defaults)."""
    ids = getattr(config, _ID_KEY, None)
    return [int(i) for i in ids] if ids else None


def load_eagle3(path, embed_weight: torch.Tensor | None = None) -> Eagle3Head:
    """Load an EAGLE-3 draft directory into an Eagle3Head: our export, the official EAGLE-3 releases
    (config.json + pytorch_model.bin, `midlayer.*`), SpecForge/SGLang (model.safetensors with
    embed_tokens) or vLLM speculators (`speculators_model_type: eagle3`, `layers.0.*`). embed_tokens
    comes from `embed_weight` (the target's) when the checkpoint has none."""
    path = Path(path)
    raw = _read_config(path)
    if raw.get("speculators_model_type") is not None:
        if raw["speculators_model_type"] != "eagle3":
            raise ExportError(f"{path / CONFIG_NAME}: speculators_model_type {raw['speculators_model_type']!r}, "
                              "only eagle3 is read")
        config = _speculators_eagle3_config(raw, path / CONFIG_NAME)
    else:
        config = LlamaConfig.from_dict(raw)
        architectures = getattr(config, "architectures", None) or []
        if ARCHITECTURE not in architectures:
            raise ExportError(f"{path / CONFIG_NAME} has architectures {architectures}, expected [{ARCHITECTURE!r}]")
        _eagle3_layer_ids(config)
    if getattr(config, "draft_vocab_size", None) is None:
        raise ExportError(f"{path / CONFIG_NAME} has no draft_vocab_size")
    # vLLM-side writers (speculators) name the layer `layers.0.`; SGLang and EAGLE write `midlayer.`.
    tensors = {("midlayer." + k[len("layers.0."):] if k.startswith("layers.0.") else k): v
               for k, v in read_tensors(path).items()}
    bias = tensors.pop("fc.bias", None)
    if bias is not None and bool(bias.any()):
        raise ExportError(f"{path}: fc.bias is non-zero; EAGLE-3 as SGLang and vLLM serve it has no fc bias")
    return head_from_tensors(config, tensors, embed_weight)


def load_eagle(path, embed_weight: torch.Tensor | None = None, lm_head_weight: torch.Tensor | None = None) -> EagleHead:
    """Load an EAGLE-1/2 draft directory (ours, SGLang's LlamaForCausalLMEagle, vLLM's EagleLlamaForCausalLM
    or an official EAGLE release) into an EagleHead; embedding and lm_head are the target's unless the
    checkpoint carries them."""
    path = Path(path)
    config = LlamaConfig.from_dict(_read_config(path))
    tensors = dict(read_tensors(path))
    config.eagle_fc_bias = "fc.bias" in tensors
    lm_shape = (config.vocab_size, config.hidden_size)
    check_tensors({k: v for k, v in tensors.items() if k != "lm_head.weight"}, config, allow_embed=True,
                  required=EAGLE_TENSORS, optional=EAGLE_OPTIONAL)
    dtype = tensors["fc.weight"].dtype
    _with_embedding(tensors, lm_shape, dtype, EMBED_NAME, embed_weight, "embedding")
    _with_embedding(tensors, lm_shape, dtype, "lm_head.weight", lm_head_weight, "lm_head")
    config.architectures = [EAGLE, EAGLE_VLLM]
    return _load_state(EagleHead(config), tensors, dtype)


def load_mlp(path, embed_weight: torch.Tensor | None = None) -> MLPHead:
    """Load the MLP baseline's export; the embedding is the target's."""
    path = Path(path)
    config = LlamaConfig.from_dict(_read_config(path))
    tensors = dict(read_tensors(path))
    dtype = tensors["lm_head.weight"].dtype
    _with_embedding(tensors, (config.vocab_size, config.hidden_size), dtype, EMBED_NAME, embed_weight, "embedding")
    return _load_state(MLPHead(config), tensors, dtype)


def load_draft(path, embed_weight: torch.Tensor | None = None, lm_head_weight: torch.Tensor | None = None):
    """Load any draft directory this project reads, choosing by its config.json: EAGLE-3 in our, the
    official, SpecForge's or vLLM speculators' layout; EAGLE-1/2; or the MLP baseline."""
    path = Path(path)
    raw = _read_config(path)
    if raw.get("speculators_model_type") is not None:
        return load_eagle3(path, embed_weight)
    names = raw.get("architectures") or []
    if ARCHITECTURE in names:
        return load_eagle3(path, embed_weight)
    if EAGLE in names or EAGLE_VLLM in names:
        return load_eagle(path, embed_weight, lm_head_weight)
    if MLP in names:
        return load_mlp(path, embed_weight)
    raise ExportError(f"{path / CONFIG_NAME} has architectures {names}: not a draft this project reads "
                      f"(known: {sorted(HEADS)}, or a speculators eagle3 config)")


def checkpoint_names(run_dir) -> list[str]:
    """A run's complete checkpoints (a `.tmp` one was interrupted while being written), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and "." not in p.name and (p / WEIGHTS_NAME).exists())


BEST_FILE = "best.json"


def best_checkpoint(run_dir) -> dict | None:
    """The run's best checkpoint by τ, as training recorded it ({"checkpoint", "step", "tau"}), if it
    still exists."""
    path = Path(run_dir) / "checkpoints" / BEST_FILE
    if not path.exists():
        return None
    best = json.loads(path.read_text())
    return best if best.get("checkpoint") in checkpoint_names(run_dir) else None


def choose_checkpoint(run_dir, which: str = "last", min_prompts: int = 8) -> tuple[str, str]:
    """Which checkpoint to export, and why: `last` (the newest complete one), `best` (the best by τ that
    training recorded, when it was measured on at least `min_prompts` prompts; else the last, saying so),
    or a checkpoint's name."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir} is not a run directory: no such directory")
    names = checkpoint_names(run_dir)
    if not names:
        raise ExportError(f"no complete checkpoint under {run_dir / 'checkpoints'}")
    if which not in ("best", "last"):
        if which not in names:
            raise ExportError(f"no complete checkpoint {which!r} under {run_dir / 'checkpoints'}; found {names}")
        return which, "as asked"
    if which == "best":
        best = best_checkpoint(run_dir)
        if best is None:
            return names[-1], "the last step: no best by τ was recorded (training.eval.every unset?)"
        prompts = int(best.get("prompts", 0))
        if prompts < min_prompts:
            return names[-1], (f"the last step: the best τ ({best['tau']:.3f} at step {best['step']}) was measured on "
                               f"{prompts} prompts, fewer than the {min_prompts} a choice by τ needs")
        return best["checkpoint"], f"the best τ, {best['tau']:.3f} over {prompts} prompts"
    return names[-1], "the last step"


CARD_NAME = "README.md"
METADATA_NAME = "eagle_online.json"
# How the README's serving section launches each architecture (None: no engine serves it).
SERVE_METHOD = {ARCHITECTURE: ("EAGLE3", "eagle3"), EAGLE: ("EAGLE", "eagle"), MLP: None}


def serve_commands(target: str, draft_dir, architecture: str) -> dict[str, str]:
    """The SGLang and vLLM commands that serve `draft_dir` beside `target` (the README's, with the names
    filled in); empty for a head no engine serves (the MLP baseline)."""
    method = SERVE_METHOD.get(architecture)
    if method is None:
        return {}
    algorithm, vllm_method = method
    draft = str(draft_dir)
    spec = json.dumps({"method": vllm_method, "model": draft, "num_speculative_tokens": 3})
    return {
        "vllm": f"vllm serve {target} --speculative-config '{spec}'",
        "sglang": f"python -m sglang.launch_server --model-path {target} --speculative-algorithm {algorithm} "
                  f"--speculative-draft-model-path {draft} --speculative-num-steps 5 --speculative-eagle-topk 8 "
                  "--speculative-num-draft-tokens 32 --dtype bfloat16",
    }


def serving_target(model: str) -> str:
    """The target as an engine is given it: a hub name as it is, `builtin:NAME` as its local directory."""
    from eagle_online.recipe import RecipeError, resolve_asset

    try:
        return resolve_asset(model)
    except RecipeError:
        return model


def _read_json(path: Path) -> dict:
    """A run's own record, or {} when it is missing or unreadable (an export never fails for its card)."""
    try:
        value = json.loads(path.read_text())
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def card_metadata(run_dir, checkpoint: str, why: str, out: Path, config) -> dict:
    """What an export is, for programs (eagle_online.json) and people (README.md): target, draft, the
    checkpoint and why it was taken, τ and its floors, data, recipe, date and serve commands. Built from
    the run directory's records; what a record lacks is left out."""
    import time

    import yaml

    from eagle_online.metrics import read_metrics, tau_figures

    run_dir = Path(run_dir)
    try:
        recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        recipe = {}
    info = _read_json(run_dir / "run_info.json")
    state = _read_json(run_dir / "checkpoints" / checkpoint / "trainer_state.json")
    stats = _read_json(run_dir / "data_stats.json").get("total", {})
    rows = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    step = state.get("step") or (int(checkpoint.rsplit("_", 1)[-1]) if checkpoint.rsplit("_", 1)[-1].isdigit()
                                 else None)
    target_cfg, ev, train = recipe.get("target", {}), recipe.get("eval", {}), recipe.get("training", {})
    architecture = architecture_of(config)
    model = target_cfg.get("model")
    tau = tau_figures(rows)
    at_step = next((r for r in rows if r.get("step") == step and "loss" in r), None)
    meta: dict = {
        "what": f"{architecture} speculative-decoding draft head, trained online by eagle_online",
        "architecture": architecture,
        "target": {k: v for k, v in {
            "model": model, "revision": info.get("target_revision"), "num_layers": info.get("target_num_layers"),
            "parameters": info.get("target_parameters"), "aux_layer_ids": info.get("aux_layer_ids"),
            "vocab_size": getattr(config, "vocab_size", None)}.items() if v is not None},
        "draft": {k: v for k, v in {
            "hidden_size": getattr(config, "hidden_size", None),
            "draft_vocab_size": getattr(config, "draft_vocab_size", None),
            "ttt_length": recipe.get("draft", {}).get("ttt_length") if architecture == ARCHITECTURE else None,
        }.items() if v is not None},
        "checkpoint": {"name": checkpoint, "step": step, "total_steps": state.get("total_steps"), "why": why},
        "tau": {
            "at_checkpoint": next((r["eval_tau"] for r in rows if r.get("step") == step and "eval_tau" in r), None),
            "last": tau["last"], "best": tau["best"],
            "untrained": tau.get("untrained"), "bigram": tau.get("bigram"),
            "at_temperatures": tau.get("at_temperatures"),
            "temperature": ev.get("temperature"), "num_draft_tokens": ev.get("num_draft_tokens"),
            "prompts": ev.get("prompts"),
        },
        "train_metrics": {k: v for k, v in (at_step or {}).items()
                          if k == "loss" or k.startswith("acc_") or k == "tau_hat"},
        "data": {"sources": [{k: v for k, v in src.items() if k in ("path", "split", "max_rows", "skip_rows", "weight")}
                             for src in recipe.get("data", {}).get("sources", [])],
                 **{k: stats[k] for k in ("rows_used", "sequences", "tokens", "trained_fraction") if k in stats}},
        "recipe": {"name": recipe.get("run", {}).get("name"), "lr": train.get("lr"), "schedule": train.get("schedule"),
                   "epochs": train.get("epochs"), "max_steps": train.get("max_steps"),
                   "tokens_per_batch": recipe.get("data", {}).get("tokens_per_batch"),
                   "gradient_accumulation_steps": train.get("gradient_accumulation_steps"),
                   "max_length": recipe.get("data", {}).get("max_length")},
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "serve": serve_commands(serving_target(model), out, architecture) if model else {},
    }
    return meta


def _fmt(value, spec: str = ".3f") -> str:
    return "?" if value is None else format(value, spec)


def card_text(meta: dict) -> str:
    """The export's README.md: the model card a person reads, from card_metadata's figures."""
    target, draft, ck, tau = meta["target"], meta["draft"], meta["checkpoint"], meta["tau"]
    model = target.get("model", "(unknown target)")
    revision = f" (revision `{target['revision']}`)" if target.get("revision") else ""
    lines = [f"# {meta['architecture']} draft for {model}", "",
             f"A speculative-decoding draft head trained online by eagle_online against the frozen target "
             f"`{model}`{revision}. It is served beside that target (commands below); it is not a model on its own.",
             "", "| | |", "|---|---|"]
    target_bits = [f"`{model}`{revision}"]
    if "num_layers" in target:
        target_bits.append(f"{target['num_layers']} layers")
    if "parameters" in target:
        target_bits.append(f"{target['parameters'] / 1e6:,.1f}M parameters")
    if target.get("aux_layer_ids"):
        target_bits.append(f"features from layers {target['aux_layer_ids']}")
    lines.append("| target | " + ", ".join(target_bits) + " |")
    draft_bits = [meta["architecture"]]
    if "hidden_size" in draft:
        draft_bits.append(f"hidden {draft['hidden_size']}")
    if "draft_vocab_size" in draft:
        of_vocab = f" of {target['vocab_size']:,}" if isinstance(target.get("vocab_size"), int) else ""
        draft_bits.append(f"draft vocabulary {draft['draft_vocab_size']:,}{of_vocab} tokens")
    if "ttt_length" in draft:
        draft_bits.append(f"TTT {draft['ttt_length']}")
    lines.append("| draft | " + ", ".join(draft_bits) + " |")
    of = f" of {ck['total_steps']}" if ck.get("total_steps") else ""
    lines.append(f"| checkpoint | `{ck['name']}`: step {ck.get('step')}{of}; taken because: {ck['why']} |")
    lines.append("| τ | " + tau_line(tau) + " |")
    tm = meta.get("train_metrics") or {}
    accs = [tm[f"acc_{k}"] for k in range(len(tm)) if f"acc_{k}" in tm]
    if accs:
        lines.append(f"| training accuracy per TTT step | {' '.join(f'{a:.3f}' for a in accs)} (loss "
                     f"{_fmt(tm.get('loss'))}, at this step) |")
    data = meta["data"]
    sources = ", ".join(f"`{s['path']}`" + (f" (max_rows {s['max_rows']})" if s.get("max_rows") else "")
                        for s in data.get("sources", [])) or "?"
    counts = ""
    if "tokens" in data:
        counts = f": {data.get('sequences', '?'):,} sequences, {data['tokens']:,} tokens"
        if "trained_fraction" in data:
            counts += f" ({data['trained_fraction']:.1%} of them trained: assistant turns)"
    lines.append(f"| data | {sources}{counts} |")
    r = meta["recipe"]
    if r.get("name"):
        length = f"{r['max_steps']} steps" if r.get("max_steps") else f"{r.get('epochs')} epoch(s)"
        lines.append(f"| recipe | `{r['name']}`: lr {r.get('lr')} ({r.get('schedule')}), {length}, "
                     f"{r.get('tokens_per_batch')} tokens per micro-batch × {r.get('gradient_accumulation_steps')} "
                     f"accumulation, max length {r.get('max_length')} |")
    lines.append(f"| exported | {meta['exported_at']} |")
    table = tau_table(meta["tau"])
    if table:
        lines += ["", "τ at the last evaluation beside its floors, on the same prompts:", "", "```", *table, "```"]
    lines += ["", "## Serving", ""]
    if meta["serve"]:
        for engine, label in (("vllm", "vLLM"), ("sglang", "SGLang")):
            lines += [f"{label}:", "", "```bash", meta["serve"][engine], "```", ""]
        lines.append("The paths are where the export was written; use this folder's path if it moved.")
    elif SERVE_METHOD.get(meta["architecture"]) is None:
        lines.append("No engine serves this head (the MLP baseline): measure it with `launch/eval.py`.")
    else:
        lines.append("The run directory records no target (no recipe.yaml): serve it beside the target it was "
                     "trained against, with `--speculative-draft-model-path` (SGLang) or the `--speculative-config` "
                     "`model` (vLLM) naming this folder.")
    lines += ["", "## Files", "",
              f"`{CONFIG_NAME}` and `{WEIGHTS_NAME}` are what the engines read; `{METADATA_NAME}` holds this "
              "card's figures for programs.", ""]
    return "\n".join(lines)


def tau_line(tau: dict) -> str:
    """τ of the draft beside the floors the run measured, in one line (the card and the run's summary)."""
    settings = [f"T={tau['temperature']}" if tau.get("temperature") is not None else None,
                f"k={tau['num_draft_tokens']}" if tau.get("num_draft_tokens") is not None else None]
    last, best = tau.get("last"), tau.get("best")
    if last is None:
        text = "not measured (eval.every unset)"
    else:
        text = f"last {last['tau']:.3f} at step {last['step']}, best {best['tau']:.3f} at step {best['step']}"
        if tau.get("at_checkpoint") is not None:
            text = f"{tau['at_checkpoint']:.3f} at this checkpoint; " + text
        settings.append(f"{last['prompts']} prompts" if last.get("prompts") else None)
    floors = [f"{name} {tau[name]:.3f}" for name in ("untrained", "bigram") if tau.get(name) is not None]
    if floors:
        text += "; floors: " + ", ".join(floors)
    settings = [s for s in settings if s]
    return text + (f" ({', '.join(settings)})" if settings and last is not None else "")


def tau_table(tau: dict) -> list[str]:
    """With eval.final_temperatures: τ of the draft at the last evaluation beside its floors, one column
    per temperature, and whether the draft beats both floors at each; [] without them."""
    extra = tau.get("at_temperatures") or {}
    last = tau.get("last")
    if not extra or last is None or tau.get("temperature") is None:
        return []
    columns = {f"T{tau['temperature']:g}": {"draft": last["tau"], "untrained": tau.get("untrained"),
                                            "bigram": tau.get("bigram")}}
    columns.update((t, v) for t, v in extra.items() if t not in columns)
    lines = ["".ljust(12) + "".join(f"{'T=' + t[1:]:>9}" for t in columns)]
    for who in ("draft", "bigram", "untrained"):
        cells = [columns[t].get(who) for t in columns]
        lines.append(f"{who:<12}" + "".join(f"{'-' if v is None else format(v, '.3f'):>9}" for v in cells))
    losses = [f"the {who} at T={t[1:]} ({c[who]:.3f} ≥ {c['draft']:.3f})" for t, c in columns.items()
              for who in ("bigram", "untrained") if c.get(who) is not None and c.get("draft") is not None
              and c[who] >= c["draft"]]
    measured = all(c.get("draft") is not None for c in columns.values())
    lines.append("the draft does not beat " + ", ".join(losses) if losses else
                 "the draft beats both floors at every temperature" if measured else
                 "the draft was not measured at every temperature (the run stopped before its last step)")
    return lines


def export_run(run_dir, checkpoint: str | None = None, out=None, why: str | None = None) -> Path:
    """Export a training run's checkpoint to `out` (default: RUN_DIR/export): `checkpoint` is a name, `best`
    or `last` (the default), as choose_checkpoint picks them. The export's card (README.md, eagle_online.json)
    says why that checkpoint was taken: `why`, or choose_checkpoint's reason.

    The run directory holds draft_config.json (the head's config), run_info.json
    ({"aux_layer_ids", "target_num_layers"}) and checkpoints/<name>/model.safetensors (the head's
    state_dict); a checkpoint with a manifest is checked against it first."""
    run_dir = Path(run_dir)
    for name in ("draft_config.json", "run_info.json"):
        if not (run_dir / name).exists():
            raise ExportError(f"{run_dir} is not a run directory: no {name}")
    checkpoint, chosen_because = choose_checkpoint(run_dir, checkpoint or "last")
    why = why or chosen_because
    where = run_dir / "checkpoints" / checkpoint
    damaged = damage(where) if (where / MANIFEST).exists() else None
    if damaged is not None:
        raise ExportError(f"checkpoint {where} is damaged ({damaged}): export another one with --checkpoint "
                          f"(complete ones: {checkpoint_names(run_dir)})")
    try:
        tensors = load_file(str(where / WEIGHTS_NAME))
    except Exception as e:  # noqa: BLE001 - safetensors' errors name no file
        raise ExportError(f"{where / WEIGHTS_NAME} cannot be read ({e}): export another checkpoint with "
                          f"--checkpoint (complete ones: {checkpoint_names(run_dir)})") from None
    config = LlamaConfig.from_json_file(str(run_dir / "draft_config.json"))
    info = json.loads((run_dir / "run_info.json").read_text())
    architecture = architecture_of(config)
    if architecture == ARCHITECTURE:
        head = head_from_tensors(config, tensors)
    else:
        head = _load_state(HEADS[architecture].head(config), tensors, tensors[EMBED_NAME].dtype)
    out = Path(out if out is not None else run_dir / "export").resolve()
    meta = card_metadata(run_dir, checkpoint, why, out, config)
    card = {CARD_NAME: card_text(meta), METADATA_NAME: json.dumps(meta, indent=2) + "\n"}
    return export_head(head, out, info["aux_layer_ids"], info["target_num_layers"], card)
