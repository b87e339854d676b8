"""The selector family: every module registered, the shared keep/fuse fields, block numbers."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from core.errors import RecipeError
from methods.tokens import SELECTORS
from methods.tokens.base import Method, block_index


def test_every_selector_is_registered_from_its_own_module_with_its_args():
    assert {"cls_attention", "divprune", "global_attention", "hiprune", "trim"} <= set(SELECTORS.names())
    for name, cls in SELECTORS.members().items():
        assert issubclass(cls, Method) and cls.name == name and cls.__module__ == f"methods.tokens.{name}"
        assert cls.Args.model_fields["method"].annotation.__args__ == (name,)
        assert {"keep", "fuse"} <= set(cls.Args.model_fields)
    assert SELECTORS["trim"].Args.calibrates_keep and not SELECTORS["divprune"].Args.calibrates_keep


@pytest.mark.parametrize("keep, text", [(None, r"keep is required: .*\(only (.*, )?trim(, .*)? can calibrate it\)"),
                                        (0, "keeps no token"), (1.5, r"not a ratio in \(0, 1\]"),
                                        ("half", "neither a count"), (True, "neither a count")])
def test_keep_is_a_count_or_a_ratio(keep, text):
    args = SELECTORS["divprune"].Args
    with pytest.raises(ValidationError, match=text):
        args(method="divprune", keep=keep)
    assert args(method="divprune", keep=1).keep == 1 and args(method="divprune", keep=1.0).keep == 1.0


def test_block_index_counts_from_either_end():
    assert (block_index(0, 4, "f"), block_index(-1, 4, "f"), block_index(-4, 4, "f")) == (0, 3, 0)
    for bad in (4, -5):
        with pytest.raises(RecipeError, match=f"layer {bad} does not exist: the encoder has 4 blocks") as e:
            block_index(bad, 4, "f.layer")
        assert e.value.field == "f.layer"


def test_default_hooks_build_a_plain_selector_and_calibrate_nothing():
    divprune = SELECTORS["divprune"]
    args = divprune.Args(method="divprune", keep=4)
    built = divprune.build(args, 4, env=None)
    assert (type(built.method), built.method.k, built.defaults, built.companions) == (divprune, 4, {}, ())
    assert divprune.resolve(args, 1, 2, 4, "s") is None and divprune.calibrate(args, None, None, 4) is None
    assert not divprune.calibration_images and not divprune.text_tower and divprune.inputs == ()
