"""report.md from the manifest and the stages' tables; `inspect` prints the same summary."""

from __future__ import annotations

CACHE_TENSORS = ("past_key_values.", "present.")  # a decoder graph's per-layer cache (tasks/decoder.py names them)


def md_table(headers: list[str], rows: list[list], limit: int = 60) -> str:
    def cell(v):
        return "" if v is None else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows[:limit]]
    if len(rows) > limit:
        lines.append(f"\n({len(rows) - limit} more rows in manifest.json)")
    return "\n".join(lines)


def summary(manifest: dict, with_verdict: bool = True) -> str:
    """The run at a glance; it ends with the verdict line when the run was evaluated."""
    m = manifest["model"]
    lines = [f"# Run `{manifest['name']}`", "",
             f"- model: `{m['source']}` ({m['architecture']}, task {m['task']}), sha256 `{m['sha256'][:16]}…`",
             f"- parameters: {m['params_before']:,} → {m['params_after']:,} "
             f"(non-zero after: {m['nonzero_params_after']:,})",
             f"- created {manifest['created']} with edgeprune {manifest['environment']['packages'].get('edgeprune')}"]
    onnx = manifest.get("onnx")
    if onnx:
        ins, outs = _io(onnx["inputs"]), _io(onnx["outputs"])
        p = onnx["parity"]
        lines.append(f"- ONNX opset {onnx['opset']}, IR {onnx['ir_version']}: inputs {ins}; outputs {outs}; "
                     f"parity max abs {p['max_abs_err']:.3g}, max rel {p['max_rel_err']:.3g}")
        trt = onnx.get("tensorrt")
        if trt:
            engine = trt["build"]["engine"]
            built = (f"engines {', '.join(e['engine'] for e in engine['engines'])} ({engine['gpu']})" if engine["built"]
                     else "no engine built here")
            lines.append(f"- TensorRT {trt['tensorrt']} ({trt['target']}): {'ready' if trt['ok'] else 'NOT ready'}, "
                         f"{trt['sparse_2_4_layers']} 2:4 sparse layers, {built}; build material in build/")
    lines += ["", "| stage | type | seconds | summary |", "|---|---|---|---|"]
    for s in manifest["stages"]:
        lines.append(f"| {s['name']} | {s['type']} | {s['seconds']} | {_headline(s)} |")
    ev = manifest.get("evaluation")
    if ev:
        lines += ["", f"Evaluation ({ev['backend']}, {ev['data']['origin']}):", ""]
        lines.append(md_table(["metric", "dense", "compressed"], _eval_rows(ev)))
    if with_verdict:
        lines += _verdict(manifest)
    return "\n".join(lines) + "\n"


def _io(tensors: list[dict]) -> str:
    """Graph inputs or outputs, a decoder's per-layer cache tensors counted rather than listed."""
    cache = [d for d in tensors if d["name"].startswith(CACHE_TENSORS)]
    text = ", ".join(f"{d['name']} {d['dtype']}{d['shape']}" for d in tensors if d not in cache)
    if cache:
        shapes = ", ".join(sorted({f"{d['dtype']}{d['shape']}" for d in cache}))
        text += f", {len(cache)} cache tensors ({shapes})"
    return text


def _verdict(manifest: dict) -> list[str]:
    judged = manifest.get("verdict")
    return ["", f"**{judged['line']}**"] if judged else []


def _headline(stage: dict) -> str:
    m = stage["metrics"]
    keys = ("method", "structure", "pattern", "achieved_ratio", "achieved_sparsity", "samples", "origin", "parity",
            "cache", "comparison")
    parts = []
    for k in keys:
        if k in m:
            v = m[k]
            if isinstance(v, dict):
                v = ", ".join(f"{a}={b:.3g}" if isinstance(b, float) else f"{a}={b}" for a, b in v.items())
            parts.append(f"{k}: {v}")
    if stage.get("status") == "resumed":
        parts.append("(resumed)")
    return "; ".join(parts)


def _eval_rows(ev: dict) -> list[list]:
    rows = []
    for key in sorted(set(ev["dense"]) | set(ev["compressed"])):
        rows.append([key, ev["dense"].get(key), ev["compressed"].get(key)])
    rows += [[k, "", v] for k, v in ev.get("comparison", {}).items()]
    for k in ev.get("size", {}).get("dense", {}):
        rows.append([k, ev["size"]["dense"][k], ev["size"]["compressed"].get(k)])
    lat = ev.get("latency")
    if lat:
        rows.append([f"median latency ms (batch {lat['batch_size']}, {lat['threads']} threads)",
                     lat["dense"]["median_ms"], lat["compressed"]["median_ms"]])
        rows.append(["speedup", "", lat["speedup"]])
    gen = ev.get("generation")
    if gen:
        d, c = gen["dense"], gen["compressed"]
        rows.append([f"time to first token ms ({gen['prompt_tokens']}-token prompt, median of {gen['prompts']})",
                     d["first_token_ms"], c["first_token_ms"]])
        rows.append([f"decode tokens/s ({gen['threads']} threads)", d["decode_tokens_per_s"], c["decode_tokens_per_s"]])
        rows.append(["decode speedup", "", gen.get("decode_speedup")])
        a = gen["agreement"]
        rows.append([f"greedy tokens as transformers generate ({gen['new_tokens']} new)", "",
                     f"{a['identical']}/{a['prompts']} identical, prefix agreement {a['prefix_agreement']:g}"])
    return rows


def render(manifest: dict, tables: dict[str, list]) -> str:
    """Full report: the summary, every stage's own tables and figures (a stage's ``plots`` metric maps
    titles to image paths relative to the run folder), and the verdict last."""
    parts = [summary(manifest, with_verdict=False)]
    for s in manifest["stages"]:
        for t in tables.get(s["name"], []):
            parts.append(f"\n## {s['name']}: {t.title}\n\n{md_table(t.headers, t.rows)}\n")
        for title, path in s["metrics"].get("plots", {}).items():
            parts.append(f"\n## {s['name']}: {title}\n\n![{title}]({path})\n")
    verdict = _verdict(manifest)
    if verdict:
        parts.append("\n## Verdict\n" + "\n".join(verdict) + "\n")
    return "".join(parts)
