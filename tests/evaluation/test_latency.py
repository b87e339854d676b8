"""Latency: warmup, then dense and compressed alternate in rounds on the first batch."""

from __future__ import annotations

import time

import torch

from calibration.batches import Batch, Batches
from evaluation.latency import LATENCY_ROUNDS, latency
from evaluation.spec import LatencySpec


def test_rounds_alternate_and_the_speedup_is_the_median_ratio():
    calls = []

    def runner(name, seconds):
        def run(inputs):
            calls.append((name, inputs["x"].shape[0]))
            time.sleep(seconds)
        return run

    batches = Batches([Batch({"x": torch.zeros(3, 1)}), Batch({"x": torch.zeros(1, 1)})], "x")
    out = latency(runner("d", 0.004), runner("c", 0.001), batches, LatencySpec(warmup=2, iterations=10, threads=3))
    per_round = 10 // LATENCY_ROUNDS
    assert calls[:4] == [("d", 3), ("d", 3), ("c", 3), ("c", 3)]  # warmup, on the first batch only
    timed = [n for n, _ in calls[4:]]
    assert timed == (["d"] * per_round + ["c"] * per_round) * LATENCY_ROUNDS
    assert out["runs"] == 10 and out["batch_size"] == 3 and out["threads"] == 3
    assert out["dense"]["median_ms"] > out["compressed"]["median_ms"] >= 1.0
    assert out["speedup"] == round(out["dense"]["median_ms"] / out["compressed"]["median_ms"], 3) > 1
    assert abs(out["dense"]["throughput_per_s"] - 3e3 / out["dense"]["median_ms"]) < 0.5
