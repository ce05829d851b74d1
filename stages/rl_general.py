"""Stage 4b, RL for all scenarios: GRPO over reasoning prompts (rule-based rewards) and general prompts
(a reward model), from the rejection-sampling SFT checkpoint.

    python -m stages.rl_general --recipe recipes/tiny/rl_general.yaml [key=value ...]

Objective: GRPO exactly as in ``stages.rl_reasoning`` (``grpo.trainer.GRPOTrainer``), with the reward of a
sample of a row from source s

    r = sum_f w_f * r_f       over the rewards f that apply to s (the others are None: 0 in the sum, left
                              out of that reward's group statistics)

    math/code rows:  accuracy (math), code (sandboxed tests), format, language consistency
    general rows:    reward_model (the scalar of ``stages.reward_model``'s model, ``rewards.reward_model``)

Which reward applies to which source: ``reward_sources`` (reward name -> sources; a reward not listed applies
wherever it returns a value, e.g. accuracy is None without a gold answer); ``route_scores`` sets the others to
None. Groups never mix sources (a group is G samples of one prompt), so each group is normalised against
its own kind of reward. Departures from DeepSeek-R1: one reward model for helpfulness (R1 also has a
harmlessness model judging the whole response, and scores only the summary for helpfulness); the general
prompts are the built-in ones; no preference reward on reasoning rows.

The trainer logs ``by_source/<source>/reward`` and ``by_source/<source>/<reward>`` (means per source of
every sample generated in the step). Writes what ``stages.rl_reasoning`` writes (``final/``, ``DONE``, ...) and
resumes, stops on SIGINT/SIGTERM and keeps a finished run's ``DONE`` through a failed re-run the same way;
``system_prompt`` adds a system turn to every prompt as there.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import datasets
import transformers
from accelerate.utils import set_seed

from data.chat import encode_prompt, resolve_system_prompt
from data.loaders import DataConfig, load_mixed
from grpo.checkpoint import resume_point
from grpo.config import ConfigError, cli, run
from grpo.model import ModelConfig, load_policy, presets
from grpo.parallel import make_accelerator
from grpo.rollout import SamplingConfig
from grpo.trainer import GRPOTrainer, TrainerConfig
from grpo.model_dir import load_tokenizer
from rewards.registry import RewardScores, RewardSet, RewardSpec
from stages.evaluate import HeldoutConfig, curve_point, load_heldout
from stages.rl_reasoning import save_and_evaluate

REWARD_COLUMNS = ("answer", "tests", "entry_point", "test_cases", "language")  # None where a row lacks them


def default_rewards() -> list[RewardSpec]:
    return [RewardSpec(name="accuracy"), RewardSpec(name="code"), RewardSpec(name="format", weight=0.2),
            RewardSpec(name="language", weight=0.1), RewardSpec(name="reward_model", weight=1.0)]


def default_sources() -> dict[str, list[str]]:
    return {"format": ["math", "code"], "language": ["math", "code"], "reward_model": ["general"]}


def route_scores(scores: RewardScores, sources: list[str | None], routes: dict[str, list[str]]) -> RewardScores:
    """``scores`` with reward f set to None on samples whose source is not in routes[f] (rewards not in
    ``routes`` unchanged)."""
    per_reward = {name: [v if name not in routes or s in routes[name] else None for v, s in zip(values, sources)]
                  for name, values in scores.per_reward.items()}
    return dataclasses.replace(scores, per_reward=per_reward)


class RoutedRewards:
    """A RewardSet whose rewards apply only to the sources ``routes`` names (see ``route_scores``)."""

    def __init__(self, rewards: RewardSet, routes: dict[str, list[str]]):
        self.rewards, self.routes = rewards, routes

    def __call__(self, prompts: list[str], completions: list[str], **columns) -> RewardScores:
        if "source" not in columns:
            raise ValueError("rl_general needs a 'source' column on every row (math, code or general)")
        return route_scores(self.rewards(prompts, completions, **columns), columns["source"], self.routes)


@dataclass(kw_only=True)
class RLGeneralConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(init="runs/tiny/sft_rs/final", mtp_layers=0))
    tokenizer: str | None = None  # null: the one saved with model.init
    system_prompt: str = "none"  # none | r1 | file:<path> | the system turn's text (as in stages.rl_reasoning)
    data: list[DataConfig] = field(default_factory=lambda: [
        DataConfig(path="runs/tiny/data/math_rl.jsonl"), DataConfig(path="runs/tiny/data/code_train.jsonl"),
        DataConfig(path="runs/tiny/data/general_train.jsonl")])
    reward_model: str | None = "runs/tiny/reward_model/final"  # sets the reward_model reward's kwargs.path
    rewards: list[RewardSpec] = field(default_factory=default_rewards)
    reward_sources: dict[str, list[str]] = field(default_factory=default_sources)
    rewards_on_error: Literal["raise", "zero"] = "raise"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: TrainerConfig = field(default_factory=TrainerConfig)
    eval: HeldoutConfig = field(default_factory=HeldoutConfig)
    output_dir: str = "runs/tiny/rl_general"
    run_name: str = "rl_general"
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"

    def __post_init__(self):
        if self.tokenizer is None and self.model.init in presets():
            raise ConfigError("tokenizer", f"required when model.init is the preset {self.model.init!r}; general RL "
                              "normally starts from the rejection-sampling SFT checkpoint")
        if not self.data:
            raise ConfigError("data", "needs at least one dataset of prompts")
        self.eval.refuse_curve_under(self.train.deepspeed)
        names = [r.name for r in self.rewards]
        if len(set(names)) != len(names):
            raise ConfigError("rewards", f"each reward may appear once, got {names}")
        unknown = sorted(set(self.reward_sources) - set(names))
        if unknown:
            raise ConfigError("reward_sources", f"names reward {unknown[0]!r}, which is not in rewards ({names})")
        rm = next((r for r in self.rewards if r.name == "reward_model"), None)
        if rm is not None and self.reward_model is not None:
            rm.kwargs = {**rm.kwargs, "path": self.reward_model}
        if rm is not None and "path" not in rm.kwargs:
            raise ConfigError("reward_model", "the reward_model reward needs the trained model's directory "
                              "(reward_model=runs/tiny/reward_model/final)")
        if self.sampling.max_batch < self.train.group_size:
            raise ConfigError("sampling.max_batch", f"must be >= train.group_size = {self.train.group_size}")


def load_prompts(cfgs: list[DataConfig], seed: int) -> list[dict]:
    """Rows of the datasets mixed by weight (``data.loaders.load_mixed``), each with a ``source`` and every reward
    column (None where a row has none), so a batch of only general rows still hands ``answer``/``tests`` columns
    to the rewards."""
    return [{**{c: None for c in REWARD_COLUMNS}, **row} for row in load_mixed(cfgs, ["prompt", "source"], seed)]


def main(argv: list[str] | None = None) -> dict:
    cfg = cli(RLGeneralConfig, description="Stage 4b: RL for all scenarios (rule-based + reward-model rewards).",
              argv=argv)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    out = Path(cfg.output_dir)

    # ---- setup: inputs checked before the policy loads (a refused or failing setup leaves an earlier run's
    # results and DONE as they were)
    set_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model.init, "tokenizer" if cfg.tokenizer else "model.init")
    system = resolve_system_prompt(cfg.system_prompt)
    rows = load_prompts(cfg.data, cfg.train.seed)
    heldout = load_heldout(cfg.eval)
    rewards = RoutedRewards(RewardSet(cfg.rewards, on_error=cfg.rewards_on_error), cfg.reward_sources)
    resume_point(cfg.output_dir, cfg.train.resume_from, cfg)  # a bad checkpoint or refused change: before the policy loads
    model = load_policy(cfg.model, tokenizer)
    trainer = GRPOTrainer(
        cfg.train, model=model, tokenizer=tokenizer, sampling=cfg.sampling, rewards=rewards, rows=rows,
        encode=lambda row: encode_prompt(tokenizer, row["prompt"], system),
        output_dir=str(out), run_name=cfg.run_name, wandb_mode=cfg.wandb_mode, run_config=cfg,
        accelerator=make_accelerator(cfg.train.parallel.timeout_s))
    if int(os.environ.get("RANK", "0")) == 0:  # inputs loaded, about to train: the output is no longer complete
        (out / "DONE").unlink(missing_ok=True)

    # ---- loop
    curve = (lambda: curve_point(trainer.policy, tokenizer, heldout, cfg.eval, system)) if heldout else None
    metrics = trainer.train(curve, cfg.eval.every)

    # ---- save, evaluate
    return save_and_evaluate(trainer, cfg, tokenizer, heldout, metrics, system)

if __name__ == "__main__":
    run(main)
