"""bench/rollout.py as a user runs it, at tiny shapes on the CPU anchor (the benchmark's own hooks into the engine
break silently when the engine changes: this runs them)."""
import json
import subprocess
import sys
from pathlib import Path

from transformers import AutoTokenizer

from data.generate import Sizes, write_all
from data.tokenizer import train_tokenizer
from grpo.model import ModelConfig, load_policy

ROOT = Path(__file__).resolve().parents[2]


def bench(*args: str) -> list[dict]:
    run = subprocess.run([sys.executable, "bench/rollout.py", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


def test_long_tail_forces_the_drawn_lengths_on_both_sides_with_refill():
    """--long-tail: 6 prompts in 4 slots; the bench exits non-zero when the engine's lengths differ from the drawn
    ones."""
    row = bench("--long-tail", "--batch", "6", "--max-batch", "4", "--prompt-len", "8", "--new-tokens", "16",
                "--tail-median", "6", "--reps", "1")[-1]
    assert row["what"] == "rollout_long_tail_vs_hf_generate" and row["max_batch"] == 4
    lengths = row["lengths"]
    assert 6 <= lengths["total"] <= 6 * 16 and lengths["max"] <= 16
    # the longest completion sets the number of decode steps (its first token comes from the prefill)
    assert row["decode_steps"] >= lengths["max"] - 1
    assert row["ours_tokens_per_s"] > 0 and row["hf_tokens_per_s"] > 0


def test_speculative_through_fewer_slots_than_completions(tmp_path):
    """--speculative mtp on a checkpoint with MTP weights (untrained: only the bookkeeping is checked), 5 prompts x
    3 samples through 4 slots: every completion is counted on both sides and the acceptance is a rate."""
    paths = write_all(tmp_path / "data", seed=0, sizes=Sizes(math=20, math_test=5, math_rl=2, code=2, code_test=1,
                                                             cot=20, general=2, general_test=1, pref=2, pref_test=1))
    train_tokenizer([p for name, p in paths.items() if name.endswith("_train")], tmp_path / "tok", vocab_size=300)
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    load_policy(ModelConfig(init="tiny", mtp_layers=1), tok).save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    model, *rows = bench("--speculative", "mtp", "--checkpoint", str(tmp_path / "ckpt"), "--prompts",
                         str(paths["math_test"]), "--rows", "5", "--samples", "3", "--max-batch", "4",
                         "--new-tokens", "12", "--speculative-tokens", "1", "2", "--reps", "1")
    assert model["mtp_weights_in_checkpoint"]
    assert [(r["k"], r["rows"], r["samples"], r["max_batch"]) for r in rows] == [(1, 5, 3, 4), (2, 5, 3, 4)]
    for r in rows:
        assert 15 <= r["plain_tokens"] <= 15 * 12 and 15 <= r["spec_tokens"] <= 15 * 12
        assert 1 <= r["tokens_per_verify_step"] <= r["k"] + 1
        assert all(0 <= r[f"accept_rate_{j}"] <= 1 for j in range(1, r["k"] + 1))
