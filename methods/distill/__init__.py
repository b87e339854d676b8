"""Knowledge distillation into a compressed model (docs/methods/recovery.md, distillation): the
training loop, with pruning masks held fixed; the losses belong to the tasks (tasks/)."""

from .loop import Settings, TrainState, batch_indices, distill, lr_factor, restore_masks, zero_masks

__all__ = ["Settings", "TrainState", "batch_indices", "distill", "lr_factor", "restore_masks", "zero_masks"]
