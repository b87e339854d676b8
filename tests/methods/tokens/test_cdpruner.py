"""CDPruner: the fast greedy MAP update against an explicit log-det greedy, the selection against a float64
reference from HF's own modules, and its recipe fields."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from core.errors import RecipeError
from methods.tokens import SELECTORS
from methods.tokens.base import Env
from methods.tokens.cdpruner import CDPruner, greedy_map
from methods.tokens.text import TEXT_FILE, TextEncoder
from models.adapters import adapter_for
from models.spec import ModelSpec

from .conftest import gathered, pixels, reference_pass, select, text_tower

CLIP_VISION = adapter_for("clip", "image-feature-extraction")


def log_det_greedy(kernel: np.ndarray, k: int) -> list[int]:
    """Greedy MAP by brute force: each step adds the item that maximises log det of the chosen submatrix."""
    picked: list[int] = []
    for _ in range(k):
        gains = {j: np.linalg.slogdet(kernel[np.ix_(picked + [j], picked + [j])])[1]
                 for j in range(len(kernel)) if j not in picked}
        picked.append(max(gains, key=gains.get))
    return picked


def dpp_kernel(x: np.ndarray, r: np.ndarray) -> np.ndarray:
    unit = x / np.linalg.norm(x, axis=-1, keepdims=True)
    return r[:, None] * (unit @ unit.T) * r[None, :]


@pytest.mark.parametrize("seed", range(4))
def test_greedy_map_update_is_the_log_det_greedy(seed):
    rng = np.random.default_rng(seed)
    kernels = [dpp_kernel(rng.normal(size=(9, 12)), rng.uniform(0.1, 1.0, size=9)) for _ in range(2)]
    kernel = torch.from_numpy(np.stack(kernels))
    picks = greedy_map(kernel, torch.diagonal(kernel, dim1=1, dim2=2), 6).numpy()
    assert [list(p) for p in picks] == [log_det_greedy(kk, 6) for kk in kernels]


def test_greedy_map_still_picks_k_distinct_items_past_the_kernel_rank():
    """Rank 3, K = 6: the remaining gains reach 0 and the √ floor keeps the update finite."""
    rng = np.random.default_rng(0)
    kernel = torch.from_numpy(dpp_kernel(rng.normal(size=(8, 3)), np.ones(8))[None])
    picks = greedy_map(kernel, torch.diagonal(kernel, dim1=1, dim2=2), 6)[0].tolist()
    assert len(set(picks)) == 6 and picks[:3] == log_det_greedy(kernel[0].numpy(), 3)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_cdpruner_selects_the_dpp_map_of_relevance_and_similarity(clip, clip_vision, clip_dir, sign):
    text = TextEncoder(*text_tower(clip_dir), 16)
    t = text.embed(["a photo of a cat"])
    x = pixels(6)
    _, hidden = reference_pass(clip_vision, x)
    method = CDPruner(5, sign, CLIP_VISION.joint_space(clip_vision))
    features, idx = select(clip_vision, "image-feature-extraction", method, 0, x, text_embeds=t)
    f = hidden[1][:, 1:]
    with torch.no_grad():
        projected = clip.visual_projection(clip.vision_model.post_layernorm(torch.from_numpy(f).float())).double()
    for b in range(len(x)):
        p = projected[b].numpy()
        cos = sign * (p / np.linalg.norm(p, axis=-1, keepdims=True)) @ (t[0].double().numpy() / t[0].norm().item())
        r = (cos - cos.min() + 1e-6) / (cos.max() - cos.min())
        np.testing.assert_array_equal(idx[b], sorted(log_det_greedy(dpp_kernel(f[b], r), 5)))
    np.testing.assert_allclose(features, gathered(f, idx), atol=1e-6)


def args(**kw):
    return CDPruner.Args(method="cdpruner", **{"prompt": "a photo of stripes", "text_len": 16, "keep": 4, **kw})


def test_args_need_a_prompt_and_a_known_sign():
    assert SELECTORS["cdpruner"] is CDPruner and (CDPruner.text_tower, CDPruner.inputs) == (True, ("text_embeds",))
    assert (args().relevance_sign, args().fuse, CDPruner.calibration_images) == ("paper", False, False)
    with pytest.raises(ValidationError, match="cdpruner needs the text"):
        CDPruner.Args(method="cdpruner", keep=4)
    with pytest.raises(ValidationError, match="relevance_sign"):
        args(relevance_sign="negated")


def test_validate_needs_clip_and_build_binds_the_prompt(vit, vit_dir, clip_vision, clip_dir):
    with pytest.raises(RecipeError, match="cdpruner scores patches in CLIP's image-text space") as e:
        CDPruner.validate(args(), ModelSpec(source=str(vit_dir), task="image-classification"), vit,
                          adapter_for("vit", "image-classification"), "s")
    assert e.value.field == "s.method"
    built = CDPruner.build(args(relevance_sign="released_code"), 4, Env(clip_vision, CLIP_VISION, 3,
                                                                        text_tower(clip_dir)))
    assert (built.method.k, built.method.sign) == (4, -1.0) and built.companions[0].file == TEXT_FILE
    torch.testing.assert_close(built.defaults["text_embeds"], built.companions[0].module.embed(["a photo of stripes"]))
