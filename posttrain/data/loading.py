"""Load a dataset from anywhere `datasets` can, with errors that name the source, split or row.

source                                   how
a `datasets.Dataset` / `DatasetDict`     used as is (a lone Dataset is the split "train")
a list of dicts                          `Dataset.from_list` (the split "train")
a .json/.jsonl/.parquet/.csv file        `load_dataset(<builder>, data_files=path)` (the split "train");
                                         CSV columns are read as strings (`label` as bool)
a folder of such files                   `load_dataset(folder)`: splits from the file names
                                         (train.jsonl, test.jsonl, ...), as `datasets` infers them
anything else (a str)                    a Hugging Face Hub id: `load_dataset(source, name, split=...)`
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
# owner/name or name: what a Hub id can look like (a path that does not exist and fits this is tried on the Hub)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def looks_like_hub_id(text: str) -> bool:
    """ "name" or "org/name"; not a path (which starts with / . or ~, or has more than one separator)."""
    return _HUB_ID.match(text) is not None


class MissingSplitError(ValueError):
    """The requested split is not in the source; `available` lists the ones that are."""

    def __init__(self, message: str, available: list[str]):
        super().__init__(message)
        self.available = available


def load(source, *, name: str | None = None, split: str | None = None, data_files=None):
    """Load `source` (see the module docstring): a `Dataset` when `split` is given, else a `DatasetDict`.

    Raises FileNotFoundError for a path that does not exist and is not a Hub id, ValueError for an
    unsupported file extension, an empty dataset, a missing split (MissingSplitError, listing the
    available ones), or a Hub id the Hub cannot provide (offline, unknown, gated).
    """
    if _is_hub(source):
        return _load_hub(source, name, split, data_files)
    splits = _load_local(source, name, data_files)
    label = _label(source)
    if split is None:
        for split_name, ds in splits.items():
            _check_not_empty(ds, label, split_name)
        return splits
    return _pick(splits, split, label)


def config_splits(config):
    """(train, eval) datasets named by a loop's config (dataset_name, dataset_config, dataset_train_split,
    dataset_test_split). A split the user named, or evaluation the user asked for (eval_steps), must exist:
    no silent skip; the default "test" split may be absent (eval is then None)."""
    return load_splits(
        config.dataset_name,
        name=config.dataset_config,
        train_split=config.dataset_train_split,
        eval_split=config.dataset_test_split,
        require_eval=config.dataset_test_split != "test" or bool(config.eval_steps),
    )


def load_splits(
    source,
    *,
    name: str | None = None,
    train_split: str = "train",
    eval_split: str | None = "test",
    require_eval: bool = False,
    data_files=None,
):
    """(train, eval) datasets from `source`; eval is None when `eval_split` is None or absent.

    require_eval=True turns an absent eval split into a MissingSplitError.
    """
    if eval_split is None and require_eval:
        raise ValueError("require_eval=True needs an eval_split name, got eval_split=None")
    if _is_hub(source):
        train = _load_hub(source, name, train_split, data_files)
        get = lambda split: _load_hub(source, name, split, data_files)
    else:
        splits = _load_local(source, name, data_files)
        train = _pick(splits, train_split, _label(source))
        get = lambda split: _pick(splits, split, _label(source))
    if eval_split is None:
        return train, None
    try:
        return train, get(eval_split)
    except MissingSplitError:
        if require_eval:
            raise
        return train, None


# ---------------------------------------------------------------------------------------------------------


def _is_hub(source) -> bool:
    """A str that names no local file or folder: a Hub id, or a missing path (raises FileNotFoundError)."""
    if not isinstance(source, (str, os.PathLike)):
        return False
    if not os.fspath(source).strip():  # Path("") is the current folder
        raise ValueError("the dataset source is an empty string")
    path = Path(source).expanduser()
    if path.exists():
        return False
    text = os.fspath(source)
    if isinstance(source, os.PathLike) or not looks_like_hub_id(text) or path.suffix.lower() in BUILDERS:
        raise FileNotFoundError(
            f"{text!r} is neither an existing file or folder nor a Hugging Face Hub dataset id"
        )
    return True


def _label(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return repr(os.fspath(source))
    return f"the in-memory {type(source).__name__}"


def _load_hub(source: str, name, split, data_files):
    import datasets

    try:
        out = datasets.load_dataset(source, name, split=split, data_files=data_files)
    except ValueError as e:
        if split is not None and "Unknown split" in str(e):
            # datasets' message already lists the available splits ("Should be one of [...]")
            raise MissingSplitError(f"{source!r} has no split {split!r}: {e}", available=[]) from e
        raise
    except Exception as e:  # offline, unknown id, gated, ...: name what was tried
        raise ValueError(
            f"could not load {source!r}: it is not a local file or folder, and the Hugging Face Hub "
            f"could not provide it ({type(e).__name__}: {e})"
        ) from e
    if split is not None:
        _check_not_empty(out, repr(source), split)
    else:
        for split_name, ds in out.items():
            _check_not_empty(ds, repr(source), split_name)
    return out


def _load_local(source, name, data_files):
    """A DatasetDict from an in-memory object, a local file or a local folder."""
    import datasets

    if isinstance(source, datasets.DatasetDict):
        return source
    if isinstance(source, datasets.Dataset):
        return datasets.DatasetDict({"train": source})
    if isinstance(source, list):
        return datasets.DatasetDict({"train": _from_list(source)})
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            "source must be a Hub id or a path (str), a datasets.Dataset / DatasetDict or a list of dicts, "
            f"got {type(source).__name__}"
        )
    if name is not None:
        raise ValueError(
            f"name={name!r} selects a Hub dataset configuration; {_label(source)} is a local path"
        )
    path = Path(source).expanduser()
    if path.is_file():
        if data_files is not None:
            raise ValueError(f"data_files is for Hub ids and folders; {_label(source)} is a single file")
        builder = _builder(path)
        if path.stat().st_size == 0:
            raise ValueError(f"file {_label(source)} is empty")
        try:
            return datasets.load_dataset(builder, data_files=str(path), features=_csv_features([path]))
        except Exception as e:  # a parser error deep in datasets: say which file and which reader
            raise _read_error(f"file {_label(source)}", f"as {builder}", e) from e
    found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    suffixes = sorted({p.suffix.lower() for p in found if p.suffix.lower() in BUILDERS})
    if not suffixes:
        seen = sorted({p.suffix or p.name for p in found})
        raise ValueError(
            f"folder {_label(source)} holds no {'/'.join(BUILDERS)} files (found: {seen or 'nothing'})"
        )
    if len({BUILDERS[s] for s in suffixes}) > 1:
        raise ValueError(f"folder {_label(source)} mixes file types {suffixes}; keep one type per folder")
    csv_files = [p for p in found if p.suffix.lower() == ".csv"]
    try:
        return datasets.load_dataset(
            str(path.resolve()), data_files=data_files, features=_csv_features(csv_files)
        )
    except Exception as e:
        raise _read_error(f"folder {_label(source)}", f"({', '.join(suffixes)} files)", e) from e


def _read_error(what: str, reader: str, error: Exception) -> ValueError:
    """One line for a local file or folder that `datasets` could not read."""
    if isinstance(error, ValueError) and "corresponds to no data" in str(error):
        # datasets' words for a file or split without rows (blank lines, `[]`, a CSV header alone)
        return ValueError(f"{what} holds no rows ({error})")
    # DatasetGenerationError says only "An error occurred while generating the dataset": its cause says what.
    cause = error.__cause__ if error.__cause__ is not None else error
    return ValueError(f"could not read {what} {reader}: {type(cause).__name__}: {cause}")


def _csv_features(paths: list[Path]):
    """Typed columns for CSV files, whose cells carry no type: text stays text ("007" is not 7), except a
    `label` column, read as bool (unpaired preference). None for other files (their types are stored)."""
    import csv

    from datasets import Features, Value

    if not paths or paths[0].suffix.lower() != ".csv":
        return None
    with open(paths[0], newline="") as f:
        header = next(csv.reader(f), None)
    if not header:
        return None
    return Features({c: Value("bool") if c == "label" else Value("string") for c in header})


def _builder(path: Path) -> str:
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(
            f"unsupported file extension {path.suffix!r} for {str(path)!r}; supported: {', '.join(BUILDERS)}"
        )
    return builder


def _from_list(rows: list):
    from datasets import Dataset

    if not rows:
        raise ValueError("the list of rows is empty")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"row {i} of the list is a {type(row).__name__}, expected a dict")
    try:
        return Dataset.from_list(rows)
    except Exception as e:  # Arrow needs one type per column: name the first row that disagrees with row 0
        first = rows[0]
        for i, row in enumerate(rows):
            for key, value in row.items():
                if key in first and value is not None and first[key] is not None:
                    if type(value) is not type(first[key]):
                        raise ValueError(
                            f"row {i}: field {key!r} is a {type(value).__name__} but row 0 has a "
                            f"{type(first[key]).__name__}; a column holds one type"
                        ) from e
        raise ValueError(f"could not build a dataset from the list of rows: {e}") from e


def _pick(splits, split: str, label: str):
    if split not in splits:
        available = list(splits)
        raise MissingSplitError(f"{label} has no split {split!r}; available splits: {available}", available)
    ds = splits[split]
    _check_not_empty(ds, label, split)
    return ds


def _check_not_empty(ds, label: str, split: str) -> None:
    if len(ds) == 0:
        raise ValueError(f"split {split!r} of {label} is empty (0 rows)")
