"""Held-out accuracy of the tiny pipeline's cold-start SFT and reasoning-RL checkpoints over several seeds.

    python bench/pipeline_seeds.py [--seeds 0 1 2] [--recipe recipes/tiny/pipeline.yaml] [--threads 1] [key=value ...]

Runs ``stages.pipeline`` up to ``eval_rl_reasoning`` (data -> tokenizer -> sft -> evaluate -> rl_reasoning ->
evaluate) once per seed in ``runs/tiny-seeds/seed<S>`` (finished steps are skipped on a re-run), then prints
held-out math accuracy (greedy) after SFT and after RL per seed, the RL - SFT difference and the means.
Extra ``key=value`` arguments go to the pipeline (e.g. ``'step_overrides={sft: [train.max_steps=300]}'``).
Takes ~20-25 minutes per seed on 2 CPU cores; not part of the test suite.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages import pipeline  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipe", default=str(ROOT / "recipes/tiny/pipeline.yaml"))
    parser.add_argument("--run-root", default="runs/tiny-seeds")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS per step (1 on a busy machine)")
    args, overrides = parser.parse_known_args()
    rows = []
    for seed in args.seeds:
        run = Path(args.run_root) / f"seed{seed}"
        pipeline.main(["--recipe", args.recipe, f"run_dir={run}", f"seed={seed}", "stop_after=eval_rl_reasoning",
                       "report=false", *([f"threads={args.threads}"] if args.threads else []), *overrides])
        sft = json.loads((run / "eval/sft/heldout.json").read_text())["accuracy"]
        rl = json.loads((run / "eval/rl_reasoning/heldout.json").read_text())["accuracy"]
        rows.append((seed, sft, rl))
    print("\n| seed | held-out acc. after SFT | after RL | RL - SFT |\n|---:|---:|---:|---:|")
    for seed, sft, rl in rows:
        print(f"| {seed} | {100 * sft:.1f}% | {100 * rl:.1f}% | {100 * (rl - sft):+.1f} |")
    sft_mean, rl_mean = statistics.mean(r[1] for r in rows), statistics.mean(r[2] for r in rows)
    print(f"| mean | {100 * sft_mean:.1f}% | {100 * rl_mean:.1f}% | {100 * (rl_mean - sft_mean):+.1f} |")
    print(f"RL improved held-out accuracy on {sum(r[2] > r[1] for r in rows)}/{len(rows)} seeds")


if __name__ == "__main__":
    main()
