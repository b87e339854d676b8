"""Distill stage: the compressed model (student) learns the dense model's outputs (teacher) on the
calibration samples, so some of what pruning cost comes back (docs/methods/recovery.md, distillation).

The teacher is the model as loaded, reloaded from its source, in eval mode without gradients; the
task chooses the output loss (tasks/*.py ``distill_loss``), ``layer_loss`` adds the squared error of
chosen block outputs (methods/distill/layers.py), and methods/distill runs the loop with the pruned
zeros held at zero, so structured shapes and N:M patterns survive. With ``teacher_cache`` the
teacher's outputs for every sample are computed once into ``teacher/`` in the stage folder
(core/arrays.py) and the teacher is released before training starts. Every ``checkpoint_every``
steps the weights, optimizer and loss curve (loss.json, loss.png) are saved in the stage folder;
``--resume`` continues from there and reuses a complete teacher cache (the runner keeps the folder
of an interrupted stage when nothing before it changed).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from core.arrays import RowWriter, read_rows, row_bytes
from core.errors import RecipeError
from core.files import write_atomic
from core.plots import line_plot
from core.targets import select
from methods.distill import Settings, TrainState, autocast, block_outputs, distill, layer_mse
from models.loading import load_model

from .base import Stage, StageArgs, StageResult
from .context import RunContext

CHECKPOINT = "checkpoint.pt"
CACHE = "teacher"
CACHE_FORMAT = 1  # bump when what the cache holds changes

Batch = dict[str, torch.Tensor]
Targets = Callable[[Batch], Batch]  # inputs -> the teacher's "output.<i>" and "block.<j>" tensors


class DistillArgs(StageArgs):
    type: Literal["distill"]
    optimizer: Literal["adamw"] = "adamw"
    lr: float = Field(default=1e-4, gt=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    steps: int = Field(default=100, ge=1)
    batch_size: int = Field(default=8, ge=1)
    warmup_steps: int = Field(default=0, ge=0)
    gradient_accumulation: int = Field(default=1, ge=1)
    temperature: float = Field(default=2.0, gt=0)  # logits tasks (causal LM, image classification)
    layer_loss: float = Field(default=0.0, ge=0)  # weight of the block-output squared error; 0: off
    layers: Literal["all"] | list[int] = "all"  # the blocks (0-based) whose outputs layer_loss compares
    teacher_cache: bool = False  # teacher outputs computed once into the stage folder, the teacher freed
    teacher_cache_max_gb: float = Field(default=4.0, gt=0)  # refuse a larger cache (GB = 10^9 bytes)
    bf16: bool = False
    seed: int = 0
    targets: list[str] = ["re:.*"]  # which parameters train (names, or re: patterns)
    ignore: list[str] = []
    checkpoint_every: int = Field(default=50, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _run_device(cls, data):
        """Distill had a ``device`` of its own; say where it went rather than only that the key is unknown."""
        if isinstance(data, dict) and "device" in data:
            raise ValueError("the device is the run's, set once for every stage: the recipe's top-level "
                             "'device:' or 'run --device'; remove it here")
        return data

    @field_validator("layers")
    @classmethod
    def _distinct_layers(cls, v):
        if v != "all" and (not v or len(set(v)) != len(v)):
            raise ValueError("give 'all' or a non-empty list of distinct block indices")
        return v

    @model_validator(mode="after")
    def _warmup_within_steps(self):
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be fewer than steps ({self.steps})")
        return self


class Distill(Stage):
    type = "distill"
    Args = DistillArgs
    changes_model = True
    resumable = True

    @classmethod
    def needs_calibration(cls, args):
        return "data"

    @classmethod
    def describe(cls, args):
        layers = f", layer loss {args.layer_loss:g}" if args.layer_loss else ""
        teacher = ", teacher cached" if args.teacher_cache else ""
        return f"{args.steps} steps x {args.batch_size * args.gradient_accumulation} samples, lr {args.lr:g}{layers}{teacher}"

    def validate(self, recipe, model, adapter, field):
        self._params(model, field)
        n = len(adapter.blocks(model))
        bad = [] if self.args.layers == "all" else [i for i in self.args.layers if not 0 <= i < n]
        if bad:
            raise RecipeError(f"block indices {bad} do not exist: this model has {n} blocks, 0 to {n - 1}",
                              field=f"{field}.layers")

    def _params(self, model: torch.nn.Module, field: str) -> dict[str, torch.nn.Parameter]:
        params = dict(model.named_parameters())
        return select(params, self.args.targets, self.args.ignore, field)  # type: ignore[arg-type]

    def _layers(self, blocks: int) -> list[int]:
        """The blocks whose outputs are compared (none when layer_loss is 0)."""
        if not self.args.layer_loss:
            return []
        return list(range(blocks)) if self.args.layers == "all" else sorted(self.args.layers)

    def run(self, ctx: RunContext, folder: Path) -> StageResult:
        args, field = self.args, f"stages[{ctx.stage_index}]"
        device = str(ctx.device)
        student = ctx.model
        params = self._params(student, "stages")
        state = self._resume(folder, student, device)
        inputs = {k: torch.cat([b.inputs[k] for b in ctx.calibration]) for k in ctx.calibration.batches[0].inputs}
        settings = Settings(lr=args.lr, steps=args.steps, batch_size=args.batch_size, warmup_steps=args.warmup_steps,
                            accumulation=args.gradient_accumulation, weight_decay=args.weight_decay, bf16=args.bf16,
                            seed=args.seed, device=device)
        layers = self._layers(len(ctx.adapter.blocks(student)))
        teacher_metrics: dict = {"teacher": "live"}
        if args.teacher_cache:
            cached, teacher_metrics = self._cache(ctx, folder / CACHE, inputs, layers, settings, field)
            samples, targets = {**inputs, **cached}, None
        else:
            samples, targets = inputs, self._teacher(ctx, layers, device)
        loss = self._loss(ctx, student, layers, list(inputs), targets, field)
        start, t0 = state.step, time.perf_counter()
        bar = ctx.events.task(f"distill {args.steps} steps", total=args.steps)
        bar.advance(start)

        def on_step(s: TrainState) -> None:
            bar.advance(1, loss=_digits(s.losses[-1]))
            if s.step % args.checkpoint_every == 0 and s.step < args.steps:
                _save(folder, student, s)
        try:
            state = distill(student, params, loss, samples, settings, state, on_step)
        finally:
            bar.done()
        ctx.model = student
        (folder / CHECKPOINT).unlink(missing_ok=True)  # the stage's model/ snapshot replaces it
        shutil.rmtree(folder / CACHE, ignore_errors=True)  # and it needs no teacher outputs any more
        _write_curve(folder, state.losses)
        return StageResult({"device": device, "steps": args.steps, "resumed_at_step": start,
                            "samples_per_step": args.batch_size * args.gradient_accumulation,
                            "calibration_samples": len(next(iter(inputs.values()))),
                            "trained_params": sum(p.numel() for p in params.values()), **teacher_metrics,
                            "loss_first": _digits(state.losses[0]), "loss_last": _digits(state.losses[-1]),
                            "seconds_training": round(time.perf_counter() - t0, 3),
                            "plots": {"distillation loss": str((folder / "loss.png").relative_to(ctx.workdir))}})

    def _teacher(self, ctx: RunContext, layers: list[int], device: str) -> Targets:
        """The dense model as a function of a batch: its task outputs ("output.<i>") and the outputs of
        the chosen blocks ("block.<j>"), without gradients. The function holds the only reference."""
        model, _ = load_model(ctx.recipe.model, ctx.source, ctx.task)
        model.requires_grad_(False)
        model.eval().to(device)
        blocks = ctx.adapter.blocks(model)
        hooked = {i: blocks[i].module for i in layers}

        def targets(batch: Batch) -> Batch:
            with torch.no_grad(), block_outputs(hooked) as states:
                outputs = ctx.task.forward(model, batch, ctx.recipe.model)
            return {**{f"output.{i}": o for i, o in enumerate(outputs)}, **{f"block.{j}": s for j, s in states.items()}}
        return targets

    def _loss(self, ctx: RunContext, student: torch.nn.Module, layers: list[int], input_keys: list[str],
              targets: Targets | None, field: str) -> Callable[[Batch], torch.Tensor]:
        """The task's output loss plus ``layer_loss`` times the block-output term. The teacher's side
        comes from ``targets`` (live) or, with ``targets`` None, from the batch (cached rows)."""
        task, spec, args = ctx.task, ctx.recipe.model, self.args
        blocks = ctx.adapter.blocks(student)
        hooked = {i: blocks[i].module for i in layers}

        def loss(batch: Batch) -> torch.Tensor:
            inputs = {k: batch[k] for k in input_keys}
            want = targets(inputs) if targets is not None else batch
            with block_outputs(hooked) as got:
                outputs = task.forward(student, inputs, spec)
            value = task.distill_loss(outputs, tuple(want[f"output.{i}"] for i in range(len(outputs))), inputs,
                                      args.temperature)
            if not layers:
                return value
            teacher = {j: want[f"block.{j}"] for j in layers}
            return value + args.layer_loss * layer_term(got, teacher, inputs.get("attention_mask"), f"{field}.layer_loss")
        return loss

    def _cache(self, ctx: RunContext, path: Path, inputs: Batch, layers: list[int], settings: Settings,
               field: str) -> tuple[Batch, dict]:
        """The teacher's outputs for every sample, memory-mapped from ``path``: reused when a complete
        cache for the same inputs is there (a resumed run), else computed by a teacher that is loaded
        here and released on return. Returns the rows and the metrics that describe them."""
        key = _cache_key(ctx, inputs, layers, settings)
        cached = read_rows(path, key)
        reused = cached is not None
        if cached is None:
            _write_cache(path, key, self._teacher(ctx, layers, settings.device), inputs, settings,
                         self.args.teacher_cache_max_gb, field)
            cached = read_rows(path, key)
        assert cached is not None  # just written for this key
        size = sum(f.stat().st_size for f in path.iterdir())
        return cached, {"teacher": "cache", "teacher_cache_mb": round(size / 1e6, 2), "teacher_cache_reused": reused}

    def _resume(self, folder: Path, student: torch.nn.Module, device: str) -> TrainState:
        """The state an interrupted run of this stage saved here, loaded into ``student``; else a fresh one."""
        path = folder / CHECKPOINT
        if not path.is_file():
            return TrainState()
        saved = torch.load(path, map_location=device, weights_only=True)
        student.load_state_dict(saved["model"])
        return TrainState(saved["step"], saved["losses"], saved["optimizer"], saved["scheduler"])


def layer_term(student: dict[int, torch.Tensor], teacher: dict[int, torch.Tensor], mask: torch.Tensor | None,
               field: str) -> torch.Tensor:
    """`layer_mse` of the block outputs, refusing blocks whose outputs differ in shape: every stage
    here keeps the hidden width and the sequence (token pruning must come after distill), so no
    projection between a narrower student and its teacher exists to compare them through."""
    for j, want in teacher.items():
        got = student[j]
        if got.shape != want.shape:
            raise RecipeError(f"block {j} of the student outputs {tuple(got.shape)} and the teacher's "
                              f"{tuple(want.shape)}; layer_loss compares equal shapes only (no projection "
                              "between widths is implemented): set layer_loss: 0", field=field)
    return layer_mse(student, teacher, mask)


def _cache_key(ctx: RunContext, inputs: Batch, layers: list[int], settings: Settings) -> str:
    """What the teacher's outputs depend on: the checkpoint, how it is loaded, the exact inputs, the
    hooked blocks and how the forward runs."""
    h = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "source": ctx.source.sha256, "layers": layers,
                                   "model": ctx.recipe.model.model_dump(mode="json"), "bf16": settings.bf16,
                                   "device": settings.device}, sort_keys=True).encode())
    for name, t in sorted(inputs.items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _write_cache(path: Path, key: str, targets: Targets, inputs: Batch, settings: Settings, max_gb: float,
                 field: str) -> None:
    """The teacher's outputs in chunks of ``batch_size`` samples, as float16 rows; the size of the
    whole cache is checked against ``max_gb`` after the first chunk, before anything is written."""
    n = len(next(iter(inputs.values())))
    writer = None
    for start in range(0, n, settings.batch_size):
        batch = {k: v[start:start + settings.batch_size].to(settings.device) for k, v in inputs.items()}
        with autocast(settings):
            rows = {name: _half(t, f"{field}.teacher_cache") for name, t in targets(batch).items()}
        if writer is None:
            shapes = {name: tuple(r.shape[1:]) for name, r in rows.items()}
            _check_size(n, row_bytes(shapes), max_gb, f"{field}.teacher_cache_max_gb")
            writer = RowWriter(path, key, n, shapes)
        writer.write(start, rows)
    assert writer is not None  # calibration has at least one sample
    writer.close()


def _half(t: torch.Tensor, field: str) -> np.ndarray:
    """``t`` as float16 on the CPU; a value beyond float16's range would become inf and poison the loss."""
    half = t.detach().to("cpu", torch.float16)
    if not bool(torch.isfinite(half).all()) and bool(torch.isfinite(t).all()):
        raise RecipeError(f"a teacher output reaches {t.abs().max().item():.4g}, beyond float16's 65504, in "
                          "which the cache stores outputs: set teacher_cache: false", field=field)
    return half.numpy()


def _check_size(samples: int, per_sample: int, max_gb: float, field: str) -> None:
    """Refuse a cache above the bound (full-vocabulary logits: samples x seq_len x vocabulary x 2 bytes)."""
    gb = samples * per_sample / 1e9
    if gb > max_gb:
        raise RecipeError(f"the teacher cache would take {gb:.3g} GB ({samples} samples x {per_sample / 1e6:.3g} MB "
                          f"in float16), above teacher_cache_max_gb {max_gb:g}: use fewer calibration samples "
                          "(calibration.num_samples) or a shorter calibration.seq_len, raise the bound if the disk "
                          "has room, or set teacher_cache: false", field=field)


def _save(folder: Path, student: torch.nn.Module, state: TrainState) -> None:
    tmp = folder / (CHECKPOINT + ".tmp")
    torch.save({"model": student.state_dict(), "step": state.step, "losses": state.losses,
                "optimizer": state.optimizer, "scheduler": state.scheduler}, tmp)
    tmp.replace(folder / CHECKPOINT)
    _write_curve(folder, state.losses)


def _digits(x: float) -> float:
    """Six significant digits: a loss near 1e-5 (a lightly pruned model) keeps its precision."""
    return float(f"{x:.6g}")


def _write_curve(folder: Path, losses: list[float]) -> None:
    """loss.json (the mean distillation loss of every optimizer step) and the same curve as loss.png."""
    steps = list(range(1, len(losses) + 1))
    write_atomic(folder / "loss.json", json.dumps({"step": steps, "loss": [_digits(x) for x in losses]}))
    line_plot(folder / "loss.png", steps, {"loss": losses}, "distillation loss", "optimizer step", "loss")
