"""Benchmarks behind `launch/bench.py SUBCOMMAND`, one module each.

Each module exposes `add_arguments(parser)` and `main(args) -> int`; it writes its figures as JSON
(`--out`) and prints a table. Speed and memory goals are shown here, never by timed tests. They drive
the trainer through its public API only (`Trainer.setup`, `train`, `train_step` and its phases), so they
live beside the entry points, outside the library.
"""
from __future__ import annotations

# subcommand -> module of this package (imported only when that subcommand runs, so one benchmark's
# optional dependencies never stop another from starting)
SUBCOMMANDS: dict[str, str] = {
    "throughput": "throughput",
    "serve": "serve",
    "quality": "quality",
}
