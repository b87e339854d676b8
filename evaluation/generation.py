"""Text generation through a decoder's two graphs in ONNX Runtime: the loop, its timing, its agreement.

`OrtDecoder` runs the prefill graph (model.onnx) over the prompt and then the decode graph
(decode.onnx) once per new token, each call's present caches becoming the next call's past: the
loop any runtime with a static KV cache runs. A prompt shorter than the prefill length is padded on
the right: the padded slots are overwritten one by one by the decode steps, and the mask never
lets a query see a slot past its own position. A longer prompt goes through the prefill graph in
chunks, the last one moved back to end inside the cache (its leading slots are rewritten with the
values they already hold). Time to first token is prompt in to first token out; decode speed counts
every later token.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export import onnx as onnx_export
from export.decoder import DECODE


@dataclass
class Generation:
    prompt: list[int]
    tokens: list[int]  # the new tokens (an end-of-sequence token that stopped it included)
    first_token_s: float  # prompt in, first new token out
    decode_s: float  # every token after the first

    @property
    def tokens_per_s(self) -> float | None:
        return (len(self.tokens) - 1) / self.decode_s if len(self.tokens) > 1 and self.decode_s > 0 else None


class OrtDecoder:
    """The prefill and decode graphs of one run folder (or of the cached dense export) in ONNX Runtime."""

    def __init__(self, prefill: Path, threads: int | None = None, disabled_optimizers: tuple[str, ...] = (),
                 runtime: str = "cpu"):
        self.prefill = onnx_export.session(prefill, threads, disabled_optimizers, runtime)
        self.decode = onnx_export.session(prefill.with_name(f"{DECODE}.onnx"), threads, disabled_optimizers, runtime)
        inputs = self.prefill.get_inputs()
        self.names = [i.name for i in inputs]
        self.prompt_len = inputs[0].shape[1]
        self.max_len = inputs[3].shape[2]
        self.empty = [np.zeros(i.shape, np.float16 if i.type == "tensor(float16)" else np.float32) for i in inputs[3:]]

    def _run(self, session, ids: np.ndarray, start: int, cache: list) -> list:
        pos = np.arange(start, start + ids.shape[1], dtype=np.int64)
        return session.run(None, dict(zip(self.names, [ids, pos[None], pos, *cache])))

    def _prompt(self, prompt: list[int]) -> tuple[np.ndarray, list]:
        """The last prompt token's logits and the cache after the whole prompt."""
        if not 0 < len(prompt) <= self.max_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens; the cache holds 1 to {self.max_len}")
        cache, start = self.empty, 0
        while True:
            start = min(start, self.max_len - self.prompt_len)
            chunk = prompt[start:start + self.prompt_len]
            ids = np.zeros((1, self.prompt_len), np.int64)
            ids[0, :len(chunk)] = chunk
            logits, *cache = self._run(self.prefill, ids, start, cache)
            if start + self.prompt_len >= len(prompt):
                return logits[0, len(prompt) - 1 - start], cache
            start += self.prompt_len

    def generate(self, prompt: list[int], max_new_tokens: int, temperature: float = 0.0, eos: Iterable[int] = (),
                 seed: int = 0, on_token: Callable[[int], None] | None = None) -> Generation:
        """Up to ``max_new_tokens`` tokens (fewer at an end-of-sequence token or a full cache); greedy at
        temperature 0, else sampled from the softmax of logits / temperature."""
        stop, rng = set(eos), np.random.default_rng(seed)
        t0 = time.perf_counter()
        logits, cache = self._prompt(prompt)
        tokens = [_pick(logits, temperature, rng)]
        first = time.perf_counter() - t0
        if on_token:
            on_token(tokens[-1])
        t1 = time.perf_counter()
        position = len(prompt)
        while len(tokens) < max_new_tokens and tokens[-1] not in stop and position < self.max_len:
            out, *cache = self._run(self.decode, np.array([[tokens[-1]]], np.int64), position, cache)
            tokens.append(_pick(out[0, -1], temperature, rng))
            position += 1
            if on_token:
                on_token(tokens[-1])
        return Generation(prompt, tokens, first, time.perf_counter() - t1)


def _pick(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    return int(rng.choice(len(p), p=p / p.sum()))


def reference(model: nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens from transformers' ``generate`` on the PyTorch model (its own end-of-sequence ids)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False)
    return out[0, len(prompt):].tolist()


def agreement(got: list[list[int]], expected: list[list[int]]) -> dict:
    """Per prompt, the fraction of the expected tokens reproduced before the first difference, averaged;
    and how many sequences are identical."""
    prefix = []
    for g, e in zip(got, expected):
        same = next((i for i, (a, b) in enumerate(zip(g, e)) if a != b), min(len(g), len(e)))
        prefix.append(same / max(len(e), 1))
    return {"identical": sum(g == e for g, e in zip(got, expected)), "prompts": len(expected),
            "prefix_agreement": round(float(np.mean(prefix)), 4)}


def eos_ids(generation_config) -> list[int]:
    """The end-of-sequence ids a transformers GenerationConfig names (none, one or several)."""
    eos = generation_config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def timing(runs: list[Generation]) -> dict:
    """Median time to first token over the prompts, and decode tokens per second over all of them."""
    decoded = sum(len(g.tokens) - 1 for g in runs)
    seconds = sum(g.decode_s for g in runs)
    return {"first_token_ms": round(statistics.median(g.first_token_s for g in runs) * 1e3, 2),
            "decode_tokens_per_s": round(decoded / seconds, 2) if seconds > 0 else None, "decoded_tokens": decoded}


def compare(dense: Path, compressed: Path, model: nn.Module, prompts: list[list[int]], new_tokens: int, threads: int,
            warmup: bool, disabled_optimizers: tuple[str, ...] = (), runtime: str = "cpu") -> dict:
    """Greedy generation from ``prompts`` with the dense and the compressed graphs, alternating prompt by
    prompt so machine noise hits both alike; the compressed graphs' tokens against transformers'
    ``generate`` on ``model`` (the compressed PyTorch model)."""
    eos = eos_ids(model.generation_config)
    runs = {"dense": OrtDecoder(dense, threads, disabled_optimizers, runtime),
            "compressed": OrtDecoder(compressed, threads, disabled_optimizers, runtime)}
    if warmup:
        for d in runs.values():
            d.generate(prompts[0], 2, eos=eos)
    out: dict[str, list[Generation]] = {k: [] for k in runs}
    for prompt in prompts:
        for key, d in runs.items():
            out[key].append(d.generate(prompt, new_tokens, eos=eos))
    expected = [reference(model, p, new_tokens) for p in prompts]
    result = {"prompts": len(prompts), "prompt_tokens": len(prompts[0]), "new_tokens": new_tokens, "threads": threads,
              "providers": runs["compressed"].prefill.get_providers(), "dense": timing(out["dense"]),
              "compressed": timing(out["compressed"])}
    d, c = result["dense"], result["compressed"]
    result["first_token_speedup"] = round(d["first_token_ms"] / c["first_token_ms"], 3)
    if d["decode_tokens_per_s"] and c["decode_tokens_per_s"]:
        result["decode_speedup"] = round(c["decode_tokens_per_s"] / d["decode_tokens_per_s"], 3)
    result["agreement"] = {"against": "transformers generate (compressed PyTorch model, greedy)",
                           **agreement([g.tokens for g in out["compressed"]], expected)}
    return result
