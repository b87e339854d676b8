"""The recipe's ``model`` section: where the model comes from and what it is for."""

from __future__ import annotations

import re
from typing import Literal, get_args

from pydantic import Field

from core.spec import Section

# The task names, here because models/ sits below tasks/ (whose registry must list the same: a test checks).
TaskName = Literal["causal-lm", "feature-extraction", "image-classification", "image-feature-extraction",
                   "image-text-to-text"]
TASKS: tuple[TaskName, ...] = get_args(TaskName)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_id_shaped(ref: str) -> bool:
    """``org/name``: a hub id, or a relative path of two parts (only the file system can tell which)."""
    return bool(_HUB_ID.match(ref))


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
    # Keep the weights in the safetensors files and read one block at a time (models/offload.py): for models
    # larger than memory. Blocks compute in calibration.dtype; only block-wise stages run (pipeline/recipe.py).
    offload: bool = False
