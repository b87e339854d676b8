"""The recipe's ``model`` section: where the model comes from and what it is for."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field

from core.spec import Section

# The task names, here because models/ sits below tasks/ (whose registry must list the same: a test checks).
TaskName = Literal["causal-lm", "feature-extraction", "image-classification", "image-feature-extraction"]
TASKS: tuple[TaskName, ...] = get_args(TaskName)


class ModelSpec(Section):
    """Where the model comes from and what it is for.

    ``source`` is a Hugging Face hub id, a local folder, a ``.gguf`` file (or a folder plus
    ``gguf_file``), or ``package:<module>/<path>`` for weights shipped inside an installed Python
    package (read by path; the package is never imported).
    """

    source: str = Field(min_length=1)
    task: TaskName
    gguf_file: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    pooling: Literal["mean", "cls"] = "mean"
    normalize: bool = True
