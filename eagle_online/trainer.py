"""The online training loop: setup, train, train_step, save_checkpoint, resume.

Each micro-step runs the frozen target once over a packed row, hands its aux features and
teacher logits straight to the draft head, and backpropagates the head's TTT loss. Nothing of
the target is written to disk.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file

from eagle_online.checkpoint import (
    BEST_FILE,
    CHECKPOINT_PREFIX,
    EXTEND_KEYS,
    SCHEDULER,
    TRAINER_STATE,
    WEIGHTS,
    CheckpointError,
    best_checkpoint,
    checkpoint_names,
    damage,
    data_fingerprint,
    differing_keys,
    disk_full,
    flatten,
    load_optimizer,
    load_rng,
    lock_run_dir,
    recipe_fingerprint,
    rng_name,
    save_optimizer,
    save_rng,
    write_json,
    write_manifest,
)
from eagle_online.data import PreparedData, format_stats, prepare_data
from eagle_online.data.packing import PackedBatch, pack_conversations
from eagle_online.data.vocab import (
    build_draft_vocab,
    count_trained_tokens,
    draft_vocab_path,
    load_draft_vocab,
    save_draft_vocab,
    vocab_coverage,
)
from eagle_online.distributed import setup_distributed
from eagle_online.evaluate import BigramDrafter, evaluate, load_prompts
from eagle_online.export import load_draft
from eagle_online.heads import architecture_of, build_head, draft_config, drafter_for
from eagle_online.layout import ExportError, aux_layer_ids_of, check_aux_layer_ids, default_aux_layer_ids, draft_ids
from eagle_online.losses import expected_acceptance_length
from eagle_online.metrics import installed, log_metrics, read_metrics, tau_figures, temperature_key, truncate_metrics
from eagle_online.recipe import Recipe, RecipeError, resolve_asset, resolve_target
from eagle_online.report import (
    Setup,
    cpu_warning,
    format_banner,
    format_eval_line,
    format_floors_line,
    format_step_line,
    format_summary,
    launched_by_accelerate,
    write_curves,
)
from eagle_online.sharded import full_shape, gathered_copy, parameter_counts
from eagle_online.target import FrozenTarget, TargetOutput, decoder_layers, load_tokenizer
from eagle_online.timing import StepTimer

# What a run writes into run.output_dir (training.overwrite=true removes these, nothing else: a
# `regenerated/` data folder or the lock stay).
RUN_FILES = ("checkpoints", "metrics.jsonl", "export", "tensorboard", "recipe.yaml", "run_info.json",
             "data_stats.json", "draft_config.json", "draft_vocab.safetensors", "curves.svg")


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Linear warmup to 1, then cosine or linear decay to 0 (or constant) over the remaining steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def advance(bar, metrics: dict[str, float]) -> None:
    """Move the progress bar on by the step just finished, showing that step's figures (the figures are
    set first: the bar redraws on update, so setting them after showed the step before's)."""
    bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc_0=f"{metrics['acc_0']:.3f}",
                    tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)
    bar.update(1)


def _flat(tree: dict) -> dict:
    """A nested recipe as flat scalar hyperparameters (what TensorBoard's hparams accept)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten(tree).items()}


def per_position(metrics: dict[str, float]) -> dict[str, float]:
    """Per-TTT-step loss_k, acc_k and alpha_k from their position sums (StepMetrics.position_sums, added over the
    step's micro-batches and ranks): every trained position of the step counts alike, so acc_k is the
    fraction of all positions predicted right. The logged `loss` is not: it is the mean over
    micro-batches and ranks of each micro-batch's own loss, exactly what the gradient follows (each
    micro-batch's loss / accumulation, DDP's average over ranks). A step with no position at step k
    logs 0 there."""
    sums = ("loss", "acc", "alpha")
    out = {k: v for k, v in metrics.items() if not k.startswith((*(f"sum_{s}_" for s in sums), "positions_"))}
    steps = sum(1 for k in metrics if k.startswith("positions_"))
    for k in range(steps):
        n = metrics[f"positions_{k}"]
        for name in sums:
            out[f"{name}_{k}"] = metrics[f"sum_{name}_{k}"] / n if n else 0.0
    return out


def _with_tau_hat(metrics: dict[str, float]) -> dict[str, float]:
    """τ̂ of averaged metrics is that of the averaged per-step accuracies, not an average of τ̂s."""
    steps = sum(1 for k in metrics if k.startswith("acc_"))
    metrics["tau_hat"] = expected_acceptance_length([metrics[f"acc_{k}"] for k in range(steps)])
    return metrics


def rank_batch_indices(index: int, *, rank: int, world: int, accumulation: int) -> list[int]:
    """Which of an epoch's packed micro-batches `rank` reads at the epoch's `index`-th optimizer step.

    Step `index` consumes the `accumulation · world` consecutive micro-batches from
    `index · accumulation · world` on; rank r reads every world-th of them, from r. So ranks never
    overlap, every rank reads `accumulation` of them, and one process accumulating A·W micro-batches
    reads exactly the global batch that W ranks accumulating A read."""
    first = index * accumulation
    return [(first + m) * world + rank for m in range(accumulation)]


def check_target(recipe: Recipe) -> None:
    """What can be checked of a local target before anything is loaded, read or written: the directory and
    its config.json exist, the aux layer ids are layers it has, the draft vocabulary fits its vocabulary.
    (A hub name is checked when it is downloaded; a GGUF is materialised first, as every consumer reads it.)"""
    model = resolve_target(recipe.target)
    path = Path(model).expanduser()
    if not (path.exists() or path.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1):
        return
    if not path.is_dir():
        raise RecipeError(f"target.model {recipe.target.model!r}: no such directory (a hub model is named ORG/NAME)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise RecipeError(f"target.model {path}: no config.json there; give the directory that holds the model's "
                          "config.json, weights and tokenizer")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise RecipeError(f"target.model: {config_file} cannot be read ({e})") from None
    config = config.get("text_config") or config  # multimodal targets keep the decoder's config apart
    layers, vocab = config.get("num_hidden_layers"), config.get("vocab_size")
    ids = recipe.target.aux_layer_ids
    if isinstance(layers, int) and (ids is not None or recipe.draft.init_from is None):
        try:
            check_aux_layer_ids(ids if ids is not None else default_aux_layer_ids(layers), layers)
        except ExportError as e:
            raise RecipeError(f"target.aux_layer_ids: {e} ({config_file} has num_hidden_layers={layers})") from None
    if isinstance(vocab, int) and recipe.draft.draft_vocab_size > vocab:
        raise RecipeError(f"draft.draft_vocab_size={recipe.draft.draft_vocab_size} is larger than the target's "
                          f"vocabulary ({vocab} tokens, {config_file}): use at most {vocab}")


@contextmanager
def _loading_target(name: str):
    """A target that cannot be found or downloaded (a hub name that does not exist, no network) is the
    recipe's target.model to fix, not a traceback."""
    from huggingface_hub.errors import HFValidationError

    try:
        yield
    except (OSError, HFValidationError) as e:
        raise RecipeError(f"target.model {name!r} cannot be loaded: {e}".rstrip() + "\nGive a local model directory "
                          "or a hub name ORG/NAME that is downloaded or reachable") from None


class _Interrupt:
    """Turns SIGINT/SIGTERM into a flag, so the loop finishes its step and saves before exiting."""

    def __init__(self):
        self.requested = False

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


class Trainer:
    """Trains one draft head online against a frozen target, as a recipe describes.

    `setup()` then `train()` is a run. One optimizer step is `train_step(micro_batches(step))`, and its
    phases are public too, so a caller (the throughput benchmark) can run each alone on the same data:
    `micro_batches(step)` (data), `to_device(batch)`, `target.features` / `target.teacher`,
    `head_forward(out, batch)` (then backward on its loss) and `optimizer_step()`."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.run_dir = Path(recipe.run.output_dir)
        self.step = 0  # optimizer steps done
        self.created = time.perf_counter()  # the summary's wall time counts setup (loading, data) too
        self.interrupt = _Interrupt()
        self._epoch, self._batches = -1, []  # the packed micro-batches of the epoch being read

    # ----------------------------------------------------------------------------------- setup
    def setup(self, target_model: torch.nn.Module | None = None, data: PreparedData | None = None) -> None:
        """Build everything: accelerator, tokenizer, data, draft vocab, target, head, optimizer.

        `target_model` and `data` replace loading the recipe's target and reading its sources (the
        throughput benchmark passes a random-weight target and synthetic conversations; one process).
        """
        r = self.recipe
        if target_model is None:
            check_target(r)
        self.dist = setup_distributed(recipe=r, run_dir=self.run_dir)  # the order: see distributed.py
        self.accelerator = acc = self.dist.accelerator
        set_seed(r.run.seed)
        if acc.is_main_process:  # one run per directory: a second one fails here, naming this one
            self._lock = lock_run_dir(self.run_dir)
        # Which checkpoint to continue from, decided by every rank alike from the same files, before any
        # data or model is read; a mismatch with the recipe is refused here, leaving recipe.yaml as it is.
        self._start = self._plan_start()
        acc.wait_for_everyone()
        if acc.is_main_process:
            if r.training.overwrite:
                self._clear_run()
            (self.run_dir / "recipe.yaml").write_text(r.to_yaml())
        acc.wait_for_everyone()

        with _loading_target(r.target.model):
            self.tokenizer = load_tokenizer(r.target) if data is None else None
        self.data = data or prepare_data(r.data, self.tokenizer)  # raises DataError when nothing is usable
        self.data_fingerprint = data_fingerprint(self.data.examples)
        self._check_data()
        # partitioned across ranks with target.sharding=zero3
        with _loading_target(r.target.model):
            model = target_model if target_model is not None else self.dist.load_target(r.target)
        vocab_size = self.vocab_size = full_shape(model.get_output_embeddings().weight)[0]
        self.target_params = parameter_counts(model).total
        imported = self._import_draft(model) if r.draft.init_from else None
        d2t, t2d = self._draft_vocab(vocab_size, imported)
        aux_ids = r.target.aux_layer_ids or (aux_layer_ids_of(imported.config) if imported is not None else None)
        self.target = FrozenTarget(model, aux_ids, draft_ids(d2t).to(acc.device))
        head = self._build_head(vocab_size, d2t, t2d, imported)
        calibration = head.calibrate(r.draft, self._first_batch_aux, fresh=imported is None)
        if r.draft.compile:
            head.compile_layer()
        config = head.config
        if acc.is_main_process:
            config.to_json_file(self.run_dir / "draft_config.json")
            info = {"aux_layer_ids": self.target.aux_layer_ids, "target_num_layers": len(decoder_layers(model)),
                    **calibration, "target_parameters": self.target_params,
                    "target_architectures": list(getattr(model.config, "architectures", None) or [])}
            revision = getattr(model.config, "_commit_hash", None)  # the hub's commit, when loaded from the hub
            if revision:
                info["target_revision"] = revision
            (self.run_dir / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
            (self.run_dir / "data_stats.json").write_text(json.dumps(self.data.stats, indent=2) + "\n")
            print(format_stats(self.data.stats), flush=True)

        t = r.training
        self.world = acc.num_processes
        micro_per_epoch = len(self._epoch_micro_batches(0)) // self.world
        self.steps_per_epoch = micro_per_epoch // t.gradient_accumulation_steps
        if self.steps_per_epoch == 0:
            raise RecipeError(
                f"one epoch gives {micro_per_epoch} micro-batches per rank, fewer than "
                f"gradient_accumulation_steps={t.gradient_accumulation_steps}: add data or lower data.tokens_per_batch"
            )
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch
        self._check_total_steps()
        self.head, self.optimizer = self.dist.parallelize_head(
            head, param_groups=head.param_groups(t.lr), lr=t.lr, betas=tuple(t.betas),
            weight_decay=t.weight_decay)
        warmup = int(t.warmup_ratio * self.total_steps)
        # on the optimizer itself (accelerate's wrapper steps it), stepped by us once per optimizer
        # step, whatever the world size
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            getattr(self.optimizer, "optimizer", self.optimizer),
            lambda s: lr_factor(s, self.total_steps, warmup, t.schedule))
        acc.init_trackers("tensorboard", config=_flat(r.model_dump(mode="json")),
                          init_kwargs={"wandb": {"name": r.run.name}, "mlflow": {"run_name": r.run.name}})
        if acc.is_main_process:
            setup = self._setup_summary(model, head)
            print(format_banner(setup), flush=True)
            warning = cpu_warning(setup)
            if warning:
                print(warning, file=sys.stderr, flush=True)

    def _setup_summary(self, model, head) -> Setup:
        """The banner's figures, from the run as set up."""
        r, acc = self.recipe, self.accelerator
        t, e = r.training, r.eval
        cuda = acc.device.type == "cuda"
        device = f"{acc.device} ({torch.cuda.get_device_name(acc.device)})" if cuda else str(acc.device)
        batches = self._epoch_micro_batches(0)
        per_step = t.gradient_accumulation_steps * self.world
        if e.every is None:
            eval_desc = "off (eval.every unset: no τ during training)"
        else:
            eval_desc = (f"τ every {e.every} steps on {e.num_prompts} prompts of {e.prompts} (T={e.temperature:g}, "
                         f"k={e.num_draft_tokens}, {e.max_new_tokens} new tokens)")
            if not e.floors:
                eval_desc += "; no floors (eval.floors=false)"
            elif self.tokenizer is not None:
                eval_desc += "; floors (the untrained head, a bigram of the training data) measured before step 1"
        export = (f"the {t.export_checkpoint} checkpoint exported to {self.run_dir / 'export'} at the end"
                  if t.export_at_end else "no export at the end (training.export_at_end=false)")
        start = self._start
        return Setup(
            name=r.run.name, output_dir=str(self.run_dir.resolve()), device=device, cuda=cuda, world=self.world,
            local_world=int(os.environ.get("LOCAL_WORLD_SIZE", self.world)), target=r.target.model,
            target_params=self.target_params, target_dtype=str(model.dtype).removeprefix("torch."),
            sharding=r.target.sharding + (f" (hpZ node-local partitions of {r.target.zero3.hpz_partition_size})"
                                          if r.target.sharding == "zero3" and r.target.zero3.hpz_partition_size > 1
                                          else ""),
            precision=(f"{'bf16 autocast' if acc.mixed_precision == 'bf16' else 'fp32'} for the head "
                       f"(training.mixed_precision={t.mixed_precision}); its weights and optimizer state fp32"),
            architecture=r.draft.architecture, head_params=sum(p.numel() for p in head.trainable_parameters()),
            draft_vocab=r.draft.draft_vocab_size,
            ttt_length=r.draft.ttt_length if "ttt_length" in head.SHOWN_SETTINGS else None,
            loss=r.draft.loss + (f" (s {r.draft.lk_scale}, d {r.draft.lk_decay})"
                                 if r.draft.loss == "lk_lambda" else ""),
            total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch,
            start_step=start[1]["step"] if start else 0, tokens_per_step_max=r.data.tokens_per_batch * per_step,
            tokens_per_step_mean=sum(b.num_tokens for b in batches) / max(1, len(batches)) * per_step,
            micro_tokens=r.data.tokens_per_batch, accumulation=t.gradient_accumulation_steps, lr=t.lr,
            schedule=f"{t.schedule} after {int(t.warmup_ratio * self.total_steps)} warmup steps",
            eval_desc=eval_desc, checkpoint_every=t.checkpoint_every,
            keep_checkpoints=t.keep_checkpoints, export=export,
            trackers=[n for n in t.trackers if installed(n)],
            tensorboard_missing="tensorboard" in t.trackers and not installed("tensorboard"),
            resumed_from=f"{start[0].name}, written by {start[1].get('world')} process(es)" if start else None,
            launched_by_accelerate=launched_by_accelerate(),
        )

    def _first_batch_aux(self) -> torch.Tensor:
        """The target's aux features on epoch 0's first micro-batch: a function of the recipe alone."""
        batch = self._epoch_micro_batches(0)[0]
        device = self.accelerator.device
        return self.target(batch.input_ids.to(device), batch.position_ids.to(device)).aux_hidden.float()

    def _import_draft(self, model):
        """The recipe's `draft.init_from` draft (any layout load_draft reads), checked against the recipe."""
        r = self.recipe
        head = load_draft(resolve_asset(r.draft.init_from), gathered_copy(model.get_input_embeddings().weight).float(),
                          gathered_copy(model.get_output_embeddings().weight).float())
        arch = architecture_of(head.config)
        if arch != r.draft.architecture:
            raise ExportError(f"draft.init_from {r.draft.init_from} holds a {arch} head, but draft.architecture is "
                              f"{r.draft.architecture}")
        size = getattr(head.config, "draft_vocab_size", None)
        if size is not None and size != r.draft.draft_vocab_size:
            raise ExportError(f"draft.init_from {r.draft.init_from} has a draft vocab of {size}, but "
                              f"draft.draft_vocab_size is {r.draft.draft_vocab_size}")
        return head.float()

    def _build_head(self, vocab_size: int, d2t: torch.Tensor, t2d: torch.Tensor, imported):
        """A fresh head initialised from the target (or the imported one), with the recipe's training settings."""
        r = self.recipe
        if imported is not None:
            head = imported
        else:
            config = draft_config(r.draft.architecture, self.target.config, r.draft, vocab_size)
            head = build_head(config)
            full_lm_head = head.LM_HEAD == "full"
            lm_head = gathered_copy(self.target.lm_head_weight) if full_lm_head else self.target.lm_head_draft
            head.init_from_target(gathered_copy(self.target.embed_weight).float(),
                                  lm_head.float().cpu() if head.takes_target_lm_head(r.draft) else None, d2t, t2d)
        head.set_draft_vocab(d2t)  # for heads whose teacher vocabulary is not part of their weights
        head.configure_training(r.draft)
        return head

    def _draft_vocab(self, vocab_size: int, imported=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Count trained tokens once per run and cache the draft vocabulary with it (an imported draft's
        own vocabulary map, when it has one, is cached instead)."""
        path = draft_vocab_path(self.run_dir)  # launch/build_vocab.py writes it ahead, streaming
        size = self.recipe.draft.draft_vocab_size
        if not path.exists() and self.accelerator.is_main_process:
            own = getattr(imported, "d2t", None)
            if own is not None and own.numel() == size:
                save_draft_vocab(path, own.cpu(), imported.t2d.cpu(), torch.zeros(vocab_size, dtype=torch.long))
            else:
                counts = count_trained_tokens(self.data.examples, vocab_size)
                d2t, t2d = build_draft_vocab(counts, size)
                save_draft_vocab(path, d2t, t2d, counts)
                print(f"draft vocabulary: {size} tokens cover {vocab_coverage(counts, t2d):.2%} of the trained tokens")
        self.accelerator.wait_for_everyone()
        d2t, t2d = load_draft_vocab(path)
        if len(d2t) != size or len(t2d) != vocab_size:
            raise CheckpointError(
                f"{path} holds a draft vocab of {len(d2t)} over {len(t2d)} tokens, but the recipe asks "
                f"{size} over the target's {vocab_size}: delete it or use another run.output_dir"
            )
        return d2t, t2d

    # ------------------------------------------------------------------------------------ data
    def _epoch_micro_batches(self, epoch: int) -> list[PackedBatch]:
        """The packed micro-batches of one epoch (all ranks'): conversations shuffled by (seed, epoch),
        then packed. Packed once per epoch and kept while the epoch is read."""
        if epoch == self._epoch:
            return self._batches
        examples = self.data.examples
        if self.recipe.data.shuffle:
            gen = torch.Generator().manual_seed(self.recipe.run.seed * 1_000_003 + epoch)
            examples = [examples[i] for i in torch.randperm(len(examples), generator=gen).tolist()]
        self._epoch, self._batches = epoch, pack_conversations(examples, self.recipe.data.tokens_per_batch)
        return self._batches

    def micro_batches(self, step: int) -> list[PackedBatch]:
        """This rank's micro-batches for an optimizer step: a pure function of the step, so a
        resumed run reads exactly what the uninterrupted one would have. Every rank gets the same
        number (the epoch's tail that does not divide evenly is dropped), so every rank runs the
        target the same number of times."""
        epoch, index = divmod(step, self.steps_per_epoch)
        batches = self._epoch_micro_batches(epoch)
        # steps_per_epoch is counted on epoch 0; another epoch's shuffle can pack into a row or two fewer.
        # Wrapping around re-reads those few rows rather than failing on one rank only, which would leave
        # the others waiting in a ZeRO-3 all-gather.
        return [batches[i % len(batches)] for i in rank_batch_indices(
            index, rank=self.accelerator.process_index, world=self.world,
            accumulation=self.recipe.training.gradient_accumulation_steps,
        )]

    # ----------------------------------------------------------------- one step and its phases
    def train_step(self, batches: list[PackedBatch], timer: StepTimer | None = None) -> dict[str, float]:
        """One optimizer step over `batches` (gradient accumulation); returns its metrics.

        The step runs as named phases (timing.PHASES), each timed on `timer`, each phase a public method
        (to_device, the target's features and teacher, head_forward, optimizer_step); the throughput
        benchmark runs this same code, and runs each phase's method alone to price the pipeline.
        """
        timer = timer or StepTimer()
        acc = self.accelerator
        ga = len(batches)
        means: dict[str, float] = {}  # averaged over micro-batches and ranks, each alike
        totals: dict[str, float] = {}  # added over micro-batches and ranks
        tokens = 0
        for m, batch in enumerate(batches):
            with timer.phase("data"):
                batch = self.to_device(batch)
            with timer.phase("target"):
                features = self.target.features(batch.input_ids, batch.position_ids)
            with timer.phase("teacher"):
                out = self.target.teacher(features)
            sync = acc.no_sync(self.head) if m < ga - 1 else nullcontext()
            with sync, acc.autocast():
                with timer.phase("head_forward"):
                    res = self.head_forward(out, batch)
                with timer.phase("head_backward"):
                    acc.backward(res.loss / ga)
            tokens += batch.num_tokens
            for key, value in res.metrics.position_sums().items():
                totals[key] = totals.get(key, 0.0) + value
            means["loss"] = means.get("loss", 0.0) + float(res.loss.detach()) / ga
        means["lr"] = self.scheduler.get_last_lr()[0]  # the rate this step applies
        with timer.phase("optimizer"):
            grad_norm = self.optimizer_step()
        means["grad_norm"] = float(grad_norm)
        means["time_target"] = timer.total("target", "teacher")
        means["time_head"] = timer.total("head_forward", "head_backward")
        totals["tokens"] = tokens
        return _with_tau_hat(per_position(self._reduce(means, totals)))

    def to_device(self, batch: PackedBatch) -> PackedBatch:
        """The batch's tensors on this rank's device."""
        device = self.accelerator.device
        return replace(batch, input_ids=batch.input_ids.to(device), position_ids=batch.position_ids.to(device),
                       loss_mask=batch.loss_mask.to(device))

    def head_forward(self, out: TargetOutput, batch: PackedBatch):
        """The head's training forward on one micro-batch (EAGLE-3: its TTT unroll): loss and per-step metrics.
        `out` is the target's output on `batch` (on the device); run it under the accelerator's autocast."""
        return self.head(out, batch)

    def optimizer_step(self) -> torch.Tensor:
        """Clip, step the optimizer and the schedule, clear the gradients; returns the pre-clip norm.
        The step's last phase: the gradients are those the head_forward losses' backward accumulated."""
        grad_norm = self.accelerator.clip_grad_norm_(self.head.parameters(), self.recipe.training.max_grad_norm)
        with self.unwrapped_head().optimizer_update():  # a head may rescale part of its update
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    # ------------------------------------------------------------------------------------ loop
    def _reduce(self, means: dict[str, float], totals: dict[str, float] | None = None) -> dict[str, float]:
        """Over ranks: `means` averaged (every rank alike), `totals` added. One collective."""
        totals = totals or {}
        if self.world == 1:
            return {**means, **totals}
        keys = sorted(means) + sorted(totals)
        values = [means[k] for k in sorted(means)] + [totals[k] for k in sorted(totals)]
        t = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        t = self.accelerator.reduce(t, reduction="sum").tolist()
        return {k: float(v) / (self.world if i < len(means) else 1) for i, (k, v) in enumerate(zip(keys, t))}

    def train(self) -> dict[str, float]:
        """Run from the current step to the end (or an interrupt); returns the last step's metrics."""
        acc = self.accelerator
        self.interrupt.install()
        self.resume()
        if self.step == 0 and acc.is_main_process:  # a fresh start: an earlier attempt's best and rows are not ours
            (self.run_dir / "checkpoints" / BEST_FILE).unlink(missing_ok=True)
            truncate_metrics(self.run_dir, -1)
        acc.wait_for_everyone()
        main = acc.is_main_process
        earlier = tau_figures(read_metrics(self.run_dir)) if main else {}  # a resumed run's floors and best τ
        self.floors = {k: earlier[k] for k in ("untrained", "bigram") if k in earlier}
        best_eval = earlier.get("best")
        if self.step == 0:
            self._measure_floors()
        plain = main and (not self.recipe.training.progress_bar or not sys.stdout.isatty())
        self._session = {"start": time.perf_counter(), "step": self.step, "tokens": 0.0}
        # Kept in memory from here: rank 0 rewrites the file, and a rank reading it a moment later than
        # another would decide differently whether to save, leaving the others in a barrier.
        best_tau = self._best_tau()
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not main or plain)
        last: dict[str, float] = {}
        window_tokens, window_start = 0, time.perf_counter()
        every = self.recipe.training.checkpoint_every
        while self.step < self.total_steps:
            timer = StepTimer()
            with timer.phase("data"):
                batches = self.micro_batches(self.step)
            last = self.train_step(batches, timer)
            self.step += 1
            self._session["tokens"] += last["tokens"]
            window_tokens += last["tokens"]
            elapsed = time.perf_counter() - window_start
            last["tokens_per_s"] = window_tokens / max(elapsed, 1e-9)
            last["epoch"] = self.step / self.steps_per_epoch
            evaluated = self._eval_due()
            if evaluated:
                t0 = time.perf_counter()
                last.update(self._reduce(self.evaluate_tau()))  # one value on every rank, whatever the numerics
                if self.step == self.total_steps:
                    last.update(self._reduce(self._final_taus()))
                window_start += time.perf_counter() - t0  # tokens/s counts training time only
            logged = self.step % self.recipe.training.log_every == 0 or self.step == self.total_steps
            if evaluated or logged:
                log_metrics(acc, last, step=self.step)
                window_tokens, window_start = 0, time.perf_counter()
            advance(bar, last)
            if plain and logged:
                print(format_step_line(self.step, self.total_steps, last, time.perf_counter() - self._session["start"],
                                       self.step - self._session["step"]), flush=True)
            if evaluated and main:
                if best_eval is None or last["eval_tau"] > best_eval["tau"]:
                    best_eval = {"step": self.step, "tau": last["eval_tau"]}
                bar.write(format_eval_line(self.step, last["eval_tau"], best_eval, self.floors))
                sys.stdout.flush()
            stop = self._interrupt_requested()
            saved = False
            if self.step % every == 0 or self.step == self.total_steps or stop:
                self.save_checkpoint()
                saved = True
            if evaluated and last["eval_tau"] > best_tau:
                if not saved:
                    self.save_checkpoint()
                best_tau = last["eval_tau"]
                self._record_best(best_tau, int(last.get("eval_prompts", 0)))
            if stop:
                bar.close()
                self._write_curves()
                if acc.is_main_process:
                    print(f"interrupted: checkpoint saved at step {self.step}; run again to resume", flush=True)
                self.dist.close()  # every rank agreed to stop here, so the barrier inside is safe
                raise KeyboardInterrupt
        bar.close()
        self._write_curves()
        self.last_metrics = last
        self.dist.close()
        return last

    def _write_curves(self) -> None:
        """RUN/curves.svg from metrics.jsonl (rank 0); a plot that cannot be written never fails the run."""
        if self.accelerator.is_main_process:
            try:
                self.curves = write_curves(self.run_dir, title=f"{self.recipe.run.name} ({self.run_dir})")
            except OSError as e:
                print(f"warning: could not write {self.run_dir / 'curves.svg'}: {e}", file=sys.stderr)
                self.curves = None

    def summary(self, export: dict | None) -> str:
        """The end-of-run summary (rank 0, after train and the export): steps, time, tokens, the final
        metrics, τ beside its floors, the export and the commands that serve it."""
        e = self.recipe.eval
        tau = tau_figures(read_metrics(self.run_dir))
        tau.update(temperature=e.temperature if e.every else None, num_draft_tokens=e.num_draft_tokens)
        session = getattr(self, "_session", {"start": time.perf_counter(), "step": self.step, "tokens": 0.0})
        return format_summary(
            run_dir=self.run_dir, name=self.recipe.run.name, steps=self.step, total_steps=self.total_steps,
            start_step=session["step"], wall=time.perf_counter() - self.created,
            train_wall=time.perf_counter() - session["start"], tokens=session["tokens"],
            final=getattr(self, "last_metrics", {}), tau=tau, export=export, curves=getattr(self, "curves", None))

    # ---------------------------------------------------------------------------------- τ eval
    def _eval_due(self) -> bool:
        every = self.recipe.eval.every
        return every is not None and (self.step % every == 0 or self.step == self.total_steps)

    def evaluate_tau(self) -> dict[str, float]:
        """τ of the head as it is now, by speculative decoding of the recipe's held-out prompts (section
        `eval`); metrics `eval_tau` and `eval_accept_j` per draft position. Every rank runs the same
        prompts with the same seed (a ZeRO-3 target needs every rank in each forward)."""
        result = self._head_tau()
        out = {"eval_tau": result.tau, "eval_prompts": len(self._eval_prompts)}
        out.update({f"eval_accept_{j}": a for j, a in enumerate(result.acceptance)})
        return out

    def _final_taus(self) -> dict[str, float]:
        """After the last step: τ of the head at each of eval.final_temperatures other than eval.temperature
        (`eval_tau_T<t>`), for the summary's table beside the floors at the same temperatures."""
        return {f"eval_tau_{temperature_key(t)}": self._head_tau(t).tau for t in self._extra_temperatures()}

    def _head_tau(self, temperature: float | None = None):
        """`_tau_of` the head as it is now; the head's train/eval mode is left as it was."""
        head = self.unwrapped_head()
        was_training = head.training
        try:
            return self._tau_of(drafter_for(head), temperature)
        finally:
            head.train(was_training)

    def _extra_temperatures(self) -> list[float]:
        e = self.recipe.eval
        return [t for t in dict.fromkeys(e.final_temperatures) if t != e.temperature]

    def _tau_of(self, drafter, temperature: float | None = None):
        """τ of any drafter on the recipe's eval prompts and settings (the same for the head and the floors),
        at eval.temperature unless another is given."""
        e = self.recipe.eval
        if not hasattr(self, "_eval_prompts"):
            self._eval_prompts = load_prompts(e.prompts, limit=e.num_prompts, skip=e.skip_prompts)
        return evaluate(self.target, self.tokenizer, drafter, self._eval_prompts, num_draft_tokens=e.num_draft_tokens,
                        max_new_tokens=e.max_new_tokens,
                        temperature=e.temperature if temperature is None else temperature, seed=self.recipe.run.seed)

    def _measure_floors(self) -> None:
        """Before the first step (eval.every and eval.floors set): τ of the head as initialised (untrained,
        or draft.init_from's) and of a bigram draft counted from the training data, on the eval prompts
        with the eval settings; logged at step 0 as eval_tau_untrained and eval_tau_bigram. Every rank
        measures (a ZeRO-3 target needs all of them in each forward)."""
        e = self.recipe.eval
        if e.every is None or not e.floors or self.tokenizer is None:
            return
        bigram = BigramDrafter.from_examples(self.data.examples, self.vocab_size)
        taus = {}
        for t in [None, *self._extra_temperatures()]:  # eval.temperature, then eval.final_temperatures'
            suffix = "" if t is None else "_" + temperature_key(t)
            taus[f"eval_tau_untrained{suffix}"] = self._head_tau(t).tau
            taus[f"eval_tau_bigram{suffix}"] = self._tau_of(bigram, t).tau
        floors = self._reduce(taus)
        self.floors = {"untrained": floors["eval_tau_untrained"], "bigram": floors["eval_tau_bigram"]}
        log_metrics(self.accelerator, {**floors, "eval_prompts": len(self._eval_prompts)}, step=0)
        if self.accelerator.is_main_process:
            print(format_floors_line(self.floors), flush=True)

    def _best_tau(self) -> float:
        best = best_checkpoint(self.run_dir)
        return best["tau"] if best else float("-inf")

    def _record_best(self, tau: float, prompts: int) -> None:
        """checkpoints/best.json names the best checkpoint by τ: rotation keeps it and export picks it."""
        if self.accelerator.is_main_process:
            path = self.run_dir / "checkpoints" / BEST_FILE
            record = {"checkpoint": f"{CHECKPOINT_PREFIX}{self.step:08d}", "step": self.step, "tau": tau,
                      "prompts": prompts}
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(record, indent=2) + "\n")
            tmp.replace(path)
        self.accelerator.wait_for_everyone()

    def _interrupt_requested(self) -> bool:
        """All ranks must agree to stop at the same step, or the next collective hangs."""
        if self.world == 1:
            return self.interrupt.requested
        flag = torch.tensor([float(self.interrupt.requested)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    # ----------------------------------------------------------------------------- checkpoints
    def _all_ranks_ok(self, ok: bool) -> bool:
        """Whether every rank succeeded (a collective: every rank calls it at the same point)."""
        if self.accelerator.num_processes == 1:
            return ok
        flag = torch.tensor([float(not ok)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() == 0)

    def save_checkpoint(self) -> Path:
        """Save head, optimizer, scheduler and every rank's RNG state as safetensors and JSON under a
        temporary name, write the manifest last, then rename it into place (eagle_online/checkpoint.py).
        A write that fails (a full disk) removes the partial one and stops the run on every rank; the
        checkpoints written before are untouched."""
        acc = self.accelerator
        main = acc.is_main_process
        final = self.run_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{self.step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        optimizer_state = self.dist.optimizer_state.state_dict()  # every rank: a collective under zero1
        error: BaseException | None = None

        def attempt(write) -> None:
            nonlocal error
            if error is None:
                try:
                    write()
                except Exception as e:  # noqa: BLE001 - reported below, on every rank, as a CheckpointError
                    error = e
            if not self._all_ranks_ok(error is None):
                if main:
                    shutil.rmtree(tmp, ignore_errors=True)
                self._checkpoint_failed(final, error)

        def write_state() -> None:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            head = {k: v.detach().cpu().contiguous() for k, v in self.unwrapped_head().state_dict().items()}
            save_file(head, str(tmp / WEIGHTS))
            save_optimizer(optimizer_state, tmp)
            write_json(tmp / SCHEDULER, self.scheduler.state_dict())
            write_json(tmp / TRAINER_STATE, {
                "step": self.step, "total_steps": self.total_steps, "world": self.world,
                "recipe": recipe_fingerprint(self.recipe), "data": self.data_fingerprint})

        def publish() -> None:
            write_manifest(tmp, self.step)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)

        attempt(write_state if main else lambda: None)
        attempt(lambda: save_rng(tmp / rng_name(acc.process_index)))
        attempt(publish if main else lambda: None)
        if main:
            best = best_checkpoint(self.run_dir)
            for old in checkpoint_names(self.run_dir)[: -self.recipe.training.keep_checkpoints]:
                if best is None or old != best["checkpoint"]:  # the best by τ is kept
                    shutil.rmtree(final.parent / old)
        acc.wait_for_everyone()
        return final

    def _checkpoint_failed(self, final: Path, error: BaseException | None):
        kept = [n for n in checkpoint_names(self.run_dir) if damage(self.run_dir / "checkpoints" / n) is None]
        keep = f"the last complete checkpoint, {kept[-1]}, is kept" if kept else "no earlier checkpoint exists"
        if error is None:
            why = "another rank could not write its part"
        elif disk_full(error):
            why = f"the disk holding {self.run_dir} is full ({error})"
        else:
            why = f"{type(error).__name__}: {error}"
        raise CheckpointError(f"could not write checkpoint {final}: {why}; {keep}. Free space (or fix the cause) "
                              "and run the same command again to resume")

    def _run_held(self) -> list[str]:
        """What of an earlier run this directory holds: checkpoints, metrics, an export."""
        held = []
        root = self.run_dir / "checkpoints"
        if root.is_dir() and any(p.name.startswith(CHECKPOINT_PREFIX) for p in root.iterdir()):
            held.append("checkpoints/")
        held += [name for name in ("metrics.jsonl", "export") if (self.run_dir / name).exists()]
        return held

    def _checkpoint_dirs(self) -> list[str]:
        root = self.run_dir / "checkpoints"
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir()
                      if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and "." not in p.name)

    def _plan_start(self) -> tuple[Path, dict] | None:
        """The checkpoint this run continues from (path, its trainer_state.json), or None to start at step 0.

        Refused, before anything is loaded: starting over (`resume=false`) in a directory that holds a run,
        unless `overwrite` (the two would mix: checkpoints, metrics, the export); checkpoints none of which
        is intact; a checkpoint trained with another recipe (the differing keys are named). A damaged newest
        checkpoint is skipped for the newest intact one, with a warning."""
        t = self.recipe.training
        if t.overwrite:
            return None
        if not t.resume:
            held = self._run_held()
            if held:
                raise CheckpointError(
                    f"{self.run_dir} holds a run ({', '.join(held)}): starting over there (training.resume=false) "
                    "would mix the two. Give this run another run.output_dir, or add training.overwrite=true to "
                    "delete that run's checkpoints, metrics and export first")
            return None
        names = self._checkpoint_dirs()
        if not names:
            return None
        root = self.run_dir / "checkpoints"
        damaged = []
        for name in reversed(names):
            why = damage(root / name)
            if why is None:
                break
            damaged.append((name, why))
        else:
            listed = "; ".join(f"{n}: {why}" for n, why in damaged)
            raise CheckpointError(
                f"no intact checkpoint to resume from in {root} ({listed}). Start over with training.overwrite=true "
                "or in another run.output_dir")
        path = root / name
        state = json.loads((path / TRAINER_STATE).read_text())
        allow = EXTEND_KEYS if t.extend else ()
        diff = differing_keys(state.get("recipe", {}), recipe_fingerprint(self.recipe), allow)
        if diff:
            only_length = all(line.split(":")[0] in EXTEND_KEYS for line in diff)
            fix = ("add training.extend=true to continue it to the new length" if only_length else
                   f"resume with the recipe it was trained with ({self.run_dir / 'recipe.yaml'}), or start over "
                   "with training.overwrite=true or in another run.output_dir")
            raise CheckpointError(f"{path} was trained with a different recipe, and resuming would mix the two:\n  "
                                  + "\n  ".join(diff) + f"\n{fix}")
        if damaged and self.accelerator.is_main_process:
            listed = "; ".join(f"{n}: {why}" for n, why in damaged)
            print(f"warning: damaged checkpoint(s) removed ({listed}); resuming from {path}", file=sys.stderr,
                  flush=True)
        self._damaged = [n for n, _ in damaged]
        return path, state

    def _clear_run(self) -> None:
        """training.overwrite: the earlier run's files step aside under one name, then are deleted."""
        trash = self.run_dir / f".overwritten-{os.getpid()}"
        trash.mkdir()
        for name in RUN_FILES:
            if (self.run_dir / name).exists():
                (self.run_dir / name).rename(trash / name)
        shutil.rmtree(trash)

    def _check_data(self) -> None:
        """The resumed checkpoint was trained on exactly this token stream (same sources, same contents)."""
        if self._start is None:
            return
        path, state = self._start
        saved, now = state.get("data", {}), self.data_fingerprint
        if saved.get("sha256") != now["sha256"]:
            raise CheckpointError(
                f"{path} was trained on other data ({saved.get('sequences')} sequences, {saved.get('tokens')} "
                f"tokens; now {now['sequences']} sequences, {now['tokens']} tokens: a source file changed): resuming "
                "would mix the two. Restore the data, or start over with training.overwrite=true or in another "
                "run.output_dir")

    def _check_total_steps(self) -> None:
        """The same length and process count as the checkpoint's run (or a longer one with training.extend)."""
        if self._start is None:
            return
        path, state = self._start
        if state.get("world") != self.world:
            raise CheckpointError(
                f"{path} was written by a run of {state.get('world')} processes, this one has {self.world}: each "
                "step would read other data. Resume with the same number of processes")
        if state["total_steps"] == self.total_steps:
            return
        if not self.recipe.training.extend:
            raise CheckpointError(
                f"{path} belongs to a run of {state['total_steps']} steps, this recipe makes {self.total_steps} "
                "(training.max_steps, training.epochs or the data changed): add training.extend=true to continue "
                "it to the new length, or start over with training.overwrite=true")
        if self.total_steps <= state["step"]:
            raise CheckpointError(f"training.extend: {path} is already at step {state['step']}, and this recipe "
                                  f"makes {self.total_steps} steps: ask for more")

    def resume(self) -> None:
        """Continue from the checkpoint _plan_start chose, if any: every file is safetensors or JSON."""
        if self._start is None:
            return
        path, state = self._start
        acc = self.accelerator
        try:
            self.unwrapped_head().load_state_dict(load_file(str(path / WEIGHTS)))
            self.dist.optimizer_state.load_state_dict(load_optimizer(path))
            self.scheduler.load_state_dict(json.loads((path / SCHEDULER).read_text()))
            rng = path / rng_name(acc.process_index)
            if rng.exists():
                load_rng(rng)
        except Exception as e:  # noqa: BLE001 - the manifest matched, so the bytes themselves are wrong
            raise CheckpointError(f"{path} cannot be loaded ({type(e).__name__}: {e}): delete it to resume from an "
                                  "older checkpoint, or start over with training.overwrite=true") from None
        self.step = state["step"]
        if acc.is_main_process:
            for name in getattr(self, "_damaged", []):  # newer than the step resumed: they would be rewritten
                shutil.rmtree(self.run_dir / "checkpoints" / name, ignore_errors=True)
            truncate_metrics(self.run_dir, self.step)
            print(f"resumed from {path} at step {self.step}", flush=True)
        acc.wait_for_everyone()

    def unwrapped_head(self):
        """The head module without distributed wrappers."""
        return self.accelerator.unwrap_model(self.head)
