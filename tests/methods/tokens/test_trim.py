"""TRIM: the selection against a hand-computed joint-space score, its recipe fields and checks, what it
builds (text input, text graph), and its calibration of K on a stand-in probe."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from core.errors import RecipeError
from methods.tokens import SELECTORS
from methods.tokens.base import Env
from methods.tokens.text import TEXT_FILE, TextEncoder
from methods.tokens.trim import SIGNS, Trim
from methods.tokens.trim_iqr import counts, fixed_k, softmax
from models.adapters import adapter_for
from models.spec import ModelSpec

from .conftest import PATCHES, gathered, pixels, reference_pass, select, text_tower, top_k_sorted

CLIP_VISION = adapter_for("clip", "image-feature-extraction")


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_trim_scores_projected_patches_against_the_text(clip, clip_vision, clip_dir, sign):
    text = TextEncoder(*text_tower(clip_dir), 16)
    t = text.embed(["a photo of a cat"])
    with torch.no_grad():
        torch.testing.assert_close(t, clip.get_text_features(input_ids=text.ids(["a photo of a cat"])).pooler_output)
    x = pixels(5)
    _, hidden = reference_pass(clip_vision, x)
    method = Trim(6, sign, CLIP_VISION.joint_space(clip_vision))
    features, idx = select(clip_vision, "image-feature-extraction", method, 0, x, fuse=True, text_embeds=t)
    f = hidden[1][:, 1:]
    ln = clip.vision_model.post_layernorm
    with torch.no_grad():
        projected = clip.visual_projection(ln(torch.from_numpy(f).float())).double().numpy()
    s = projected @ t.double().numpy()[0]
    p = softmax(sign * s)
    want = top_k_sorted(p, 6)
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_allclose(features[:, :6], gathered(f, want), atol=1e-6)
    for b in range(2):
        rest = np.setdiff1d(np.arange(PATCHES), want[b])
        np.testing.assert_allclose(features[b, 6], f[b, rest].mean(axis=0), atol=1e-6)


def args(**kw):
    return Trim.Args(method="trim", **{"prompt": "a photo of stripes", "text_len": 16, **kw})


def test_args_calibrate_keep_fuse_by_default_and_need_a_prompt():
    assert SELECTORS["trim"] is Trim and (Trim.calibration_images, Trim.text_tower, Trim.inputs) == (
        True, True, ("text_embeds",))
    a = args()
    assert (a.keep, a.fuse, a.percentile, a.similarity_sign) == (None, True, 90.0, "paper")
    with pytest.raises(ValidationError, match="trim needs the text"):
        Trim.Args(method="trim")
    with pytest.raises(ValidationError, match="greater than 0"):
        args(percentile=0)


def test_validate_needs_a_clip_vision_tower_and_a_text_tower_long_enough(vit, clip_vision, clip_dir, vit_dir):
    spec = ModelSpec(source=str(clip_dir), task="image-feature-extraction")
    Trim.validate(args(), spec, clip_vision, CLIP_VISION, "s")
    with pytest.raises(RecipeError, match="positions") as e:
        Trim.validate(args(text_len=129), spec, clip_vision, CLIP_VISION, "s")
    assert e.value.field == "s.text_len"
    vit_spec = ModelSpec(source=str(vit_dir), task="image-classification")
    with pytest.raises(RecipeError, match="CLIP vision tower") as e:
        Trim.validate(args(), vit_spec, vit, adapter_for("vit", "image-classification"), "s")
    assert e.value.field == "s.method"
    Trim.validate(args(text_tower=str(clip_dir)), spec, clip_vision, CLIP_VISION, "s")  # a named checkpoint
    with pytest.raises(RecipeError, match="not a model folder") as e:
        Trim.validate(args(text_tower=str(vit_dir / "nothing")), spec, clip_vision, CLIP_VISION, "s")
    assert e.value.field == "s.text_tower"
    assert (Trim.text_source(args()), Trim.text_source(args(text_tower="c"))) == (None, "c")


@pytest.fixture(scope="module")
def env(clip_vision, clip_dir):
    return Env(clip_vision, CLIP_VISION, batch=3, text=text_tower(clip_dir))


def test_build_binds_the_prompt_embedding_and_the_text_graph(env):
    built = Trim.build(args(similarity_sign="released_code"), 5, env)
    assert (built.method.k, built.method.sign) == (5, -1.0)
    text = built.companions[0]
    assert text.file == TEXT_FILE and text.example[0].shape == (3, 16)
    torch.testing.assert_close(built.defaults["text_embeds"], text.module.embed(["a photo of stripes"]))
    assert text.assets == (("text_tokenizer", text.module.tokenizer),)
    joint = (torch.nn.Identity(), torch.nn.Linear(32, 16))  # another checkpoint's joint space, when the stage gave one
    other = Trim.build(args(), 5, replace(env, joint=joint)).method
    assert (other.norm, other.projection) == joint


class StandInProbe:
    """Fixed patch tokens as the block output; task outputs that agree with the unpruned ones for sign +1 only."""

    patches = PATCHES

    def __init__(self, tokens: torch.Tensor):
        self.tokens, self.reference, self.installed = tokens, np.ones((len(tokens), 4), np.float32), []

    def unpruned(self, build, capture):
        assert build.method.k == PATCHES
        return torch.cat([capture(t) for t in self.tokens.split(2)]), self.reference

    def outputs(self, build):
        self.installed.append((build.method.k, build.method.sign))
        return self.reference * build.method.sign


@pytest.mark.parametrize("keep", [None, 3])
def test_calibrate_fixes_k_per_sign_from_the_iqr_counts(env, keep):
    tokens = torch.randn(6, PATCHES, 32, generator=torch.Generator().manual_seed(7))
    built = Trim.build(args(), PATCHES, env)
    with torch.no_grad():
        sim = built.method.similarity(tokens, built.defaults["text_embeds"]).numpy()
        probe = StandInProbe(tokens)
        cal = Trim.calibrate(args(percentile=75), env, probe, keep)
    want = {name: keep or fixed_k(counts(sim, sign), 75, PATCHES) for name, sign in SIGNS.items()}
    assert {name: m["keep"] for name, m in cal.metrics.items()} == want and cal.keep == want["paper"]
    assert probe.installed == [(want["paper"], 1.0), (want["released_code"], -1.0)]
    assert [m["mean_cosine"] for m in cal.metrics.values()] == [1.0, -1.0]
    assert [m["used"] for m in cal.metrics.values()] == [True, False]
    assert cal.headers[-2:] == ["K", "mean cosine to all patches"] and cal.headers[2:-2] == list(
        cal.metrics["paper"]["counts"]) and [r[:2] for r in cal.rows] == [["paper", "yes"], ["released_code", "no"]]
