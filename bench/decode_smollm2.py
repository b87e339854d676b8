"""SmolLM2-135M as decoder graphs with a static KV cache: quality, size and decode speed, in one run each.

Every configuration is a pipeline run (child process) exporting the prefill graph (128-token
prompt) and the decode graph over a 256-slot cache (``export.decoder``), then evaluating it
against the dense model exported the same way in the same run: perplexity through the prefill
graph on the first 32 x 128-token windows of Pride and Prejudice, time to first token at the
128-token prompt and decode tokens/s over 8 prompts x 32 greedy tokens in ONNX Runtime on 2
threads (dense and compressed alternating prompt by prompt), and how many of those 8 generations
equal transformers' ``generate`` on the compressed PyTorch model token for token.

Decoding one token reads every weight once (the tied embedding included, as the LM head), so the
ratio of weight bytes is the speedup memory traffic allows; the table sets the measured decode
speedup against it.

    python bench/decode_smollm2.py [--configs flap int4 ...]     # BENCH_REUSE=1 reads finished runs back
"""

from __future__ import annotations

import argparse
import json
import os
import time

from common import RESULTS, SMOLLM2, run_recipe, stage, table, write_json

PROMPT, CACHE, NEW_TOKENS, PROMPTS = 128, 256, 32, 8
FLAP = {"type": "prune_structured", "method": "flap", "ratio": 0.2}  # AL-AM: per-layer heads and widths
INT4 = {"type": "quantize", "format": "int4", "group_size": 64}
CONFIGS = {  # name -> (stages between calibrate/export and evaluate, label)
    "flap": ([{"type": "calibrate"}, FLAP, {"type": "export"}], "FLAP 20% (AL-AM, adaptive)"),
    "int4": ([{"type": "export"}, INT4], "int4 weight-only (g64)"),
    "flap-int4": ([{"type": "calibrate"}, FLAP, {"type": "export"}, INT4], "FLAP 20% (AL-AM) + int4 (g64)"),
    "flap-uniform": ([{"type": "calibrate"}, {**FLAP, "structure": "UL-UM"}, {"type": "export"}],
                     "FLAP 20% (UL-UM, uniform)"),
    "dense": ([{"type": "export"}], "dense fp32"),
}


def recipe(tag: str, stages: list[dict]) -> dict:
    int4 = any(s.get("format") == "int4" for s in stages)  # blocked DequantizeLinear: opset 21, above JetPack 6's parser
    return {"name": tag, "model": {"source": SMOLLM2, "task": "causal-lm"},
            "calibration": {"source": "builtin", "num_samples": 64, "seq_len": 256, "batch_size": 8},
            "stages": [*stages, {"type": "evaluate"}],
            "export": {"batch_size": 1, "seq_len": PROMPT, "decoder": {"max_len": CACHE},
                       "tensorrt": {"target": "x86-trt10" if int4 else "jetson-orin-jp6"}},
            "evaluation": {"source": "builtin", "num_samples": 32,
                           "latency": {"threads": 2, "iterations": 10, "warmup": 1},
                           "generation": {"prompts": PROMPTS, "new_tokens": NEW_TOKENS}}}


def record(name: str, label: str, m: dict, load: tuple[float, float]) -> dict:
    ev, onnx = m["evaluation"], m["onnx"]
    gen, size = ev["generation"], ev["size"]
    kv = [d["shape"][1] for d in onnx["decode"]["inputs"] if d["name"].endswith(".key")]
    ratio = size["dense"]["onnx_bytes"] / size["compressed"]["onnx_bytes"]
    pruned = next((s["metrics"] for s in m["stages"] if s["type"] == "prune_structured"), None)
    return {"config": name, "label": label,
            "perplexity": {"dense": ev["dense"]["perplexity"], "compressed": ev["compressed"]["perplexity"]},
            "params": {"dense": size["dense"]["params"], "compressed": size["compressed"]["params"]},
            "onnx_bytes": {"dense": size["dense"]["onnx_bytes"], "compressed": size["compressed"]["onnx_bytes"]},
            "weight_bytes_ratio": round(ratio, 3),
            "first_token_ms": {"dense": gen["dense"]["first_token_ms"], "compressed": gen["compressed"]["first_token_ms"]},
            "decode_tokens_per_s": {"dense": gen["dense"]["decode_tokens_per_s"],
                                    "compressed": gen["compressed"]["decode_tokens_per_s"]},
            "first_token_speedup": gen["first_token_speedup"], "decode_speedup": gen.get("decode_speedup"),
            "decode_speedup_of_bytes_limit": round(gen["decode_speedup"] / ratio, 3) if gen.get("decode_speedup") else None,
            "generation": gen["agreement"], "kv_heads_per_layer": kv,
            "achieved_ratio": pruned["achieved_ratio"] if pruned else None,
            "prefill_graph_latency_ms": ev["latency"]["compressed"]["median_ms"],
            "quantization_fidelity": (stage(m, "quantize")["metrics"].get("fidelity")
                                      if any(s["type"] == "quantize" for s in m["stages"]) else None),
            "tensorrt": {"target": onnx["tensorrt"]["target"], "ready": onnx["tensorrt"]["ok"],
                         "decode_ready": onnx["decode"]["tensorrt"]["ok"]},
            "load_average": {"start": round(load[0], 2), "end": round(load[1], 2)},
            "wall_seconds": m["bench"]["wall_seconds"], "peak_rss_mb": m["bench"]["peak_rss_mb"]}


PROTOCOL = {"model": SMOLLM2, "prompt_tokens": PROMPT, "cache_slots": CACHE, "new_tokens": NEW_TOKENS,
            "prompts": PROMPTS, "threads": 2, "perplexity": "first 32 x 128-token windows of Pride and Prejudice "
            "through the prefill graph", "calibration": "64 x 256 tokens of Northanger Abbey",
            "speed": "ONNX Runtime CPU, dense and compressed graphs of the same run alternating prompt by prompt; a "
                     "shared 2-core machine, load averages recorded per run"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    args = p.parse_args()
    path = RESULTS / "decode-smollm2.json"
    for name in args.configs:
        stages, label = CONFIGS[name]
        start = os.getloadavg()[0]
        t = time.perf_counter()
        m = run_recipe(recipe(f"decode-smollm2-{name}", stages), f"decode-smollm2-{name}")
        done = {r["config"]: r for r in json.loads(path.read_text())["rows"]} if path.is_file() else {}
        done[name] = record(name, label, m, (start, os.getloadavg()[0]))  # read late: rows of other invocations stay
        write_json("decode-smollm2", {"protocol": PROTOCOL, "rows": [done[c] for c in CONFIGS if c in done]})
        print(f"{name}: {time.perf_counter() - t:.0f} s", flush=True)
    rows = json.loads(path.read_text())["rows"]
    headers = ["config", "perplexity", "ONNX MB", "bytes ratio", "TTFT ms", "decode tok/s", "decode speedup",
               "of bytes limit", "KV heads", "greedy = transformers"]
    body = [[r["label"], r["perplexity"]["compressed"], round(r["onnx_bytes"]["compressed"] / 1e6, 1),
             r["weight_bytes_ratio"], r["first_token_ms"]["compressed"], r["decode_tokens_per_s"]["compressed"],
             r["decode_speedup"], r["decode_speedup_of_bytes_limit"], "/".join(map(str, sorted(set(r["kv_heads_per_layer"])))),
             f"{r['generation']['identical']}/{r['generation']['prompts']} ({r['generation']['prefix_agreement']:g})"]
            for r in rows]
    print(table(headers, body))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
