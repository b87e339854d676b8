"""Raw data in: the built-in offline text, local text files, folders of images, `datasets`.

The built-in text is two public-domain Jane Austen novels shipped with the package (from Debian's
``r-cran-janeaustenr``): *Northanger Abbey* for calibration and *Pride and Prejudice* for
evaluation, so the two never overlap. The Lee document-similarity benchmark lies in ``data/lee/``,
put there at install time by the Makefile (its provenance and why it is not in git:
``data/lee/README.md``); library code never downloads anything.
"""

from __future__ import annotations

import glob
import gzip
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calibration.spec import LOCAL_BUILDERS, DatasetSpec, DataSpec
from core.errors import RecipeError
from core.network import hub_unreachable

DATA = Path(__file__).parent / "data"
BUILTIN = {"calibration": "austen_northangerabbey.txt.gz", "evaluation": "austen_prideprejudice.txt.gz"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
MODALITY = {"builtin": "text", "files": "text", "images": "images"}  # what a source gives; "datasets" gives either


@dataclass
class TextData:
    text: str
    origin: str  # provenance recorded in the manifest


@dataclass
class ImageData:
    images: list  # PIL images
    labels: list[int] | None
    classes: list[str] | None
    origin: str


def load_text(spec: DataSpec, role: str, field: str) -> TextData:
    """All text of a source as one string (paragraphs separated by blank lines)."""
    if spec.source == "builtin":
        name = BUILTIN[role]
        return TextData(gzip.decompress((DATA / name).read_bytes()).decode("utf-8"), f"builtin:{name.removesuffix('.gz')}")
    if spec.source == "files":
        path = spec.required_path(field)
        files = text_files(path, field)
        return TextData("\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files),
                        f"files:{path} ({len(files)} file{'s' if len(files) > 1 else ''})")
    if spec.source == "datasets":
        d = spec.required_dataset(field)
        rows = _dataset(d, field)
        column = _column(d, rows.column_names, False, field)
        return TextData("\n\n".join(str(t) for t in rows[column] if t),
                        f"datasets:{d.name}/{d.config or '-'}[{d.split}].{column}")
    raise RecipeError(f"source {spec.source!r} holds images; this task needs text (builtin, files or datasets)",
                      field=f"{field}.source")


def load_images(spec: DataSpec, field: str) -> ImageData:
    """Images from a folder (class subfolders give labels) or a `datasets` image column."""
    from PIL import Image

    if spec.source == "images":
        path = spec.required_path(field)
        root = Path(path)
        files = image_files(path, field)
        subdirs = sorted({f.parent.relative_to(root).parts[0] for f in files if f.parent != root})
        labelled = bool(subdirs) and all(f.parent != root for f in files)
        labels = [subdirs.index(f.parent.relative_to(root).parts[0]) for f in files] if labelled else None
        images = [Image.open(f).convert("RGB") for f in files]
        return ImageData(images, labels, subdirs if labelled else None, f"images:{path} ({len(files)} files)")
    if spec.source == "datasets":
        d = spec.required_dataset(field)
        rows = _dataset(d, field)
        column = _column(d, rows.column_names, True, field)
        labels = list(rows[d.label_column]) if d.label_column else None
        return ImageData([im.convert("RGB") for im in rows[column]], labels, None,
                         f"datasets:{d.name}/{d.config or '-'}[{d.split}].{column}")
    raise RecipeError(f"source {spec.source!r} has no images; image tasks need source 'images' (a folder) "
                      "or 'datasets'", field=f"{field}.source")


def text_files(path: str, field: str) -> list[Path]:
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".txt", ".md", ".text"))
        if files:
            return files
        raise RecipeError(f"folder {path!r} has no .txt/.md files", field=f"{field}.path")
    raise RecipeError(f"no such file or folder {path!r}", field=f"{field}.path")


def image_files(path: str, field: str) -> list[Path]:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise RecipeError(f"no such folder {path!r} (a folder of images, optionally one subfolder per class)",
                          field=f"{field}.path")
    files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise RecipeError(f"folder {path!r} has no images ({', '.join(IMAGE_SUFFIXES)})", field=f"{field}.path")
    return files


def _column(d: DatasetSpec, columns: list[str], images: bool, field: str) -> str:
    """The column a task reads (images: ``column``, else one named "image"); the label column must exist too."""
    column = d.column if d.column in columns or not images else "image"
    if column not in columns:
        raise RecipeError(f"{'no image column' if images else 'column'} {d.column!r} in split {d.split!r}; "
                          f"columns: {', '.join(columns)}", field=f"{field}.dataset.column")
    if d.label_column is not None and d.label_column not in columns:
        raise RecipeError(f"label column {d.label_column!r} not in split {d.split!r}; columns: {', '.join(columns)}",
                          field=f"{field}.dataset.label_column")
    return column


def check_dataset(spec: DataSpec, images: bool, field: str) -> None:
    """Before any run folder exists: a `datasets` source's files, split and column are there. Local files are
    loaded here (datasets caches them for the run); a hub dataset is asked for its splits and features (no
    data downloaded), and refused at once when the Hub cannot be reached."""
    d = spec.required_dataset(field)
    if d.name in LOCAL_BUILDERS:
        for pattern in [d.data_files] if isinstance(d.data_files, str) else d.data_files or []:
            if not glob.glob(str(Path(pattern).expanduser())):
                raise RecipeError(f"no such file {pattern!r}", field=f"{field}.dataset.data_files")
        splits: dict[str, list[str] | None] = {k: v.column_names for k, v in _dataset(d, field, every_split=True).items()}
    else:
        unreachable = hub_unreachable()
        if unreachable:
            raise RecipeError(f"dataset {d.name!r} would come from the Hugging Face Hub, which is out of reach "
                              f"({unreachable}): read local files with name: text (or json, csv, parquet) and "
                              "data_files, or run where the Hub can be reached", field=f"{field}.dataset.name")
        splits = _hub_splits(d, field)
    if splits and d.split not in splits:
        raise RecipeError(f"split {d.split!r} not in the dataset; splits: {', '.join(splits)}",
                          field=f"{field}.dataset.split")
    columns = splits.get(d.split)
    if columns is not None:
        _column(d, columns, images, field)


def _hub_splits(d: DatasetSpec, field: str) -> dict[str, list[str] | None]:
    """Split names and columns from a hub dataset's metadata; empty when it states none."""
    import datasets

    try:
        info = datasets.load_dataset_builder(d.name, d.config).info
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise RecipeError(f"could not read dataset {d.name!r} (config {d.config!r}): {first}",
                          field=f"{field}.dataset") from None
    columns = list(info.features) if info.features else None
    return {name: columns for name in info.splits or {}}


def _dataset(d: DatasetSpec, field: str, every_split: bool = False) -> Any:
    """The recipe's split of the dataset, or with ``every_split`` all of them (a DatasetDict)."""
    try:
        import datasets
    except ImportError:
        raise RecipeError("source 'datasets' needs the datasets package: pip install 'edgeprune[datasets]'",
                          field=f"{field}.source") from None
    datasets.disable_progress_bars()  # "Generating train split" on stderr would precede a one-line error
    try:
        return datasets.load_dataset(d.name, d.config, split=None if every_split else d.split,
                                     data_files=d.data_files)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise RecipeError(f"could not load dataset {d.name!r} (config {d.config!r}, split {d.split!r}): {first}",
                          field=f"{field}.dataset") from None


def paragraphs(text: str, min_words: int = 8) -> list[str]:
    """Blank-line separated paragraphs, whitespace collapsed, short ones (headings, dialogue tags) dropped."""
    out = (" ".join(p.split()) for p in text.replace("\r\n", "\n").split("\n\n"))
    return [p for p in out if len(p.split()) >= min_words]


@dataclass
class LeeBenchmark:
    documents: list[str]
    similarity: list[list[float]]  # 50 x 50, upper triangle filled (human mean ratings in [0, 1])


LEE = DATA / "lee"
LEE_FILES = ("lee.cor", "similarities0-1.txt")
LEE_SOURCE = "gensim 4.4.0 test data (Lee et al. 2005)"


def lee_benchmark(folder: Path | None = None) -> LeeBenchmark:
    """The Lee et al. (2005) similarity set installed with the package (`make` fetches it into ``LEE``)."""
    folder = folder or LEE
    files = [folder / name for name in LEE_FILES]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise RecipeError(f"the Lee benchmark is not installed ({', '.join(missing)} missing from {folder}): "
                          "run 'make lee' (see calibration/data/lee/README.md), or set lee: false",
                          field="evaluation.lee")
    return read_lee(*files)


def read_lee(corpus: Path, ratings: Path) -> LeeBenchmark:
    docs = corpus.read_bytes().decode("latin-1").split("\n")
    rows = [[float(x) for x in line.split("\t")] for line in io.StringIO(ratings.read_text()) if line.strip()]
    if len(rows) != len(docs) or any(len(r) != len(docs) for r in rows):
        raise ValueError(f"Lee benchmark files disagree: {len(docs)} documents, {len(rows)} rating rows")
    return LeeBenchmark(docs, rows)
