"""AWQ: activation-aware per-channel scales before int4 weight-only quantization (arXiv 2306.00978;
docs/methods/recovery.md, "AWQ").

Input channels that carry large activations matter most, so their weight columns are multiplied by
``s_j`` before rounding and the op that produces those channels divides its output by ``s_j``: the
float function is unchanged, the salient columns see a finer grid. Per scale group of a block
(``scale_groups``) and per alpha of the grid ``0, 1/n, ..., (n-1)/n``:

    s = max(mean|x|^alpha, 1e-4),  s <- s / sqrt(max(s) min(s))

the group's Linears are set to ``Q(W diag(s)) diag(s)^-1`` (``Q`` = ``fake_int4``, the quantize
stage's int4 grid) and the loss is the mean squared error of the block's output against the float
block over the real (unpadded) calibration tokens. alpha = 0 gives s = 1, plain round-to-nearest,
so the chosen scales never lose to it on the calibration set. Weight clipping (the paper's second
step) is not done.

Recipe: ``- {type: awq, group_size: 128}`` before export, and ``- {type: quantize, format: int4,
group_size: 128}`` after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from calibration.layerwise import BlockInputs, block_outputs
from models.adapters import Adapter, Block, Projection, linear

from .grid import Grid
from .smoothquant import fold as fold_into_norm

FLOOR = 1e-4


@dataclass(frozen=True)
class ScaleGroup:
    """Linears reading one tensor, and the op producing it, which absorbs ``1/s``: a pre-norm
    (``norm``) or rows of a preceding Linear whose output reaches them linearly (``rows``)."""

    name: str
    linears: tuple[str, ...]
    norm: str | None = None
    rows: Projection | None = None


@dataclass(frozen=True)
class GroupScales:
    """The search's result for one group: the best alpha, its scales, and the loss of every alpha tried."""

    group: ScaleGroup
    alpha: float
    scales: torch.Tensor  # float64 [K]
    losses: tuple[float, ...]  # per alpha of the grid; losses[0] is plain round-to-nearest


def _width(model: nn.Module, p: Projection) -> int:
    return p.rows[1] - p.rows[0] if p.rows else linear(model, p).out_features


def scale_groups(adapter: Adapter, model: nn.Module, block: Block) -> tuple[list[ScaleGroup], list[str]]:
    """The folds the family allows in ``block``, and why the others are skipped.

    Pre-norms fold into q/k/v and the MLP's input Linears (pre-norm families only: a post-norm's
    output is also the residual). v -> o needs v's outputs to be o's inputs one to one (not with
    grouped-query attention). up -> down needs a gated MLP ``act(gate) * up``, linear in up; a single
    input Linear goes through a nonlinearity first.
    """
    p, groups, skipped = block.prefix, [], []
    norms = [f"{p}.{n}" for n in adapter.norms] if adapter.norms else [None, None]
    for norm, linears, what in ((norms[0], block.qkv_linears, "attention input"),
                                (norms[1], block.mlp_in_linears, "MLP input")):
        if norm is None:
            skipped.append(f"{what}: post-norm block, no norm to fold into")
        elif getattr(model.get_submodule(norm), "weight", None) is None:
            skipped.append(f"{what}: {norm} has no affine weight")
        else:
            groups.append(ScaleGroup(what, linears, norm=norm))
    v_width, o_width = _width(model, block.v), linear(model, block.o).in_features
    if v_width == o_width:
        groups.insert(1, ScaleGroup("attention output", (block.o,), rows=block.v))
    else:
        skipped.append(f"attention output: v has {v_width} outputs, o reads {o_width} (grouped-query attention)")
    if len(block.mlp_in) == 2:
        groups.append(ScaleGroup("MLP output", (block.mlp_out,), rows=block.mlp_in[1]))
    else:
        skipped.append("MLP output: the MLP's input passes a nonlinearity, no gated up projection")
    return groups, skipped


def fake_int4(w: torch.Tensor, group: int) -> torch.Tensor:
    """What export/formats/int4.py stores for a Linear weight [N, K], dequantized, in float32: the
    int4 grid of methods/quant/grid.py with groups of ``group`` along K."""
    return Grid(4, group).nearest(w)


def _scaled(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """W diag(s) as the fold stores it (fp64 product, cast to the weight's dtype)."""
    return (w.double() * s).to(w.dtype)


def quantized_with(w: torch.Tensor, s: torch.Tensor, group: int) -> torch.Tensor:
    """Q(W diag(s)) diag(s)^-1: the Linear as it computes after the fold and int4 export."""
    return (fake_int4(_scaled(w, s), group).double() / s).to(w.dtype)


def candidate_scales(act_mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max(mean|x|^alpha, 1e-4) / sqrt(max(s) min(s)) in float64 (alpha = 0 gives ones)."""
    s = act_mean_abs.double().pow(alpha).clamp_min(FLOOR)
    return s / (s.max() * s.min()).sqrt()


def _mse(outputs: list[torch.Tensor], reference: list[torch.Tensor], masks: list[torch.Tensor | None]) -> float:
    """Mean squared error over real tokens (padding excluded) and channels."""
    total, count = 0.0, 0
    for out, ref, mask in zip(outputs, reference, masks):
        diff = (out.float() - ref.float()) ** 2
        diff = diff[mask] if mask is not None else diff.reshape(-1, diff.shape[-1])
        total += float(diff.sum(dtype=torch.float64))
        count += diff.numel()
    return total / max(count, 1)


def mean_abs_inputs(block: nn.Module, inputs: BlockInputs, modules: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    """mean over real tokens of |x_j| at the input of each module (fp64 sums), from one float pass."""
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(modules, 0)
    mask: list[torch.Tensor | None] = [None]

    def hook(name):
        def fn(module, args):
            x = args[0].detach().float()
            x = x[mask[0]] if mask[0] is not None else x.reshape(-1, x.shape[-1])
            part = x.abs().sum(0, dtype=torch.float64)
            sums[name] = sums[name] + part if name in sums else part
            counts[name] += x.shape[0]
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        for hidden, args, kwargs, m in zip(inputs.hidden, inputs.args, inputs.kwargs, inputs.masks):
            mask[0] = m
            block(hidden, *args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / max(counts[n], 1) for n in modules}


@torch.no_grad()
def search_block(block: nn.Module, inputs: BlockInputs, groups: list[ScaleGroup], modules: dict[str, nn.Linear],
                 group_size: int, grid: int = 20) -> list[GroupScales]:
    """The best scales of every group of ``block`` (``modules``: full name -> Linear, every group's
    Linears), each searched with the other groups float; the block is left as it was."""
    reference = block_outputs(block, inputs)
    act = mean_abs_inputs(block, inputs, {g.linears[0]: modules[g.linears[0]] for g in groups})
    results = []
    for g in groups:
        linears = [modules[n] for n in g.linears]
        originals = [lin.weight.detach().clone() for lin in linears]
        losses = []
        for alpha in (i / grid for i in range(grid)):
            s = candidate_scales(act[g.linears[0]], alpha)
            for lin, w in zip(linears, originals):
                lin.weight.copy_(quantized_with(w, s, group_size))
            losses.append(_mse(block_outputs(block, inputs), reference, inputs.masks))
        for lin, w in zip(linears, originals):
            lin.weight.copy_(w)
        best = min(range(grid), key=losses.__getitem__)
        results.append(GroupScales(g, best / grid, candidate_scales(act[g.linears[0]], best / grid), tuple(losses)))
    return results


@torch.no_grad()
def fold(model: nn.Module, group: ScaleGroup, scales: torch.Tensor, norm_offset: float = 0.0) -> None:
    """The producing op's output / s, the reading Linears' input columns * s: the same float function.

    ``norm_offset``: the adapter's (Gemma's norms scale by 1 + weight)."""
    linears = [linear(model, n) for n in group.linears]
    if group.norm is not None:
        fold_into_norm(model.get_submodule(group.norm), linears, scales, norm_offset)
        return
    if group.rows is None:
        raise ValueError(f"scale group {group.name!r} names neither a norm nor rows to fold 1/s into")
    prev = linear(model, group.rows)
    rows = slice(*group.rows.rows) if group.rows.rows else slice(None)
    prev.weight[rows] = (prev.weight[rows].double() / scales[:, None]).to(prev.weight.dtype)
    if prev.bias is not None:
        prev.bias[rows] = (prev.bias[rows].double() / scales).to(prev.bias.dtype)
    for lin in linears:
        lin.weight.copy_(_scaled(lin.weight, scales))
