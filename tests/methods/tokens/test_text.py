"""TRIM's text tower as a static-length graph."""

from __future__ import annotations

import torch

from methods.tokens.text import TextEncoder

from .conftest import text_tower


def test_text_graph_padding_does_not_change_the_embedding(clip_dir):
    """CLIP pools at the first end-of-text token under a causal mask, so padding to the static length is inert."""
    model, tok = text_tower(clip_dir)
    model.config.eos_token_id = model.text_model.eos_token_id = tok.sep_token_id  # the BERT vocab's end token
    encoder = TextEncoder(model, tok, 24)
    short = tok(["a photo of a cat"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        unpadded = model(input_ids=short).text_embeds
    torch.testing.assert_close(encoder.embed(["a photo of a cat"]), unpadded)
    assert encoder.ids(["a photo of a cat"]).shape == (1, 24)
