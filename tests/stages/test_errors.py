"""Input problems found by a stage's entry point (``grpo.config.run``): one ``error:`` line on stderr naming the
file / key, exit status 2, before the policy loads; ``--debug`` gives the traceback instead.

``model.init`` is a half-written checkpoint (a tokenizer, no config.json or weights): a stage that got as far as
loading the policy would fail on it, so an error naming anything else was found before the policy loaded."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[2]
MATH = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1), "source": "math"} for i in range(6)]
GENERAL = [{"prompt": f"Say hi {i}.", "response": f"Hi {i}!", "source": "general"} for i in range(4)]
PREF = [{"prompt": f"Greet {i}.", "chosen": "Hello!", "rejected": "No.", "source": "general"} for i in range(4)]
UNKNOWN_KWARG = "rewards=[{name: 'rewards.length:overlong_penalty', kwargs: {bogus: 1}}]"  # checked when built


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("errors")
    files = {"math": write_jsonl(root / "math.jsonl", MATH), "general": write_jsonl(root / "general.jsonl", GENERAL),
             "pref": write_jsonl(root / "pref.jsonl", PREF), "no_source": write_jsonl(
                 root / "no_source.jsonl", [{"prompt": "What is 1 + 1?", "answer": "2"}])}
    train_tokenizer([files["math"], files["general"]], root / "half", vocab_size=300)  # no config.json, no weights
    return {**files, "half": str(root / "half"), "root": str(root)}


def stage(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def one_line_error(proc: subprocess.CompletedProcess, *names: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


def rl_reasoning(inputs, tmp_path, *extra):
    return stage("stages.rl_reasoning", f"model.init={inputs['half']}", f"data=[{{path: {inputs['math']}}}]",
                 f"eval.data={{path: {inputs['math']}}}", f"output_dir={tmp_path / 'out'}", "wandb_mode=disabled",
                 *extra)


def test_rl_reasoning_reaches_the_policy_only_with_good_inputs(inputs, tmp_path):
    one_line_error(rl_reasoning(inputs, tmp_path), inputs["half"], "config.json is missing")


def test_rl_reasoning_checks_data_rewards_and_checkpoints_first(inputs, tmp_path):
    missing = f"{inputs['root']}/missing.jsonl"
    one_line_error(rl_reasoning(inputs, tmp_path, f"data=[{{path: {inputs['math']}}}, {{path: {missing}}}]"),
                   missing, "no such file")
    one_line_error(rl_reasoning(inputs, tmp_path, UNKNOWN_KWARG), "rewards[0].kwargs.bogus", "allowed keys")
    one_line_error(rl_reasoning(inputs, tmp_path, f"train.resume_from={inputs['root']}/nowhere"),
                   "train.resume_from", f"no checkpoint at {inputs['root']}/nowhere")
    one_line_error(rl_reasoning(inputs, tmp_path, f"system_prompt=file:{inputs['root']}/none.txt"),
                   "system_prompt", f"{inputs['root']}/none.txt")


def test_debug_shows_the_traceback(inputs, tmp_path):
    proc = rl_reasoning(inputs, tmp_path, UNKNOWN_KWARG, "--debug")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def test_rl_general_checks_data_rewards_and_checkpoints_first(inputs, tmp_path):
    def rl_general(*extra):
        return stage("stages.rl_general", f"model.init={inputs['half']}", "reward_model=null",
                     "rewards=[{name: accuracy}]", "reward_sources={}", f"output_dir={tmp_path / 'out'}",
                     "wandb_mode=disabled", "eval.data=null", *extra)

    one_line_error(rl_general(f"data=[{{path: {inputs['no_source']}}}]"), inputs["no_source"], "source")
    one_line_error(rl_general(f"data=[{{path: {inputs['math']}}}]", UNKNOWN_KWARG), "rewards[0].kwargs.bogus")
    one_line_error(rl_general(f"data=[{{path: {inputs['math']}}}]", f"train.resume_from={inputs['root']}"),
                   "train.resume_from", "no checkpoint at")


def test_evaluate_checks_data_and_the_checkpoint_first(inputs, tmp_path):
    def evaluate(*extra):
        return stage("stages.evaluate", f"model.init={inputs['half']}", f"output={tmp_path / 'eval.json'}", *extra)

    one_line_error(evaluate(f"heldout.data={{path: {inputs['general']}}}"), inputs["general"], "answer")
    one_line_error(evaluate(f"heldout.data={{path: {inputs['math']}}}", f"model.init={inputs['root']}/gone"),
                   "model.init", "does not exist")


def test_rejection_sampling_checks_data_and_the_checkpoint_first(inputs, tmp_path):
    def rejection_sampling(*extra):
        return stage("stages.rejection_sampling", f"model.init={inputs['half']}",
                     f"general=[{{path: {inputs['general']}}}]", f"output_dir={tmp_path / 'rs'}", *extra)

    (tmp_path / "rs").mkdir()
    (tmp_path / "rs/DONE").write_text("{}")  # an earlier run's: kept through a refused re-run
    one_line_error(rejection_sampling(f"prompts=[{{path: {inputs['general']}}}]"), inputs["general"],
                   "source 'general'")
    assert (tmp_path / "rs/DONE").is_file()
    one_line_error(rejection_sampling(f"prompts=[{{path: {inputs['math']}}}]", f"model.init={inputs['root']}/gone"),
                   "model.init", "does not exist")


def test_reward_model_checks_data_and_the_checkpoint_first(inputs, tmp_path):
    def reward_model(*extra):
        return stage("stages.reward_model", f"model.init={inputs['half']}", f"output_dir={tmp_path / 'rm'}",
                     "wandb_mode=disabled", f"test={{path: {inputs['pref']}}}", *extra)

    one_line_error(reward_model(f"data=[{{path: {inputs['math']}}}]"), inputs["math"], "chosen")
    one_line_error(reward_model(f"data=[{{path: {inputs['pref']}}}]"), "model.init", "config.json is missing")


def test_run_reports_input_errors_in_one_line_and_lets_others_through(capsys):
    from data.loaders import DataError
    from grpo.config import run

    def main(argv):
        raise DataError("data/x.jsonl: row 3: field 'prompt' is empty\n(more)")

    with pytest.raises(SystemExit) as e:
        run(main, ["a=1"])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("error: data/x.jsonl: row 3: field 'prompt' is empty (more) "
                                       "(--debug shows the traceback)\n")
    with pytest.raises(DataError):
        run(main, ["--debug"])

    def broken(argv):
        raise KeyError("a bug, not an input problem")

    with pytest.raises(KeyError):
        run(broken, [])


def sft(inputs, tmp_path, *extra):
    conversations = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["answer"]}]}
        for r in MATH])
    return stage("stages.sft", f"model.init={inputs['half']}", f"data=[{{path: {conversations}}}]", "eval.data=null",
                 f"output_dir={tmp_path / 'out'}", "wandb_mode=disabled", *extra)


def test_sft_checks_data_and_checkpoints_first(inputs, tmp_path):
    one_line_error(sft(inputs, tmp_path), inputs["half"], "config.json is missing")
    missing = f"{inputs['root']}/missing.jsonl"
    one_line_error(sft(inputs, tmp_path, f"data=[{{path: {missing}}}]"), missing, "no such file")
    one_line_error(sft(inputs, tmp_path, f"train.resume_from={inputs['root']}/nowhere"),
                   "train.resume_from", f"no checkpoint at {inputs['root']}/nowhere")
