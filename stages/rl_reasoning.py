"""Stage 2, reasoning RL: GRPO from the cold-start SFT checkpoint on verifiable math and code prompts.

    python -m stages.rl_reasoning --recipe recipes/tiny/rl_reasoning.yaml [key=value ...]
    accelerate launch -m stages.rl_reasoning --recipe recipes/v3-mini/rl_reasoning.yaml

Objective: GRPO (``grpo.loss``, DeepSeekMath eq. 3 and its variants) with group-relative advantages
(``grpo.advantages``) of the rule-based rewards DeepSeek-R1 uses in this stage:

    r = w_acc * accuracy (math: answer equivalence, None on code prompts)
      + w_code * code (code: sandboxed test pass rate, None on math prompts)
      + w_fmt * format (<think> ... </think> then the answer in the form the source expects)
      + w_lang * language consistency (share of the reasoning in the prompt's language)

A None ("does not apply") is left out of that reward's group statistics and adds 0 to the sum. The
prompts are the user turns of the data rows rendered with the tokenizer's chat template, optionally
with a system turn (``system_prompt``: ``none``, ``r1`` for DeepSeek-R1's instruction ``data.chat.R1_TEMPLATE``,
``file:<path>`` for a file's text, or the text itself; ``data.chat.resolve_system_prompt``; the held-out
evaluation uses it too) and a prefilled ``<think>`` (``think: true``; the format reward must then be told
``think_prefilled: true``).

Writes to ``output_dir``: ``checkpoints/`` (full training state), ``final/`` (save_pretrained + tokenizer:
``model.init`` of the next stage), ``metrics.jsonl``, ``tables/completions.jsonl`` (sampled completions with
their rewards), ``wandb/``, ``eval.json`` (held-out greedy accuracy) and ``DONE`` when complete (``final/``,
``eval.json`` and ``DONE`` each written under a temporary name, then renamed into place).

Re-running the same command continues from the latest checkpoint in ``output_dir`` (``train.resume_from:
latest``, the default; ``none`` starts over and removes the old checkpoints); only the step budget, logging,
checkpointing and evaluation keys may differ from the checkpoint's ``run_config.yaml`` (``grpo.checkpoint``).
SIGINT/SIGTERM: the current step finishes, a checkpoint is written, exit status 130/143; a second signal exits
at once. ``DONE`` is removed only once the new run has loaded its inputs and starts training.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import datasets
import transformers
from accelerate.utils import set_seed

from data.chat import encode_prompt, resolve_system_prompt
from data.loaders import DataConfig, load_mixed
from grpo.checkpoint import export_model, mark_done, publish, resume_point
from grpo.config import ConfigError, cli, run
from grpo.model import ModelConfig, load_policy, presets
from grpo.parallel import make_accelerator
from grpo.rollout import SamplingConfig
from grpo.trainer import GRPOTrainer, TrainerConfig
from grpo.model_dir import load_tokenizer
from rewards.registry import RewardSet, RewardSpec
from stages.evaluate import HeldoutConfig, curve_point, heldout_accuracy, load_heldout, summary_line, write_results


def default_rewards() -> list[RewardSpec]:
    return [RewardSpec(name="accuracy"), RewardSpec(name="code"), RewardSpec(name="format", weight=0.2),
            RewardSpec(name="language", weight=0.1)]


@dataclass(kw_only=True)
class RLReasoningConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(init="runs/tiny/sft/final", mtp_layers=0))
    tokenizer: str | None = None  # tokenizer dir; null: the one saved with model.init
    data: list[DataConfig] = field(default_factory=lambda: [
        DataConfig(path="runs/tiny/data/math_rl.jsonl"), DataConfig(path="runs/tiny/data/code_train.jsonl")])
    system_prompt: str = "none"  # none | r1 (DeepSeek-R1's instruction) | file:<path> | the system turn's text
    think: bool = False  # prefill "<think>\n" after the assistant opener
    rewards: list[RewardSpec] = field(default_factory=default_rewards)
    rewards_on_error: Literal["raise", "zero"] = "raise"  # a reward raising on a sample: stop, or score it 0
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: TrainerConfig = field(default_factory=TrainerConfig)
    eval: HeldoutConfig = field(default_factory=HeldoutConfig)
    output_dir: str = "runs/tiny/rl_reasoning"
    run_name: str = "rl_reasoning"
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"

    def __post_init__(self):
        if self.tokenizer is None and self.model.init in presets():
            raise ConfigError("tokenizer", f"required when model.init is the preset {self.model.init!r}; "
                              "reasoning RL normally starts from the SFT checkpoint (model.init=runs/tiny/sft/final)")
        if not self.data:
            raise ConfigError("data", "needs at least one dataset of prompts")
        self.eval.refuse_curve_under(self.train.deepspeed)
        if not self.rewards:
            raise ConfigError("rewards", "needs at least one reward (e.g. [{name: accuracy}])")
        names = [r.name for r in self.rewards]
        if len(set(names)) != len(names):
            raise ConfigError("rewards", f"each reward may appear once, got {names}")
        if self.sampling.temperature <= 0:
            raise ConfigError("sampling.temperature", "GRPO samples groups: must be > 0")
        if self.sampling.max_batch < self.train.group_size:
            raise ConfigError("sampling.max_batch", f"must be >= train.group_size = {self.train.group_size} "
                              f"(a group decodes together), got {self.sampling.max_batch}")
        fmt = next((r for r in self.rewards if r.name == "format"), None)
        if fmt is not None and bool(fmt.kwargs.get("think_prefilled", False)) != self.think:
            raise ConfigError("rewards", f"think={self.think} but the format reward has think_prefilled="
                              f"{fmt.kwargs.get('think_prefilled', False)}; set kwargs: {{think_prefilled: {str(self.think).lower()}}}")


def main(argv: list[str] | None = None) -> dict:
    cfg = cli(RLReasoningConfig, description="Stage 2: reasoning RL (GRPO) from the cold-start SFT checkpoint.",
              argv=argv)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    out = Path(cfg.output_dir)

    # ---- setup: inputs checked before the policy loads (a refused or failing setup leaves an earlier run's
    # results and DONE as they were)
    set_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model.init, "tokenizer" if cfg.tokenizer else "model.init")
    system = resolve_system_prompt(cfg.system_prompt)
    rows = load_mixed(cfg.data, ["prompt"], cfg.train.seed)
    heldout = load_heldout(cfg.eval)
    rewards = RewardSet(cfg.rewards, on_error=cfg.rewards_on_error)
    resume_point(cfg.output_dir, cfg.train.resume_from, cfg)  # a bad checkpoint or refused change: before the policy loads
    model = load_policy(cfg.model, tokenizer)
    trainer = GRPOTrainer(
        cfg.train, model=model, tokenizer=tokenizer, sampling=cfg.sampling, rewards=rewards, rows=rows,
        encode=lambda row: encode_prompt(tokenizer, row["prompt"], system, cfg.think),
        output_dir=str(out), run_name=cfg.run_name, wandb_mode=cfg.wandb_mode, run_config=cfg,
        accelerator=make_accelerator(cfg.train.parallel.timeout_s))
    if int(os.environ.get("RANK", "0")) == 0:  # inputs loaded, about to train: the output is no longer complete
        (out / "DONE").unlink(missing_ok=True)

    # ---- loop
    curve = (lambda: curve_point(trainer.policy, tokenizer, heldout, cfg.eval, system)) if heldout else None
    metrics = trainer.train(curve, cfg.eval.every)

    # ---- save, evaluate
    return save_and_evaluate(trainer, cfg, tokenizer, heldout, metrics, system)


def save_and_evaluate(trainer: GRPOTrainer, cfg, tokenizer, heldout: list[dict], metrics: dict,
                      system: str | None) -> dict:
    """Export the trained policy to ``output_dir/final``, score it on the held-out rows (prompted with the
    ``system`` turn the policy was trained with), mark the stage done. ``cfg`` is an RL stage config (``model``,
    ``train``, ``eval``, ``output_dir``); returns the DONE record."""
    out, acc = Path(cfg.output_dir), trainer.accelerator
    final = export_model(out / "final", trainer.model, tokenizer, cfg, accelerator=acc)
    result = {"steps": trainer.step, "final": str(final), "reward": metrics.get("reward"),
              **{k: v for k, v in metrics.items() if k.startswith("by_source/")}}
    if heldout and acc.is_main_process:
        # with expert parallelism the trained policy's experts are spread over ranks: evaluate the exported model
        policy = load_policy(replace(cfg.model, init=str(final)), tokenizer).to(acc.device) if cfg.train.deepspeed \
            else trainer.policy
        scores = heldout_accuracy(policy, tokenizer, heldout, max_new_tokens=cfg.eval.max_new_tokens,
                                  batch_size=cfg.eval.batch_size, system=system)
        print(summary_line(scores, cfg.eval), flush=True)
        write_results(scores, out / ".tmp-eval/eval.json")
        publish(out / ".tmp-eval", out)
        result["heldout"] = scores["summary"]
    acc.wait_for_everyone()
    if acc.is_main_process:
        mark_done(out, result)
    return result

if __name__ == "__main__":
    run(main)
