"""Evaluate stage: the compressed artifact against the dense model, same data, same runtime, same run.

Quality runs on held-out data that calibration never saw, at the export shapes, through ONNX
Runtime when an export stage came first (so the number describes the file that ships), else
through PyTorch. The dense model is reloaded from its source and exported at the same shapes.
Latency alternates between the two graphs in rounds, so machine noise hits both alike.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch

from calibration.batches import Batches, encode_texts, evaluation_batches
from calibration.cache import cache_key
from calibration.sources import lee_benchmark
from export import inspect as onnx_inspect
from export import onnx as onnx_export
from models.loading import cache_dir, load_model

from .base import Stage, StageArgs, StageResult
from .context import RunContext

LATENCY_ROUNDS = 5


class EvaluateArgs(StageArgs):
    type: Literal["evaluate"]


class Runner:
    """Runs a batch (the model's keyword inputs) through ONNX Runtime or PyTorch and returns numpy outputs."""

    def __init__(self, module: torch.nn.Module, onnx_path: Path | None, threads: int,
                 disabled_optimizers: tuple[str, ...] = ()):
        self.module, self.names = module, module.input_names
        self.sess = onnx_export.session(onnx_path, threads, disabled_optimizers) if onnx_path else None

    def __call__(self, batch: dict[str, torch.Tensor]) -> list[np.ndarray]:
        inputs = self.module.example(batch)
        if self.sess is not None:
            return self.sess.run(None, {n: t.numpy() for n, t in zip(self.names, inputs)})
        with torch.no_grad():
            return [t.float().numpy() for t in self.module(*inputs)]


def perplexity(run: Runner, batches: Batches) -> float:
    nll, count = 0.0, 0
    for b in batches:
        ids = b.inputs["input_ids"]
        logits = torch.from_numpy(run({"input_ids": ids})[0]).float()[:, :-1]
        nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                       ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
    return float(np.exp(nll / count))


def outputs(run: Runner, batches) -> np.ndarray:
    return np.concatenate([run(b.inputs)[0] for b in batches])


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True).clip(1e-12)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True).clip(1e-12)
    return (a * b).sum(-1)


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (for Spearman)."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=float)
    for value in np.unique(x):
        tied = x == value
        if tied.sum() > 1:
            r[tied] = r[tied].mean()
    return r


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.corrcoef(x, y)[0, 1])


def lee_correlation(run: Runner, docs_batches, n_docs: int, human: np.ndarray) -> dict:
    emb = outputs(run, docs_batches)[:n_docs]
    emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True).clip(1e-12)
    sim = emb @ emb.T
    iu = np.triu_indices(n_docs, k=1)
    model, ref = sim[iu], human[iu]
    return {"pearson": round(pearson(model, ref), 4), "spearman": round(pearson(ranks(model), ranks(ref)), 4)}


class Evaluate(Stage):
    type = "evaluate"
    Args = EvaluateArgs
    settings = ("export", "evaluation")
    compares_with_dense = True

    def run(self, ctx: RunContext, folder: Path) -> StageResult:
        spec, ex, task = ctx.recipe.evaluation, ctx.recipe.export, ctx.recipe.model.task
        batches = evaluation_batches(task, ctx.preprocessor, spec, ex.batch_size, ex.seq_len, ex.image_size)
        dense_model, _ = load_model(ctx.recipe.model, ctx.source)
        dense_tm, comp_tm = ctx.task_model(dense_model), ctx.task_model()
        dense_path = None
        if ctx.onnx is not None:
            dense_path = self._dense_onnx(ctx, dense_tm, dense_tm.example(batches.batches[0].inputs))
        threads = spec.latency.threads
        # Session options a stage asked for (quantize: the ones that keep ORT's int8 fusions), on both graphs alike.
        disabled = ctx.onnx.disabled_optimizers if ctx.onnx is not None else ()
        dense = Runner(dense_tm, dense_path, threads, disabled)
        comp = Runner(comp_tm, ctx.onnx.path if ctx.onnx is not None else None, threads, disabled)
        backend = "onnxruntime" if dense_path else "pytorch"
        result = {"backend": backend, "data": {"origin": batches.origin, **batches.protocol}}
        result.update(self._quality(ctx, dense, comp, batches))
        result["size"] = self._size(ctx, dense_model, dense_path)
        if dense_path:
            result["latency"] = self._latency(dense, comp, batches, spec.latency)
        ctx.evaluation = result
        return StageResult(result)  # report.md renders the evaluation from the manifest

    @staticmethod
    def _dense_onnx(ctx: RunContext, module, example) -> Path:
        """The dense model exported at the same shapes, cached by source hash, shapes and exporter."""
        ex, m = ctx.recipe.export, ctx.recipe.model
        key = cache_key(kind="dense-onnx", model=ctx.source.sha256, task=m.task, pooling=m.pooling,
                        normalize=m.normalize, shapes=[list(t.shape) for t in example], opset=ex.opset,
                        torch=torch.__version__)
        path = cache_dir() / "onnx" / f"{key[:32]}.onnx"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            onnx_export.export(module, example, path, module.input_names, module.output_names, ex.opset)
        return path

    def _quality(self, ctx, dense: Runner, comp: Runner, batches: Batches) -> dict:
        task = ctx.recipe.model.task
        if task == "causal-lm":
            d, c = perplexity(dense, batches), perplexity(comp, batches)
            return {"dense": {"perplexity": round(d, 4)}, "compressed": {"perplexity": round(c, 4)},
                    "comparison": {"perplexity_ratio": round(c / d, 4)}}
        a, b = outputs(dense, batches), outputs(comp, batches)
        if task == "image-classification":
            agree = float((a.argmax(-1) == b.argmax(-1)).mean())
            out = {"dense": {}, "compressed": {}, "comparison": {"top1_agreement": round(agree, 4)}}
            labels = [b_.labels for b_ in batches]
            if all(lab is not None for lab in labels):
                y = torch.cat(labels).numpy()
                out["dense"]["top1_accuracy"] = round(float((a.argmax(-1) == y).mean()), 4)
                out["compressed"]["top1_accuracy"] = round(float((b.argmax(-1) == y).mean()), 4)
            return out
        cos = cosine_rows(a, b)
        out = {"dense": {}, "compressed": {},
               "comparison": {"mean_cosine": round(float(cos.mean()), 5), "min_cosine": round(float(cos.min()), 5),
                              "samples": len(cos)}}
        if task == "feature-extraction" and ctx.recipe.evaluation.lee:
            lee = lee_benchmark(cache_dir())
            if lee is None:
                out["lee"] = "unavailable (PyPI unreachable for the gensim wheel)"
            else:
                ex = ctx.recipe.export
                docs = encode_texts(ctx.preprocessor, lee.documents, ex.batch_size, ex.seq_len)
                human = np.array(lee.similarity)
                out["dense"]["lee"] = lee_correlation(dense, docs, len(lee.documents), human)
                out["compressed"]["lee"] = lee_correlation(comp, docs, len(lee.documents), human)
                out["lee_protocol"] = {"documents": len(lee.documents), "pairs": len(lee.documents) * (len(lee.documents) - 1) // 2,
                                       "seq_len": ex.seq_len, "source": "gensim 4.4.0 test data (Lee et al. 2005)"}
        return out

    def _size(self, ctx, dense_model, dense_path) -> dict:
        def params(m):
            return sum(p.numel() for p in m.parameters())

        def nonzero(m):
            return sum(int((p != 0).sum()) for p in m.parameters())

        size = {"dense": {"params": params(dense_model), "nonzero_params": nonzero(dense_model)},
                "compressed": {"params": params(ctx.model), "nonzero_params": nonzero(ctx.model)}}
        if dense_path:
            for key, path in (("dense", dense_path), ("compressed", ctx.onnx.path)):
                size[key]["flops"] = onnx_inspect.matmul_flops(onnx.load(path))
                size[key]["onnx_bytes"] = onnx_export.file_bytes(path)
        return size

    def _latency(self, dense: Runner, comp: Runner, batches: Batches, spec) -> dict:
        inputs = batches.batches[0].inputs
        for run in (dense, comp):
            for _ in range(spec.warmup):
                run(inputs)
        times = {"dense": [], "compressed": []}
        per_round = max(1, spec.iterations // LATENCY_ROUNDS)
        for _ in range(LATENCY_ROUNDS):
            for key, run in (("dense", dense), ("compressed", comp)):
                for _ in range(per_round):
                    t = time.perf_counter()
                    run(inputs)
                    times[key].append(time.perf_counter() - t)
        batch = batches.batches[0].size
        out = {"threads": spec.threads, "batch_size": batch, "runs": per_round * LATENCY_ROUNDS}
        for key, ts in times.items():
            med = statistics.median(ts)
            out[key] = {"median_ms": round(med * 1e3, 3), "throughput_per_s": round(batch / med, 2)}
        out["speedup"] = round(out["dense"]["median_ms"] / out["compressed"]["median_ms"], 3)
        return out
