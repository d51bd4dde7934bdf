"""Draft quality: EAGLE-3 vs EAGLE-1/2 vs the MLP speculator vs the MLP baseline, by real speculative decoding.

    python launch/bench.py quality --out quality.json                       # the tiny target
    python launch/bench.py quality --target smollm2 --tokens 1000000 --curve-every 100000 \
        --out q.json --plot q.png

Each head is trained with its recipe for the target (recipes/tiny_* or recipes/smollm2_*) on the same
ShareGPT rows for the same number of training tokens (steps = tokens / tokens-per-batch, the same for
every head), then τ is measured on held-out ShareGPT openings (rows 5000+) greedily and at T=1, beside
the same head untrained and a bigram draft counted from the training data (the floors). With
--curve-every, the trainer's periodic evaluation (the recipe's `eval` section) measures greedy τ and the
acceptance per draft position during training: the learning curves, in the JSON and, with --plot, a PNG
(needs matplotlib: pip install -e ".[bench]").

How long: the tiny target's defaults take tens of minutes on 2 CPU cores; SmolLM2-135M trains at a few
hundred tokens/s on 2 cores (1M tokens per head is hours) and each curve point adds an evaluation. Set
OMP_NUM_THREADS. What the runs found is in launch/QUALITY.md.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path

HEADS = ("eagle3", "eagle1", "mlp", "mlp_speculator")
TEMPERATURES = (0.0, 1.0)
# Per target: each head's recipe and the options' defaults. The tiny target keeps the settings of
# launch/results/quality_tiny.json; SmolLM2 keeps its recipes' data, batch and draft vocabulary.
TARGETS = {
    "tiny": {
        "recipes": {"eagle3": "tiny_eagle3", "eagle1": "tiny_eagle1", "mlp": "tiny_mlp",
                    "mlp_speculator": "tiny_mlp_speculator"},
        "defaults": {"steps": 300, "rows": 1000, "tokens_per_batch": 4096, "max_length": 512, "draft_vocab_size": 4096,
                     "eagle3_aux_layer_ids": [2, 4, 7], "num_draft_tokens": 4},
    },
    "smollm2": {
        "recipes": {"eagle3": "smollm2_eagle3", "eagle1": "smollm2_eagle1", "mlp": "smollm2_mlp",
                    "mlp_speculator": "smollm2_mlp_speculator"},
        "defaults": {"tokens": 1_000_000, "rows": 2000, "tokens_per_batch": 2048, "max_length": 1024,
                     "draft_vocab_size": 8192,
                     "eagle3_aux_layer_ids": None, "num_draft_tokens": 5},
    },
}


def resolve_settings(args) -> None:
    """Fill the options left unset from the target's defaults and derive the steps from --tokens."""
    defaults = TARGETS[args.target]["defaults"]
    for key, value in defaults.items():
        if key not in ("steps", "tokens") and getattr(args, key) is None:
            setattr(args, key, value)
    args.max_length = min(args.max_length, args.tokens_per_batch)  # a packed row holds at least one sequence
    if args.steps is not None and args.tokens is not None:
        raise SystemExit("error: give --steps or --tokens, not both")
    if args.steps is None and args.tokens is None:
        args.steps, args.tokens = defaults.get("steps"), defaults.get("tokens")
    if args.steps is None:
        args.steps = max(1, math.ceil(args.tokens / args.tokens_per_batch))
    args.tokens = args.steps * args.tokens_per_batch  # what is trained: whole steps
    if args.curve_every is not None:
        args.curve_every_steps = max(1, round(args.curve_every / args.tokens_per_batch)) \
            if args.curve_every >= args.tokens_per_batch else max(1, args.curve_every)
    else:
        args.curve_every_steps = None


def _evaluate_all(trainer, drafter, prompts, args) -> dict:
    from eagle_online.evaluate import evaluate

    out = {}
    for t in TEMPERATURES:
        r = evaluate(trainer.target, trainer.tokenizer, drafter, prompts, num_draft_tokens=args.num_draft_tokens,
                     max_new_tokens=args.max_new_tokens, temperature=t, seed=args.seed)
        out[str(t)] = {"tau": r.tau, "acceptance": r.acceptance, "verify_forwards": r.verify_forwards,
                       "sample": r.samples[0]["replies"][0][:300] if r.samples else ""}
    return out


def _curve(run_dir, untrained: dict, trained: dict, tokens_per_batch: int) -> list[dict]:
    """τ against training tokens: the untrained head at 0, the trainer's greedy evaluations (metrics.jsonl
    rows with `eval_tau`), and τ at T=1 at both ends, where the bench measured it. `tokens` is the budget
    (step × tokens-per-batch); `tokens_seen` the packed tokens the steps really held (rows end short of
    a full batch), summed from the per-step rows (curves log every step)."""
    from eagle_online.metrics import read_metrics

    points = {0: {"tokens": 0, "tokens_seen": 0, "step": 0, "tau_T0": untrained["0.0"]["tau"],
                  "tau_T1": untrained["1.0"]["tau"], "accept": untrained["0.0"]["acceptance"]}}
    seen = 0
    for row in read_metrics(run_dir):
        seen += int(row.get("tokens", 0))
        if "eval_tau" in row:
            accept = [row[k] for k in sorted((k for k in row if k.startswith("eval_accept_")),
                                             key=lambda k: int(k.rsplit("_", 1)[1]))]
            points[row["step"]] = {"tokens": row["step"] * tokens_per_batch, "tokens_seen": seen, "step": row["step"],
                                   "tau_T0": row["eval_tau"], "accept": accept}
    points[max(points)]["tau_T1"] = trained["1.0"]["tau"]  # the last evaluation is the end of training
    return [points[s] for s in sorted(points)]


def _commit() -> str | None:
    """The checkout's commit, "+dirty" when files differ from it; None outside a git checkout."""
    import subprocess

    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=Path(__file__).parent, capture_output=True, text=True)

    head = git("rev-parse", "--short", "HEAD")
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if git("status", "--porcelain", "--untracked-files=no").stdout else "")


def run_quality(args, log=print, save=None) -> dict:
    """Train and measure every head (see the module docstring); returns the report. `save(report)` is
    called after each head with the report so far, so a run stopped during a later head keeps the
    earlier ones."""

    from eagle_online.evaluate import BigramDrafter, load_prompts
    from eagle_online.heads import drafter_for
    from eagle_online.recipe import load_recipe
    from eagle_online.trainer import Trainer

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="quality-"))
    prompts = load_prompts("builtin:sharegpt", limit=args.prompts, skip=args.prompt_skip)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "work_dir", "plot")}
    report = {"settings": settings, "commit": _commit(), "heads": {}, "curves": {}}
    bigram_done = False
    try:
        for name, recipe_name in TARGETS[args.target]["recipes"].items():
            if name not in args.heads:
                continue
            run_dir = work / name
            overrides = [f"run.output_dir={run_dir}", f"data.sources.0.max_rows={args.rows}",
                         f"data.tokens_per_batch={args.tokens_per_batch}", f"data.max_length={args.max_length}",
                         f"training.max_steps={args.steps}", "training.progress_bar=false",
                         "training.export_at_end=false", "training.overwrite=true",
                         f"training.log_every={1 if args.curve_every_steps else args.log_every}",
                         f"training.checkpoint_every={args.steps}", f"run.seed={args.seed}", f"draft.loss={args.loss}"]
            if args.curve_every_steps:  # the trainer's own evaluation, on the bench's prompts and settings
                overrides += [f"eval.every={args.curve_every_steps}", "eval.prompts=builtin:sharegpt",
                              "eval.final_temperatures=[]",  # the bench measures both ends itself, every head alike
                              f"eval.skip_prompts={args.prompt_skip}", f"eval.num_prompts={args.prompts}",
                              f"eval.max_new_tokens={args.max_new_tokens}",
                              f"eval.num_draft_tokens={args.num_draft_tokens}", "eval.temperature=0.0"]
            else:
                overrides.append("eval.every=null")
            if name == "mlp_speculator":  # the whole vocabulary (its recipe's), one stage per draft token
                overrides.append(f"draft.n_predict={args.num_draft_tokens}")
            else:
                overrides.append(f"draft.draft_vocab_size={args.draft_vocab_size}")
            if name == "eagle3":
                overrides.append(f"draft.ttt_length={args.ttt_length}")
                if args.eagle3_aux_layer_ids:
                    overrides.append(f"target.aux_layer_ids=[{','.join(map(str, args.eagle3_aux_layer_ids))}]")
            trainer = Trainer(load_recipe(recipe_name, overrides + args.set))  # --set last: it wins
            trainer.setup()
            if not bigram_done:
                vocab = trainer.target.lm_head_weight.shape[0]
                bigram = BigramDrafter.from_examples(trainer.data.examples, vocab)
                report["bigram"] = _evaluate_all(trainer, bigram, prompts, args)
                bigram_done = True
                log(f"bigram: {_brief(report['bigram'])}")
            head = trainer.unwrapped_head()
            untrained = _evaluate_all(trainer, drafter_for(head), prompts, args)
            log(f"{name} untrained: {_brief(untrained)}")
            start = time.perf_counter()
            last = trainer.train()
            train_s = time.perf_counter() - start
            head.eval()
            trained = _evaluate_all(trainer, drafter_for(trainer.unwrapped_head()), prompts, args)
            log(f"{name} trained ({args.steps} steps, {args.tokens} tokens, {train_s:.0f} s): {_brief(trained)}")
            report["heads"][name] = {
                "recipe": recipe_name, "untrained": untrained, "trained": trained, "train_seconds": round(train_s, 1),
                "final_train_metrics": {k: v for k, v in last.items()
                                        if k.startswith(("acc_", "alpha_", "loss", "tau_hat"))},
            }
            if args.curve_every_steps:
                report["curves"][name] = _curve(run_dir, untrained, trained, args.tokens_per_batch)
            if save is not None:
                save(report)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    t1 = {n: h["trained"]["1.0"]["tau"] for n, h in report["heads"].items()}
    if {"eagle3", "eagle1", "mlp"} <= set(t1):
        report["ordering_eagle3_gt_eagle1_gt_mlp_at_T1"] = t1["eagle3"] > t1["eagle1"] > t1["mlp"]
    t0 = {n: h["trained"]["0.0"]["tau"] for n, h in report["heads"].items()}
    if {"mlp_speculator", "mlp"} <= set(t0) and "bigram" in report:
        report["mlp_speculator_gt_mlp_and_bigram_at_T0"] = t0["mlp_speculator"] > max(t0["mlp"],
                                                                                    report["bigram"]["0.0"]["tau"])
    if {"eagle3", "eagle1"} <= set(t0):
        report["eagle3_over_eagle1_tau_T0"] = t0["eagle3"] / t0["eagle1"]
    return report


def _brief(by_t: dict) -> str:
    return ", ".join(f"T={t}: tau {r['tau']:.3f}" for t, r in by_t.items())


def format_table(report: dict) -> str:
    """The report as a text table: τ greedy and at T=1, trained and untrained, with the bigram."""
    rows = [f"{'draft':<15} {'tau T=0':>8} {'tau T=1':>8} {'untrained T=0':>14} {'untrained T=1':>14} {'acc_0':>6}"]
    for name, h in report["heads"].items():
        acc0 = h["final_train_metrics"].get("acc_0", float("nan"))
        rows.append(f"{name:<15} {h['trained']['0.0']['tau']:>8.3f} {h['trained']['1.0']['tau']:>8.3f} "
                    f"{h['untrained']['0.0']['tau']:>14.3f} {h['untrained']['1.0']['tau']:>14.3f} {acc0:>6.3f}")
    if "bigram" in report:
        b = report["bigram"]
        rows.append(f"{'bigram':<15} {b['0.0']['tau']:>8.3f} {b['1.0']['tau']:>8.3f} {'':>14} {'':>14} {'':>6}")
    for name, curve in report.get("curves", {}).items():
        rows.append(f"{name} greedy tau by training tokens: "
                    + ", ".join(f"{p['tokens']}: {p['tau_T0']:.3f}" for p in curve))
    return "\n".join(rows)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit('error: --plot needs matplotlib: pip install -e ".[bench]" (or leave --plot out)') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_tau_curves(report: dict, path: Path) -> None:
    """τ against training tokens as a PNG: one line per head (greedy, solid; T=1 at the ends, dotted
    markers), the bigram as horizontal lines. Needs matplotlib (the `bench` extra)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, curve in report["curves"].items():
        (line,) = ax.plot([p["tokens"] for p in curve], [p["tau_T0"] for p in curve], marker="o", label=f"{name} T=0")
        ends = [p for p in curve if "tau_T1" in p]
        ax.plot([p["tokens"] for p in ends], [p["tau_T1"] for p in ends], linestyle=":", marker="s",
                color=line.get_color(), label=f"{name} T=1")
    if "bigram" in report:
        for t, style in (("0.0", "--"), ("1.0", ":")):
            ax.axhline(report["bigram"][t]["tau"], color="gray", linestyle=style, label=f"bigram T={t[0]}")
    s = report["settings"]
    ax.set(xlabel="training tokens per head", ylabel=f"τ (tokens per target forward, k={s['num_draft_tokens']})",
           title=f"draft quality on {s['target']} ({s['prompts']} held-out prompts)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def add_arguments(parser) -> None:
    from eagle_online.losses import LOSSES

    parser.add_argument("--target", choices=list(TARGETS), default="tiny",
                        help="tiny (default; recipes tiny_*) or smollm2 (SmolLM2-135M-Instruct, recipes smollm2_*)")
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS), metavar="HEAD",
                        help="heads to train, from eagle3 eagle1 mlp mlp_speculator (default: all four; "
                        "mlp_speculator trains over the whole vocabulary with n_predict = --num-draft-tokens)")
    parser.add_argument("--tokens", type=int, help="training tokens per head, the same for all (steps = tokens / "
                        "tokens-per-batch); default: smollm2 1000000")
    parser.add_argument("--steps", type=int, help="optimizer steps per head instead of --tokens; default: tiny 300")
    parser.add_argument("--curve-every", type=int, metavar="N",
                        help="measure greedy τ during training every N tokens (N < tokens-per-batch: every N "
                        "steps) for the learning curves; default: none, τ at the end only")
    parser.add_argument("--rows", type=int, help="records of the recipe's data source trained on (default: tiny "
                        "1000 ShareGPT rows, smollm2 2000: all of builtin:smollm2-replies)")
    parser.add_argument("--tokens-per-batch", type=int,
                        help="packed tokens per step (default: tiny 4096, smollm2 2048)")
    parser.add_argument("--max-length", type=int, help="tokens per conversation, longer ones cut (default: tiny "
                        "512, smollm2 1024; at most tokens-per-batch)")
    parser.add_argument("--ttt-length", type=int, default=7, help="EAGLE-3's TTT unroll (default 7)")
    parser.add_argument("--eagle3-aux-layer-ids", type=int, nargs=3, metavar="ID",
                        help="EAGLE-3's feature layers (default: tiny [2, 4, 7], the deepest the 8-layer target "
                        "allows, see launch/QUALITY.md; smollm2: the recipe's, the engines' [2, N//2, N-3])")
    parser.add_argument("--draft-vocab-size", type=int,
                        help="EAGLE-3/MLP draft vocabulary (default: tiny 4096, its whole vocabulary, as EAGLE-1/2 "
                        "drafts over the target's whole lm_head; smollm2 8192, its recipes')")
    parser.add_argument("--prompts", type=int, default=16, help="held-out prompts for τ (default 16)")
    parser.add_argument("--prompt-skip", type=int, default=5000, help="ShareGPT rows skipped before the prompts")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt (default 64)")
    parser.add_argument("-k", "--num-draft-tokens", type=int, help="tokens drafted per target forward (default: "
                        "tiny 4, smollm2 5)")
    parser.add_argument("--loss", choices=LOSSES, default="kl", help="draft.loss of every head trained (default kl; "
                        "lk_lambda with the recipe's s and d)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override for every head trained, applied after the bench's own, as on "
                        "train.py's command line (e.g. --set training.lr=1e-3 --set draft.feature_scale=per_layer); "
                        "repeatable, kept in the report's settings")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=25,
                        help="steps between metrics.jsonl rows (default 25; every step with --curve-every)")
    parser.add_argument("--work-dir", help="keep the runs here (default: a temporary directory, removed)")
    parser.add_argument("--out", type=Path, help="write the report as JSON")
    parser.add_argument("--plot", type=Path, help="write the learning curves as a PNG (needs --curve-every and "
                        "matplotlib)")


def main(args) -> int:
    resolve_settings(args)
    if args.plot and not args.curve_every_steps:
        raise SystemExit("error: --plot draws the learning curves: add --curve-every N")
    if args.plot:
        _pyplot()  # fail before hours of training, not after
    if args.set:  # a key some head's recipe refuses fails now, not after the heads before it have trained
        from eagle_online.recipe import load_recipe
        for name in args.heads:
            load_recipe(TARGETS[args.target]["recipes"][name], args.set)
    def save(report: dict) -> None:  # after every head: a run stopped later keeps what it measured
        if args.out:
            tmp = args.out.with_name(args.out.name + ".tmp")
            tmp.write_text(json.dumps(report, indent=2) + "\n")
            tmp.replace(args.out)
        if args.plot and report["curves"]:
            plot_tau_curves(report, args.plot)

    report = run_quality(args, save=save)
    print(format_table(report))
    if "ordering_eagle3_gt_eagle1_gt_mlp_at_T1" in report:
        print(f"EAGLE-3 > EAGLE-1 > MLP at T=1: {report['ordering_eagle3_gt_eagle1_gt_mlp_at_T1']}")
    save(report)
    return 0
