"""Calibration: real data in, fixed-shape batches and the dense statistics later stages ask for.

One dense layer-wise pass serves every later consumer of dense statistics (FLAP, dense-mode Wanda,
SmoothQuant) and one backward sweep serves gradient-based scores (GBLM). Stages that calibrate
sequentially (Wanda, GBLM activations) reuse the batches built here. Results are cached on disk.
Under torchrun the dense pass is spread over the processes (calibration/distributed.py); rank 0
alone writes.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from calibration import distributed
from calibration.batches import Batches
from calibration.cache import cache_key
from calibration.collectors import GradientHooks
from calibration.layerwise import LayerwiseEngine
from models.adapters import Adapter
from models.offload import Offloaded, trim_heap

from .base import Stage, StageArgs, StageResult, Table, check_positions
from .context import RunContext


class CalibrateArgs(StageArgs):
    type: Literal["calibrate"]
    gradient_samples: int | None = Field(default=None, ge=1)


class Calibrate(Stage):
    type = "calibrate"
    Args = CalibrateArgs
    offloads = True

    def validate(self, recipe, model, adapter, field):
        check_positions(recipe, model, recipe.calibration.seq_len, "calibration.seq_len")

    def run(self, ctx: RunContext, folder: Path) -> StageResult:
        t0 = time.perf_counter()
        spec = ctx.recipe.calibration
        ctx.calibration = ctx.task.calibration_batches(ctx.preprocessor, spec, image_size=ctx.recipe.export.image_size)
        metrics = {"origin": ctx.calibration.origin, "samples": ctx.calibration.num_samples,
                   "batches": len(ctx.calibration), "seq_len": spec.seq_len, "seed": spec.seed,
                   "data_sha256": ctx.calibration.sha256, "protocol": ctx.calibration.protocol,
                   "seconds_data": round(time.perf_counter() - t0, 3)}
        kinds = set(ctx.statistics.kinds)
        rows = []
        digest = ctx.model_digest() if kinds else None
        if kinds - {"gradients"}:
            t = time.perf_counter()
            hit = self._dense(ctx, kinds - {"gradients"}, digest)
            rows.append(["activations (" + ", ".join(sorted(kinds - {"gradients"})) + ")", hit,
                         round(time.perf_counter() - t, 2)])
        if "gradients" in kinds:
            t = time.perf_counter()
            hit = self._gradients(ctx, digest)
            rows.append([f"gradients ({self._gradient_samples(ctx)} samples)", hit, round(time.perf_counter() - t, 2)])
        metrics["statistics"] = {r[0]: {"cache": r[1], "seconds": r[2]} for r in rows}
        if ctx.world:
            metrics["processes"] = ctx.world.size  # of the dense pass on a cache miss
        tables = [Table("Statistics", ["statistic", "cache", "seconds"], rows)] if rows else []
        return StageResult(metrics, tables)

    def restore(self, ctx: RunContext, folder: Path, result: StageResult) -> None:
        self.run(ctx, folder)  # batches are rebuilt deterministically; statistics come from the cache

    def _dense(self, ctx: RunContext, kinds: set[str], digest: str) -> str:
        spec = ctx.recipe.calibration
        key = cache_key(kind="dense", model=digest, data=ctx.calibration.sha256, kinds=sorted(kinds), dtype=spec.dtype)
        stats = ctx.cache.load(key)
        if stats is None:
            job = {"digest": digest, "kinds": sorted(kinds), "dtype": spec.dtype, "batches": ctx.calibration}
            if ctx.world:
                distributed.send_job(ctx.world, job, ctx.model)
            stats = dense_statistics(ctx.model, ctx.adapter, job, ctx.world, ctx.events, ctx.offload)
            ctx.cache.save(key, stats)
            ctx.statistics.dense = stats
            return "miss"
        ctx.statistics.dense = stats
        return "hit"

    def _gradient_samples(self, ctx: RunContext) -> int:
        n = ctx.calibration.num_samples
        return min(n, self.args.gradient_samples or n)

    def _gradients(self, ctx: RunContext, digest: str) -> str:
        limit = self._gradient_samples(ctx)
        m = ctx.recipe.model
        key = cache_key(kind="gradients", model=digest, data=ctx.calibration.sha256, samples=limit, task=m.task,
                        pooling=m.pooling, normalize=m.normalize, dropout_seed=ctx.recipe.calibration.seed)
        ctx.statistics.gradients_key = key
        grads = ctx.cache.load(key)
        if grads is not None:
            ctx.statistics.gradients = grads
            return "hit"
        modules = {n: mod for block in linears(ctx.model, ctx.adapter).values() for n, mod in block.items()}
        ctx.statistics.gradients = collect_gradients(ctx, modules, limit)
        ctx.cache.save(key, ctx.statistics.gradients)
        return "miss"


def linears(model: torch.nn.Module, adapter: Adapter) -> dict[int, dict[str, torch.nn.Module]]:
    return {b.index: {n: model.get_submodule(n) for n in b.linears} for b in adapter.blocks(model)}


def dense_statistics(model: torch.nn.Module, adapter: Adapter, job: dict, world: distributed.World | None,
                     progress=None, offload: Offloaded | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """One dense pass over ``job["batches"]`` (with ``world``: this rank's shard, sums reduced over the ranks).
    Rank 0 and the other ranks (pipeline/workers.py) run this same function on the same job."""
    batches: Batches = job["batches"]
    engine = LayerwiseEngine(model, adapter, batches, getattr(torch, job["dtype"]), progress, offload)
    return engine.run(linears(model, adapter), set(job["kinds"]), "dense", world=world)


@contextlib.contextmanager
def _grad_mode(model: torch.nn.Module, train: bool, seed: int):
    """Gradients flow to activations only: weights stay frozen, block 0's input requires grad.

    Dropout (train mode) draws from a generator seeded with ``seed`` and the global one is restored
    after, so the same recipe gives the same gradients whatever ran before in the process.
    """
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(False)
    model.train(train)
    try:
        with torch.enable_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
        model.train(was_training)


def collect_gradients(ctx: RunContext, modules: dict, limit: int) -> dict:
    """GBLM's per-sample gradient sums of every Linear weight, from the task loss on calibration data."""
    spec = ctx.recipe.model
    embed = ctx.adapter.input_embedding(ctx.model)
    hooks = GradientHooks(modules)
    handle = embed.register_forward_hook(lambda mod, args, out: out.requires_grad_())
    seen = 0
    task = ctx.events.task(f"gradients over {limit} samples", total=limit)
    try:
        # SimCSE needs dropout on to make two views; the other losses are deterministic (eval mode).
        with _grad_mode(ctx.model, train=ctx.task.gradients_in_train_mode, seed=ctx.recipe.calibration.seed):
            for batch in ctx.calibration:
                if seen >= limit:
                    break
                take = min(batch.size, limit - seen)
                for rows in _backward_rows(take, ctx.task.gradients_couple_samples):
                    inputs = {k: v[rows].to(ctx.device) for k, v in batch.inputs.items()}
                    labels = batch.labels[rows].to(ctx.device) if batch.labels is not None else None
                    ctx.task.gradient_loss(ctx.model, spec, inputs, labels).backward()
                    trim_heap()  # freed activations fragment the heap: SmolLM2-135M's peak was 260 MiB higher
                seen += take
                hooks.samples = seen
                task.advance(take)
    finally:
        handle.remove()
        task.done()
    return hooks.remove()


def _backward_rows(take: int, coupled: bool) -> list[slice]:
    """The rows of a batch each backward pass takes: one sample at a time, as the hooks form
    per-sample gradients anyway, so autograd keeps one sample's activations and logits (a batch of 8
    x 256 tokens of SmolLM2-135M kept 6 GB: 49152-wide logits, their softmax and every layer's
    activations); a loss that couples its samples (SimCSE's in-batch negatives) takes the whole batch."""
    return [slice(0, take)] if coupled else [slice(i, i + 1) for i in range(take)]
