"""Sweep of 12 MiniLM recipes (recipes/sweep-minilm.yaml): one by one (--serial) against local Ray.

Each mode runs `python -m pipeline sweep` in a child process into its own folder with its own cold cache
(PIPELINE_CACHE), so neither reuses the other's statistics or dense graphs; within a mode the runs share
them, as a sweep does. Serial: one process, PyTorch on every core. Ray: `--num-cpus 2`, one CPU (one
thread) per task, two runs at a time. Writes bench/results/sweep-minilm.json (wall time each way,
every run's metrics in both) and copies the Ray sweep's pareto.png to bench/results/sweep-minilm-pareto.png.

    nice python bench/sweep_minilm.py [--modes serial ray]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SWEEP = ROOT / "recipes" / "sweep-minilm.yaml"
OUT = RESULTS / "runs" / "sweep-minilm"
JSON = RESULTS / "sweep-minilm.json"
FLAGS = {"serial": ["--serial"], "ray": ["--num-cpus", "2"]}


def run_mode(mode: str) -> dict:
    """One cold sweep: its wall time, exit code and sweep.json."""
    out = OUT / mode
    shutil.rmtree(out, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f"sweep-cache-{mode}-") as cache:
        env = {**os.environ, "PIPELINE_CACHE": cache}
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pipeline", "sweep", str(SWEEP), "--output", str(out),
                               *FLAGS[mode]], cwd=ROOT, env=env, capture_output=True, text=True)
        wall = round(time.perf_counter() - t0, 1)
    print(proc.stdout.strip(), proc.stderr.strip().splitlines()[-3:], sep="\n")
    record = json.loads((out / "sweep.json").read_text())
    return {"wall_seconds": wall, "exit_code": proc.returncode, "load_average_at_start": round(load, 2),
            "statuses": {s: sum(r["status"] == s for r in record["runs"]) for s in ("done", "skipped", "failed")},
            "best": record["best"], "pareto_front": record["pareto_front"], "runs": record["runs"]}


def per_run(modes: dict) -> list[dict]:
    names = [r["name"] for r in next(iter(modes.values()))["runs"]]
    out = []
    for name in names:
        row: dict = {"name": name}
        for mode, m in modes.items():
            r = next(x for x in m["runs"] if x["name"] == name)
            size = (r["size"] or {}).get("compressed", {})
            row[mode] = {"status": r["status"], "seconds": r["seconds"], "error": r["error"],
                         "mean_cosine": (r["metrics"] or {}).get("mean_cosine"),
                         "median_ms": (r["speed"] or {}).get("median_ms"), "speedup": (r["speed"] or {}).get("speedup"),
                         "onnx_bytes": size.get("onnx_bytes"),
                         "accepted": (r["verdict"] or {}).get("accepted")}
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", nargs="+", choices=list(FLAGS), default=list(FLAGS))
    args = ap.parse_args()
    previous = json.loads(JSON.read_text()) if JSON.is_file() else {}
    modes = {k: {**v, "runs": json.loads((OUT / k / "sweep.json").read_text())["runs"]}  # kept from an earlier call
             for k, v in previous.get("modes", {}).items() if k not in args.modes and (OUT / k / "sweep.json").is_file()}
    for mode in args.modes:
        modes[mode] = run_mode(mode)
        print(f"{mode}: {modes[mode]['wall_seconds']} s, {modes[mode]['statuses']}")
    ordered = {m: modes[m] for m in FLAGS if m in modes}
    result = {
        "command": "python bench/sweep_minilm.py (python -m pipeline sweep recipes/sweep-minilm.yaml)",
        "date": date.today().isoformat(),
        "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, no GPU; shared with other jobs (load average "
                   "recorded per mode)",
        "runs": len(next(iter(ordered.values()))["runs"]),
        "modes": {m: {k: v for k, v in d.items() if k != "runs"} for m, d in ordered.items()},
        "per_run": per_run(ordered),
    }
    if "serial" in ordered and "ray" in ordered:
        result["ray_speedup_over_serial"] = round(ordered["serial"]["wall_seconds"] / ordered["ray"]["wall_seconds"], 3)
    JSON.write_text(json.dumps(result, indent=1) + "\n")
    plot_from = "ray" if "ray" in ordered else "serial"
    if (OUT / plot_from / "pareto.png").is_file():
        shutil.copy(OUT / plot_from / "pareto.png", RESULTS / "sweep-minilm-pareto.png")
    print(f"wrote {JSON}")


if __name__ == "__main__":
    main()
