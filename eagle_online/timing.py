"""Wall-clock timing of a step's phases, and peak memory, on CPU and CUDA alike.

GPU work is asynchronous: a phase timed without synchronising measures how long the host took to
queue its kernels, not how long they ran. `StepTimer(sync=True)` synchronises the device around
every phase (what the throughput benchmark does to split a step); the trainer times without
syncing, so timing never slows training.
"""
from __future__ import annotations

import resource
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

# The phases of one online training step, in the order they run.
PHASES = ("data", "target", "teacher", "head_forward", "head_backward", "optimizer")


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for queued device work (a no-op on CPU)."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device is None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class StepTimer:
    """Accumulates seconds per named phase; `sync` synchronises `device` before and after each."""

    def __init__(self, sync: bool = False, device: torch.device | str | None = None):
        self.sync = sync
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str):
        if self.sync:
            synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                synchronize(self.device)
            self.seconds[name] += time.perf_counter() - start

    def total(self, *names: str) -> float:
        """Seconds spent in the given phases (all phases when none are named)."""
        return sum(v for k, v in self.seconds.items() if not names or k in names)


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new peak-memory window: CUDA's allocator statistics, or the process's RSS high-water mark
    (Linux resets it when "5" is written to /proc/self/clear_refs; elsewhere the window is the process)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_bytes(device: torch.device | str) -> int:
    """Peak memory since `reset_peak_memory`: CUDA tensors allocated (`max_memory_allocated`) on a GPU,
    the process's peak resident set size on CPU (everything, the Python interpreter included)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # kilobytes on Linux
