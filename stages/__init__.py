"""Stage registry: recipe ``type`` -> stage class (each declares its typed ``Args``)."""

from .awq import Awq
from .base import Stage, StageArgs, StageResult, Table
from .calibrate import Calibrate
from .distill import Distill
from .evaluate import Evaluate
from .export import Export
from .export_gguf import ExportGguf
from .gptq import Gptq
from .prune_structured import PruneStructured
from .prune_weights import PruneWeights
from .quantize import Quantize
from .smoothquant import SmoothQuant
from .token_prune import TokenPrune

REGISTRY: dict[str, type[Stage]] = {cls.type: cls for cls in (Calibrate, PruneStructured, PruneWeights, TokenPrune,
                                                                  Distill, SmoothQuant, Awq, Gptq, Export, ExportGguf,
                                                                  Quantize, Evaluate)}

__all__ = ["REGISTRY", "Stage", "StageArgs", "StageResult", "Table"]
