"""Metrics logging shared by every stage: `metrics.jsonl` + wandb (offline by default) + a tqdm bar.

    logger = MetricsLogger(run_dir, project="grpo", run_name="sft", config=cfg, total_steps=500)
    logger.log({"loss": 1.2, "lr": 3e-4}, step=10)                # one JSON line, wandb point, bar update
    logger.log_table("samples", [{"prompt": p, "completion": c, "reward": r}, ...], step=10)
    logger.close()

Files under `run_dir`: `metrics.jsonl` (one object per `log` call: {"step", "time" (seconds since the
logger started), **metrics}), `tables/<name>.jsonl` (one object per row, with "step"), and `wandb/`
Opening a logger keeps the rows of earlier runs up to `initial_step` (the step a run resumes from; 0: none)
and drops the later ones, which the run is about to write again: one row per step, however often it resumed.
(offline runs; `wandb sync run_dir/wandb/offline-run-*` uploads one later). Only the main process
(RANK 0, or `is_main=True`) writes or prints anything; other processes get a logger whose calls do nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

WandbMode = Literal["offline", "online", "disabled"]
WANDB_MODES = ("offline", "online", "disabled")
POSTFIX_KEYS = ("loss", "reward", "accuracy", "lr", "grad_norm", "tokens_per_s", "mismatch/k3")


def _jsonable(value: Any) -> Any:
    """Tensors/numpy scalars become Python numbers; NaN/inf become strings (JSON has no such numbers)."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def truncate_after(path: Path, step: int) -> None:
    """Drop the rows of a JSONL file whose "step" is beyond `step` (and a torn last line), atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if row.get("step", 0) <= step:
            kept.append(line + "\n")
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text("".join(kept))
    tmp.replace(path)


class MetricsLogger:
    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        project: str,
        run_name: str,
        config: Any = None,
        wandb_mode: WandbMode = "offline",
        total_steps: int | None = None,
        initial_step: int = 0,
        postfix_keys: tuple[str, ...] = POSTFIX_KEYS,
        is_main: bool | None = None,
    ):
        if wandb_mode not in WANDB_MODES:
            raise ValueError(f"wandb_mode must be one of {', '.join(WANDB_MODES)}; got {wandb_mode!r}")
        self.is_main = int(os.environ.get("RANK", "0")) == 0 if is_main is None else is_main
        self.run_dir = Path(run_dir)
        self.postfix_keys = postfix_keys
        self._start = time.time()
        self._wandb = None
        self._bar = None
        self._metrics_file = None
        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for path in [self.run_dir / "metrics.jsonl", *sorted((self.run_dir / "tables").glob("*.jsonl"))]:
            truncate_after(path, initial_step)
        self._metrics_file = open(self.run_dir / "metrics.jsonl", "a")
        if wandb_mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            if dataclasses.is_dataclass(config):
                config = dataclasses.asdict(config)
            self._wandb = wandb.init(
                project=project, name=run_name, config=config, dir=str(self.run_dir), mode=wandb_mode,
                reinit="create_new",
            )
        self._bar = tqdm(total=total_steps, initial=initial_step, desc=run_name, unit="step", dynamic_ncols=True)
        self._bar_step = initial_step

    def log(self, metrics: dict[str, Any], *, step: int) -> None:
        """Record `metrics` at `step` (monotonically non-decreasing across calls)."""
        if not self.is_main:
            return
        record = {"step": step, "time": round(time.time() - self._start, 3)}
        record.update({k: _jsonable(v) for k, v in metrics.items()})
        self._metrics_file.write(json.dumps(record) + "\n")
        self._metrics_file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)
        if step > self._bar_step:
            self._bar.update(step - self._bar_step)
            self._bar_step = step
        shown = {k: _format(record[k]) for k in self.postfix_keys if k in record}
        if shown:
            self._bar.set_postfix(shown, refresh=True)

    def log_table(self, name: str, rows: list[dict[str, Any]], *, step: int) -> None:
        """Append `rows` (dicts with the same keys, e.g. prompt/completion/reward) to `tables/<name>.jsonl`
        and log them as a wandb Table."""
        if not self.is_main or not rows:
            return
        table_dir = self.run_dir / "tables"
        table_dir.mkdir(exist_ok=True)
        with open(table_dir / f"{name}.jsonl", "a") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **{k: _jsonable(v) for k, v in row.items()}}) + "\n")
        if self._wandb is not None:
            import wandb

            columns = list(rows[0])
            table = wandb.Table(columns=columns, data=[[_jsonable(row.get(c)) for c in columns] for row in rows])
            self._wandb.log({name: table}, step=step)

    def write(self, message: str) -> None:
        """Print a line without breaking the progress bar."""
        if self.is_main:
            tqdm.write(message)

    def close(self) -> None:
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
