"""Attention units under GQA (whole groups or per-group bundles), MLP units, and their floors."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from methods.structured.units import attention_units, mlp_units


def _block(num_heads=4, num_kv_heads=2, head_dim=2):
    return SimpleNamespace(index=3, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)


def test_group_units_are_kv_heads_with_their_query_heads():
    per_channel = torch.tensor([1.0, 1.0, 2.0, 2.0, 5.0, 5.0, 0.0, 0.0])  # head sums 2, 4, 10, 0
    units = attention_units(_block(), per_channel, "group", 1, adaptive=False, hidden=10)
    assert [(u.heads, u.kv_heads, u.score, u.forced) for u in units] == [((0, 1), (0,), 6.0, False),
                                                                         ((2, 3), (1,), 10.0, True)]
    assert all(u.params == (2 * 2 + 2) * 2 * 10 for u in units)  # q+o of 2 heads, k+v of 1 KV head
    adaptive = attention_units(_block(), per_channel, "group", 1, adaptive=True, hidden=10)
    assert [u.score for u in adaptive] == [1.5, 2.5]  # mean of the per-head channel means


def test_per_group_bundles_take_the_next_lowest_head_of_every_group():
    per_channel = torch.tensor([3.0, 3.0, 1.0, 1.0, 0.0, 0.0, 4.0, 4.0])  # head sums 6, 2, 0, 8
    units = attention_units(_block(), per_channel, "per-group", 3, adaptive=False, hidden=10)
    assert [(u.heads, u.kv_heads, u.score) for u in units] == [((1, 2), (), 2.0), ((0, 3), (), 14.0)]
    assert [u.forced for u in units] == [True, True]  # 3 heads kept need ceil(3 / 2) = 2 bundles


def test_mlp_floor_forces_the_best_channels():
    units = mlp_units(_block(), torch.tensor([0.5, 3.0, 1.0, 2.0]), params=7, floor=2)
    assert [u.forced for u in units] == [False, True, False, True] and {u.params for u in units} == {7}
