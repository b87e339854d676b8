"""The recipe's data sections: where calibration (and evaluation) samples come from, and their shapes."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from core.errors import RecipeError
from core.spec import Section

# `datasets` builders that read local files (``data_files``); any other name is a hub dataset, whose
# data_files are paths inside its repository.
LOCAL_BUILDERS = ("text", "json", "csv", "parquet", "arrow", "imagefolder")


class DatasetSpec(Section):
    """A `datasets` dataset: ``load_dataset(name, config, split=split, data_files=data_files)[column]``.

    ``name: text`` (or json, csv, parquet) with ``data_files`` reads local files without a hub.
    """

    name: str = Field(min_length=1)
    config: str | None = None
    data_files: str | list[str] | None = None
    split: str = "train"
    column: str = "text"
    label_column: str | None = None


class DataSpec(Section):
    """A data source: the built-in offline text, local files or image folders, or `datasets`."""

    source: Literal["builtin", "files", "images", "datasets"] = "builtin"
    path: str | None = None
    dataset: DatasetSpec | None = None
    seed: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _source_fields(self):
        if self.source in ("files", "images") and not self.path:
            raise ValueError(f"source '{self.source}' needs 'path' (a file or a folder)")
        if self.source == "datasets" and self.dataset is None:
            raise ValueError("source 'datasets' needs 'dataset: {name, config, split, column}'")
        if self.source in ("builtin", "datasets") and self.path:
            raise ValueError(f"'path' is only used with source 'files' or 'images', not '{self.source}'")
        return self

    def required_path(self, field: str) -> str:
        """``path`` of a 'files' or 'images' source (the validator requires it; the type cannot say so)."""
        if self.path is None:
            raise RecipeError(f"source '{self.source}' needs 'path' (a file or a folder)", field=f"{field}.path")
        return self.path

    def required_dataset(self, field: str) -> DatasetSpec:
        """``dataset`` of a 'datasets' source (the validator requires it; the type cannot say so)."""
        if self.dataset is None:
            raise RecipeError("source 'datasets' needs 'dataset: {name, config, split, column}'", field=f"{field}.dataset")
        return self.dataset


class CalibrationSpec(DataSpec):
    num_samples: int = Field(default=128, ge=1, le=100_000)
    seq_len: int = Field(default=128, ge=2, le=32_768)
    batch_size: int = Field(default=8, ge=1, le=4096)
    dtype: Literal["float32", "bfloat16"] = "float32"
