"""Two gloo processes on the CPU (a file store in tmp_path, no network) against one process: the
reduced statistics, and a whole run's statistics and pruned weights, equal the single-process ones."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from calibration import distributed
from calibration.batches import Batch, Batches
from calibration.collectors import KINDS, Stats
from calibration.layerwise import LayerwiseEngine
from core.errors import RecipeError
from models.adapters import adapter_for
from pipeline.runner import run
from tests.conftest import text_recipe, write_recipe

SIZES = (3, 2, 4, 1, 3)  # five batches of uneven sizes: 2 and 3 batches per rank


def _join(rank: int, store: str) -> distributed.World:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    world = distributed.from_env(torch.device("cpu"))
    assert world is not None and (world.rank, world.size) == (rank, 2)
    return world


def _model_and_batches():
    """The same tiny Llama and padded batches in every process (seeded)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = tf.LlamaForCausalLM(cfg).eval()
    batches = []
    for size in SIZES:
        ids = torch.randint(0, 100, (size, 12))
        mask = torch.ones(size, 12, dtype=torch.long)
        mask[0, 8:] = 0  # padding, excluded from every statistic
        batches.append(Batch({"input_ids": ids, "attention_mask": mask}))
    return model, Batches(batches, "random")


def _statistics(world: distributed.World | None) -> dict:
    model, batches = _model_and_batches()
    adapter = adapter_for("llama", "causal-lm")
    targets = {b.index: {n: model.get_submodule(n) for n in b.linears} for b in adapter.blocks(model)}
    return LayerwiseEngine(model, adapter, batches).run(targets, set(KINDS), "dense", world=world)


def _engine_rank(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    stats = _statistics(_join(rank, store))
    torch.save(stats, f"{out}.{rank}")
    dist.destroy_process_group()


def _run_rank(rank: int, store: str, recipe: str, output: str, cache: str) -> None:
    torch.set_num_threads(1)
    os.environ["PIPELINE_CACHE"] = cache
    _join(rank, store)
    run(recipe, output)
    dist.destroy_process_group()


def test_shards_cover_every_batch_exactly_once():
    for n, size in ((5, 2), (7, 3), (2, 2), (10, 4)):
        parts = [distributed.shard(list(range(n)), r, size) for r in range(size)]
        assert sum(parts, []) == list(range(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1 and min(map(len, parts)) >= 1
    with pytest.raises(RecipeError, match="1 batches for 2 processes"):
        distributed.shard([0], 1, 2)


def test_too_few_batches_for_the_processes_fail_before_a_folder(llama_dir, tmp_path, monkeypatch):
    recipe = text_recipe(llama_dir, "causal-lm", [{"type": "calibrate"}, {"type": "smoothquant"}],
                         calibration={"num_samples": 6, "batch_size": 4})  # 2 batches
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(RecipeError, match="calibration.num_samples: the calibration set has 2 batches for 3 processes"):
        run(write_recipe(tmp_path, recipe), tmp_path / "run")
    assert not list(tmp_path.glob("*run*"))


def test_reduced_statistics_equal_one_process(tmp_path):
    mp.spawn(_engine_rank, args=(str(tmp_path / "store"), str(tmp_path / "stats")), nprocs=2)
    two = [torch.load(tmp_path / f"stats.{r}") for r in range(2)]
    one = _statistics(None)
    assert two[0].keys() == one.keys() and len(one) == 14  # 7 Linears per block
    for name, fields in one.items():
        for key, t in fields.items():
            tol = 1e-5 if key == "xtx" else 1e-12  # X^T X is summed in fp32 (the references' precision)
            for rank in range(2):  # every rank holds the whole set's statistics
                torch.testing.assert_close(two[rank][name][key], t, rtol=tol, atol=tol)
        a, b = Stats(two[0][name]), Stats(fields)
        assert a.tokens == b.tokens == sum(SIZES) * 12 - 4 * 5 and a.sequences == sum(SIZES)
        assert torch.equal(a.abs_max, b.abs_max)  # SmoothQuant: a maximum is exact
        for derived in ("sq_norm", "mean", "var"):  # Wanda, FLAP fluctuation
            torch.testing.assert_close(getattr(a, derived), getattr(b, derived), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(a.hessian, b.hessian, rtol=1e-5, atol=1e-5)  # SparseGPT, GPTQ: fp32 sums
    assert one["model.layers.0.self_attn.q_proj"]["xtx"] is one["model.layers.0.self_attn.k_proj"]["xtx"]
    assert two[0]["model.layers.0.self_attn.q_proj"]["xtx"].shape == (32, 32)


def test_a_two_process_run_equals_a_one_process_run(llama_dir, tmp_path):
    # The second calibrate stage sees a FLAP-pruned model the other rank never computed: it gets rank 0's.
    stages = [{"type": "calibrate"}, {"type": "prune_structured", "method": "flap", "ratio": 0.25},
              {"type": "calibrate"}, {"type": "prune_weights", "method": "wanda", "pattern": "2:4",
                                      "propagation": "dense"}]
    recipe = write_recipe(tmp_path, text_recipe(llama_dir, "causal-lm", stages,
                                                calibration={"num_samples": 12, "batch_size": 4}))
    single = run(recipe, tmp_path / "one")
    mp.spawn(_run_rank, args=(str(tmp_path / "store"), str(recipe), str(tmp_path / "two"), str(tmp_path / "cache")),
             nprocs=2)
    import json

    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    calibrations = [s["metrics"] for s in manifest["stages"] if s["type"] == "calibrate"]
    assert [c["processes"] for c in calibrations] == [2, 2]
    assert all(next(iter(c["statistics"].values()))["cache"] == "miss" for c in calibrations)
    a = load_file(single / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "two" / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
    assert len(list((tmp_path / "cache" / "stats").iterdir())) == 2  # rank 0 wrote each dense pass once
