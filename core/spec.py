"""The base of every recipe section: unknown keys are errors, values are frozen once validated."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
