"""What the text-conditioned selectors share (TRIM, CDPruner): the prompt fields, the checks that the
checkpoint is a full CLIP model, the joint-space modules, and the prompt's embedding as the default
``text_embeds`` input with CLIP's text tower exported next to model.onnx (text.py,
docs/methods/token-pruning.md §4.4).

The text side is the model's own CLIP checkpoint, or the one the recipe names in ``text_tower``: a
vision-language model (LLaVA) has neither a text tower nor CLIP's visual projection, so it needs the
full CLIPModel its vision tower comes from. That folder is checked at plan time (a CLIP config, its
vision width equal to the pruned tower's, safetensors weights, a tokenizer; no code of its own runs).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, get_args

from pydantic import Field, field_validator
from torch import nn

from core.errors import RecipeError
from models.adapters import pretrained
from models.loading import model_config, resolve_source
from tasks import TASKS

from .base import Build, Method, SelectorArgs
from .text import TEXT_FILE, TEXT_TOKENIZER, Companion, TextEncoder

SIGNS = {"paper": 1.0, "released_code": -1.0}  # +1: favour the patches most similar to the text; -1: least


class PromptArgs(SelectorArgs):
    """A selector's recipe fields when it scores patches against a prompt's CLIP text embedding."""

    path_fields: ClassVar[tuple[str, ...]] = ("text_tower",)  # relative to the recipe's folder (pipeline/recipe.py)

    prompt: str | None = Field(default=None, validate_default=True)  # the text the patches are scored against
    text_len: int = Field(default=77, ge=2, le=4096)  # static token length of the text graph
    # folder of the full CLIPModel (and tokenizer) whose text tower and joint space score the patches; required
    # for a VLM (its vision tower must be this checkpoint's), default: the model's own checkpoint
    text_tower: str | None = Field(default=None, min_length=1)

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
        """A full CLIP checkpoint for the text side, whose text tower fits ``text_len``: ``text_tower``, or the
        model's own (a CLIP vision tower with its projection)."""
        if args.text_tower is not None:
            text = text_checkpoint(args.text_tower, _vision_width(model), f"{field}.text_tower")
        elif adapter.projects_image_tokens:
            raise RecipeError(f"{cls.name} scores patches in CLIP's image-text space, and a vision-language model "
                              "has neither CLIP's text tower nor its visual projection: set text_tower to the folder "
                              "of the full CLIPModel (with its tokenizer) whose vision tower this model uses",
                              field=f"{field}.text_tower")
        else:
            text = _own_text_tower(cls.name, spec, model, adapter, field)
        if args.text_len > text.max_position_embeddings:
            raise RecipeError(f"text_len {args.text_len} is longer than the text tower's "
                              f"{text.max_position_embeddings} positions", field=f"{field}.text_len")

    @classmethod
    def text_source(cls, args):
        return args.text_tower

    @classmethod
    def build(cls, args, k, env):
        """The prompt's embedding is the default ``text_embeds`` input; the text tower a graph next to model.onnx."""
        text = TextEncoder(*env.text, args.text_len)
        ids = text.ids([args.prompt]).expand(env.batch, -1)
        method = cls(k, SIGNS[getattr(args, cls.sign_field)], env.joint or env.adapter.joint_space(env.model))
        companion = Companion(TEXT_FILE, text, (ids,), ((TEXT_TOKENIZER, text.tokenizer),))
        return Build(method, {"text_embeds": text.embed([args.prompt])}, (companion,))


def _own_text_tower(name: str, spec, model, adapter, field: str):
    """The text tower's config of the model's own checkpoint, which must be a full CLIPModel."""
    if adapter.joint_space(model) is None:
        raise RecipeError(f"{name} scores patches in CLIP's image-text space: it needs a CLIP vision "
                          "tower with its projection (task image-feature-extraction on a CLIP model)",
                          field=f"{field}.method")
    source = resolve_source(spec)
    if source.model_type != "clip":
        raise RecipeError(f"{name} needs CLIP's text tower, and {spec.source!r} is a "
                          f"{source.model_type!r} checkpoint: give a full CLIPModel", field=f"{field}.method")
    return model_config(spec, source, TASKS["feature-extraction"])


def _vision_width(model: nn.Module) -> int:
    """The hidden size of the pruned vision tower (a VLM's ``vision_config``, or the encoder's own)."""
    config = pretrained(model).config
    return getattr(config, "vision_config", config).hidden_size


def text_checkpoint(folder: str, width: int, field: str):
    """The text config of ``folder``, a full CLIPModel saved with its tokenizer whose vision tower is ``width``
    wide; one line naming ``field`` otherwise. Reads config and tokenizer files only (no remote code)."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(folder).expanduser()
    fix = "give the folder of a full CLIPModel saved with save_pretrained, with its tokenizer"
    if not (path / "config.json").is_file():
        raise RecipeError(f"{folder!r} is not a model folder (no config.json): {fix}", field=field)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # unreadable JSON, unknown model_type: each means the same here
        raise RecipeError(f"{folder!r} has no readable config ({type(e).__name__}): {fix}", field=field) from None
    if config.model_type != "clip":
        raise RecipeError(f"{folder!r} is a {config.model_type!r} checkpoint, not a full CLIPModel (text and vision "
                          f"towers, model_type 'clip'): {fix}", field=field)
    if not any(path.glob("*.safetensors")):
        raise RecipeError(f"{folder!r} has no .safetensors weights; only safetensors are loaded", field=field)
    if config.vision_config.hidden_size != width:
        raise RecipeError(f"the vision tower of {folder!r} is {config.vision_config.hidden_size} wide and the pruned "
                          f"one {width}: name the CLIP checkpoint whose vision tower this model uses", field=field)
    no_tokenizer = RecipeError(f"{folder!r} has no usable tokenizer: save the CLIP checkpoint's tokenizer into the "
                               "folder (tokenizer.save_pretrained)", field=field)
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise no_tokenizer  # without its files transformers would build an empty tokenizer
    try:
        AutoTokenizer.from_pretrained(path)
    except Exception:  # broken tokenizer files
        raise no_tokenizer from None
    return config.text_config
