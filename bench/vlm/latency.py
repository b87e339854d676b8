"""Time to first token of the exported easy-VQA VLM against the image tokens its language model reads.

Time to first token = the vision graph (image -> K projected image tokens) + the prefill graph (the
K image tokens and the question in a static window of K + 12 tokens) up to the first new token; the
prefill graph's MatMul FLOPs (export/inspect.py) are the language-model compute the window costs.

``windows``: exported pipeline runs, one per K (bench/results/recipes/easyvqa-window-k*.yaml), each
held-out question through every run in turn, so machine noise hits every run alike; medians.
``selectors``: the selector's own cost. The vision tower ending at the feature layer with each
selector at each K (the part of vision.onnx that differs between selectors; the projector after it
costs the same for every selector at one K) exported and timed in alternating rounds against the
unpruned tower. A selector's time to first token is its tower time + the projector + the prefill
at its K, as the table in the README adds them.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from export import inspect as onnx_inspect
from export import onnx as onnx_export
from models.spec import ModelSpec
from stages.token_prune import keep_count
from tasks import TaskModel

from . import data, evaluate, tokens

ROUNDS = 5


def windows(runs: list[Path], questions: int, threads: int) -> dict:
    """Median vision, prefill and first-token milliseconds per run, interleaved per question."""
    from transformers import AutoProcessor

    from evaluation.image_generation import OrtVlm
    from export.artifact import PREPROCESSOR
    from tasks.chat import chat_prompt_ids

    processor = AutoProcessor.from_pretrained(runs[0] / PREPROCESSOR)
    vlms = {run.name: OrtVlm(run, threads) for run in runs}
    test = data.load("test")
    chosen = np.concatenate(evaluate.held_out(test))[:questions]
    times: dict[str, dict[str, list[float]]] = {name: {"vision": [], "prefill": []} for name in vlms}
    for i, q in enumerate(chosen):
        pixels = data.pixels(test.images[test.image_rows[q]][None]).numpy()
        ids = chat_prompt_ids(processor.tokenizer, test.questions[q], raw=False)
        for name, vlm in vlms.items():
            t = time.perf_counter()  # the selector's own inputs (a question's text embedding) count as vision time
            feeds = {"pixel_values": pixels, **vlm.selector_inputs(test.questions[q], None, 0, int(q))}
            images = vlm.vision.run(None, feeds)[0]
            vision = time.perf_counter() - t
            vlm.decoder.images = images
            prefill = vlm.decoder.generate(vlm.prompt(images, ids, processor.image_token_id), 1).first_token_s
            if i:  # the first question warms every session up
                times[name]["vision"].append(vision)
                times[name]["prefill"].append(prefill)
    out = {}
    for name, vlm in vlms.items():
        vision, prefill = (statistics.median(times[name][k]) * 1e3 for k in ("vision", "prefill"))
        prefill_graph = onnx.load(str(next(r for r in runs if r.name == name) / "model.onnx"), load_external_data=False)
        out[name] = {"image_tokens": int(vlm.vision.get_outputs()[0].shape[1]), "window": vlm.decoder.prompt_len,
                     "prefill_gflops": round(onnx_inspect.matmul_flops(prefill_graph) / 1e9, 3),
                     "vision_ms": round(vision, 2), "prefill_ms": round(prefill, 2),
                     "first_token_ms": round(vision + prefill, 2)}
    base = out[runs[0].name]
    for row in out.values():
        for key in ("first_token_ms", "prefill_gflops"):
            row[f"{key}_vs_first_run"] = round(row[key] / base[key], 3)
    return {"questions": len(chosen) - 1, "threads": threads, "runs": out}


def selectors(clip_dir: Path, methods: list[str], keeps: list[float], iterations: int, threads: int) -> dict:
    """Median ms of the vision tower (to the feature layer) with each selector at each K, and unpruned."""
    towers = tokens.Towers(clip_dir)
    pixels = data.pixels(data.load("test").images[:1])
    with tempfile.TemporaryDirectory() as tmp:
        graphs = {"unpruned": _export(towers.vision, Path(tmp) / "unpruned.onnx", pixels)}
        for keep in keeps:
            k = keep_count(keep, towers.patches, "--keeps")
            for method in methods:
                pruner = towers.install(method, k)
                graphs[f"{method}@{k}"] = _export(towers.vision, Path(tmp) / f"{method}-{k}.onnx", pixels)
                pruner.remove()
        ms = _time(graphs, iterations, threads)
    return {"iterations": iterations, "threads": threads, "tower_ms": {k: round(v, 3) for k, v in ms.items()}}


def _export(model, path: Path, pixels: torch.Tensor) -> tuple[Path, dict]:
    """The tower (with its installed selector) as ONNX, and its example feeds."""
    tm = TaskModel(model, ModelSpec(source="easyvqa-clip", task=tokens.TASK))
    example = tm.example({"pixel_values": pixels})
    onnx_export.export(tm, example, path, tm.input_names, tm.output_names, 18)
    return path, {n: t.numpy() for n, t in zip(tm.input_names, example)}


def _time(graphs: dict[str, tuple[Path, dict]], iterations: int, threads: int) -> dict[str, float]:
    """Median ms per graph over alternating rounds."""
    sessions = {k: onnx_export.session(p, threads=threads) for k, (p, _) in graphs.items()}
    for k, s in sessions.items():
        s.run(None, graphs[k][1])
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(ROUNDS):
        for k, s in sessions.items():
            for _ in range(max(1, iterations // ROUNDS)):
                t = time.perf_counter()
                s.run(None, graphs[k][1])
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}
