"""Hugging Face datasets saved with `save_to_disk` (a folder; a DatasetDict folder's split with --split): one item
per row of its Arrow files, read as Parquet rows are (`parquet.py`)."""

from __future__ import annotations

import json
from pathlib import Path

from . import InputError
from .parquet import Table


class Dataset(Table):
    name = "dataset"

    def recognise(self, path: Path) -> bool:
        return path.is_dir()

    def files(self, source) -> list[Path]:
        return dataset_files(source)


def dataset_files(source) -> list[Path]:
    """The Arrow files of the dataset folder (its split's, for a DatasetDict)."""
    folder = source.path
    dict_file = folder / "dataset_dict.json"
    if dict_file.is_file():
        splits = _json(dict_file).get("splits") or []
        if source.split is None:
            if len(splits) != 1:
                raise InputError(f"{folder} is a dataset with splits {', '.join(splits)}: choose one with --split")
            split = splits[0]
        elif source.split not in splits:
            raise InputError(f"{folder} has no split {source.split!r}; its splits: {', '.join(splits)}")
        else:
            split = source.split
        folder = folder / split
    elif source.split is not None:
        raise InputError(f"{folder} is a dataset without splits; leave out --split")
    state = folder / "state.json"
    if not state.is_file():
        raise InputError(f"{source.path} is a folder but not a dataset saved with save_to_disk (no state.json or "
                         "dataset_dict.json)")
    files = [folder / f["filename"] for f in _json(state).get("_data_files", [])]
    missing = [str(f) for f in files if not f.is_file()]
    if not files or missing:
        raise InputError(f"{folder}: the dataset's data files are missing ({', '.join(missing) or 'none listed'})")
    return files


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: {exc}") from None
    return data if isinstance(data, dict) else {}
