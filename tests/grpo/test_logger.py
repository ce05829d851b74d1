import json
from dataclasses import dataclass

import pytest
import torch

from grpo.logger import MetricsLogger


@dataclass(kw_only=True)
class Cfg:
    lr: float = 1e-3


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_and_tables_without_wandb(tmp_path, capsys):
    with MetricsLogger(tmp_path, project="p", run_name="unit", config=Cfg(), wandb_mode="disabled",
                       total_steps=3) as logger:
        logger.log({"loss": torch.tensor(1.5), "lr": 1e-3}, step=1)
        logger.log({"loss": float("nan")}, step=2)
        logger.log_table("samples", [{"prompt": "1+1", "completion": "2", "reward": 1.0}], step=2)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.5), (2, "nan")]
    assert rows[0]["lr"] == 1e-3 and rows[1]["time"] >= rows[0]["time"] >= 0
    assert read_jsonl(tmp_path / "tables" / "samples.jsonl") == [
        {"step": 2, "prompt": "1+1", "completion": "2", "reward": 1.0}
    ]
    assert "loss=1.5" in capsys.readouterr().err  # tqdm postfix on stderr


def test_wandb_offline_run_is_written(tmp_path):
    logger = MetricsLogger(tmp_path, project="p", run_name="unit", config=Cfg(), total_steps=2)
    logger.log({"loss": 1.0}, step=1)
    logger.log_table("samples", [{"prompt": "a", "completion": "b"}], step=1)
    logger.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 1


def test_non_main_process_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "run", project="p", run_name="r", total_steps=1, is_main=False)
    logger.log({"loss": 1.0}, step=1)
    logger.log_table("t", [{"a": 1}], step=1)
    logger.close()
    assert not (tmp_path / "run").exists()


def test_bad_wandb_mode():
    with pytest.raises(ValueError, match="wandb_mode must be one of offline, online, disabled"):
        MetricsLogger("unused", project="p", run_name="r", wandb_mode="cloud")


def test_reopening_keeps_rows_up_to_the_resumed_step(tmp_path):
    with MetricsLogger(tmp_path, project="p", run_name="a", wandb_mode="disabled", total_steps=4) as logger:
        for step in (1, 2, 3):
            logger.log({"loss": float(step)}, step=step)
            logger.log_table("samples", [{"completion": str(step)}], step=step)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # a row torn by a kill
    with MetricsLogger(tmp_path, project="p", run_name="a", wandb_mode="disabled", total_steps=4,
                       initial_step=2) as logger:  # resumed from the checkpoint of step 2
        logger.log({"loss": 30.0}, step=3)
    assert [(r["step"], r["loss"]) for r in read_jsonl(tmp_path / "metrics.jsonl")] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert [r["step"] for r in read_jsonl(tmp_path / "tables" / "samples.jsonl")] == [1, 2]
    MetricsLogger(tmp_path, project="p", run_name="a", wandb_mode="disabled").close()  # a fresh start
    assert read_jsonl(tmp_path / "metrics.jsonl") == []
