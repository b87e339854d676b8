"""What the text-conditioned selectors share (TRIM, CDPruner): the prompt fields, the checks that the
checkpoint is a full CLIP model, the joint-space modules, and the prompt's embedding as the default
``text_embeds`` input with CLIP's text tower exported next to model.onnx (text.py,
docs/methods/token-pruning.md §4.4)."""

from __future__ import annotations

from typing import ClassVar, get_args

from pydantic import Field, field_validator
from torch import nn

from core.errors import RecipeError
from models.loading import model_config, resolve_source
from tasks import TASKS

from .base import Build, Method, SelectorArgs
from .text import TEXT_FILE, Companion, TextEncoder

SIGNS = {"paper": 1.0, "released_code": -1.0}  # +1: favour the patches most similar to the text; -1: least


class PromptArgs(SelectorArgs):
    """A selector's recipe fields when it scores patches against a prompt's CLIP text embedding."""

    prompt: str | None = Field(default=None, validate_default=True)  # the text the patches are scored against
    text_len: int = Field(default=77, ge=2, le=4096)  # static token length of the text graph

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if not v:
            name = get_args(cls.model_fields["method"].annotation)[0]
            raise ValueError(f"{name} needs the text the image tokens are scored against "
                             "(e.g. prompt: 'a photo of a dog')")
        return v


class Prompted(Method):
    """A selector that scores ``text_embeds`` against the patches projected into CLIP's joint space, with a sign
    option (papers and released code disagree): the recipe field named by ``sign_field`` picks +1 or -1."""

    inputs = ("text_embeds",)
    text_tower = True
    sign_field: ClassVar[str]

    def __init__(self, k: int, sign: float, joint: tuple[nn.Module, nn.Module]):
        super().__init__(k)
        self.sign, self.norm, self.projection = sign, *joint

    @classmethod
    def validate(cls, args, spec, model, adapter, field):
        """A CLIP vision tower with its projection, from a full CLIPModel whose text tower fits ``text_len``."""
        if adapter.joint_space(model) is None:
            raise RecipeError(f"{cls.name} scores patches in CLIP's image-text space: it needs a CLIP vision "
                              "tower with its projection (task image-feature-extraction on a CLIP model)",
                              field=f"{field}.method")
        source = resolve_source(spec)
        if source.model_type != "clip":
            raise RecipeError(f"{cls.name} needs CLIP's text tower, and {spec.source!r} is a "
                              f"{source.model_type!r} checkpoint: give a full CLIPModel", field=f"{field}.method")
        text = model_config(spec, source, TASKS["feature-extraction"])
        if args.text_len > text.max_position_embeddings:
            raise RecipeError(f"text_len {args.text_len} is longer than the text tower's "
                              f"{text.max_position_embeddings} positions", field=f"{field}.text_len")

    @classmethod
    def build(cls, args, k, env):
        """The prompt's embedding is the default ``text_embeds`` input; the text tower a graph next to model.onnx."""
        text = TextEncoder(*env.text, args.text_len)
        ids = text.ids([args.prompt]).expand(env.batch, -1)
        method = cls(k, SIGNS[getattr(args, cls.sign_field)], env.adapter.joint_space(env.model))
        return Build(method, {"text_embeds": text.embed([args.prompt])}, (Companion(TEXT_FILE, text, (ids,)),))
