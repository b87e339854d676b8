"""report.md from the manifest and the stages' tables; `inspect` prints the same overview.

`overview` is the run at a glance as data (facts, tables, verdict); `summary` writes it as Markdown
and the terminal renders it with rich (pipeline/console.py). Every cell goes through `fmt`, so a
report never shows a Python repr: dicts become ``key value`` pairs, floats five significant digits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from evaluation.verdict import flat_metrics

CACHE_TENSORS = ("past_key_values.", "present.")  # a decoder graph's per-layer cache (tasks/decoder.py names them)


def fmt(v) -> str:
    """One value as a reader wants it: no quotes, braces or 17-digit floats."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    if isinstance(v, float):
        return f"{v:.5g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {fmt(x)}" for k, x in v.items()) or "none"
    if isinstance(v, (list, tuple)):
        if not v:
            return "none"
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):  # a shape: [1, 30522]
            return "[" + ", ".join(str(x) if isinstance(x, int) else fmt(x) for x in v) + "]"
        return ", ".join(fmt(x) for x in v)
    return str(v)


def threads(n: int) -> str:
    return f"{n} thread{'' if n == 1 else 's'}"


def provider(lat: dict) -> str:
    """The ONNX Runtime execution provider that measured ``lat`` (a run from before providers were recorded: CPU)."""
    first = (lat.get("providers") or ["CPUExecutionProvider"])[0]
    return "ONNX Runtime " + {"CPUExecutionProvider": "CPU", "CUDAExecutionProvider": "CUDA",
                              "TensorrtExecutionProvider": "TensorRT"}.get(first, first)


def md_table(headers: list[str], rows: list[list], limit: int = 60) -> str:
    def cell(v):
        return fmt(v).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows[:limit]]
    if len(rows) > limit:
        lines.append(f"\n({len(rows) - limit} more rows in manifest.json)")
    return "\n".join(lines)


@dataclass
class Overview:
    """The run at a glance: a title, facts (one line each), tables (title, headers, rows), the verdict."""

    title: str
    facts: list[str]
    tables: list[tuple[str, list[str], list[list]]] = field(default_factory=list)
    verdict: str | None = None


def overview(manifest: dict) -> Overview:
    m = manifest["model"]
    facts = [f"model: {m['source']} ({m['architecture']}, task {m['task']}), sha256 {m['sha256'][:16]}…",
             f"parameters: {m['params_before']:,} → {m['params_after']:,} (non-zero after: {m['nonzero_params_after']:,})",
             f"created {manifest['created']} with edgeprune {manifest['environment']['packages'].get('edgeprune')}"]
    onnx = manifest.get("onnx")
    if onnx:
        ins, outs = _io(onnx["inputs"]), _io(onnx["outputs"])
        p = onnx["parity"]
        facts.append(f"ONNX opset {onnx['opset']}, IR {onnx['ir_version']}: inputs {ins}; outputs {outs}; "
                     f"parity max abs {p['max_abs_err']:.3g}, max rel {p['max_rel_err']:.3g}")
        if onnx.get("tensorrt"):
            facts.append(tensorrt_line(onnx["tensorrt"]))
    stages = [[s["name"], s["type"], s["seconds"], _peak(s.get("memory")), _headline(s)] for s in manifest["stages"]]
    out = Overview(f"Run {manifest['name']}", facts,
                   [("Stages", ["stage", "type", "seconds", "peak memory (MiB)", "summary"], stages)])
    ev = manifest.get("evaluation")
    if ev:
        out.tables.append((f"Evaluation ({ev['backend']}, {ev['data']['origin']})", ["metric", "dense", "compressed"],
                           _eval_rows(ev)))
    judged = manifest.get("verdict")
    out.verdict = judged["line"] if judged else None
    return out


def tensorrt_line(trt: dict) -> str:
    engine = trt["build"]["engine"]
    built = (f"engines {', '.join(e['engine'] for e in engine['engines'])} ({engine['gpu']})" if engine["built"]
             else "no engine built here")
    return (f"TensorRT {trt['tensorrt']} ({trt['target']}): {'ready' if trt['ok'] else 'NOT ready'}, "
            f"{trt['sparse_2_4_layers']} 2:4 sparse layers, {built}; build material in build/")


def summary(manifest: dict, with_verdict: bool = True) -> str:
    """The overview as Markdown; it ends with the verdict line when the run was evaluated."""
    o = overview(manifest)
    lines = [f"# Run `{manifest['name']}`", "", *(f"- {f}" for f in o.facts)]
    for i, (title, headers, rows) in enumerate(o.tables):
        lines += [""] if i == 0 else ["", f"{title}:", ""]
        lines.append(md_table(headers, rows))
    if with_verdict and o.verdict:
        lines += ["", f"**{o.verdict}**"]
    return "\n".join(lines) + "\n"


def _io(tensors: list[dict]) -> str:
    """Graph inputs or outputs, a decoder's per-layer cache tensors counted rather than listed."""
    cache = [d for d in tensors if d["name"].startswith(CACHE_TENSORS)]
    text = ", ".join(f"{d['name']} {d['dtype']}{d['shape']}" for d in tensors if d not in cache)
    if cache:
        shapes = ", ".join(sorted({f"{d['dtype']}{d['shape']}" for d in cache}))
        text += f", {len(cache)} cache tensors ({shapes})"
    return text


def _peak(memory: dict | None) -> str:
    """Resident set (and CUDA) peak of a stage; "" for runs recorded before stages measured it."""
    if not memory:
        return ""
    text = f"{memory['peak_rss_mib']:,.0f}" + ("" if memory["since"] == "stage" else " (process)")
    if "start_rss_mib" in memory:  # what the process held as the stage began (older runs lack it)
        text += f" (start {memory['start_rss_mib']:,.0f})"
    return text + (f", CUDA {memory['peak_cuda_mib']:,.0f}" if "peak_cuda_mib" in memory else "")


def _headline(stage: dict) -> str:
    m = stage["metrics"]
    keys = ("method", "structure", "pattern", "format", "achieved_ratio", "achieved_sparsity", "samples", "origin",
            "steps", "loss_first", "loss_last", "parity", "cache", "comparison")
    parts = [f"{k}: {fmt(m[k])}" for k in keys if k in m]
    if stage.get("status") == "resumed":
        parts.append("(resumed)")
    return "; ".join(parts)


def _eval_rows(ev: dict) -> list[list]:
    dense, comp = flat_metrics(ev["dense"]), flat_metrics(ev["compressed"])
    rows = [[key, dense.get(key), comp.get(key)] for key in sorted(set(dense) | set(comp))]
    rows += [[k, "", v] for k, v in ev.get("comparison", {}).items()]
    for k in ev.get("size", {}).get("dense", {}):
        rows.append([k, ev["size"]["dense"][k], ev["size"]["compressed"].get(k)])
    lat = ev.get("latency")
    if lat:
        rows.append([f"median latency ms (batch {lat['batch_size']}, {threads(lat['threads'])}, {provider(lat)})",
                     lat["dense"]["median_ms"], lat["compressed"]["median_ms"]])
        rows.append(["speedup", "", lat["speedup"]])
        default = lat.get("ort_default_settings")
        if default:  # the artifact's session settings switch optimizers off; a stock session gets this
            rows.append([f"median latency ms, ONNX Runtime default session (with {', '.join(lat['disabled_optimizers'])}"
                         " on)", default["dense"]["median_ms"], default["compressed"]["median_ms"]])
            rows.append(["speedup, ONNX Runtime default session", "", default["speedup"]])
    gen = ev.get("generation")
    if gen:
        d, c = gen["dense"], gen["compressed"]
        rows.append([f"time to first token ms ({gen['prompt_tokens']}-token prompt, median of {gen['prompts']})",
                     d["first_token_ms"], c["first_token_ms"]])
        rows.append([f"decode tokens/s ({threads(gen['threads'])})", d["decode_tokens_per_s"], c["decode_tokens_per_s"]])
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
    judged = manifest.get("verdict")
    if judged:
        parts.append(f"\n## Verdict\n\n**{judged['line']}**\n")
    return "".join(parts)
