"""Weight pruning quality on real weights: magnitude / wanda / gblm at 50% unstructured and 2:4.

MiniLM-L6 (all-MiniLM-L6-v2): full pipeline (calibrate -> prune -> export -> evaluate in ONNX
Runtime); fidelity = cosine of pooled embeddings to the dense ones on held-out paragraphs, plus
the Lee similarity benchmark. SmolLM2-135M (GGUF, dequantized to fp32): calibrate -> prune ->
evaluate in PyTorch; perplexity on held-out text. Calibration: built-in Northanger Abbey;
evaluation: built-in Pride and Prejudice (different novels, never the same file).

    python bench/weight_pruning.py [--models minilm smollm2] [--gradient-samples 64]
"""

from __future__ import annotations

import argparse

from common import MINILM, SMOLLM2, run_recipe, stage, table, write_json

CONFIGS = [("magnitude", "unstructured"), ("wanda", "unstructured"), ("gblm", "unstructured"),
           ("magnitude", "2:4"), ("wanda", "2:4"), ("gblm", "2:4")]


def prune_stage(method: str, pattern: str, targets: list[str]) -> dict:
    s = {"type": "prune_weights", "method": method, "targets": targets}
    s.update({"sparsity": 0.5} if pattern == "unstructured" else {"pattern": pattern})
    return s


def minilm(method: str, pattern: str) -> dict:
    return {"name": f"minilm-{method}-{pattern.replace(':', 'of')}",
            "model": {"source": MINILM, "task": "feature-extraction"},
            "calibration": {"source": "builtin", "num_samples": 128, "seq_len": 128, "batch_size": 16},
            "stages": [{"type": "calibrate"}, prune_stage(method, pattern, [r"re:.*encoder\.layer\."]),
                       {"type": "export"}, {"type": "evaluate"}],
            "export": {"batch_size": 1, "seq_len": 128},
            "evaluation": {"source": "builtin", "num_samples": 128, "lee": True,
                           "latency": {"threads": 2, "iterations": 20}}}


def smollm2(method: str, pattern: str, gradient_samples: int) -> dict:
    return {"name": f"smollm2-{method}-{pattern.replace(':', 'of')}",
            "model": {"source": SMOLLM2, "task": "causal-lm"},
            "calibration": {"source": "builtin", "num_samples": 128, "seq_len": 512, "batch_size": 8},
            "stages": [{"type": "calibrate", "gradient_samples": gradient_samples},
                       prune_stage(method, pattern, [r"re:.*layers\."]), {"type": "evaluate"}],
            "export": {"batch_size": 1, "seq_len": 512},
            "evaluation": {"source": "builtin", "num_samples": 8}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["minilm", "smollm2"], choices=["minilm", "smollm2"])
    ap.add_argument("--gradient-samples", type=int, default=64,
                    help="calibration windows whose gradients GBLM uses on SmolLM2 (full backward on the CPU)")
    args = ap.parse_args()
    results = {}
    if "minilm" in args.models:
        rows, runs = [], []
        for method, pattern in CONFIGS:
            m = run_recipe(minilm(method, pattern), f"minilm-{method}-{pattern.replace(':', 'of')}")
            ev, prune = m["evaluation"], stage(m, "prune_weights")
            if not rows:
                rows.append(["dense", "-", "-", "1.0", "1.0", ev["dense"]["lee"]["pearson"], "-", "-", "-"])
            rows.append([method, pattern, prune["metrics"]["achieved_sparsity"], ev["comparison"]["mean_cosine"],
                         ev["comparison"]["min_cosine"], ev["compressed"]["lee"]["pearson"], prune["seconds"],
                         m["bench"]["wall_seconds"], m["bench"]["peak_rss_mb"]])
            runs.append({"method": method, "pattern": pattern, "evaluation": ev, "prune": prune,
                         "calibration": m["calibration"], "bench": m["bench"]})
        print("\nMiniLM-L6 (all-MiniLM-L6-v2), held-out Pride and Prejudice paragraphs + Lee benchmark (ONNX Runtime)")
        print(table(["method", "pattern", "sparsity", "mean cos", "min cos", "Lee pearson", "prune s", "wall s",
                     "peak MB"], rows))
        results["minilm"] = runs
    if "smollm2" in args.models:
        rows, runs = [], []
        for method, pattern in CONFIGS:
            m = run_recipe(smollm2(method, pattern, args.gradient_samples),
                           f"smollm2-{method}-{pattern.replace(':', 'of')}")
            ev, prune, cal = m["evaluation"], stage(m, "prune_weights"), stage(m, "calibrate")
            if not rows:
                rows.append(["dense", "-", "-", ev["dense"]["perplexity"], "-", "-", "-", "-"])
            rows.append([method, pattern, prune["metrics"]["achieved_sparsity"], ev["compressed"]["perplexity"],
                         cal["seconds"], prune["seconds"], m["bench"]["wall_seconds"], m["bench"]["peak_rss_mb"]])
            runs.append({"method": method, "pattern": pattern, "evaluation": ev, "prune": prune,
                         "calibration": cal, "bench": m["bench"]})
        print(f"\nSmolLM2-135M, perplexity on the first {runs[0]['evaluation']['data']['windows']} x 512-token "
              "windows of Pride and Prejudice (calibration: 128 x 512 from Northanger Abbey)")
        print(table(["method", "pattern", "sparsity", "perplexity", "calibrate s", "prune s", "wall s", "peak MB"], rows))
        results["smollm2"] = runs
    print(f"\nwrote {write_json('weight_pruning', {'gradient_samples': args.gradient_samples, **results})}")


if __name__ == "__main__":
    main()
