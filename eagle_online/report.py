"""What a run tells its user: the banner at the start, a plain line every `log_every` steps, a line
after each evaluation, the summary at the end, and the curves drawn from metrics.jsonl.

All of it is text built from plain values (the trainer gathers them), so the tests read exactly what a
user reads. Only rank 0 prints.
"""
from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from eagle_online.export import tau_line, tau_table
from eagle_online.metrics import read_metrics

# A target above this many parameters is "not tiny": training it on a CPU is almost certainly a mistake
# (a launcher config that asked for a GPU on a machine without CUDA trains on the CPU without a word).
# The shipped tiny target has 2.7M; the smallest real chat models (SmolLM2-135M) are above it.
CPU_WARNING_PARAMS = 50_000_000
# SmolLM2-135M-Instruct's training rate on 2 CPU cores (target forward and an EAGLE-1/2 head, fp32; ~130 with
# EAGLE-3's 7 TTT steps): launch/QUALITY.md. The CPU warning scales it by parameters for its estimate.
CPU_TOKENS_PER_S_135M = 180
CURVES_NAME = "curves.svg"


def human_count(n: float) -> str:
    """2_700_000 → 2.7M."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def human_time(seconds: float) -> str:
    """3725 → 1h02m05s; 65 → 1m05s; 4.2 → 4.2s."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


# ---------------------------------------------------------------------------------------- banner
@dataclass
class Setup:
    """What the banner shows: the run as set up, before the first step."""

    name: str
    output_dir: str
    device: str  # "cuda:0 (NVIDIA H100)" or "cpu"
    cuda: bool
    world: int
    local_world: int
    target: str
    target_params: int
    target_dtype: str
    sharding: str
    precision: str
    architecture: str
    head_params: int
    draft_vocab: int
    ttt_length: int | None
    loss: str  # draft.loss, with lk_lambda's s and d
    total_steps: int
    steps_per_epoch: int
    start_step: int
    tokens_per_step_max: int
    tokens_per_step_mean: float
    micro_tokens: int
    accumulation: int
    lr: float
    schedule: str
    eval_desc: str
    checkpoint_every: int
    keep_checkpoints: int
    export: str
    trackers: list[str]
    tensorboard_missing: bool
    resumed_from: str | None = None
    launched_by_accelerate: bool = False
    warnings: list[str] = field(default_factory=list)


def cpu_warning(setup: Setup) -> str | None:
    """The loud warning for a target that is not tiny about to train on a CPU, or None. It estimates the
    run's time from SmolLM2-135M's measured rate (CPU_TOKENS_PER_S_135M), scaled by parameters: a guess
    that says whether the run is minutes or weeks, not a measurement of this machine."""
    if setup.cuda or setup.target_params <= CPU_WARNING_PARAMS:
        return None
    rate = CPU_TOKENS_PER_S_135M * 135e6 / setup.target_params
    step = setup.tokens_per_step_mean / rate
    remaining = max(setup.total_steps - setup.start_step, 0) * step
    bar = "!" * 100
    return (f"{bar}\nWARNING: training a {human_count(setup.target_params)}-parameter target on the CPU: torch sees no "
            f"CUDA device here.\nSmolLM2-135M trains at ~{CPU_TOKENS_PER_S_135M} tokens/s on 2 CPU cores; scaled to "
            f"this target, a step of ~{setup.tokens_per_step_mean:,.0f} tokens takes ~{human_time(step)} and the "
            f"{max(setup.total_steps - setup.start_step, 0):,} steps ~{human_time(remaining)}.\nIf a GPU was meant "
            "(e.g. --config_file launch/accelerate/1gpu.yaml), check `nvidia-smi` and\n"
            "`python -c 'import torch; print(torch.cuda.is_available())'` (a CPU-only torch wheel?). "
            f"Stop with Ctrl-C now; nothing is lost.\n{bar}")


def world_note(setup: Setup) -> str | None:
    """A hint when accelerate started one process on a machine without CUDA: `accelerate launch
    --num_processes N` there runs a single process without a word (torchrun starts N)."""
    if setup.world == 1 and not setup.cuda and setup.launched_by_accelerate:
        return ("note: 1 process. On a CPU `accelerate launch --num_processes N` starts one; use "
                "`torchrun --nproc_per_node N launch/train.py ...` for N CPU processes")
    return None


def format_banner(s: Setup) -> str:
    """The run's banner: everything that decides what the run does and where it writes, one line each."""
    nodes = max(1, s.world // max(1, s.local_world))
    ranks = f"ranks 0-{s.world - 1}" if s.world > 1 else "rank 0"
    where = f" on {nodes} nodes" if nodes > 1 else ""
    epochs = s.total_steps / s.steps_per_epoch
    start = f", resuming at step {s.start_step} ({s.resumed_from})" if s.resumed_from else ", from step 0"
    tracker_text = ", ".join(s.trackers) or "none"
    if s.tensorboard_missing:
        tracker_text += " (TensorBoard is not installed: `pip install tensorboard` to get RUN/tensorboard)"
    elif "tensorboard" in s.trackers:
        tracker_text += f" (tensorboard --logdir {Path(s.output_dir) / 'tensorboard'})"
    lines = [
        f"eagle_online run {s.name!r}",
        f"  device      {s.device}; {s.world} process{'es' if s.world > 1 else ''} ({ranks}{where})",
        f"  target      {s.target}: {human_count(s.target_params)} parameters, {s.target_dtype}, sharding {s.sharding}",
        f"  precision   {s.precision}",
        f"  draft       {s.architecture}: {human_count(s.head_params)} trainable parameters, draft vocabulary "
        f"{s.draft_vocab}" + (f", TTT {s.ttt_length}" if s.ttt_length else "") + f", loss {s.loss}",
        f"  steps       {s.total_steps} ({epochs:.3g} epoch{'s' if epochs != 1 else ''} of {s.steps_per_epoch} "
        f"steps){start}",
        f"  batch       {s.micro_tokens} tokens per micro-batch × {s.accumulation} accumulation × {s.world} "
        f"process{'es' if s.world > 1 else ''} = at most {s.tokens_per_step_max:,} tokens per optimizer step "
        f"({s.tokens_per_step_mean:,.0f} on average, packed)",
        f"  lr          {s.lr:g}, {s.schedule}",
        f"  eval        {s.eval_desc}",
        f"  checkpoints every {s.checkpoint_every} steps, the newest {s.keep_checkpoints} kept; {s.export}",
        f"  output      {s.output_dir}",
        f"  trackers    {tracker_text}",
    ]
    notes = [n for n in (world_note(s), *s.warnings) if n]
    return "\n".join(lines + notes)


# ------------------------------------------------------------------------------------- log lines
def format_step_line(step: int, total: int, metrics: dict, elapsed: float, session_steps: int) -> str:
    """One plain progress line (no terminal, or training.progress_bar=false): step, loss, acc_0,
    tokens/s, lr, time spent and left (from this session's pace)."""
    eta = elapsed / session_steps * (total - step) if session_steps else float("nan")
    return (f"step {step}/{total} ({step / total:.0%}) loss {metrics['loss']:.4f} acc_0 {metrics['acc_0']:.3f} "
            f"tok/s {metrics['tokens_per_s']:,.0f} lr {metrics['lr']:.3g} elapsed {human_time(elapsed)} "
            f"eta {human_time(eta)}")


def format_eval_line(step: int, tau: float, best: dict | None, floors: dict) -> str:
    """`eval τ 1.623 at step 100 (best 1.700 at step 50; floors: untrained 1.020, bigram 1.410)`."""
    text = f"eval τ {tau:.3f} at step {step}"
    extra = []
    if best and best["step"] == step:
        extra.append("the best so far")
    elif best:
        extra.append(f"best {best['tau']:.3f} at step {best['step']}")
    listed = [f"{k} {floors[k]:.3f}" for k in ("untrained", "bigram") if floors.get(k) is not None]
    if listed:
        extra.append("floors: " + ", ".join(listed))
    return text + (f" ({'; '.join(extra)})" if extra else "")


def format_floors_line(floors: dict) -> str:
    """The floors measured before training: `floors before training: untrained τ 1.020, bigram τ 1.410`."""
    listed = [f"{k} τ {floors[k]:.3f}" for k in ("untrained", "bigram") if floors.get(k) is not None]
    return "floors before training: " + (", ".join(listed) or "none")


# --------------------------------------------------------------------------------------- summary
def format_summary(*, run_dir, name: str, steps: int, total_steps: int, start_step: int, wall: float,
                   train_wall: float, tokens: float, final: dict, tau: dict, export: dict | None,
                   curves: Path | None) -> str:
    """The summary at the end of a run. `final`: the last step's metrics; `tau`: export.tau_line's figures
    (last, best, floors, settings); `export`: {"path", "checkpoint", "why", "serve"} or {"skipped": reason}."""
    accs = [final[f"acc_{k}"] for k in range(len(final)) if f"acc_{k}" in final]
    rate = tokens / train_wall if train_wall > 0 else 0.0
    done = "finished" if steps >= total_steps else "stopped"
    lines = [
        f"eagle_online run {name!r} {done}: step {steps} of {total_steps}"
        + (f" (this session: from step {start_step})" if start_step else ""),
        f"  time        {human_time(wall)} in all, {human_time(train_wall)} training (evaluations included): "
        f"{tokens:,.0f} tokens, {rate:,.0f} tokens/s",
    ]
    if accs:
        loss, tau_hat = final.get("loss", float("nan")), final.get("tau_hat", float("nan"))
        lines.append(f"  final       loss {loss:.4f}, τ̂ {tau_hat:.3f}; acc per TTT step "
                     + " ".join(f"{a:.3f}" for a in accs))
    lines.append(f"  τ           {tau_line(tau)}")
    lines += ["              " + row for row in tau_table(tau)]
    if export is None or "skipped" in (export or {}):
        why = (export or {}).get("skipped", "training.export_at_end=false")
        lines.append(f"  export      not written ({why}): python launch/export.py --run {run_dir}")
    else:
        lines.append(f"  export      {export['path']}  ←  {export['checkpoint']} ({export['why']}); "
                     "README.md and eagle_online.json there say what it is")
        serve = export.get("serve") or {}
        if serve:
            for key, label in (("vllm", "vLLM"), ("sglang", "SGLang"), ("vllm_speculators", "vLLM")):
                if key in serve:
                    lines.append(f"  {label:<12}{serve[key]}")
        else:
            lines.append("  serve       no engine serves this head (the MLP baseline): measure it with launch/eval.py")
    lines.append(f"  metrics     {Path(run_dir) / 'metrics.jsonl'}" + (f"; curves {curves}" if curves else ""))
    return "\n".join(lines)


def launched_by_accelerate() -> bool:
    """Whether `accelerate launch` started this process (it sets ACCELERATE_* variables)."""
    return any(k.startswith("ACCELERATE_") for k in os.environ)


# ---------------------------------------------------------------------------------------- curves
# (metric, title) panels, each drawn when the run logged it.
PANELS = (("loss", "loss"), ("acc_0", "acc_0 (train, first TTT step)"), ("tau_hat", "τ̂ from train accuracies"),
          ("eval_tau", "τ by speculative decoding (eval)"), ("lr", "learning rate"), ("tokens_per_s", "tokens/s"))


def curves_svg(rows: list[dict], title: str = "") -> str:
    """The run's curves as one self-contained SVG (no plotting library needed): a panel per metric the
    run logged, against the optimizer step; the eval panel marks the floors as dashed lines."""
    panels = [(k, t) for k, t in PANELS if any(k in r and r.get("step") for r in rows)]
    width, ph, cols = 460, 220, 2
    nrows = max(1, math.ceil(len(panels) / cols))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width * cols}" height="{ph * nrows + 30}" '
           'font-family="sans-serif" font-size="11">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="10" y="18" font-size="14">{html.escape(title)}</text>']
    floors = {k: r[f"eval_tau_{k}"] for r in rows for k in ("untrained", "bigram") if f"eval_tau_{k}" in r}
    for i, (key, label) in enumerate(panels):
        pts = [(r["step"], float(r[key])) for r in rows if key in r and r.get("step") and math.isfinite(r[key])]
        if pts:
            out += _panel((i % cols) * width + 50, (i // cols) * ph + 40, width - 70, ph - 50, pts, label,
                          floors if key == "eval_tau" else {})
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _panel(x0: float, y0: float, w: float, h: float, pts: list[tuple[int, float]], label: str,
           floors: dict[str, float]) -> list[str]:
    """One panel of curves_svg: the points as a line, the axes' ends labelled, the floors dashed."""
    xs, ys = [x for x, _ in pts], [y for _, y in pts] + list(floors.values())
    xmin, xmax, ymin, ymax = min(xs), max(xs), min(ys), max(ys)
    if ymax == ymin:
        ymin, ymax = ymin - 0.5, ymax + 0.5
    if xmax == xmin:
        xmax = xmin + 1

    def sx(x: float) -> float:
        return x0 + (x - xmin) / (xmax - xmin) * w

    def sy(y: float) -> float:
        return y0 + h - (y - ymin) / (ymax - ymin) * h

    out = [f'<text x="{x0}" y="{y0 - 6}" font-size="12">{html.escape(label)}</text>',
           f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#999"/>']
    out += [f'<text x="{x0 - 4}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>' for y in (ymin, ymax)]
    out += [f'<text x="{sx(x):.1f}" y="{y0 + h + 14}" text-anchor="middle">{x}</text>' for x in (xmin, xmax)]
    path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
    out.append(f'<polyline points="{path}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>')
    if len(pts) < 30:
        out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="#1f77b4"/>' for x, y in pts]
    for (name, value), color in zip(floors.items(), ("#d62728", "#2ca02c")):
        out.append(f'<line x1="{x0}" x2="{x0 + w}" y1="{sy(value):.1f}" y2="{sy(value):.1f}" stroke="{color}" '
                   'stroke-dasharray="4 3"/>')
        out.append(f'<text x="{x0 + w - 2}" y="{sy(value) - 3:.1f}" text-anchor="end" fill="{color}">{name} '
                   f'{value:.3f}</text>')
    return out


def write_curves(run_dir, out: Path | None = None, title: str = "") -> Path | None:
    """Write RUN_DIR/curves.svg (or `out`) from metrics.jsonl, atomically; None when nothing was logged."""
    rows = read_metrics(run_dir)
    if not any(r.get("step") for r in rows):
        return None
    out = Path(out) if out is not None else Path(run_dir) / CURVES_NAME
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(curves_svg(rows, title or str(run_dir)))
    tmp.replace(out)
    return out
