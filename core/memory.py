"""Peak memory of one stage: the process's resident set and, on a GPU, torch's CUDA allocations.

Linux keeps the resident-set high-water mark (VmHWM in /proc/self/status) for the whole process;
writing 5 to /proc/self/clear_refs resets it, so each stage's peak is its own and not the largest
of every stage before it. Where the reset is not possible (another OS, a locked-down /proc) the
figure is the process's peak so far, and ``since`` says so.
"""

from __future__ import annotations

import math
import resource
import sys
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak(device: torch.device) -> dict:
    """Start a new peak; returns what the next `peak` reports beside it: what the peak covers
    ("stage" or "process") and the resident set at the start (MiB), what the stage found already held
    (the imported libraries, the model's skeleton, the calibration set), so its own share is the difference."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        _CLEAR_REFS.write_text("5")
        since = "stage"
    except OSError:
        since = "process"
    return {"since": since, "start_rss_mib": round(_resident_kib() / 1024, 1)}


def peak(device: torch.device, start: dict) -> dict:
    """The peaks since `reset_peak` (whose ``start`` it carries), in MiB: resident set, and CUDA
    allocations on a GPU. The kernel updates the high-water mark lazily, so a stage that only freed
    memory can read below its own start: the start, itself resident during the stage, bounds it."""
    high = max(round(_rss_high_water_kib() / 1024, 1), start["start_rss_mib"])
    out = {"peak_rss_mib": high, **start}
    if device.type == "cuda":
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def _status_kib(field: str) -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def _resident_kib() -> float:
    """The resident set now (the high-water mark where /proc is missing)."""
    now = _status_kib("VmRSS")
    return now if now is not None else _rss_high_water_kib()


def _rss_high_water_kib() -> float:
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return maxrss / 1024 if sys.platform == "darwin" else float(maxrss)


def row_slices(t: torch.Tensor, elements: int) -> list[slice]:
    """Slices of ``t``'s first axis of about ``elements`` entries each (at least one row): a large
    tensor worked on a slice at a time keeps its temporaries (upcasts, sorts) at that size."""
    step = max(1, elements // max(math.prod(t.shape[1:]), 1))
    return [slice(r, r + step) for r in range(0, t.shape[0], step)]
