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

Problems with the dataset as a whole (missing file, unreadable or empty file, a mapped column that does
not exist, a required field with no column) always raise ``DataError``. Local ``.jsonl``/``.json``/``.csv``
files are checked before loading: a line that is not UTF-8 raises ``DataError`` naming the file and its
1-based line (under ``skip_invalid`` such a ``.jsonl`` line is dropped and counted in ``n_skipped``).

Mixing: see ``DataConfig`` (``weight``) and ``mix_by_weight``.
"""
from __future__ import annotations

import json
import logging
import math
import random
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from grpo.config import ConfigError, InputError

logger = logging.getLogger(__name__)

AnswerFormat = Literal["plain", "gsm8k", "boxed"]
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


class DataError(InputError):
    """A dataset or row that cannot be used; the message names the source (and row) and what is wrong."""


@dataclass(kw_only=True)
class DataConfig:
    """One dataset of a recipe. ``weight`` w > 0 scales the dataset's share of rows where a stage mixes a list
    of datasets (``data:``, ``prompts:``, ``general:``; ``mix_by_weight``): a dataset of n valid rows (after
    ``limit`` and validation) contributes ``max(1, round(w * n))`` rows (Python's round, half to even):
    floor(w) copies of every row, then the missing rows drawn without replacement (seeded by the stage's seed
    and the dataset's position in the list) and kept in file order. w = 1 (the default) is every row once, as
    without weights; 0.5 a random half; 2.5 every row twice plus a random half. The datasets follow each other
    in list order (the stages shuffle or stream the rows themselves). A single dataset (a held-out set) is read
    whole, whatever its weight."""

    path: str                                   # .jsonl/.json/.parquet/.csv file, a directory, or a hub dataset name
    name: str | None = None                     # hub subset (config name)
    split: str = "train"
    columns: dict[str, str] = field(default_factory=dict)   # our field -> dataset column
    answer_format: AnswerFormat = "plain"
    limit: int | None = None                    # keep the first N rows
    skip_invalid: bool = False                  # drop malformed rows (counted) instead of raising
    weight: float = 1.0                         # share of rows in a mixed list: round(weight * rows), see mix_by_weight

    def __post_init__(self):
        if not self.path:
            raise ConfigError("path", "must be a data file, a directory or a hub dataset name; got an empty string")
        if not self.weight > 0:
            raise ConfigError("weight", f"{self.path}: must be > 0 (1 = every row once, 0.5 = a random half, "
                                        f"2 = every row twice), got {self.weight}")
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
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return DataError(f"{path}: could not be loaded as {builder}: {reason}")


def _check_text_file(path: Path, skip_invalid: bool) -> list[int]:
    """Refuse an empty text data file and lines that are not UTF-8, naming the file and the 1-based line.
    Under ``skip_invalid`` the undecodable lines of a ``.jsonl`` file (one row per line) are returned
    instead, to be dropped; other formats cannot lose a line without breaking the file, so they raise."""
    bad, content = [], False
    with path.open("rb") as f:
        for n, line in enumerate(f, 1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                if skip_invalid and path.suffix.lower() == ".jsonl":
                    bad.append(n)
                    continue
                raise DataError(f"{path}: line {n}: not valid UTF-8 (byte 0x{line[e.start]:02x} at byte column "
                                f"{e.start + 1}); data files must be UTF-8 text (re-encode it, e.g. with iconv)"
                                + ("; skip_invalid drops such lines only in .jsonl files" if skip_invalid else "")
                                ) from None
            content = content or bool(text.strip())
    if not content:
        what = "one JSON object per line" if path.suffix.lower() == ".jsonl" else f"{path.suffix} data"
        detail = f"its {len(bad)} line(s) are not valid UTF-8" if bad else "no rows"
        raise DataError(f"{path}: empty data file ({detail}); expected {what}")
    return bad


def _load_file(path: Path, cfg: DataConfig):
    """A data file as a ``datasets.Dataset`` and the number of undecodable lines dropped (``skip_invalid``)."""
    import datasets

    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; allowed: {', '.join(FILE_BUILDERS)}")
    bad = _check_text_file(path, cfg.skip_invalid) if path.suffix.lower() != ".parquet" else []
    if bad:
        logger.warning("%s: dropping %d line(s) that are not valid UTF-8 (skip_invalid=True): line(s) %s", path,
                       len(bad), ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else ""))
    with tempfile.TemporaryDirectory() as tmp:
        data_file = path
        if bad:  # load a copy without the undecodable lines
            data_file, skip = Path(tmp, path.name), set(bad)
            with path.open("rb") as src, data_file.open("wb") as dst:
                dst.writelines(line for n, line in enumerate(src, 1) if n not in skip)
        try:
            ds = datasets.load_dataset(builder, data_files={cfg.split: str(data_file)}, split=cfg.split)
        except Exception as e:
            raise _unreadable(path, builder, e) from e
    return ds, len(bad)


def _load(cfg: DataConfig):
    """``(dataset, source, undecodable lines dropped)``; see ``load_dataset_split``."""
    import datasets

    path = Path(cfg.path)
    if path.is_file():
        ds, dropped = _load_file(path, cfg)
        return ds, str(path), dropped
    source = f"{cfg.path} (split {cfg.split!r})"
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if cfg.split not in ds:
                raise DataError(f"{path}: no split {cfg.split!r}; splits: {', '.join(ds)}")
            ds = ds[cfg.split]
        return ds, source, 0
    if not path.is_dir() and (path.suffix.lower() in FILE_BUILDERS or cfg.path.startswith(("/", "./", "../"))):
        raise DataError(f"{path}: no such file or directory")
    try:
        return datasets.load_dataset(cfg.path, cfg.name, split=cfg.split), source, 0
    except Exception as e:
        raise DataError(f"{source}: could not be loaded with datasets.load_dataset: {e}") from e


def load_dataset_split(cfg: DataConfig):
    """The ``datasets.Dataset`` that ``cfg`` points at, and a description of its source for messages. A local
    text file (.jsonl/.json/.csv) is checked first: empty, or a line that is not UTF-8, raises ``DataError``
    naming the file and line (under ``skip_invalid`` such ``.jsonl`` lines are dropped instead)."""
    ds, source, _ = _load(cfg)
    return ds, source


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
    ds, source, undecodable = _load(cfg)
    if len(ds) == 0:
        raise DataError(f"{source}: no rows")
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
    rows, skipped = [], undecodable
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
        logger.warning("%s: skipped %d malformed row(s) of %d (skip_invalid=True)", source, skipped,
                       len(ds) + undecodable)
    return Rows(rows, n_skipped=skipped, source=source)


def mix_by_weight(parts: list[list], weights: list[float], seed: int) -> list:
    """The datasets ``parts`` (lists of rows) in order, each scaled by its weight (see the module docstring):
    part i of n rows gives ``max(1, round(w_i * n))`` rows, floor(w_i) copies of every row and then a subset
    drawn without replacement with ``random.Random(f"{seed}/{i}")``, in file order."""
    mixed = []
    for i, (rows, w) in enumerate(zip(parts, weights, strict=True)):
        whole, target = math.floor(w), max(1, round(w * len(rows))) if rows else 0
        drawn = random.Random(f"{seed}/{i}").sample(range(len(rows)), target - whole * len(rows))
        mixed += list(rows) * whole + [rows[j] for j in sorted(drawn)]
    return mixed


def load_mixed(cfgs: list[DataConfig], required: list[str], seed: int) -> list[dict]:
    """``load_rows`` of every dataset in ``cfgs``, mixed by their weights (``mix_by_weight``)."""
    return mix_by_weight([load_rows(d, required) for d in cfgs], [d.weight for d in cfgs], seed)
