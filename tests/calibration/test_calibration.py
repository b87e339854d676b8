"""Collectors and the layer-wise engine against independent, naive reference computations."""

from __future__ import annotations

import pytest
import torch

from calibration import collectors
from calibration.batches import Batch, Batches
from calibration.cache import StatsCache, cache_key, state_digest
from calibration.collectors import GradientHooks, InputHooks, InputStats, Stats
from calibration.layerwise import LayerwiseEngine, block_outputs
from calibration.spec import CalibrationSpec
from methods.weights.wanda import Wanda
from models.adapters import adapter_for
from models.spec import ModelSpec
from tasks import TASKS


def _load(folder, task):
    from transformers import AutoConfig

    cls = TASKS[task].auto_class(AutoConfig.from_pretrained(folder).model_type)
    return cls.from_pretrained(folder).eval(), TASKS[task].preprocessor(folder)


def test_input_stats_mask_mean_var():
    x = torch.randn(2, 5, 3, dtype=torch.float32) * 10
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    s = InputStats({"sq_norm", "mean_var", "abs_max"})
    s.update(x[:1], mask[:1])
    s.update(x[1:], mask[1:])
    real = x[mask].double()
    stats = Stats(s.tensors())
    assert stats.tokens == 8 and stats.sequences == 2
    torch.testing.assert_close(stats.mean, real.mean(0).float())
    torch.testing.assert_close(stats.var, real.var(0, unbiased=True).float())
    torch.testing.assert_close(stats.sq_norm, (real ** 2).sum(0).float() / 2)
    torch.testing.assert_close(stats.abs_max, real.abs().amax(0).float())


def test_squares_do_not_overflow_half_precision_inputs():
    s = InputStats({"sq_norm"})
    s.update(torch.full((1, 4, 2), 3000.0, dtype=torch.float16), None)
    assert torch.isfinite(Stats(s.tensors()).sq_norm).all() and Stats(s.tensors()).sq_norm[0] == 4 * 9e6


def test_hessian_is_the_sum_of_outer_products_over_real_tokens():
    x = torch.randn(2, 5, 3, dtype=torch.float16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    s = InputStats({"hessian"})
    s.update(x[:1], mask[:1])
    s.update(x[1:], mask[1:])
    real = x[mask].double()
    stats = Stats(s.tensors())
    torch.testing.assert_close(s.tensors()["xtx"], (real.T @ real).float())  # fp32, as the references
    torch.testing.assert_close(stats.hessian, (2 * real.T @ real / 8).float())
    assert stats.hessian.dtype == torch.float32 and "sum_sq" not in s.tensors()
    expected = stats.hessian
    taken = stats.hessian_()  # the last holder's: in the sums' own memory
    torch.testing.assert_close(taken, expected)
    assert taken.data_ptr() == s.tensors()["xtx"].data_ptr()


def test_statistics_upcast_a_slice_of_tokens_at_a_time_equal_one_slice(monkeypatch):
    """Tokens are upcast and summed a slice at a time (bounded temporaries), the Hessian in place."""
    x = torch.randn(3, 7, 4, dtype=torch.bfloat16) * 100
    mask = torch.rand(3, 7) > 0.3
    kinds = {"sq_norm", "mean_var", "abs_max", "hessian"}

    def sums():
        s = InputStats(kinds)
        s.update(x, mask)
        s.update(x, None)
        return s.tensors()

    whole = sums()
    monkeypatch.setattr(collectors, "_UPCAST", 12)  # 3 tokens per slice
    for key, t in sums().items():
        torch.testing.assert_close(t, whole[key], rtol=1e-12, atol=0)


def test_linears_fed_one_input_share_one_set_of_sums(tmp_path):
    """q/k/v see the same tensor: one Hessian in memory and on disk, the same numbers as separate sums."""
    layers = torch.nn.ModuleDict({"q": torch.nn.Linear(3, 2), "k": torch.nn.Linear(3, 2), "o": torch.nn.Linear(2, 2)})
    hooks = InputHooks(dict(layers.items()), {"hessian", "sq_norm"})
    xs = [torch.randn(2, 4, 3) for _ in range(3)]
    for x in xs:
        hooks.run(lambda x=x: layers["o"](layers["q"](x) + layers["k"](x)), None)
    stats = hooks.remove()
    flat = torch.cat(xs).reshape(-1, 3).double()
    assert stats["q"]["xtx"] is stats["k"]["xtx"] and stats["o"]["xtx"] is not stats["q"]["xtx"]
    torch.testing.assert_close(stats["k"]["xtx"], (flat.T @ flat).float())
    assert int(stats["k"]["tokens"]) == 24 and int(stats["o"]["tokens"]) == 24

    cache = StatsCache(tmp_path)
    cache.save("k" * 64, stats)
    loaded = cache.load("k" * 64)
    assert loaded["q"]["xtx"] is loaded["k"]["xtx"]
    assert all(torch.equal(loaded[n][f], t) for n, fields in stats.items() for f, t in fields.items())


def _reference_sequential_wanda(model, samples, sparsity, blocks):
    """Wanda's reference protocol, independently: batch 1, full forward per sample, layer by layer."""
    for block in blocks:
        names = block.linears
        sums = {n: 0.0 for n in names}
        handles = [model.get_submodule(n).register_forward_pre_hook(
            lambda mod, args, n=n, sums=sums: sums.__setitem__(n, sums[n] + (args[0].double() ** 2).sum((0, 1))))
            for n in names]
        with torch.no_grad():
            for ids in samples:
                model(input_ids=ids)
        for h in handles:
            h.remove()
        for n in names:
            w = model.get_submodule(n).weight.data
            score = w.abs() * (sums[n] / len(samples)).float().sqrt()
            k = int(w.shape[1] * sparsity)
            idx = torch.sort(score, dim=1, stable=True).indices[:, :k]
            w.scatter_(1, idx, 0.0)
    return model


@pytest.mark.parametrize("batch_size", [1, 3])
def test_sequential_engine_matches_reference(llama_dir, batch_size):
    model, tok = _load(llama_dir, "causal-lm")
    ref_model, _ = _load(llama_dir, "causal-lm")
    adapter = adapter_for("llama", "causal-lm")
    spec = CalibrationSpec(num_samples=6, seq_len=12, batch_size=batch_size)
    batches = TASKS["causal-lm"].calibration_batches(tok, spec)
    method = Wanda(Wanda.Args(method="wanda", sparsity=0.5))

    def prune(block, stats):
        for name in stats:
            w = model.get_submodule(name).weight.data
            w[method.mask(name, w, Stats(stats[name]))] = 0

    blocks = adapter.blocks(model)
    targets = {b.index: {n: model.get_submodule(n) for n in b.linears} for b in blocks}
    LayerwiseEngine(model, adapter, batches).run(targets, {"sq_norm"}, "sequential", on_block=prune)
    samples = [b.inputs["input_ids"][i:i + 1] for b in batches for i in range(b.size)]
    _reference_sequential_wanda(ref_model, samples, 0.5, adapter.blocks(ref_model))
    for name, p in model.named_parameters():
        assert torch.equal(p == 0, dict(ref_model.named_parameters())[name] == 0), name


def test_one_pass_per_input_last_first_equals_one_pass(llama_dir):
    """by_input: the callback sees one input's statistics at a time, the block's last input first, and
    every statistic and pruned weight equals the one-pass run's (each input depends only on modules
    that run before it, which are pruned after it)."""
    spec = CalibrationSpec(num_samples=6, seq_len=12, batch_size=4)
    adapter = adapter_for("llama", "causal-lm")
    method = Wanda(Wanda.Args(method="wanda", sparsity=0.5))
    runs = []
    for by_input in (False, True):
        model, tok = _load(llama_dir, "causal-lm")
        batches = TASKS["causal-lm"].calibration_batches(tok, spec)
        seen: list[list[str]] = []

        def prune(block, stats, model=model, seen=seen):
            seen.append([n.removeprefix(f"{block.prefix}.") for n in stats])
            for name in stats:
                w = model.get_submodule(name).weight.data
                w[method.mask(name, w, Stats(stats[name]))] = 0

        targets = {b.index: {n: model.get_submodule(n) for n in b.linears} for b in adapter.blocks(model)}
        stats = LayerwiseEngine(model, adapter, batches).run(targets, {"sq_norm", "hessian"}, "sequential",
                                                             on_block=prune, by_input=by_input)
        runs.append((model, stats, seen))
    (one, one_stats, one_seen), (split, split_stats, split_seen) = runs
    blocks = len(adapter.blocks(one))
    assert len(one_seen) == blocks and all(len(names) == 7 for names in one_seen)  # a block's 7 Linears at once
    assert split_seen == [["mlp.down_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["self_attn.o_proj"],
                          ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]] * blocks
    assert one_stats.keys() == split_stats.keys()
    for name, t in one_stats.items():
        for key in t:
            assert torch.equal(t[key], split_stats[name][key]), (name, key)
    for name, p in one.named_parameters():
        assert torch.equal(p, dict(split.named_parameters())[name]), name
    with pytest.raises(ValueError, match="by_input splits the statistics pass of sequential propagation"):
        LayerwiseEngine(one, adapter, batches).run({}, {"hessian"}, "dense", by_input=True)


def test_dense_engine_with_padding_matches_unpadded_full_forward(bert_dir, tmp_path):
    """Padded, masked batches give the statistics of the same texts run one by one without padding."""
    model, tok = _load(bert_dir, "feature-extraction")
    adapter = adapter_for("bert", "feature-extraction")
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(" ".join(["word", "tree", "river"] * (3 + 4 * i)) for i in range(5)))
    spec = CalibrationSpec(source="files", path=str(text), num_samples=5, seq_len=48, batch_size=5)
    batches = TASKS["feature-extraction"].calibration_batches(tok, spec)
    assert batches.batches[0].token_mask is not None and not batches.batches[0].token_mask.all()
    blocks = adapter.blocks(model)
    targets = {b.index: {n: model.get_submodule(n) for n in b.linears} for b in blocks}
    got = LayerwiseEngine(model, adapter, batches).run(targets, {"mean_var"}, "dense")

    sums = {n: [0.0, 0.0, 0] for b in blocks for n in b.linears}
    handles = []
    for n in sums:
        def hook(mod, args, n=n):
            x = args[0].double().reshape(-1, args[0].shape[-1])
            sums[n][0] += x.sum(0)
            sums[n][1] += (x ** 2).sum(0)
            sums[n][2] += x.shape[0]
        handles.append(model.get_submodule(n).register_forward_pre_hook(hook))
    batch = batches.batches[0]
    with torch.no_grad():
        for ids, mask in zip(batch.inputs["input_ids"], batch.inputs["attention_mask"]):
            length = int(mask.sum())
            model(input_ids=ids[None, :length], attention_mask=mask[None, :length])
    for h in handles:
        h.remove()
    for n, (s, s2, count) in sums.items():
        stats = Stats(got[n])
        assert stats.tokens == count
        torch.testing.assert_close(stats.mean, (s / count).float(), rtol=1e-4, atol=1e-5)
        var = (s2 - count * (s / count) ** 2) / (count - 1)
        torch.testing.assert_close(stats.var, var.float(), rtol=1e-3, atol=1e-5)


def test_bfloat16_compute_stays_close(llama_dir):
    model, tok = _load(llama_dir, "causal-lm")
    adapter = adapter_for("llama", "causal-lm")
    batches = TASKS["causal-lm"].calibration_batches(tok, CalibrationSpec(num_samples=4, seq_len=16, batch_size=2))
    targets = {b.index: {n: model.get_submodule(n) for n in b.linears} for b in adapter.blocks(model)}
    before = state_digest(model)
    fp32 = LayerwiseEngine(model, adapter, batches).run(targets, {"sq_norm"}, "dense")
    bf16 = LayerwiseEngine(model, adapter, batches, dtype=torch.bfloat16).run(targets, {"sq_norm"}, "dense")
    assert state_digest(model) == before  # the bf16 pass worked on copies
    for n in fp32:
        torch.testing.assert_close(Stats(bf16[n]).sq_norm, Stats(fp32[n]).sq_norm, rtol=5e-2, atol=1e-3)


def test_gradient_hooks_equal_per_sample_autograd(llama_dir):
    model, tok = _load(llama_dir, "causal-lm")
    spec = ModelSpec(source=str(llama_dir), task="causal-lm")
    batches = TASKS["causal-lm"].calibration_batches(tok, CalibrationSpec(num_samples=3, seq_len=10, batch_size=3))
    ids = batches.batches[0].inputs["input_ids"]
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    modules = {n: model.get_submodule(n) for n in names}

    expected = {n: torch.zeros_like(m.weight) for n, m in modules.items()}
    for i in range(3):
        loss = TASKS["causal-lm"].gradient_loss(model, spec, {"input_ids": ids[i:i + 1]}, None)
        grads = torch.autograd.grad(loss, [m.weight for m in modules.values()])
        for n, g in zip(names, grads):
            expected[n] += g ** 2

    for p in model.parameters():
        p.requires_grad_(False)
    hooks = GradientHooks(modules)
    handle = model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_())
    with torch.enable_grad():
        TASKS["causal-lm"].gradient_loss(model, spec, {"input_ids": ids}, None).backward()
    handle.remove()
    got = hooks.remove()
    for n in names:
        torch.testing.assert_close(got[n]["grad_sum_sq"], expected[n], rtol=1e-4, atol=1e-10)


def test_cache_round_trip_and_key_sensitivity(tmp_path):
    cache = StatsCache(tmp_path)
    stats = {"a.b": {"sum_sq": torch.arange(3.0, dtype=torch.float64), "tokens": torch.tensor(7)}}
    key = cache_key(model="m", data="d", kinds=["sq_norm"])
    assert cache.load(key) is None
    cache.save(key, stats)
    loaded = cache.load(key)
    assert torch.equal(loaded["a.b"]["sum_sq"], stats["a.b"]["sum_sq"]) and int(loaded["a.b"]["tokens"]) == 7
    assert cache_key(model="m", data="d2", kinds=["sq_norm"]) != key


def test_batches_are_fixed_shape_and_seeded(llama_dir, bert_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_dir)
    spec = CalibrationSpec(num_samples=10, seq_len=32, batch_size=4, seed=3)
    a, b = TASKS["causal-lm"].calibration_batches(tok, spec), TASKS["causal-lm"].calibration_batches(tok, spec)
    assert [x.inputs["input_ids"].shape for x in a] == [(4, 32), (4, 32), (2, 32)]
    assert a.sha256 == b.sha256
    assert TASKS["causal-lm"].calibration_batches(tok, spec.model_copy(update={"seed": 4})).sha256 != a.sha256
    enc = TASKS["feature-extraction"].calibration_batches(AutoTokenizer.from_pretrained(bert_dir), spec)
    assert all(x.inputs["attention_mask"].shape[1] == 32 for x in enc)
    assert isinstance(enc, Batches) and isinstance(enc.batches[0], Batch)


def test_run_blocks_feeds_each_block_the_changed_outputs_of_the_one_before(llama_dir):
    model, tok = _load(llama_dir, "causal-lm")
    adapter = adapter_for("llama", "causal-lm")
    batches = TASKS["causal-lm"].calibration_batches(tok, CalibrationSpec(num_samples=4, seq_len=8, batch_size=2))
    seen = {}

    def silence(block, inputs):  # o and down at zero: the block passes its input through unchanged
        seen[block.index] = [h.clone() for h in inputs.hidden]
        assert not torch.equal(block_outputs(block.module, inputs)[0], inputs.hidden[0])
        model.get_submodule(block.o).weight.data.zero_()
        model.get_submodule(block.mlp_out).weight.data.zero_()

    LayerwiseEngine(model, adapter, batches).run_blocks(silence)
    assert sorted(seen) == [0, 1] and len(seen[0]) == 2
    ids = batches.batches[0].inputs["input_ids"]
    assert torch.equal(seen[0][0], model.get_input_embeddings()(ids))
    assert all(torch.equal(a, b) for a, b in zip(seen[0], seen[1]))
