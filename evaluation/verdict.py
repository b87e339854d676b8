"""The run's verdict: the artifact's quality and speed against dense, and whether it meets the gate.

Read from the evaluate stage's numbers (no model runs here). The task says which comparison metric
each ``evaluation.accept`` field bounds (``Task.accept_metrics``; "max_" fields are upper bounds,
"min_" fields lower ones). Without ``accept`` the verdict still reports quality and speed, with
``accepted: None``; the pipeline refuses to publish, and exits 1, when it is False.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the report imports this module and must not pull torch in with the tasks
    from tasks import Task

    from .spec import AcceptSpec


def flat_metrics(values: dict) -> dict[str, float]:
    """A side's numeric metrics with one level of nesting named out ({"lee": {"pearson": x}} -> "lee pearson"),
    as the report's table and figure show them."""
    out: dict[str, float] = {}
    for k, v in values.items():
        for name, x in (v.items() if isinstance(v, dict) else [("", v)]):
            if isinstance(x, (int, float)) and not isinstance(x, bool):
                out[f"{k} {name}" if name else k] = x
    return out


def _speed(evaluation: dict) -> dict:
    out: dict = {}
    latency = evaluation.get("latency")
    if latency:
        out["speedup"] = latency["speedup"]
    size = evaluation.get("size", {})
    dense, comp = size.get("dense", {}), size.get("compressed", {})
    key = "onnx_bytes" if "onnx_bytes" in dense else "nonzero_params"
    if dense.get(key):
        out[f"{key}_ratio"] = round(comp[key] / dense[key], 4)
    return out


def _checks(comparison: dict, accept: AcceptSpec, task: Task) -> list[dict]:
    checks = []
    for field, bound in accept.model_dump(exclude_none=True).items():
        metric = task.accept_metrics[field]
        value = comparison[metric]
        ok = value <= bound if field.startswith("max_") else value >= bound
        checks.append({"field": field, "metric": metric, "value": value, "bound": bound, "ok": ok})
    return checks


def _line(quality: dict, speed: dict, checks: list[dict], accepted: bool | None) -> str:
    parts = [", ".join(f"{k} {v:g}" for k, v in quality.items())]
    if "speedup" in speed:
        parts.append(f"speedup {speed['speedup']:g}x")
    parts += [f"{k.removesuffix('_ratio')} x{v:g} of dense" for k, v in speed.items() if k.endswith("_ratio")]
    head = "verdict: " + "; ".join(p for p in parts if p)
    if accepted is None:
        return f"{head}: no quality gate (set evaluation.accept)"
    if accepted:
        return f"{head}: ACCEPTED (" + ", ".join(f"{c['field']} {c['bound']:g}" for c in checks) + ")"
    missed = [c for c in checks if not c["ok"]]
    return f"{head}: REJECTED (" + ", ".join(
        f"{c['metric']} {c['value']:g} {'>' if c['field'].startswith('max_') else '<'} {c['bound']:g}"
        for c in missed) + ")"


def verdict(evaluation: dict, accept: AcceptSpec | None, task: Task) -> dict:
    """The manifest's ``verdict``: quality (the task's gateable metrics), speed, each check, the line."""
    comparison = evaluation.get("comparison", {})
    quality = {m: comparison[m] for m in task.accept_metrics.values() if m in comparison}
    speed = _speed(evaluation)
    checks = _checks(comparison, accept, task) if accept is not None else []
    accepted = all(c["ok"] for c in checks) if accept is not None else None
    return {"accepted": accepted, "quality": quality, "speed": speed, "checks": checks,
            "line": _line(quality, speed, checks, accepted)}
