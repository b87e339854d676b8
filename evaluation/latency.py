"""Latency of the dense and the compressed graph, alternating in rounds so machine noise hits both alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from calibration.batches import Batches

from .runner import Runner
from .spec import LatencySpec

LATENCY_ROUNDS = 5


def runs(spec: LatencySpec) -> int:
    """How many times `latency` runs a graph, warm-up included, both graphs together (a progress bar's total)."""
    return 2 * (spec.warmup + max(1, spec.iterations // LATENCY_ROUNDS) * LATENCY_ROUNDS)


def latency(dense: Runner, compressed: Runner, batches: Batches, spec: LatencySpec,
            tick: Callable[[], None] = lambda: None) -> dict:
    """Median milliseconds and throughput of each on the first batch, and the speedup; ``tick`` after each run."""
    inputs = batches.batches[0].inputs
    for run in (dense, compressed):
        for _ in range(spec.warmup):
            run(inputs)
            tick()
    times = {"dense": [], "compressed": []}
    per_round = max(1, spec.iterations // LATENCY_ROUNDS)
    for _ in range(LATENCY_ROUNDS):
        for key, run in (("dense", dense), ("compressed", compressed)):
            for _ in range(per_round):
                t = time.perf_counter()
                run(inputs)
                times[key].append(time.perf_counter() - t)
                tick()
    batch = batches.batches[0].size
    out = {"threads": spec.threads, "batch_size": batch, "runs": per_round * LATENCY_ROUNDS}
    for key, ts in times.items():
        med = statistics.median(ts)
        out[key] = {"median_ms": round(med * 1e3, 3), "throughput_per_s": round(batch / med, 2)}
    out["speedup"] = round(out["dense"]["median_ms"] / out["compressed"]["median_ms"], 3)
    return out
