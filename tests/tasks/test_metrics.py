"""Quality metrics against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from calibration.batches import Batch
from tasks.metrics import (
    cosine_comparison,
    cosine_rows,
    lee_correlation,
    next_token_comparison,
    outputs,
    pearson,
    perplexity,
    ranks,
    spearman,
)


def test_uniform_logits_have_the_vocabulary_size_as_perplexity():
    batches = [Batch({"input_ids": torch.randint(0, 7, (2, 5))}) for _ in range(3)]
    assert perplexity(lambda b: [np.zeros((*b["input_ids"].shape, 7), np.float32)], batches) == pytest.approx(7.0)


def test_perplexity_is_exp_of_the_mean_token_cross_entropy():
    ids = torch.tensor([[0, 1, 2, 1]])
    logits = torch.randn(1, 4, 3)
    nll = -sum(float(torch.log_softmax(logits[0, t], -1)[ids[0, t + 1]]) for t in range(3)) / 3
    got = perplexity(lambda b: [logits.numpy()], [Batch({"input_ids": ids})])
    assert got == pytest.approx(math.exp(nll), rel=1e-6)


def test_cosine_rows_and_comparison():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    b = np.array([[2.0, 0.0], [-1.0, -1.0], [0.0, 0.0]])
    np.testing.assert_allclose(cosine_rows(a, b), [1.0, -1.0, 0.0])
    assert cosine_comparison(a[:2], b[:2]) == {"dense": {}, "compressed": {},
                                               "comparison": {"mean_cosine": 0.0, "min_cosine": -1.0, "samples": 2}}


def test_ranks_average_ties_and_spearman_is_pearson_of_ranks():
    np.testing.assert_array_equal(ranks(np.array([3.0, 1.0, 3.0, 2.0])), [2.5, 0.0, 2.5, 1.0])
    x = np.array([0.1, 0.5, 0.2, 0.9, 0.4])
    assert spearman(x, np.exp(3 * x)) == pytest.approx(1.0)
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0) and pearson(x, -x) == pytest.approx(-1.0)
    assert spearman(x, x[::-1]) == pytest.approx(pearson(ranks(x), ranks(x[::-1])))


def test_outputs_concatenate_the_first_output_of_every_batch():
    batches = [Batch({"x": torch.full((2, 1), float(i))}) for i in range(3)]
    got = outputs(lambda b: [b["x"].numpy() * 2, None], batches)
    np.testing.assert_array_equal(got[:, 0], [0, 0, 2, 2, 4, 4])


def test_lee_correlation_against_a_direct_computation():
    rng = np.random.default_rng(0)
    n = 6
    emb = rng.normal(size=(n + 2, 4)).astype(np.float32)  # two padding rows past n are ignored
    human = np.triu(rng.random((n, n)), 1) + np.eye(n)
    docs = [Batch({"i": torch.arange(k, k + 4)}) for k in (0, 4)]
    got = lee_correlation(lambda b: [emb[b["i"].numpy()]], docs, n, human)
    unit = emb[:n] / np.linalg.norm(emb[:n], axis=1, keepdims=True)
    iu = np.triu_indices(n, 1)
    sim, ref = (unit @ unit.T)[iu], human[iu]
    order = lambda v: np.argsort(np.argsort(v))  # noqa: E731 (no ties in random data)
    assert got == {"pearson": round(float(np.corrcoef(sim, ref)[0, 1]), 4),
                   "spearman": round(float(np.corrcoef(order(sim), order(ref))[0, 1]), 4)}


def test_next_token_comparison_against_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    rows = [(torch.randint(0, 6, (2, 5), generator=g), torch.randn(2, 5, 6, generator=g).numpy(),
             torch.randn(2, 5, 6, generator=g).numpy()) for _ in range(2)]
    ref_nll = cmp_nll = agree = 0.0
    for ids, ref, cmp in rows:
        for b in range(2):
            for t in range(4):  # the last position predicts nothing
                ref_nll -= float(torch.log_softmax(torch.from_numpy(ref[b, t]), -1)[ids[b, t + 1]])
                cmp_nll -= float(torch.log_softmax(torch.from_numpy(cmp[b, t]), -1)[ids[b, t + 1]])
                agree += int(ref[b, t].argmax() == cmp[b, t].argmax())
    got = next_token_comparison(rows)
    assert got["reference"] == pytest.approx(math.exp(ref_nll / 16), rel=1e-5)
    assert got["compared"] == pytest.approx(math.exp(cmp_nll / 16), rel=1e-5)
    assert got["token_agreement"] == agree / 16
    assert got["reference"] == pytest.approx(perplexity(lambda b: [np.concatenate([r[1] for r in rows])],
                                                        [Batch({"input_ids": torch.cat([r[0] for r in rows])})]))
