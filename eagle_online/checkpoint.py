"""Trainer checkpoints written and read back as data only, the run directory's lock, and what a
checkpoint must agree on with the run that resumes from it.

A checkpoint (`checkpoints/step_N/`) holds:

  model.safetensors              the head's state_dict (what export reads)
  optimizer.safetensors          the optimizer's per-parameter tensors, as `state.<param>.<name>`
  optimizer.json                 its param_groups and any per-parameter entries that are not tensors
  scheduler.json                 the LR scheduler's state_dict
  rng_state_<rank>.safetensors   each rank's torch (CPU, CUDA) and numpy RNG; Python's in its metadata
  trainer_state.json             step, total steps, processes, and the fingerprint of the recipe and data
  manifest.json                  written last: every file and its size

Why not accelerate's save_state/load_state: load_state unpickles `custom_checkpoint_*.pkl` and the RNG
files with `torch.load(weights_only=False)`, so a file planted in a run directory (they live on shared
filesystems and are copied between machines) runs code on resume. Everything here is safetensors or JSON.

The manifest is what makes a checkpoint whole: the directory is filled under a `.tmp` name, the manifest
is written last and the directory renamed, and a resume checks every listed file's size before trusting
it (a truncated file, a full disk, a copy that stopped half way), falling back to an older intact one.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import random
import socket
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from eagle_online.errors import UserError
from eagle_online.layout import ExportError

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
SCHEDULER = "scheduler.json"
TRAINER_STATE = "trainer_state.json"
REQUIRED = (WEIGHTS, OPTIMIZER_TENSORS, OPTIMIZER_JSON, SCHEDULER, TRAINER_STATE)
LOCK_NAME = ".lock"

# Recipe fields that cannot change the trained weights: they may differ between a checkpoint's run and
# the run resuming it. A prefix ending in "." covers a whole section.
NOT_RESULT_KEYS = (
    "run.name", "run.output_dir", "training.log_every", "training.checkpoint_every", "training.keep_checkpoints",
    "training.resume", "training.overwrite", "training.extend", "training.export_at_end",
    "training.export_checkpoint", "training.progress_bar", "training.trackers", "training.optimizer_sharding",
    "target.zero3.",
    "eval.", "regenerate.",
)
# What `training.extend=true` lets a resumed run change.
EXTEND_KEYS = ("training.max_steps", "training.epochs")


class CheckpointError(UserError):
    """A run directory or checkpoint that cannot be used as asked; the message names it and the way out."""


def rng_name(rank: int) -> str:
    return f"rng_state_{rank}.safetensors"


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


# ------------------------------------------------------------------------------------ the state
def save_optimizer(state: dict, directory: Path) -> None:
    """An optimizer state_dict as safetensors (its tensors) plus JSON (param_groups, other entries)."""
    tensors, others = {}, {}
    for param, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param}.{name}"] = value.detach().cpu().contiguous()
            else:
                others.setdefault(str(param), {})[name] = value
    save_file(tensors, str(directory / OPTIMIZER_TENSORS))
    write_json(directory / OPTIMIZER_JSON, {"param_groups": state["param_groups"], "state": others})


def load_optimizer(directory: Path) -> dict:
    """The state_dict save_optimizer wrote (tuples, which JSON keeps as lists, become tuples again)."""
    meta = json.loads((directory / OPTIMIZER_JSON).read_text())
    state: dict[int, dict] = {}
    for key, tensor in load_file(str(directory / OPTIMIZER_TENSORS)).items():
        _, param, name = key.split(".", 2)
        state.setdefault(int(param), {})[name] = tensor
    for param, entries in meta["state"].items():
        state.setdefault(int(param), {}).update(entries)
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
              for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_rng(path: Path) -> None:
    """This process's RNG states: torch CPU and every CUDA device, numpy's and Python's."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, py_gauss = random.getstate()
    metadata = {"numpy": json.dumps([kind, int(pos), int(has_gauss), float(gauss)]),
                "python": json.dumps([version, list(internal), py_gauss])}
    save_file(tensors, str(path), metadata=metadata)


def load_rng(path: Path) -> None:
    """Restore what save_rng wrote."""
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    kind, pos, has_gauss, gauss = json.loads(metadata["numpy"])
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, py_gauss = json.loads(metadata["python"])
    random.setstate((version, tuple(internal), py_gauss))


def write_manifest(directory: Path, step: int) -> None:
    """Written last: every file of the checkpoint and its size."""
    files = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    write_json(directory / MANIFEST, {"step": step, "files": files})


def damage(directory: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (missing, truncated or unreadable files), or None."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return f"no {MANIFEST} (it is written last: the checkpoint was never finished, or is from an older version)"
    try:
        files = json.loads(manifest.read_text())["files"]
        files = {str(name): int(size) for name, size in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is unreadable"
    for name in REQUIRED:
        if name not in files:
            return f"{MANIFEST} does not list {name}"
    for name, size in files.items():
        path = directory / name
        if Path(name).name != name or not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes where {size} were written (truncated?)"
        try:
            if name.endswith(".safetensors"):
                with safe_open(str(path), "pt"):
                    pass
            elif name.endswith(".json"):
                json.loads(path.read_text())
        except Exception as e:  # noqa: BLE001 - any reader's complaint means the file is unusable
            return f"{name} cannot be read ({e})"
    return None


def disk_full(error: BaseException) -> bool:
    """Whether a write failed for lack of space (torch reports it as `unexpected pos`)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return "No space left" in text or "unexpected pos" in text or "Disk quota" in text


# -------------------------------------------------------------------------------- fingerprints
def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested recipe as `dotted.key: value` (list items by index: data.sources.0.path)."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list) and any(isinstance(v, (dict, list)) for v in tree):
        items = enumerate(tree)
    else:
        return {prefix[:-1]: tree}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}{key}."))
    return out


def recipe_fingerprint(recipe) -> dict[str, Any]:
    """The resolved recipe's fields that can change the trained weights, flat."""
    flat = flatten(recipe.model_dump(mode="json"))
    return {k: v for k, v in flat.items() if not _ignored(k, NOT_RESULT_KEYS)}


def _ignored(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in prefixes)


def differing_keys(saved: dict[str, Any], now: dict[str, Any], allow: tuple[str, ...] = ()) -> list[str]:
    """`key: checkpoint's value -> this recipe's` for every result-changing field that differs."""
    out = []
    for key in sorted(set(saved) | set(now)):
        if _ignored(key, NOT_RESULT_KEYS + allow):
            continue
        if saved.get(key, "(absent)") != now.get(key, "(absent)"):
            out.append(f"{key}: {saved.get(key, '(absent)')!r} -> {now.get(key, '(absent)')!r}")
    return out


def data_fingerprint(examples) -> dict[str, Any]:
    """The prepared token stream's identity: a hash of every sequence's ids and loss mask, in order."""
    h = hashlib.sha256()
    tokens = 0
    for ex in examples:
        h.update(len(ex.input_ids).to_bytes(8, "little"))
        h.update(ex.input_ids.tobytes())
        h.update(np.asarray(ex.loss_mask).tobytes())
        tokens += len(ex.input_ids)
    return {"sha256": h.hexdigest(), "sequences": len(examples), "tokens": tokens}


# ------------------------------------------------------------------------------------ the lock
def lock_run_dir(run_dir: Path) -> IO[bytes]:
    """Take `run_dir/.lock` (flock, released by the kernel when the process dies, so a crashed run never
    leaves a stale lock); returns the open file, which holds the lock until it is closed (or collected).
    A second run on the same directory fails at once, naming the holder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    f = open(path, "a+b")  # noqa: SIM115 - kept open for the run: it is the lock
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(f.fileno(), 200, 0).decode(errors="replace").strip() or "another process"
        f.close()
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise CheckpointError(f"run directory {run_dir} is in use by {holder} (it holds {path}): wait for that "
                              "run to finish, or give this one another run.output_dir") from None
    os.ftruncate(f.fileno(), 0)
    os.pwrite(f.fileno(), f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
    return f


# ---------------------------------------------------------------- a run's checkpoints by name
CHECKPOINT_PREFIX = "step_"


def checkpoint_names(run_dir) -> list[str]:
    """A run's complete checkpoints (a `.tmp` one was interrupted while being written), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and "." not in p.name and (p / WEIGHTS).exists())


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
