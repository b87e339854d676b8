"""core/arrays.py: rows written chunk by chunk read back exactly (float16), and only a complete
store written for the same key is ever read."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.arrays import INDEX, RowWriter, read_rows, row_bytes

SHAPES = {"logits": (3, 5), "embedding": (4,)}


def _write(folder, key="k", close=True):
    rng = np.random.default_rng(0)
    data = {name: rng.normal(size=(6, *shape)).astype(np.float32) for name, shape in SHAPES.items()}
    w = RowWriter(folder, key, 6, SHAPES)
    for start in (0, 4):  # chunks of 4 and 2 rows
        w.write(start, {name: a[start:start + 4] for name, a in data.items()})
    if close:
        w.close()
    return data


def test_chunks_read_back_as_float16_rows(tmp_path):
    data = _write(tmp_path / "s")
    got = read_rows(tmp_path / "s", "k")
    assert got is not None and set(got) == set(SHAPES)
    for name, a in data.items():
        assert got[name].dtype == torch.float16 and tuple(got[name].shape) == a.shape
        assert torch.equal(got[name], torch.from_numpy(a.astype(np.float16)))
    assert got["logits"][torch.tensor([5, 1])].shape == (2, 3, 5)  # what the training loop does with it
    assert row_bytes(SHAPES) == (15 + 4) * 2 and row_bytes(SHAPES, np.float32) == (15 + 4) * 4


@pytest.mark.parametrize("spoil", ["other key", "unfinished", "truncated"])
def test_only_a_complete_store_for_the_same_key_is_read(tmp_path, spoil):
    folder = tmp_path / "s"
    _write(folder, close=spoil != "unfinished")
    if spoil == "truncated":
        path = folder / "embedding.npy"
        path.write_bytes(path.read_bytes()[:-2])
    assert read_rows(folder, "other" if spoil == "other key" else "k") is None
    assert (folder / INDEX).is_file() == (spoil != "unfinished")


def test_a_new_writer_empties_the_folder_first(tmp_path):
    folder = tmp_path / "s"
    _write(folder)
    RowWriter(folder, "k2", 2, {"x": (1,)})
    assert sorted(p.name for p in folder.iterdir()) == ["x.npy"]  # no stale index, no stale arrays
    assert read_rows(folder, "k") is None
