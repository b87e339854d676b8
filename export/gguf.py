"""GGUF for llama.cpp: a Llama-architecture causal LM and its byte-level BPE tokenizer, written with `gguf`.

Everything about the file format is the `gguf` package's (GGUFWriter, the tensor-name map, the
block quantizers); this module decides what goes in (docs/methods/deployment.md, "GGUF"):

- **Shapes.** llama.cpp's ``llama`` architecture reads one head count, KV-head count and MLP
  width for all layers, so every block must have the same shape (a UL structure over every
  block). ``head_dim`` is written as the key/value length and the rotary width, since after head
  pruning hidden / heads no longer gives it.
- **Q/K rows.** transformers' Llama rotates the two halves of each head's dimensions (rotate-half);
  llama.cpp's ``llama`` kernels rotate adjacent pairs. Each head's rows of q_proj and k_proj (and
  biases) are reordered so that pair i is (row i, row i + head_dim/2): interleaving the two halves.
- **Biases.** llama.cpp loads optional biases on every Llama projection, so FLAP's compensation
  biases on o_proj and down_proj are written as they are.
- **Types.** ``f16``: matrices in F16, vectors (norms, biases) in F32, as llama.cpp's converter
  does. ``q8_0``: matrices in Q8_0. ``q4_0``/``q4_1``: the block projections in Q4_0/Q4_1 and the
  embedding (also the output, when tied) in Q8_0, as llama.cpp's quantizer keeps the logits'
  matrix at higher precision. A matrix whose rows are not a multiple of 32 stays F16.
- **Tokenizer.** tokens by id (padding ids up to the model's vocabulary size as unused),
  token types (special added tokens as control), merges, special ids, whether BOS/EOS are added
  (read from what the tokenizer does), the chat template, and the pre-tokenizer's llama.cpp name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import gguf
import numpy as np
import torch
from torch import nn

from core.errors import RecipeError
from models.adapters import Adapter, pretrained

GgufType = Literal["f16", "q8_0", "q4_0", "q4_1"]
ARCHITECTURES = ("llama",)  # transformers model_types written, each as llama.cpp's architecture of that name

_FILE_TYPES = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
               "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}
# Pre-tokenizer steps (as tokenizers serialises them) that pre_tokenizer_name recognises.
_GPT2_BYTES = {"type": "ByteLevel", "use_regex": True}
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class Written:
    path: Path
    bytes: int
    tensor_types: dict[str, int]  # GGML type name -> how many tensors have it


def check_model(model: nn.Module, adapter: Adapter, field: str) -> None:
    """Refuse what llama.cpp's ``llama`` architecture cannot describe: another family, a rope scaling,
    or layers of different shapes."""
    config = pretrained(model).config
    if config.model_type not in ARCHITECTURES:
        raise RecipeError(f"GGUF export supports {', '.join(ARCHITECTURES)} models, not {config.model_type!r}",
                          field=field)
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise RecipeError(f"rope type {rope['rope_type']!r} is not written to GGUF here; only the default rotary "
                          "embedding is", field=field)
    shapes = {(b.num_heads, b.num_kv_heads, b.intermediate_size) for b in adapter.blocks(model)}
    if len(shapes) > 1:
        raise RecipeError("GGUF's llama architecture needs every layer the same shape, and these differ "
                          f"({sorted(shapes)}): prune with structure UL-UM or UL-MM over every block "
                          "(plain_checkpoint: true checks it up front)", field=field)


def write(model: nn.Module, tokenizer, adapter: Adapter, path: Path, kind: GgufType, name: str) -> Written:
    """Write ``model`` (fp32, uniform blocks) and ``tokenizer`` to ``path`` as GGUF of ``kind``."""
    hf = pretrained(model)
    config = hf.config
    block = adapter.blocks(model)[0]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_file_type(_FILE_TYPES[kind])
    if kind != "f16":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(block.intermediate_size)
    writer.add_head_count(block.num_heads)
    writer.add_head_count_kv(block.num_kv_heads)
    writer.add_key_length(block.head_dim)
    writer.add_value_length(block.head_dim)
    writer.add_rope_dimension_count(block.head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    add_tokenizer(writer, tokenizer, config.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    types: dict[str, int] = {}
    for hf_name, tensor in _tensors(hf, block.head_dim):
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"no GGUF name for {hf_name}")
        data, qtype = _encode(tensor, _target_type(kind, gguf_name, tensor))
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
        types[qtype.name] = types.get(qtype.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Written(path, path.stat().st_size, dict(sorted(types.items())))


def _tensors(hf, head_dim: int):
    """(transformers name, fp32 tensor) in llama.cpp's row order; the tied output matrix is left out."""
    config = hf.config
    for name, tensor in hf.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if ".self_attn.q_proj." in name or ".self_attn.k_proj." in name:
            tensor = interleave_halves(tensor, head_dim)
        yield name, tensor.detach().float()


def interleave_halves(rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Within each head's ``head_dim`` rows, put row i + head_dim/2 right after row i (for
    rotate-half weights read by a kernel that rotates adjacent pairs)."""
    heads = rows.shape[0] // head_dim
    split = rows.reshape(heads, 2, head_dim // 2, *rows.shape[1:])
    return split.transpose(1, 2).reshape(rows.shape)


def _target_type(kind: GgufType, name: str, tensor: torch.Tensor) -> gguf.GGMLQuantizationType:
    t = gguf.GGMLQuantizationType
    if tensor.dim() == 1:
        return t.F32
    if kind == "f16" or tensor.shape[-1] % 32:
        return t.F16
    if kind == "q8_0" or name in ("token_embd.weight", "output.weight"):
        return t.Q8_0
    return {"q4_0": t.Q4_0, "q4_1": t.Q4_1}[kind]


def _encode(tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """The tensor's data in ``qtype`` (the `gguf` package's quantizers for the block types)."""
    t = gguf.GGMLQuantizationType
    array = tensor.numpy()
    if qtype == t.F32:
        return array.astype(np.float32), qtype
    if qtype == t.F16:
        return array.astype(np.float16), qtype
    return gguf.quants.quantize(array.astype(np.float32), qtype), qtype


def add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """Write a byte-level BPE tokenizer as llama.cpp's ``gpt2`` tokenizer model."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model["type"] != "BPE" or spec.get("decoder", {}).get("type") != "ByteLevel":
        raise RecipeError(f"GGUF export writes byte-level BPE tokenizers; this one is {model['type']} with a "
                          f"{(spec.get('decoder') or {}).get('type')} decoder", field="model.source")
    by_id = {i: tok for tok, i in model["vocab"].items()}
    added = {t["id"]: t for t in spec["added_tokens"]}
    by_id.update({i: t["content"] for i, t in added.items()})
    types = gguf.TokenType
    tokens, kinds = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            kinds.append(types.UNUSED)
        else:
            tokens.append(by_id[i])
            kinds.append(types.NORMAL if i not in added else types.CONTROL if added[i]["special"] else types.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(kinds)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    for token, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                       ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{token}_token_id", None)
        if token_id is not None:
            add(token_id)
    ids = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id])
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and ids[-1:] == [tokenizer.eos_token_id])
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for how ``pre`` splits text before BPE (the splits it knows by name)."""
    steps = pre.get("pretokenizers", []) if pre and pre["type"] == "Sequence" else [pre] if pre else []
    if len(steps) == 1 and _is(steps[0], _GPT2_BYTES):
        return "gpt-2"
    if len(steps) == 2 and _is(steps[0], {"type": "Digits", "individual_digits": True}) and _is(steps[1], _GPT2_BYTES):
        return "smollm"  # SmolLM's: every digit alone, then GPT-2's split
    if (len(steps) == 2 and steps[0]["type"] == "Split" and steps[0]["pattern"].get("Regex") == LLAMA3_SPLIT
            and _is(steps[1], {"type": "ByteLevel", "use_regex": False})):
        return "llama-bpe"
    raise RecipeError(f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:160]}) has no llama.cpp name known here "
                      "(known: GPT-2's byte-level split, SmolLM's, Llama 3's)", field="model.source")


def _is(step: dict, expected: dict) -> bool:
    return all(step.get(k) == v for k, v in expected.items())




def load_back(path: Path) -> nn.Module:
    """The fp32 model transformers' GGUF loader builds from ``path``, as llama.cpp runs the file.

    transformers' Llama config takes no bias flags from GGUF metadata, so they are set from the
    bias tensors the file holds (a flag adds the biases of its whole group), and the biases of the
    group the file lacks are zeros, as llama.cpp leaves them out.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    names = {t.name for t in gguf.GGUFReader(path).tensors}
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    config.attention_bias = any(n.endswith(".bias") and ".attn_" in n for n in names)
    config.mlp_bias = any(n.endswith(".bias") and ".ffn_" in n for n in names)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config,
                                                 dtype=torch.float32).eval()
    mapping = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias") and mapping.get_name(name, try_suffixes=(".bias",)) not in names:
                param.zero_()
    return model


@torch.no_grad()
def compare(model: nn.Module, back: nn.Module, batches: list[torch.Tensor]) -> dict:
    """Logits of the file (as loaded back) against the PyTorch model's on the same token ids: the largest
    absolute error, that error relative to the largest logit, top-1 agreement and mean KL(model || file)."""
    worst = peak = kl = agree = 0.0
    tokens = 0
    for ids in batches:
        ref, got = model(input_ids=ids).logits.float(), back(input_ids=ids).logits.float()
        worst, peak = max(worst, float((got - ref).abs().max())), max(peak, float(ref.abs().max()))
        p = ref.log_softmax(-1)
        kl += float((p.exp() * (p - got.log_softmax(-1))).sum(-1).sum())
        agree += float((ref.argmax(-1) == got.argmax(-1)).sum())
        tokens += ids.numel()
    return {"tokens": tokens, "max_abs_err": worst, "max_rel_err": worst / peak, "top1_agreement": agree / tokens,
            "mean_kl": kl / tokens}
