"""python -m bench.vlm {clip,projector,evaluate,assemble,artifact} (README: easy-VQA VLM)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent.parent
MODELS = ROOT / "bench" / "models"
CLIP, LLAVA = MODELS / "easyvqa-clip", MODELS / "easyvqa-llava"
RESULTS = ROOT / "bench" / "results" / "easy-vqa-vlm.json"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.vlm", description="easy-VQA LLaVA-style VLM, made here")
    sub = ap.add_subparsers(dest="stage", required=True)
    clip = sub.add_parser("clip", help="train the CLIP image + text towers into OUT")
    clip.add_argument("out", type=Path, nargs="?", default=CLIP)
    clip.add_argument("--epochs", type=int, default=10)
    proj = sub.add_parser("projector", help="train the projector + LoRA into frozen SmolLM2 into OUT")
    proj.add_argument("out", type=Path, nargs="?", default=LLAVA)
    proj.add_argument("--steps", type=int, default=150)
    proj.add_argument("--init", type=Path, help="continue from this saved adapter folder")
    proj.add_argument("--yes-no", type=int, help="per image: every colour/shape question plus this many yes/no")
    ev = sub.add_parser("evaluate", help="exact-match accuracy by question type into the JSON file OUT")
    ev.add_argument("out", type=Path, nargs="?", default=RESULTS)
    asm = sub.add_parser("assemble", help="build the full LlavaForConditionalGeneration into the folder OUT")
    asm.add_argument("out", type=Path)
    asm.add_argument("--check", type=int, default=32, help="test questions answered with generate() after reloading")
    asm.add_argument("--results", type=Path, default=RESULTS, help="JSON to record the check in (if it exists)")
    art = sub.add_parser("artifact", help="exact match of exported run folders (generate's graphs) into the JSON")
    art.add_argument("runs", type=Path, nargs="+", help="run folders of image-text-to-text recipes with export.decoder")
    art.add_argument("--questions", type=int, default=200, help="the first held-out test questions")
    art.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    art.add_argument("--results", type=Path, default=RESULTS, help="JSON the scores are added to (key 'exported')")
    for p in (clip, proj):
        p.add_argument("--seed", type=int, default=0)
    for p in (proj, ev, asm):
        p.add_argument("--clip", type=Path, default=CLIP, help="the CLIP stage's folder")
    for p in (ev, asm):
        p.add_argument("--adapter", type=Path, default=LLAVA, help="the projector stage's folder")
    return ap


def main() -> None:
    args = parser().parse_args()
    for name in ("clip", "adapter"):
        folder = getattr(args, name, None)
        if folder is not None and not (folder / "training.json").is_file():
            print(f"--{name}: {str(folder)!r} has no training.json; train it first (python -m bench.vlm "
                  f"{'clip' if name == 'clip' else 'projector'})", file=sys.stderr)
            sys.exit(2)
    # One thread: on the shared 2-core machine two spinning threads per process were 5x slower per CLIP
    # step (5 s vs 0.9 s measured) than one.
    torch.set_num_threads(1)
    if args.stage == "clip":
        from .clip import run as clip_run

        record = clip_run(args.out, args.epochs, args.seed)
    elif args.stage == "projector":
        from .llava import run as projector_run

        record = projector_run(args.out, args.clip, args.steps, args.seed, args.init, args.yes_no)
    elif args.stage == "evaluate":
        from .evaluate import run as evaluate_run

        record = evaluate_run(args.out, args.clip, args.adapter)
    elif args.stage == "artifact":
        from .artifact import score

        record = {run.name: score(run, args.questions, args.threads) for run in args.runs}
        table = json.loads(args.results.read_text()) if args.results.is_file() else {}
        table.setdefault("exported", {}).update(record)
        args.results.write_text(json.dumps(table, indent=1) + "\n")
    else:
        from .assemble import run as assemble_run

        record = assemble_run(args.out, args.clip, args.adapter, args.check, args.results)
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
