"""The layer-wise calibration engine shared by every method (the SparseGPT "catcher" pattern).

Block 0's inputs, and *all* other arguments the model passes it, positional (BERT and CLIP pass
the attention mask positionally) and keyword (position embeddings, masks: transformers versions
differ), are captured once per batch; then blocks run one at a time on the
whole calibration set, batched. Two propagation modes:

- ``dense``: one pass per block with hooks; the next block sees the dense block's output.
  FLAP and the calibrate stage use it.
- ``sequential``: a statistics pass (stopped after the last hooked module), then the block is
  changed (pruned) by a callback, then a propagation pass through the changed block, so the next
  block calibrates on compressed upstream activations (Wanda, GBLM, SparseGPT).

  ``by_input`` splits the statistics pass: one pass per input the targets share (q/k/v, o, gate/up,
  down), the last to run first, each followed by the callback on that input's statistics, so one
  input's statistics exist at a time: one K x K Hessian (GPTQ; SparseGPT offloaded), not a block's
  (364 MiB of fp32 sums at a 3B model's block against 256 MiB for down_proj's). The statistics equal one pass's:
  a module's input depends only on the modules that run before it, and those are changed after it.

With an offloaded model (models/offload.py) each block is read from disk for the passes over it and
written back (when a callback changed it) and released before the next one is read. ``by_input``
there also writes the input of the group to disk instead of summing it in the pass, and releases
the block but for the group (and the modules changed before it) while the statistics are summed
and the callback runs: at a 3B model that is down_proj's 256 MiB Hessian beside 48 MiB of weight,
not beside the 192 MiB block (together 2.3 blocks).
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from core.device import module_device, to_device
from models.adapters import Adapter, Block
from models.offload import Offloaded

from .batches import Batch, Batches
from .collectors import InputHooks, InputSpill
from .distributed import World, all_reduce_stats, shard


class _Captured(Exception):
    pass


@dataclass
class BlockInputs:
    hidden: list[torch.Tensor]
    args: list[tuple]  # positional arguments after the hidden states
    kwargs: list[dict]
    masks: list[torch.Tensor | None]


def _cast(obj, dtype):
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_inputs(model: nn.Module, adapter: Adapter, batches: Iterable[Batch], dtype: torch.dtype) -> BlockInputs:
    """Run each batch up to block 0 and keep what block 0 receives, on the model's device."""
    _, layers = adapter.layers(model)
    device = module_device(model)
    caught = BlockInputs([], [], [], [])

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        caught.hidden.append(hidden.detach().to(dtype))
        caught.args.append(_cast(tuple(args[1:]), dtype))
        caught.kwargs.append(_cast(kwargs, dtype))
        raise _Captured

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            mask, inputs = batch.token_mask, to_device(batch.inputs, device)
            caught.masks.append(None if mask is None else mask.to(device))
            try:
                model(**inputs, use_cache=False) if "input_ids" in inputs else model(**inputs)
            except _Captured:
                pass
    finally:
        handle.remove()
    return caught


def _forward(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def block_outputs(block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    """``block``'s output for every captured batch (inputs unchanged)."""
    return [_forward(block, h, a, k) for h, a, k in zip(inputs.hidden, inputs.args, inputs.kwargs)]


class LayerwiseEngine:
    """Runs blocks over captured inputs; ``dtype`` is the compute dtype (statistics stay fp64)."""

    def __init__(self, model: nn.Module, adapter: Adapter, batches: Batches,
                 dtype: torch.dtype = torch.float32, progress=None, offload: Offloaded | None = None):
        self.model, self.adapter, self.batches, self.dtype = model, adapter, batches, dtype
        self.progress, self.offload = progress, offload
        self._input_order: dict[tuple, list[list[str]]] = {}  # block structure -> its inputs' groups, last first

    def _compute_copy(self, block: nn.Module) -> nn.Module:
        """The block in the compute dtype; a copy when that differs, so fp32 weights never round-trip
        (an offloaded block is read in the compute dtype: no copy)."""
        return block if next(block.parameters()).dtype == self.dtype else copy.deepcopy(block).to(self.dtype)

    def _held(self, block: Block, write: bool) -> contextlib.AbstractContextManager:
        """The block's weights in memory for the passes over it (always, unless offloaded)."""
        return self.offload.block(block.prefix, write) if self.offload else contextlib.nullcontext()

    def _capture(self, batches: Iterable[Batch]) -> BlockInputs:
        with self.offload.inputs() if self.offload else contextlib.nullcontext():
            return capture_inputs(self.model, self.adapter, batches, self.dtype)

    @torch.no_grad()
    def run(self, targets: dict[int, dict[str, nn.Module]], kinds: set[str], propagation: str,
            on_block: Callable[[Block, dict[str, dict[str, torch.Tensor]]], None] | None = None,
            keep: bool = True, world: World | None = None, by_input: bool = False) -> dict[str, dict[str, torch.Tensor]]:
        """Collect ``kinds`` at the inputs of ``targets`` (block index -> {name: module}).

        ``on_block(block, stats)`` runs after a block's statistics are complete (e.g. to prune it).
        Returns the statistics of every target; with ``keep=False`` none (``on_block`` consumed
        them, and may pop them as it goes: a model's worth of Hessians is not held at once, nor a
        block's once each is used); ``by_input`` (sequential only) calls ``on_block`` once per input
        of the block's targets, the last first (see the module's docstring). With ``world`` every rank runs
        this on its shard of the batches and a block's statistics are summed over the ranks before
        ``on_block`` sees them (calibration/distributed.py).
        """
        if by_input and propagation != "sequential":
            raise ValueError("by_input splits the statistics pass of sequential propagation")
        blocks = self.adapter.blocks(self.model)
        last = max(targets) if targets else -1
        inputs = self._capture(shard(self.batches.batches, world.rank, world.size) if world else self.batches)
        result: dict[str, dict[str, torch.Tensor]] = {}
        task = self.progress.task(f"calibrating {last + 1} blocks ({propagation})", total=last + 1) if self.progress else None
        for block in blocks[: last + 1]:
            wanted = targets.get(block.index, {})
            sequential = propagation == "sequential" and bool(wanted)
            with self._held(block, write=bool(wanted) and on_block is not None):
                done: set[str] = set()  # the targets on_block has seen (and changed)
                for group in self._last_input_first(block, inputs, wanted) if by_input and wanted else [wanted]:
                    if not group:
                        continue
                    with self._group_stats(block, inputs, group, kinds, not sequential, by_input, done) as stats:
                        if world:
                            all_reduce_stats(stats, world)
                        if on_block is not None:
                            on_block(block, stats)
                        if keep:
                            result.update(stats)
                    done.update(group)
                if block.index < last and (sequential or not wanted):  # outputs not yet computed
                    self._pass(block, inputs, {}, kinds, keep_outputs=True)
            if task:
                task.advance()
        if task:
            task.done()
        return result

    @torch.no_grad()
    def run_blocks(self, on_block: Callable[[Block, BlockInputs], None]) -> None:
        """Every block in turn: ``on_block(block, inputs)`` sees the block's inputs over the whole
        calibration set (and may change the block), then the changed block's outputs become the next
        block's inputs."""
        blocks = self.adapter.blocks(self.model)
        inputs = self._capture(self.batches)
        task = self.progress.task(f"calibrating {len(blocks)} blocks (sequential)", total=len(blocks)) if self.progress else None
        for block in blocks:
            with self._held(block, write=True):
                on_block(block, inputs)
                if block.index < len(blocks) - 1:
                    self._pass(block, inputs, {}, set(), keep_outputs=True)
            if task:
                task.advance()
        if task:
            task.done()

    @contextlib.contextmanager
    def _group_stats(self, block: Block, inputs: BlockInputs, group: dict[str, nn.Module], kinds: set[str],
                     keep_outputs: bool, by_input: bool, done: set[str]) -> Iterator[dict[str, dict[str, torch.Tensor]]]:
        """The statistics of ``group``, for as long as the caller works on them. Offloaded and ``by_input``,
        the group's input goes to disk and the block is released but for ``group`` and the ``done``
        modules (changed: no file holds them) while the statistics are summed and used, then read back:
        a wide Linear's Hessian is never beside its whole block (Offloaded.only)."""
        if not (by_input and self.offload):
            yield self._pass(block, inputs, group, kinds, keep_outputs)
            return
        spill = InputSpill(next(iter(group.values())), self.offload.staging / "inputs")
        for hidden, args, kwargs in zip(inputs.hidden, inputs.args, inputs.kwargs):
            spill.run(functools.partial(_forward, block.module, hidden, args, kwargs))
        with self.offload.only(block.prefix, set(group) | done):
            shared = spill.stats(kinds, inputs.masks, self.offload.device).tensors()  # one input: one set of sums
            stats = {name: dict(shared) for name in group}
            del shared  # the caller may free a Hessian (GPTQ pops it) before the rest of the block is read back
            yield stats

    def _last_input_first(self, block: Block, inputs: BlockInputs,
                          modules: dict[str, nn.Module]) -> list[dict[str, nn.Module]]:
        """``modules`` grouped by the input they share, the last to run first: the execution order is
        read from a pass over the first batch with hooks only (no statistics), once per block structure."""
        names = {n: n.removeprefix(f"{block.prefix}.") for n in modules}
        key = (type(block.module), tuple(sorted(names.values())))
        if key not in self._input_order:
            compute, hooks = self._hooks(block, modules, (), stop=True)
            hooks.run(functools.partial(_forward, compute, inputs.hidden[0], inputs.args[0], inputs.kwargs[0]),
                      inputs.masks[0])
            hooks.remove()
            self._input_order[key] = [[names[n] for n in group] for group in reversed(hooks.inputs())]
        full = {short: n for n, short in names.items()}
        return [{full[short]: modules[full[short]] for short in group} for group in self._input_order[key]]

    def _hooks(self, block: Block, modules: dict[str, nn.Module], kinds, stop: bool) -> tuple[nn.Module, InputHooks]:
        """The block to run (in the compute dtype) and statistics hooks on its copies of ``modules``."""
        compute = self._compute_copy(block.module)
        if compute is not block.module:
            names = {id(m): n for n, m in block.module.named_modules()}
            modules = {full: compute.get_submodule(names[id(m)]) for full, m in modules.items()}
        return compute, InputHooks(modules, kinds, stop_after_last=stop)

    def _pass(self, block: Block, inputs: BlockInputs, modules: dict[str, nn.Module], kinds: set[str],
              keep_outputs: bool) -> dict[str, dict[str, torch.Tensor]]:
        """One pass of ``block`` over all batches; replaces ``inputs.hidden`` when ``keep_outputs``."""
        compute, hooks = self._hooks(block, modules, kinds, stop=not keep_outputs) if modules else (
            self._compute_copy(block.module), None)
        for i, (hidden, args, kwargs, mask) in enumerate(zip(inputs.hidden, inputs.args, inputs.kwargs,
                                                             inputs.masks)):
            if hooks:
                out = hooks.run(functools.partial(_forward, compute, hidden, args, kwargs), mask)
            else:
                out = _forward(compute, hidden, args, kwargs)
            if keep_outputs:
                inputs.hidden[i] = out
        return hooks.remove() if hooks else {}
