"""Statistics on disk, keyed by a digest of everything they depend on.

The key covers the exact model weights (a digest of the state dict), the exact calibration inputs,
the statistic kinds and the settings of the pass (propagation, dtype, and for sequential passes
the pruning that shaped upstream activations), so a second run with the same recipe skips every
forward pass and a change anywhere misses the cache instead of reusing stale numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

FORMAT = 2  # bump when the statistics themselves change


def state_digest(model: nn.Module) -> str:
    """sha256 over parameter and buffer names, shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(**parts) -> str:
    return hashlib.sha256(json.dumps({"format": FORMAT, **parts}, sort_keys=True, default=str).encode()).hexdigest()


class StatsCache:
    """Statistics of one device type. A GPU sums in another order than the CPU (and its matmuls round
    differently), so its statistics are close to, not equal to, the CPU's: they live in their own
    folder (``stats-cuda``) and are never reused for a CPU run, nor the CPU's for a GPU run; a CPU
    run's keys and folder are those from before GPUs were supported. Loaded tensors go to ``device``."""

    def __init__(self, root: Path, device: torch.device | None = None):
        self.root, self.device = root, device or torch.device("cpu")

    def _path(self, key: str) -> Path:
        folder = "stats" if self.device.type == "cpu" else f"stats-{self.device.type}"
        return self.root / folder / f"{key[:32]}.safetensors"

    def load(self, key: str) -> dict[str, dict[str, torch.Tensor]] | None:
        path = self._path(key)
        if not path.is_file():
            return None
        with safe_open(path, framework="pt") as f:
            flat = {k: f.get_tensor(k).to(self.device) for k in f.keys()}
            aliases = f.metadata() or {}
        flat.update({k: flat[v] for k, v in aliases.items()})  # Linears sharing an input share its sums
        out: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in flat.items():
            module, field = key.rsplit("|", 1)
            out.setdefault(module, {})[field] = t
        return out

    def save(self, key: str, stats: dict[str, dict[str, torch.Tensor]]) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        flat: dict[str, torch.Tensor] = {}
        aliases: dict[str, str] = {}  # a tensor shared by several Linears (q/k/v) is written once
        seen: dict[int, str] = {}
        for m, fields in stats.items():
            for f, t in fields.items():
                key = f"{m}|{f}"
                if id(t) in seen:
                    aliases[key] = seen[id(t)]
                else:
                    seen[id(t)], flat[key] = key, t.contiguous().cpu()  # files hold CPU tensors
        # Runs of a sweep may save one key at once (processes, Ray workers on hosts sharing the folder): each
        # writes its own temp file and renames it over the entry, so a reader sees one whole file, never a mix.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(flat, tmp, metadata=aliases or None)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
