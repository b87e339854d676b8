"""Architecture adapters: the only place that knows where heads and MLP channels live (one file per family)."""

from core.errors import RecipeError
from core.registry import import_members

from .base import FAMILIES, Adapter, Block, BlockShape, Projection, head_channels, linear, pretrained

import_members(__name__)  # each family module registers its adapter: adding a family is one new file
ADAPTERS: tuple[Adapter, ...] = tuple(FAMILIES)



def supported_model_types() -> list[str]:
    return [t for a in ADAPTERS for t in a.model_types]


def adapter_for(model_type: str, task: str) -> Adapter:
    """The adapter for a config's ``model_type``, or a RecipeError naming what is supported."""
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            if task not in adapter.tasks:
                raise RecipeError(
                    f"task {task!r} is not supported for {model_type!r} models; allowed: {', '.join(adapter.tasks)}",
                    field="model.task")
            return adapter
    raise RecipeError(
        f"architecture {model_type!r} is not supported; supported: {', '.join(supported_model_types())}",
        field="model.source")


__all__ = ["ADAPTERS", "Adapter", "Block", "BlockShape", "Projection", "adapter_for", "head_channels", "linear",
           "pretrained", "supported_model_types"]
