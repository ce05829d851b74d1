import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import stages.rl_general as rl
from data.generate import Sizes, write_all
from data.tokenizer import train_tokenizer
from grpo.checkpoint import export_model
from grpo.model import ModelConfig, load_policy
from rewards.registry import RewardScores

ROOT = Path(__file__).resolve().parents[2]
SIZES = Sizes(math=16, math_test=2, math_rl=16, code=4, code_test=1, cot=20, general=16, general_test=2, pref=2, pref_test=2)
TOY_MODEL = {
    "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 2, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "n_group": 1, "topk_group": 1, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8, "v_head_dim": 8,
}


def test_route_scores_sets_rewards_outside_their_sources_to_none():
    scores = RewardScores({"accuracy": [1.0, None, 0.0], "reward_model": [0.3, -0.2, 0.9], "format": [1.0, 0.0, 1.0]},
                          {"accuracy": 1.0, "reward_model": 0.5, "format": 0.2}, {"accuracy": 0, "reward_model": 0, "format": 0})
    routed = rl.route_scores(scores, ["math", "general", "code"], {"reward_model": ["general"], "format": ["math", "code"]})
    assert routed.per_reward == {"accuracy": [1.0, None, 0.0], "reward_model": [None, -0.2, None],
                                 "format": [1.0, None, 1.0]}
    assert routed.total() == pytest.approx([1.2, -0.1, 0.2])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Data, tokenizer, a toy 'SFT checkpoint' and a toy reward model built from it (random head)."""
    root = tmp_path_factory.mktemp("rlg")
    paths = write_all(root / "data", seed=0, sizes=SIZES)
    train_tokenizer([p for name, p in paths.items() if name.endswith("_train")], root / "tok", vocab_size=400)
    tok = AutoTokenizer.from_pretrained(root / "tok")
    torch.manual_seed(0)
    export_model(root / "sft", load_policy(ModelConfig(overrides=TOY_MODEL, mtp_layers=0), tok), tok)
    export_model(root / "rm", AutoModelForSequenceClassification.from_pretrained(root / "sft", num_labels=1), tok)
    return root


def test_entry_point_two_steps_logs_per_source(workdir, tmp_path):
    torch.set_num_threads(1)
    out, data = tmp_path / "rlg", workdir / "data"
    result = rl.main([
        "--recipe", str(ROOT / "recipes/tiny/rl_general.yaml"), f"model.init={workdir / 'sft'}",
        f"data=[{{path: {data / 'math_train.jsonl'}}}, {{path: {data / 'code_train.jsonl'}}}, "
        f"{{path: {data / 'general_train.jsonl'}}}]", f"reward_model={workdir / 'rm'}",
        f"output_dir={out}", "wandb_mode=disabled", "sampling.max_new_tokens=10", "sampling.max_batch=32",
        "train.prompts_per_step=6", "train.group_size=2", "train.micro_batch_size=6", "train.minibatches=2",
        "train.max_steps=2", "train.save_every=0", "train.sample_every=1", "train.seed=3", "eval.data=null",
    ])
    assert result["steps"] == 2 and (out / "DONE").is_file() and (out / "final/config.json").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seen = {k.split("/")[1] for r in records for k in r if k.startswith("by_source/")}
    assert "general" in seen and seen & {"math", "code"}
    for r in records:
        for key, value in r.items():
            if key.startswith("by_source/general/") and key.split("/")[2] in ("accuracy", "format"):
                raise AssertionError(f"{key}={value}: rule-based rewards must not score general rows")
    general = [r for r in records if "by_source/general/reward_model" in r]
    assert general and all(r["by_source/general/reward"] == pytest.approx(0.5 * r["by_source/general/reward_model"])
                           for r in general)
    samples = [json.loads(line) for line in (out / "tables/completions.jsonl").read_text().splitlines()]
    assert {"reward/reward_model", "reward/accuracy"} <= set(samples[0])


def test_unknown_reward_in_reward_sources_is_a_config_error(workdir, capsys):
    with pytest.raises(SystemExit):
        rl.main(["--recipe", str(ROOT / "recipes/tiny/rl_general.yaml"), f"model.init={workdir / 'sft'}",
                 "reward_sources={helpfulness: [general]}"])
    assert "reward_sources" in capsys.readouterr().err
