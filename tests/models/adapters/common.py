"""Checks every decoder family gets: slicing equals zeroing, and a real recipe run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from export import onnx as onnx_export
from models.adapters import adapter_for, head_channels
from pipeline.runner import run
from tasks import load_checkpoint

from ...conftest import text_recipe, write_recipe

HIDDEN, HEAD_DIM = 64, 16  # the tiny decoders of conftest._small_decoder


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def assert_slice_equals_zeroing(model, heads: list[int], kv_heads: list[int], channels: list[int]) -> None:
    """Slicing block 0 to ``heads``/``kv_heads``/``channels`` computes what the unsliced model computes
    with the dropped heads' o_proj columns and the dropped channels' mlp_out columns zeroed."""
    adapter = adapter_for(model.config.model_type, "causal-lm")
    ids = torch.randint(0, 30000, (2, 16))
    before = logits(model, ids)
    block = adapter.blocks(model)[0]
    adapter.slice_block(model, block, range(block.num_heads), range(block.num_kv_heads),
                        range(block.intermediate_size))
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=0)  # keeping everything changes nothing
    block = adapter.blocks(model)[0]
    with torch.no_grad():
        dropped = sorted(set(range(block.num_heads)) - set(heads))
        model.get_submodule(block.o).weight[:, head_channels(dropped, block.head_dim)] = 0
        model.get_submodule(block.mlp_out).weight[:, sorted(set(range(block.intermediate_size)) - set(channels))] = 0
    zeroed = logits(model, ids)
    assert (zeroed - before).abs().max() > 1e-3  # the dropped parts mattered
    adapter.slice_block(model, block, heads, kv_heads, channels)
    block = adapter.blocks(model)[0]
    assert (block.num_heads, block.num_kv_heads, block.intermediate_size) == (len(heads), len(kv_heads), len(channels))
    torch.testing.assert_close(logits(model, ids), zeroed, rtol=1e-5, atol=1e-5)


def prune_and_export(model_dir: Path, tmp_path: Path, structured: dict, weights: dict) -> tuple[Path, dict]:
    """calibrate -> FLAP -> Wanda -> export through the real runner: (run folder, manifest)."""
    stages = [{"type": "calibrate"}, {"type": "prune_structured", "method": "flap", "align": 8, **structured},
              {"type": "prune_weights", "method": "wanda", **weights}, {"type": "export"}]
    out = run(write_recipe(tmp_path, text_recipe(model_dir, "causal-lm", stages)), output=tmp_path / "out")
    return out, json.loads((out / "manifest.json").read_text())


def check_run(out: Path, manifest: dict, shapes, nm: bool):
    """What a finished run must show; ``shapes(heads, kv_heads, channels)`` gives each Linear's
    (out, in) relative to a block. Returns the reloaded checkpoint."""
    assert [s["status"] for s in manifest["stages"]] == ["ran"] * 4
    structured, weights = manifest["stages"][1]["metrics"], manifest["stages"][2]["metrics"]
    assert manifest["model"]["params_after"] < manifest["model"]["params_before"]
    assert manifest["onnx"]["parity"]["max_rel_err"] <= 1e-4  # export.rtol; the runner fails the stage above it
    assert weights["achieved_sparsity"] == 0.5

    model, _ = load_checkpoint(out / "checkpoint")
    adapter = adapter_for(model.config.model_type, "causal-lm")
    blocks = adapter.blocks(model)
    assert len(blocks) == len(structured["layers"]) == 2
    zeros = total = 0
    for block, layer in zip(blocks, structured["layers"]):
        expected = shapes(layer["heads"], layer["kv_heads"], layer["mlp_channels"])
        got = {name: tuple(block.module.get_submodule(name).weight.shape) for name in expected}
        assert got == expected, (block.index, got, expected)
        assert set(block.linears) == {f"{block.prefix}.{n}" for n in expected}  # every Linear, once
        for name in block.linears:
            w = model.get_submodule(name).weight
            zeros, total = zeros + int((w == 0).sum()), total + w.numel()
            if nm:
                assert int((w.reshape(-1, 4) != 0).sum(1).max()) <= 2, name  # 2:4 along the inputs
    assert zeros / total == 0.5

    ids = torch.randint(0, 30000, (2, 16))
    here = logits(model, ids).numpy()
    got = onnx_export.session(out / "model.onnx").run(None, {"input_ids": ids.numpy()})[0]
    np.testing.assert_allclose(got, here, rtol=1e-4, atol=1e-4 * np.abs(here).max())
    return model, structured
