"""Distill stage: the compressed model (student) learns the dense model's outputs (teacher) on the
calibration samples, so some of what pruning cost comes back (docs/methods/recovery.md, distillation).

The teacher is the model as loaded, reloaded from its source, in eval mode without gradients; the
task chooses the loss (tasks/*.py ``distill_loss``) and methods/distill runs the loop with the
pruned zeros held at zero, so structured shapes and N:M patterns survive. Every ``checkpoint_every``
steps the weights, optimizer and loss curve are saved in the stage folder; ``--resume`` continues
from there (the runner keeps the folder of an interrupted stage when nothing before it changed).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from core.errors import RecipeError
from core.files import write_atomic
from core.targets import select
from methods.distill import Settings, TrainState, distill
from models.loading import load_model

from .base import Stage, StageArgs, StageResult
from .context import RunContext

CHECKPOINT = "checkpoint.pt"


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
    bf16: bool = False
    seed: int = 0
    device: Literal["cpu", "cuda", "auto"] = "auto"
    targets: list[str] = ["re:.*"]  # which parameters train (names, or re: patterns)
    ignore: list[str] = []
    checkpoint_every: int = Field(default=50, ge=1)

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
        return f"{args.steps} steps x {args.batch_size * args.gradient_accumulation} samples, lr {args.lr:g}"

    def validate(self, recipe, model, adapter, field):
        self._params(model, field)
        if self.args.device == "cuda" and not torch.cuda.is_available():
            raise RecipeError("device 'cuda' asked for, but torch sees no CUDA GPU here: use 'auto' or 'cpu'",
                              field=f"{field}.device")

    def _params(self, model: torch.nn.Module, field: str) -> dict[str, torch.nn.Parameter]:
        params = dict(model.named_parameters())
        return select(params, self.args.targets, self.args.ignore, field)  # type: ignore[arg-type]

    def _device(self) -> str:
        if self.args.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.args.device

    def run(self, ctx: RunContext, folder: Path) -> StageResult:
        args, task, spec = self.args, ctx.task, ctx.recipe.model
        device = self._device()
        teacher, _ = load_model(spec, ctx.source, task)
        teacher.requires_grad_(False)
        student = ctx.model.to(device)
        teacher.eval().to(device)
        params = self._params(student, "stages")
        state = self._resume(folder, student, device)
        samples = {k: torch.cat([b.inputs[k] for b in ctx.calibration]) for k in ctx.calibration.batches[0].inputs}

        def loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            with torch.no_grad():
                target = task.forward(teacher, batch, spec)
            return task.distill_loss(task.forward(student, batch, spec), target, batch, args.temperature)

        settings = Settings(lr=args.lr, steps=args.steps, batch_size=args.batch_size, warmup_steps=args.warmup_steps,
                            accumulation=args.gradient_accumulation, weight_decay=args.weight_decay, bf16=args.bf16,
                            seed=args.seed, device=device)
        start, t0 = state.step, time.perf_counter()
        bar = ctx.events.task(f"distill {args.steps} steps", total=args.steps)
        bar.advance(start)

        def on_step(s: TrainState) -> None:
            bar.advance(1, loss=round(s.losses[-1], 5))
            if s.step % args.checkpoint_every == 0 and s.step < args.steps:
                _save(folder, student, s)
        try:
            state = distill(student, params, loss, samples, settings, state, on_step)
        finally:
            bar.done()
        ctx.model = student.cpu()
        (folder / CHECKPOINT).unlink(missing_ok=True)  # the stage's model/ snapshot replaces it
        _write_curve(folder, state.losses)
        return StageResult({"device": device, "steps": args.steps, "resumed_at_step": start,
                            "samples_per_step": args.batch_size * args.gradient_accumulation,
                            "calibration_samples": len(next(iter(samples.values()))),
                            "trained_params": sum(p.numel() for p in params.values()),
                            "loss_first": round(state.losses[0], 6), "loss_last": round(state.losses[-1], 6),
                            "seconds_training": round(time.perf_counter() - t0, 3)})

    def _resume(self, folder: Path, student: torch.nn.Module, device: str) -> TrainState:
        """The state an interrupted run of this stage saved here, loaded into ``student``; else a fresh one."""
        path = folder / CHECKPOINT
        if not path.is_file():
            return TrainState()
        saved = torch.load(path, map_location=device, weights_only=True)
        student.load_state_dict(saved["model"])
        return TrainState(saved["step"], saved["losses"], saved["optimizer"], saved["scheduler"])


def _save(folder: Path, student: torch.nn.Module, state: TrainState) -> None:
    tmp = folder / (CHECKPOINT + ".tmp")
    torch.save({"model": student.state_dict(), "step": state.step, "losses": state.losses,
                "optimizer": state.optimizer, "scheduler": state.scheduler}, tmp)
    tmp.replace(folder / CHECKPOINT)
    _write_curve(folder, state.losses)


def _write_curve(folder: Path, losses: list[float]) -> None:
    """loss.json: the mean distillation loss of every optimizer step (matplotlib is not a dependency,
    so no plot is drawn here)."""
    write_atomic(folder / "loss.json", json.dumps({"step": list(range(1, len(losses) + 1)),
                                                   "loss": [round(x, 6) for x in losses]}))
