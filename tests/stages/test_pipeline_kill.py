"""kill -9 of the whole pipeline in the middle of reasoning RL, then the same command again: the RL stage resumes
from its latest checkpoint and ends equal to an uninterrupted run, with one metrics row per step."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from safetensors.torch import load_file

import stages.pipeline as pipeline
from tests.stages.test_pipeline import ROOT, SMOKE

RL_STEPS = 4


def recipe(tmp_path: Path, run: Path, stop_after: str) -> Path:
    cfg = yaml.safe_load((ROOT / "recipes/tiny/pipeline.yaml").read_text())
    overrides = {**SMOKE, "rl_reasoning": [*SMOKE["rl_reasoning"], f"train.max_steps={RL_STEPS}", "train.save_every=1",
                                           "train.keep_last=10", "eval.every=0"]}
    cfg.update(run_dir=str(run), seed=1, step_overrides=overrides, threads=1, stop_after=stop_after, report=False)
    path = tmp_path / f"{run.name}-{stop_after}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_kill_9_mid_rl_then_rerun_equals_an_uninterrupted_pipeline(tmp_path):
    base = tmp_path / "base"
    pipeline.main(["--recipe", str(recipe(tmp_path, base, "eval_sft"))])  # data, tokenizer, SFT shared by both runs
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    shutil.copytree(base, killed)
    shutil.copytree(base, whole)
    pipeline.main(["--recipe", str(recipe(tmp_path, whole, "rl_reasoning"))])

    command = [sys.executable, "-m", "stages.pipeline", "--recipe", str(recipe(tmp_path, killed, "rl_reasoning"))]
    proc = subprocess.Popen(command, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    second = killed / "rl_reasoning/checkpoints/step-00000002/state.json"
    deadline = time.monotonic() + 600
    while not second.is_file():
        assert proc.poll() is None and time.monotonic() < deadline, "the pipeline ended before RL step 2 was saved"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the pipeline and the RL stage under it, mid-run
    proc.wait()
    assert not (killed / "rl_reasoning/DONE").exists()

    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    resumed = re.search(r"resumed from \S+ at step (\d+)", rerun.stdout)
    assert resumed and 2 <= int(resumed.group(1)) < RL_STEPS, rerun.stdout[-3000:]  # killed mid-RL
    assert "== sft: done" in rerun.stdout  # finished steps are skipped, not redone
    a, b = (load_file(run / "rl_reasoning/final/model.safetensors") for run in (killed, whole))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    rows = [json.loads(line) for line in (killed / "rl_reasoning/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, RL_STEPS + 1))
    reference = [json.loads(line) for line in (whole / "rl_reasoning/metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [r["loss"] for r in reference]
