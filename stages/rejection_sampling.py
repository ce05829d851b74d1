"""Stage 3a, rejection sampling: the RL checkpoint's verified answers + general data -> an SFT dataset.

    python -m stages.rejection_sampling --recipe recipes/tiny/rejection_sampling.yaml [key=value ...]

For each reasoning prompt x (math and code rows) the policy samples k completions y_1..y_k; a sample is
kept iff ``reject_reason`` finds nothing wrong with it:

    finished   the completion ended with the end-of-turn token (not cut at max_new_tokens)
    correct    math: every final answer is equivalent to the gold (``rewards.math.correctness``);
               code: all tests pass in the sandbox (``rewards.code.code_reward`` == 1)
    formatted  ``<think>`` reasoning ``</think>`` then the answer in the source's form (``rewards.format``)
    language   language consistency of the reasoning (``rewards.language``) >= ``filter.min_language``
               (not applicable, e.g. reasoning made only of math: kept)
    new        not a duplicate of a sample already kept for the same prompt (whitespace-normalised text),
               and at most ``filter.max_per_prompt`` kept per prompt

Acceptance rate per source = kept / sampled. The kept samples become chat rows; general (non-reasoning)
rows are added so that they make up ``general_ratio`` of the dataset (DeepSeek-R1: ~200k of ~800k, 0.25):

    n_general = min(round(n_reasoning * general_ratio / (1 - general_ratio)), available general rows)
    (or exactly ``general_rows``)

drawn without replacement with the stage's seed, then everything is shuffled. DeepSeek-R1 additionally uses
a generative judge (DeepSeek-V3) for answers without rules and filters mixed-language/long/code-block CoT;
here only rule-checkable prompts are sampled. The dataset trains ``stages.sft`` again — from the base in R1
(from the cold-start checkpoint for the from-scratch tiny model, see recipes/tiny/pipeline.yaml), or a
smaller student (distillation).

With ``system_prompt`` (``none``, ``r1``, ``file:<path>`` or the text; ``data.chat.resolve_system_prompt``) the
prompts are sampled after that system turn, and the kept samples' rows carry it (the general rows do not).

Writes to ``output_dir``: ``sft_data.jsonl`` (rows {messages, source}), ``samples.jsonl`` (every sample with
its verdict), ``summary.json`` (acceptance per source and rejection reasons) and ``DONE``.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import torch
from accelerate.utils import set_seed

from data.chat import resolve_system_prompt
from data.loaders import DataConfig, DataError, load_mixed, load_rows, mix_by_weight
from grpo.checkpoint import mark_done
from grpo.config import ConfigError, cli, run
from grpo.model import ModelConfig, load_policy, presets
from grpo.rollout import SamplingConfig
from grpo.model_dir import load_tokenizer
from rewards.code import code_reward
from rewards.format import format_checks
from rewards.language import language_consistency
from rewards.math import correctness
from stages.evaluate import generate

SOURCES = ("math", "code")
REASONS = ("truncated", "incorrect", "format", "language", "duplicate", "over_cap")


@dataclass(kw_only=True)
class FilterConfig:
    min_language: float = 1.0  # share of the reasoning in the prompt's script
    max_per_prompt: int = 2  # kept samples per prompt (after deduplication)

    def __post_init__(self):
        if not 0 <= self.min_language <= 1:
            raise ConfigError("min_language", f"must be in [0, 1], got {self.min_language}")
        if self.max_per_prompt < 1:
            raise ConfigError("max_per_prompt", f"must be >= 1, got {self.max_per_prompt}")


@dataclass
class Candidate:
    """One sampled completion and the rule-based verdicts it needs."""

    group: int  # index of its prompt
    prompt: str
    completion: str
    source: str  # "math" | "code"
    correct: bool | None  # the rule-based verdict; None = could not be checked (rejected as incorrect)
    truncated: bool  # cut at max_new_tokens


def reject_reason(c: Candidate, cfg: FilterConfig) -> str | None:
    """Why a candidate is rejected (one of REASONS but the per-prompt ones), or None if it passes."""
    if c.truncated:
        return "truncated"
    if not c.correct:
        return "incorrect"
    if not all(format_checks(c.completion, c.source)):
        return "format"
    language = language_consistency([c.prompt], [c.completion])[0]
    if language is not None and language < cfg.min_language:
        return "language"
    return None


def filter_candidates(candidates: list[Candidate], cfg: FilterConfig) -> tuple[list[Candidate], dict[str, Counter]]:
    """The kept candidates (input order) and, per source, a Counter of {"sampled", "kept", <reason>: n}."""
    kept, stats, seen = [], {}, {}
    for c in candidates:
        counts = stats.setdefault(c.source, Counter())
        counts["sampled"] += 1
        reason = reject_reason(c, cfg)
        if reason is None:
            texts = seen.setdefault(c.group, set())
            key = " ".join(c.completion.split())
            reason = "duplicate" if key in texts else "over_cap" if len(texts) >= cfg.max_per_prompt else None
            texts.add(key)
        if reason is None:
            kept.append(c)
            counts["kept"] += 1
        else:
            counts[reason] += 1
    return kept, stats


def general_count(n_reasoning: int, general_ratio: float, available: int) -> int:
    """General rows to add so that they make up ``general_ratio`` of the result, at most ``available``."""
    if not 0 <= general_ratio < 1:
        raise ValueError(f"general_ratio must be in [0, 1), got {general_ratio}")
    return min(round(n_reasoning * general_ratio / (1 - general_ratio)), available)


def mix(reasoning: list[dict], general: list[dict], n_general: int, seed: int) -> list[dict]:
    """reasoning rows + n_general general rows drawn without replacement, shuffled (seeded)."""
    rng = random.Random(seed)
    rows = reasoning + rng.sample(general, min(n_general, len(general)))
    rng.shuffle(rows)
    return rows


def chat_row(prompt: str, response: str, source: str, system: str | None = None) -> dict:
    """An SFT row {messages, source}: the ``system`` turn when given, the user prompt, the response."""
    turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return {"messages": ([{"role": "system", "content": system}] if system else []) + turns, "source": source}


def verdicts(rows: list[dict], samples: list[dict], k: int) -> list[bool | None]:
    """Rule-based correctness of every sample (rows[i] owns samples i*k .. i*k+k-1)."""
    out: list[bool | None] = [None] * len(samples)
    for source in SOURCES:
        idx = [j for j in range(len(samples)) if rows[j // k]["source"] == source]
        if not idx:
            continue
        completions = [samples[j]["completion"] for j in idx]
        if source == "math":
            got = correctness(completions, [rows[j // k]["answer"] for j in idx])
        else:
            scores = code_reward([rows[j // k]["prompt"] for j in idx], completions,
                                 tests=[rows[j // k].get("tests") for j in idx],
                                 entry_point=[rows[j // k].get("entry_point") for j in idx])
            got = [None if s is None else s == 1.0 for s in scores]
        for j, v in zip(idx, got):
            out[j] = v
    return out


@dataclass(kw_only=True)
class RejectionSamplingConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(init="runs/tiny/rl_reasoning/final", mtp_layers=0))
    tokenizer: str | None = None  # null: the one saved with model.init
    system_prompt: str = "none"  # none | r1 | file:<path> | the system turn's text (data.chat.resolve_system_prompt)
    prompts: list[DataConfig] = field(default_factory=lambda: [
        DataConfig(path="runs/tiny/data/math_train.jsonl"), DataConfig(path="runs/tiny/data/code_train.jsonl")])
    prompts_per_source: dict[str, int] = field(default_factory=dict)  # e.g. {math: 300}: a seeded subset; absent: all
    samples: int = 4  # k completions per prompt
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.7, max_new_tokens=256))
    filter: FilterConfig = field(default_factory=FilterConfig)
    general: list[DataConfig] = field(default_factory=lambda: [DataConfig(path="runs/tiny/data/general_train.jsonl")])
    general_ratio: float = 0.25  # share of general (non-reasoning) rows in the written dataset
    general_rows: int | None = None  # an exact number of general rows instead (e.g. when few samples pass)
    seed: int = 0
    output_dir: str = "runs/tiny/rejection_sampling"

    def __post_init__(self):
        if self.tokenizer is None and self.model.init in presets():
            raise ConfigError("tokenizer", f"required when model.init is the preset {self.model.init!r}; rejection "
                              "sampling normally samples the RL checkpoint (model.init=runs/tiny/rl_reasoning/final)")
        if not self.prompts:
            raise ConfigError("prompts", "needs at least one dataset of math/code prompts")
        if self.samples < 1:
            raise ConfigError("samples", f"must be >= 1, got {self.samples}")
        if self.sampling.temperature <= 0 and self.samples > 1:
            raise ConfigError("sampling.temperature", f"samples={self.samples} needs temperature > 0")
        if not 0 <= self.general_ratio < 1:
            raise ConfigError("general_ratio", f"must be in [0, 1), got {self.general_ratio}")
        unknown = sorted(set(self.prompts_per_source) - set(SOURCES))
        if unknown:
            raise ConfigError("prompts_per_source", f"unknown source {unknown[0]!r}; sources: {', '.join(SOURCES)}")


def main(argv: list[str] | None = None) -> dict:
    cfg = cli(RejectionSamplingConfig, description="Stage 3a: rejection sampling from the RL checkpoint.", argv=argv)
    datasets.disable_progress_bars()
    out = Path(cfg.output_dir)

    # ---- setup: prompts (a seeded subset per source), general rows, the policy (a failing setup leaves an
    # earlier run's results and DONE as they were)
    set_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    system = resolve_system_prompt(cfg.system_prompt)
    parts = [load_rows(d, ["prompt", "source"]) for d in cfg.prompts]
    for part in parts:
        bad = sorted({r["source"] for r in part} - set(SOURCES))
        if bad:
            raise DataError(f"{part.source}: rows with source {bad[0]!r}; rejection sampling takes "
                            f"{', '.join(SOURCES)} rows")
    rows = mix_by_weight(parts, [d.weight for d in cfg.prompts], cfg.seed)
    for source, n in cfg.prompts_per_source.items():
        mine = [i for i, r in enumerate(rows) if r["source"] == source]
        keep = set(rng.sample(mine, min(n, len(mine))))
        rows = [r for i, r in enumerate(rows) if r["source"] != source or i in keep]
    general = [chat_row(r["prompt"], r["response"], "general")
               for r in load_mixed(cfg.general, ["prompt", "response"], cfg.seed)]
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model.init, "tokenizer" if cfg.tokenizer else "model.init")
    model = load_policy(cfg.model, tokenizer).to("cuda" if torch.cuda.is_available() else "cpu")
    out.mkdir(parents=True, exist_ok=True)
    (out / "DONE").unlink(missing_ok=True)  # inputs loaded, about to sample: the output is no longer complete

    # ---- sample k per prompt, verify, filter
    k = cfg.samples
    sampling = SamplingConfig(**{**asdict(cfg.sampling), "max_batch": max(cfg.sampling.max_batch, k)})
    samples = generate(model, tokenizer, [r["prompt"] for r in rows], sampling, k, system)
    correct = verdicts(rows, samples, k)
    candidates = [Candidate(group=j // k, prompt=rows[j // k]["prompt"], completion=s["completion"],
                            source=rows[j // k]["source"], correct=correct[j], truncated=s["finish_reason"] == "length")
                  for j, s in enumerate(samples)]
    kept, stats = filter_candidates(candidates, cfg.filter)

    # ---- mix with general data and save
    reasoning = [chat_row(c.prompt, c.completion, c.source, system) for c in kept]
    n_general = (min(cfg.general_rows, len(general)) if cfg.general_rows is not None
                 else general_count(len(reasoning), cfg.general_ratio, len(general)))
    dataset = mix(reasoning, general, n_general, cfg.seed)
    if not dataset:
        raise RuntimeError(f"rejection sampling kept no sample of {len(samples)} and there are no general rows; "
                           f"rejections: {dict(sum(stats.values(), Counter()))}")
    with open(out / "sft_data.jsonl", "w") as f:
        for row in dataset:
            f.write(json.dumps(row) + "\n")
    with open(out / "samples.jsonl", "w") as f:
        for c in candidates:
            f.write(json.dumps({**asdict(c), "rejected": reject_reason(c, cfg.filter)}) + "\n")
    summary = {
        "acceptance": {s: c["kept"] / c["sampled"] for s, c in stats.items()},
        "counts": {s: dict(c) for s, c in stats.items()},
        "prompts_with_a_kept_sample": {s: len({c.group for c in kept if c.source == s}) for s in stats},
        "prompts": {s: sum(r["source"] == s for r in rows) for s in stats},
        "rows": {"reasoning": len(reasoning), "general": len(dataset) - len(reasoning), "total": len(dataset)},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for s, c in stats.items():
        print(f"{s}: kept {c['kept']}/{c['sampled']} = {100 * c['kept'] / c['sampled']:.1f}% "
              f"(rejected: {', '.join(f'{r} {c[r]}' for r in REASONS if c[r])})", flush=True)
    print(f"wrote {len(dataset)} rows ({len(reasoning)} reasoning + {len(dataset) - len(reasoning)} general) "
          f"to {out / 'sft_data.jsonl'}", flush=True)
    mark_done(out, summary)
    return summary


if __name__ == "__main__":
    run(main)
