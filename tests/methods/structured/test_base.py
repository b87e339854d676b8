"""The arguments every structured score shares, and the registry."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from methods.structured import SCORES


def _args(**kw):
    return SCORES["flap"].Args(**{"method": "flap", "ratio": 0.5, **kw})


def test_scores_are_registered_by_name():
    from methods.structured.flap import FLAP
    from methods.structured.magnitude_sp import MagnitudeSP
    from methods.structured.wanda_sp import WandaSP

    assert sorted(SCORES.names()) == ["flap", "magnitude-sp", "wanda-sp"]
    assert (SCORES["flap"], SCORES["wanda-sp"], SCORES["magnitude-sp"]) == (FLAP, WandaSP, MagnitudeSP)


@pytest.mark.parametrize("kw, words", [
    ({"align": 3}, "align 3 is not allowed"),
    ({"remove_heads": 2}, "only applies to structures UL-MM and AL-MM"),
    ({"ratio": 1.0}, "less than 1"),
    ({"min_heads": 0}, "greater than or equal to 1"),
])
def test_common_arguments_are_checked(kw, words):
    with pytest.raises(ValidationError, match=words):
        _args(**kw)


def test_structure_and_modules_properties():
    assert _args().adaptive and not _args(structure="UL-MM", remove_heads=1).adaptive
    assert (_args().attention, _args().mlp) == (True, True)
    assert (_args(modules="mlp").attention, _args(modules="attention").mlp) == (False, False)
