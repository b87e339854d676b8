"""The contract between the runner and a stage: typed arguments in, metrics and tables out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import onnx
import torch
from pydantic import BaseModel, ConfigDict, Field

from core.errors import RecipeError
from export import onnx as onnx_export
from export import vlm
from export.graph import opset
from tasks import TASKS
from tasks.image_text import QUESTIONS, image_count, prompt_ids

from .context import RunContext


class StageArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

    def width_multiples(self, model, adapter) -> dict[str, int]:
        """Linears whose input width this stage may change, each with a number every width it can
        leave is a multiple of. The plan validates each stage against the unpruned model; a later
        stage that needs divisible widths (N:M sparsity) checks these as well."""
        return {}

    def shape_spread(self, model, adapter) -> str | None:
        """Why the blocks may differ in shape after this stage (None: it leaves them alike). A later
        stage that needs one shape for every block (GGUF's llama architecture) refuses at plan time."""
        return None


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list]


@dataclass
class StageResult:
    metrics: dict = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)


class Stage(ABC):
    """One step of a recipe. Subclasses set ``type`` and ``Args`` and implement ``run``."""

    type: ClassVar[str]
    Args: ClassVar[Any]  # a StageArgs model, or a discriminated union of them (core/registry.py stage_args)
    changes_model: ClassVar[bool] = False
    rewrites_onnx: ClassVar[bool] = False  # edits the exported model.onnx (needs an export before it)
    # top-level entries of the run folder an earlier stage wrote that this one replaces: the runner keeps
    # copies while it runs, so that it can start again from them after a kill (pipeline/folder.py)
    replaces: ClassVar[tuple[str, ...]] = ()
    settings: ClassVar[tuple[str, ...]] = ()  # recipe sections besides model/calibration its result depends on
    after_model_changes: ClassVar[bool] = False  # must follow every stage that changes the model
    compares_with_dense: ClassVar[bool] = False  # compares task outputs with the dense model's
    resumable: ClassVar[bool] = False  # --resume keeps its folder when interrupted (it continues from its own files)
    # leaves the weights exactly on the grid of tuned_for_grid (GPTQ): nothing may change the model before the
    # stage that rounds to it, and that stage must round every Linear of grid_layers
    keeps_grid: ClassVar[bool] = False
    # runs (and is restored) with the model on the CPU, for the rest of the run (RunContext.to_cpu): the exporters,
    # and the token selectors, which are not device-aware
    cpu_only: ClassVar[bool] = False
    # runs on an offloaded model (model.offload): touches weights only through LayerwiseEngine or RunContext.held,
    # one block at a time
    offloads: ClassVar[bool] = False

    def __init__(self, args: StageArgs):
        self.args = args

    @classmethod
    def needs_calibration(cls, args) -> Literal[False, "data", "dense-statistics"]:
        """Whether a calibrate stage must come before (and whether its statistics must be current)."""
        return False

    @classmethod
    def statistics(cls, args) -> set[str]:
        """Statistic kinds (and "gradients") the calibrate stage must collect for this stage."""
        return set()

    @classmethod
    def describe(cls, args) -> str:
        return cls.type

    @classmethod
    def weight_grid(cls, args) -> tuple[str, int | None] | None:
        """The grid this stage rounds the deployed weights to: (format, group size or None)."""
        return None

    @classmethod
    def tuned_for_grid(cls, args) -> tuple[tuple[str, ...], int | None] | None:
        """The grid this stage tuned the weights for (AWQ, GPTQ): the formats that store it and the
        group size. The next stage with a ``weight_grid`` must round to exactly one of them."""
        return None

    def grid_layers(self, model, adapter, field: str) -> set[str]:
        """The Linears (torch names) this stage tunes for, or rounds to, a weight grid: for stages
        that leave the weights on the grid (``keeps_grid``) and for the stage rounding after them."""
        return set()

    @classmethod
    def replaces_outputs(cls, args, task: str) -> str | None:
        """The argument through which the deployed graph's outputs stop being the task's (so nothing
        dense compares with them), with why; None when they stay the task's (``task``: the recipe's)."""
        return None

    def validate(self, recipe, model, adapter, field: str) -> None:
        """Checks against the model's structure (a meta-device copy) before any work starts."""

    @abstractmethod
    def run(self, ctx: RunContext, folder: Path) -> StageResult:
        """Do the work; write stage files under ``folder``."""

    def restore(self, ctx: RunContext, folder: Path, result: StageResult) -> None:
        """Put back into ``ctx`` what a completed stage left there (for --resume)."""


def check_positions(recipe, model, seq_len: int, field: str) -> None:
    """A text model reads at most ``max_position_embeddings`` tokens (learned position tables have
    no row beyond it; rotary models were not trained beyond it)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if TASKS[recipe.model.task].modality == "text" and isinstance(limit, int) and seq_len > limit:
        raise RecipeError(f"{seq_len} is more tokens than the model's {limit} positions (max_position_embeddings); "
                          f"use at most {limit}", field=field)


def earlier_stages(recipe, args: StageArgs) -> list[tuple[int, StageArgs]]:
    """The recipe's stages before the one with ``args``, with their indices: what a plan-time check
    looks at for shapes those stages will leave."""
    position = next((i for i, a in enumerate(recipe.stages) if a is args), 0)
    return list(enumerate(recipe.stages[:position]))


def check_widths_left(recipe, args: StageArgs, model, adapter, chosen: set[str], m: int, needs: str, field: str,
                      otherwise: str = "") -> None:
    """A stage needing the input widths of the Linears ``chosen`` divisible by ``m`` (``needs``: N:M
    sparsity, int4 groups) checks the widths earlier stages (structured pruning) can leave, not only
    the unpruned model's: each is a multiple of what that stage guarantees (`StageArgs.width_multiples`).
    ``otherwise``: a further way out the message offers."""
    for j, earlier in earlier_stages(recipe, args):
        bad = {n: k for n, k in earlier.width_multiples(model, adapter).items() if n in chosen and k % m}
        if bad:
            name, k = next(iter(bad.items()))
            raise RecipeError(
                f"stages[{j}] ({earlier.type}) can leave {len(bad)} targeted layers with input widths that are "
                f"multiples of {k} but not of {m} (e.g. {name}), which {needs} needs: give stages[{j}] an align that "
                f"is a multiple of {m} (MLP widths) or leave attention heads alone there (modules: mlp), or add "
                f"those layers to this stage's 'ignore'{otherwise}", field=field)


def graph_record(model: onnx.ModelProto, path: Path) -> dict:
    """What the manifest records about one graph file (its weight file's bytes count with the first graph)."""
    return {"path": path.name, "opset": opset(model), "ir_version": model.ir_version, **onnx_export.io_spec(model),
            "nodes": len(model.graph.node), "ops": sorted({n.op_type for n in model.graph.node}),
            "bytes": onnx_export.file_bytes(path)}


def export_inputs(ctx: RunContext, num_samples: int | None = None) -> list[tuple]:
    """Calibration-source samples at the export shapes, as the task model's positional inputs: what
    the parity check feeds both runtimes (and graph-level calibration, with ``num_samples``)."""
    ex = ctx.recipe.export
    spec = ctx.recipe.calibration.model_copy(update={
        "num_samples": num_samples or ex.batch_size * ex.parity_batches, "seq_len": ex.seq_len,
        "batch_size": ex.batch_size})
    batches = ctx.task.calibration_batches(ctx.preprocessor, spec, image_size=ex.image_size)
    module = ctx.task_model()
    return [module.example(b.inputs) for b in batches if b.size == ex.batch_size]


def built_engines(engine: dict) -> str:
    """The engines the export stage built on this machine, or that it built none."""
    return ", ".join(e["engine"] for e in engine["engines"]) if engine["built"] else "not built here"


def tensorrt_headline(trt: dict) -> dict:
    return {"target": trt["target"], "ready": trt["ok"], "sparse_2_4_layers": trt["sparse_2_4_layers"],
            "engine": built_engines(trt["build"]["engine"])}


def tensorrt_table(trt: dict) -> Table:
    engine = trt["build"]["engine"]
    rows = [[check, result] for check, result in trt["checks"].items()]
    rows += [["warning", str(w["message"])] for w in trt["warnings"]]
    rows.append(["2:4 sparse MatMul/Gemm weights", f"{trt['sparse_2_4_layers']} of {len(trt['sparsity'])}"])
    rows.append(["engine", f"{built_engines(engine)} ({engine['gpu']}, TensorRT {engine['tensorrt']})" if engine["built"]
                 else f"not built here: {engine['reason']}. On the device run build/build_engine.sh"])
    return Table(f"TensorRT readiness: {trt['target']} (TensorRT {trt['tensorrt']}, {trt['platform']})",
                 ["check", "result"], rows)


def parity_table(title: str, parity: dict) -> Table:
    return Table(title, ["samples", "max abs err", "max rel err", "rtol"],
                 [[parity["samples"], f"{parity['max_abs_err']:.3g}", f"{parity['max_rel_err']:.3g}",
                   "not gated" if parity["rtol"] is None else f"{parity['rtol']:g}"]])


def vlm_traced(ctx: RunContext) -> list[vlm.Traced]:
    """A VLM's three graphs' modules, traced on one calibration image and the first question behind its K
    placeholders (the export writes them; quantize gates its rewrites on them)."""
    ex = ctx.recipe.export
    spec = ctx.recipe.calibration.model_copy(update={"num_samples": 1, "batch_size": 1})
    pixels = ctx.task.calibration_images(ctx.preprocessor, spec, image_size=ex.image_size).batches[0].inputs
    processor = ctx.preprocessor
    k = image_count(ctx.model)
    row = prompt_ids(processor.tokenizer, QUESTIONS[0], processor.image_token_id, k)
    if len(row) > ex.seq_len:
        raise RecipeError(f"the prefill window must hold the {k} image tokens and the question ({len(row)} tokens "
                          f"for {QUESTIONS[0]!r}); raise seq_len to at least that", field="export.seq_len")
    ids = torch.zeros(1, ex.seq_len, dtype=torch.long)
    ids[0, :len(row)] = torch.tensor(row)
    assert ex.decoder is not None
    return vlm.traced(ctx.model, ctx.recipe.model, ctx.adapter, ex.decoder.max_len, pixels["pixel_values"], ids)
