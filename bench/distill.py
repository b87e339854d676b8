"""Distillation recovery on MiniLM: a recipe (default: recipes/default.yaml, FLAP UL-UM 20% -> export -> INT8
-> evaluate; recipes/minilm-2of4.yaml adds Wanda 2:4) without its distill stage, and with one after the
last pruning stage at a few step budgets.

Same held-out protocol as the default recipe (64 paragraphs of Pride and Prejudice, the Lee
benchmark); the distill stage trains on the 128 calibration paragraphs (Northanger Abbey).

    python bench/distill.py [--recipe recipes/default.yaml] [--steps 0 60] [--lr 2e-4] [--batch-size 8]
                            [--targets 're:.*encoder\\.'] [--layer-loss 0 1] [--output distill-minilm]

Writes bench/results/<output>.json; step budget 0 is the recipe without distillation. The
defaults are the default recipe's own distill stage; the committed distill-minilm.json adds a
100-step run over every parameter (``--steps 100 --lr 1e-4 --targets 're:.*'``), and
distill-layer-minilm.json compares ``--layer-loss 0 1`` (block-output terms over all 6 blocks) at 60 steps;
distill-fp32-minilm.json (``--float --steps 0 60 150``) measures the distilled model before export and INT8;
distill-flap50-minilm.json (``--ratio 0.5 --steps 0 60``) prunes half of the Linear parameters instead of a fifth.
"""

from __future__ import annotations

import argparse

import yaml
from common import ROOT, run_recipe, stage, table, write_json


def recipe(path: str, steps: int, lr: float, batch_size: int, targets: list[str], layer_loss: float,
           float_only: bool, ratio: float | None) -> dict:
    base = yaml.safe_load((ROOT / path).read_text())
    if ratio is not None:  # every structured stage's ratio
        base["stages"] = [{**s, "ratio": ratio} if s["type"] == "prune_structured" else s for s in base["stages"]]
        base["evaluation"].pop("accept", None)  # the recipe's gate was set for its own ratio
    dropped = ("distill", "export", "quantize") if float_only else ("distill",)
    base["stages"] = [s for s in base["stages"] if s["type"] not in dropped]
    if float_only:  # evaluated in PyTorch fp32: what the pruned, distilled model keeps before any int8 rounding
        base["evaluation"] = {k: v for k, v in base["evaluation"].items() if k not in ("latency", "accept")}
    base["name"] = f"{base['name']}-distill{steps}" + (f"-layer{layer_loss:g}" if layer_loss else "") + \
        ("-fp32" if float_only else "") + \
        (f"-ratio{ratio:g}" if ratio is not None else "")
    if steps:
        at = max(i for i, s in enumerate(base["stages"]) if s["type"].startswith("prune_")) + 1
        layers = {"layer_loss": layer_loss} if layer_loss else {}
        base["stages"].insert(at, {"type": "distill", "steps": steps, "lr": lr, "batch_size": batch_size,
                                   "warmup_steps": max(1, steps // 10), "checkpoint_every": steps,
                                   "targets": targets, **layers})
    return base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/default.yaml", help="relative to the repository root")
    ap.add_argument("--steps", nargs="+", type=int, default=[0, 60])
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--targets", nargs="+", default=[r"re:.*encoder\."], help="parameters that train")
    ap.add_argument("--layer-loss", nargs="+", type=float, default=[0.0],
                    help="weights of the block-output term (all blocks); each step budget runs with each")
    ap.add_argument("--output", default="distill-minilm", help="bench/results/<output>.json")
    ap.add_argument("--ratio", type=float, help="set every structured pruning stage's ratio")
    ap.add_argument("--float", action="store_true", dest="float_only",
                    help="drop export and quantize: the distilled model's own quality in PyTorch fp32")
    args = ap.parse_args()
    rows, runs = [], []
    budgets = [(steps, w) for steps in args.steps for w in (args.layer_loss if steps else [0.0])]
    for steps, layer_loss in budgets:
        r = recipe(args.recipe, steps, args.lr, args.batch_size, args.targets, layer_loss, args.float_only,
                   args.ratio)
        m = run_recipe(r, r["name"])
        ev = m["evaluation"]
        distill = stage(m, "distill") if steps else None
        row = {"steps": steps, "lr": args.lr if steps else None, "targets": args.targets if steps else None,
               "batch_size": args.batch_size if steps else None, "layer_loss": layer_loss if steps else None,
               "mean_cosine": ev["comparison"]["mean_cosine"], "min_cosine": ev["comparison"]["min_cosine"],
               "lee_pearson_dense": ev["dense"]["lee"]["pearson"], "lee_pearson": ev["compressed"]["lee"]["pearson"],
               "lee_spearman": ev["compressed"]["lee"]["spearman"],
               "distill_seconds": distill["seconds"] if distill else 0, "pipeline_wall_seconds": m["bench"]["wall_seconds"],
               "latency_speedup": ev.get("latency", {}).get("speedup")}
        runs.append(row)
        rows.append([steps, row["layer_loss"], row["mean_cosine"], row["min_cosine"], row["lee_pearson"],
                     row["distill_seconds"], row["pipeline_wall_seconds"], row["latency_speedup"]])
    print(table(["distill steps", "layer loss", "mean cos", "min cos", "Lee pearson", "distill s", "pipeline s",
                 "speedup"], rows))
    print(write_json(args.output, {"recipe": f"{args.recipe}, distill stage after the last pruning stage as listed"
                                             + (", export and quantize removed (PyTorch fp32)" if args.float_only else "")
                                             + (f", structured ratio {args.ratio:g}" if args.ratio is not None else ""),
                                   "runs": runs}))


if __name__ == "__main__":
    main()
