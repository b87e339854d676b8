"""Peak resident memory of exporting a model above 2 GB with ``model.offload: true``, against in memory.

The model is the first ``--layers`` blocks of bench/offload_3b.py's random 3.12B Llama (hidden 3072, MLP
8192, a 49152-token vocabulary with an untied head; bfloat16 files, one shard per block). The export
writes float32, like the in-memory export: 3 blocks and the two 49152 x 3072 tables are 604M parameters,
2.42 GB of float32 weights, above protobuf's 2 GiB, so both exports write ONNX external data. Each
recipe is an export alone (no calibrate) and runs in a child process; the export stage's peak resident
memory comes from its stage record, the whole process's from the OS, both set against the bytes of
the weight file the export wrote. Then the offloaded export's three steps (trace and write, the
block-by-block PyTorch reference, ONNX Runtime) run in this process, each with its own peak.

    python bench/export_offloaded.py [--folder /tmp/llama-3b] [--layers 3] [--seq-len 128]
                                     [--modes offloaded,in-memory]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from common import RESULTS, ROOT, run_recipe, stage, write_json
from offload_3b import baseline_rss_mib, first_blocks, make_model

sys.path.insert(0, str(ROOT))  # this checkout's modules for the in-process steps, not an installed copy's
MIB = 2**20


def recipe(folder: Path, offload: bool, seq_len: int) -> dict:
    return {"name": "export-offloaded", "model": {"source": str(folder), "task": "causal-lm", "offload": offload},
            "calibration": {"dtype": "bfloat16"},  # what an offloaded run reads blocks in; the export is float32
            "stages": [{"type": "export"}],
            "export": {"seq_len": seq_len, "batch_size": 1, "parity_batches": 1}}


def measure(folder: Path, mode: str, seq_len: int, base: float) -> dict:
    manifest = run_recipe(recipe(folder, mode == "offloaded", seq_len), f"export-{mode}")
    run = RESULTS / "runs" / f"export-{mode}"
    data = (run / "model.onnx.data").stat().st_size
    export = stage(manifest, "export")
    peak = export["memory"]["peak_rss_mib"]
    return {"weights_file_mib": round(data / MIB), "graph_file_kib": round((run / "model.onnx").stat().st_size / 1024),
            "export_peak_rss_mib": peak, "export_peak_above_baseline_mib": round(peak - base, 1),
            "export_peak_above_baseline_in_weights": round((peak - base) / (data / MIB), 2),
            "process_peak_rss_mib": manifest["bench"]["peak_rss_mb"],
            "process_peak_in_weights": round(manifest["bench"]["peak_rss_mb"] / (data / MIB), 2),
            "export_seconds": export["seconds"], "wall_seconds": manifest["bench"]["wall_seconds"],
            "parity": export["metrics"]["parity"]}


def phases(folder: Path, seq_len: int, out: Path) -> dict:
    """The offloaded export's steps run here one by one, each with its own peak (the high-water mark reset
    before it; it includes what the process held already, ``rss_before_mib``): which step holds what."""
    import time

    from core.memory import peak, reset_peak
    from export import offloaded
    from export import onnx as onnx_export
    from models import loading
    from models.spec import ModelSpec
    from tasks import TASKS
    from tasks.model import TaskModel

    cpu = torch.device("cpu")
    spec = ModelSpec(source=str(folder), task="causal-lm", offload=True)
    weights, _ = loading.open_offloaded(spec, loading.resolve_source(spec), TASKS["causal-lm"], out / "staging",
                                        torch.bfloat16, cpu)
    module = TaskModel(weights.model, spec)
    ids = torch.randint(0, 49152, (1, seq_len), generator=torch.Generator().manual_seed(0))
    example = module.example({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    out.mkdir(parents=True, exist_ok=True)
    steps = {"trace, then write the weights block by block": lambda: offloaded.export(module, weights, example,
                                                                                      out / "model.onnx", 18),
             "PyTorch reference, one block at a time": lambda: offloaded.Streamed(module, weights)(*example),
             "ONNX Runtime: load the graph and run it": lambda: onnx_export.session(out / "model.onnx").run(
                 None, {n: t.numpy() for n, t in zip(module.input_names, example)})}
    rows = {}
    for name, step in steps.items():
        before = round(int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024, 1)
        since, t0 = reset_peak(cpu), time.perf_counter()
        step()
        rows[name] = {"rss_before_mib": before, "peak_rss_mib": peak(cpu, since)["peak_rss_mib"],
                      "seconds": round(time.perf_counter() - t0, 1)}
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", type=Path, default=Path("/tmp/llama-3b"))
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--modes", default="offloaded,in-memory")
    args = p.parse_args()
    make_model(args.folder)
    folder = first_blocks(args.folder, args.layers)
    base = baseline_rss_mib(ROOT)
    results = {mode: measure(folder, mode, args.seq_len, base) for mode in args.modes.split(",")}
    steps = phases(folder, args.seq_len, RESULTS / "runs" / "export-offloaded-phases")
    print(write_json("export-offloaded", {
        "model": {"blocks": args.layers, "hidden_size": 3072, "intermediate_size": 8192, "vocab_size": 49152,
                  "files_dtype": "bfloat16", "export_dtype": "float32"},
        "export": {"seq_len": args.seq_len, "batch_size": 1, "parity_batches": 1},
        "process_baseline_rss_mib": base, "torch_threads": torch.get_num_threads(), "runs": results,
        "offloaded_steps_in_one_process": steps}))


if __name__ == "__main__":
    main()
