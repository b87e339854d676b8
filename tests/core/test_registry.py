"""Registries and the flat discriminated-union arguments stages build from them."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from core.errors import RecipeError
from core.registry import Registry, stage_args
from pipeline.recipe import _validate
from stages.base import StageArgs

FAMILY: Registry = Registry("toy method", key="method")


class ToyArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    strength: float = Field(default=0.5, gt=0, lt=1)  # common to the family


@FAMILY.register
class Small:
    name = "small"

    class Args(ToyArgs):
        method: Literal["small"]


@FAMILY.register
class Large:
    name = "large"

    class Args(ToyArgs):
        method: Literal["large"]
        width: int = Field(ge=1)


class ToyStage(StageArgs):
    type: Literal["toy"]


ARGS = stage_args(FAMILY, ToyStage)


def test_members_keep_their_own_fields_and_the_stage_fields():
    a = _validate(ARGS, {"type": "toy", "method": "large", "width": 3, "name": "t"}, "stages[0]")
    assert (a.type, a.method, a.width, a.strength, a.name) == ("toy", "large", 3, 0.5, "t")
    assert FAMILY.names() == ["small", "large"] and FAMILY["large"] is Large


@pytest.mark.parametrize("data, field, text", [
    ({"type": "toy", "method": "huge"}, "stages[0].method", "'huge' is not allowed; allowed: small, large"),
    ({"type": "toy"}, "stages[0].method", "required key is missing; allowed: small, large"),
    ({"type": "toy", "method": "small", "width": 3}, "stages[0].width", "unknown key; allowed keys: "),
    ({"type": "toy", "method": "large"}, "stages[0].width", "required key is missing"),
    ({"type": "toy", "method": "small", "strength": 2}, "stages[0].strength", "2 is out of range"),
])
def test_errors_name_the_field_inside_the_member(data, field, text):
    with pytest.raises(RecipeError) as e:
        _validate(ARGS, data, "stages[0]")
    assert e.value.field == field and e.value.message.startswith(text)


def test_unknown_key_lists_the_members_own_keys():
    with pytest.raises(RecipeError) as e:
        _validate(ARGS, {"type": "toy", "method": "small", "width": 3}, "stages[0]")
    assert "strength" in e.value.message and "method" in e.value.message and "width" not in e.value.message


def test_a_member_without_its_tag_is_refused():
    class Bad:
        name = "bad"
        Args = ToyArgs

    with pytest.raises(TypeError, match="Literal"):
        FAMILY.register(Bad)
    with pytest.raises(ValueError, match="twice"):
        FAMILY.register(Small)
