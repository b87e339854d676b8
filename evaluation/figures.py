"""The report's figures that stages draw into their own folders (core/plots.py draws them).

Each function writes one PNG and returns the stage's ``plots`` metric entry (title -> path relative to
the run folder), which report.md turns into an image link, the way the distill stage links its loss curve.
"""

from __future__ import annotations

from pathlib import Path

from core.plots import Panel, bar_panels, grouped_bars
from evaluation.verdict import flat_metrics

KEPT = "kept per layer (fraction of dense)"
SPARSITY = "sparsity per layer"
AGAINST_DENSE = "quality, latency and size against dense"
SAME_AS_DENSE = ("cosine", "agreement")  # comparison metrics whose dense value is 1 by definition


def _entry(path: Path, workdir: Path, title: str) -> dict[str, str]:
    return {title: path.relative_to(workdir).as_posix()}


def kept_per_layer(folder: Path, workdir: Path, layers: list[dict]) -> dict[str, str]:
    """Bars of kept heads, KV heads (when they differ from heads somewhere) and MLP channels per block.
    ``layers``: {"block", "heads", "kv_heads", "mlp_channels"} after and ``..._before`` for each."""
    series = {"heads": [lay["heads"] / lay["heads_before"] for lay in layers],
              "KV heads": [lay["kv_heads"] / lay["kv_heads_before"] for lay in layers],
              "MLP channels": [lay["mlp_channels"] / lay["mlp_channels_before"] for lay in layers]}
    if series["KV heads"] == series["heads"] and all(lay["kv_heads_before"] == lay["heads_before"] for lay in layers):
        del series["KV heads"]
    path = folder / "kept_per_layer.png"
    grouped_bars(path, [str(lay["block"]) for lay in layers], series, "kept per layer", "block",
                 "kept / dense", ylim=(0, 1.05))
    return _entry(path, workdir, KEPT)


def sparsity_per_layer(folder: Path, workdir: Path, sparsity: dict[str, float]) -> dict[str, str]:
    """One bar per pruned Linear, named without the prefix every name shares."""
    names = list(sparsity)
    prefix = _common_prefix(names)
    path = folder / "sparsity_per_layer.png"
    grouped_bars(path, [n[len(prefix):] or n for n in names], {"sparsity": list(sparsity.values())},
                 f"sparsity per layer{f' ({prefix}…)' if prefix else ''}", "layer", "zeros / weights", ylim=(0, 1))
    return _entry(path, workdir, SPARSITY)


def _common_prefix(names: list[str]) -> str:
    """The longest dotted prefix all names share ("encoder.layer."), empty for one name."""
    if len(names) < 2:
        return ""
    parts = [n.split(".") for n in names]
    shared = []
    for pieces in zip(*parts):
        if len(set(pieces)) > 1:
            break
        shared.append(pieces[0])
    return ".".join(shared) + "." if shared else ""


def against_dense(folder: Path, workdir: Path, evaluation: dict) -> dict[str, str]:
    """The evaluate stage's figure: `dense_panels` side by side."""
    path = folder / "against_dense.png"
    bar_panels(path, dense_panels(evaluation), AGAINST_DENSE)
    return _entry(path, workdir, AGAINST_DENSE)


def dense_panels(evaluation: dict) -> list[Panel]:
    """One panel per quality metric, then latency, decode speed and size: dense (grey), compressed (blue)."""
    labels = ["dense", "compressed"]
    dense, comp = flat_metrics(evaluation["dense"]), flat_metrics(evaluation["compressed"])
    panels = [Panel(k, labels, [dense[k], comp[k]]) for k in dense if k in comp]
    panels += [Panel(k, labels, [1.0, v]) for k, v in flat_metrics(evaluation.get("comparison", {})).items()
               if k.endswith(SAME_AS_DENSE)]
    lat = evaluation.get("latency")
    if lat:
        panels.append(Panel(f"latency (batch {lat['batch_size']})", labels,
                            [lat["dense"]["median_ms"], lat["compressed"]["median_ms"]], " ms"))
    gen = evaluation.get("generation")
    if gen:
        panels.append(Panel("decode tokens/s", labels,
                            [gen["dense"]["decode_tokens_per_s"], gen["compressed"]["decode_tokens_per_s"]]))
    size = evaluation.get("size", {})
    key, title = ("onnx_bytes", "ONNX MB") if "onnx_bytes" in size.get("dense", {}) else ("nonzero_params",
                                                                                          "non-zero params (M)")
    if key in size.get("dense", {}):
        panels.append(Panel(title, labels, [size["dense"][key] / 1e6, size["compressed"][key] / 1e6]))
    return panels
