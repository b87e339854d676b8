"""Structured pruning on real weights: FLAP vs wanda-sp vs magnitude-sp, with and without bias compensation.

Every configuration runs the whole pipeline (calibrate -> prune_structured -> export -> evaluate),
so quality, parameters, FLOPs and ONNX Runtime latency come from the exported artifact against the
dense ONNX in the same run. MiniLM also gets Torch-Pruning rows (optional: `pip install
torch-pruning`), pruned with its documented MetaPruner API at the same budget of encoder Linear
parameters, no fine-tuning, measured on the same held-out paragraphs.

    python bench/structured_pruning.py [--models minilm smollm2] [--ratios 0.2 0.5]
        [--variants flap:AL-AM:bias wanda-sp:UL-UM:nobias ...]
"""

from __future__ import annotations

import argparse

import torch
from common import MINILM, SMOLLM2, run_recipe, stage, table, write_json

# (method, structure, bias compensation): FLAP's default (AL-AM) and uniform structure, each baseline
# in its reference form (UL-UM, no compensation) and with FLAP's compensation added.
VARIANTS = [("flap", "AL-AM", True), ("flap", "AL-AM", False), ("flap", "UL-UM", True),
            ("wanda-sp", "UL-UM", False), ("wanda-sp", "UL-UM", True), ("magnitude-sp", "UL-UM", False)]


def _variant_name(variant: tuple[str, str, bool]) -> str:
    method, structure, bias = variant
    return f"{method}:{structure}:{'bias' if bias else 'nobias'}"


def recipe(model: str, method: str, structure: str, bias: bool, ratio: float) -> dict:
    tag = f"{model}-{method}-{structure}-{'bias' if bias else 'nobias'}-{int(ratio * 100)}"
    prune = {"type": "prune_structured", "method": method, "structure": structure, "ratio": ratio,
             "bias_compensation": bias, "align": 64}
    if model == "minilm":
        return {"name": tag, "model": {"source": MINILM, "task": "feature-extraction"},
                "calibration": {"source": "builtin", "num_samples": 128, "seq_len": 128, "batch_size": 16},
                "stages": [{"type": "calibrate"}, prune, {"type": "export"}, {"type": "evaluate"}],
                "export": {"batch_size": 1, "seq_len": 128},
                "evaluation": {"source": "builtin", "num_samples": 128, "lee": True,
                               "latency": {"threads": 2, "iterations": 40}}}
    return {"name": tag, "model": {"source": SMOLLM2, "task": "causal-lm"},
            "calibration": {"source": "builtin", "num_samples": 128, "seq_len": 512, "batch_size": 8},
            "stages": [{"type": "calibrate"}, prune, {"type": "export"}, {"type": "evaluate"}],
            "export": {"batch_size": 1, "seq_len": 512},
            "evaluation": {"source": "builtin", "num_samples": 8, "latency": {"threads": 2, "iterations": 10}}}


def row(m: dict, label: str, bias: str, ratio) -> tuple[list, dict]:
    """One table row (and its JSON record) from a run's manifest."""
    ev, st = m["evaluation"], stage(m, "prune_structured")["metrics"]
    size, lat = ev["size"], ev["latency"]
    quality = ([ev["compressed"]["perplexity"]] if "perplexity" in ev["compressed"] else
               [ev["comparison"]["mean_cosine"], ev["comparison"]["min_cosine"], ev["compressed"]["lee"]["pearson"]])
    r = [label, bias, ratio, st["achieved_ratio"], *quality, size["compressed"]["params"],
         round(size["compressed"]["flops"] / size["dense"]["flops"], 3),
         round(lat["compressed"]["median_ms"] / lat["dense"]["median_ms"], 3)]
    return r, {"label": label, "bias_compensation": bias, "ratio": ratio, "stage": st, "evaluation": ev,
               "bench": m["bench"]}


def _tp_prune(tp, model, spec, cal, channel_ratio: float, importance: str) -> None:
    """Torch-Pruning's documented HF-BERT recipe, restricted to heads and MLP channels like FLAP.

    The residual width is left alone (embeddings and both output projections are not roots), so
    the parameter budget is spent on the same structures FLAP removes.
    """
    from tasks import TASKS

    heads = {}
    for layer in model.encoder.layer:
        sa = layer.attention.self
        heads[sa.query] = heads[sa.key] = heads[sa.value] = sa.num_attention_heads
    imp = (tp.importance.MagnitudeImportance(p=2, group_reduction="mean") if importance == "l2"
           else tp.importance.TaylorImportance())
    ignored = [model.pooler, model.embeddings] + [m for layer in model.encoder.layer
                                                  for m in (layer.attention.output.dense, layer.output.dense)]
    example = {k: v[:1] for k, v in cal.batches[0].inputs.items()}
    pruner = tp.pruner.MetaPruner(model, example, global_pruning=True, importance=imp, iterative_steps=1,
                                  pruning_ratio=channel_ratio, num_heads=heads, prune_head_dims=False,
                                  prune_num_heads=True, head_pruning_ratio=channel_ratio,
                                  output_transform=lambda out: out.pooler_output.sum(), ignored_layers=ignored)
    if importance != "l2":  # Taylor needs gradients: the SimCSE loss on calibration text
        model.zero_grad()
        model.train()
        for batch in cal.batches[:4]:
            TASKS[spec.task].gradient_loss(model, spec, batch.inputs, None).backward()
        model.eval()
    pruner.step()
    for layer in model.encoder.layer:
        sa = layer.attention.self
        sa.num_attention_heads = pruner.num_heads[sa.query]
        sa.all_head_size = sa.query.out_features
    model.zero_grad()


def _block_linear_params(model) -> int:
    return sum(m.weight.numel() for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.startswith("encoder.layer."))


def torch_pruning_rows(ratios: list[float]) -> tuple[list[list], list[dict]]:
    """Torch-Pruning at the same budget of encoder Linear parameters (its pruning_ratio counts channels,
    so it is bisected until the removed parameter fraction matches), L2 and Taylor (SimCSE) importance."""
    try:
        import torch_pruning as tp
    except ImportError:
        return [["torch-pruning", "-", "-", "not installed (pip install torch-pruning)"]], []
    from calibration.spec import CalibrationSpec
    from evaluation.runner import Runner
    from evaluation.spec import EvaluationSpec
    from models import loading as models
    from models.spec import ModelSpec
    from tasks import TASKS, TaskModel
    from tasks.metrics import cosine_rows, outputs

    spec = ModelSpec(source=MINILM, task="feature-extraction")
    source = models.resolve_source(spec)
    task = TASKS[spec.task]
    dense, tok = models.load_model(spec, source, task)
    before = _block_linear_params(dense)
    held = task.evaluation_batches(tok, EvaluationSpec(num_samples=128), 1, 128)
    ref = outputs(Runner(TaskModel(dense, spec).eval(), None, 2), held)
    cal = task.calibration_batches(tok, CalibrationSpec(num_samples=128, seq_len=128, batch_size=16))
    rows, runs = [], []
    for ratio in ratios:
        for importance in ("l2", "taylor-simcse"):
            lo, hi, model, achieved = 0.0, 0.95, None, 0.0
            for _ in range(12):  # bisect the channel ratio onto the parameter budget
                mid = (lo + hi) / 2
                torch.manual_seed(0)
                model, _ = models.load_model(spec, source, task)
                _tp_prune(tp, model, spec, cal, mid, importance)
                achieved = 1 - _block_linear_params(model) / before
                if abs(achieved - ratio) < 0.005:
                    break
                lo, hi = (mid, hi) if achieved < ratio else (lo, mid)
            got = outputs(Runner(TaskModel(model, spec).eval(), None, 2), held)
            cos = cosine_rows(ref, got)
            rows.append([f"torch-pruning ({importance})", "-", ratio, round(achieved, 4), round(float(cos.mean()), 5),
                         round(float(cos.min()), 5), "-", sum(p.numel() for p in model.parameters()), "-", "-"])
            runs.append({"label": f"torch-pruning-{importance}", "ratio": ratio, "achieved": achieved,
                         "channel_ratio": mid, "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
                         "saveable_with_save_pretrained": _saveable(model)})
    return rows, runs


def _saveable(model) -> bool:
    import tempfile

    try:
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            type(model).from_pretrained(d)
        return True
    except Exception:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["minilm", "smollm2"], choices=["minilm", "smollm2"])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.5])
    ap.add_argument("--no-torch-pruning", action="store_true")
    ap.add_argument("--variants", nargs="+", default=[_variant_name(v) for v in VARIANTS],
                    choices=[_variant_name(v) for v in VARIANTS], help="method:structure:bias|nobias")
    args = ap.parse_args()
    variants = [v for v in VARIANTS if _variant_name(v) in args.variants]
    results = {"cuda": torch.cuda.is_available()}
    for name in args.models:
        rows, runs = [], []
        for ratio in args.ratios:
            for method, structure, bias in variants:
                r = recipe(name, method, structure, bias, ratio)
                m = run_recipe(r, r["name"])
                if not rows:
                    dense_q = ([m["evaluation"]["dense"]["perplexity"]] if name == "smollm2" else
                               [1.0, 1.0, m["evaluation"]["dense"]["lee"]["pearson"]])
                    rows.append(["dense", "-", 0.0, 0.0, *dense_q, m["evaluation"]["size"]["dense"]["params"], 1.0, 1.0])
                line, run = row(m, f"{method} {structure}", "yes" if bias else "no", ratio)
                rows.append(line)
                runs.append(run)
        if name == "minilm" and not args.no_torch_pruning:
            tp_rows, tp_runs = torch_pruning_rows(args.ratios)
            rows += tp_rows
            runs += tp_runs
        quality = ["perplexity"] if name == "smollm2" else ["mean cos", "min cos", "Lee pearson"]
        title = ("SmolLM2-135M: perplexity on 8 x 512 held-out windows (Pride and Prejudice); calibration 128 x 512 "
                 "(Northanger Abbey)" if name == "smollm2" else
                 "MiniLM-L6: cosine to dense embeddings on 128 held-out paragraphs + Lee benchmark")
        print(f"\n{title}; ratio = fraction of block Linear parameters removed; latency = ONNX Runtime CPU, 2 threads")
        print(table(["method", "bias comp.", "target", "achieved", *quality, "params", "FLOPs ratio", "latency ratio"],
                    rows))
        results[name] = runs
    if not torch.cuda.is_available():
        print("\nno CUDA device here: PyTorch GPU latency not measured")
    print(f"\nwrote {write_json('structured_pruning', results)}")


if __name__ == "__main__":
    main()
