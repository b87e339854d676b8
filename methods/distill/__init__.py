"""Knowledge distillation into a compressed model (docs/methods/recovery.md, distillation): the
training loop, with pruning masks held fixed, and intermediate-layer terms; the output losses belong
to the tasks (tasks/)."""

from .layers import block_outputs, layer_mse
from .loop import Settings, TrainState, autocast, batch_indices, distill, lr_factor, restore_masks, zero_masks

__all__ = ["Settings", "TrainState", "autocast", "batch_indices", "block_outputs", "distill", "layer_mse", "lr_factor",
           "restore_masks", "zero_masks"]
