"""How fast a bad recipe fails: ``python -m pipeline validate`` wall and CPU seconds per malformed input.

    python bench/fast_failure.py [--checkout DIR]...

Each case runs in a child process started from a checkout's root (default: this one; pass another
checkout, e.g. ``git archive`` of an older commit, to compare), twice, keeping the faster run; a run
is stopped after `TIMEOUT_S` (and at 4 GiB of memory). Writes bench/results/fast-failure.json.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, table, write_json

TIMEOUT_S = 120
REPEATS = 2
_BOMB_LEVELS = ", ".join(f"&a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9))
CASES: dict[str, str | None] = {
    "YAML syntax error": "name: x\nstages: [\n",
    "missing recipe file": None,
    "bad section (model.task)": "name: x\nmodel: {source: x, task: nope}\nstages: [{type: calibrate}]\n",
    "nested aliases (463 bytes)": "name: bomb\nmodel: {source: x, task: causal-lm}\nstages:\n- type: calibrate\n"
                                  f"  gradient_samples: [&a0 [a,a,a,a,a,a,a,a,a], {_BOMB_LEVELS}]\n",
    "bad stage argument (sparsity 1.5)": "name: x\nmodel: {source: /nonexistent, task: feature-extraction}\n"
                                         "stages: [{type: prune_weights, method: magnitude, sparsity: 1.5}]\n",
}


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def measure(checkout: Path, recipe: Path) -> dict:
    """One ``validate`` in a child process: exit code, wall and CPU seconds, the error line."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "validate", str(recipe)], cwd=checkout,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=_limit_memory)
    try:
        _, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"exit_code": None, "wall_s": None, "cpu_s": None, "stderr_lines": None, "line": "timed out"}
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # cumulative: the caller subtracts
    lines = err.strip().splitlines()
    return {"exit_code": proc.returncode, "wall_s": round(wall, 2), "cpu_s": usage.ru_utime + usage.ru_stime,
            "stderr_lines": len(lines), "line": (lines[-1] if lines else "")[:120]}


def run_cases(checkout: Path, folder: Path) -> dict:
    results = {}
    for name, text in CASES.items():
        recipe = folder / f"{len(results)}.yaml"
        if text is not None:
            recipe.write_text(text)
        best = None
        for _ in range(REPEATS):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            r = measure(checkout, recipe)
            if r["cpu_s"] is not None:
                r["cpu_s"] = round(r["cpu_s"] - before.ru_utime - before.ru_stime, 2)
            if best is None or (r["wall_s"] is not None and (best["wall_s"] is None or r["wall_s"] < best["wall_s"])):
                best = r
            if r["wall_s"] is None:
                break  # a timeout will not get faster
        results[name] = best
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkout", action="append", type=Path, help="a checkout to measure (default: this one)")
    args = p.parse_args()
    checkouts = [c.resolve() for c in (args.checkout or [ROOT])]
    payload: dict = {"timeout_s": TIMEOUT_S, "repeats": REPEATS, "load_average": os.getloadavg(), "checkouts": {}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for checkout in checkouts:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True,
                                    text=True).stdout.strip()
            label = f"{checkout.name}@{commit}" if commit else checkout.name  # an exported tree has no git
            results = run_cases(checkout, Path(tmp))
            payload["checkouts"][label] = results
            rows += [[label, name, r["exit_code"], r["wall_s"], r["cpu_s"], r["stderr_lines"]]
                     for name, r in results.items()]
    print(table(["checkout", "case", "exit", "wall s", "cpu s", "stderr lines"], rows))
    print(f"wrote {write_json('fast-failure', payload)}")


if __name__ == "__main__":
    main()
