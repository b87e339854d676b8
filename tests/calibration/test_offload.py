"""model.offload: a tiny Llama in sharded safetensors runs block by block from disk and gives exactly what the
in-memory run gives (statistics; Wanda, SparseGPT, AWQ, GPTQ and SmoothQuant weights; FLAP's and the -sp
baselines' sliced blocks; the saved checkpoint),
never holding more than one block; stages that need the whole model are refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from calibration.collectors import Stats
from calibration.layerwise import LayerwiseEngine
from calibration.spec import CalibrationSpec
from core.errors import RecipeError
from models import loading
from models.adapters import adapter_for
from models.offload import INDEX
from models.spec import ModelSpec
from pipeline.recipe import parse_recipe
from pipeline.runner import run
from tasks import TASKS

from ..conftest import VOCAB, _tokenizer_into, text_recipe, write_recipe

LAYERS = 3
WANDA_24 = {"type": "prune_weights", "method": "wanda", "pattern": "2:4"}
GPTQ_16 = {"type": "gptq", "group_size": 16}
AWQ_16 = {"type": "awq", "group_size": 16, "grid": 4}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """Three blocks, untied head, weights split over many shard files with an index."""
    folder = tmp_path_factory.mktemp("sharded-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(folder, max_shard_size="300KB")
    _tokenizer_into(folder)
    assert (folder / INDEX).is_file() and len(list(folder.glob("*.safetensors"))) > LAYERS
    return folder


def _opened(folder, tmp_path):
    spec = ModelSpec(source=str(folder), task="causal-lm", offload=True)
    task = TASKS["causal-lm"]
    return loading.open_offloaded(spec, loading.resolve_source(spec), task, tmp_path / "staging", torch.float32,
                                  torch.device("cpu"))[0]


def test_statistics_equal_and_one_block_at_a_time(sharded, tmp_path):
    spec = ModelSpec(source=str(sharded), task="causal-lm")
    model, tok = loading.load_model(spec, loading.resolve_source(spec), TASKS["causal-lm"])
    batches = TASKS["causal-lm"].calibration_batches(tok, CalibrationSpec(num_samples=6, seq_len=16, batch_size=3))
    adapter = adapter_for("llama", "causal-lm")
    kinds = {"sq_norm", "mean_var", "hessian"}

    def targets(m):
        return {b.index: {n: m.get_submodule(n) for n in b.linears} for b in adapter.blocks(m)}

    dense = LayerwiseEngine(model, adapter, batches).run(targets(model), kinds, "dense")
    off = _opened(sharded, tmp_path)
    got = LayerwiseEngine(off.model, adapter, batches, offload=off).run(targets(off.model), kinds, "dense")
    assert got.keys() == dense.keys() and len(got) == 7 * LAYERS
    for name, fields in dense.items():
        for field, value in fields.items():
            assert torch.equal(got[name][field], value), (name, field)
    assert (off.loads, off.most_resident, off.resident) == (LAYERS, 1, set())
    assert all(p.is_meta for p in off.model.parameters())  # every block and the embeddings released
    assert not off.staged and not (tmp_path / "staging").exists()  # statistics change nothing


def test_one_input_at_a_time_holds_only_its_linears_and_the_changed(sharded, tmp_path):
    """Offloaded ``by_input``: the group's input goes to disk and, while its statistics are summed and the
    callback runs, the block holds only the group's Linears and those changed before (the rest is read
    back for the next pass); statistics and pruned weights equal the in-memory run's."""
    spec = ModelSpec(source=str(sharded), task="causal-lm")
    model, tok = loading.load_model(spec, loading.resolve_source(spec), TASKS["causal-lm"])
    batches = TASKS["causal-lm"].calibration_batches(tok, CalibrationSpec(num_samples=6, seq_len=16, batch_size=4))
    adapter = adapter_for("llama", "causal-lm")
    off = _opened(sharded, tmp_path)
    runs = []
    for m, offload in ((model, None), (off.model, off)):
        held: list[list[str]] = []

        def halve(block, stats, m=m, held=held):
            held.append(sorted(n.removeprefix(f"{block.prefix}.") for n, p in block.module.named_parameters()
                               if not p.is_meta))
            for name in stats:
                w = m.get_submodule(name).weight.data
                w[Stats(stats[name]).sq_norm.expand_as(w) * w.abs() < w.abs().median()] = 0

        targets = {b.index: {n: m.get_submodule(n) for n in b.linears} for b in adapter.blocks(m)}
        stats = LayerwiseEngine(m, adapter, batches, offload=offload).run(
            targets, {"sq_norm", "hessian"}, "sequential", on_block=halve, by_input=True)
        runs.append((stats, held))
    (mem, every), (got, held) = runs
    weights = [f"{name}.weight" for name in ("mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.o_proj",
                                              "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")]
    assert held == [sorted(weights[:1]), sorted(weights[:3]), sorted(weights[:4]), sorted(weights)] * LAYERS
    assert len(every[0]) == 9  # in memory: the whole block, norms included
    assert mem.keys() == got.keys()
    for name, fields in mem.items():
        for field, value in fields.items():
            assert torch.equal(got[name][field], value), (name, field)
    _assert_same({n: p for n, p in model.named_parameters() if "layers" in n},
                 {n: t for prefix, group in off.tensors() if "layers" in prefix for n, t in group.items()})
    assert not list((tmp_path / "staging" / "inputs").iterdir())  # the spilled inputs are deleted


def _run(recipe: dict, tmp_path, name: str):
    return run(write_recipe(tmp_path, {**recipe, "name": name}, f"{name}.yaml"), tmp_path / name)


def _weights(folder) -> dict[str, torch.Tensor]:
    model, _ = loading.load_checkpoint(folder, TASKS["causal-lm"])
    return model.state_dict()


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_pruned_weights_equal_in_memory(sharded, tmp_path, method):
    stages = [{"type": "calibrate"}, {**WANDA_24, "method": method}]
    mem = _run(text_recipe(sharded, "causal-lm", stages), tmp_path, "mem")
    off = _run(text_recipe(sharded, "causal-lm", stages, model={"offload": True}), tmp_path, "off")
    a, b = _weights(mem / "checkpoint"), _weights(off / "checkpoint")
    _assert_same(a, b)
    assert (a["model.layers.2.mlp.down_proj.weight"] == 0).float().mean() == 0.5
    manifests = [json.loads((f / "manifest.json").read_text()) for f in (mem, off)]
    assert manifests[0]["stages"][1]["metrics"]["achieved_sparsity"] == 0.5
    assert [m["model"]["nonzero_params_after"] for m in manifests] == [manifests[0]["model"]["nonzero_params_after"]] * 2
    assert manifests[1]["stages"][1]["memory"]["peak_rss_mib"] > 0
    cache = {"wanda": "miss", "sparsegpt": "off (offloaded Hessians)"}[method]  # a 3B model's are ~10 GB
    assert [m["stages"][1]["metrics"]["cache"] for m in manifests] == ["miss", cache]
    assert not (off / "offload").exists()  # the staging folder goes once the checkpoint holds every block
    index = json.loads((off / "checkpoint" / INDEX).read_text())["weight_map"]
    assert index["model.layers.1.self_attn.q_proj.weight"] == "model.layers.1.safetensors"


def test_awq_and_gptq_weights_equal_in_memory(sharded, tmp_path):
    chain = [{"type": "calibrate"}, WANDA_24, AWQ_16, GPTQ_16]
    mem = _run(text_recipe(sharded, "causal-lm", [*chain, {"type": "export"},
                                                  {"type": "quantize", "format": "int4", "group_size": 16}],
                           export={"tensorrt": {"target": "x86-trt10"}}), tmp_path, "mem")
    off = _run(text_recipe(sharded, "causal-lm", chain, model={"offload": True}), tmp_path, "off")
    _assert_same(_weights(mem / "checkpoint"), _weights(off / "checkpoint"))
    for i in (2, 3):  # AWQ's and GPTQ's own losses against round-to-nearest
        ratios = [json.loads((f / "manifest.json").read_text())["stages"][i]["metrics"]["mean_loss_ratio"]
                  for f in (mem, off)]
        assert ratios[0] == ratios[1] < 1
    assert AutoTokenizer.from_pretrained(off / "checkpoint").vocab_size == VOCAB


def test_smoothquant_equal_in_memory(sharded, tmp_path):
    stages = [{"type": "calibrate"}, {"type": "smoothquant", "alpha": 0.5}]
    mem = _run(text_recipe(sharded, "causal-lm", stages), tmp_path, "mem")
    off = _run(text_recipe(sharded, "causal-lm", stages, model={"offload": True}), tmp_path, "off")
    a = _weights(mem / "checkpoint")
    _assert_same(a, _weights(off / "checkpoint"))
    assert not torch.equal(a["model.layers.0.input_layernorm.weight"], torch.ones(64))  # scales were folded


def _resumed(sharded, tmp_path, monkeypatch, stages: list[dict], interrupted_cls) -> tuple:
    """The offloaded run in one go, and again interrupted in its last stage (``interrupted_cls``) then resumed."""
    from core.errors import StageFailed

    recipe = write_recipe(tmp_path, text_recipe(sharded, "causal-lm", stages, model={"offload": True}))
    whole = run(recipe, output=tmp_path / "whole")

    def interrupted(self, ctx, folder):
        raise StageFailed("interrupted", field=f"stages[{len(stages) - 1}]")

    with monkeypatch.context() as patch:
        patch.setattr(interrupted_cls, "run", interrupted)
        with pytest.raises(StageFailed):
            run(recipe, output=tmp_path / "out")
    out = run(recipe, output=tmp_path / "out", resume=True)
    statuses = [s["status"] for s in json.loads((out / "manifest.json").read_text())["stages"]]
    assert statuses == ["resumed"] * (len(stages) - 1) + ["ran"]
    return whole, out


def test_resume_reads_the_last_stage_snapshot(sharded, tmp_path, monkeypatch):
    """A resumed offloaded run reads the reused stage's checkpoint, not the source: same result as one go."""
    from stages.gptq import Gptq

    whole, out = _resumed(sharded, tmp_path, monkeypatch, [{"type": "calibrate"}, WANDA_24, GPTQ_16], Gptq)
    _assert_same(_weights(whole / "checkpoint"), _weights(out / "checkpoint"))


FLAP = {"type": "prune_structured", "method": "flap", "ratio": 0.25, "align": 32}


@pytest.mark.parametrize("prune", [
    FLAP,  # per-layer widths: a checkpoint tasks.load_checkpoint rebuilds from edgeprune_structure
    {**FLAP, "structure": "UL-UM", "plain_checkpoint": True},  # one width: plain transformers, zero q/k/v biases
    {"type": "prune_structured", "method": "wanda-sp", "ratio": 0.25, "align": 32},  # sliced inside the sequential engine
])
def test_structured_prune_equals_in_memory(sharded, tmp_path, prune):
    """Scores from each block read in turn, the allocation from all of them, then each block read, sliced
    (with its bias compensation) and staged with its new shapes, one at a time; Wanda runs on the result."""
    from transformers import AutoModelForCausalLM

    stages = [{"type": "calibrate"}, prune, {"type": "calibrate"}, WANDA_24]
    mem = _run(text_recipe(sharded, "causal-lm", stages), tmp_path, "mem")
    off = _run(text_recipe(sharded, "causal-lm", stages, model={"offload": True}), tmp_path, "off")
    metas = [json.loads((f / "checkpoint" / loading.CHECKPOINT_META).read_text()) for f in (mem, off)]
    assert metas[1].pop("offloaded_dtype") == "float32" and metas[0] == metas[1]
    _assert_same(_weights(mem / "checkpoint"), _weights(off / "checkpoint"))
    layers = [json.loads((f / "manifest.json").read_text())["stages"][1]["metrics"]["layers"] for f in (mem, off)]
    assert layers[0] == layers[1] and any(x["mlp_channels"] < 128 for x in layers[0])
    if prune.get("plain_checkpoint"):
        plain = AutoModelForCausalLM.from_pretrained(off / "checkpoint")
        assert plain.config.intermediate_size == layers[0][0]["mlp_channels"] < 128
        assert plain.model.layers[0].mlp.down_proj.bias is not None  # bias compensation, stated by the config
    b = _weights(off / "checkpoint")
    assert (b["model.layers.2.mlp.down_proj.weight"] == 0).float().mean() == 0.5


def test_structured_prune_one_block_at_a_time(sharded, tmp_path):
    """FLAP reads each block twice (scores, then the slice), never two at once; the skeleton takes the new shapes."""
    from stages.context import RunContext

    spec = ModelSpec(source=str(sharded), task="causal-lm")
    model, tok = loading.load_model(spec, loading.resolve_source(spec), TASKS["causal-lm"])
    off = _opened(sharded, tmp_path)
    batches = TASKS["causal-lm"].calibration_batches(tok, CalibrationSpec(num_samples=6, seq_len=16, batch_size=3))
    adapter = adapter_for("llama", "causal-lm")

    def targets(m):
        return {b.index: {n: m.get_submodule(n) for n in (b.o, b.mlp_out)} for b in adapter.blocks(m)}

    stats = LayerwiseEngine(off.model, adapter, batches, offload=off).run(targets(off.model), {"mean_var"}, "dense")
    recipe = parse_recipe(text_recipe(sharded, "causal-lm", [{"type": "calibrate"}, FLAP], model={"offload": True}))
    from stages import REGISTRY

    stage = REGISTRY["prune_structured"](recipe.stages[1])
    ctx = RunContext(recipe=recipe, source=None, model=off.model, preprocessor=tok, adapter=adapter,
                     workdir=tmp_path, cache=None, events=None, offload=off)
    ctx.statistics.dense = stats
    loads = off.loads
    (tmp_path / "stage").mkdir()
    result = stage.run(ctx, tmp_path / "stage")
    assert (off.loads - loads, off.most_resident, off.resident) == (2 * LAYERS, 1, set())
    assert all(p.is_meta for p in off.model.parameters()) and set(off.staged) == {f"model.layers.{i}" for i in range(3)}
    for layer, block in zip(result.metrics["layers"], adapter.blocks(off.model)):
        assert (block.num_heads, block.intermediate_size) == (layer["heads"], layer["mlp_channels"])
        assert off.model.get_submodule(block.o).in_features == 16 * layer["heads"]


def test_resume_after_a_structured_prune(sharded, tmp_path, monkeypatch):
    """A resumed offloaded run reshapes its skeleton to the reused FLAP checkpoint before Wanda reads it."""
    from stages.prune_weights import PruneWeights

    stages = [{"type": "calibrate"}, FLAP, {"type": "calibrate"}, WANDA_24]
    whole, out = _resumed(sharded, tmp_path, monkeypatch, stages, PruneWeights)
    _assert_same(_weights(whole / "checkpoint"), _weights(out / "checkpoint"))


@pytest.mark.parametrize("stages, field, words", [
    ([{"type": "calibrate"}, WANDA_24, {"type": "export_gguf"}], "stages[2]",
     "stage 'export_gguf' needs the whole model in memory and cannot run with model.offload (offloaded runs take: "),
    ([{"type": "calibrate"}, {"type": "prune_weights", "method": "gblm", "pattern": "2:4"}], "stages[1].method",
     "gblm backpropagates through the whole model, which model.offload keeps on disk"),
    ([{"type": "calibrate"}, FLAP, {"type": "distill"}], "stages[2]",
     "stage 'distill' needs the whole model in memory"),
])
def test_refused_under_offload(sharded, stages, field, words):
    from pipeline.runner import plan

    with pytest.raises(RecipeError) as e:
        plan(parse_recipe(text_recipe(sharded, "causal-lm", stages, model={"offload": True})))
    assert e.value.field == field and words in str(e.value)
