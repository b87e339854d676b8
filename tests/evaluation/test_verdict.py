"""The verdict from the evaluate stage's numbers: quality and speed against dense, each bound checked."""

from __future__ import annotations

from evaluation.spec import AcceptSpec
from evaluation.verdict import verdict
from tasks import TASKS

ENCODER = {"comparison": {"mean_cosine": 0.68, "min_cosine": 0.56, "samples": 64},
           "size": {"dense": {"onnx_bytes": 1000, "nonzero_params": 10}, "compressed": {"onnx_bytes": 270,
                                                                                         "nonzero_params": 6}},
           "latency": {"speedup": 1.4}}


def test_a_run_that_misses_the_gate_is_rejected_with_the_missed_bound():
    v = verdict(ENCODER, AcceptSpec(min_mean_cosine=0.97, min_min_cosine=0.5), TASKS["feature-extraction"])
    assert v["accepted"] is False
    assert v["quality"] == {"mean_cosine": 0.68, "min_cosine": 0.56}
    assert v["speed"] == {"speedup": 1.4, "onnx_bytes_ratio": 0.27}
    assert v["checks"] == [
        {"field": "min_mean_cosine", "metric": "mean_cosine", "value": 0.68, "bound": 0.97, "ok": False},
        {"field": "min_min_cosine", "metric": "min_cosine", "value": 0.56, "bound": 0.5, "ok": True}]
    assert v["line"] == ("verdict: mean_cosine 0.68, min_cosine 0.56; speedup 1.4x; onnx_bytes x0.27 of dense: "
                         "REJECTED (mean_cosine 0.68 < 0.97)")


def test_upper_bounds_pass_at_equality_and_the_line_names_the_gate():
    ev = {"comparison": {"perplexity_ratio": 1.15, "token_agreement": 0.9},
          "size": {"dense": {"nonzero_params": 100}, "compressed": {"nonzero_params": 50}}}
    v = verdict(ev, AcceptSpec(max_perplexity_ratio=1.15, min_token_agreement=0.9), TASKS["causal-lm"])
    assert v["accepted"] is True and v["speed"] == {"nonzero_params_ratio": 0.5}
    assert v["line"] == ("verdict: perplexity_ratio 1.15, token_agreement 0.9; nonzero_params x0.5 of dense: "
                         "ACCEPTED (max_perplexity_ratio 1.15, min_token_agreement 0.9)")
    worse = verdict({**ev, "comparison": {"perplexity_ratio": 1.16, "token_agreement": 0.95}},
                    AcceptSpec(max_perplexity_ratio=1.15), TASKS["causal-lm"])
    assert worse["accepted"] is False and worse["line"].endswith("REJECTED (perplexity_ratio 1.16 > 1.15)")


def test_without_a_gate_the_verdict_reports_quality_and_speed_only():
    ev = {"comparison": {"top1_agreement": 0.95}, "size": {"dense": {}, "compressed": {}}}
    v = verdict(ev, None, TASKS["image-classification"])
    assert v == {"accepted": None, "quality": {"top1_agreement": 0.95}, "speed": {}, "checks": [],
                 "line": "verdict: top1_agreement 0.95: no quality gate (set evaluation.accept)"}
