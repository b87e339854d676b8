"""What the ranks above 0 do under torchrun: serve the calibrate stage's dense passes, write nothing.

They plan the same recipe (a bad one fails on every rank alike) and load the same model, then compute
their shard of each dense pass rank 0 hands them (stages/calibrate.py, calibration/distributed.py),
and return when rank 0 says no calibrate stage is left. Rank 0 alone runs every stage and writes the
run folder, the statistics cache and the artifact.
"""

from __future__ import annotations

import torch

from calibration import distributed
from calibration.cache import state_digest
from models import loading as models
from models.adapters import Adapter
from models.spec import ModelSpec
from stages.calibrate import dense_statistics
from tasks import TASKS


def serve(spec: ModelSpec, source: models.Source, adapter: Adapter, device: torch.device,
          world: distributed.World) -> None:
    """Rank ``world.rank`` (above 0) of the run rank 0 executes, on the planned model and device."""
    device = world.device if device.type == "cuda" else device
    model, _ = models.load_model(spec, source, TASKS[spec.task])
    model = model.to(device)
    digest = state_digest(model)
    while True:
        job, model, digest = distributed.next_job(world, model, digest)
        if job is None:
            return
        dense_statistics(model, adapter, job, world)
