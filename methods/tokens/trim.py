"""TRIM (arXiv 2409.10994): patches projected into CLIP's joint space, scored against the text embedding.

Follows docs/methods/token-pruning.md §4. ``similarity_sign: paper`` (+1) keeps the patches most
similar to the text; ``released_code`` (-1) the least similar, as the released code does. The fused
token is TRIM's plain mean of the unselected patches, so ``fuse`` defaults on. K is ``keep``, or the
paper's per-image IQR count fixed at ``percentile`` over the calibration images (§4.3,
trim_iqr.py); both signs are reported there. CLIP's text tower is exported as its own graph
(text.py) whose embedding is an input of the vision graph, so one engine serves any prompt (§4.4).
Recipe: ``{type: token_prune, method: trim, layer: -2, output: true, prompt: 'a photo of a dog'}``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from .base import SELECTORS, Calibration, Selection
from .prompted import SIGNS, PromptArgs, Prompted
from .select import top_k_raster
from .trim_iqr import counts, fixed_k, summary


@SELECTORS.register
class Trim(Prompted):
    name = "trim"
    sign_field = "similarity_sign"
    calibration_images = True

    class Args(PromptArgs):
        calibrates_keep = True
        method: Literal["trim"]
        fuse: bool = True
        percentile: float = Field(default=90.0, gt=0, le=100)  # K = this percentile of the calibration counts
        similarity_sign: Literal["paper", "released_code"] = "paper"  # keep most (paper) or least similar

    def similarity(self, patches: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """[B, N]: raw dot product of each projected patch with the (unnormalised) text embedding."""
        projected = self.projection(self.norm(patches)).float()
        return torch.matmul(projected, text_embeds.float().unsqueeze(-1)).squeeze(-1)

    def select(self, tap):
        prob = torch.softmax(self.sign * self.similarity(tap.patches, tap.inputs["text_embeds"]), dim=-1)
        return Selection(top_k_raster(prob, self.k))

    @classmethod
    def calibrate(cls, args, env, probe, keep):
        """Both signs on the calibration images: IQR counts, the K each gives, fidelity to keeping every patch."""
        reference = cls.build(args, probe.patches, env)  # all N patches in raster order: the unpruned encoder
        embeds, joint = reference.defaults["text_embeds"], (reference.method.norm, reference.method.projection)
        sim, unpruned = probe.unpruned(reference, lambda patches: reference.method.similarity(patches, embeds))
        sim, metrics, rows = sim.numpy(), {}, []
        for name, sign in SIGNS.items():
            per_image = counts(sim, sign)
            k = keep if keep is not None else fixed_k(per_image, args.percentile, probe.patches)
            cosine = mean_cosine(unpruned, probe.outputs(replace(reference, method=cls(k, sign, joint))))
            used = name == args.similarity_sign
            metrics[name] = {"counts": summary(per_image, args.percentile), "keep": k, "mean_cosine": cosine,
                             "used": used}
            rows.append([name, "yes" if used else "no", *metrics[name]["counts"].values(), k, cosine])
        headers = ["sign", "used", *summary([0], args.percentile), "K", "mean cosine to all patches"]
        return Calibration(metrics[args.similarity_sign]["keep"], metrics,
                           "TRIM on the calibration images (IQR count per image, both signs)", headers, rows)


def mean_cosine(reference: np.ndarray, pruned: np.ndarray) -> float:
    """Mean cosine to keeping every patch; token sequences are compared by their mean token."""
    a, b = (torch.from_numpy(x.mean(axis=1) if x.ndim == 3 else x) for x in (reference, pruned))
    return round(float(F.cosine_similarity(a, b, dim=-1).mean()), 5)
