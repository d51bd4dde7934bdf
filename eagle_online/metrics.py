"""Metrics through accelerate's trackers: JSONL always (one line per logged step, flushed as it is
written, so an interrupted run loses nothing), TensorBoard when it is installed."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from accelerate.tracking import GeneralTracker, on_main_process

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


def trackers(run_dir: str | Path) -> list:
    """The trackers a run logs to: JSONL, plus TensorBoard (under RUN_DIR/tensorboard) when installed."""
    out: list = [JSONLTracker(run_dir)]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        out.append("tensorboard")
    return out


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
