import json
import subprocess
import sys
from pathlib import Path

from data.generate import Sizes, write_all
from data.tokenizer import train_tokenizer
from grpo.checkpoint import export_model
from grpo.model import ModelConfig, load_policy
from stages.evaluate import score

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
    paths = write_all(tmp_path / "data", seed=0, sizes=Sizes(math=10, math_test=4, code=2, code_test=1, cot=20,
                                                               general=4, general_test=1, pref=2, pref_test=1))
    tokenizer = train_tokenizer([p for k, p in paths.items() if k.endswith("_train")], tmp_path / "tok", 400)
    model = load_policy(ModelConfig(overrides=TOY_MODEL), tokenizer)
    export_model(tmp_path / "ckpt", model, tokenizer)
    out = tmp_path / "eval/heldout.json"
    proc = subprocess.run(
        [sys.executable, "-m", "stages.evaluate", "--recipe", str(ROOT / "recipes/tiny/evaluate.yaml"),
         f"model.init={tmp_path / 'ckpt'}", f"heldout.data.path={paths['math_test']}", "heldout.max_new_tokens=6",
         f"output={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out accuracy: " in proc.stdout
    summary = json.loads(out.read_text())
    assert summary["n"] == 4 and 0 <= summary["accuracy"] <= 1 and summary["mean_tokens"] <= 6
    rows = [json.loads(line) for line in (out.parent / "heldout_rows.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {"prompt", "answer", "completion", "correct"} <= set(rows[0])


def test_missing_tokenizer_for_preset_is_a_config_error():
    proc = subprocess.run([sys.executable, "-m", "stages.evaluate", "model.init=tiny"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "config error: tokenizer: required when model.init is the preset 'tiny'" in proc.stderr
