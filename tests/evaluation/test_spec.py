"""The evaluation section's quality gate: bounded fields, at least one of them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from evaluation.spec import AcceptSpec, EvaluationSpec


def test_accept_is_optional_and_keeps_what_is_given():
    assert EvaluationSpec().accept is None
    spec = EvaluationSpec(accept={"max_perplexity_ratio": 1.15, "min_token_agreement": 0.9})
    assert spec.accept.model_dump(exclude_none=True) == {"max_perplexity_ratio": 1.15, "min_token_agreement": 0.9}


@pytest.mark.parametrize("given, words", [
    ({}, "set at least one bound"),
    ({"max_perplexity_ratio": 0.9}, "greater than or equal to 1"),
    ({"min_mean_cosine": 1.5}, "less than or equal to 1"),
    ({"min_top1_retained": -0.1}, "greater than or equal to 0"),
    ({"min_speedup": 1.2}, "Extra inputs are not permitted"),
])
def test_bad_bounds_are_refused(given, words):
    with pytest.raises(ValidationError, match=words):
        AcceptSpec(**given)
