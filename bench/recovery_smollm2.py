"""Recovery on SmolLM2-135M: int4 (round-to-nearest, GPTQ, AWQ), W8A16, SmoothQuant W8A8, Wanda / SparseGPT
at 50% and 2:4, FLAP 20%, and distillation after pruning, each a whole pipeline run.

Protocol (the one of bench/quantization.py and bench/structured_pruning.py): SmolLM2-135M-Instruct
from its GGUF Q4_1 file, dequantized to fp32; calibration on 512-token windows of Northanger Abbey
(64 of them unless a row says otherwise); perplexity on the first 8 x 512-token windows of Pride
and Prejudice against the dense model in the same run. The dense and quantization rows export ONNX
at [1, 512] and are evaluated in ONNX Runtime (latency of that graph at [1, 512]: 2 threads, 5 runs,
the evaluate stage's own, noisy on a shared machine); the pruning rows are evaluated in PyTorch
fp32 without an export (one protocol for all of them: an export costs 5-8 minutes on the shared
2 cores, and unstructured zeros do not change the ONNX bytes). The distill rows train on the
calibration windows (KL on the logits at temperature 1) after the pruning stage, the rest of the
recipe unchanged.

A row is one function in ``ROWS`` returning its recipe; adding a row is one entry.

    python bench/recovery_smollm2.py [--rows dense rtn-int4-g128 ...]

Rows measured now replace their earlier entries in bench/results/recovery-smollm2.json; the
others stay, so the rows can be measured in several invocations.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from common import RESULTS, SMOLLM2, run_recipe, table, write_json

SAMPLES = 64  # calibration windows x 512 tokens
BLOCKS = [r"re:.*layers\."]  # every Linear of the decoder blocks (embedding / lm_head stay dense)
INT4 = {"type": "quantize", "format": "int4", "group_size": 128, "partial_groups": True}  # 576 = 4 x 128 + 64
# 12 steps of one 512-token window: a forward-backward of student and teacher took 1-2 minutes on the
# shared 2 cores, so this budget is about 20 minutes of training.
DISTILL = {"type": "distill", "steps": 12, "batch_size": 1, "lr": 2e-4, "warmup_steps": 2, "temperature": 1.0,
           "targets": BLOCKS, "checkpoint_every": 4}


def recipe(name: str, stages: list[dict], samples: int = SAMPLES) -> dict:
    calibrated = any(s["type"] not in ("export", "quantize") for s in stages)  # the int8 row has smoothquant
    int4 = any(s.get("format") == "int4" for s in stages)  # blocked DequantizeLinear: opset 21, a desktop TensorRT
    return {"name": f"recovery-smollm2-{name}", "model": {"source": SMOLLM2, "task": "causal-lm"},
            "calibration": {"source": "builtin", "num_samples": samples, "seq_len": 512, "batch_size": 8},
            "stages": ([{"type": "calibrate"}] if calibrated else []) + stages + [{"type": "evaluate"}],
            "export": {"batch_size": 1, "seq_len": 512,
                       "tensorrt": {"target": "x86-trt10" if int4 else "jetson-orin-jp6"}},
            "evaluation": {"source": "builtin", "num_samples": 8, "latency": {"threads": 2, "iterations": 5,
                                                                             "warmup": 1}}}


def prune(method: str, pattern: str) -> dict:
    amount = {"sparsity": 0.5} if pattern == "50" else {"pattern": pattern}
    return {"type": "prune_weights", "method": method, "targets": BLOCKS, **amount}


FLAP = {"type": "prune_structured", "method": "flap", "ratio": 0.2, "structure": "AL-AM"}  # UL-UM removes only 15.6%
EXPORT = {"type": "export"}

ROWS: dict[str, Callable[[], dict]] = {
    "dense": lambda: recipe("dense", [EXPORT]),
    "rtn-int4-g128": lambda: recipe("rtn-int4-g128", [EXPORT, INT4]),
    "gptq-int4-g128": lambda: recipe("gptq-int4-g128", [{"type": "gptq", "bits": 4, "group_size": 128,
                                                          "targets": BLOCKS}, EXPORT, INT4]),
    # AWQ's search runs every block once per alpha and scale group: 16 windows and 10 alphas keep it near 20 minutes.
    "awq-int4-g128": lambda: recipe("awq-int4-g128", [{"type": "awq", "group_size": 128, "grid": 10}, EXPORT, INT4],
                                    samples=16),
    "w8a16": lambda: recipe("w8a16", [EXPORT, {"type": "quantize", "format": "w8a16"}]),
    "w8a8-smoothquant-0.8": lambda: recipe("w8a8-smoothquant-0.8", [{"type": "smoothquant", "alpha": 0.8}, EXPORT,
                                                                    {"type": "quantize", "format": "int8"}]),
    "wanda-50": lambda: recipe("wanda-50", [prune("wanda", "50")]),
    "wanda-2of4": lambda: recipe("wanda-2of4", [prune("wanda", "2:4")]),
    "sparsegpt-50": lambda: recipe("sparsegpt-50", [prune("sparsegpt", "50")]),
    "sparsegpt-2of4": lambda: recipe("sparsegpt-2of4", [prune("sparsegpt", "2:4")]),
    "flap-20": lambda: recipe("flap-20", [FLAP]),
    "flap-20-distill": lambda: recipe("flap-20-distill", [FLAP, DISTILL]),
    "wanda-2of4-distill": lambda: recipe("wanda-2of4-distill", [prune("wanda", "2:4"), DISTILL]),
    # ten times the budget (about 7 s a step on 2 quiet cores): 120 windows of 512 tokens, each window about twice
    "flap-20-distill-120": lambda: recipe("flap-20-distill-120", [FLAP, {**DISTILL, "steps": 120, "warmup_steps": 12,
                                                                         "checkpoint_every": 40}]),
    "wanda-2of4-distill-120": lambda: recipe("wanda-2of4-distill-120", [prune("wanda", "2:4"), {
        **DISTILL, "steps": 120, "warmup_steps": 12, "checkpoint_every": 40}]),
}

PRUNING, QUANTIZATION = ("prune_weights", "prune_structured"), ("awq", "gptq", "smoothquant", "quantize")

# Issue targets: (text, row, bound on the perplexity ratio to dense, or the row it must beat).
TARGETS = [("GPTQ int4 g128 <= 1.15x dense", "gptq-int4-g128", 1.15),
           ("AWQ int4 g128 <= 1.15x dense", "awq-int4-g128", 1.15),
           ("SparseGPT 2:4 below Wanda 2:4", "sparsegpt-2of4", "wanda-2of4"),
           ("FLAP 20% + distillation <= 1.10x dense", "flap-20-distill", 1.10),
           ("FLAP 20% + distillation (120 steps) <= 1.10x dense", "flap-20-distill-120", 1.10),
           ("Wanda 2:4 + distillation <= 1.5x dense", "wanda-2of4-distill", 1.5),
           ("Wanda 2:4 + distillation (120 steps) <= 1.5x dense", "wanda-2of4-distill-120", 1.5)]


def seconds(manifest: dict, types: tuple[str, ...]) -> float | None:
    found = [s["seconds"] for s in manifest["stages"] if s["type"] in types]
    return round(sum(found), 1) if found else None


def measure(name: str) -> dict:
    r = ROWS[name]()
    m = run_recipe(r, r["name"])
    ev = m["evaluation"]
    distill = next((s for s in m["stages"] if s["type"] == "distill"), None)
    calibrated = r["stages"][0]["type"] == "calibrate"
    return {"recipe": f"bench/results/recipes/{r['name']}.yaml",
            "calibration_windows": r["calibration"]["num_samples"] if calibrated else None,
            "backend": ev["backend"], "dense_perplexity": ev["dense"]["perplexity"],
            "perplexity": ev["compressed"]["perplexity"], "ratio": ev["comparison"]["perplexity_ratio"],
            "token_agreement": ev["comparison"]["token_agreement"],
            "onnx_bytes": ev["size"]["compressed"].get("onnx_bytes"), "params": ev["size"]["compressed"]["params"],
            "nonzero_params": ev["size"]["compressed"]["nonzero_params"],
            "latency_ms": ev.get("latency", {}).get("compressed", {}).get("median_ms"),
            "dense_latency_ms": ev.get("latency", {}).get("dense", {}).get("median_ms"),
            "seconds": {"calibrate": seconds(m, ("calibrate",)), "pruning": seconds(m, PRUNING),
                        "quantization": seconds(m, QUANTIZATION), "distillation": seconds(m, ("distill",))},
            "distill": distill["metrics"] if distill else None,
            "stages": {s["type"]: s["metrics"] for s in m["stages"] if s["type"] != "evaluate"},
            "wall_seconds": m["bench"]["wall_seconds"], "peak_rss_mb": m["bench"]["peak_rss_mb"]}


def verdicts(rows: dict[str, dict]) -> list[dict]:
    out = []
    for text, row, bound in TARGETS:
        if row not in rows or (isinstance(bound, str) and bound not in rows):
            out.append({"target": text, "met": None, "measured": None})
        elif isinstance(bound, str):
            a, b = rows[row]["perplexity"], rows[bound]["perplexity"]
            out.append({"target": text, "met": a < b, "measured": f"{a:.2f} vs {b:.2f}"})
        else:
            out.append({"target": text, "met": rows[row]["ratio"] <= bound, "measured": f"{rows[row]['ratio']:.3f}x"})
    return out


def show(rows: dict[str, dict]) -> None:
    def cell(v, fmt="{}"):
        return "-" if v is None else fmt.format(v)
    body = []
    for name, r in rows.items():
        s, d = r["seconds"], r["distill"] or {}
        body.append([name, f"{r['perplexity']:.2f}", f"{r['ratio']:.3f}", cell(r["onnx_bytes"], "{:,}"),
                     cell(r["latency_ms"], "{:.0f}"), cell(s["pruning"]), cell(s["quantization"]),
                     cell(s["distillation"]), cell(d.get("steps")), r["wall_seconds"]])
    print("\nSmolLM2-135M (GGUF Q4_1 dequantized), perplexity on 8 x 512 tokens of Pride and Prejudice (quantization: "
          "ONNX Runtime CPU at [1, 512]; pruning: PyTorch fp32); ratio = perplexity / dense's in the same run")
    print(table(["row", "perplexity", "ratio", "ONNX bytes", "ORT ms", "pruning s", "quantization s", "distill s",
                 "distill steps", "wall s"], body))
    for v in verdicts(rows):
        state = {None: "not measured", True: "met", False: "NOT met"}[v["met"]]
        print(f"- {v['target']}: {state}" + (f" ({v['measured']})" if v["measured"] else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    args = ap.parse_args()
    path = RESULTS / "recovery-smollm2.json"
    for name in args.rows:
        row = measure(name)
        rows = json.loads(path.read_text())["rows"] if path.is_file() else {}  # read late: another invocation may write
        rows[name] = row
        rows = {n: rows[n] for n in ROWS if n in rows}
        write_json("recovery-smollm2", {"protocol": __doc__.split("\n\n")[1], "rows": rows,
                                        "targets": verdicts(rows)})
    show(rows)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
