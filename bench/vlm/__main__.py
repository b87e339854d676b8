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
    tok = sub.add_parser("tokens", help="exact match against kept image tokens, every selector, into the JSON OUT")
    tok.add_argument("out", type=Path, nargs="?", default=RESULTS.with_name("easy-vqa-tokens.json"))
    tok.add_argument("--methods", nargs="+", help="selectors (default: all of bench/vlm/tokens.py METHODS)")
    tok.add_argument("--keeps", nargs="+", type=float, help="ratios of the 64 patch tokens (default: tokens.KEEPS)")
    lat = sub.add_parser("latency", help="time to first token against kept image tokens into the JSON OUT")
    lat.add_argument("out", type=Path, nargs="?", default=RESULTS.with_name("easy-vqa-latency.json"))
    lat.add_argument("--runs", type=Path, nargs="+", help="exported runs, unpruned first (part 'windows')")
    lat.add_argument("--questions", type=int, default=101, help="held-out questions per run (the first warms up)")
    lat.add_argument("--iterations", type=int, default=200, help="runs of each vision tower graph (part 'selectors')")
    lat.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    for p in (clip, proj):
        p.add_argument("--seed", type=int, default=0)
    for p in (proj, ev, asm, tok, lat):
        p.add_argument("--clip", type=Path, default=CLIP, help="the CLIP stage's folder")
    for p in (ev, asm, tok):
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
    elif args.stage == "tokens":
        from . import tokens

        record = tokens.run(args.clip, args.adapter, args.methods or list(tokens.METHODS),
                            args.keeps or list(tokens.KEEPS))
        args.out.write_text(json.dumps(record, indent=1) + "\n")
        print(tokens.markdown(record), tokens.markdown(record, key="balanced"), sep="\n\n")
    elif args.stage == "latency":
        from . import latency, tokens

        record = {"selectors": latency.selectors(args.clip, list(tokens.METHODS), [k for k in tokens.KEEPS if k < 1],
                                                 args.iterations, args.threads)}
        if args.runs:
            record["windows"] = latency.windows(args.runs, args.questions, args.threads)
        args.out.write_text(json.dumps(record, indent=1) + "\n")
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
