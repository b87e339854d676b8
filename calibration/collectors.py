"""Statistics at the inputs of Linear layers, and per-weight gradient magnitudes.

Everything is upcast to fp32 before squaring (LLaMA down_proj inputs reach 1e3-1e4, whose squares
overflow fp16), and padding positions are excluded from sums and counts. Per-channel sums accumulate in
fp64; X^T X in fp32, as in the GPTQ and SparseGPT references: it is C_in^2 values (256 MiB at a 3B
model's 8192-wide down_proj input, 512 in fp64) and the methods that read it run in fp32.

Kinds (what a stage can ask the calibrate stage for):
- ``sq_norm``  S1: sum over tokens of x_j^2 per input channel (Wanda, GBLM, Wanda-sp, FLAP WIFN)
- ``mean_var`` S2: per-channel mean and unbiased variance (FLAP IFV/WIFV, bias compensation)
- ``abs_max``  per-channel max |x_j| (SmoothQuant)
- ``hessian``  sum over tokens of x x^T, [C_in, C_in] (SparseGPT; the layer-wise Hessian is 2 X^T X).
  C_in^2 fp32 values per input: Linears fed the same tensor (q/k/v, gate/up) share one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from core import tensorfile
from core.memory import row_slices

KINDS = ("sq_norm", "mean_var", "abs_max", "hessian")
_UPCAST = 2**22
_SUMS = {"sq_norm": ("sum_sq",), "mean_var": ("sum_sq", "sum"), "abs_max": ("abs_max",), "hessian": ("xtx",)}


def summarize(x: torch.Tensor, mask: torch.Tensor | None, kinds: frozenset[str], sums: dict[str, torch.Tensor]) -> None:
    """Per-channel sums of one input batch added in place to ``sums`` (zeros made for missing kinds),
    padding excluded.

    The tokens are upcast _UPCAST values (16 MiB) at a time and the Hessian summed in place, so the
    temporaries stay at a few MiB: an 8192-wide MLP input of 2048 tokens upcast whole was 64 MiB in
    fp32, its square 64 more and its fp64 copy 128, and a batch's own X^T X beside the running one 512."""
    x = x.detach().reshape(-1, x.shape[-1]) if mask is None else x.detach()[mask]
    c = x.shape[-1]
    for key in sorted({key for kind in kinds for key in _SUMS[kind]} - sums.keys()):
        dtype = torch.float32 if key == "xtx" else torch.float64
        sums[key] = torch.zeros((c, c) if key == "xtx" else (c,), dtype=dtype, device=x.device)
    if not sums:  # no kinds (a pass that only reads the execution order): nothing to upcast
        return
    for rows in row_slices(x, _UPCAST):
        _accumulate(sums, x[rows].float())  # upcast before squaring: fp16/bf16 squares of 1e3-1e4 overflow


def _accumulate(sums: dict, x: torch.Tensor) -> None:
    """Add one fp32 chunk of tokens [T, C] to ``sums``."""
    if "sum_sq" in sums:
        sums["sum_sq"] += (x * x).sum(0, dtype=torch.float64)
    if "sum" in sums:
        sums["sum"] += x.sum(0, dtype=torch.float64)
    if "abs_max" in sums and x.shape[0]:
        torch.maximum(sums["abs_max"], x.abs().amax(0).double(), out=sums["abs_max"])
    if "xtx" in sums:
        sums["xtx"].addmm_(x.T, x)


class InputStats:
    """Running sums over the tokens seen at one Linear's input."""

    def __init__(self, kinds: Iterable[str]):
        self.kinds = frozenset(kinds)
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self.sequences = 0

    def update(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        """``x`` is [B, T, C] (or [B, C]); ``mask`` [B, T] bool marks real tokens."""
        self.tokens += int(mask.sum()) if mask is not None else x.shape[:-1].numel()
        self.sequences += x.shape[0]
        summarize(x, mask, self.kinds, self.sums)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state as flat tensors (what the on-disk cache stores)."""
        return {"tokens": torch.tensor(self.tokens), "sequences": torch.tensor(self.sequences), **self.sums}


class Stats:
    """Read-only view of one Linear's input statistics, with the derived quantities methods use."""

    def __init__(self, t: dict[str, torch.Tensor]):
        self.t = t

    @property
    def sequences(self) -> int:
        return int(self.t["sequences"])

    @property
    def tokens(self) -> int:
        return int(self.t["tokens"])

    @property
    def sq_norm(self) -> torch.Tensor:
        """Wanda's s_j = ||X_j||^2 / N (N = sequences), as the reference's running mean gives."""
        return (self.t["sum_sq"] / self.sequences).float()

    @property
    def mean(self) -> torch.Tensor:
        return (self.t["sum"] / self.tokens).float()

    @property
    def var(self) -> torch.Tensor:
        """Exact unbiased variance over all tokens (the FLAP reference only approximates it)."""
        n = self.tokens
        mean = self.t["sum"] / n
        return ((self.t["sum_sq"] - n * mean * mean) / max(n - 1, 1)).clamp_min(0).float()

    @property
    def abs_max(self) -> torch.Tensor:
        return self.t["abs_max"].float()

    @property
    def hessian(self) -> torch.Tensor:
        """H = 2 X^T X / tokens (fp32): the Hessian of the layer's squared output error in its weights,
        averaged over tokens so its scale does not grow with the calibration set. A new tensor: the
        sums may be shared (q/k/v) or cached."""
        return self.t["xtx"] * (2 / max(self.tokens, 1))

    def hessian_(self) -> torch.Tensor:
        """`hessian` in the sums' own memory, which it consumes: for the holder of their last reference
        (GPTQ's popped statistics), so no second K x K matrix is made (256 MiB at K = 8192)."""
        return self.t["xtx"].mul_(2 / max(self.tokens, 1))


class _StopForward(Exception):
    """Raised by a hook once the last statistic of a layer is in: the rest of the forward is waste."""


class InputHooks:
    """Forward pre-hooks that feed `InputStats` for a set of named modules.

    ``stop_after_last``: abort the forward pass right after the last hooked module has seen its input
    (on the first batch, once every hooked module has run). The sequential engine recomputes the
    layer's output after pruning anyway, so the tail of the stats pass would be thrown away.
    """

    def __init__(self, modules: dict[str, nn.Module], kinds: Iterable[str], stop_after_last: bool = False):
        self.kinds = frozenset(kinds)
        self.stats = {name: InputStats(kinds) for name in modules}
        self.mask: torch.Tensor | None = None
        self._last: tuple | None = None  # q/k/v (and gate/up) see the same tensor: summarise it once
        self._shared: dict[str, str] = {}  # name -> the module whose input it shares (found on the first batch)
        self.stop_after_last = stop_after_last
        self._order: list[str] = []
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            first = len(self._order) < len(self.stats)
            # identity of the input, and the reference to it keeps it alive
            leader = self._last[1] if self._last is not None and self._last[0] is x else None
            if first and leader is not None:  # one set of running sums per input (a Hessian is C_in^2)
                self._shared[name] = leader
                self.stats[name] = self.stats[leader]
            elif self._shared.get(name) != leader:
                raise RuntimeError(f"{name}: input shared with {self._shared.get(name)} on the first batch, "
                                   f"with {leader} now")
            elif leader is None:
                self._last = (x, name)
                self.stats[name].update(x, self.mask)
            if first:
                self._order.append(name)
            if self.stop_after_last and len(self._order) == len(self.stats) and name == self._order[-1]:
                raise _StopForward

        return hook

    def inputs(self) -> list[list[str]]:
        """The hooked modules grouped by the input they share (q/k/v, gate/up), in execution order; known
        after the first batch (a module that never ran is a group of its own, last)."""
        groups: dict[str, list[str]] = {}
        for name in self._order + [n for n in self.stats if n not in self._order]:
            groups.setdefault(self._shared.get(name, name), []).append(name)
        return list(groups.values())

    def run(self, fn, mask: torch.Tensor | None):
        self.mask, self._last = mask, None
        try:
            return fn()
        except _StopForward:
            return None

    def remove(self) -> dict[str, dict[str, torch.Tensor]]:
        for h in self._handles:
            h.remove()
        self._last = None
        return {name: s.tensors() for name, s in self.stats.items()}


class InputSpill:
    """One module's input over a pass written to ``folder`` (a file per batch) instead of summarized, the
    forward stopped right there; `stats` sums the files afterwards exactly as `InputHooks` would have.

    For an offloaded block (calibration/layerwise.py): the block produces the input, and is released but
    for the modules the statistics are for before a K x K Hessian is summed beside them (a 3B model's
    down_proj: 256 MiB, beside a 192 MiB block). The input on disk is tokens x K in the compute dtype
    (32 MiB at 8 x 256 tokens there, 4 GiB at 128 x 2048: not something to hold)."""

    def __init__(self, module: nn.Module, folder: Path):
        self.folder, self.batches = folder, 0
        folder.mkdir(parents=True, exist_ok=True)
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        save_file({"x": args[0].detach().contiguous()}, str(self.folder / f"{self.batches:05d}.safetensors"))
        self.batches += 1
        raise _StopForward

    def run(self, fn) -> None:
        with contextlib.suppress(_StopForward):
            fn()

    def stats(self, kinds: Iterable[str], masks: list[torch.Tensor | None], device: torch.device) -> InputStats:
        """The statistics of every batch written, in order, under each batch's padding mask (``masks``,
        which the caller holds anyway); the files are deleted."""
        self._handle.remove()
        stats = InputStats(kinds)
        for i, mask in zip(range(self.batches), masks, strict=True):
            path = self.folder / f"{i:05d}.safetensors"
            stats.update(tensorfile.read(path, ["x"])["x"].to(device), mask)
            path.unlink()
        return stats


class GradientHooks:
    """Per-sample gradient magnitudes of Linear weights, without materialising weight gradients.

    GBLM accumulates |g_n| and g_n^2 over samples n, where g_n is one sample's gradient. For a
    Linear, g_n = sum_t dL/dy[n, t]^T x[n, t]; we form it from the saved input and the output
    gradient, per sample in the batch, so any batch size gives the same result as batch 1.
    """

    def __init__(self, modules: dict[str, nn.Linear]):
        self.sum_sq = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in modules.items()}
        self.sum_abs = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in modules.items()}
        self.samples = 0
        self._inputs: dict[str, torch.Tensor] = {}
        self._handles = []
        for name, m in modules.items():
            self._handles.append(m.register_forward_hook(self._save(name)))
            self._handles.append(m.register_full_backward_hook(self._accumulate(name)))

    def _save(self, name):
        def hook(module, args, output):
            self._inputs[name] = args[0].detach()

        return hook

    def _accumulate(self, name):
        def hook(module, grad_input, grad_output):
            x = self._inputs.pop(name).float()
            go = grad_output[0].float()
            g = torch.einsum("b...o,b...i->boi", go, x)  # one gradient per sample
            self.sum_sq[name] += (g * g).sum(0)
            self.sum_abs[name] += g.abs().sum(0)

        return hook

    def remove(self) -> dict[str, dict[str, torch.Tensor]]:
        for h in self._handles:
            h.remove()
        return {n: {"grad_sum_sq": self.sum_sq[n], "grad_sum_abs": self.sum_abs[n],
                    "grad_samples": torch.tensor(self.samples)} for n in self.sum_sq}
