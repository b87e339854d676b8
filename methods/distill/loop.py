"""The distillation loop: AdamW with linear warm-up and linear decay, gradient accumulation, optional
bf16 autocast, and the zeros that weight pruning left held at zero (docs/methods/recovery.md,
distillation).

Pure: parameters, a loss over a batch of samples and the settings in; trained parameters and the
loss per step out. What a step trains on depends only on (seed, step), so a run resumed from a
saved `TrainState` takes the same steps as one that never stopped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

Loss = Callable[[dict[str, torch.Tensor]], torch.Tensor]  # samples (already on the device) -> mean loss


@dataclass(frozen=True)
class Settings:
    lr: float
    steps: int
    batch_size: int
    warmup_steps: int = 0
    accumulation: int = 1  # micro-batches of ``batch_size`` per optimizer step
    weight_decay: float = 0.0
    bf16: bool = False
    seed: int = 0
    device: str = "cpu"


@dataclass
class TrainState:
    """Where training stands: what a checkpoint holds besides the weights."""

    step: int = 0
    losses: list[float] = field(default_factory=list)  # mean loss of each optimizer step taken
    optimizer: dict | None = None
    scheduler: dict | None = None


def zero_masks(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """True where a weight matrix is exactly zero: what pruning removed (a trained dense matrix has
    no exact zeros). Vectors (biases, norms) are left free; a zero bias is an initial value, not a
    pruned one."""
    return {n: p.detach() == 0 for n, p in params.items() if p.dim() >= 2 and bool((p == 0).any())}


def restore_masks(params: dict[str, nn.Parameter], masks: dict[str, torch.Tensor]) -> None:
    """Put the pruned zeros back (weight decay and momentum would move them off zero)."""
    with torch.no_grad():
        for n, mask in masks.items():
            params[n].masked_fill_(mask, 0)


def batch_indices(num_samples: int, micro_batch: int, batch_size: int, seed: int) -> torch.Tensor:
    """The sample indices of the ``micro_batch``-th micro-batch of the run: consecutive slices of a
    permutation drawn per epoch from (seed, epoch), so every sample is seen once per epoch."""
    perms: dict[int, torch.Tensor] = {}
    out = []
    for k in range(micro_batch * batch_size, (micro_batch + 1) * batch_size):
        epoch, pos = divmod(k, num_samples)
        if epoch not in perms:
            perms[epoch] = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perms[epoch][pos]))
    return torch.tensor(out)


def lr_factor(settings: Settings) -> Callable[[int], float]:
    """Linear warm-up over ``warmup_steps``, then linear decay to zero at the last step."""
    w, n = settings.warmup_steps, settings.steps

    def factor(step: int) -> float:
        return (step + 1) / w if step < w else max(0.0, (n - step) / (n - w))
    return factor


def distill(model: nn.Module, params: dict[str, nn.Parameter], loss: Loss, samples: dict[str, torch.Tensor],
            settings: Settings, state: TrainState | None = None,
            on_step: Callable[[TrainState], None] | None = None) -> TrainState:
    """Train ``params`` (the rest of ``model`` stays frozen) to lower ``loss`` over ``samples``.

    The model runs in eval mode (dropout off: the teacher's outputs are deterministic, and so is the
    run). Pruned zeros stay zero twice over: their gradients are zeroed before each step, so AdamW's
    moments stay zero, and the mask is re-applied after it. ``state`` resumes a saved run (the model
    must already hold that run's weights); ``on_step`` sees the state after every optimizer step.
    """
    state = state or TrainState()
    model.eval()
    chosen = {id(p) for p in params.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    masks = zero_masks(params)
    opt = torch.optim.AdamW(params.values(), lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(settings))
    if state.optimizer is not None:
        opt.load_state_dict(state.optimizer)
        sched.load_state_dict(state.scheduler)
    n = next(iter(samples.values())).shape[0]
    while state.step < settings.steps:
        state.losses.append(_step(params, loss, samples, n, settings, state.step, masks, opt))
        sched.step()
        state.step += 1
        state.optimizer, state.scheduler = opt.state_dict(), sched.state_dict()
        if on_step is not None:
            on_step(state)
    for p in model.parameters():
        p.requires_grad_(False)
    return state


def _step(params: dict[str, nn.Parameter], loss: Loss, samples: dict[str, torch.Tensor], n: int,
          settings: Settings, step: int, masks: dict[str, torch.Tensor], opt: torch.optim.Optimizer) -> float:
    """One optimizer step over ``accumulation`` micro-batches; returns their mean loss."""
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for micro in range(settings.accumulation):
        idx = batch_indices(n, step * settings.accumulation + micro, settings.batch_size, settings.seed)
        batch = {k: v[idx].to(settings.device) for k, v in samples.items()}
        with autocast(settings):
            value = loss(batch)
        (value / settings.accumulation).backward()
        total += float(value.detach()) / settings.accumulation
    for name, mask in masks.items():
        grad = params[name].grad
        if grad is not None:
            grad.masked_fill_(mask, 0)
    opt.step()
    restore_masks(params, masks)
    return total


def autocast(settings: Settings):
    """bfloat16 autocast when ``settings.bf16`` (the teacher's cached outputs are computed under it too)."""
    if not settings.bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda" if settings.device.startswith("cuda") else "cpu", dtype=torch.bfloat16)
