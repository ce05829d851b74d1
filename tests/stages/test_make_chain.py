"""The Makefile's step targets chain in the pipeline's order (checked with `make -n`, nothing runs)."""
import shutil
import subprocess
from pathlib import Path

import pytest

from grpo.config import load_config
from stages.pipeline import PipelineConfig

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def planned(run: Path, *args: str) -> list[str]:
    """The step commands `make -n` prints (python -m ...), without the interpreter path."""
    proc = subprocess.run(["make", "-n", f"RUN={run}", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [line.split(" ", 1)[1].strip() for line in proc.stdout.splitlines() if " -m data." in line or " -m stages." in line]


def test_rl_general_runs_every_unfinished_step_in_order(tmp_path):
    assert planned(tmp_path, "rl_general") == [
        f"-m data.generate --out {tmp_path}/data",
        f"-m data.tokenizer --data {tmp_path}/data --out {tmp_path}/tokenizer",
        f"-m stages.sft --recipe recipes/tiny/sft.yaml tokenizer={tmp_path}/tokenizer",
        "-m stages.rl_reasoning --recipe recipes/tiny/rl_reasoning.yaml",
        "-m stages.rejection_sampling --recipe recipes/tiny/rejection_sampling.yaml",
        "-m stages.sft --recipe recipes/tiny/sft_rs.yaml",
        "-m stages.reward_model --recipe recipes/tiny/reward_model.yaml",
        "-m stages.rl_general --recipe recipes/tiny/rl_general.yaml",
    ]


def test_finished_steps_are_skipped_and_args_go_to_the_named_step_only(tmp_path):
    for step in ("data", "tokenizer", "sft", "rl_reasoning", "rejection_sampling"):
        (tmp_path / step).mkdir()
        (tmp_path / step / "DONE").write_text("{}")
    assert planned(tmp_path, "reward_model", "ARGS=train.lr=1e-5") == [
        "-m stages.sft --recipe recipes/tiny/sft_rs.yaml",
        "-m stages.reward_model --recipe recipes/tiny/reward_model.yaml  train.lr=1e-5",
    ]
    # SFT from the preset gets the run's tokenizer; from a model dir named in ARGS, that model keeps its own
    assert planned(tmp_path, "sft") == [f"-m stages.sft --recipe recipes/tiny/sft.yaml tokenizer={tmp_path}/tokenizer"]
    assert planned(tmp_path, "sft", "ARGS=model.init=/models/qwen") == [
        "-m stages.sft --recipe recipes/tiny/sft.yaml  model.init=/models/qwen"]


@pytest.mark.parametrize("size", ["tiny", "v3-mini"])
def test_make_steps_use_the_pipelines_stage_recipes(tmp_path, size):
    cfg = load_config(PipelineConfig, ROOT / f"recipes/{size}/pipeline.yaml")
    made = planned(tmp_path, "rl_general", f"SIZE={size}")
    for step in cfg.steps:
        if step.recipe and not step.name.startswith("eval_"):
            assert f"-m {step.module} --recipe {step.recipe}" in "\n".join(made), step.name
