"""Benchmarks behind `launch/bench.py SUBCOMMAND`, one module each.

Each module exposes `add_arguments(parser)` and `main(args) -> int`; it writes its figures as JSON
(`--out`) and prints a table. Speed and memory goals are shown here, never by timed tests.
"""
from __future__ import annotations

# subcommand -> module (imported only when that subcommand runs, so one benchmark's optional
# dependencies never stop another from starting)
SUBCOMMANDS: dict[str, str] = {
    "throughput": "eagle_online.bench.throughput",
    "serve": "eagle_online.bench.serve",
    "quality": "eagle_online.bench.quality",
}
