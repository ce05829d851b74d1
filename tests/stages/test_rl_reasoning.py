import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import stages.rl_reasoning as rl
from data.generate import Sizes, write_all
from data.tokenizer import train_tokenizer
from grpo.checkpoint import export_model
from grpo.config import ConfigError
from grpo.model import ModelConfig, load_policy
from tests.stages.stop_signal import sigterm_after_first_step

ROOT = Path(__file__).resolve().parents[2]
SIZES = Sizes(math=24, math_test=4, math_rl=16, code=8, code_test=2, cot=20, general=4, general_test=2, pref=2, pref_test=2)
TOY_MODEL = {
    "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 2, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "n_group": 1, "topk_group": 1, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8, "v_head_dim": 8,
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Generated data, a tokenizer and a toy 'SFT checkpoint' (random weights, saved like stages.sft's final/)."""
    root = tmp_path_factory.mktemp("rl")
    paths = write_all(root / "data", seed=0, sizes=SIZES)
    train_tokenizer([p for name, p in paths.items() if name.endswith("_train")], root / "tok", vocab_size=400)
    tok = AutoTokenizer.from_pretrained(root / "tok")
    torch.manual_seed(0)
    export_model(root / "sft", load_policy(ModelConfig(overrides=TOY_MODEL, mtp_layers=1), tok), tok)
    return root


def args(workdir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--recipe", str(ROOT / "recipes/tiny/rl_reasoning.yaml"), f"model.init={workdir / 'sft'}",
        f"data=[{{path: {workdir / 'data/math_train.jsonl'}}}, {{path: {workdir / 'data/code_train.jsonl'}}}]",
        f"output_dir={out}", "wandb_mode=disabled", "sampling.max_new_tokens=12", "sampling.max_batch=16",
        "train.prompts_per_step=2", "train.group_size=4", "train.micro_batch_size=4", "train.minibatches=2",
        "train.max_steps=2", "train.save_every=1", "train.sample_every=1", "train.lr=0.001",
        f"eval.data={{path: {workdir / 'data/math_test.jsonl'}, limit: 2}}", "eval.max_new_tokens=8", "eval.every=0",
        *extra,
    ]


def test_entry_point_trains_saves_and_resumes(workdir, tmp_path):
    out = tmp_path / "rl"
    result = rl.main(args(workdir, out, "train.loss.beta=0.01"))
    assert result["steps"] == 2 and (out / "DONE").is_file() and (out / "eval.json").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for key in ("rewards/accuracy/mean", "rewards/format/mean", "reward", "kl", "clip_high", "entropy",
                "completions/mean_length", "frac_reward_zero_std", "sampling/rounds", "moe/max_vio_mean",
                "tokens_per_s/rollout", "time/step_s"):
        assert key in records[-1], key
    samples = [json.loads(line) for line in (out / "tables/completions.jsonl").read_text().splitlines()]
    assert {"prompt", "completion", "reward/accuracy", "reward/code", "advantage"} <= set(samples[0])
    # the next stage loads final/ with plain transformers
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    AutoTokenizer.from_pretrained(out / "final")
    assert model.config.model_type == "deepseek_v3"
    # resume from the latest checkpoint and continue to step 3
    again = rl.main(args(workdir, out, "train.loss.beta=0.01", "train.max_steps=3", "train.resume_from=latest"))
    assert again["steps"] == 3
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_bad_config_names_the_key(workdir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        rl.main(args(workdir, tmp_path, "train.minibatches=3"))
    assert "train.minibatches" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        rl.main(args(workdir, tmp_path, "think=true"))
    assert "think_prefilled" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        rl.main(args(workdir, tmp_path, "train.loss.epsilon_hi=0.3"))
    assert "train.loss.epsilon_hi" in capsys.readouterr().err


def test_help_lists_the_keys(capsys):
    with pytest.raises(SystemExit) as e:
        rl.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "train.loss.loss_type" in text and "train.dynamic_sampling" in text


def metric_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_rerun_after_a_crash_resumes_and_matches_the_uninterrupted_run(workdir, tmp_path, monkeypatch, capsys):
    same = ("train.max_steps=4", "train.save_every=2", "eval.data=null")
    full = rl.main(args(workdir, tmp_path / "full", *same))
    out = tmp_path / "run"
    real_step = rl.GRPOTrainer.train_step

    def die_in_step_4(self):
        if self.step == 3:
            raise RuntimeError("killed")  # after the checkpoint of step 2 and the metrics row of step 3
        return real_step(self)

    monkeypatch.setattr(rl.GRPOTrainer, "train_step", die_in_step_4)
    with pytest.raises(RuntimeError, match="killed"):
        rl.main(args(workdir, out, *same))
    assert metric_steps(out) == [1, 2, 3] and not (out / "DONE").exists()
    monkeypatch.setattr(rl.GRPOTrainer, "train_step", real_step)
    capsys.readouterr()
    torch.manual_seed(1234)  # whatever the RNG state, the checkpoint restores it
    again = rl.main(args(workdir, out, *same))  # the same command: resumes by default
    assert f"resumed from {out / 'checkpoints/step-00000002'} at step 2" in capsys.readouterr().out
    assert again["steps"] == 4 and metric_steps(out) == [1, 2, 3, 4]  # one row per step

    def rows(run):
        return {r["step"]: (r["loss"], r["reward"]) for r in
                (json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines())}

    a, b = rows("full"), rows("run")
    for step in (3, 4):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-7)
    wa = AutoModelForCausalLM.from_pretrained(tmp_path / "full/final").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-6, msg=name)
    assert full["steps"] == 4

    # another lr against the checkpoint: refused on one line naming the key, the finished run left as it was
    with pytest.raises(ConfigError, match="^train.resume_from: .* other values of train.lr;") as e:
        rl.main(args(workdir, out, *same, "train.lr=0.002", "train.max_steps=5"))
    assert "\n" not in str(e.value) and "max_steps" not in str(e.value)
    assert (out / "DONE").is_file() and metric_steps(out) == [1, 2, 3, 4]
    # a failed restart (bad data path) keeps the finished run's DONE and final/
    with pytest.raises((Exception, SystemExit)):
        rl.main(args(workdir, out, *same, f"data=[{{path: {tmp_path / 'missing.jsonl'}}}]"))
    assert (out / "DONE").is_file() and (out / "final/config.json").is_file()
    # resume_from=none starts over and removes the earlier run's checkpoints
    fresh = rl.main(args(workdir, out, "train.max_steps=1", "train.save_every=2", "eval.data=null",
                         "train.lr=0.002", "train.resume_from=none"))
    assert fresh["steps"] == 1 and metric_steps(out) == [1]
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000001"]


def test_sigterm_finishes_the_step_saves_and_exits_then_resumes(workdir, tmp_path):
    out = tmp_path / "rl"
    done = sigterm_after_first_step("stages.rl_reasoning",
                                    args(workdir, out, "train.max_steps=500", "train.save_every=0", "eval.data=null"), out)
    assert done.returncode == 143 and "stopped by SIGTERM" in done.stderr, done.stderr[-3000:]
    steps = metric_steps(out)
    n = steps[-1]
    assert steps == list(range(1, n + 1)) and n < 500
    assert (out / "checkpoints/latest").read_text() == f"step-{n:08d}" and not (out / "DONE").exists()
    again = rl.main(args(workdir, out, f"train.max_steps={n + 1}", "train.save_every=0", "eval.data=null"))
    assert again["steps"] == n + 1 and metric_steps(out) == list(range(1, n + 2))


def test_heldout_curve_is_logged_from_step_0_and_leaves_training_unchanged(workdir, tmp_path):
    plain, curved = tmp_path / "plain", tmp_path / "curved"
    rl.main(args(workdir, plain, "train.save_every=0"))
    rl.main(args(workdir, curved, "train.save_every=0", "eval.every=1", "eval.samples=2"))
    records = [json.loads(line) for line in (curved / "metrics.jsonl").read_text().splitlines()]
    points = [r for r in records if "heldout/pass@1" in r]
    assert [r["step"] for r in points] == [0, 1, 2]
    assert all(0 <= r["heldout/pass@1"] <= 1 and r["heldout/mean_tokens"] > 0 for r in points)
    # the curve samples with its own generator: the training steps are the same as without it, every logged
    # value but wall-clock ones (two runs with the same seed and thread count are identical)
    def logged(records):
        return [{k: v for k, v in r.items() if k != "time" and not k.startswith(("time/", "tokens_per_s", "heldout/"))} for r in records]
    base = [json.loads(line) for line in (plain / "metrics.jsonl").read_text().splitlines()]
    assert logged(r for r in records if "reward" in r) == logged(base)


def test_heldout_curve_under_deepspeed_is_refused(workdir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        rl.main(args(workdir, tmp_path / "x", "eval.every=5", "train.parallel.zero_stage=2"))
    assert "eval.every" in capsys.readouterr().err
