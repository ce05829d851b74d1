"""Held-out math accuracy of a checkpoint: greedy decoding, answers checked by ``rewards.math``.

    python -m stages.evaluate --recipe recipes/tiny/evaluate.yaml [key=value ...]

For N held-out problems (prompt x_i, gold answer a_i) and the greedy completion y_i = argmax-decode(x_i)
(chat template applied, at most ``max_new_tokens`` tokens, stopping at the end-of-turn token):

    accuracy = 1/N * sum_i 1[ every final answer extracted from y_i is equivalent to a_i ]

(``rewards.math.correctness``: ``\\boxed{}`` first, then "the answer is ...", sympy equivalence under a
timeout). Also reported: the share of completions cut at ``max_new_tokens``, the mean completion
length, and accuracy per ``difficulty`` / ``source`` when the rows carry those columns.
The SFT stage calls ``heldout_accuracy`` after training; run this module to score any checkpoint.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer

from data.chat import encode_prompt
from data.loaders import DataConfig, load_rows
from grpo.config import ConfigError, cli
from grpo.model import ModelConfig, load_policy, presets
from grpo.rollout import RolloutEngine, SamplingConfig
from rewards.math import correctness

GROUP_COLUMNS = ("difficulty", "source")


@dataclass(kw_only=True)
class HeldoutConfig:
    data: DataConfig | None = field(
        default_factory=lambda: DataConfig(path="runs/tiny/data/math_test.jsonl", split="test")
    )  # rows with `prompt` and `answer`; null skips the evaluation
    max_new_tokens: int = 256
    batch_size: int = 64  # sequences decoded together

    def __post_init__(self):
        for key in ("max_new_tokens", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")


def load_heldout(cfg: HeldoutConfig) -> list[dict]:
    return [] if cfg.data is None else list(load_rows(cfg.data, ["prompt", "answer"]))


@torch.no_grad()
def heldout_accuracy(model, tokenizer, rows: list[dict], *, max_new_tokens: int = 256, batch_size: int = 64) -> dict:
    """Greedy-decode every row's prompt (chat template, no system prompt) and score it with `score`."""
    was_training = model.training
    model.eval()
    engine = RolloutEngine(model, tokenizer, SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens,
                                                            max_batch=batch_size))
    rollout = engine.generate([encode_prompt(tokenizer, r["prompt"]) for r in rows], group_size=1)
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


@dataclass(kw_only=True)
class EvaluateConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(init="runs/tiny/sft/final"))
    tokenizer: str | None = None  # null: the tokenizer saved with model.init
    heldout: HeldoutConfig = field(default_factory=HeldoutConfig)
    output: str = "runs/tiny/eval/heldout.json"

    def __post_init__(self):
        if self.tokenizer is None and self.model.init in presets():
            raise ConfigError("tokenizer", f"required when model.init is the preset {self.model.init!r}")
        if self.heldout.data is None:
            raise ConfigError("heldout.data", "the dataset to evaluate on is required here")


def main(argv: list[str] | None = None) -> dict:
    cfg = cli(EvaluateConfig, description="Held-out math accuracy of a checkpoint (greedy).", argv=argv)
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model.init)
    rows = load_heldout(cfg.heldout)
    model = load_policy(cfg.model, tokenizer).to("cuda" if torch.cuda.is_available() else "cpu")
    scores = heldout_accuracy(model, tokenizer, rows, max_new_tokens=cfg.heldout.max_new_tokens,
                              batch_size=cfg.heldout.batch_size)
    print(summary_line(scores, cfg.heldout), flush=True)
    write_results(scores, cfg.output)
    return scores["summary"]


if __name__ == "__main__":
    main()
