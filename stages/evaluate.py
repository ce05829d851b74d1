"""Held-out math accuracy of a checkpoint: greedy decoding, answers checked by ``rewards.math``.

    python -m stages.evaluate --recipe recipes/tiny/evaluate.yaml [key=value ...]

For N held-out problems (prompt x_i, gold answer a_i) and the greedy completion y_i = argmax-decode(x_i)
(chat template applied, after the ``system_prompt`` turn if any, at most ``max_new_tokens`` tokens, stopping at
the end-of-turn token):

    accuracy = 1/N * sum_i 1[ every final answer extracted from y_i is equivalent to a_i ]

(``rewards.math.correctness``: ``\\boxed{}`` first, then "the answer is ...", sympy equivalence under a
timeout). Also reported: the share of completions cut at ``max_new_tokens``, the mean completion
length, and accuracy per ``difficulty`` / ``source`` when the rows carry those columns.
The SFT stage calls ``heldout_accuracy`` after training; run this module to score any checkpoint.

The entry point also scores code (``code``: rows with ``tests``, run in ``rewards.code``'s sandbox; a
completion is correct when every test passes) and, with ``samples: k > 1`` (temperature > 0), estimates
from k samples per problem with c of them correct (Chen et al., 2021; DeepSeek-R1 reports pass@1 this way):

    pass@1  = 1/N * sum_i c_i / k
    pass@j  = 1/N * sum_i [ 1 - C(k - c_i, j) / C(k, j) ]          (unbiased, j <= k)
    cons@k  = 1/N * sum_i 1[ majority answer of the k samples is equivalent to a_i ]   (math only)

Every pass@1 comes with its standard error over problems, se = std_i(c_i / k) / sqrt(N) (sample std;
for one greedy sample this is the binomial sqrt(acc * (1 - acc) / (N - 1))). With ``greedy: true`` and
k > 1 the greedy pass@1 of the same problems is reported next to the sampled one (one more decode each),
so that a change a stage makes to the sampled distribution and to its mode are both visible.
The majority vote clusters the extracted final answers with ``rewards.math.is_equivalent`` (so ``0.5``
and ``\\frac{1}{2}`` vote together); samples without an answer do not vote. Also reported per source:
format compliance (``rewards.format``: think block, answer in the expected form), mean completion length
and the share truncated. Writes ``output`` (JSON summary), ``<stem>_rows.jsonl`` and ``<stem>.md``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import datasets
import torch

from data.chat import encode_prompt, resolve_system_prompt
from data.loaders import DataConfig, load_rows
from grpo.config import ConfigError, cli, run
from grpo.model import ModelConfig, load_policy, presets
from grpo.rollout import RolloutEngine, SamplingConfig
from grpo.model_dir import load_tokenizer
from rewards.code import code_reward
from rewards.format import format_reward
from rewards.math import answer_region, correctness, extract_answer, is_equivalent

GROUP_COLUMNS = ("difficulty", "source")


@dataclass(kw_only=True)
class HeldoutConfig:
    data: DataConfig | None = field(
        default_factory=lambda: DataConfig(path="runs/tiny/data/math_test.jsonl", split="test")
    )  # rows with `prompt` and `answer`; null skips the evaluation
    max_new_tokens: int = 256
    batch_size: int = 64  # sequences decoded together
    # training stages: every `every` steps (and at step 0) a quick point of the held-out curve (`curve_point`:
    # pass@1 from `samples` samples per problem at `temperature` / `top_p`, the same random numbers each time)
    # logged as heldout/* in metrics.jsonl; 0 = only the greedy evaluation at the end
    every: int = 0
    samples: int = 1
    temperature: float = 0.6
    top_p: float = 0.95
    seed: int = 0

    def __post_init__(self):
        for key in ("max_new_tokens", "batch_size", "samples"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.every < 0:
            raise ConfigError("every", f"must be >= 0 (0 = no held-out curve), got {self.every}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ConfigError("temperature", f"the held-out curve samples: temperature must be > 0 and top_p in "
                              f"(0, 1], got {self.temperature}, {self.top_p}")


    def refuse_curve_under(self, deepspeed: bool) -> None:
        """A training stage's check: the curve decodes on each process alone, which DeepSpeed-sharded experts
        cannot."""
        if self.every and deepspeed:
            raise ConfigError("eval.every", "the held-out curve needs the single-process or DDP path (under "
                              "DeepSpeed the experts are sharded over ranks); set eval.every=0")


def load_heldout(cfg: HeldoutConfig) -> list[dict]:
    return [] if cfg.data is None else list(load_rows(cfg.data, ["prompt", "answer"]))


def curve_point(model, tokenizer, rows: list[dict], cfg: HeldoutConfig, system: str | None = None) -> dict[str, float]:
    """One point of the held-out curve a training stage logs every ``cfg.every`` steps: over the N rows with
    k = ``cfg.samples`` samples each at ``cfg.temperature`` / ``cfg.top_p`` (a fresh generator seeded with
    ``cfg.seed``, so every point draws the same random numbers and the training's own are untouched),

        heldout/pass@1 = 1/(N k) * sum of correct samples        heldout/mean_tokens = mean completion length

    plus the share cut at ``max_new_tokens`` (heldout/truncated)."""
    was_training = model.training
    sampling = SamplingConfig(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                              max_batch=max(cfg.batch_size, cfg.samples), seed=cfg.seed)
    samples = generate(model, tokenizer, [r["prompt"] for r in rows], sampling, cfg.samples, system)
    model.train(was_training)
    correct = correctness([s["completion"] for s in samples], [r["answer"] for r in rows for _ in range(cfg.samples)])
    n = max(len(samples), 1)
    return {"heldout/pass@1": sum(map(bool, correct)) / n, "heldout/mean_tokens": sum(s["tokens"] for s in samples) / n,
            "heldout/truncated": sum(s["finish_reason"] == "length" for s in samples) / n}


@torch.no_grad()
def heldout_accuracy(model, tokenizer, rows: list[dict], *, max_new_tokens: int = 256, batch_size: int = 64,
                     system: str | None = None) -> dict:
    """Greedy-decode every row's prompt (chat template, after the ``system`` turn when given) and score it
    with `score`."""
    was_training = model.training
    model.eval()
    engine = RolloutEngine(model, tokenizer, SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens,
                                                            max_batch=batch_size))
    rollout = engine.generate([encode_prompt(tokenizer, r["prompt"], system) for r in rows], group_size=1)
    model.train(was_training)
    lengths = rollout.lengths.tolist()
    completions = tokenizer.batch_decode(
        [rollout.completion_ids[i, :n].tolist() for i, n in enumerate(lengths)], skip_special_tokens=True)
    return score(rows, completions, rollout.finish_reason, lengths)


def score(rows: list[dict], completions: list[str], finish_reasons: list[str], lengths: list[int]) -> dict:
    """{"summary": {accuracy, n, correct, truncated (share cut at the token limit), mean_tokens,
    by_difficulty / by_source: {value: accuracy} when rows carry several values}, "rows": [per-row results]}."""
    correct = correctness(completions, [r["answer"] for r in rows])
    results = [
        {"prompt": r["prompt"], "answer": r["answer"], "completion": c, "correct": bool(ok), "finish_reason": f,
         **{k: r[k] for k in GROUP_COLUMNS if k in r}}
        for r, c, ok, f in zip(rows, completions, correct, finish_reasons)
    ]
    n = len(results)
    summary = {
        "accuracy": sum(r["correct"] for r in results) / max(n, 1),
        "n": n,
        "correct": sum(r["correct"] for r in results),
        "truncated": sum(r["finish_reason"] == "length" for r in results) / max(n, 1),
        "mean_tokens": sum(lengths) / max(n, 1),
    }
    for column in GROUP_COLUMNS:
        groups: dict[str, list[bool]] = {}
        for r in results:
            if column in r:
                groups.setdefault(str(r[column]), []).append(r["correct"])
        if len(groups) > 1:
            summary[f"by_{column}"] = {k: sum(v) / len(v) for k, v in sorted(groups.items())}
    return {"summary": summary, "rows": results}


def summary_line(scores: dict, cfg: HeldoutConfig) -> str:
    s = scores["summary"]
    line = (f"held-out accuracy: {s['correct']}/{s['n']} = {100 * s['accuracy']:.1f}% "
            f"({cfg.data.path}, greedy, <= {cfg.max_new_tokens} new tokens; {100 * s['truncated']:.0f}% truncated)")
    for key, groups in s.items():
        if key.startswith("by_"):
            line += f"\n  {key}: " + ", ".join(f"{k}={100 * v:.1f}%" for k, v in groups.items())
    return line


def write_results(scores: dict, path: str | Path) -> None:
    """The summary as JSON at `path` and every scored row as JSON lines next to it (`<stem>_rows.jsonl`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(scores["summary"], indent=2) + "\n")
    with open(path.with_name(f"{path.stem}_rows.jsonl"), "w") as f:
        for row in scores["rows"]:
            f.write(json.dumps(row) + "\n")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_answer(answers: list[str | None]) -> str | None:
    """The answer most samples agree on, clustering equivalent answers (``rewards.math.is_equivalent``);
    None votes are ignored; ties go to the cluster seen first; None when nobody answered."""
    clusters: list[list] = []  # [representative, votes]
    for answer in answers:
        if answer is None:
            continue
        for cluster in clusters:
            if is_equivalent(cluster[0], answer):
                cluster[1] += 1
                break
        else:
            clusters.append([answer, 1])
    return max(clusters, key=lambda c: c[1])[0] if clusters else None


def sample_stats(correct: list[list[bool]], ks: list[int]) -> dict[str, float]:
    """pass@1 (mean share correct), its standard error over problems (pass@1_se) and pass@j for j in ks
    (j <= samples) over problems [N][k]."""
    n = len(correct)
    mean, se = mean_and_se([sum(c) / len(c) for c in correct])
    out = {"pass@1": mean, "pass@1_se": se}
    for j in ks:
        if j > 1 and correct and j <= len(correct[0]):
            out[f"pass@{j}"] = sum(pass_at_k(len(c), sum(c), j) for c in correct) / n
    return out


def paired_difference(before: list[float], after: list[float]) -> tuple[float, float]:
    """Change of accuracy between two evaluations of the same N problems (per-problem accuracies b_i, a_i,
    e.g. c_i / k), and its standard error: d = 1/N sum_i (a_i - b_i), se = std_i(a_i - b_i) / sqrt(N)
    (sample std). Pairing removes the between-problem variance from the comparison."""
    if len(before) != len(after) or not before:
        raise ValueError(f"paired_difference needs two equally long non-empty lists, got {len(before)} and {len(after)}")
    return mean_and_se([a - b for b, a in zip(before, after)])


def mean_and_se(values: list[float]) -> tuple[float, float]:
    """Mean of values [N] and its standard error std(values) / sqrt(N) (sample std; 0 for N < 2; mean 0 for N = 0)."""
    n = len(values)
    mean = sum(values) / max(n, 1)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1) / n) if n > 1 else 0.0


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], sampling: SamplingConfig, k: int,
             system: str | None = None) -> list[dict]:
    """k completions per prompt (after the ``system`` turn when given): [{"completion", "finish_reason",
    "tokens"}] in prompt-major order."""
    model.eval()
    encoded = [encode_prompt(tokenizer, p, system) for p in prompts]
    rollout = RolloutEngine(model, tokenizer, sampling).generate(encoded, k)
    lengths = rollout.lengths.tolist()
    texts = tokenizer.batch_decode([rollout.completion_ids[i, :n].tolist() for i, n in enumerate(lengths)],
                                   skip_special_tokens=True)
    return [{"completion": t, "finish_reason": f, "tokens": n}
            for t, f, n in zip(texts, rollout.finish_reason, lengths)]


def score_source(source: str, rows: list[dict], samples: list[dict], k: int, ks: list[int]) -> tuple[dict, list[dict]]:
    """Summary and per-problem results of one source ('math' or 'code') from k samples per row."""
    completions = [s["completion"] for s in samples]
    if source == "math":
        verdicts = correctness(completions, [r["answer"] for i, r in enumerate(rows) for _ in range(k)])
    else:
        scores = code_reward([r["prompt"] for r in rows for _ in range(k)], completions,
                             tests=[r["tests"] for r in rows for _ in range(k)],
                             entry_point=[r.get("entry_point") for r in rows for _ in range(k)])
        verdicts = [s == 1.0 for s in scores]
    formatted = format_reward([""] * len(samples), completions, source=[source] * len(samples))
    correct = [[bool(verdicts[i * k + j]) for j in range(k)] for i in range(len(rows))]
    summary = {"n": len(rows), "samples": k, **sample_stats(correct, ks),
               "format": sum(formatted) / max(len(samples), 1),
               "mean_tokens": sum(s["tokens"] for s in samples) / max(len(samples), 1),
               "truncated": sum(s["finish_reason"] == "length" for s in samples) / max(len(samples), 1)}
    results = []
    for i, row in enumerate(rows):
        group = samples[i * k:(i + 1) * k]
        result = {"source": source, "prompt": row["prompt"], "completion": group[0]["completion"],
                  "correct": sum(correct[i]) / k, "finish_reason": group[0]["finish_reason"]}
        if k > 1:
            result["completions"] = [s["completion"] for s in group]
        if source == "math":
            majority = majority_answer([extract_answer(answer_region(s["completion"])) for s in group])
            result.update(answer=row["answer"], majority=majority,
                          majority_correct=majority is not None and is_equivalent(str(row["answer"]), majority))
        results.append(result)
    if source == "math" and k > 1:
        summary[f"cons@{k}"] = sum(r["majority_correct"] for r in results) / max(len(results), 1)
    return summary, results


def markdown(summary: dict, model: str) -> str:
    """A Markdown table of the per-source results."""
    sources = summary["by_source_detail"]
    estimates = sorted({k for s in sources.values() for k in s if k.startswith(("pass@", "cons@"))})
    metrics = [*estimates, *(["greedy"] if any("greedy" in s for s in sources.values()) else []),
               "format", "mean_tokens", "truncated", "n"]
    lines = [f"# Evaluation of {model}", "", "| source | " + " | ".join(metrics) + " |",
             "|---|" + "---:|" * len(metrics)]
    for name, s in sources.items():
        cells = [("-" if m not in s else f"{s[m]:.1f}" if m == "mean_tokens" else str(s[m]) if m == "n"
                  else f"{100 * s[m]:.1f}%") for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@dataclass(kw_only=True)
class EvaluateConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(init="runs/tiny/sft/final"))
    tokenizer: str | None = None  # null: the tokenizer saved with model.init
    system_prompt: str = "none"  # none | r1 | file:<path> | the system turn's text (data.chat.resolve_system_prompt)
    heldout: HeldoutConfig = field(default_factory=HeldoutConfig)  # math rows (prompt, answer); length, batch
    code: DataConfig | None = None  # code rows (prompt, tests[, entry_point]) scored in the sandbox; null: none
    samples: int = 1  # k completions per problem; 1 = one greedy completion
    temperature: float = 0.0  # must be > 0 when samples > 1
    top_p: float = 1.0
    pass_k: list[int] = field(default_factory=lambda: [1])  # pass@j reported for each j <= samples
    greedy: bool = False  # samples > 1: also decode greedily once per problem and report its pass@1
    seed: int = 0
    output: str = "runs/tiny/eval/heldout.json"

    def __post_init__(self):
        if self.tokenizer is None and self.model.init in presets():
            raise ConfigError("tokenizer", f"required when model.init is the preset {self.model.init!r}")
        if self.heldout.data is None and self.code is None:
            raise ConfigError("heldout.data", "give the math rows to evaluate on (or code rows in `code`)")
        if self.samples < 1:
            raise ConfigError("samples", f"must be >= 1, got {self.samples}")
        if self.samples > 1 and self.temperature <= 0:
            raise ConfigError("temperature", f"samples={self.samples} needs temperature > 0 (greedy samples are identical)")
        bad = [j for j in self.pass_k if not 1 <= j <= self.samples]
        if bad:
            raise ConfigError("pass_k", f"each j must be in [1, samples={self.samples}], got {bad}")


def main(argv: list[str] | None = None) -> dict:
    cfg = cli(EvaluateConfig, description="Held-out math accuracy / code pass rate of a checkpoint.", argv=argv)
    datasets.disable_progress_bars()
    # ---- setup
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model.init, "tokenizer" if cfg.tokenizer else "model.init")
    system = resolve_system_prompt(cfg.system_prompt)
    sets = {"math": load_heldout(cfg.heldout)}
    if cfg.code is not None:
        sets["code"] = list(load_rows(cfg.code, ["prompt", "tests"]))
    model = load_policy(cfg.model, tokenizer).to("cuda" if torch.cuda.is_available() else "cpu")
    sampling = SamplingConfig(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.heldout.max_new_tokens,
                              max_batch=max(cfg.heldout.batch_size, cfg.samples), seed=cfg.seed)
    # ---- generate and score
    by_source, rows = {}, []
    for source, data in sets.items():
        if data:
            prompts = [r["prompt"] for r in data]
            samples = generate(model, tokenizer, prompts, sampling, cfg.samples, system)
            by_source[source], results = score_source(source, data, samples, cfg.samples, cfg.pass_k)
            if cfg.greedy and cfg.samples > 1:
                greedy, greedy_rows = score_source(source, data, generate(
                    model, tokenizer, prompts, replace(sampling, temperature=0.0, top_p=1.0), 1, system), 1, [1])
                by_source[source].update(greedy=greedy["pass@1"], greedy_se=greedy["pass@1_se"])
                for r, g in zip(results, greedy_rows):
                    r.update(greedy_correct=g["correct"], greedy_completion=g["completion"])
            rows += results
    # ---- save
    first = next(iter(by_source.values()))
    math_summary = by_source.get("math", first)
    summary = {"accuracy": math_summary["pass@1"], "accuracy_se": math_summary["pass@1_se"],
               **({"greedy_accuracy": math_summary["greedy"], "greedy_se": math_summary["greedy_se"]}
                  if "greedy" in math_summary else {}),
               "metric": "greedy" if cfg.samples == 1 else
               f"pass@1 from {cfg.samples} samples (temperature {cfg.temperature}, top_p {cfg.top_p})",
               "n": math_summary["n"],
               "correct": sum(r["correct"] for r in rows if r["source"] == "math"),
               "truncated": math_summary["truncated"], "mean_tokens": math_summary["mean_tokens"],
               "format": sum(s["format"] * s["n"] for s in by_source.values()) / sum(s["n"] for s in by_source.values()),
               "by_source": {k: v["pass@1"] for k, v in by_source.items()}, "by_source_detail": by_source,
               "model": cfg.model.init}
    for source, s in by_source.items():
        print(f"{source}: " + ", ".join(f"{k}={v:.3f}" for k, v in s.items() if isinstance(v, float)), flush=True)
    if "math" in by_source:
        greedy = (f"; greedy {100 * summary['greedy_accuracy']:.1f}% +- {100 * summary['greedy_se']:.1f}"
                  if "greedy_accuracy" in summary else "")
        print(f"held-out accuracy: {100 * summary['accuracy']:.1f}% +- {100 * summary['accuracy_se']:.1f} "
              f"(math, {summary['metric']}, {summary['n']} problems{greedy})", flush=True)
    write_results({"summary": summary, "rows": rows}, cfg.output)
    Path(cfg.output).with_suffix(".md").write_text(markdown(summary, cfg.model.init))
    return summary


if __name__ == "__main__":
    run(main)
