"""The cached decoder: the transformers model's own logits, a cache written only at the given slots,
padding that no later query sees, per-layer KV heads, and the recipe checks before any work."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from core.errors import RecipeError
from models.adapters import adapter_for
from models.spec import ModelSpec
from tasks.decoder import CachedDecoder, check_decoder

MAX_LEN = 24


def _decoder(model) -> CachedDecoder:
    spec = ModelSpec(source="x", task="causal-lm")
    return CachedDecoder(model, spec, adapter_for(model.config.model_type, "causal-lm"), MAX_LEN).eval()


@pytest.fixture(scope="module")
def lm(llama_dir):
    return AutoModelForCausalLM.from_pretrained(llama_dir).eval()


@pytest.fixture(scope="module")
def pruned(llama_dir):
    """Block 0 down to one KV head (two query heads), block 1 untouched: caches of different widths."""
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    adapter = adapter_for("llama", "causal-lm")
    block = adapter.blocks(model)[0]
    adapter.slice_block(model, block, [2, 3], [1], range(block.intermediate_size))
    return model


def _full(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("which", ["lm", "pruned"])
def test_prefill_then_decode_steps_give_the_models_own_logits(which, request):
    model = request.getfixturevalue(which)
    dec = _decoder(model)
    assert [shape for shape in dec.layout] == ([(2, 16), (2, 16)] if which == "lm" else [(1, 16), (2, 16)])
    ids = torch.randint(0, 30000, (1, 12))
    inputs = dec.example({"input_ids": ids[:, :8]})
    assert [tuple(t.shape) for t in inputs[3:5]] == [(1, dec.layout[0][0], MAX_LEN, 16)] * 2
    with torch.no_grad():
        logits, *cache = dec(*inputs)
        torch.testing.assert_close(logits, _full(model, ids[:, :8]), rtol=1e-5, atol=1e-5)
        assert all(bool((c[:, :, :8].abs().amax(-1) > 0).all()) for c in cache)  # every prompt slot written
        assert all(float(c[:, :, 8:].abs().max()) == 0 for c in cache)  # nothing past it
        for pos in range(8, 12):  # one token at a time, each at its own slot
            logits, *cache = dec(ids[:, pos:pos + 1], torch.tensor([[pos]]), torch.tensor([pos]), *cache)
            torch.testing.assert_close(logits[0, -1], _full(model, ids[:, :pos + 1])[0, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2", "mistral", "qwen3", "phi3"])
def test_every_family_with_the_flag_runs_through_the_cache(family, tmp_path):
    """Each family whose adapter sets static_kv_cache: pruned block 0, prefill and two decode steps."""
    import transformers as tf

    from ..conftest import build_llama, small_decoder

    folder = (build_llama(tmp_path, family) if family in ("qwen2", "mistral") else
              small_decoder(tf.Qwen3Config, tf.Qwen3ForCausalLM, tmp_path, head_dim=16) if family == "qwen3" else
              small_decoder(tf.Phi3Config, tf.Phi3ForCausalLM, tmp_path, original_max_position_embeddings=256))
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    adapter = adapter_for(model.config.model_type, "causal-lm")
    assert adapter.static_kv_cache
    adapter.slice_block(model, adapter.blocks(model)[0], [0, 1], [0], range(64))
    dec = _decoder(model)
    assert dec.layout[0][0] == 1 and dec.layout[1][0] == 2
    ids = torch.randint(0, 30000, (1, 10))
    with torch.no_grad():
        logits, *cache = dec(*dec.example({"input_ids": ids[:, :8]}))
        torch.testing.assert_close(logits, _full(model, ids[:, :8]), rtol=1e-5, atol=1e-5)
        for pos in (8, 9):
            logits, *cache = dec(ids[:, pos:pos + 1], torch.tensor([[pos]]), torch.tensor([pos]), *cache)
        torch.testing.assert_close(logits[0, -1], _full(model, ids)[0, -1], rtol=1e-5, atol=1e-5)


def test_right_padding_is_never_seen(lm):
    """A prompt of 5 padded to 8: the real rows match, and decoding from slot 5 overwrites the padding's slots
    before any query could read them."""
    dec = _decoder(lm)
    ids = torch.randint(0, 30000, (1, 7))
    padded = torch.cat([ids[:, :5], torch.full((1, 3), 7)], 1)
    with torch.no_grad():
        logits, *cache = dec(*dec.example({"input_ids": padded}))
        torch.testing.assert_close(logits[:, :5], _full(lm, ids[:, :5]), rtol=1e-5, atol=1e-5)
        for pos in (5, 6):
            logits, *cache = dec(ids[:, pos:pos + 1], torch.tensor([[pos]]), torch.tensor([pos]), *cache)
        torch.testing.assert_close(logits[0, -1], _full(lm, ids)[0, -1], rtol=1e-5, atol=1e-5)


def test_step_continues_the_prefill_at_the_next_slot(lm):
    dec = _decoder(lm)
    prefill = dec.example({"input_ids": torch.randint(0, 30000, (1, 6))})
    ids, positions, slots, *cache = dec.step(prefill)
    assert ids.shape == (1, 1) and positions.tolist() == [[6]] and slots.tolist() == [6]
    assert int(ids) == int(_full(lm, prefill[0])[0, -1].argmax())
    assert len(cache) == 4 and float(cache[0][:, :, 5].abs().max()) > 0 and float(cache[0][:, :, 6:].abs().max()) == 0
    assert dec.input_names[:5] == ("input_ids", "position_ids", "cache_position", "past_key_values.0.key",
                                   "past_key_values.0.value")
    assert dec.output_names == ("logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value")


def test_recipe_checks(lm):
    llama = adapter_for("llama", "causal-lm")
    check_decoder(lm, llama, "causal-lm", 64, "export.decoder")
    with pytest.raises(RecipeError, match="does not generate text") as e:
        check_decoder(lm, llama, "feature-extraction", 64, "export.decoder")
    assert e.value.field == "export.decoder"
    with pytest.raises(RecipeError, match="gemma3 models have no static KV-cache export"):
        check_decoder(lm, adapter_for("gemma3_text", "causal-lm"), "causal-lm", 64, "export.decoder")
    lm.config.sliding_window = 32
    try:
        with pytest.raises(RecipeError, match="exceeds the model's sliding attention window") as e:
            check_decoder(lm, llama, "causal-lm", 64, "export.decoder")
        assert e.value.field == "export.decoder.max_len"
        check_decoder(lm, llama, "causal-lm", 32, "export.decoder")
    finally:
        lm.config.sliding_window = None
