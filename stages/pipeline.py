"""The whole DeepSeek-R1 recipe with one command: every step a visible subprocess, chained through disk.

    python -m stages.pipeline --recipe recipes/tiny/pipeline.yaml [key=value ...]      (make demo)
    python -m stages.pipeline --recipe recipes/tiny/pipeline.yaml 'step_overrides={sft: [train.max_steps=5]}'

The recipe lists the steps in order (data -> tokenizer -> sft -> evaluate -> rl_reasoning -> evaluate ->
rejection_sampling -> sft -> evaluate -> reward_model -> rl_general -> evaluate for the embedded default).
Each step is ``python -m <module> [--recipe <recipe>] <args...>`` (steps marked ``distributed`` under the
``launcher`` when one is set, e.g. ``accelerate launch``): the stage's own recipe plus the
pipeline's overrides (its input checkpoint = the previous stage's ``final/``, its output directory, the
seed). ``{run_dir}``, ``{seed}`` and ``{python}`` in any string are replaced by the pipeline's values. The command is
printed before it runs, so any step can be re-run by hand.

Resuming: a step whose ``output`` directory holds a ``DONE`` marker (written by the stage when it completes,
or by the pipeline after a step that writes none, e.g. data generation) is skipped, so an interrupted
pipeline continues where it stopped (``rerun=[sft]`` forces steps again; a training stage then gets
``train.resume_from=none``). A training stage interrupted mid-way continues from its latest checkpoint
(resuming is the stages' default). A failing step stops the pipeline
with its exit status. Wall time per step goes to ``{run_dir}/pipeline.json``.

The report (``{run_dir}/report.md`` + PNG plots, matplotlib Agg): wall time per step; held-out results after
each evaluated stage (every step with ``label`` set: its ``output``/``heldout.json`` from ``stages.evaluate``:
the recipe's accuracy +- its standard error, greedy accuracy when reported, and the change from the row above
on the same problems +- its paired standard error, from ``heldout_rows.jsonl``);
training curves per stage from each ``metrics.jsonl`` (loss, reward, accuracy, completion length); the
rejection-sampling acceptance rates and the reward model's held-out pairwise accuracy.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from grpo.checkpoint import is_done, mark_done
from grpo.config import ConfigError, cli, run
from stages.evaluate import paired_difference

# metrics.jsonl keys plotted when present; heldout/*: the curve of the stages' `eval.every` (stages.evaluate.curve_point)
CURVES = ("loss", "reward", "accuracy", "completions/mean_length", "heldout/pass@1", "heldout/mean_tokens")
BASELINE = {"heldout/pass@1": "accuracy", "heldout/mean_tokens": "mean_tokens"}  # curve key -> heldout.json key


RESUMING = ("stages.sft", "stages.rl_reasoning", "stages.rl_general")  # continue from checkpoints by default


@dataclass(kw_only=True)
class StepConfig:
    name: str  # unique within the pipeline (step_overrides / rerun refer to it)
    module: str  # run as `python -m module`
    recipe: str | None = None  # the stage's recipe (--recipe)
    args: list[str] = field(default_factory=list)  # key=value overrides (stages) or plain arguments (data.*)
    output: str  # directory the step fills; DONE in it = complete
    label: str | None = None  # evaluation steps: the row name in the report ("after SFT")
    distributed: bool = False  # run under the pipeline's `launcher` (e.g. accelerate launch) when one is set

    def __post_init__(self):
        if not self.name or not self.module:
            raise ConfigError("name", "each step needs a name and a module")


@dataclass(kw_only=True)
class PipelineConfig:
    run_dir: str = "runs/tiny"
    seed: int = 0  # substituted for {seed}: data, model init, sampling, data order of every stage
    steps: list[StepConfig] = field(default_factory=list)
    step_overrides: dict[str, list[str]] = field(default_factory=dict)  # step name -> arguments appended
    rerun: list[str] = field(default_factory=list)  # steps run again even when DONE (training stages from scratch)
    stop_after: str | None = None  # run up to and including this step
    threads: int | None = None  # OMP_NUM_THREADS of every step; null: torch's default (all cores)
    launcher: list[str] = field(default_factory=list)  # prefix of `-m module` for distributed steps ({python} = this
    # interpreter), e.g. [{python}, -m, accelerate.commands.launch, --config_file, recipes/accelerate/single.yaml]
    report: bool = True

    def __post_init__(self):
        if self.threads is not None and self.threads < 1:
            raise ConfigError("threads", f"must be >= 1 or null, got {self.threads}")
        if not self.steps:
            raise ConfigError("steps", "the pipeline needs at least one step")
        names = [s.name for s in self.steps]
        if len(set(names)) != len(names):
            raise ConfigError("steps", f"step names must be unique, got {names}")
        for key, given in (("step_overrides", list(self.step_overrides)), ("rerun", self.rerun),
                           ("stop_after", [self.stop_after] if self.stop_after else [])):
            unknown = sorted(set(given) - set(names))
            if unknown:
                raise ConfigError(key, f"unknown step {unknown[0]!r}; steps: {', '.join(names)}")


def expand(text: str, cfg: PipelineConfig) -> str:
    return text.replace("{run_dir}", cfg.run_dir).replace("{seed}", str(cfg.seed)).replace("{python}", sys.executable)


def command(step: StepConfig, cfg: PipelineConfig) -> list[str]:
    """The argv of one step."""
    recipe = ["--recipe", expand(step.recipe, cfg)] if step.recipe else []
    extra = cfg.step_overrides.get(step.name, [])
    if step.name in cfg.rerun and step.module in RESUMING:  # run again from scratch, not from the final checkpoint
        extra = ["train.resume_from=none", *extra]
    launcher = [expand(a, cfg) for a in cfg.launcher] if step.distributed and cfg.launcher else [sys.executable]
    return [*launcher, "-m", step.module, *recipe, *(expand(a, cfg) for a in [*step.args, *extra])]


def run_step(step: StepConfig, cfg: PipelineConfig, timings: dict) -> None:
    out = Path(expand(step.output, cfg))
    if is_done(out) and step.name not in cfg.rerun:
        print(f"== {step.name}: done ({out}/DONE), skipped", flush=True)
        return
    argv = command(step, cfg)
    shown = shlex.join(["python" if a == sys.executable else a for a in argv])
    print(f"== {step.name}: {shown}", flush=True)
    start = time.time()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": str(cfg.threads)} if cfg.threads else {})}
    code = subprocess.run(argv, env=env).returncode
    seconds = time.time() - start
    if code != 0:
        raise SystemExit(f"pipeline: step {step.name!r} failed with exit status {code} after {seconds:.0f}s; fix it "
                         f"and run the pipeline again (finished steps are skipped)")
    if not is_done(out):
        mark_done(out, {"step": step.name})
    timings[step.name] = {"seconds": round(seconds, 1), "command": shown}
    print(f"== {step.name}: finished in {seconds:.0f}s", flush=True)


# ---- report ------------------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def plot_curves(name: str, records: list[dict], path: Path, baseline: tuple[str, dict] | None = None) -> bool:
    """One panel per CURVES key present; ``baseline`` (label, heldout.json summary): a dashed line at that
    evaluation's value on the held-out curve's panels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in CURVES if any(k in r for r in records)]
    if not keys:
        return False
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot(*zip(*points), marker="." if len(points) < 40 else None, label="all")
        by_source = sorted({k for r in records for k in r if k.startswith("by_source/") and k.endswith("/" + key)})
        for k in by_source:
            pts = [(r["step"], r[k]) for r in records if k in r]
            ax.plot(*zip(*pts), alpha=0.6, label=k.split("/")[1])
        if baseline is not None and key in BASELINE:
            ax.axhline(baseline[1][BASELINE[key]], color="gray", linestyle="--", label=baseline[0])
        if by_source or (baseline is not None and key in BASELINE):
            ax.legend(fontsize=7)
        ax.set_title(f"{name}: {key}", fontsize=9)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def plot_heldout(rows: list[tuple[str, dict]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3))
    labels = [label for label, _ in rows]
    x = range(len(rows))
    greedy = any("greedy_accuracy" in s for _, s in rows)
    width = 0.4 if greedy else 0.8
    a.bar([i - (width / 2 if greedy else 0) for i in x], [100 * s["accuracy"] for _, s in rows], width,
          yerr=[100 * s.get("accuracy_se", 0.0) for _, s in rows], label="pass@1")
    if greedy:
        a.bar([i + width / 2 for i in x], [100 * s.get("greedy_accuracy", 0.0) for _, s in rows], width,
              yerr=[100 * s.get("greedy_se", 0.0) for _, s in rows], label="greedy")
        a.legend(fontsize=7)
    a.set_xticks(list(x), labels)
    a.set_title("held-out math accuracy (%, +- 1 standard error)", fontsize=9)
    b.bar(labels, [s.get("mean_tokens", 0.0) for _, s in rows])
    b.set_title("mean completion length (tokens)", fontsize=9)
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=7, rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_report(cfg: PipelineConfig, timings: dict) -> Path:
    run = Path(cfg.run_dir)
    plots = run / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    threads = (f"{cfg.threads} thread(s) per step (OMP_NUM_THREADS)" if cfg.threads
               else f"torch's default threads per step ({torch.get_num_threads()} here)")
    lines = [f"# Pipeline report: {run}", "", f"seed {cfg.seed}; {threads}; {os.cpu_count()} CPU cores, "
             f"{platform.machine()}, torch {torch.__version__}; steps run with `python -m stages.pipeline`.", "",
             "## Steps", "", "| step | wall time (s) | command |", "|---|---:|---|"]
    for step in cfg.steps:
        t = timings.get(step.name, {})
        lines.append(f"| {step.name} | {t.get('seconds', '-')} | `{t.get('command', '(not run)')}` |")
    total = sum(t["seconds"] for t in timings.values())
    lines += ["", f"Total recorded wall time: {total:.0f} s ({total / 60:.1f} min).", ""]

    heldout, per_problem = [], []
    for step in cfg.steps:
        summary = Path(expand(step.output, cfg)) / "heldout.json"
        if step.label and summary.is_file():
            heldout.append((step.label, json.loads(summary.read_text())))
            per_problem.append([(r["prompt"], r["correct"]) for r in read_jsonl(summary.with_name("heldout_rows.jsonl"))
                                if r.get("source", "math") == "math"])
    if heldout:
        metrics = sorted({s.get("metric", "greedy") for _, s in heldout})
        lines += ["## Held-out results after each stage", "",
                  f"Math accuracy: {'; '.join(metrics)}, +- one standard error over problems; greedy: one greedy "
                  "decode per problem (when the evaluation reports it).", "",
                  "change: math accuracy minus the row above's on the same problems, +- its paired standard error.", "",
                  "| after | math accuracy | change | greedy | code pass rate | format | mean tokens | truncated | n |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for i, (label, s) in enumerate(heldout):
            change = "-"
            if i and per_problem[i] and [p for p, _ in per_problem[i]] == [p for p, _ in per_problem[i - 1]]:
                d, se = paired_difference([c for _, c in per_problem[i - 1]], [c for _, c in per_problem[i]])
                change = f"{100 * d:+.1f} +- {100 * se:.1f}"
            code = s.get("by_source", {}).get("code")
            greedy = (f"{100 * s['greedy_accuracy']:.1f}% +- {100 * s['greedy_se']:.1f}" if "greedy_accuracy" in s
                      else "-")
            se = f" +- {100 * s['accuracy_se']:.1f}" if "accuracy_se" in s else ""
            lines.append(f"| {label} | {100 * s['accuracy']:.1f}%{se} | {change} | {greedy} | "
                         f"{'-' if code is None else f'{100 * code:.1f}%'} | "
                         f"{100 * s.get('format', 0.0):.1f}% | {s['mean_tokens']:.1f} | {100 * s['truncated']:.0f}% | "
                         f"{s['n']} |")
        plot_heldout(heldout, plots / "heldout.png")
        lines += ["", "![held-out](plots/heldout.png)", ""]

    lines += ["## Training curves", ""]
    for step in cfg.steps:
        out = Path(expand(step.output, cfg))
        records = read_jsonl(out / "metrics.jsonl")
        if records and plot_curves(step.name, records, plots / f"{step.name}.png", heldout[0] if heldout else None):
            last = records[-1]
            shown = ", ".join(f"{k} {last[k]:.3g}" for k in CURVES if isinstance(last.get(k), (int, float)))
            lines += [f"### {step.name}", "", f"last logged step {last['step']}: {shown}", ""]
            curve = [r for r in records if "heldout/pass@1" in r]
            if curve:
                lines += ["Held-out curve (pass@1 from the stage's `eval.samples` at `eval.temperature`; the dashed "
                          f"line: {heldout[0][0] if heldout else '-'}):", "", "| step | " + " | ".join(
                              f"{r['step']}" for r in curve) + " |", "|---|" + "---:|" * len(curve),
                          "| pass@1 | " + " | ".join(f"{100 * r['heldout/pass@1']:.1f}%" for r in curve) + " |",
                          "| mean tokens | " + " | ".join(f"{r['heldout/mean_tokens']:.1f}" for r in curve) + " |", ""]
            lines += [f"![{step.name}](plots/{step.name}.png)", ""]
        summary = out / "summary.json"
        if summary.is_file():
            lines += [f"### {step.name} summary", "", "```json", summary.read_text().strip(), "```", ""]
    path = run / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> Path | None:
    cfg = cli(PipelineConfig, description="DeepSeek-R1's four stages end to end, resumable.", argv=argv)
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    timing_file = run / "pipeline.json"
    timings = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
    missing = [f"{s.name}: {expand(s.recipe, cfg)}" for s in cfg.steps if s.recipe and not Path(expand(s.recipe, cfg)).is_file()]
    if missing:
        raise SystemExit(f"pipeline: missing stage recipe(s): {'; '.join(missing)}")
    for step in cfg.steps:
        run_step(step, cfg, timings)
        timing_file.write_text(json.dumps(timings, indent=2) + "\n")
        if step.name == cfg.stop_after:
            break
    if not cfg.report:
        return None
    report = write_report(cfg, timings)
    print(f"== report: {report}", flush=True)
    return report


if __name__ == "__main__":
    run(main)
