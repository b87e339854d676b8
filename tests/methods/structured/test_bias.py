"""Bias compensation by hand: the removed columns' mean contribution."""

from __future__ import annotations

import torch

from methods.structured.bias import compensation


def test_compensation_by_hand(weight):
    mean = torch.tensor([2.0, -1.0, 4.0])
    # removed columns 0 and 2: W[:, [0, 2]] @ [2, 4] = [1*2 + 0*4, 3*2 + -1*4]
    torch.testing.assert_close(compensation(weight, [0, 2], mean), torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(compensation(weight.half(), torch.tensor([1]), mean), torch.tensor([2.0, -1.0]))
