"""Load a dataset (local file, directory, or hub name) into validated rows that carry our field names.

``load_rows(cfg, required)`` returns a ``Rows`` (a ``list[dict]``; ``rows.n_skipped`` counts dropped rows):

1. load with ``datasets``: ``.jsonl``/``.json`` -> ``load_dataset("json", data_files=...)``, likewise
   ``.parquet`` and ``.csv``; a directory saved by ``save_to_disk`` -> ``load_from_disk``; any other
   directory or a name that is not a local path -> ``load_dataset(path, name, split=split)``;
2. keep the first ``limit`` rows (before validation);
3. copy each mapped column to our field name (``columns={"prompt": "question"}`` adds ``row["prompt"]``;
   the original columns stay); unmapped fields are looked up under their own name;
4. extract the answer: ``plain`` keeps it; ``gsm8k`` takes the text after the last ``####`` and removes
   thousands separators (``2,125`` -> ``2125``); ``boxed`` takes the contents of the last ``\\boxed{...}``
   (nested braces matched), e.g. of a MATH ``solution`` column mapped to ``answer``. For ``gsm8k``/``boxed``
   the full text is also kept as ``solution`` when the row has none;
5. validate each row: every required field present and a non-empty string (``answer`` may also be a
   number, converted to ``str``; ``messages`` must be a non-empty list of ``{role, content}`` strings,
   with no empty or whitespace-only assistant turn).
   A malformed row raises ``DataError`` naming the source, the 1-based row number and the problem,
   unless ``skip_invalid``: then it is dropped, counted in ``n_skipped`` and logged as a warning.

Problems with the dataset as a whole (missing file, unreadable file, a mapped column that does not
exist, a required field with no column) always raise ``DataError``.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from grpo.config import ConfigError

logger = logging.getLogger(__name__)

AnswerFormat = Literal["plain", "gsm8k", "boxed"]
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


class DataError(ValueError):
    """A dataset or row that cannot be used; the message names the source (and row) and what is wrong."""


@dataclass(kw_only=True)
class DataConfig:
    path: str                                   # .jsonl/.json/.parquet/.csv file, a directory, or a hub dataset name
    name: str | None = None                     # hub subset (config name)
    split: str = "train"
    columns: dict[str, str] = field(default_factory=dict)   # our field -> dataset column
    answer_format: AnswerFormat = "plain"
    limit: int | None = None                    # keep the first N rows
    skip_invalid: bool = False                  # drop malformed rows (counted) instead of raising

    def __post_init__(self):
        if not self.path:
            raise ConfigError("path", "must be a data file, a directory or a hub dataset name; got an empty string")
        if self.answer_format not in get_args(AnswerFormat):
            raise ConfigError("answer_format", f"must be one of {', '.join(get_args(AnswerFormat))}; "
                                               f"got {self.answer_format!r}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError("limit", f"must be >= 1 or null, got {self.limit}")


class Rows(list):
    """The valid rows (dicts); ``n_skipped``: malformed rows dropped under ``skip_invalid``; ``source``: where from."""

    def __init__(self, rows: list[dict], n_skipped: int = 0, source: str = ""):
        super().__init__(rows)
        self.n_skipped, self.source = n_skipped, source


def last_boxed(text: str) -> str | None:
    """Contents of the last ``\\boxed{...}`` with nested braces matched, or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed")
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin + 1:i]
    return None


def extract_answer(text: str, answer_format: AnswerFormat) -> str:
    """The final answer inside ``text`` per ``answer_format``; ValueError when there is none."""
    if answer_format == "plain":
        return text
    if answer_format == "gsm8k":
        if "####" not in text:
            raise ValueError("answer has no '#### <final answer>' line (answer_format=gsm8k)")
        return _THOUSANDS.sub("", text.rpartition("####")[2].strip())
    boxed = last_boxed(text)
    if boxed is None:
        raise ValueError("answer text has no complete \\boxed{...} (answer_format=boxed)")
    return boxed


def _unreadable(path: Path, builder: str, error: Exception) -> DataError:
    if builder == "json" and path.suffix.lower() == ".jsonl":
        with path.open(encoding="utf-8", errors="replace") as f:
            rows = (line for line in f if line.strip())
            for n, line in enumerate(rows, 1):
                try:
                    json.loads(line)
                except json.JSONDecodeError as e:
                    return DataError(f"{path}: row {n}: invalid JSON ({e.msg} at column {e.colno})")
    return DataError(f"{path}: could not be loaded as {builder}: {error}")


def load_dataset_split(cfg: DataConfig):
    """The ``datasets.Dataset`` that ``cfg`` points at, and a description of its source for messages."""
    import datasets

    path = Path(cfg.path)
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; allowed: {', '.join(FILE_BUILDERS)}")
        try:
            return datasets.load_dataset(builder, data_files={cfg.split: str(path)}, split=cfg.split), str(path)
        except Exception as e:
            raise _unreadable(path, builder, e) from e
    source = f"{cfg.path} (split {cfg.split!r})"
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if cfg.split not in ds:
                raise DataError(f"{path}: no split {cfg.split!r}; splits: {', '.join(ds)}")
            ds = ds[cfg.split]
        return ds, source
    if not path.is_dir() and (path.suffix.lower() in FILE_BUILDERS or cfg.path.startswith(("/", "./", "../"))):
        raise DataError(f"{path}: no such file or directory")
    try:
        return datasets.load_dataset(cfg.path, cfg.name, split=cfg.split), source
    except Exception as e:
        raise DataError(f"{source}: could not be loaded with datasets.load_dataset: {e}") from e


def _check_field(row: dict, name: str, column: str) -> None:
    value = row.get(name)
    what = f"field {name!r}" + (f" (column {column!r})" if column != name else "")
    if value is None:
        raise ValueError(f"{what} is missing or null")
    if name == "messages":
        if not isinstance(value, list) or not value:
            raise ValueError(f"{what} must be a non-empty list of {{role, content}} messages, got {value!r:.60}")
        for i, m in enumerate(value):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise ValueError(f"{what}: message {i} must have string 'role' and 'content', got {m!r:.60}")
            if m["role"] == "assistant" and not m["content"].strip():
                raise ValueError(f"{what}: message {i} is an empty assistant turn; assistant content must be "
                                 "non-empty text (it is what SFT trains on)")
        return
    if name == "answer" and isinstance(value, (int, float)) and not isinstance(value, bool):
        row[name] = value = str(value)
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__} {value!r:.60}")
    if not value.strip():
        raise ValueError(f"{what} is empty")


def load_rows(cfg: DataConfig, required: list[str]) -> Rows:
    """Load, map, extract answers and validate (see the module docstring). ``required``: our field names
    every row must have, e.g. ``["prompt", "answer"]``."""
    ds, source = load_dataset_split(cfg)
    if cfg.limit is not None:
        ds = ds.select(range(min(cfg.limit, len(ds))))
    available = ", ".join(ds.column_names)
    bad = [f"{ours} -> {col}" for ours, col in cfg.columns.items() if col not in ds.column_names]
    if bad:
        raise DataError(f"{source}: columns mapping names missing column(s) {', '.join(bad)}; available: {available}")
    needed = list(dict.fromkeys([*required, *(["answer"] if cfg.answer_format != "plain" else [])]))
    sources = {name: cfg.columns.get(name, name) for name in needed}
    absent = [name for name, col in sources.items() if col not in ds.column_names]
    if absent:
        raise DataError(f"{source}: no column for required field(s) {', '.join(absent)}; columns: {available}; "
                        f"map them with columns, e.g. columns={{{absent[0]!r}: '<column>'}}")
    rows, skipped = [], 0
    for n, raw in enumerate(ds, 1):
        row = dict(raw)
        row.update({ours: raw[col] for ours, col in cfg.columns.items()})
        try:
            if cfg.answer_format != "plain":
                _check_field(row, "answer", sources["answer"])
                row.setdefault("solution", row["answer"])
                row["answer"] = extract_answer(row["answer"], cfg.answer_format)
            for name in needed:
                _check_field(row, name, sources[name])
        except ValueError as e:
            if not cfg.skip_invalid:
                raise DataError(f"{source}: row {n}: {e}") from None
            skipped += 1
            continue
        rows.append(row)
    if skipped:
        logger.warning("%s: skipped %d malformed row(s) of %d (skip_invalid=True)", source, skipped, len(ds))
    return Rows(rows, n_skipped=skipped, source=source)
