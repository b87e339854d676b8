"""The only orchestrator: validate everything, then run stages in order into a temporary folder.

`plan` does every check that needs no weights (model exists, architecture supported, data paths,
targets against a meta-device copy of the model) so a bad recipe fails before a folder exists.
`run` executes the plan; each stage's completion is recorded with a fingerprint of everything it
depends on, which is what ``--resume`` compares before reusing it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from calibration import distributed
from calibration.cache import StatsCache
from core import memory
from core.device import on_cpu, resolve
from core.errors import GateRejected, PipelineError, RecipeError
from core.events import Events
from core.files import dump, now, remove_tree, sha256_path, write_atomic
from evaluation.verdict import verdict
from models import loading as models
from models.adapters import Adapter, adapter_for
from stages import REGISTRY, Stage, StageResult, Table
from stages.context import RunContext
from tasks import TASKS

from .console import summary_panel
from .folder import MODEL, RunFolder
from .manifest import SCHEMA, environment
from .recipe import Recipe, load_recipe
from .report import render

STARTED = "started"  # in a resumable stage's folder until it completes: the fingerprint it began under


@dataclass
class Plan:
    recipe: Recipe
    source: models.Source
    adapter: Adapter
    stages: list[Stage]
    labels: list[str]
    device: torch.device


def plan(recipe: Recipe) -> Plan:
    """Every check that needs no weights. The returned recipe names the device ``auto`` resolved to,
    so the saved recipe.yaml says where the run computed."""
    device = resolve(recipe.device)
    recipe = recipe.model_copy(update={"device": str(device)})
    source = models.resolve_source(recipe.model)
    adapter = adapter_for(source.model_type, recipe.model.task)
    task = TASKS[recipe.model.task]
    types = [s.type for s in recipe.stages]
    if any(t in ("calibrate", "export") for t in types):
        task.check_data(recipe.calibration, "calibration")
    if "calibrate" in types:  # under torchrun, before a folder exists
        distributed.check_batches(-(-recipe.calibration.num_samples // recipe.calibration.batch_size))
    if "evaluate" in types:
        task.check_evaluation(recipe.evaluation)
    elif recipe.evaluation.accept is not None:
        raise RecipeError("the quality gate reads the evaluate stage's numbers; add '- type: evaluate' last",
                          field="evaluation.accept")
    if recipe.model.offload and source.kind == "hub":  # a .gguf file is streamed into a cached folder first
        raise RecipeError(f"model.offload reads weights from a folder of safetensors files or a .gguf file, and "
                          f"{recipe.model.source!r} is a hub id: download it and point model.source at its folder",
                          field="model.offload")
    meta = models.meta_model(recipe.model, source, task)
    if source.kind == "folder":
        task.check_checkpoint(meta, source.local)
    stages = [REGISTRY[a.type](a) for a in recipe.stages]
    for i, stage in enumerate(stages):
        stage.validate(recipe, meta, adapter, f"stages[{i}]")
    _check_grid_layers(stages, meta, adapter)
    return Plan(recipe, source, adapter, stages, _labels(recipe), device)


def _check_grid_layers(stages: list[Stage], model: torch.nn.Module, adapter: Adapter) -> None:
    """Every Linear a stage left on a weight grid (gptq) must be rounded by the stage that stores that
    grid (the recipe rules make it the next one with a ``weight_grid``): one kept float would keep
    weights rounded for nothing."""
    for i, stage in enumerate(stages):
        if not stage.keeps_grid:
            continue
        j = next((k for k in range(i + 1, len(stages)) if stages[k].weight_grid(stages[k].args) is not None), None)
        if j is None:  # an offloaded run keeps the grid in its checkpoint (pipeline/recipe.py _check_grid)
            continue
        left = sorted(stage.grid_layers(model, adapter, f"stages[{i}]")
                      - stages[j].grid_layers(model, adapter, f"stages[{j}]"))
        if left:
            raise RecipeError(f"{len(left)} Linears that {stage.type} rounds stay float in stages[{j}] (e.g. {left[0]}): "
                              f"give both stages the same targets/ignore", field=f"stages[{i}].ignore")


def _labels(recipe: Recipe) -> list[str]:
    explicit = [s.name for s in recipe.stages if s.name]
    if len(set(explicit)) != len(explicit):
        raise RecipeError("stage names must be unique", field="stages")
    auto = [s.name or s.type for s in recipe.stages]
    return [label if auto.count(label) == 1 or recipe.stages[i].name else f"{label}-{i}"
            for i, label in enumerate(auto)]


def _chain(previous: str, payload) -> str:
    return hashlib.sha256((previous + json.dumps(payload, sort_keys=True, default=str)).encode()).hexdigest()


def run(recipe: Recipe | str | Path, output: str | Path | None = None, force: bool = False,
        resume: bool = False, events: Events | None = None) -> Path:
    """Run a recipe (or the recipe file at a path, loaded without remote code) into its run folder.

    Under torchrun, ranks above 0 only serve the calibrate stage's dense passes (pipeline/workers.py)
    and return the folder rank 0 writes."""
    p = plan(recipe if isinstance(recipe, Recipe) else load_recipe(recipe))
    recipe = p.recipe
    world = distributed.from_env(p.device)
    if world and recipe.model.offload:
        raise RecipeError("an offloaded model runs in one process (its blocks are read from disk one at a time); "
                          "start it without torchrun", field="model.offload")
    if world and world.rank > 0:
        from .workers import serve

        serve(recipe.model, p.source, p.adapter, p.device, world)
        return Path(output) if output else Path("runs") / recipe.name
    events = events or Events(None)
    folder = RunFolder(Path(output) if output else Path("runs") / recipe.name)
    try:
        with folder.lock(events.log):
            resuming = folder.open(force, resume)
            manifest = folder.committed(recipe.sha256(), p.source.sha256) if resuming else None
            if manifest is None:
                manifest = _execute(p, folder, resuming, events, world)
            folder.drop_snapshots()
            final = folder.finalize()
            if world:
                distributed.send_job(world, None)  # a run without a dense pass: the others wait until here
            _conclude(final, manifest, recipe, events)
    except OSError as e:  # a full disk, a folder this user may not write
        raise folder.failure(e) from None
    return final


def _conclude(final: Path, manifest: dict, recipe: Recipe, events: Events) -> None:
    """Say what was written and the quality gate's verdict; publish an accepted run."""
    events.console.print(f"wrote {final}/ ({len(manifest['artifacts'])} files)", highlight=False)
    judged = manifest["verdict"]
    if judged is not None:
        events.console.print(judged["line"], highlight=False, markup=False)
    events.console.print(summary_panel(manifest, final))
    if judged is not None and judged["accepted"] is False:
        missed = "; ".join(f"{c['metric']} {c['value']:g} against {c['field']} {c['bound']:g}"
                           for c in judged["checks"] if not c["ok"])
        raise GateRejected(f"the artifact misses the quality gate ({missed}); {final}/ is marked rejected in "
                           "manifest.json" + (" and was not published" if recipe.publish else ""),
                           field="evaluation.accept")
    if recipe.publish:
        _publish(final, recipe.publish.ref, events)


def _execute(p: Plan, folder: RunFolder, resuming: bool, events: Events, world: distributed.World | None) -> dict:
    """Every stage into the partial folder (reusing what a resumed one holds), then the files besides
    them, and manifest.json last: the record that the partial folder is complete (pipeline/folder.py)."""
    recipe, work = p.recipe, folder.partial
    write_atomic(work / "recipe.yaml", recipe.to_yaml())
    events.path = work / "events.jsonl"
    events.emit("run_start", recipe=recipe.name, resume=resuming)
    events.log(f"[bold]{recipe.name}[/]: loading {recipe.model.source}")
    t0 = time.perf_counter()
    task = TASKS[recipe.model.task]
    offload = None
    if recipe.model.offload:
        offload, preprocessor = models.open_offloaded(recipe.model, p.source, task, work / "offload",
                                                      getattr(torch, recipe.calibration.dtype), p.device, events)
        model = offload.model
    else:
        model, preprocessor = models.load_model(recipe.model, p.source, task, events)
    ctx = RunContext(recipe=recipe, source=p.source, model=model if offload else model.to(p.device),
                     preprocessor=preprocessor, adapter=p.adapter, workdir=work,
                     cache=StatsCache(models.cache_dir(), p.device), events=events, device=p.device, offload=offload,
                     world=world)
    params_before = _params(model)
    if world:
        events.log(f"calibration statistics spread over {world.size} processes (rank 0 writes)")
    events.emit("model_loaded", seconds=round(time.perf_counter() - t0, 2), params=params_before)
    records, tables = [], {}
    # The device joins the fingerprints only off the CPU (Recipe.dump): a GPU's results differ from the CPU's
    # in rounding, so neither resumes the other, and CPU fingerprints are those from before the setting existed.
    fingerprint = _chain(p.source.sha256, recipe.dump(include={"model", "calibration", "device"}))
    reusable = resuming
    try:
        for i, (stage, label) in enumerate(zip(p.stages, p.labels)):
            extra = recipe.dump(include=set(stage.settings))
            fingerprint = _chain(fingerprint, {"args": stage.args.model_dump(mode="json"), **extra,
                                               **_path_field_contents(stage.args)})
            ctx.stage_index, events.stage = i, label
            if stage.cpu_only:
                ctx.to_cpu()
            if stage.type == "calibrate":
                ctx.statistics.kinds = _statistics_wanted(recipe, i)
            sdir = folder.stage_dir(i, label)
            record = _read_record(sdir, stage) if reusable else None
            if record is not None and record["fingerprint"] == fingerprint:
                result = StageResult(record["metrics"], [Table(**t) for t in record["tables"]])
                if stage.changes_model and ctx.offload:
                    ctx.offload.rebase(sdir / MODEL)
                elif stage.changes_model:
                    ctx.model = models.load_checkpoint(sdir / MODEL, task)[0].to(ctx.device)
                stage.restore(ctx, sdir, result)
                status, seconds, used = "resumed", record["seconds"], record.get("memory")
                events.log(f"[bold]{label}[/]: complete in the partial run, reused")
                events.emit("stage_reused")
            else:
                result, seconds, used = _run_stage(ctx, stage, label, sdir, fingerprint, folder, first=reusable)
                reusable, status = False, "ran"
            if world and stage.type == "calibrate" and not any(s.type == "calibrate" for s in p.stages[i + 1:]):
                distributed.send_job(world, None)  # the other ranks' work is done: they exit
            records.append({"name": label, "type": stage.type, "params": stage.args.model_dump(mode="json"),
                            "seconds": seconds, "memory": used, "status": status, "metrics": result.metrics})
            tables[label] = result.tables
        events.stage = None
        _drop_stale_stage_dirs(folder, p.labels)
        remove_tree(work / "checkpoint")
        _save(ctx, work / "checkpoint")
        manifest = _manifest(ctx, records, params_before)
        write_atomic(work / "report.md", render(manifest, tables))
        events.emit("run_end", seconds=round(time.perf_counter() - t0, 2))
        manifest["artifacts"] = folder.artifacts()
        write_atomic(work / "manifest.json", dump(manifest))
    finally:
        events.close()
    return manifest


def _path_field_contents(args) -> dict:
    """The files a stage reads from its path fields (TRIM's ``text_tower``), by content: a checkpoint
    changed in place must not resume the stage that read the old one. Only the path's own files
    (a checkpoint folder's config, tokenizer, weights), not its subfolders."""
    out = {}
    for name in getattr(args, "path_fields", ()):
        where = getattr(args, name, None)
        if where is not None:
            files = [Path(where)] if Path(where).is_file() else sorted(p for p in Path(where).glob("*") if p.is_file())
            out[name] = {p.name: sha256_path(p) for p in files}
    return out


def _run_stage(ctx: RunContext, stage: Stage, label: str, sdir: Path, fingerprint: str, folder: RunFolder,
               first: bool) -> tuple[StageResult, float, dict]:
    """Run one stage; its record goes last, after its files and model snapshot, so it exists only for a
    complete stage. ``first``: every stage before it was reused from a resumed folder."""
    # An interrupted resumable stage (everything before it reused) continues from its own folder.
    inside = first and stage.resumable and _started(sdir) == fingerprint
    folder.begin_stage(sdir, stage.replaces, first, keep=inside)
    if stage.resumable and not inside:
        write_atomic(sdir / STARTED, fingerprint)
    ctx.events.log(f"[bold]{label}[/] ({REGISTRY[stage.type].describe(stage.args)})")
    ctx.events.emit("stage_start", type=stage.type, params=stage.args.model_dump(mode="json"))
    start = memory.reset_peak(ctx.device)
    t = time.perf_counter()
    result = stage.run(ctx, sdir)
    seconds = round(time.perf_counter() - t, 3)
    used = memory.peak(ctx.device, start)
    if stage.changes_model:
        _save(ctx, sdir / MODEL)
    write_atomic(sdir / "result.json", dump({
        "fingerprint": fingerprint, "seconds": seconds, "memory": used, "metrics": result.metrics,
        "tables": [t.__dict__ for t in result.tables]}))
    (sdir / STARTED).unlink(missing_ok=True)
    ctx.events.emit("stage_end", seconds=seconds, memory=used, metrics=result.metrics)
    return result, seconds, used


def _save(ctx: RunContext, folder: Path) -> None:
    """The model's checkpoint, written from CPU tensors (core/device.py on_cpu) wherever the run computes;
    an offloaded model's streamed from its files, after which it reads from the checkpoint."""
    if ctx.offload:
        models.save_offloaded(ctx.offload, ctx.preprocessor, folder, ctx.recipe.model.task)
        return
    with on_cpu(ctx.model):
        models.save_checkpoint(ctx.model, ctx.preprocessor, folder, ctx.recipe.model.task)


def _publish(final: Path, ref: str, events: Events) -> None:
    """Push the finished run (the recipe's publish block); the run folder stays either way."""
    from export.registry import RegistryError, push

    try:
        r = push(final, ref)
    except PipelineError as e:
        raise RegistryError(f"the run is complete in {final}, but pushing it failed: {e.message}; retry with "
                            f"'python -m pipeline push {final} {ref}'", field="publish.ref") from None
    events.console.print(f"pushed {final}/ to {r['ref']} ({r['digest']})", highlight=False)


def _statistics_wanted(recipe: Recipe, at: int) -> frozenset[str]:
    """Statistic kinds the stages served by the calibrate stage at ``at`` (up to the next one) ask for."""
    kinds: set[str] = set()
    for args in recipe.stages[at + 1:]:
        if args.type == "calibrate":
            break
        kinds |= REGISTRY[args.type].statistics(args)
    return frozenset(kinds)


def _started(sdir: Path) -> str | None:
    """The fingerprint a resumable stage began under, while it has not completed."""
    path = sdir / STARTED
    return path.read_text() if path.is_file() else None


def _read_record(sdir: Path, stage: Stage) -> dict | None:
    """A complete stage's record, while what reusing it needs (its model snapshot) is there."""
    path = sdir / "result.json"
    if stage.changes_model and not (sdir / MODEL / models.CHECKPOINT_META).is_file():
        return None
    return json.loads(path.read_text()) if path.is_file() else None


def _drop_stale_stage_dirs(folder: RunFolder, labels: list[str]) -> None:
    keep = {folder.stage_dir(i, label).name for i, label in enumerate(labels)}
    for d in (folder.partial / "stages").glob("*"):
        if d.name not in keep:
            remove_tree(d)


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _manifest(ctx: RunContext, records: list[dict], params_before: int) -> dict:
    recipe, src = ctx.recipe, ctx.source
    calibration = next((r["metrics"] for r in records if r["type"] == "calibrate"), None)
    return {
        "schema": SCHEMA,
        "name": recipe.name,
        "created": now(),
        "recipe": {"path": "recipe.yaml", "sha256": recipe.sha256()},
        "model": {"source": recipe.model.source, "kind": src.kind, "sha256": src.sha256, "files": src.files,
                  "architecture": src.model_type, "class": type(ctx.model).__name__, "task": recipe.model.task,
                  "params_before": params_before, "params_after": _params(ctx.model),
                  "nonzero_params_after": (ctx.offload.nonzero() if ctx.offload
                                           else sum(int(torch.count_nonzero(q)) for q in ctx.model.parameters()))},
        "calibration": calibration,
        "stages": records,
        "onnx": ctx.onnx.record() if ctx.onnx is not None else None,
        "evaluation": ctx.evaluation or None,
        "verdict": verdict(ctx.evaluation, recipe.evaluation.accept, ctx.task) if ctx.evaluation else None,
        "environment": environment(),
    }
