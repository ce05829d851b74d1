"""bench/rollout.py as a user runs it, at tiny shapes on the CPU anchor (the benchmark's own hooks into the engine
break silently when the engine changes: this runs them)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_long_tail_forces_the_drawn_lengths_on_both_sides_with_refill():
    """--long-tail: 6 prompts in 4 slots; the bench exits non-zero when the engine's lengths differ from the drawn ones."""
    run = subprocess.run([sys.executable, "bench/rollout.py", "--long-tail", "--batch", "6", "--max-batch", "4",
                          "--prompt-len", "8", "--new-tokens", "16", "--tail-median", "6", "--reps", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    row = json.loads(run.stdout.strip().splitlines()[-1])
    assert row["what"] == "rollout_long_tail_vs_hf_generate" and row["max_batch"] == 4
    lengths = row["lengths"]
    assert 6 <= lengths["total"] <= 6 * 16 and lengths["max"] <= 16
    # the longest completion sets the number of decode steps (its first token comes from the prefill)
    assert row["decode_steps"] >= lengths["max"] - 1
    assert row["ours_tokens_per_s"] > 0 and row["hf_tokens_per_s"] > 0
