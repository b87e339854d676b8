"""core/tensorfile.py reads what safetensors writes, tensor for tensor, into allocations of its own."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from core import tensorfile


def test_equals_safetensors_and_owns_its_memory(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "w.bf16": torch.randn(5, 7, generator=gen).to(torch.bfloat16),
        "w.f32": torch.randn(3, 2, 4, generator=gen),
        "w.f16": torch.randn(9, generator=gen).half(),
        "ids": torch.randint(-5, 5, (4, 3), generator=gen),
        "mask": torch.rand(6, generator=gen) > 0.5,
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    got = tensorfile.read(path)
    reference = load_file(str(path))
    assert got.keys() == reference.keys() == tensors.keys()
    for name, t in reference.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape and torch.equal(got[name], t), name
    got["w.f32"].zero_()  # a private allocation: the file is untouched
    assert torch.equal(load_file(str(path))["w.f32"], tensors["w.f32"])
    assert tensorfile.read(path, ["mask", "scalar"]).keys() == {"mask", "scalar"}


def test_truncated_file_and_unknown_dtype_are_one_line(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.ones(1000)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(ValueError, match="tensor a ends past the end of the file"):
        tensorfile.read(path)
    head = json.dumps({"b": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}).encode()
    path.write_bytes(len(head).to_bytes(8, "little") + head + b"\0")
    with pytest.raises(ValueError, match="tensor b has dtype F4, which is not read here"):
        tensorfile.read(path)
