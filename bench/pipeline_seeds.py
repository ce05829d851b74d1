"""Held-out accuracy of the tiny pipeline's cold-start SFT, reasoning-RL and rejection-sampling SFT checkpoints
over several seeds.

    python bench/pipeline_seeds.py [--seeds 0 1 2] [--recipe recipes/tiny/pipeline.yaml] [--threads 1] [--no-rs] [key=value ...]

Runs ``stages.pipeline`` up to ``eval_sft_rs`` (data -> tokenizer -> sft -> evaluate -> rl_reasoning -> evaluate
-> rejection_sampling -> sft_rs -> evaluate; ``--no-rs``: up to the RL evaluation) once per seed in
``runs/tiny-seeds/seed<S>`` (finished steps are skipped on a re-run), then prints per seed the held-out math
accuracy after each stage as ``recipes/tiny/evaluate.yaml`` measures it (pass@1 from k samples, +- its standard
error over problems), RL - SFT and RS-SFT - RL on the same problems with their paired standard errors, greedy
accuracy, and the mean response length after each stage; then the means over seeds.
Extra ``key=value`` arguments go to the pipeline (e.g. ``'step_overrides={sft: [train.max_steps=6000]}'``).
Takes ~30 minutes per seed on 2 CPU cores (threads 1); not part of the test suite. Measured results: README
("The embedded default over 3 seeds"); earlier recipes' results: bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grpo.config import load_config  # noqa: E402
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
    parser.add_argument("--no-rs", action="store_true", help="stop after the reasoning-RL evaluation")
    parser.add_argument("--sft-more", type=int, default=2000, metavar="STEPS",
                        help="the longer-SFT baseline: the cold-start SFT checkpoint trained STEPS more steps on the same "
                             "traces by the same recipe (a second learning-rate cycle), evaluated like the stages; 0 = none")
    args, overrides = parser.parse_known_args()
    stop = "eval_rl_reasoning" if args.no_rs else "eval_sft_rs"
    rows = []
    for seed in args.seeds:
        run = Path(args.run_root) / f"seed{seed}"
        pipeline.main(["--recipe", args.recipe, f"run_dir={run}", f"seed={seed}", f"stop_after={stop}",
                       "report=false", *([f"threads={args.threads}"] if args.threads else []), *overrides])
        if args.sft_more:
            longer_sft(run, seed, args, overrides)
        stages = {name: load(run / "eval" / name) for name in ("sft", "sft_more", "rl_reasoning", "sft_rs")
                  if (run / "eval" / name / "heldout.json").is_file()}
        rows.append({"seed": seed, **{k: v[0] for k, v in stages.items()},
                     "diff": paired_difference(stages["sft"][1], stages["rl_reasoning"][1]),
                     "more_diff": (paired_difference(stages["sft_more"][1], stages["rl_reasoning"][1])
                                   if "sft_more" in stages else None),
                     "greedy_diff": paired_difference(stages["sft"][2], stages["rl_reasoning"][2]),
                     "rs_diff": (paired_difference(stages["rl_reasoning"][1], stages["sft_rs"][1])
                                 if "sft_rs" in stages else None)})
    first = rows[0]["sft"]
    print(f"\nheld-out math accuracy ({first.get('metric', 'greedy')}; n = {first['n']} problems; +- one standard "
          "error; a change is on the same problems +- its paired standard error); mean response tokens")
    print(f"\n| seed | after SFT | SFT + {args.sft_more} steps | after RL | RL - SFT | RL - longer SFT | after RS-SFT | "
          "RS-SFT - RL | greedy SFT -> RL (change) | tokens SFT -> RL -> RS-SFT |\n"
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    tokens = lambda s: "-" if s is None else f"{s['mean_tokens']:.1f}"  # noqa: E731
    change = lambda d: "-" if d is None else f"{100 * d[0]:+.1f} +- {100 * d[1]:.1f}"  # noqa: E731
    for r in rows:
        sft, more, rl, rs = r["sft"], r.get("sft_more"), r["rl_reasoning"], r.get("sft_rs")
        greedy = lambda s: pct(s.get("greedy_accuracy", s["accuracy"]))  # noqa: E731
        acc = lambda s: "-" if s is None else pct(s["accuracy"], s.get("accuracy_se"))  # noqa: E731
        print(f"| {r['seed']} | {acc(sft)} | {acc(more)} | {acc(rl)} | {change(r['diff'])} | {change(r['more_diff'])} | "
              f"{acc(rs)} | "
              f"{change(r['rs_diff'])} | {greedy(sft)} -> {greedy(rl)} ({change(r['greedy_diff'])}) | "
              f"{tokens(sft)} -> {tokens(rl)} -> {tokens(rs)} |")
    mean = lambda f: statistics.mean(f(r) for r in rows)  # noqa: E731
    pooled = lambda key: (sum(r[key][1] ** 2 for r in rows) ** 0.5 / len(rows))  # noqa: E731
    print(f"\nmean over {len(rows)} seeds: RL - SFT {100 * mean(lambda r: r['diff'][0]):+.1f} +- "
          f"{100 * pooled('diff'):.1f} (pooled paired standard error); RL improved pass@1 on "
          f"{sum(r['diff'][0] > 0 for r in rows)}/{len(rows)} seeds, greedy on "
          f"{sum(r['greedy_diff'][0] > 0 for r in rows)}/{len(rows)}")
    if all(r["more_diff"] for r in rows):
        print(f"RL - longer SFT {100 * mean(lambda r: r['more_diff'][0]):+.1f} +- {100 * pooled('more_diff'):.1f}")
    if all(r["rs_diff"] for r in rows):
        print(f"RS-SFT - RL {100 * mean(lambda r: r['rs_diff'][0]):+.1f} +- {100 * pooled('rs_diff'):.1f}")


def longer_sft(run: Path, seed: int, args, overrides: list[str]) -> None:
    """The baseline that tells RL from more training: the pipeline's own sft and eval_sft steps again, from the
    cold-start checkpoint for ``args.sft_more`` more steps, into ``sft_more`` and ``eval/sft_more``."""
    cfg = load_config(pipeline.PipelineConfig, args.recipe, [f"run_dir={run}", f"seed={seed}", *overrides,
                                                             *([f"threads={args.threads}"] if args.threads else [])])
    steps = {s.name: s for s in cfg.steps}
    more = replace(steps["sft"], name="sft_more", output="{run_dir}/sft_more", args=[
        *steps["sft"].args, "model.init={run_dir}/sft/final", f"train.max_steps={args.sft_more}",
        "output_dir={run_dir}/sft_more"])
    evaluate = replace(steps["eval_sft"], name="eval_sft_more", output="{run_dir}/eval/sft_more", args=[
        *steps["eval_sft"].args, "model.init={run_dir}/sft_more/final", "output={run_dir}/eval/sft_more/heldout.json"])
    for step in (more, evaluate):
        pipeline.run_step(step, cfg, {})


if __name__ == "__main__":
    main()
