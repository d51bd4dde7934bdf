"""Draft checkpoints in the layouts SGLang and vLLM serve, and loading such checkpoints back.

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
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig

from eagle_online.checkpoint import MANIFEST, checkpoint_names, choose_checkpoint, damage, disk_full
from eagle_online.engines import engine_warnings
from eagle_online.errors import RecipeError
from eagle_online.heads import HEADS, DraftHead, architecture_of
from eagle_online.layout import CONFIG_NAME, SPECULATORS_SUFFIX, WEIGHTS_NAME, ExportError, Verifier
from eagle_online.metrics import read_metrics, tau_figures
from eagle_online.recipe import resolve_asset


def export_head(head: DraftHead, out_dir, aux_layer_ids: list[int] | None = None,
                target_num_layers: int | None = None, extra_files: Mapping[str, str] | None = None, *,
                speculators: Verifier | None = None) -> Path:
    """Write a directory the engines load: the head's serving layout (`serving_layout`: config.json and
    model.safetensors with the serving names; the layer ids matter to EAGLE-3 only), or with `speculators`
    (the target it names) vLLM's speculators format (`speculators_layout`, EAGLE-3 only).

    Everything is checked first (ExportError names the offending tensor), written into a temporary
    sibling directory, and renamed into place; an existing export is replaced only once the new one is
    complete, and nothing half-written is left behind on error. `extra_files` (name → text: the card) are
    written beside them, in the same temporary directory."""
    return _write_export(out_dir, *_layout(head, aux_layer_ids, target_num_layers, speculators), extra_files)


def _layout(head: DraftHead, aux_layer_ids, target_num_layers, speculators: Verifier | None
            ) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config.json dict and tensors of one export, checked: the head's serving layout, or vLLM's
    speculators format naming `speculators`' target."""
    if speculators is not None:
        return head.speculators_layout(aux_layer_ids, target_num_layers, speculators)
    return head.serving_layout(aux_layer_ids, target_num_layers)


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
        served = {n for spec in HEADS.values() for n in spec.head.served_names()}
        return any(name in served for name in names)
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


def _read_config(path: Path) -> dict:
    if not (path / CONFIG_NAME).exists():
        raise ExportError(f"no {CONFIG_NAME} in {path}")
    try:
        return json.loads((path / CONFIG_NAME).read_text())
    except ValueError as e:
        raise ExportError(f"{path / CONFIG_NAME}: not valid JSON: {e}") from None


def load_draft(path, embed_weight: torch.Tensor | None = None, lm_head_weight: torch.Tensor | None = None
               ) -> DraftHead:
    """Load any draft directory this project reads, choosing the head by its config.json (`reads`):
    EAGLE-3 in our, the official, SpecForge's or vLLM speculators' layout; EAGLE-1/2; or the MLP
    baseline. The target's embedding and lm_head fill in what the checkpoint leaves out."""
    path = Path(path)
    raw = _read_config(path)
    for spec in HEADS.values():
        if spec.head.reads(raw):
            return spec.head.from_layout(raw, read_tensors(path), path / CONFIG_NAME, embed_weight, lm_head_weight)
    raise ExportError(f"{path / CONFIG_NAME} has architectures {raw.get('architectures') or []}: not a draft this "
                      f"project reads (known: {sorted(HEADS)}, or a speculators eagle3 config)")


CARD_NAME = "README.md"
METADATA_NAME = "eagle_online.json"


def _serve_method(architecture: str) -> tuple[str | None, str] | None:
    """How the engines are told to run a head (its SERVE_METHOD), None when none serves it."""
    return HEADS[architecture].head.SERVE_METHOD if architecture in HEADS else None


def speculators_dir(out) -> Path:
    """Where export.format=both writes the speculators copy: beside the export, DIR_speculators."""
    out = Path(out)
    return out.with_name(out.name + SPECULATORS_SUFFIX)


def serve_commands(target: str, draft_dir, architecture: str, fmt: str = "eagle3",
                   num_speculative_tokens: int = 3) -> dict[str, str]:
    """The SGLang and vLLM commands that serve `draft_dir` beside `target` (the README's, with the names
    filled in); empty for a head no engine serves (the MLP baseline), vLLM's alone for a head SGLang does
    not serve (SERVE_METHOD's SGLang side None: the MLP speculator, given its n_predict as
    `num_speculative_tokens`, since vLLM builds that many stages). `fmt` is export.format: a
    speculators export is served by vLLM alone, `vllm serve DIR` (it names its target); with `both` the
    speculators copy's command is `vllm_speculators`."""
    method = _serve_method(architecture)
    if method is None:
        return {}
    if fmt == "speculators":
        return {"vllm": f"vllm serve {draft_dir}"}
    algorithm, vllm_method = method
    draft = str(draft_dir)
    spec = json.dumps({"method": vllm_method, "model": draft, "num_speculative_tokens": num_speculative_tokens})
    commands = {"vllm": f"vllm serve {target} --speculative-config '{spec}'"}
    if algorithm is not None:  # None: SGLang does not serve the head (the MLP speculator)
        commands["sglang"] = (f"python -m sglang.launch_server --model-path {target} --speculative-algorithm "
                              f"{algorithm} --speculative-draft-model-path {draft} --speculative-num-steps 5 "
                              "--speculative-eagle-topk 8 --speculative-num-draft-tokens 32 --dtype bfloat16")
    if fmt == "both":
        commands["vllm_speculators"] = f"vllm serve {speculators_dir(draft_dir)}"
    return commands


def serving_target(model: str) -> str:
    """The target as an engine is given it: a hub name as it is, `builtin:NAME` as its local directory."""
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


def _run_recipe(run_dir: Path) -> dict:
    """The run's resolved recipe.yaml as a plain mapping ({} when it cannot be read)."""
    import yaml

    try:
        return yaml.safe_load((run_dir / "recipe.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def run_format(run_dir, fmt: str | None = None) -> str:
    """The export format: `fmt` when given, else the run's recipe's export.format (eagle3 by default)."""
    return fmt or _run_recipe(Path(run_dir)).get("export", {}).get("format", "eagle3")


def card_metadata(run_dir, checkpoint: str, why: str, out: Path, config, fmt: str = "eagle3") -> dict:
    """What an export is, for programs (eagle_online.json) and people (README.md): target, draft, the
    checkpoint and why it was taken, τ and its floors, data, recipe, date, layout (`fmt`: eagle3 or
    speculators) and serve commands. Built from the run directory's records; what a record lacks is left out."""
    import time

    run_dir = Path(run_dir)
    recipe = _run_recipe(run_dir)
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
            **{key: recipe.get("draft", {}).get(key) for key in ("loss", *HEADS[architecture].head.SHOWN_SETTINGS)},
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
        "format": fmt,
        "serve": serve_commands(serving_target(model), out, architecture, fmt,
                                getattr(config, "n_predict", None) or 3) if model else {},
    }
    return meta


def _fmt(value, spec: str = ".3f") -> str:
    return "?" if value is None else format(value, spec)


_CARD_LABELS = {"ttt_length": "TTT", "loss": "loss"}


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
    for key, value in draft.items():  # the loss and the head's SHOWN_SETTINGS (TTT length, n_predict)
        if key not in ("hidden_size", "draft_vocab_size"):
            draft_bits.append(f"{_CARD_LABELS.get(key, key)} {value}")
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
    if meta.get("format") == "speculators":
        lines += ["This folder is in vLLM's speculators format: its config.json names the target, so vLLM serves it "
                  "alone (SGLang reads the eagle3 layout: export with `--format eagle3`).", ""]
    if meta["serve"]:
        for engine, label in (("vllm", "vLLM"), ("sglang", "SGLang"), ("vllm_speculators", "vLLM, the speculators "
                                                                       "copy beside this folder")):
            if engine in meta["serve"]:
                lines += [f"{label}:", "", "```bash", meta["serve"][engine], "```", ""]
        lines.append("The paths are where the export was written; use this folder's path if it moved.")
    elif _serve_method(meta["architecture"]) is None:
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


def export_run(run_dir, checkpoint: str | None = None, out=None, why: str | None = None,
               fmt: str | None = None) -> Path:
    """Export a training run's checkpoint to `out` (default: RUN_DIR/export): `checkpoint` is a name, `best`
    or `last` (the default), as choose_checkpoint picks them. The export's card (README.md, eagle_online.json)
    says why that checkpoint was taken: `why`, or choose_checkpoint's reason. `fmt` (default: the recipe's
    export.format) is `eagle3`, `speculators` (naming the recipe's target as the verifier), or `both`: the
    first in `out`, the second in speculators_dir(out). Returns `out`.

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
    head = HEADS[architecture_of(config)].head.from_checkpoint(config, tensors)
    out = Path(out if out is not None else run_dir / "export").resolve()
    recipe = _run_recipe(run_dir)
    fmt = run_format(run_dir, fmt)
    verifier = None
    if fmt != "eagle3":
        model = recipe.get("target", {}).get("model")
        if not model:
            raise ExportError(f"{run_dir / 'recipe.yaml'} names no target.model: the speculators format names its "
                              "target; export with --format eagle3")
        verifier = Verifier(serving_target(model), tuple(info.get("target_architectures", ())),
                            recipe.get("export", {}).get("speculative_tokens", 3))
    dirs = {"eagle3": [(out, None)], "speculators": [(out, verifier)],
            "both": [(out, None), (speculators_dir(out), verifier)]}[fmt]
    # every layout is built and checked before anything is written
    layouts = [(where, speculators, _layout(head, info["aux_layer_ids"], info["target_num_layers"], speculators))
               for where, speculators in dirs]
    for where, speculators, (layout_config, tensors) in layouts:
        meta = card_metadata(run_dir, checkpoint, why, where, config, "speculators" if speculators else
                             ("both" if fmt == "both" else "eagle3"))
        card = {CARD_NAME: card_text(meta), METADATA_NAME: json.dumps(meta, indent=2) + "\n"}
        _write_export(where, layout_config, tensors, card)
    for line in export_warnings(run_dir, fmt):
        print(f"warning: {line}", flush=True)
    return out


def export_warnings(run_dir, fmt: str = "eagle3") -> list[str]:
    """What the export of `run_dir` in layout `fmt` should warn about: engines not known to serve its head
    for its target's family (engines.py: engine_warnings, from run_info.json's target_architectures)."""
    run_dir = Path(run_dir)
    config = LlamaConfig.from_json_file(str(run_dir / "draft_config.json"))
    method = _serve_method(architecture_of(config))
    info = _read_json(run_dir / "run_info.json")
    return engine_warnings(info.get("target_architectures"), method[1] if method else None, fmt)
