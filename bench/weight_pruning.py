"""Weight pruning quality on real weights: magnitude / wanda / gblm / sparsegpt at 50% unstructured and 2:4.

MiniLM-L6 (all-MiniLM-L6-v2): full pipeline (calibrate -> prune -> export -> evaluate in ONNX
Runtime); fidelity = cosine of pooled embeddings to the dense ones on held-out paragraphs, plus
the Lee similarity benchmark. SmolLM2-135M (GGUF, dequantized to fp32): calibrate -> prune ->
evaluate in PyTorch; perplexity on held-out text. Calibration: built-in Northanger Abbey;
evaluation: built-in Pride and Prejudice (different novels, never the same file).

    python bench/weight_pruning.py [--models minilm smollm2] [--methods wanda sparsegpt] [--gblm-norm l2]

Results of each model land in bench/results/weight_pruning.json under its own key, merged by
(method, pattern), so models and methods can be run separately; GBLM's gradient norm (l2, the
paper's believed default, or l1) is recorded.
"""

from __future__ import annotations

import argparse
import json

from common import MINILM, RESULTS, SMOLLM2, run_recipe, stage, table, write_json

CONFIGS = [("magnitude", "unstructured"), ("wanda", "unstructured"), ("gblm", "unstructured"),
           ("sparsegpt", "unstructured"), ("magnitude", "2:4"), ("wanda", "2:4"), ("gblm", "2:4"), ("sparsegpt", "2:4")]


def prune_stage(method: str, pattern: str, targets: list[str], gblm_norm: str = "l2") -> dict:
    s = {"type": "prune_weights", "method": method, "targets": targets}
    if method == "gblm":
        s["gradient_norm"] = gblm_norm
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


def smollm2(method: str, pattern: str, gradient_samples: int, gblm_norm: str) -> dict:
    return {"name": smollm2_tag(method, pattern, gblm_norm),
            "model": {"source": SMOLLM2, "task": "causal-lm"},
            "calibration": {"source": "builtin", "num_samples": 128, "seq_len": 512, "batch_size": 8},
            "stages": [{"type": "calibrate", "gradient_samples": gradient_samples},
                       prune_stage(method, pattern, [r"re:.*layers\."], gblm_norm), {"type": "evaluate"}],
            "export": {"batch_size": 1, "seq_len": 512},
            "evaluation": {"source": "builtin", "num_samples": 8}}


def smollm2_tag(method: str, pattern: str, gblm_norm: str) -> str:
    suffix = f"-{gblm_norm}" if method == "gblm" and gblm_norm != "l2" else ""
    return f"smollm2-{method}{suffix}-{pattern.replace(':', 'of')}"


def merge(previous: list[dict], runs: list[dict]) -> list[dict]:
    """Earlier rows of methods not run now stay; in CONFIGS order."""
    by_config = {(r["method"], r["pattern"]): r for r in previous} | {(r["method"], r["pattern"]): r for r in runs}
    return [by_config[c] for c in CONFIGS if c in by_config]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["minilm", "smollm2"], choices=["minilm", "smollm2"])
    ap.add_argument("--gradient-samples", type=int, default=128,
                    help="calibration windows whose gradients GBLM uses on SmolLM2 (full backward on the CPU)")
    ap.add_argument("--gblm-norm", choices=["l2", "l1"], default="l2", help="GBLM's norm of the per-sample gradients")
    ap.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "gblm", "sparsegpt"])
    args = ap.parse_args()
    configs = [(m, p) for m, p in CONFIGS if m in args.methods]
    previous = RESULTS / "weight_pruning.json"
    results = json.loads(previous.read_text()) if previous.is_file() else {}
    results.pop("machine", None)
    if "minilm" in args.models:
        rows, runs = [], []
        for method, pattern in configs:
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
        results["minilm"] = merge(results.get("minilm", []), runs)
    if "smollm2" in args.models:
        rows, runs = [], []
        for method, pattern in configs:
            tag = smollm2_tag(method, pattern, args.gblm_norm)
            m = run_recipe(smollm2(method, pattern, args.gradient_samples, args.gblm_norm), tag)
            ev, prune, cal = m["evaluation"], stage(m, "prune_weights"), stage(m, "calibrate")
            if not rows:
                rows.append(["dense", "-", "-", ev["dense"]["perplexity"], "-", "-", "-", "-"])
            rows.append([method, pattern, prune["metrics"]["achieved_sparsity"], ev["compressed"]["perplexity"],
                         cal["seconds"], prune["seconds"], m["bench"]["wall_seconds"], m["bench"]["peak_rss_mb"]])
            runs.append({"method": method, "pattern": pattern, "evaluation": ev, "prune": prune,
                         "calibration": cal, "bench": m["bench"], "gradient_samples": args.gradient_samples,
                         "gblm_norm": args.gblm_norm if method == "gblm" else None})
        print(f"\nSmolLM2-135M, perplexity on the first {runs[0]['evaluation']['data']['windows']} x 512-token "
              "windows of Pride and Prejudice (calibration: 128 x 512 from Northanger Abbey)")
        print(table(["method", "pattern", "sparsity", "perplexity", "calibrate s", "prune s", "wall s", "peak MB"], rows))
        key = "smollm2" if args.gblm_norm == "l2" else f"smollm2 (gblm {args.gblm_norm})"
        results[key] = merge(results.get(key, []), runs)
    print(f"\nwrote {write_json('weight_pruning', results)}")


if __name__ == "__main__":
    main()
