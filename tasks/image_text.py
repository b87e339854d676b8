"""image-text-to-text: a LLaVA-style VLM answering a question about an image.

The image's patch features at LLaVA's ``vision_feature_layer`` ([CLS] dropped by the ``default``
select strategy) go through the projector and replace the image placeholder tokens of the prompt,
one feature per placeholder, and the language model reads the result. The prompt is K placeholders
then the question, where K is what the vision side yields: every patch, or the K a token_prune stage
keeps at the feature layer (it selects before the projector, as LLaVA's pruning methods do). Data
batches are built once for the unpruned K = N (``[N image][question][pad]``);
`graph_inputs` rewrites them for the model at hand to ``[N-K pad][K image][question][pad]``, so the
question sits at the same positions whatever K and the quality metrics compare those positions.
RoPE sees only position differences, so the left padding changes nothing the real tokens compute;
the logits at padding are zeroed.

Quality against dense: top-1 agreement over the question's positions and ``answer_match``, the
share of samples whose greedy first answer token (the prediction at the question's last token) is
the dense model's.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calibration.batches import Batch, Batches, first_images, random_images
from calibration.sources import load_images
from core.errors import RecipeError
from models.adapters import pretrained
from models.spec import ModelSpec

from .base import HeldOut, ImageTask, logits_kl
from .chat import chat_prompt_ids
from .metrics import Run

# Questions paired with the images in turn (easy-VQA's kinds: shape, colour, yes/no); calibration
# and evaluation folders hold images only.
QUESTIONS = ("What shape is in the image?", "What color is the shape?", "Does the image contain a circle?")
TOKEN_PRUNER = "token_pruner"  # tasks/model.py's name for it; importing that would cycle (model.py -> registry -> here)


def feature_block(config) -> int:
    """The vision block whose output LLaVA reads: hidden_states[f] is block f-1's output."""
    layers = config.vision_config.num_hidden_layers
    f = config.vision_feature_layer
    if not isinstance(f, int):
        raise RecipeError(f"vision_feature_layer {f!r} concatenates several layers; one layer is supported",
                          field="model.source")
    block = f - 1 if f >= 0 else layers + f
    if not 0 <= block < layers:
        raise RecipeError(f"vision_feature_layer {f} reads no vision block (the embeddings); one block's output "
                          "is needed", field="model.source")
    return block


def image_count(model: nn.Module) -> int:
    """How many image tokens the language model reads: the pruner's K (+ fused), else every patch (+ [CLS]
    under the ``full`` select strategy)."""
    pruner = model.__dict__.get(TOKEN_PRUNER)
    if pruner is not None:
        return pruner.tokens_out
    cfg = pretrained(model).config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    return side * side + int(cfg.vision_feature_select_strategy == "full")


def image_tokens(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """[B, K, hidden]: the projected image tokens the language model reads."""
    cfg = pretrained(model).config
    hidden = model.get_submodule("model.vision_tower")(pixel_values, output_hidden_states=True).hidden_states
    pruner = model.__dict__.get(TOKEN_PRUNER)
    if pruner is not None:  # its hook at the feature block selected K patches during the tower's pass
        features = pruner.features
    else:
        features = hidden[cfg.vision_feature_layer]
        features = features[:, 1:] if cfg.vision_feature_select_strategy == "default" else features
    return model.get_submodule("model.multi_modal_projector")(features)


def processor_image_count(processor, pixel_values: torch.Tensor) -> int:
    """N image tokens for images of this size, as LlavaProcessor counts them (patches, + [CLS] unless dropped)."""
    patch = getattr(processor, "patch_size", None)
    if not patch:
        raise RecipeError("the processor does not record the vision patch_size (processor_config.json); save the "
                          "checkpoint's LlavaProcessor with patch_size set", field="model.source")
    h, w = pixel_values.shape[-2:]
    extra = getattr(processor, "num_additional_image_tokens", 0) or 0
    return (h // patch) * (w // patch) + extra - (processor.vision_feature_select_strategy == "default")


def splice(model: nn.Module, input_ids: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """The prompt's embeddings with the i-th placeholder of each row replaced by image token i.

    Gather and Where only (no scatter, static shapes): what TensorRT parses."""
    image_id = pretrained(model).config.image_token_id
    mask = torch.eq(input_ids, image_id)
    if not torch.compiler.is_compiling():
        found = mask.sum(1)
        if not bool((found == images.shape[1]).all()):
            raise RecipeError(f"the prompt holds {found.tolist()} image tokens (id {image_id}) and "
                              f"the vision side gives {images.shape[1]}: build it with one placeholder per image "
                              "token (tasks/image_text.py prompt_ids)", field="input_ids")
    text = pretrained(model).get_input_embeddings()(input_ids)
    slot = (mask.long().cumsum(1) - 1).clamp_min(0)
    picked = images.to(text.dtype).gather(1, slot.unsqueeze(-1).expand(-1, -1, text.shape[-1]))
    return torch.where(mask.unsqueeze(-1), picked, text)


def prompt_ids(tokenizer, question: str, image_token_id: int, k: int) -> list[int]:
    """K placeholders, then the question (through the chat template when the tokenizer has one)."""
    return [image_token_id] * k + chat_prompt_ids(tokenizer, question, raw=False)


class ImageTextToText(ImageTask):
    name = "image-text-to-text"
    input_names: ClassVar[tuple[str, ...]] = ("pixel_values", "input_ids", "attention_mask")
    output_names = ("logits",)
    reads_pruned_tokens = True
    generates = True  # export.decoder: vision graph + prefill/decode graphs (tasks/image_decoder.py)
    accept_metrics = {"min_token_agreement": "token_agreement", "min_answer_match": "answer_match"}

    def auto_class(self, model_type: str) -> type[Any]:
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText

    def preprocessor(self, where: str | Path, **kw) -> object:
        """The processor (tokenizer and image processor together)."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(where, **kw)

    def check_checkpoint(self, model: nn.Module, folder: Path) -> None:
        """The saved processor must know the patch size and name the model's image placeholder."""
        processor = self.preprocessor(folder)
        if not getattr(processor, "patch_size", None):
            raise RecipeError(f"'{folder}' has no processor with the vision patch_size (processor_config.json): save "
                              "the model's LlavaProcessor with patch_size set", field="model.source")
        want = pretrained(model).config.image_token_id
        if getattr(processor, "image_token_id", None) != want:
            raise RecipeError(f"the processor's image token is id {getattr(processor, 'image_token_id', None)} and the "
                              f"model's image_token_id is {want}: save the processor with the model's image token",
                              field="model.source")

    def calibration_batches(self, preprocessor, spec, field: str = "calibration",
                            image_size: int | None = None) -> Batches:
        return self._with_prompts(preprocessor, self.calibration_images(preprocessor, spec, field, image_size),
                                  spec.seq_len, field)

    def calibration_images(self, preprocessor, spec, field: str = "calibration",
                           image_size: int | None = None) -> Batches:
        """The calibration images alone (``pixel_values``): what the export traces the vision graph on, whatever
        prompt window the decoder graphs get."""
        return random_images(preprocessor.image_processor, load_images(spec, field), spec, image_size)

    def evaluation_batches(self, preprocessor, spec, batch_size: int, seq_len: int,
                           image_size: int | None = None, field: str = "evaluation") -> Batches:
        images = first_images(preprocessor.image_processor, load_images(spec, field), spec.num_samples, batch_size,
                              image_size)
        return self._with_prompts(preprocessor, images, seq_len, field)

    def _with_prompts(self, processor, images: Batches, seq_len: int, field: str) -> Batches:
        """Each image with the next question of `QUESTIONS` behind the unpruned N placeholders, right-padded:
        the layout the transformers model reads natively (calibration runs it as it is)."""
        questions = itertools.cycle(QUESTIONS)
        pad = processor.tokenizer.pad_token_id or 0
        out = []
        for b in images:
            n = processor_image_count(processor, b.inputs["pixel_values"])
            rows = [prompt_ids(processor.tokenizer, next(questions), processor.image_token_id, n)
                    for _ in range(b.size)]
            longest = max(map(len, rows))
            if longest > seq_len:
                raise RecipeError(f"a prompt is {longest} tokens ({n} image tokens and the question); seq_len must "
                                  "be at least that", field=f"{field}.seq_len")
            ids = torch.full((b.size, seq_len), pad)
            mask = torch.zeros(b.size, seq_len, dtype=torch.long)
            for i, row in enumerate(rows):
                ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
            out.append(Batch({**b.inputs, "input_ids": ids, "attention_mask": mask}, b.labels))
        return Batches(out, images.origin, {**images.protocol, "questions": list(QUESTIONS)})

    def graph_inputs(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Batches built for N image tokens, rewritten for the K this model reads (see the module docstring)."""
        drop = _placeholders(model, inputs["input_ids"]) - image_count(model)
        if drop < 0:
            raise RecipeError(f"the prompt holds fewer image tokens than the {image_count(model)} the model reads",
                              field="input_ids")
        if drop == 0:
            return inputs
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        image_id = pretrained(model).config.image_token_id
        image = torch.eq(ids, image_id)
        first = image.long().argmax(1, keepdim=True)  # the run of placeholders starts here in every row
        gone = (torch.arange(ids.shape[1]) >= first) & (torch.arange(ids.shape[1]) < first + drop) & image
        pad = int(image_id == 0)  # any id but the placeholder's: the mask hides it
        return {**inputs, "attention_mask": torch.where(gone, 0, mask), "input_ids": torch.where(gone, pad, ids)}

    def forward(self, model: nn.Module, inputs: dict[str, torch.Tensor], spec: ModelSpec) -> tuple[torch.Tensor]:
        """Logits [B, S, V], zero at padding: a query that sees no key (a left pad) computes nothing defined,
        and runtimes fill it differently."""
        embeds = splice(model, inputs["input_ids"], image_tokens(model, inputs["pixel_values"]))
        mask = inputs["attention_mask"]
        logits = model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits
        return (torch.where(mask.bool().unsqueeze(-1), logits, 0.0),)

    def gradient_loss(self, model: nn.Module, spec: ModelSpec, inputs: dict[str, torch.Tensor],
                      labels: torch.Tensor | None) -> torch.Tensor:
        """Mean next-token cross-entropy over each prompt's question tokens, summed over samples."""
        logits = self.forward(model, inputs, spec)[0][:, :-1].float()
        target = inputs["input_ids"][:, 1:]
        real = (inputs["attention_mask"][:, 1:] * torch.ne(target, pretrained(model).config.image_token_id)).float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
        return ((ce.view(target.shape) * real).sum(1) / real.sum(1).clamp_min(1)).sum()

    def distill_loss(self, student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...],
                     inputs: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
        return logits_kl(student[0], teacher[0], temperature)

    def quality(self, dense: Run, compressed: Run, held_out: HeldOut) -> dict:
        agree = count = match = samples = 0
        for b in held_out.batches:
            text = _question_positions(b.inputs)
            ref, got = dense(b.inputs)[0].argmax(-1), compressed(b.inputs)[0].argmax(-1)
            same = ref == got
            agree, count = agree + int(same[text].sum()), count + int(text.sum())
            last = text.shape[1] - 1 - np.argmax(text[:, ::-1], axis=1)
            match += int(same[np.arange(len(last)), last].sum())
            samples += len(last)
        return {"dense": {}, "compressed": {},
                "comparison": {"token_agreement": round(agree / count, 4), "answer_match": round(match / samples, 4),
                               "samples": samples}}


def _placeholders(model: nn.Module, input_ids: torch.Tensor) -> int:
    """The image tokens in each row of a batch (one count for all rows, or a one-line error)."""
    counts = torch.eq(input_ids, pretrained(model).config.image_token_id).sum(1).unique()
    if len(counts) != 1:
        raise RecipeError(f"the rows of a batch hold different numbers of image tokens ({counts.tolist()})",
                          field="input_ids")
    return int(counts[0])


def _question_positions(inputs: dict[str, torch.Tensor]) -> np.ndarray:
    """[B, S] bool: the real text tokens of the N-placeholder layout (the same positions after any K)."""
    mask = inputs["attention_mask"].bool()
    return (mask & (inputs["input_ids"] != _image_id(inputs))).numpy()


def _image_id(inputs: dict[str, torch.Tensor]) -> int:
    """The placeholder id: the first token of every row (prompts start with their image tokens)."""
    return int(inputs["input_ids"][0, 0])
