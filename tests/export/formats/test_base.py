"""The format registry: every member is complete, and the fields each format owns."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from export.formats import FORMATS, Format, FormatArgs, LayerArgs


def test_members_are_found_by_name_with_their_declarations():
    assert sorted(FORMATS.names()) == ["fp16", "int4", "int8", "w8a16"]
    table = {name: (cls.default_rtol, cls.calibration, bool(cls.ort_disabled_optimizers), issubclass(cls.Args, LayerArgs))
             for name, cls in FORMATS.members().items()}
    assert table == {"fp16": (0.05, False, False, False), "int8": (0.25, True, True, True),
                     "int4": (0.5, False, False, True), "w8a16": (0.1, False, False, True)}
    for name, cls in FORMATS.members().items():
        assert issubclass(cls, Format) and issubclass(cls.Args, FormatArgs) and cls.__doc__ and cls.name == name


def test_each_format_owns_its_fields():
    own = {name: set(cls.Args.model_fields) for name, cls in FORMATS.members().items()}
    assert own == {"fp16": {"format", "rtol"},
                   "int8": {"format", "rtol", "targets", "ignore", "calibrate_method", "percentile", "float16"},
                   "int4": {"format", "rtol", "targets", "ignore", "group_size", "partial_groups"},
                   "w8a16": {"format", "rtol", "targets", "ignore"}}


@pytest.mark.parametrize("rtol", [0, 10.5])
def test_rtol_is_bounded_for_every_format(rtol):
    for cls in FORMATS.members().values():
        with pytest.raises(ValidationError, match="rtol"):
            cls.Args(format=cls.name, rtol=rtol)


def test_a_format_without_its_tag_is_refused():
    class Bad(Format):
        name = "bad"
        Args = FormatArgs

        def apply(self, model, nodes, context):
            return model

    with pytest.raises(TypeError, match="Literal"):
        FORMATS.register(Bad)
