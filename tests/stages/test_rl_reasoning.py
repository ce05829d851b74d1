import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import stages.rl_reasoning as rl
from data.generate import Sizes, write_all
from data.tokenizer import train_tokenizer
from grpo.checkpoint import export_model
from grpo.model import ModelConfig, load_policy

ROOT = Path(__file__).resolve().parents[2]
SIZES = Sizes(math=24, math_test=4, math_rl=16, code=8, code_test=2, cot=20, general=4, general_test=2, pref=2, pref_test=2)
TOY_MODEL = {
    "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 2, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "n_group": 1, "topk_group": 1, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8, "v_head_dim": 8,
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
        f"eval.data={{path: {workdir / 'data/math_test.jsonl'}, limit: 2}}", "eval.max_new_tokens=8", *extra,
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
