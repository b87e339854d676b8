"""Sequential Wanda calibration on SmolLM2-135M, 128 x 512 tokens: reference loop vs the pipeline.

The reference loop reproduces locuslab/wanda's `prune_wanda` structure (written from its
description, not copied): one window at a time (batch 1), eager attention, fp32, the full layer
forward in the statistics pass, prune, a second full pass to propagate. The pipeline batches
windows, uses SDPA, stops the statistics pass after the last hooked Linear, and optionally
computes in bfloat16 (statistics still accumulate in fp64). Each variant then gets perplexity on
the same held-out windows, so "same statistics" is checked by its effect on quality.

    python bench/calibration_speed.py [--samples 128] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from common import SMOLLM2, run_recipe, stage, table, write_json


def reference_wanda(model, windows: list[torch.Tensor], sparsity: float) -> float:
    """Batch-1 sequential Wanda as the reference implementation runs it; returns seconds."""
    t0 = time.perf_counter()
    model.config._attn_implementation = "eager"
    layers = model.model.layers
    inps, kwargs = [], {}

    class Caught(Exception):
        pass

    def catch(module, args, kw):
        inps.append(args[0])
        kwargs.update(kw)
        raise Caught

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    with torch.no_grad():
        for w in windows:
            try:
                model(input_ids=w, use_cache=False)
            except Caught:
                pass
    handle.remove()
    outs = [None] * len(inps)
    for layer in layers:
        subset = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        scaler = {n: torch.zeros(m.in_features) for n, m in subset.items()}
        count = {n: 0 for n in subset}

        def add_batch(name, scaler=scaler, count=count):
            def hook(module, args):
                inp = args[0].reshape(-1, args[0].shape[-1]).t().float()
                scaler[name] *= count[name] / (count[name] + 1)
                count[name] += 1
                scaler[name] += torch.norm(inp, p=2, dim=1) ** 2 / count[name]
            return hook

        hooks = [m.register_forward_pre_hook(add_batch(n)) for n, m in subset.items()]
        with torch.no_grad():
            for j, x in enumerate(inps):
                outs[j] = layer(x, **kwargs)
        for h in hooks:
            h.remove()
        for n, m in subset.items():
            metric = m.weight.data.abs() * scaler[n].sqrt().unsqueeze(0)
            idx = torch.sort(metric, dim=-1, stable=True).indices[:, : int(metric.shape[1] * sparsity)]
            m.weight.data.scatter_(1, idx, 0.0)
        with torch.no_grad():
            for j, x in enumerate(inps):
                outs[j] = layer(x, **kwargs)
        inps, outs = outs, inps
    model.config._attn_implementation = "sdpa"
    return time.perf_counter() - t0


def recipe(samples: int, seq_len: int, dtype: str, propagation: str) -> dict:
    return {"name": f"speed-{dtype}-{propagation}", "model": {"source": SMOLLM2, "task": "causal-lm"},
            "calibration": {"source": "builtin", "num_samples": samples, "seq_len": seq_len, "batch_size": 8,
                            "dtype": dtype},
            "stages": [{"type": "calibrate"},
                       {"type": "prune_weights", "method": "wanda", "sparsity": 0.5, "propagation": propagation,
                        "targets": [r"re:.*layers\."]},
                       {"type": "evaluate"}],
            "export": {"batch_size": 1, "seq_len": 512},
            "evaluation": {"source": "builtin", "num_samples": 8}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()
    from calibration.spec import CalibrationSpec
    from evaluation.runner import Runner
    from evaluation.spec import EvaluationSpec
    from models import loading as models
    from models.spec import ModelSpec
    from tasks import TASKS, TaskModel
    from tasks.metrics import perplexity

    spec = ModelSpec(source=SMOLLM2, task="causal-lm")
    task = TASKS[spec.task]
    model, tok = models.load_model(spec, models.resolve_source(spec), task)
    cal = task.calibration_batches(tok, CalibrationSpec(num_samples=args.samples, seq_len=args.seq_len, batch_size=1))
    windows = [b.inputs["input_ids"] for b in cal]
    seconds = reference_wanda(model, windows, 0.5)
    held_out = task.evaluation_batches(tok, EvaluationSpec(num_samples=8), 1, 512)
    ref_ppl = perplexity(Runner(TaskModel(model, spec).eval(), None, 2), held_out)
    rows = [["reference loop (batch 1, eager, fp32)", "sequential", round(seconds, 1), 1.0, round(ref_ppl, 3)]]
    runs = {"reference": {"seconds": seconds, "perplexity": ref_ppl}}
    del model
    for dtype, propagation in (("float32", "sequential"), ("bfloat16", "sequential"), ("bfloat16", "dense")):
        with tempfile.TemporaryDirectory() as cache:  # a cold cache: every statistic is computed
            os.environ["PIPELINE_CACHE"] = cache
            m = run_recipe(recipe(args.samples, args.seq_len, dtype, propagation), f"speed-{dtype}-{propagation}")
        t = stage(m, "prune_weights")["seconds"] + (stage(m, "calibrate")["seconds"] if propagation == "dense" else 0)
        ppl = m["evaluation"]["compressed"]["perplexity"]
        rows.append([f"pipeline (batch 8, sdpa, {dtype})", propagation, round(t, 1), round(seconds / t, 2), ppl])
        runs[f"{dtype}-{propagation}"] = {"seconds": t, "perplexity": ppl, "dense_perplexity":
                                          m["evaluation"]["dense"]["perplexity"], "bench": m["bench"]}
    print(f"\nWanda 50% unstructured on SmolLM2-135M, {args.samples} x {args.seq_len} calibration tokens, "
          f"{torch.get_num_threads()} threads; perplexity on 8 x 512 held-out windows")
    print(table(["calibration", "propagation", "seconds", "speedup", "perplexity"], rows))
    print(f"\nwrote {write_json('calibration_speed', {'samples': args.samples, 'seq_len': args.seq_len, **runs})}")


if __name__ == "__main__":
    main()
