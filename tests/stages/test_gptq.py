"""The gptq stage: its arguments and recipe rules, whole tiny-BERT runs whose graphs store exactly
the integers GPTQ chose (int4 with act_order and groups, w8a16 and int8 after 2:4 pruning), and
--resume bringing the scales back."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from safetensors.torch import load_file

from core.errors import RecipeError, StageFailed
from export import inspect as onnx_inspect
from models import loading
from pipeline.recipe import parse_recipe
from pipeline.runner import plan, run
from stages import gptq as gptq_stage
from stages.gptq import Gptq, GptqArgs
from tasks import TASKS

from ..conftest import text_recipe, write_recipe

X86_TRT10 = {"tensorrt": {"target": "x86-trt10"}}  # int4's blocked DequantizeLinear needs opset 21
GPTQ_16 = {"type": "gptq", "group_size": 16}
INT4_16 = {"type": "quantize", "format": "int4", "group_size": 16}
MAGNITUDE_24 = {"type": "prune_weights", "method": "magnitude", "pattern": "2:4"}


def test_arguments_and_declarations():
    args = GptqArgs(type="gptq")
    assert (args.bits, args.group_size, args.dampening, args.act_order, args.blocksize) == (4, 128, 0.01, False, 128)
    assert Gptq.changes_model and Gptq.keeps_grid and Gptq.needs_calibration(args) == "data"
    assert Gptq.tuned_for_grid(args) == (("int4",), 128) and Gptq.describe(args) == "int4 group 128"
    eight = GptqArgs(type="gptq", bits=8, act_order=True)
    assert eight.group_size is None and Gptq.tuned_for_grid(eight) == (("w8a16", "int8"), None)
    assert Gptq.describe(eight) == "int8 per output channel, act_order"
    assert GptqArgs(type="gptq", group_size=96, act_order=True).blocksize == 128  # static groups: any block size


@pytest.mark.parametrize("stages, field, words", [
    ([{"type": "calibrate"}, GPTQ_16, {"type": "export"}], "stages[1]",
     "tunes the weights for int4 group 16: add '- {type: quantize, format: int4, group_size: 16}' after export"),
    ([{"type": "calibrate"}, {"type": "gptq", "bits": 8}, {"type": "export"}], "stages[1]",
     "add '- {type: quantize, format: w8a16}' after export"),
    ([{"type": "calibrate"}, {"type": "gptq", "bits": 8}, {"type": "export"}, INT4_16], "stages[3].format",
     "tunes the weights for w8a16 or int8, not int4"),
    ([{"type": "calibrate"}, GPTQ_16, {"type": "export"}, {**INT4_16, "group_size": 32}], "stages[1].group_size",
     "stages[3] quantizes in groups of 32, the weights were tuned for groups of 16"),
    ([{"type": "calibrate"}, {"type": "gptq", "bits": 8, "group_size": 16}], "stages[1]",
     "bits 8 rounds with one scale per output channel (the w8a16 and int8 formats): remove 'group_size'"),
    ([{"type": "calibrate"}, {"type": "gptq", "bits": 4, "group_size": None}], "stages[1]",
     "bits 4 rounds in groups along the input (the int4 format): set 'group_size'"),
    ([{"type": "calibrate"}, {"type": "gptq", "group_size": 48, "blocksize": 64}], "stages[1]",
     "blocksize 64 must be a multiple of group_size 48 (or set act_order: true)"),
    ([{"type": "calibrate"}, {"type": "gptq", "bits": 3}], "stages[1].bits", "3 is not allowed"),
    ([GPTQ_16, {"type": "export"}, INT4_16], "stages[0]", "needs calibration data"),
    ([{"type": "calibrate"}, GPTQ_16, {"type": "distill", "steps": 2}, {"type": "export"}, INT4_16], "stages[2]",
     "stage 'distill' changes the model after stages[1] (gptq) put its weights on the int4 group 16 grid, which "
     "stages[4] stores as they are: move it before gptq"),
    ([{"type": "calibrate"}, {"type": "gptq", "bits": 8}, MAGNITUDE_24, {"type": "export"},
      {"type": "quantize", "format": "int8"}], "stages[2]", "stage 'prune_weights' changes the model after stages[1]"),
    ([{"type": "calibrate"}, GPTQ_16, {"type": "export"}, INT4_16, {"type": "gptq"}], "stages[4]",
     "move 'export' after every stage that changes the model"),
])
def test_recipe_rules(bert_dir, stages, field, words):
    with pytest.raises(RecipeError) as e:
        parse_recipe(text_recipe(bert_dir, "feature-extraction", stages, export=X86_TRT10))
    assert e.value.field == field and words in str(e.value)


def test_plan_refuses_linears_rounded_by_gptq_that_quantize_keeps_float(bert_dir):
    stages = [{"type": "calibrate"}, {"type": "gptq", "bits": 8}, {"type": "export"},
              {"type": "quantize", "format": "w8a16", "ignore": [r"re:.*output\.dense$"]}]
    with pytest.raises(RecipeError) as e:
        plan(parse_recipe(text_recipe(bert_dir, "feature-extraction", stages)))
    assert e.value.field == "stages[1].ignore"
    assert e.value.message == ("4 Linears that gptq rounds stay float in stages[3] (e.g. "
                               "encoder.layer.0.attention.output.dense): give both stages the same targets/ignore")
    stages[1] = {**stages[1], "ignore": [r"re:.*output\.dense$"]}
    plan(parse_recipe(text_recipe(bert_dir, "feature-extraction", stages)))


def _stored(out, model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """torch Linear -> (the weight GPTQ left in PyTorch [N, K], the integers and the scales of its
    DequantizeLinear in the graph, as stored)."""
    torch_model, _ = loading.load_checkpoint(out / "checkpoint", TASKS["feature-extraction"])
    found = {}
    for name, node in onnx_inspect.linear_nodes(model).items():
        dq = node.inputs[1].producer()
        if dq is not None and dq.op_type == "DequantizeLinear":
            w = torch_model.get_submodule(name).weight.detach().numpy()
            found[name] = (w, dq.inputs[0].const_value.numpy().astype(np.int32), dq.inputs[1].const_value.numpy())
    return found


def test_int4_graph_stores_gptq_integers_and_resume_restores_the_scales(bert_dir, tmp_path):
    """The first run fails at the quantize gate (rtol far too tight); --resume reuses calibrate and gptq,
    whose scales come back from the stage folder, and the quantize stage then passes its gate."""
    gptq = {"type": "gptq", "group_size": 16, "act_order": True, "blocksize": 20}
    recipe = text_recipe(bert_dir, "feature-extraction", [{"type": "calibrate"}, gptq, {"type": "export"},
                                                          {**INT4_16, "rtol": 1e-6}], export=X86_TRT10)
    with pytest.raises(StageFailed, match="differs from the PyTorch model"):
        run(write_recipe(tmp_path, recipe), output=tmp_path / "out")
    recipe["stages"][3] = INT4_16
    out = run(write_recipe(tmp_path, recipe), output=tmp_path / "out", resume=True)
    m = json.loads((out / "manifest.json").read_text())
    assert [s["status"] for s in m["stages"]] == ["resumed", "resumed", "resumed", "ran"]
    metrics = m["stages"][1]["metrics"]
    assert metrics["layers"] == 12 and metrics["act_order"] and metrics["mean_loss_ratio"] < 1
    assert m["onnx"]["quantization"]["scale"] == "max|w| / 7 per group of K; chosen by gptq for 12 layers"
    scales = load_file(out / "stages" / "01-gptq" / "scales.safetensors")
    assert not (out / "stages" / "01-gptq" / "scales-by-block").exists()  # each block's, merged into one file
    stored = _stored(out, onnx.load(out / "model.onnx"))
    assert sorted(stored) == sorted(scales)
    for name, (w, q, scale) in stored.items():  # MatMul layout: q [K, N], scale [groups, N]
        assert np.array_equal(scale, scales[name].numpy().T), name
        per_column = np.repeat(scale, 16, axis=0)[: w.shape[1]]
        assert np.array_equal(q, np.rint(w.T / per_column)) and np.array_equal(q.astype(np.float32) * per_column, w.T), name


@pytest.mark.parametrize("fmt", ["w8a16", "int8"])
def test_8_bit_gptq_after_2_4_pruning_keeps_the_pattern_and_its_scales(bert_dir, tmp_path, fmt):
    stages = [{"type": "calibrate"}, MAGNITUDE_24, {"type": "gptq", "bits": 8}, {"type": "export"},
              {"type": "quantize", "format": fmt}]
    out = run(write_recipe(tmp_path, text_recipe(bert_dir, "feature-extraction", stages)), output=tmp_path / "out")
    m = json.loads((out / "manifest.json").read_text())
    assert m["onnx"]["quantization"]["weights"].endswith("; scales chosen by gptq for 12 layers")
    assert m["onnx"]["quantization"]["sparsity_check"] == {"layers": 12, "patterns": ["2:4"], "ok": True}
    scales = load_file(out / "stages" / "02-gptq" / "scales.safetensors")
    stored = _stored(out, onnx.load(out / "model.onnx"))
    assert sorted(stored) == sorted(scales)
    for name, (w, q, scale) in stored.items():  # MatMul layout: q [K, N], scale [N]
        assert np.array_equal(scale, scales[name][:, 0].numpy().astype(scale.dtype)), name
        assert np.array_equal(q, np.rint(w.T / scales[name][:, 0].numpy())), name
        assert onnx_inspect.nm_violations(q, 2, 4) == 0 and (w == 0).mean() >= 0.5, name


def test_error_table_rows_are_evenly_spaced(monkeypatch):
    assert gptq_stage.sample_rows(8).tolist() == list(range(8))  # 8 rows <= ERROR_ROWS: all of them
    monkeypatch.setattr(gptq_stage, "ERROR_ROWS", 4)
    assert gptq_stage.sample_rows(8).tolist() == [0, 2, 5, 7]  # linspace(0, 7, 4) rounded
