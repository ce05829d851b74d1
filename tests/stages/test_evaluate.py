import json
import subprocess
import sys
from pathlib import Path

from data.generate import Sizes, write_all
from data.tokenizer import train_tokenizer
from grpo.checkpoint import export_model
from grpo.model import ModelConfig, load_policy
import pytest

from stages.evaluate import majority_answer, paired_difference, pass_at_k, score, score_source

ROOT = Path(__file__).resolve().parents[2]
TOY_MODEL = {
    "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 2, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "n_group": 1, "topk_group": 1, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8, "v_head_dim": 8,
}


def test_score_counts_equivalent_answers_and_groups():
    rows = [
        {"prompt": "What is 1/2 + 1/4?", "answer": "0.75", "difficulty": 3},
        {"prompt": "What is 2 + 2?", "answer": "4", "difficulty": 1},
        {"prompt": "What is 3 + 3?", "answer": "6", "difficulty": 1},
        {"prompt": "What is 5 * 5?", "answer": "25", "difficulty": 1},
    ]
    completions = [
        "<think>\n2/4 + 1/4\n</think>\nThe answer is \\boxed{\\frac{3}{4}}.",  # equivalent form
        "<think>\n2 + 2 = 4\n</think>\nThe answer is \\boxed{5}.",  # wrong
        "<think>\n3 + 3 = 6",  # cut before any answer
        "The answer is \\boxed{25} or \\boxed{24}.",  # hedged
    ]
    out = score(rows, completions, ["stop", "stop", "length", "stop"], [20, 18, 160, 12])
    assert [r["correct"] for r in out["rows"]] == [True, False, False, False]
    assert out["summary"] == {
        "accuracy": 0.25, "n": 4, "correct": 1, "truncated": 0.25, "mean_tokens": 52.5,
        "by_difficulty": {"1": 0.0, "3": 1.0},
    }


def test_entry_point_scores_a_checkpoint(tmp_path):
    paths = write_all(tmp_path / "data", seed=0, sizes=Sizes(math=10, math_test=4, math_rl=16, code=2, code_test=1, cot=20,
                                                               general=4, general_test=1, pref=2, pref_test=1))
    tokenizer = train_tokenizer([p for k, p in paths.items() if k.endswith("_train")], tmp_path / "tok", 400)
    model = load_policy(ModelConfig(overrides=TOY_MODEL), tokenizer)
    export_model(tmp_path / "ckpt", model, tokenizer)
    out = tmp_path / "eval/heldout.json"
    proc = subprocess.run(
        [sys.executable, "-m", "stages.evaluate", "--recipe", str(ROOT / "recipes/tiny/evaluate.yaml"),
         f"model.init={tmp_path / 'ckpt'}", f"heldout.data.path={paths['math_test']}", "heldout.max_new_tokens=6",
         f"code.path={paths['code_test']}",
         f"output={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out accuracy: " in proc.stdout
    summary = json.loads(out.read_text())
    assert summary["n"] == 4 and 0 <= summary["accuracy"] <= 1 and summary["mean_tokens"] <= 6
    # the recipe's headline is pass@1 from 4 samples, with greedy accuracy and standard errors next to it
    assert summary["metric"].startswith("pass@1 from 4 samples") and 0 <= summary["greedy_accuracy"] <= 1
    assert summary["accuracy_se"] >= 0 and summary["greedy_se"] >= 0
    assert summary["by_source"]["code"] == 0.0 and "| code |" in out.with_suffix(".md").read_text()
    rows = [json.loads(line) for line in (out.parent / "heldout_rows.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and {"prompt", "answer", "completion", "correct", "greedy_correct"} <= set(rows[0])
    assert len(rows[0]["completions"]) == 4


def test_missing_tokenizer_for_preset_is_a_config_error():
    proc = subprocess.run([sys.executable, "-m", "stages.evaluate", "model.init=tiny"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "config error: tokenizer: required when model.init is the preset 'tiny'" in proc.stderr


def test_pass_at_k_by_hand():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2) = 0.7
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(4, 1, 4) == 1.0  # fewer wrong samples than k: some draw always holds the right one
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_paired_difference_by_hand():
    d, se = paired_difference([0.5, 0.0, 1.0, 0.25], [0.75, 0.5, 1.0, 0.25])
    # differences 0.25, 0.5, 0, 0: mean 0.1875; sample variance (0.0039 + 0.0977 + 0.0352 * 2) / 3 = 0.0573
    assert d == pytest.approx(0.1875) and se == pytest.approx((0.171875 / 3 / 4) ** 0.5)
    with pytest.raises(ValueError, match="equally long"):
        paired_difference([1.0], [1.0, 0.0])


def test_majority_vote_clusters_equivalent_answers():
    assert majority_answer(["3", "0.5", "\\frac{1}{2}", None, "3", "1/2"]) == "0.5"  # 3 votes for a half
    assert majority_answer(["3", "4"]) == "3"  # a tie goes to the answer seen first
    assert majority_answer([None, None]) is None


def test_pass_and_cons_at_k_from_samples():
    def s(answer):
        return {"completion": f"<think>\nwork\n</think>\nThe answer is \\boxed{{{answer}}}.", "finish_reason": "stop",
                "tokens": 10}
    rows = [{"prompt": "p1", "answer": "5"}, {"prompt": "p2", "answer": "7"}]
    summary, results = score_source("math", rows, [s(5), s(5), s(4), s(1), s(2), s(7)], k=3, ks=[1, 2, 3])
    assert summary["pass@1"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert summary["pass@1_se"] == pytest.approx(1 / 6)  # shares 2/3, 1/3: std sqrt(2 * (1/6)^2 / 1), / sqrt(2)
    assert summary["pass@2"] == pytest.approx((1 + (1 - 1 / 3)) / 2)  # row 2: 1 - C(2,2)/C(3,2)
    assert summary["pass@3"] == 1.0
    assert summary["cons@3"] == 0.5  # row 1: majority 5; row 2: a three-way tie goes to 1
    assert [r["majority"] for r in results] == ["5", "1"]
    assert summary["format"] == 1.0 and summary["mean_tokens"] == 10 and summary["truncated"] == 0
