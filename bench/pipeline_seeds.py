"""Held-out accuracy of the tiny pipeline's cold-start SFT and reasoning-RL checkpoints over several seeds.

    python bench/pipeline_seeds.py [--seeds 0 1 2] [--recipe recipes/tiny/pipeline.yaml] [--threads 1] [key=value ...]

Runs ``stages.pipeline`` up to ``eval_rl_reasoning`` (data -> tokenizer -> sft -> evaluate -> rl_reasoning ->
evaluate) once per seed in ``runs/tiny-seeds/seed<S>`` (finished steps are skipped on a re-run), then prints
per seed the held-out math accuracy after SFT and after RL as ``recipes/tiny/evaluate.yaml`` measures it
(pass@1 from k samples, +- its standard error over problems), the greedy accuracy next to it, and the
RL - SFT difference on the same problems with its paired standard error; then the means over seeds.
Extra ``key=value`` arguments go to the pipeline (e.g. ``'step_overrides={sft: [train.max_steps=300]}'``).
Takes ~10-15 minutes per seed on 2 CPU cores; not part of the test suite.

Measured 2026-11-28 (recipes as committed: RL 80 steps x 32 prompts x 8 over the 10,000 fresh math_rl prompts;
threads 1, two seeds at a time on 2 shared CPU cores, ~10-11 min per RL run; pass@1 from 8 samples at T=0.6):
seed 0: SFT 49.0% +- 3.2 -> RL 52.2% +- 3.4 (+3.2 +- 1.4), greedy 52.5% -> 53.5% (+1.0 +- 1.7);
seed 1: 43.5% -> 44.1% (+0.6 +- 2.0), greedy 44.5% -> 45.5% (+1.0 +- 2.7);
seed 2: 9.2% -> 10.9% (+1.8 +- 1.3), greedy 14.5% -> 12.0% (-2.5 +- 2.4) (this seed's SFT did not pass the
sharp transition at 1200 steps). Pass@1 rose on 3/3 seeds, mean +1.9 +- 0.9 (pooled paired standard error);
greedy on 2/3, mean -0.2. The previous setting (60 steps x 16 prompts over the 2,000 math_train prompts, lr 3e-5)
gave +0.2, +0.0, +1.1 on the same SFT checkpoints.
With 2,000 SFT steps (--run-root runs/tiny-seeds-2k 'step_overrides={sft: [train.max_steps=2000]}'): seed 0
SFT 67.6% -> RL 67.4% (-0.1 +- 1.5), seed 1 66.6% -> 68.8% (+2.1 +- 1.4), seed 2 59.1% -> 57.1% (-2.0 +- 1.6):
mean 0.0, RL reliably helps only the under-trained checkpoint.
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
from stages.evaluate import paired_difference  # noqa: E402


def load(eval_dir: Path) -> tuple[dict, list[float], list[float]]:
    """(summary, per-problem sampled accuracy, per-problem greedy accuracy) of the math rows of one evaluation."""
    rows = [json.loads(line) for line in (eval_dir / "heldout_rows.jsonl").read_text().splitlines() if line.strip()]
    math_rows = [r for r in rows if r.get("source", "math") == "math"]
    return (json.loads((eval_dir / "heldout.json").read_text()), [r["correct"] for r in math_rows],
            [r.get("greedy_correct", r["correct"]) for r in math_rows])


def pct(x: float, se: float | None = None) -> str:
    return f"{100 * x:.1f}%" + ("" if se is None else f" +- {100 * se:.1f}")


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
        (sft, sft_rows, sft_greedy), (rl, rl_rows, rl_greedy) = load(run / "eval/sft"), load(run / "eval/rl_reasoning")
        rows.append({"seed": seed, "sft": sft, "rl": rl, "diff": paired_difference(sft_rows, rl_rows),
                     "greedy_diff": paired_difference(sft_greedy, rl_greedy)})
    metric = rows[0]["sft"].get("metric", "greedy")
    print(f"\nheld-out math accuracy ({metric}; n = {rows[0]['sft']['n']} problems; +- one standard error; "
          "RL - SFT on the same problems +- its paired standard error)")
    print("\n| seed | after SFT | after RL | RL - SFT | greedy after SFT | greedy after RL | greedy RL - SFT |\n"
          "|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        sft, rl = r["sft"], r["rl"]
        print(f"| {r['seed']} | {pct(sft['accuracy'], sft.get('accuracy_se'))} | {pct(rl['accuracy'], rl.get('accuracy_se'))} | "
              f"{100 * r['diff'][0]:+.1f} +- {100 * r['diff'][1]:.1f} | "
              f"{pct(sft.get('greedy_accuracy', sft['accuracy']))} | {pct(rl.get('greedy_accuracy', rl['accuracy']))} | "
              f"{100 * r['greedy_diff'][0]:+.1f} +- {100 * r['greedy_diff'][1]:.1f} |")
    mean = lambda f: statistics.mean(f(r) for r in rows)  # noqa: E731
    print(f"| mean | {pct(mean(lambda r: r['sft']['accuracy']))} | {pct(mean(lambda r: r['rl']['accuracy']))} | "
          f"{100 * mean(lambda r: r['diff'][0]):+.1f} | {pct(mean(lambda r: r['sft'].get('greedy_accuracy', r['sft']['accuracy'])))} | "
          f"{pct(mean(lambda r: r['rl'].get('greedy_accuracy', r['rl']['accuracy'])))} | "
          f"{100 * mean(lambda r: r['greedy_diff'][0]):+.1f} |")
    print(f"RL improved held-out accuracy ({metric}) on {sum(r['diff'][0] > 0 for r in rows)}/{len(rows)} seeds, "
          f"greedy accuracy on {sum(r['greedy_diff'][0] > 0 for r in rows)}/{len(rows)}")


if __name__ == "__main__":
    main()
