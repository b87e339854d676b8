"""The base of every recipe section: unknown keys are errors, values are frozen once validated.
Also the values of the run's ``device`` (checked here without torch; core/device.py resolves them)."""

import re

from pydantic import BaseModel, ConfigDict

DEVICES = "cpu, cuda, cuda:N (a GPU index) or auto (cuda when torch sees a GPU, else cpu)"
_DEVICE = re.compile(r"^(cpu|cuda|cuda:[0-9]{1,2}|auto)$")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_device(value: object) -> str:
    """``value`` when it names a device the ``device`` setting allows; a ValueError saying what is allowed else."""
    if not isinstance(value, str) or not _DEVICE.match(value):
        raise ValueError(f"use {DEVICES}")
    return value
