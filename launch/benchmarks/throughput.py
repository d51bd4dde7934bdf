"""Throughput of the online training step: tokens/s, the step split into its phases, each phase
alone, the pipeline's own overhead, and peak memory.

    python launch/bench.py throughput --recipe tiny_eagle3 --out bench.json
    python launch/bench.py throughput --recipe llama3_eagle3 --target llama3_8b --tokens 16384 --out h100.json

It runs the trainer's own step (`Trainer.train_step`, with the trainer's data, target, head and
optimizer built by `Trainer.setup`), not a copy: warm-up steps, then timed steps three ways:
  whole   steps as training runs them (no synchronisation inside the step): tokens/s and step time;
  split   the same steps with the device synchronised around each phase: the step's split into
          data, target, teacher, head_forward, head_backward, optimizer;
  alone   each phase's method run by itself on the same micro-batches, repeated;
so pipeline_overhead = whole step / sum of the phases alone − 1.

`--target recipe` (the default) loads the recipe's target as training does (the tiny recipe's is
shipped, so nothing is downloaded). A preset (`llama3_8b`, `qwen3_8b`, `llama3_70b`, the mixtures of
experts `qwen3_30b_a3b` and `gpt_oss_20b`, `random_tiny`, `random_tiny_moe`) builds that architecture
from its config with random weights on the device, so no download is needed; its data are synthetic
conversations, and its lm_head rows outside the draft vocab are zeroed so that every teacher argmax is
a draft token (a trained target: most are) and the head trains on every trained position, as it
would on real data.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from eagle_online.data import PreparedData, TokenizedConversation
from eagle_online.plan import PUBLISHED_CONFIGS
from eagle_online.recipe import Recipe, load_recipe
from eagle_online.timing import PHASES, StepTimer, peak_memory_bytes, reset_peak_memory, synchronize

_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_LLAMA3 = dict(model_type="llama", num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
               rms_norm_eps=1e-5, rope_parameters=_LLAMA3_ROPE)


def _published(name: str, **extra) -> dict:
    """The config values eagle_online.plan counts for hub model `name`, plus what only the forward reads."""
    return dict({k: v for k, v in PUBLISHED_CONFIGS[name].items() if k != "tie_word_embeddings"}, **extra)


# Architectures from their published configs (random weights are built from these, never downloaded).
PRESETS: dict[str, dict] = {
    "llama3_8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32),
    "llama3_70b": dict(_LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64),
    "qwen3_8b": dict(
        model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default",
                                                                           "rope_theta": 1000000.0},
    ),
    # Mixtures of experts, built by Qwen3MoeConfig and GptOssConfig (gpt-oss: yarn RoPE, alternating
    # 128-token windows and full layers, sinks, as those defaults build it). Qwen3-30B-A3B in bf16 is 61 GB,
    # more than one 80 GB GPU holds beside the head's 16k-token activations: bench a slice (--target-layers).
    "qwen3_30b_a3b": _published(
        "Qwen/Qwen3-30B-A3B", max_position_embeddings=40960, rms_norm_eps=1e-6, norm_topk_prob=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "gpt_oss_20b": _published("openai/gpt-oss-20b", sliding_window=128, max_position_embeddings=131072,
                              rms_norm_eps=1e-5),
    # CPU-sized stand-ins with the same code paths (GQA, 8 layers): random_tiny for tests,
    # random_small with a 32k vocabulary, where the draft's logits start to weigh on CPU.
    "random_tiny": dict(
        model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096,
    ),
    # random_tiny_moe: Qwen3-MoE's router and experts (8, 2 per token) at random_tiny's size.
    "random_tiny_moe": dict(
        model_type="qwen3_moe", hidden_size=64, intermediate_size=160, moe_intermediate_size=48, num_experts=8,
        num_experts_per_tok=2, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        vocab_size=1024, max_position_embeddings=4096,
    ),
    "random_small": dict(
        model_type="llama", hidden_size=256, intermediate_size=704, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=32000, max_position_embeddings=8192,
    ),
}


def add_arguments(parser) -> None:
    parser.add_argument("--recipe", default="tiny_eagle3", help="recipe name (recipes/NAME.yaml) or path")
    parser.add_argument("--target", default="recipe", choices=["recipe", *PRESETS],
                        help="the recipe's own target, or a random-weight preset built on the device")
    parser.add_argument("--target-layers", type=int, default=None,
                        help="build a preset with this many layers (a slice of a model too big for one device)")
    parser.add_argument("--tokens", type=int, default=None,
                        help="packed tokens per micro-batch (data.tokens_per_batch)")
    parser.add_argument("--data", default=None, choices=["recipe", "synthetic"],
                        help="the recipe's data (default with --target recipe) or synthetic conversations")
    parser.add_argument("--steps", type=int, default=5, help="timed steps, for each of whole and split")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=1, help="passes over the timed steps running each phase alone")
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides")


def main(args) -> int:
    from eagle_online.recipe import RecipeError

    try:
        result = run(args)
    except (RecipeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(out)
    return 0


def build_preset(name: str, layers: int | None, dtype: torch.dtype, device: torch.device, attn_implementation: str):
    """A random-weight causal LM of a preset's architecture, built directly on `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from eagle_online.target import resolve_attn_implementation

    kwargs = dict(PRESETS[name])
    if layers is not None:
        kwargs["num_hidden_layers"] = layers
    config = AutoConfig.for_model(kwargs.pop("model_type"), tie_word_embeddings=False, use_cache=False, **kwargs)
    attn = resolve_attn_implementation(attn_implementation, device, config)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return model.eval().requires_grad_(False)


def synthetic_data(vocab_size: int, tokens: int, max_length: int, seed: int = 0) -> PreparedData:
    """Conversations of random tokens, lengths uniform in [max_length/8, max_length], each trained
    on its last 70% (roughly a chat's assistant share), `tokens` tokens in all."""
    gen = torch.Generator().manual_seed(seed)
    examples, total = [], 0
    low = max(2, max_length // 8)
    while total < tokens:
        n = int(torch.randint(low, max_length + 1, (1,), generator=gen))
        ids = torch.randint(0, vocab_size, (n,), generator=gen).tolist()
        prompt = int(0.3 * n)
        examples.append(TokenizedConversation(ids, [0] * prompt + [1] * (n - prompt)))
        total += n
    trained = sum(ex.num_trained for ex in examples)
    summary = {"rows_read": len(examples), "rows_used": len(examples), "sequences_per_epoch": len(examples),
               "tokens": total, "trained_fraction": trained / total, "skipped": {}}
    stats = {"sources": {"synthetic": summary}, "total": dict(summary)}  # the shape prepare_data's stats have
    return PreparedData(examples=examples, stats=stats)


def saved_tensor_bytes(fn, exclude=()) -> int:
    """Bytes of the tensors autograd saves for backward while `fn()` runs, each storage counted once,
    the storages of the tensors in `exclude` (parameters, inputs held anyway) not counted."""
    held = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in held:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        res = fn()
    del res
    return sum(seen.values())


class _Bench:
    """A set-up trainer: runs step i exactly as `Trainer.train` does, and each of its phases alone."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.device = trainer.accelerator.device

    def step(self, index: int, timer: StepTimer) -> dict[str, float]:
        with timer.phase("data"):
            batches = self.trainer.micro_batches(index)
        return self.trainer.train_step(batches, timer)

    def timed(self, fn, *args) -> float:
        """Seconds `fn(*args)` takes, the device synchronised before and after."""
        synchronize(self.device)
        start = time.perf_counter()
        fn(*args)
        synchronize(self.device)
        return time.perf_counter() - start

    def head_saved_bytes(self, index: int) -> int:
        """Bytes of activations the head's forward keeps for backward on step `index`'s first micro-batch:
        every tensor autograd saves, each storage counted once, parameters and the target's outputs
        (which the step holds anyway) excluded. Exact and device-independent, so it scales to shapes
        this machine cannot run."""
        tr, acc = self.trainer, self.trainer.accelerator
        batch = tr.to_device(tr.micro_batches(index)[0])
        out = tr.target(batch.input_ids, batch.position_ids)
        with acc.autocast():
            return saved_tensor_bytes(lambda: tr.head_forward(out, batch),
                                      [*tr.head.parameters(), *tr.head.buffers(), *vars(out).values()])

    def phases_alone(self, index: int) -> dict[str, float]:
        """Seconds of each phase of step `index` run by itself, every micro-batch of the step."""
        tr, acc = self.trainer, self.trainer.accelerator
        batches = [tr.to_device(b) for b in tr.micro_batches(index)]
        ga = len(batches)

        def data():
            return [tr.to_device(b) for b in tr.micro_batches(index)]

        def backward(res):
            acc.backward(res.loss / ga)

        seconds = {name: 0.0 for name in PHASES}
        seconds["data"] = self.timed(data)
        for b in batches:
            features = tr.target.features(b.input_ids, b.position_ids)
            seconds["target"] += self.timed(tr.target.features, b.input_ids, b.position_ids)
            out = tr.target.teacher(features)
            seconds["teacher"] += self.timed(tr.target.teacher, features)
            with acc.autocast():
                seconds["head_forward"] += self.timed(tr.head_forward, out, b)
                seconds["head_backward"] += self.timed(backward, tr.head_forward(out, b))
            del features, out
        seconds["optimizer"] = self.timed(tr.optimizer_step)
        return seconds


def _bench_recipe(args, output_dir: str) -> Recipe:
    overrides = list(args.overrides)
    if args.tokens is not None:
        if load_recipe(args.recipe, overrides).data.max_length > args.tokens:
            overrides.append(f"data.max_length={args.tokens}")
        overrides.append(f"data.tokens_per_batch={args.tokens}")
    overrides += [f"run.output_dir={output_dir}", "training.progress_bar=false", "training.resume=false",
                  "training.export_at_end=false", "training.log_every=1000000", "training.max_steps=1000000"]
    return load_recipe(args.recipe, overrides)


def run(args) -> dict:
    """Set up the trainer as the arguments say, run the benchmark, and return its results."""
    from eagle_online.target import resolve_dtype
    from eagle_online.trainer import Trainer

    torch.set_flush_denormal(True)  # trained CPU models otherwise run ~2x slower
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        raise ValueError("--steps and --repeats must be >= 1, --warmup >= 0")
    repeats = args.repeats
    data_kind = args.data or ("recipe" if args.target == "recipe" else "synthetic")
    if args.target != "recipe" and data_kind == "recipe":
        raise ValueError("a preset target has no tokenizer: use --data synthetic")
    with tempfile.TemporaryDirectory(prefix="bench_throughput_") as tmp:
        recipe = _bench_recipe(args, tmp)
        trainer = Trainer(recipe)
        model = data = None
        device = _device()
        if args.target != "recipe":
            dtype = resolve_dtype(recipe.target.dtype, device)
            model = build_preset(args.target, args.target_layers, dtype, device, recipe.target.attn_implementation)
        if data_kind == "synthetic":
            vocab = (model.config.vocab_size if model is not None else _recipe_vocab_size(recipe))
            micro = recipe.training.gradient_accumulation_steps
            need = (args.warmup + args.steps + 1) * micro * recipe.data.tokens_per_batch
            data = synthetic_data(vocab, int(need * 1.25), recipe.data.max_length, recipe.run.seed)
        trainer.setup(target_model=model, data=data)
        if model is not None:
            with torch.no_grad():
                trainer.target.lm_head_weight[~trainer.target.in_draft] = 0
        bench = _Bench(trainer)
        for index in range(args.warmup):
            bench.step(index, StepTimer())
        # The same steps (the same micro-batches) are run whole, split and phase by phase.
        window = range(args.warmup, args.warmup + args.steps)
        reset_peak_memory(device)
        whole, tokens = [], []
        for index in window:
            metrics = {}
            whole.append(bench.timed(lambda: metrics.update(bench.step(index, StepTimer()))))  # noqa: B023
            tokens.append(metrics["tokens"])
        peak = peak_memory_bytes(device)

        split_steps, split_phases = [], {name: [] for name in PHASES}
        for index in window:
            timer = StepTimer(sync=True, device=device)
            split_steps.append(bench.timed(bench.step, index, timer))
            for name in PHASES:
                split_phases[name].append(timer.seconds.get(name, 0.0))
        alone = {name: [] for name in PHASES}
        for _ in range(repeats):
            for index in window:
                for name, seconds in bench.phases_alone(index).items():
                    alone[name].append(seconds)
        alone = {name: statistics.fmean(v) for name, v in alone.items()}
        saved = bench.head_saved_bytes(window[0])
        result = _result(args, recipe, trainer, device, data_kind, whole, tokens, split_steps, split_phases,
                         alone, peak, repeats)
        result["head_saved_bytes"] = saved
        result["head_saved_bytes_per_token"] = saved / trainer.micro_batches(window[0])[0].num_tokens
        trainer.accelerator.end_training()
    return result


def _device() -> torch.device:
    from accelerate import PartialState

    return PartialState().device


def _recipe_vocab_size(recipe: Recipe) -> int:
    from transformers import AutoConfig

    from eagle_online.recipe import resolve_target

    cfg = recipe.target
    config = AutoConfig.from_pretrained(resolve_target(cfg), trust_remote_code=cfg.trust_remote_code)
    return config.get_text_config().vocab_size


def _result(args, recipe, trainer, device, data_kind, whole, tokens, split_steps, split_phases, alone, peak,
            repeats) -> dict:
    import transformers

    target_cfg = trainer.target.config.get_text_config()
    step_s = statistics.fmean(whole)
    phases = {name: statistics.fmean(v) for name, v in split_phases.items()}
    split_s = statistics.fmean(split_steps)
    sum_alone = sum(alone.values())
    return {
        "benchmark": "throughput",
        "config": {
            "recipe": args.recipe,
            "overrides": list(args.overrides),
            "target": args.target if args.target != "recipe" else recipe.target.model,
            "target_layers": target_cfg.num_hidden_layers,
            "target_hidden": target_cfg.hidden_size,
            "target_vocab": target_cfg.vocab_size,
            "target_dtype": str(next(trainer.target.model.parameters()).dtype).removeprefix("torch."),
            "attn_implementation": trainer.target.config._attn_implementation,
            "draft_vocab": recipe.draft.draft_vocab_size,
            "ttt_length": recipe.draft.ttt_length,
            "tokens_per_batch": recipe.data.tokens_per_batch,
            "gradient_accumulation_steps": recipe.training.gradient_accumulation_steps,
            "mixed_precision": trainer.accelerator.mixed_precision,
            "data": data_kind,
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": repeats,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
            or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "flash_attn": _version("flash_attn"),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        },
        "tokens_per_step": statistics.fmean(tokens),
        "tokens_per_s": sum(tokens) / sum(whole),
        "step_s": step_s,
        "step_s_min": min(whole),
        "split_step_s": split_s,
        "phases_s": phases,
        "unaccounted_s": split_s - sum(phases.values()),
        "phases_alone_s": alone,
        "sum_phases_alone_s": sum_alone,
        "pipeline_overhead": step_s / sum_alone - 1 if sum_alone > 0 else math.nan,
        "peak_memory_bytes": peak,
        "peak_memory_kind": "cuda_max_memory_allocated" if device.type == "cuda" else "process_peak_rss",
        "whole_steps_s": whole,
        "split_steps_s": split_steps,
    }


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def format_table(r: dict) -> str:
    """The results as a small text table."""
    c = r["config"]
    lines = [
        f"throughput: {c['target']} ({c['target_layers']} layers, hidden {c['target_hidden']}, {c['target_dtype']}, "
        f"{c['attn_implementation']}) · draft vocab {c['draft_vocab']} · TTT {c['ttt_length']} · "
        f"{r['tokens_per_step']:.0f} tokens/step · {c['device']} ({c['device_name']}, {c['threads']} threads)",
        f"  tokens/s {r['tokens_per_s']:,.0f}   step {r['step_s'] * 1e3:,.1f} ms   "
        f"peak memory {r['peak_memory_bytes'] / 2**30:.2f} GiB ({r['peak_memory_kind']})   "
        f"head activations {r['head_saved_bytes_per_token'] / 1024:.1f} KiB/token",
        f"  {'phase':<15}{'in step (ms)':>14}{'share':>8}{'alone (ms)':>13}",
    ]
    split = r["split_step_s"]
    for name in PHASES:
        ms, alone = r["phases_s"][name] * 1e3, r["phases_alone_s"][name] * 1e3
        lines.append(f"  {name:<15}{ms:>14,.2f}{ms / 1e3 / split:>8.1%}{alone:>13,.2f}")
    lines.append(f"  {'(unaccounted)':<15}{r['unaccounted_s'] * 1e3:>14,.2f}{r['unaccounted_s'] / split:>8.1%}")
    lines.append(f"  {'step':<15}{split * 1e3:>14,.2f}{'':>8}{r['sum_phases_alone_s'] * 1e3:>13,.2f}")
    lines.append(f"  pipeline overhead (whole step / sum of phases alone - 1): {r['pipeline_overhead']:+.1%}")
    return "\n".join(lines)
