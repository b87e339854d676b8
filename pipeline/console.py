"""What the terminal shows of a run (rich): the summary panel that ends `run`, and `inspect`'s tables.

Both read only the manifest, so `inspect` on a pulled or old run shows what `run` showed. The panel
answers the questions a user has at the end of a run, one line each: quality against dense, speed
against dense, size, TensorRT readiness, the gate's verdict, and where the artifact is.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from evaluation.verdict import flat_metrics

from .report import fmt, overview, provider, threads


def summary_panel(manifest: dict, folder: Path) -> Panel:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    for label, value in summary_rows(manifest, folder):
        grid.add_row(label, value)
    judged = manifest.get("verdict") or {}
    color = {True: "green", False: "red"}.get(judged.get("accepted"), "blue")
    return Panel(grid, title=f"[bold]{manifest['name']}[/]", border_style=color, expand=False)


def summary_rows(manifest: dict, folder: Path) -> list[tuple[str, str]]:
    ev = manifest.get("evaluation")
    return [("quality vs dense", _quality(ev) if ev else "not evaluated (add '- type: evaluate' last)"),
            ("speed vs dense", _speed(ev) if ev else "not measured"),
            ("size", _size(manifest)),
            ("TensorRT", _tensorrt(manifest.get("onnx"))),
            ("gate", _gate(manifest.get("verdict"))),
            ("artifact", _artifact(manifest, folder))]


def _quality(ev: dict) -> str:
    dense, comp = flat_metrics(ev["dense"]), flat_metrics(ev["compressed"])
    parts = [f"{k} {fmt(v)}" for k, v in flat_metrics(ev.get("comparison", {})).items() if k != "samples"]
    parts += [f"{k} {fmt(comp[k])} (dense {fmt(dense[k])})" for k in dense if k in comp]
    return ", ".join(parts) + f" on {ev['data']['origin']} ({ev['backend']})"


def _speed(ev: dict) -> str:
    lat = ev.get("latency")
    if not lat:
        return "not measured (latency needs an export stage)"
    s = lat["speedup"]
    text = (f"{s:.2f}x ({'faster' if s >= 1 else 'slower'} than dense): {fmt(lat['compressed']['median_ms'])} ms against "
            f"{fmt(lat['dense']['median_ms'])} ms (batch {lat['batch_size']}, {threads(lat['threads'])}, {provider(lat)})")
    default = lat.get("ort_default_settings")
    if default:
        text += (f"; {default['speedup']:.2f}x in a default ONNX Runtime session (the artifact's settings switch "
                 f"{', '.join(lat['disabled_optimizers'])} off)")
    gen = ev.get("generation")
    if gen and gen.get("decode_speedup"):
        text += f"; decode {gen['decode_speedup']:.2f}x"
    return text


def _size(manifest: dict) -> str:
    m = manifest["model"]
    text = f"{m['params_after'] / 1e6:.2f} M parameters of {m['params_before'] / 1e6:.2f} M"
    size = (manifest.get("evaluation") or {}).get("size", {})
    if "onnx_bytes" in size.get("dense", {}):
        d, c = size["dense"]["onnx_bytes"], size["compressed"]["onnx_bytes"]
        text = f"ONNX {c / 1e6:.1f} MB against {d / 1e6:.1f} MB dense (x{c / d:.2f}); " + text
    return text


def _tensorrt(onnx: dict | None) -> str:
    if not onnx or not onnx.get("tensorrt"):
        return "no ONNX graph (add '- type: export')"
    trt = onnx["tensorrt"]
    head = f"{trt['target']} (TensorRT {trt['tensorrt']}): "
    if not trt["ok"]:
        first = trt["errors"][0]
        return head + f"NOT ready ({len(trt['errors'])} problems; first: {first['message']})"
    engine = trt["build"]["engine"]
    built = ("engine built and checked here" if engine["built"]
             else "ready; build the engine on the device with build/build_engine.sh")
    return head + built


def _gate(judged: dict | None) -> str:
    if not judged:
        return "no verdict (the run has no evaluate stage)"
    if judged["accepted"] is None:
        return "no quality gate (set evaluation.accept)"
    checks = ", ".join(f"{c['metric']} {c['value']:g} ({'<=' if c['field'].startswith('max_') else '>='} "
                       f"{c['bound']:g} required)" for c in judged["checks"])
    return f"{'ACCEPTED' if judged['accepted'] else 'REJECTED'}: {checks}"


def _artifact(manifest: dict, folder: Path) -> str:
    graphs = [a["path"] for a in manifest.get("artifacts", []) if "/" not in a["path"]
              and a["path"].endswith((".onnx", ".gguf"))]
    return f"{folder}/" + (f" ({', '.join(graphs)})" if graphs else "")


def print_run(console: Console, manifest: dict, folder: Path) -> None:
    """`inspect`: the overview's facts and tables, then the summary panel."""
    o = overview(manifest)
    console.rule(f"[bold]{o.title}")
    for fact in o.facts:
        console.print(Text(f"• {fact}"))
    for title, headers, rows in o.tables:
        table = Table(title=title, title_justify="left", header_style="bold")
        for h in headers:
            table.add_column(h, overflow="fold")
        for row in rows:
            table.add_row(*(Text(fmt(v)) for v in row))
        console.print(table)
    console.print(summary_panel(manifest, folder))
