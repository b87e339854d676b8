"""Models larger than memory (``model.offload: true``): a skeleton whose weights stay in safetensors files.

The model is built from its config with every parameter on the meta device (buffers computed from
the config, such as rotary frequencies, are real: no file holds them). `Offloaded.block` reads one
block's tensors by name from the shards, in the compute dtype on the run's device, for as long as a
pass needs it; a block a method changed is then written to the staging folder, which later reads
prefer, and every block goes back to the meta device (keeping the shapes a structured prune sliced
it to). `Offloaded.inputs` does the same for what
runs before block 0 (the embeddings), and `Offloaded.save` writes the checkpoint one tensor group
at a time, so no step holds more than one block (or the embedding table) of weights.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import itertools
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from core import tensorfile
from core.files import sha256_path

from .adapters import Adapter, pretrained

INDEX = "model.safetensors.index.json"


class Shards:
    """Where each tensor of a safetensors folder lives (its index, or the keys of each file); read by name."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / INDEX
        if index.is_file():
            self.files = {n: folder / f for n, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            self.files = {n: path for path in sorted(folder.glob("*.safetensors")) for n in tensorfile.header(path)[0]}

    def read(self, names: list[str], dtype: torch.dtype, device: torch.device,
             mapped: bool = False) -> dict[str, torch.Tensor]:
        """``names``, each file opened once (`map_file` with ``mapped``, else `read_file`); floating tensors
        cast to ``dtype``."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        reader = map_file if mapped else read_file
        return {n: t for path, some in by_file.items() for n, t in reader(path, some, dtype, device).items()}


def read_file(path: Path, names: list[str], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """``names`` from one safetensors file into memory of their own (core/tensorfile.py: released
    tensors give their memory back), on ``device``; floating tensors cast to ``dtype``."""
    return {n: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
            for n, t in tensorfile.read(path, names).items()}


def map_file(path: Path, names: list[str], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """``names`` as views of the memory-mapped file (safetensors' reader) where no cast or move copies
    them: only the pages a computation touches become resident, which suits an embedding table looked
    up for a few thousand tokens (a 3B model's is 288 MiB), as long as every tensor from the file is
    released together (its pages stay resident until the last one goes: blocks use `read_file`)."""
    with safe_open(path, framework="pt", device=str(device)) as f:
        return {n: t.to(dtype) if t.is_floating_point() else t for n, t in ((n, f.get_tensor(n)) for n in names)}


def skeleton(cls, config) -> nn.Module:
    """The model with its parameters on the meta device and its buffers real (from the config); a head
    tied to the embeddings is the same tensor, as loading ties it (the files hold it once)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim; elsewhere nothing). Without it the
    activations' mid-sized buffers fragment glibc's heap and resident memory grew by ~80 MiB per block
    of the 3B benchmark (0.8 to 3 GiB over 28 blocks) although nothing was held."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def map_large_allocations(size: int = 2**20) -> None:
    """Allocations of ``size`` bytes and more get their own mapping, handed back to the OS when freed
    (glibc's mallopt; elsewhere nothing). glibc's default threshold rises to 32 MiB as large blocks
    are freed, after which masks, activations and weight slices of a few MiB to 32 MiB come from the
    heap and fragment it: an offloaded 3B model's Wanda peaked 200 MiB higher (1182 against 979 MiB
    on 3 blocks) for the same tensors."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, size)


class Offloaded:
    """The weights of ``model`` (a `skeleton`) in ``folder``'s shards, changed blocks in ``staging``."""

    def __init__(self, model: nn.Module, adapter: Adapter, folder: Path, staging: Path, dtype: torch.dtype,
                 device: torch.device):
        map_large_allocations()
        self.model, self.adapter, self.staging = model, adapter, staging
        self.dtype, self.device = dtype, device
        self.shards = Shards(folder)
        self.staged: dict[str, Path] = {}  # block prefix -> its file in staging
        self.resident: set[str] = set()  # block prefixes materialized now
        self.most_resident = 0  # the most blocks ever materialized at once (the tests read it)
        self.loads = 0  # blocks materialized so far

    def _names(self, prefix: str) -> list[str]:
        """The tensors in the files under a module name (state-dict names: persistent buffers too)."""
        module = self.model.get_submodule(prefix)
        return [f"{prefix}.{n}" for n in module.state_dict(keep_vars=True)]

    def _put(self, name: str, tensor: torch.Tensor) -> None:
        owner, _, leaf = name.rpartition(".")
        module = self.model.get_submodule(owner)
        if leaf in module._parameters:
            module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
        else:
            module._buffers[leaf] = tensor

    def _release(self, names: list[str]) -> None:
        """Back to the meta device (shapes kept): the memory goes once nothing else refers to it."""
        state = self.model.state_dict(keep_vars=True)
        for name in names:
            self._put(name, state[name].detach().to("meta"))

    def _read(self, prefix: str, names: list[str]) -> dict[str, torch.Tensor]:
        if prefix in self.staged:
            return read_file(self.staged[prefix], names, self.dtype, self.device)
        return self.shards.read(names, self.dtype, self.device)

    @contextlib.contextmanager
    def block(self, prefix: str, write: bool = False) -> Iterator[None]:
        """The block at ``prefix`` materialized; with ``write`` it is staged afterwards (a method changed it)."""
        names = self._names(prefix)
        for name, tensor in self._read(prefix, names).items():
            self._put(name, tensor)
        self.resident.add(prefix)
        self.loads += 1
        self.most_resident = max(self.most_resident, len(self.resident))
        try:
            yield
            names = self._names(prefix)  # a structured prune may have sliced it, added biases
            if write:
                self._stage(prefix, names)
        finally:
            self._release(names)
            self.resident.discard(prefix)
            trim_heap()

    @contextlib.contextmanager
    def only(self, prefix: str, modules: set[str]) -> Iterator[None]:
        """Within the materialized block at ``prefix``, every tensor outside ``modules`` (full names)
        released, and read again afterwards: for work on a few of its Linears (a 3B model's down_proj
        GPTQ: its 256 MiB Hessian beside 48 MiB of weight, not the 192 MiB block). What is released must
        be unchanged since the block was read: it comes back from the same file."""
        names = [n for n in self._names(prefix) if not any(n.startswith(f"{m}.") for m in modules)]
        self._release(names)
        trim_heap()
        try:
            yield
        finally:
            for name, tensor in self._read(prefix, names).items():
                self._put(name, tensor)

    def _stage(self, prefix: str, names: list[str]) -> None:
        self.staging.mkdir(parents=True, exist_ok=True)
        path = self.staging / f"{prefix}.safetensors"
        module = self.model.get_submodule(prefix)
        state = module.state_dict()
        save_file({f"{prefix}.{n}": t.detach().contiguous().cpu() for n, t in state.items()}, str(path))
        self.staged[prefix] = path

    def _outside_blocks(self) -> list[str]:
        """File tensors outside the blocks, but for the output head (nothing before block 0 reads it)."""
        layers, _ = self.adapter.layers(self.model)
        head = getattr(pretrained(self.model), "get_output_embeddings", lambda: None)()
        head_names = {f"{n}." for n, m in self.model.named_modules() if head is not None and m is head}
        return [n for n in self.model.state_dict(keep_vars=True) if n in self.shards.files
                and not n.startswith(f"{layers}.") and not any(n.startswith(h) for h in head_names)]

    @contextlib.contextmanager
    def inputs(self) -> Iterator[None]:
        """What runs before block 0 (embeddings, their norms) materialized, released afterwards; mapped
        (`map_file`): the lookup makes only the calibration tokens' rows resident."""
        names = self._outside_blocks()
        skeleton = self.model.state_dict(keep_vars=True)
        for name, tensor in self.shards.read(names, self.dtype, self.device, mapped=True).items():
            self._put(name, tensor)
        try:
            yield
        finally:
            self._restore(skeleton, names)

    def _restore(self, skeleton: dict[str, torch.Tensor], names: list[str]) -> None:
        """The skeleton's own meta tensors back at ``names``: a tied head stays the embedding's tensor."""
        for name in names:
            owner, _, leaf = name.rpartition(".")
            module = self.model.get_submodule(owner)
            tensor = skeleton[name]
            if isinstance(tensor, nn.Parameter):
                module._parameters[leaf] = tensor
            else:
                module._buffers[leaf] = tensor

    @contextlib.contextmanager
    def read_as(self, dtype: torch.dtype) -> Iterator[None]:
        """Reads in ``dtype`` instead of the compute dtype (export writes and checks the graph's dtype)."""
        kept, self.dtype = self.dtype, dtype
        try:
            yield
        finally:
            self.dtype = kept

    @contextlib.contextmanager
    def streamed(self) -> Iterator[None]:
        """The whole model callable with one block in memory at a time: every tensor outside the blocks
        (the output head too; a tied head shares the embedding's tensor, as in the skeleton) materialized,
        and each block read as its forward begins and released as it ends."""
        layers, _ = self.adapter.layers(self.model)
        state = self.model.state_dict(keep_vars=True)
        outside = [n for n in state if not n.startswith(f"{layers}.")]
        read = self.shards.read([n for n in outside if n in self.shards.files], self.dtype, self.device)
        by_id = {id(state[n]): t for n, t in read.items()}
        names = [n for n in outside if id(state[n]) in by_id]
        for name in names:
            self._put(name, by_id[id(state[name])])
        held: dict[str, contextlib.ExitStack] = {}

        def enter(prefix):
            held[prefix] = contextlib.ExitStack()
            held[prefix].enter_context(self.block(prefix))

        handles = [h for b in self.adapter.blocks(self.model) for h in (
            b.module.register_forward_pre_hook(lambda *_, p=b.prefix: enter(p)),
            b.module.register_forward_hook(lambda *_, p=b.prefix: held.pop(p).close()))]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for stack in held.values():  # a forward that raised inside a block
                stack.close()
            self._restore(state, names)
            trim_heap()

    def _current(self) -> dict[str, Path]:
        """Tensor name -> the file holding its current value, for the tensors the model has (a plain
        checkpoint's zero biases are not: models/plain.py)."""
        state = self.model.state_dict(keep_vars=True)
        files = {n: p for n, p in self.shards.files.items() if n in state}
        for prefix, path in self.staged.items():
            files.update({n: path for n in state if n.startswith(f"{prefix}.")})
        return files

    def digest(self) -> str:
        """What the statistics cache keys the model by: the bytes of every file the weights come from."""
        files = sorted({str(p) for p in self._current().values()})
        return hashlib.sha256("".join(f"{Path(p).name}:{sha256_path(Path(p))}\n" for p in files).encode()).hexdigest()

    def tensors(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """The model's tensors, one group at a time: each block, then each tensor outside the blocks."""
        current = self._current()
        blocks = [b.prefix for b in self.adapter.blocks(self.model)]
        for prefix in blocks:
            names = [n for n in current if n.startswith(f"{prefix}.")]
            yield prefix, self._read(prefix, names)
        for name in current:
            if not any(name.startswith(f"{p}.") for p in blocks):
                yield name, self.shards.read([name], self.dtype, torch.device("cpu"))

    def nonzero(self) -> int:
        """Nonzero entries over every weight file tensor, read one group at a time."""
        total = 0
        for _, group in self.tensors():
            total += sum(int(torch.count_nonzero(t)) for t in group.values())
            del group  # before the next group is read (a loop variable lives until it is rebound)
        return total

    def save(self, folder: Path, extra: dict[str, torch.Tensor]) -> None:
        """Write the weights as sharded safetensors (one file per group, ``extra``'s tensors in one more: the
        zero biases a plain config implies, which the model lacks), an index; then read from there."""
        folder.mkdir(parents=True, exist_ok=True)
        weight_map = {}
        for group, tensors in itertools.chain(self.tensors(), [("extra", extra)] if extra else []):
            file = f"{group}.safetensors"
            save_file({n: t.contiguous().cpu() for n, t in tensors.items()}, str(folder / file))
            weight_map.update(dict.fromkeys(tensors, file))
            del tensors  # before the next group is read: the embedding and the head were 2 x 288 MiB at 3B
        (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
        self.rebase(folder)

    def rebase(self, folder: Path) -> None:
        """Read from ``folder`` (a checkpoint this model saved), forgetting staged blocks."""
        self.shards = Shards(folder)
        self.staged.clear()
        shutil.rmtree(self.staging, ignore_errors=True)

