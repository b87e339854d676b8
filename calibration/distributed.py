"""Calibration statistics over several processes started by ``torchrun`` (gloo on CPU, NCCL on CUDA).

Each rank takes a contiguous shard of the calibration batches; after a block's statistics pass the
per-Linear sums are all-reduced, so every rank holds the statistics of the whole calibration set
before anything uses them. Every statistic the collectors keep is a sum over tokens (``sum_sq``,
``sum``, ``xtx``, ``tokens``, ``sequences``) or a maximum (``abs_max``); means and variances are
derived from the sums (collectors.Stats), so the reduced statistics equal a single process's up to
the order of the fp64 additions.

Scope: the calibrate stage's dense pass (Wanda/SparseGPT dense, FLAP, Wanda-sp, SmoothQuant). Rank 0
runs the pipeline and alone writes the run folder, the statistics cache and the artifact; the other
ranks load the model, compute their shard of each dense pass rank 0 hands them (`send_job` /
`next_job`) and exit once rank 0 says no calibrate stage is left. Sequential passes (Wanda/GBLM/
SparseGPT sequential, GPTQ, AWQ), GBLM gradients and every other stage run on rank 0 alone.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from core.device import on_cpu
from core.errors import RecipeError

T = TypeVar("T")
# The other ranks wait in a collective while rank 0 runs the stages between two calibrate stages
# (distillation can take hours); the default 30 min would end them.
WAIT = timedelta(hours=24)


@dataclass
class World:
    rank: int
    size: int
    device: torch.device  # where collectives take tensors: the CPU for gloo, this rank's GPU for NCCL
    released: bool = False  # rank 0 told the others that no work is left


def from_env(device: torch.device) -> World | None:
    """The process group ``torchrun`` describes (WORLD_SIZE > 1), joined once; None in a single process.
    A group already set up by the caller (tests: a file store) is used as it is."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not dist.is_initialized():
        return None
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=WAIT)
    if dist.get_world_size() == 1:
        return None
    nccl = dist.get_backend() == "nccl"
    return World(dist.get_rank(), dist.get_world_size(),
                 torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu"))


def check_batches(batches: int, size: int | None = None) -> None:
    """Every rank needs a batch: a rank without one would have no statistics to reduce. The planner calls
    this with the most batches the recipe can give (torchrun's WORLD_SIZE), `shard` with the real count."""
    size = size if size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if batches < size:
        raise RecipeError(f"the calibration set has {batches} batches for {size} processes; raise "
                          f"calibration.num_samples or lower calibration.batch_size, or start fewer processes",
                          field="calibration.num_samples")


def shard(items: Sequence[T], rank: int, size: int) -> list[T]:
    """Rank ``rank``'s contiguous slice: every item exactly once over the ranks, sizes differing by at most
    one."""
    check_batches(len(items), size)
    n = len(items)
    return list(items[rank * n // size:(rank + 1) * n // size])


def all_reduce_stats(stats: dict[str, dict[str, torch.Tensor]], world: World) -> None:
    """Sum (maximum for ``abs_max``) every statistic over the ranks, in place. A tensor shared by several
    Linears (q/k/v) is reduced once; one flat fp64 buffer per operation keeps it to two collectives."""
    sums: list[torch.Tensor] = []
    maxima: list[torch.Tensor] = []
    seen: set[int] = set()
    for fields in stats.values():
        for key, t in fields.items():
            if id(t) not in seen:
                seen.add(id(t))
                (maxima if key == "abs_max" else sums).append(t)
    for group, op in ((sums, dist.ReduceOp.SUM), (maxima, dist.ReduceOp.MAX)):
        if not group:
            continue
        # fp64 holds the int64 token counts exactly (below 2^53)
        flat = torch.cat([t.reshape(-1).to(world.device, torch.float64) for t in group])
        dist.all_reduce(flat, op)
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view(t.shape))
            offset += t.numel()


def _broadcast(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _any(flag: bool, world: World) -> bool:
    t = torch.tensor([int(flag)], device=world.device)
    dist.all_reduce(t, dist.ReduceOp.MAX)
    return bool(t.item())


def send_job(world: World, job: dict | None, model: nn.Module | None = None) -> None:
    """Rank 0: hand the other ranks ``job`` (a dict with the ``digest`` of ``model``), or None: no work is
    left, they exit. A rank whose model differs (a stage before changed it) gets rank 0's whole module:
    structured pruning changes shapes, so weights alone would not fit."""
    if world.released:
        return
    _broadcast(job)
    if job is None:
        world.released = True
    elif _any(False, world):
        assert model is not None
        with on_cpu(model):
            _broadcast(model)


def next_job(world: World, model: nn.Module, digest: str) -> tuple[dict | None, nn.Module, str]:
    """Ranks above 0: the next job (None: exit), with the model it is for and that model's digest."""
    job = _broadcast(None)
    if job is not None and _any(job["digest"] != digest, world):
        received = _broadcast(None)
        if job["digest"] != digest:
            model, digest = received.to(world.device), job["digest"]
    return job, model, digest
