"""SparseGPT against brute force (OBS and least squares), its masks, and a tiny end-to-end run."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from pydantic import ValidationError

from calibration.collectors import InputStats, Stats
from export import inspect as onnx_inspect
from methods.obs import inverse_hessian_factor, invert_upper_
from methods.weights import CRITERIA
from methods.weights.sparsegpt import SparseGPT
from pipeline.runner import run

from ...conftest import text_recipe, write_recipe
from .test_base import _pruned


def _stats(x: torch.Tensor) -> Stats:
    s = InputStats(SparseGPT.activations)
    s.update(x, None)
    return Stats(s.tensors())


def _inputs(seed: int, channels: int = 64, tokens: int = 512) -> torch.Tensor:
    """Activations shaped like a transformer's: channel scales spread over e^(+-2), mildly mixed."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.exp(torch.randn(channels, generator=g))
    mix = torch.eye(channels) + 0.3 * torch.randn(channels, channels, generator=g) / channels ** 0.5
    return (torch.randn(8, tokens // 8, channels, generator=g) * scales) @ mix


def _sparsegpt(**kw) -> SparseGPT:
    return SparseGPT(SparseGPT.Args(method="sparsegpt", **kw))


def _damped(stats: Stats, dampening: float = 0.01) -> torch.Tensor:
    h = stats.hessian.double()  # the reference in fp64
    return h + dampening * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)


@pytest.mark.parametrize("pattern, blocksize", [("2:4", 128), ("2:4", 8), ("4:8", 16), ("1:4", 4)])
def test_exact_nm_after_pruning(pattern, blocksize):
    n, m = map(int, pattern.split(":"))
    w = torch.randn(24, 64)
    new, mask = _pruned(_sparsegpt(pattern=pattern, blocksize=blocksize), w, _stats(_inputs(0)))
    assert (mask.view(24, -1, m).sum(-1) == m - n).all()
    assert (new[mask] == 0).all() and (new[~mask] != 0).all()
    assert new.dtype == w.dtype and not torch.equal(new[~mask], w[~mask])  # the kept weights moved


def test_unstructured_target_per_column_block_over_all_rows():
    w = torch.randn(16, 64)
    new, mask = _pruned(_sparsegpt(sparsity=0.5, blocksize=16), w, _stats(_inputs(1)))
    assert mask.view(16, 4, 16).sum((0, 2)).tolist() == [128] * 4  # floor(16 * 16 * 0.5) per block
    assert len(set(mask.sum(1).tolist())) > 1  # rows compete: not a per-row quota
    assert int((new == 0).sum()) == 512


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [{"sparsity": 0.5}, {"pattern": "2:4"}])
def test_layer_output_error_below_wanda_and_magnitude(seed, shape):
    x, w = _inputs(seed), torch.randn(32, 64, generator=torch.Generator().manual_seed(100 + seed))
    s = InputStats({"hessian", "sq_norm"})
    s.update(x, None)
    stats, flat = Stats(s.tensors()), x.reshape(-1, 64)
    errors = {}
    for name in ("magnitude", "wanda", "sparsegpt"):
        new, _ = _pruned(CRITERIA[name](CRITERIA[name].Args(method=name, **shape)), w, stats)
        assert (new == 0).float().mean() == 0.5
        errors[name] = (flat @ w.T - flat @ new.T).norm()
    assert errors["sparsegpt"] < errors["wanda"] and errors["sparsegpt"] < errors["magnitude"], errors


def test_one_pruned_weight_is_the_obs_update_and_the_least_squares_optimum():
    """Zeroing w_0 of one row: SparseGPT = OBS closed form = least squares over the other weights."""
    x = _inputs(3, channels=4, tokens=64)
    stats = _stats(x)
    w = torch.tensor([[0.01, 1.0, -2.0, 1.5]], dtype=torch.float64)  # w_0 has by far the lowest saliency
    new, mask = _pruned(_sparsegpt(pattern="3:4"), w, stats)
    assert mask.tolist() == [[True, False, False, False]]

    hinv = torch.linalg.inv(_damped(stats))
    obs = w[0] - w[0, 0] / hinv[0, 0] * hinv[:, 0]
    # least squares on the damped data: H + lambda I = (2 / T) A^T A with A = [X; sqrt(lambda T / 2) I]
    flat = x.reshape(-1, 4).double()
    lam = 0.01 * stats.hessian.diagonal().mean()
    a = torch.cat([flat, (lam * flat.shape[0] / 2).sqrt() * torch.eye(4, dtype=torch.float64)])
    rest = torch.linalg.lstsq(a[:, 1:], a @ w[0]).solution
    torch.testing.assert_close(obs, torch.cat([torch.zeros(1, dtype=torch.float64), rest]))
    torch.testing.assert_close(new[0], obs, rtol=1e-4, atol=1e-6)  # the loop runs in fp32


def test_columns_after_the_last_pruned_one_are_least_squares_optimal():
    """Every update, across column blocks too, keeps the later columns optimal given the fixed ones."""
    g = torch.Generator().manual_seed(4)  # not the global RNG: other tests' seeds would decide which rows get checked
    stats, w = _stats(_inputs(4, channels=32)), torch.randn(6, 32, dtype=torch.float64, generator=g)
    new, mask = _pruned(_sparsegpt(sparsity=0.3, blocksize=8), w, stats)
    h = _damped(stats)
    checked = 0
    for r in range(6):
        if not mask[r].any() or mask[r].nonzero().max() == 31:
            continue
        p = int(mask[r].nonzero().max()) + 1
        d = w[r] - new[r]
        optimum = -torch.linalg.solve(h[p:, p:], h[p:, :p] @ d[:p])  # minimises d^T H d over d[p:]
        torch.testing.assert_close(d[p:], optimum, rtol=1e-4, atol=1e-5)  # the loop runs in fp32
        checked += 1
    assert checked >= 3


def test_upper_inverse_in_place_by_blocks_of_columns_equals_one_solve():
    """Blocked in place: the inverse is the one solve against I gives, whatever the block width."""
    a = torch.randn(10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    upper = torch.linalg.cholesky(a @ a.T + torch.eye(10, dtype=torch.float64)).T
    whole = torch.linalg.solve_triangular(upper, torch.eye(10, dtype=torch.float64), upper=True)
    for columns in (1, 3, 10):
        copy = upper.clone()
        assert invert_upper_(copy, columns) is copy
        torch.testing.assert_close(copy, whole, rtol=0, atol=1e-14)


def test_factor_and_dead_inputs():
    stats = _stats(_inputs(5, channels=8, tokens=64))
    u = inverse_hessian_factor(stats.hessian.double(), 0.01)  # in H's dtype: the algorithm, exactly
    torch.testing.assert_close(u.T @ u, torch.linalg.inv(_damped(stats)))
    assert torch.equal(u, u.triu())
    x = _inputs(5, channels=8, tokens=64)
    x[..., 3] = 0  # an input channel the calibration never excites
    new, mask = _pruned(_sparsegpt(pattern="2:4"), torch.randn(4, 8), _stats(x))
    assert (new[:, 3] == 0).all() and mask[:, 3].all()


def test_score_is_the_obs_saliency_and_the_contract_rejects_bad_shapes():
    stats, w = _stats(_inputs(6, channels=8, tokens=64)), torch.randn(3, 8)
    hinv = torch.linalg.inv(_damped(stats))
    score = _sparsegpt(sparsity=0.5).score("l", w, stats)
    torch.testing.assert_close(score[:, 0], (w[:, 0] ** 2 / hinv[0, 0]).float())  # column 0: plain OBS
    with pytest.raises(ValueError, match=r"Hessian \(8, 8\) does not match weight \(3, 4\)"):
        _sparsegpt(sparsity=0.5).prune("l", torch.randn(3, 4), stats)
    broken = Stats({**stats.t, "xtx": -stats.t["xtx"]})  # negative definite: no Cholesky factor
    with pytest.raises(ValueError, match="l: the damped Hessian is not positive definite"):
        _sparsegpt(sparsity=0.5).prune("l", w, broken)


def test_arguments():
    args = SparseGPT.Args(method="sparsegpt", pattern="2:4")
    assert (args.blocksize, args.dampening) == (128, 0.01)
    assert _sparsegpt(sparsity=0.5, dampening=0.1).cache_fields() == {"blocksize": 128, "dampening": 0.1}
    with pytest.raises(ValidationError, match="blocksize 6 must be a multiple of M=4"):
        SparseGPT.Args(method="sparsegpt", pattern="2:4", blocksize=6)
    with pytest.raises(ValidationError, match="greater than 0"):
        SparseGPT.Args(method="sparsegpt", sparsity=0.5, dampening=0)


def test_tiny_llama_sparsegpt_2of4_survives_export(llama_dir, tmp_path):
    stages = [{"type": "calibrate"}, {"type": "prune_weights", "method": "sparsegpt", "pattern": "2:4"},
              {"type": "export"}]
    out = run(write_recipe(tmp_path, text_recipe(llama_dir, "causal-lm", stages)), output=tmp_path / "out")
    metrics = json.loads((out / "manifest.json").read_text())["stages"][1]["metrics"]
    assert metrics["achieved_sparsity"] == 0.5 and metrics["statistics"] == "sequential"
    weights = onnx_inspect.linear_weights(onnx.load(out / "model.onnx"))
    inside = {n: w for n, w in weights.items() if ".layers." in n}
    assert len(inside) == 14  # 2 blocks x (q, k, v, o, gate, up, down)
    assert all(onnx_inspect.nm_violations(w, 2, 4) == 0 and (w == 0).mean() == 0.5 for w in inside.values())
