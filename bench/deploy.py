"""Deployment path on real models: TensorRT readiness per target, and push/pull timings.

Exports MiniLM (the default recipe's model, 2:4 Wanda) and SmolLM2-135M (dense) through the
pipeline, then for each artifact: how long the readiness check takes per TensorRT target and
what it says, and how long a push, a repeated push and a verified pull take through a local
folder registry and (when Debian's docker-registry is installed) a loopback OCI registry.
No engine is built: this machine has no GPU and no TensorRT.

    python bench/deploy.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import onnx
from common import MINILM, RESULTS, SMOLLM2, run_recipe, table, write_json

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from export import local_registry as registry_server  # noqa: E402
from export import registry, tensorrt  # noqa: E402
from export.trt_targets import TARGETS  # noqa: E402

RECIPES = {
    "minilm-2:4": {"name": "deploy-minilm", "model": {"source": MINILM, "task": "feature-extraction"},
                   "stages": [{"type": "calibrate"}, {"type": "prune_weights", "method": "wanda", "pattern": "2:4",
                                                      "targets": ["re:.*encoder\\.layer\\."]}, {"type": "export"}],
                   "export": {"seq_len": 128}},
    "smollm2-135m": {"name": "deploy-smollm2", "model": {"source": SMOLLM2, "task": "causal-lm"},
                     "calibration": {"num_samples": 4, "seq_len": 128, "batch_size": 4},
                     "stages": [{"type": "export"}], "export": {"seq_len": 128}},
}


def readiness_rows(tag: str, run_dir: Path) -> list[list]:
    model = onnx.load(run_dir / "model.onnx")
    rows = []
    for name in TARGETS:
        t0 = time.perf_counter()
        r = tensorrt.check(model, name)
        seconds = time.perf_counter() - t0
        first = str(r.errors[0])[:70] if r.errors else ""
        rows.append([tag, name, "yes" if r.ok else "no", len(r.errors), f"{r.sparse_layers}/{len(r.sparsity)}",
                     f"{seconds:.2f}", first])
    return rows


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def registry_rows(tag: str, run_dir: Path, ref: str, kind: str, tmp: Path) -> list:
    first, push_s = timed(registry.push, run_dir, ref)
    _, repush_s = timed(registry.push, run_dir, ref)
    dest = tmp / f"pulled-{tag}-{kind}"
    _, pull_s = timed(registry.pull, ref, dest)
    mb = first["bytes"] / 1e6
    return [tag, kind, first["files"], f"{mb:.1f}", f"{push_s:.2f}", f"{repush_s:.2f}", f"{pull_s:.2f}",
            f"{mb / pull_s:.0f}"]


def main() -> None:
    names = {tag: f"deploy-{tag.replace(':', '')}" for tag in RECIPES}
    runs = {tag: run_recipe(recipe, names[tag]) for tag, recipe in RECIPES.items()}
    folders = {tag: RESULTS / "runs" / names[tag] for tag in RECIPES}
    ready = [row for tag, folder in folders.items() for row in readiness_rows(tag, folder)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        proc, host = registry_server.start(tmp) or (None, None)
        try:
            moved = []
            for tag, folder in folders.items():
                repo = tag.replace(":", "-").replace(".", "-")
                moved.append(registry_rows(tag, folder, f"{tmp / 'folder'}/{repo}:v1", "folder", tmp))
                if host:
                    moved.append(registry_rows(tag, folder, f"oci://{host}/bench/{repo}:v1", "oci (loopback)", tmp))
        finally:
            if proc:
                registry_server.stop(proc)
    h1 = ["artifact", "target", "ready", "errors", "2:4 layers", "check s", "first error"]
    h2 = ["artifact", "registry", "files", "MB", "push s", "re-push s", "pull+verify s", "pull MB/s"]
    print(table(h1, ready))
    print()
    print(table(h2, moved))
    export_s = {tag: next(s["seconds"] for s in m["stages"] if s["type"] == "export") for tag, m in runs.items()}
    print(f"\nexport stage seconds (ONNX export, parity, readiness, build material, golden data): {export_s}")
    path = write_json("deploy", {"readiness": [dict(zip(h1, r)) for r in ready],
                                 "registry": [dict(zip(h2, r)) for r in moved], "export_seconds": export_s})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
