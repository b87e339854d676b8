"""Allocation: global top-k by weight, alignment, standardisation and the four structures."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from methods.structured.allocation import align_counts, allocate, drop_lowest, keep_top_by_weight, standardize
from methods.structured.flap import FLAP
from methods.structured.units import Unit


def test_standardize():
    z = standardize(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    assert abs(float(z.mean())) < 1e-6 and abs(float(z.std()) - 1) < 1e-6


def test_keep_top_by_weight_respects_floors_and_target():
    units = [Unit(0, "attn", heads=(0,), params=10, score=5.0), Unit(0, "mlp", channel=0, params=1, score=9.0),
             Unit(0, "mlp", channel=1, params=1, score=-1.0, forced=True)] + \
            [Unit(0, "mlp", channel=i, params=1, score=float(i)) for i in range(2, 8)]
    kept = keep_top_by_weight(units, 14)
    # forced channel 1 first (1), then by score: ch0 (9) -> 2, head (5) -> 12, ch7, ch6 -> 14
    assert kept == {2, 1, 0, 8, 7} and sum(units[i].params for i in kept) == 14


def test_align_counts():
    assert align_counts([70.6, 70.4], 8, [8, 8], [128, 128], keep_total=True) == [72, 72]
    assert align_counts([100.6, 40.4], 8, [8, 8], [128, 128], keep_total=True) == [104, 40]
    assert align_counts([3.0, 130.0], 8, [8, 8], [128, 128], keep_total=False) == [8, 128]
    assert align_counts([60.0], 64, [64], [1536], keep_total=False) == [64]


def test_drop_lowest_spares_forced_units():
    units = [Unit(0, "mlp", channel=i, score=s, forced=f) for i, (s, f) in enumerate([(0.0, True), (1.0, False),
                                                                                     (2.0, False), (3.0, False)])]
    assert [u.channel for u in drop_lowest(units, 2)] == [0, 3]


def _blocks():
    return [SimpleNamespace(index=i, num_heads=2, num_kv_heads=2, head_dim=2, intermediate_size=8,
                            mlp_in=("up",)) for i in range(2)]


def _scores():
    attn = {0: torch.tensor([1.0, 1.0, 9.0, 9.0]), 1: torch.tensor([8.0, 8.0, 2.0, 2.0])}
    mlp = {0: torch.arange(8.0), 1: torch.arange(8.0).flip(0)}
    return attn, mlp


def _args(**kw):
    return FLAP.Args(method="flap", ratio=0.5, align=1, **kw)


def test_uniform_structure_removes_the_same_share_in_every_block():
    plans = allocate(_args(structure="UL-UM"), _blocks(), *_scores(), hidden=4, n_blocks=2)
    assert [(p.heads, p.kv_heads) for p in plans] == [([1], [1]), ([0], [0])]  # the lower head of each
    assert [p.channels for p in plans] == [[4, 5, 6, 7], [0, 1, 2, 3]]
    assert plans[0].removed_heads() == [0] and plans[1].removed_channels() == [4, 5, 6, 7]


def test_adaptive_structure_ranks_standardised_scores_globally():
    attn, mlp = _scores()
    mlp[1] = mlp[1] * 100  # raw scale differences vanish after standardisation
    plans = allocate(_args(structure="AL-AM"), _blocks(), attn, mlp, hidden=4, n_blocks=2)
    torch.testing.assert_close(plans[1].mlp_scores, standardize(mlp[1]))
    kept = sum(len(p.heads) * 2 * 2 * 4 + len(p.channels) * 2 * 4 for p in plans)
    assert abs(kept - 0.5 * 2 * (2 * 16 + 8 * 8)) <= 16  # half the weight, within one head unit
    assert all(p.channels == sorted(p.mlp_scores.argsort(descending=True)[:len(p.channels)].tolist()) for p in plans)


def test_mlp_only_leaves_attention_alone():
    plans = allocate(_args(structure="UL-UM", modules="mlp"), _blocks(), {}, _scores()[1], hidden=4, n_blocks=2)
    assert all(p.heads == [0, 1] and p.kv_heads == [0, 1] and p.attn_scores is None for p in plans)
    assert [len(p.channels) for p in plans] == [4, 4]


def test_mm_structures_remove_exactly_remove_heads_units():
    ul = allocate(_args(structure="UL-MM", remove_heads=2), _blocks(), *_scores(), hidden=4, n_blocks=2)
    assert [p.heads for p in ul] == [[1], [0]]
    al = allocate(_args(structure="AL-MM", remove_heads=1), _blocks(), *_scores(), hidden=4, n_blocks=2)
    assert sum(len(p.heads) for p in al) == 3
