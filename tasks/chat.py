"""Prompts as a chat-tuned causal LM expects them (generation and the VLM prompts share this)."""

from __future__ import annotations


def chat_prompt_ids(tokenizer, prompt: str, raw: bool) -> list[int]:
    """The prompt through the chat template when the tokenizer has one (and ``raw`` is off)."""
    if not raw and getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]
