"""python -m pipeline (or edgeprune) run|validate|inspect|compare|sweep|push|pull|generate|convert

User errors print one line (``error: <field>: <what is allowed>``) and exit with code 2; a stage
whose result is unacceptable, or a run that misses its quality gate (``evaluation.accept``),
exits with 1. Neither prints a traceback (PIPELINE_DEBUG=1 does); what the line quotes is short
and redacted (core/echo.py). The recipe is read and checked before torch is imported, so a
malformed one fails fast; ``--trust-remote-code`` is the only way to run a model's own code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from core.echo import clip, refuse_credentials
from core.errors import EnvironmentFailure, GateRejected, PipelineError, RecipeError


def _parser() -> argparse.ArgumentParser:
    # The console script `edgeprune` and `python -m pipeline` are one command line; usage names the one typed.
    prog = "edgeprune" if Path(sys.argv[0]).name == "edgeprune" else "python -m pipeline"
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a recipe into runs/<name>/ (or --output)")
    r.add_argument("recipe")
    r.add_argument("--output", "-o", help="run folder (default: runs/<recipe name>)")
    r.add_argument("--force", action="store_true", help="replace an existing run folder")
    r.add_argument("--resume", action="store_true", help="continue an interrupted run, reusing complete stages")
    r.add_argument("--trust-remote-code", action="store_true",
                   help="let a recipe with model.trust_remote_code: true run the Python code shipped with the model")
    r.add_argument("--device", help="where PyTorch computes, overriding the recipe's 'device': cpu (default), cuda, "
                                    "cuda:N or auto")
    v = sub.add_parser("validate", help="check a recipe (schema, model, data, targets) without running it")
    v.add_argument("recipe")
    i = sub.add_parser("inspect", help="print a run folder's summary: tables and the summary panel")
    i.add_argument("run_dir")
    i.add_argument("--json", action="store_true", help="print manifest.json instead")
    pu = sub.add_parser("push", help="push a run folder to a registry: DIR/REPO:TAG or oci://HOST:PORT/REPO:TAG")
    pu.add_argument("run_dir")
    pu.add_argument("registry_ref")
    pl = sub.add_parser("pull", help="pull a pushed run into a new folder, verifying every sha256")
    pl.add_argument("registry_ref")
    pl.add_argument("dir")
    c = sub.add_parser("compare", help="finished runs side by side: one table, one quality-vs-latency plot "
                                        "with the Pareto front")
    c.add_argument("runs", nargs="+", metavar="RUN", type=Path)
    c.add_argument("--out", type=Path, help="folder for compare.png and compare.md (default: compare.png here)")
    c.add_argument("--metric", help="comparison metric on the quality axis (default: the task's first gate metric)")
    s = sub.add_parser("sweep", help="many runs of one base recipe (a grid or a list of overrides) as Ray tasks: "
                                      "one table, one quality-vs-latency-vs-size plot with the Pareto front")
    s.add_argument("sweep_file", metavar="SWEEP.yaml")
    how = s.add_mutually_exclusive_group()
    how.add_argument("--serial", action="store_true", help="run them one by one in this process, without Ray")
    how.add_argument("--address", help="an existing Ray cluster: auto, or ray://HOST:10001 (default: start Ray here)")
    s.add_argument("--num-cpus", type=int, help="CPUs of the Ray started here (default: all)")
    s.add_argument("--output", "-o", help="sweep folder (default: the file's 'output', relative to the file)")
    g = sub.add_parser("generate", help="write text with a decoder run's graphs (export.decoder) in ONNX Runtime")
    g.add_argument("run_dir", metavar="RUN_OR_DIR", help="a run folder or a pulled artifact")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); above: sampled")
    g.add_argument("--seed", type=int, default=0, help="for sampling (and a random-K VLM's patches, with the image)")
    g.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    g.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat template")
    g.add_argument("--image", type=Path, help="the image a VLM run (image-text-to-text) answers the prompt about")
    cv = sub.add_parser("convert", help="a .gguf file to a safetensors model folder, one block at a time "
                                         "(for model.source; model.offload: true does this itself)")
    cv.add_argument("gguf", metavar="FILE.gguf", type=Path)
    cv.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="a new (or empty) folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        code = _command(args)
    except PipelineError as e:
        if os.environ.get("PIPELINE_DEBUG"):
            raise
        print(f"error: {clip(str(e), 600)}", file=sys.stderr)
        if args.command == "run" and _resumable(e):
            print("the partial run was kept; fix the cause and rerun with --resume", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
    return code or 0


def _command(args: argparse.Namespace) -> int | None:
    """The command's work; an exit code when it is not 0 without an error (a sweep with failed runs)."""
    if args.command == "run":
        from .recipe import load_recipe, with_device

        recipe = with_device(load_recipe(args.recipe, "allow" if args.trust_remote_code else "refuse"), args.device)
        from .runner import run  # torch and the rest, once the recipe is known to be well-formed

        run(recipe, args.output, force=args.force, resume=args.resume)
    elif args.command == "validate":
        from .recipe import load_recipe

        recipe = load_recipe(args.recipe, "skip")
        from .runner import plan

        p = plan(recipe)
        stages = ", ".join(p.labels)
        print(f"ok: {p.recipe.name}: {p.source.model_type} ({p.source.kind}) for {p.recipe.model.task}; "
              f"stages: {stages}")
    elif args.command == "push":
        refuse_credentials(args.registry_ref, "registry_ref")
        from export.registry import push

        r = push(args.run_dir, args.registry_ref)
        print(f"pushed {args.run_dir} to {r['ref']}: {r['files']} files, {r['bytes']:,} bytes "
              f"({r['uploaded_blobs']} new blobs), manifest {r['digest']}")
    elif args.command == "pull":
        refuse_credentials(args.registry_ref, "registry_ref")
        from export.registry import pull

        r = pull(args.registry_ref, args.dir)
        engines = f" (and {r['engines']} engine files, plans as their engine.json records)" if r["engines"] else ""
        print(f"pulled {r['ref']} into {r['dest']}: {r['files']} files, {r['bytes']:,} bytes: exactly the files its "
              f"manifest.json declares{engines}, each with the declared size and sha256")
    elif args.command == "compare":
        from .compare import compare, print_table

        if len(args.runs) < 2:
            raise RecipeError("give two or more run folders to compare", field="runs")
        rows, plot, metric = compare(args.runs, args.out, args.metric)
        print_table(rows, metric, plot)
    elif args.command == "sweep":
        from .sweep import sweep

        if args.num_cpus is not None and (args.serial or args.address):
            raise RecipeError("sets the CPUs of the Ray started here: drop it with --serial or --address (a cluster's "
                              "CPUs are its own; the sweep file's resources.cpus is per run)", field="--num-cpus")
        return sweep(args.sweep_file, serial=args.serial, address=args.address, num_cpus=args.num_cpus,
                     output=args.output)
    elif args.command == "generate":
        from .generate import generate

        generate(args.run_dir, args.prompt, args.max_new_tokens, args.temperature, args.seed, args.threads, args.raw,
                 image=args.image)
    elif args.command == "convert":
        _convert(args.gguf, args.out_dir)
    else:
        _inspect(Path(args.run_dir), args.json)
    return None


def _convert(gguf: Path, out: Path) -> None:
    if not gguf.is_file() or gguf.suffix != ".gguf":
        raise RecipeError(f"{str(gguf)!r} is not a .gguf file; give the path of one", field="FILE.gguf")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RecipeError(f"{str(out)!r} exists and is not an empty folder; give a new folder", field="OUT_DIR")
    from core.events import Events
    from models.gguf_folder import convert_gguf

    events = Events(None)
    try:
        convert_gguf(gguf, out, field="FILE.gguf", events=events)
    finally:
        events.close()
    shards = len(list(out.glob("*.safetensors")))
    print(f"converted {gguf.name} into {out}: {shards} safetensors files (one per block, embeddings, norm, head) "
          "with an index, config and tokenizer; point model.source at it")


def _resumable(e: PipelineError) -> bool:
    """Whether a failed run left a partial folder worth resuming (not after bad input, a failed push, the gate
    or another run holding the output; a failure of the machine says itself how to go on)."""
    from core.lock import Locked
    from export.registry import RegistryError

    return not isinstance(e, (RecipeError, RegistryError, GateRejected, Locked, EnvironmentFailure))


def _inspect(folder: Path, as_json: bool) -> None:
    path = folder / "manifest.json"
    if not path.is_file():
        raise RecipeError(f"no manifest.json in '{folder}' (is it a finished run folder?)", field="run_dir")
    manifest = json.loads(path.read_text())
    if as_json:
        print(json.dumps(manifest, indent=2))
        return
    from rich.console import Console

    from .console import print_run

    print_run(Console(), manifest, folder)


if __name__ == "__main__":
    sys.exit(main())
