"""Quality metrics against the dense model: pure math over what a model run returns.

A `Run` is anything that maps a batch (the model's keyword inputs) to numpy outputs: evaluation/'s
ONNX Runtime or PyTorch runner, or a plain function in a test. The Lee correlation follows
Lee, Pincombe and Welsh (CogSci 2005): embedding cosine similarities of the 1,225 document pairs
against the mean human ratings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from calibration.batches import Batch

Run = Callable[[dict[str, torch.Tensor]], list[np.ndarray]]


def next_token_nll(logits: np.ndarray, ids: torch.Tensor) -> float:
    """Summed next-token cross-entropy of logits [B, T, V] for ids [B, T] (the last position predicts nothing)."""
    lg = torch.from_numpy(logits).float()[:, :-1]
    return float(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))


def perplexity(run: Run, batches: Iterable[Batch]) -> float:
    """exp of the mean next-token cross-entropy over every predicted token of the windows."""
    nll, count = 0.0, 0
    for b in batches:
        ids = b.inputs["input_ids"]
        nll += next_token_nll(run({"input_ids": ids})[0], ids)
        count += ids[:, 1:].numel()
    return float(np.exp(nll / count))


def next_token_comparison(rows: Iterable[tuple[torch.Tensor, np.ndarray, np.ndarray]]) -> dict:
    """Per batch (input_ids, reference logits, compared logits): both perplexities over every predicted
    token, and the fraction of those positions where both pick the same top-1 next token."""
    nll_ref = nll_cmp = 0.0
    count = agree = 0
    for ids, ref, cmp in rows:
        nll_ref += next_token_nll(ref, ids)
        nll_cmp += next_token_nll(cmp, ids)
        count += ids[:, 1:].numel()
        agree += int((ref[:, :-1].argmax(-1) == cmp[:, :-1].argmax(-1)).sum())
    return {"reference": float(np.exp(nll_ref / count)), "compared": float(np.exp(nll_cmp / count)),
            "token_agreement": agree / count}


def outputs(run: Run, batches: Iterable[Batch]) -> np.ndarray:
    """The first output of every batch, concatenated along the batch axis."""
    return np.concatenate([run(b.inputs)[0] for b in batches])


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True).clip(1e-12)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True).clip(1e-12)
    return (a * b).sum(-1)


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (for Spearman)."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=float)
    for value in np.unique(x):
        tied = x == value
        if tied.sum() > 1:
            r[tied] = r[tied].mean()
    return r


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.corrcoef(x, y)[0, 1])


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(ranks(x), ranks(y))


def cosine_comparison(dense: np.ndarray, compressed: np.ndarray) -> dict:
    """Row-wise cosine of the compressed outputs to the dense ones (the embedding tasks' fidelity)."""
    cos = cosine_rows(dense, compressed)
    return {"dense": {}, "compressed": {},
            "comparison": {"mean_cosine": round(float(cos.mean()), 5), "min_cosine": round(float(cos.min()), 5),
                           "samples": len(cos)}}


def lee_correlation(run: Run, docs: Iterable[Batch], n_docs: int, human: np.ndarray) -> dict:
    """Pearson and Spearman of the embedding similarities of every document pair with the human ratings."""
    emb = outputs(run, docs)[:n_docs]
    emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True).clip(1e-12)
    sim = emb @ emb.T
    iu = np.triu_indices(n_docs, k=1)
    model, ref = sim[iu], human[iu]
    return {"pearson": round(pearson(model, ref), 4), "spearman": round(spearman(model, ref), 4)}
