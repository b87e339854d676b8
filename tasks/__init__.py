"""Tasks: what ``model.task`` means, one module per task (the registry in tasks/registry.py).

A task owns the data modality its sources must give, the deployed graph's inputs and outputs
(`TaskModel`), its calibration and evaluation batches, the transformers class and preprocessor it
loads, the gradient loss (GBLM) and the quality metrics against the dense model.
"""

from .base import HeldOut, Task
from .model import TaskModel
from .registry import TASKS, load_checkpoint

__all__ = ["TASKS", "HeldOut", "Task", "TaskModel", "load_checkpoint"]
