import json
import math
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import stages.reward_model as rm
from data.generate import Sizes, write_all
from data.tokenizer import train_tokenizer
from grpo.checkpoint import export_model
from grpo.model import ModelConfig, load_policy
from rewards.reward_model import RewardModelReward

ROOT = Path(__file__).resolve().parents[2]
TOY_MODEL = {
    "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 2, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "n_group": 1, "topk_group": 1, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8, "v_head_dim": 8,
}


def test_bradley_terry_loss_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 1.0])
    # -log sigmoid(d) = log(1 + e^-d) for d = 2, 0, -2
    expected = (math.log(1 + math.exp(-2)) + math.log(2) + math.log(1 + math.exp(2))) / 3
    assert rm.bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)
    assert rm.bradley_terry_loss(torch.tensor([50.0]), torch.tensor([0.0])).item() == pytest.approx(0.0, abs=1e-6)


def synthetic_pairs(n: int, seed: int) -> list[dict]:
    """Easy preferences: the chosen reply is one of a few polite phrases, the rejected one a rude phrase."""
    rng = random.Random(seed)
    good, bad = ["Sure, happy to help.", "Certainly, here it is.", "Of course."], ["Go away.", "No. Stop asking.", "Whatever."]
    return [{"prompt": f"What is {rng.randint(1, 99)} + {rng.randint(1, 99)}?", "chosen": rng.choice(good),
             "rejected": rng.choice(bad)} for _ in range(n)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rm")
    paths = write_all(root / "data", seed=0, sizes=Sizes(math=10, math_test=2, math_rl=16, code=2, code_test=1, cot=20, general=10,
                                                           general_test=2, pref=10, pref_test=2))
    tok = train_tokenizer([p for k, p in paths.items() if k.endswith("_train")], root / "tok", 400)
    torch.manual_seed(0)
    export_model(root / "policy", load_policy(ModelConfig(overrides=TOY_MODEL, mtp_layers=1), tok), tok)
    for name, n, seed in (("train", 64, 0), ("test", 32, 1)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in synthetic_pairs(n, seed)))
    return root


def test_training_raises_pairwise_accuracy_and_scores_like_the_reward(workdir, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "rm"
    summary = rm.main(["--recipe", str(ROOT / "recipes/tiny/reward_model.yaml"), f"model.init={workdir / 'policy'}",
                       f"data=[{{path: {workdir / 'train.jsonl'}}}]", f"test={{path: {workdir / 'test.jsonl'}}}",
                       f"output_dir={out}", "wandb_mode=disabled", "train.max_steps=30", "train.batch_size=8",
                       "train.lr=0.003", "train.warmup_steps=0", "train.log_every=5"])
    assert (out / "DONE").is_file() and summary["heldout_pairwise_accuracy"] >= 0.9
    assert summary["heldout_pairwise_accuracy_before"] is not None
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    # the saved model through the reward function gives the stage's own scores, pair by pair
    model = AutoModelForSequenceClassification.from_pretrained(out / "final").eval()
    assert type(model).__name__ == "DeepseekV3ForSequenceClassification"
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    tokenizer.truncation_side = "left"
    pairs = synthetic_pairs(6, 2)
    with torch.no_grad():
        chosen, rejected = rm.scores(model, rm.pair_batch(tokenizer, pairs, 256))
    reward = RewardModelReward(str(out / "final"), batch_size=4, device="cpu", max_length=256)
    got = reward([p["prompt"] for p in pairs] * 2, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs])
    assert got == pytest.approx(torch.cat([chosen, rejected]).tolist(), abs=1e-5)
    # a failed re-run (a bad data path) leaves the finished run's DONE and summary as they were
    done = (out / "DONE").read_text()
    with pytest.raises((Exception, SystemExit)):
        rm.main(["--recipe", str(ROOT / "recipes/tiny/reward_model.yaml"), f"model.init={workdir / 'policy'}",
                 f"data=[{{path: {tmp_path / 'missing.jsonl'}}}]", f"output_dir={out}", "wandb_mode=disabled"])
    assert (out / "DONE").read_text() == done and (out / "summary.json").is_file()


def test_preset_init_is_a_config_error(capsys):
    with pytest.raises(SystemExit):
        rm.main(["model.init=tiny"])
    assert "model.init" in capsys.readouterr().err
