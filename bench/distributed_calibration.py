"""Distributed calibration on the CPU: the calibrate stage's dense pass on SmolLM2-135M in one process
against ``torchrun --nproc-per-node 2`` (gloo), every statistic kind at once (Wanda's squared norms,
FLAP's sums for mean and variance, SmoothQuant's maxima, SparseGPT's X^T X).

Protocol: SmolLM2-135M-Instruct from its GGUF Q4_1 file, dequantized to fp32 (as bench/recovery_smollm2.py
loads it); the calibrate stage's own batches (built-in text, seeded 512-token windows, batch 4); the
pipeline's own pass (stages/calibrate.py dense_statistics). Three launches, each a fresh process group:
one process with 1 thread, one process with 2 threads (the same cores as two ranks), and two ranks of
1 thread each (OMP_NUM_THREADS=1). Rank 0 times the pass from a barrier to the last all-reduce and
saves the statistics; the driver compares them with the single-process ones: per statistic field, the
largest |distributed - single| over the largest |single| of any Linear (summation order is the only
difference), and whether the maxima and token counts are identical.

    python bench/distributed_calibration.py [--samples 16] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, SMOLLM2, table, write_json

KINDS = ["sq_norm", "mean_var", "abs_max", "hessian"]


def measure(samples: int, seq_len: int, out: str) -> None:
    """One launch (a single process, or one rank under torchrun): the dense pass, timed; rank 0 saves."""
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT))
    from calibration import distributed
    from calibration.spec import CalibrationSpec
    from models import loading as models
    from models.adapters import adapter_for
    from models.spec import ModelSpec
    from stages.calibrate import dense_statistics
    from tasks import TASKS

    spec = ModelSpec(source=SMOLLM2, task="causal-lm")
    source, task = models.resolve_source(spec), TASKS["causal-lm"]
    model, tokenizer = models.load_model(spec, source, task)
    batches = task.calibration_batches(tokenizer, CalibrationSpec(source="builtin", num_samples=samples,
                                                                  seq_len=seq_len, batch_size=4))
    world = distributed.from_env(torch.device("cpu"))
    job = {"digest": "-", "kinds": KINDS, "dtype": "float32", "batches": batches}
    if world:
        dist.barrier()
    t0 = time.perf_counter()
    stats = dense_statistics(model, adapter_for(source.model_type, "causal-lm"), job, world)
    seconds = time.perf_counter() - t0
    if world is None or world.rank == 0:
        torch.save({"seconds": seconds, "batches": len(batches), "stats": stats}, out)
    if world:
        dist.destroy_process_group()


def launch(samples: int, seq_len: int, out: Path, procs: int, threads: int) -> float:
    """Wall seconds of one launch, model loading included."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    script = [str(Path(__file__).resolve()), "--measure", str(out), "--samples", str(samples),
              "--seq-len", str(seq_len)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs)]
    cmd = ["nice"] + (torchrun if procs > 1 else [sys.executable]) + script
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def compare(single: dict, other: dict) -> dict:
    """Per field, max over Linears of max|other - single| / max|single|; maxima and counts: identical or not."""
    worst: dict[str, float] = {}
    exact = {"abs_max": True, "tokens": True, "sequences": True}
    for name, fields in single.items():
        for key, t in fields.items():
            u = other[name][key]
            if key in exact:
                exact[key] &= bool((u == t).all())
            else:
                rel = float((u.double() - t.double()).abs().max() / t.double().abs().max().clamp_min(1e-300))
                worst[key] = max(worst.get(key, 0.0), rel)
    return {"max_relative_difference": worst, "identical": exact}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        measure(args.samples, args.seq_len, args.measure)
        return
    import torch

    rows, runs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, procs, threads in (("1 process x 1 thread", 1, 1), ("1 process x 2 threads", 1, 2),
                                      ("2 processes x 1 thread (torchrun, gloo)", 2, 1)):
            out = Path(tmp) / f"{procs}-{threads}.pt"
            wall = launch(args.samples, args.seq_len, out, procs, threads)
            saved = torch.load(out)
            runs[label] = {"processes": procs, "threads_per_process": threads, "pass_seconds": round(saved["seconds"], 1),
                           "wall_seconds": round(wall, 1), "stats": saved["stats"], "batches": saved["batches"]}
    base = runs["1 process x 1 thread"]
    reference = base["stats"]
    for label, r in runs.items():
        r.update(compare(reference, r.pop("stats")))
        rows.append([label, r["pass_seconds"], r["wall_seconds"],
                     f"{max(r['max_relative_difference'].values()):.1e}", all(r["identical"].values())])
    print(table(["launch", "dense pass s", "wall s", "max rel. diff", "maxima/counts identical"], rows))
    path = write_json("distributed-calibration", {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32)",
        "calibration": {"windows": args.samples, "seq_len": args.seq_len, "batch_size": 4,
                        "batches": base["batches"], "kinds": KINDS},
        "note": "pass_seconds: the dense pass alone (rank 0, barrier to last all-reduce); wall_seconds: the launch, "
                "model loading included; shared 2-core machine, other jobs running",
        "runs": runs})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
