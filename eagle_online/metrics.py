"""Metrics through accelerate's trackers, as `training.trackers` names them: JSONL (one line per logged
step, flushed as it is written, so an interrupted run loses nothing), TensorBoard when it is installed,
wandb and mlflow. metrics.jsonl keeps the flat keys other code reads (`loss`, `acc_0`, `eval_tau`);
the other trackers get them grouped as `train/…` and `eval/…` tags."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

from accelerate.tracking import GeneralTracker, on_main_process

from eagle_online.errors import RecipeError

METRICS_FILE = "metrics.jsonl"


class JSONLTracker(GeneralTracker):
    """Appends `{"step": N, ...metrics}` lines to RUN_DIR/metrics.jsonl."""

    name = "jsonl"
    requires_logging_directory = False

    @on_main_process
    def __init__(self, run_dir: str | Path):
        super().__init__()
        self.path = Path(run_dir) / METRICS_FILE

    @property
    def tracker(self):
        return self.path

    @on_main_process
    def store_init_configuration(self, values: dict):
        pass  # the resolved recipe is written beside the metrics as recipe.yaml

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")


def installed(name: str) -> bool:
    """Whether a tracker's package can be imported (TensorBoard: tensorboard or tensorboardX)."""
    if name == "jsonl":
        return True
    if name == "tensorboard":
        return bool(importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"))
    return importlib.util.find_spec(name) is not None


def trackers(run_dir: str | Path, names=("jsonl", "tensorboard")) -> list:
    """The trackers a run logs to, for accelerate's `log_with`. TensorBoard that is not installed is left
    out (the banner says so: it is a default); a named wandb or mlflow that is not installed is an error."""
    out: list = []
    for name in dict.fromkeys(names):
        if name == "jsonl":
            out.append(JSONLTracker(run_dir))
        elif installed(name):
            out.append(name)
        elif name != "tensorboard":
            raise RecipeError(f"training.trackers: {name} is not installed; `pip install {name}`, or remove it from "
                              "training.trackers")
    return out


def tag(key: str) -> str:
    """A metric's tracker tag: `eval_tau` → `eval/tau`, anything else → `train/<key>`."""
    return "eval/" + key.removeprefix("eval_") if key.startswith("eval_") else "train/" + key


def log_metrics(accelerator, values: dict, step: int) -> None:
    """Log one step's metrics: flat keys to metrics.jsonl, `train/` and `eval/` tags to the other trackers
    (accelerate keeps trackers on the main process only, so other ranks log nothing)."""
    grouped = {tag(k): v for k, v in values.items()}
    for tracker in accelerator.trackers:
        tracker.log(values if tracker.name == JSONLTracker.name else grouped, step=step)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The logged rows of a run, in order."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(run_dir: str | Path, step: int) -> None:
    """Drop rows logged after `step` (a resumed run logs those steps again)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return
    rows = [r for r in read_metrics(run_dir) if r["step"] is None or r["step"] <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def tau_figures(rows: list[dict]) -> dict:
    """τ as a run measured it, from its metrics rows: the last evaluation and the best (`{"step", "tau",
    "prompts"}`, or None without any), and the floors measured before training (`untrained`, `bigram`:
    a number, or absent)."""
    evals = [r for r in rows if "eval_tau" in r and r.get("step")]
    out: dict = {"last": None, "best": None}
    if evals:
        pick = lambda r: {"step": r["step"], "tau": r["eval_tau"], "prompts": int(r.get("eval_prompts", 0))}
        out["last"] = pick(evals[-1])
        out["best"] = pick(max(evals, key=lambda r: r["eval_tau"]))
    at = {}  # eval.final_temperatures: {"T0": {"draft", "untrained", "bigram"}}, the last value of each
    for r in rows:
        for floor in ("untrained", "bigram"):
            if f"eval_tau_{floor}" in r:
                out[floor] = r[f"eval_tau_{floor}"]
        for key, value in r.items():
            match = _AT_TEMPERATURE.fullmatch(key)
            if match:
                at.setdefault(match["t"], {})[match["who"] or "draft"] = value
    if at:
        out["at_temperatures"] = at
    return out


_AT_TEMPERATURE = re.compile(r"eval_tau_(?:(?P<who>untrained|bigram)_)?(?P<t>T\S+)")  # temperature_key's names


def temperature_key(temperature: float) -> str:
    """How a temperature is written in metric names: `T0`, `T1`, `T0.7`."""
    return f"T{temperature:g}"
