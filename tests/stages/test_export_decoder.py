"""export.decoder through the real runner: a FLAP-pruned tiny Llama with per-layer KV heads generates in
ONNX Runtime exactly what transformers generates on the pruned model; both graphs get build material
and engines from build_engine.sh; the artifact generates text after push and pull; int4 rewrites
both graphs and keeps one weight file; recipes that cannot work fail before any work."""

from __future__ import annotations

import io
import json
import shutil
import subprocess

import onnx
import pytest

from core.errors import RecipeError
from export.registry import deployable_files, pull, push
from pipeline.__main__ import main
from pipeline.generate import generate
from pipeline.recipe import parse_recipe
from pipeline.runner import plan, run
from tasks.chat import chat_prompt_ids

from ..conftest import text_recipe, write_recipe
from ..export.test_trt_build import FAKE_TRTEXEC

MAX_LEN = 48  # a 16-token prompt and 32 new tokens
DECODER = {"seq_len": 16, "batch_size": 1, "decoder": {"max_len": MAX_LEN}}
EVALUATE = {"num_samples": 8, "generation": {"prompts": 8, "new_tokens": 32}}


def _manifest(folder) -> dict:
    return json.loads((folder / "manifest.json").read_text())


@pytest.fixture(scope="module")
def flap_run(talkative_llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flap_decoder")
    stages = [{"type": "calibrate"}, {"type": "prune_structured", "method": "flap", "ratio": 0.4, "align": 8},
              {"type": "export"}, {"type": "evaluate"}]
    recipe = text_recipe(talkative_llama_dir, "causal-lm", stages, export=DECODER, evaluation=EVALUATE)
    return run(write_recipe(tmp, recipe), output=tmp / "run")


def test_pruned_decoder_generates_what_transformers_generates(flap_run):
    m = _manifest(flap_run)
    onnx_info = m["onnx"]
    assert onnx_info["decoder"] == {"prefill_len": 16, "max_len": MAX_LEN, "weights": "model.onnx.data",
                                    "generation": "generation"}
    shapes = {d["name"]: d["shape"] for d in onnx_info["decode"]["inputs"]}
    assert shapes["input_ids"] == [1, 1] and shapes["cache_position"] == [1]
    assert shapes["past_key_values.0.key"] == [1, 2, MAX_LEN, 16]  # FLAP kept both KV heads here
    assert shapes["past_key_values.1.value"] == [1, 1, MAX_LEN, 16]  # and one here
    assert onnx_info["parity"]["max_rel_err"] < 1e-4 and onnx_info["decode"]["parity"]["max_rel_err"] < 1e-4
    gen = m["evaluation"]["generation"]
    assert gen["agreement"]["identical"] == gen["prompts"] == 8 and gen["new_tokens"] == 32
    assert gen["agreement"]["prefix_agreement"] == 1.0
    assert gen["prompt_tokens"] == 16 and gen["dense"]["decoded_tokens"] == gen["compressed"]["decoded_tokens"] == 8 * 31
    assert gen["compressed"]["first_token_ms"] > 0 and gen["decode_speedup"] > 0
    ev = m["evaluation"]  # perplexity through the prefill graph, against the dense prefill graph
    assert ev["backend"] == "onnxruntime" and ev["compressed"]["perplexity"] > 0 and ev["comparison"]["perplexity_ratio"] > 0
    report = (flap_run / "report.md").read_text()
    assert "time to first token ms (16-token prompt, median of 8)" in report and "8/8 identical" in report
    assert "4 cache tensors (float32[1, 1, 48, 16], float32[1, 2, 48, 16])" in report  # counted, not listed
    assert "| decode.onnx | present.1.key … present.1.value (2) | output | float32 | [1, 1, 48, 16] |" in report


def test_build_material_and_engines_for_both_graphs(flap_run, tmp_path):
    spec = json.loads((flap_run / "build" / "build_spec.json").read_text())
    assert [g["name"] for g in spec["graphs"]] == ["model", "decode"]
    decode = spec["graphs"][1]
    assert decode["onnx"]["path"] == "../decode.onnx" and decode["onnx"]["external_data"] == "../model.onnx.data"
    assert decode["golden"] == {"inputs": "golden/decode/inputs.json", "outputs": "golden/decode/onnxrt_outputs.json"}
    assert all((flap_run / "build" / path).is_file() for g in spec["graphs"] for path in g["golden"].values())
    assert _manifest(flap_run)["onnx"]["decode"]["tensorrt"]["ok"]
    device = tmp_path / "run"
    shutil.copytree(flap_run, device)
    (tmp_path / "trtexec").write_text(FAKE_TRTEXEC)
    (tmp_path / "nvidia-smi").write_text("#!/usr/bin/env bash\necho ' 8.7'\n")
    for tool in ("trtexec", "nvidia-smi"):
        (tmp_path / tool).chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "FAKE_DIR": str(tmp_path), "HOME": str(tmp_path)}
    done = subprocess.run(["bash", str(device / "build" / "build_engine.sh")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    engines = json.loads((device / "build" / "engines" / "trt10.3.0-sm87" / "engine.json").read_text())["engines"]
    assert [(e["name"], e["plan"]) for e in engines] == [("model", "model.plan"), ("decode", "decode.plan")]
    assert (tmp_path / "args.txt").read_text().split()[0] == "--onnx=../decode.onnx"  # built last


def test_generate_after_push_and_pull(flap_run, tmp_path, capsys):
    files = deployable_files(flap_run)
    assert {"decode.onnx", "model.onnx.data", "preprocessor/tokenizer.json", "generation/generation_config.json",
            "build/golden/decode/inputs.json"} <= set(files)
    assert not any(f.startswith("generation/tokenizer") for f in files)  # the tokenizer once, in preprocessor/
    assert push(flap_run, f"{tmp_path}/registry/tiny:v1")["files"] == len(files) + 1
    pull(f"{tmp_path}/registry/tiny:v1", tmp_path / "pulled")
    pulled = tmp_path / "pulled"
    assert {"decode.onnx", "model.onnx.data"} <= {p.name for p in pulled.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (pulled / "preprocessor").iterdir()}
    assert {p.name for p in (pulled / "generation").iterdir()} == {"generation_config.json"}
    out, err = io.StringIO(), io.StringIO()
    here = generate(flap_run, "the quick brown fox", max_new_tokens=10, out=out, err=err)
    assert len(here.tokens) == 10 and out.getvalue().strip() and "first token after" in err.getvalue()
    assert main(["generate", str(pulled), "--prompt", "the quick brown fox", "--max-new-tokens", "10"]) == 0
    shown = capsys.readouterr()
    assert shown.out == out.getvalue() and "10 new tokens" in shown.err
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "is not a decoder run" in capsys.readouterr().err


def test_the_chat_template_wraps_the_prompt(talkative_llama_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(talkative_llama_dir)
    plain = chat_prompt_ids(tokenizer, "hello", raw=False)
    assert plain == tokenizer("hello")["input_ids"]  # no template: the prompt as it is
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %} [answer]"
    templated = chat_prompt_ids(tokenizer, "hello", raw=False)
    assert tokenizer.decode(templated) == "[ user ] hello [ answer ]"
    assert chat_prompt_ids(tokenizer, "hello", raw=True) == plain


def test_int4_rewrites_both_graphs_over_one_weight_file(talkative_llama_dir, tmp_path):
    stages = [{"type": "export"}, {"type": "quantize", "format": "int4", "group_size": 16}, {"type": "evaluate"}]
    export = {**DECODER, "tensorrt": {"target": "x86-trt10"}}
    recipe = text_recipe(talkative_llama_dir, "causal-lm", stages, export=export,
                         evaluation={"generation": {"prompts": 2, "new_tokens": 8}})
    out = run(write_recipe(tmp_path, recipe), output=tmp_path / "run")
    m = _manifest(out)
    q = m["onnx"]["quantization"]
    assert q["continuation"]["top1_same"] and q["continuation"]["max_rel_err"] < 1e-3
    assert q["fidelity"]["perplexity_ratio"] < 3 and q["decode_parity"]["rtol"] is None
    assert m["onnx"]["decode"]["opset"] == 21 and m["onnx"]["decode"]["tensorrt"]["ok"]
    for graph in ("model.onnx", "decode.onnx"):
        model = onnx.load(out / graph, load_external_data=False)
        assert sum(n.op_type == "DequantizeLinear" for n in model.graph.node) == 14  # 7 Linears x 2 blocks
        assert {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"} \
            == {"model.onnx.data"}
    float_weights = 2_027_456 * 4
    assert (out / "model.onnx.data").stat().st_size < float_weights  # the int4 blocks once, not once per graph
    agreement = m["evaluation"]["generation"]["agreement"]
    assert agreement["prompts"] == 2 and 0 <= agreement["prefix_agreement"] <= 1


def _use_bert(recipe: dict, bert_dir) -> None:
    recipe["model"] = {"source": str(bert_dir), "task": "feature-extraction"}


@pytest.mark.parametrize("change, field, words", [
    (_use_bert, "export.decoder", "task 'feature-extraction' does not generate text"),
    (lambda r, _: r["export"]["decoder"].update(max_len=16), "export", r"max_len \(16\) must exceed seq_len \(16\)"),
    (lambda r, _: r["export"].update(batch_size=2), "export", "set batch_size to 1"),
    (lambda r, _: r.update(stages=[{"type": "calibrate"}, {"type": "export"}, {"type": "quantize", "format": "int8"}]),
     "stages[2].format", "with export.decoder use a weight-only format"),
])
def test_recipes_that_cannot_work(talkative_llama_dir, bert_dir, change, field, words):
    recipe = text_recipe(talkative_llama_dir, "causal-lm", [{"type": "export"}],
                         export={**DECODER, "decoder": {"max_len": MAX_LEN}})
    change(recipe, bert_dir)
    with pytest.raises(RecipeError, match=words) as e:
        plan(parse_recipe(recipe))
    assert e.value.field == field
