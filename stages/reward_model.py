"""Stage 4a, reward model: a scalar head on the policy architecture trained on preference pairs.

    python -m stages.reward_model --recipe recipes/tiny/reward_model.yaml [key=value ...]

Model: ``AutoModelForSequenceClassification.from_pretrained(model.init, num_labels=1)``: for a DeepSeek-V3
checkpoint (e.g. the SFT policy's ``final/``) that is transformers' ``DeepseekV3ForSequenceClassification``,
the policy's backbone (MLA, MoE) plus a new linear score head read at the last non-padding token; any other
HF causal-LM checkpoint gets its own sequence-classification class. MTP layers of the policy are not loaded.

Objective (Bradley-Terry), for pairs (x, y_c, y_r) with y_c preferred:

    L(theta) = -1/B * sum_b log sigmoid( r_theta(x_b, y_c,b) - r_theta(x_b, y_r,b) )

r_theta(x, y) = the score of ``rewards.reward_model.render(tokenizer, x, y)`` (the chat template over the user
and assistant turns), tokenized by ``rewards.reward_model.encode`` (left-truncated to ``max_length``), so
``rewards.reward_model.RewardModelReward`` scores the saved model exactly as in training. Reported: held-out
pairwise accuracy = share of test pairs with r(x, y_c) > r(x, y_r), before and after training.

Departures: the V3 router keeps the SFT checkpoint's expert bias (transformers' router, frozen: neither
the aux-loss-free bias update nor the sequence-wise balance loss runs here; a short RM fine-tune barely
moves the expert load). No margin term, no reward centring (InstructGPT / Llama-2 variants).

Batches: passes over the pairs, each a permutation seeded by (seed, pass); a batch that runs past the end of
a pass continues into the next. The data position (pass, index) is checkpointed with the model, optimizer,
schedule and RNG streams, so a resumed run continues with the same batches. Re-running the same command resumes
from the latest checkpoint in ``output_dir`` (``train.resume_from: latest``, the default; ``none`` starts over and
removes the old checkpoints; only the step budget, logging and checkpointing keys may differ from the
checkpoint's ``run_config.yaml``, see ``grpo.checkpoint``). SIGINT/SIGTERM: the current step finishes, a
checkpoint is written, exit status 130/143; a second signal exits at once. ``DONE`` is removed only once the new
run has loaded its inputs (a failing re-run leaves a finished run as it was).

Writes to ``output_dir``: ``checkpoints/`` (``grpo.checkpoint``), ``final/`` (save_pretrained + tokenizer:
``rewards.reward_model``'s ``path``), ``metrics.jsonl``, ``summary.json`` and ``DONE`` (``final/``, ``summary.json``
and ``DONE`` written under a temporary name, then renamed into place).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import datasets
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from transformers import AutoModelForSequenceClassification

from data.loaders import DataConfig, load_mixed, load_rows
from grpo.checkpoint import (StopOnSignal, export_model, load_checkpoint, mark_done, resume_point, save_checkpoint,
                             start_fresh, write_atomic)
from grpo.config import ConfigError, cli, run
from grpo.logger import MetricsLogger
from grpo.optim import AdamWConfig, build_step
from grpo.model_dir import check_model_dir, load_tokenizer
from rewards.reward_model import encode


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """-mean log sigmoid(r_c - r_r) over pairs; chosen, rejected: [B] scores. Scalar."""
    return -F.logsigmoid(chosen - rejected).mean()


@dataclass(kw_only=True)
class RMModelConfig:
    init: str = "runs/tiny/sft_rs/final"  # a checkpoint dir (or hub id) with a tokenizer: the backbone
    dtype: Literal["float32", "bfloat16"] = "float32"


@dataclass(kw_only=True)
class RMTrainConfig:
    lr: float = 1e-4
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    max_steps: int = 100
    batch_size: int = 16  # pairs per step
    max_length: int = 512  # tokens per rendered (prompt, response), left-truncated
    max_grad_norm: float = 1.0
    seed: int = 0
    log_every: int = 10
    save_every: int = 0  # steps between checkpoints; 0 = only the final one
    keep_last: int = 2
    # "latest": output_dir/checkpoints' newest (a fresh start if none); "none": start over, removing them; or a dir
    resume_from: str | None = "latest"

    def __post_init__(self):
        for key in ("max_steps", "batch_size", "log_every", "keep_last"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.save_every < 0:
            raise ConfigError("save_every", f"must be >= 0, got {self.save_every}")
        if self.lr <= 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        if self.max_length < 2:
            raise ConfigError("max_length", f"must be >= 2, got {self.max_length}")
        self.adamw  # validates the optimizer settings

    @property
    def adamw(self) -> AdamWConfig:
        return AdamWConfig(lr=self.lr, betas=self.adam_betas, weight_decay=self.weight_decay,
                           max_grad_norm=self.max_grad_norm, schedule=self.lr_scheduler, warmup_steps=self.warmup_steps)


@dataclass(kw_only=True)
class RewardModelConfig:
    model: RMModelConfig = field(default_factory=RMModelConfig)
    data: list[DataConfig] = field(default_factory=lambda: [DataConfig(path="runs/tiny/data/preferences_train.jsonl")])
    test: DataConfig | None = field(
        default_factory=lambda: DataConfig(path="runs/tiny/data/preferences_test.jsonl", split="test"))
    train: RMTrainConfig = field(default_factory=RMTrainConfig)
    output_dir: str = "runs/tiny/reward_model"
    run_name: str = "reward_model"
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"

    def __post_init__(self):
        if not self.data:
            raise ConfigError("data", "needs at least one dataset of preference pairs (prompt, chosen, rejected)")
        if not Path(self.model.init).exists() and "/" not in self.model.init:
            raise ConfigError("model.init", f"{self.model.init!r} is not a checkpoint directory or hub id; the reward "
                              "model starts from a trained policy, e.g. model.init=runs/tiny/sft_rs/final")


def pass_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of the n pairs in pass `epoch`: a permutation seeded by (seed, epoch)."""
    return random.Random(f"{seed}:{epoch}").sample(range(n), n)


def batch_stream(n: int, batch_size: int, seed: int, epoch: int, index: int) -> Iterator[tuple[int, int, list[int]]]:
    """From data position (epoch, index): (epoch, index after this batch, the batch's pair indices)."""
    order = pass_order(n, seed, epoch)
    while True:
        batch: list[int] = []
        while len(batch) < batch_size:
            if index == n:
                epoch, index = epoch + 1, 0
                order = pass_order(n, seed, epoch)
            taken = order[index:index + batch_size - len(batch)]
            batch += taken
            index += len(taken)
        yield epoch, index, batch


def pair_batch(tokenizer, pairs: list[dict], max_length: int) -> dict[str, torch.Tensor]:
    """Chosen then rejected renderings of the pairs, padded: input_ids / attention_mask [2B, T]."""
    prompts = [p["prompt"] for p in pairs] * 2
    responses = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    ids = encode(tokenizer, prompts, responses, max_length)
    return tokenizer.pad({"input_ids": ids}, return_tensors="pt")


def scores(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen [B], r_rejected [B]) for a batch from ``pair_batch``."""
    device = next(model.parameters()).device
    logits = model(**{k: v.to(device) for k, v in batch.items()}).logits[:, 0].float()
    return logits.chunk(2)


@torch.no_grad()
def pairwise_accuracy(model, tokenizer, pairs: list[dict], max_length: int, batch_size: int) -> float:
    """Share of pairs scored r(chosen) > r(rejected)."""
    was_training = model.training
    model.eval()
    wins = 0
    for start in range(0, len(pairs), batch_size):
        chosen, rejected = scores(model, pair_batch(tokenizer, pairs[start:start + batch_size], max_length))
        wins += int((chosen > rejected).sum())
    model.train(was_training)
    return wins / max(len(pairs), 1)


def main(argv: list[str] | None = None) -> dict:
    cfg = cli(RewardModelConfig, description="Stage 4a: Bradley-Terry reward model on preference pairs.", argv=argv)
    datasets.disable_progress_bars()
    tc, out = cfg.train, Path(cfg.output_dir)
    ckpt_root = out / "checkpoints"

    # ---- setup (a failing setup leaves an earlier run's results and DONE as they were)
    set_seed(tc.seed)
    fields = ["prompt", "chosen", "rejected"]
    pairs = load_mixed(cfg.data, fields, tc.seed)
    test = list(load_rows(cfg.test, fields)) if cfg.test is not None else []
    tokenizer = load_tokenizer(cfg.model.init, "model.init")
    tokenizer.truncation_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    check_model_dir(cfg.model.init, "model.init")

    resume = resume_point(out, tc.resume_from, cfg)  # a bad checkpoint or refused change: before the model loads
    model = AutoModelForSequenceClassification.from_pretrained(cfg.model.init, num_labels=1,
                                                               dtype=getattr(torch, cfg.model.dtype))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    optim = build_step(model, tc.adamw, total_steps=tc.max_steps)  # fp32 masters when model.dtype is bfloat16
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    before = pairwise_accuracy(model, tokenizer, test, tc.max_length, tc.batch_size) if test else None
    step, epoch, index = 0, 0, 0
    if resume:
        state = load_checkpoint(resume, model=model, optimizer=optim.optimizer, scheduler=optim.scheduler)
        step, epoch, index = state.step, state.data_state["epoch"], state.data_state["index"]
    else:
        start_fresh(out, tc.resume_from)
    (out / "DONE").unlink(missing_ok=True)  # inputs loaded, about to train: the output is no longer complete
    stream = batch_stream(len(pairs), tc.batch_size, tc.seed, epoch, index)

    # ---- loop
    logger = MetricsLogger(out, project="r1-grpo", run_name=cfg.run_name, config=cfg, wandb_mode=cfg.wandb_mode,
                           total_steps=tc.max_steps, initial_step=step)
    logger.write(f"reward model: {len(pairs)} pairs, {n_params / 1e6:.2f}M parameters, "
                 f"{type(model).__name__} from {cfg.model.init}; held-out pairwise accuracy before: {before}"
                 + (f"; resumed at step {step} from {resume}" if resume else ""))
    model.train()
    sums, window = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0}, 0  # window: steps since the last metrics row
    with StopOnSignal() as stop:  # SIGINT/SIGTERM: finish this step, checkpoint, exit 130/143
        while step < tc.max_steps:
            epoch, index, idx = next(stream)
            with optim.micro_batch(last=True):
                chosen, rejected = scores(model, pair_batch(tokenizer, [pairs[i] for i in idx], tc.max_length))
                loss = bradley_terry_loss(chosen, rejected)
                optim.backward(loss)
            grad_norm = optim.step().grad_norm
            step, window = step + 1, window + 1
            chosen, rejected = chosen.detach(), rejected.detach()
            sums["loss"] += float(loss.detach())
            sums["accuracy"] += float((chosen > rejected).float().mean())
            sums["margin"] += float((chosen - rejected).mean())
            if step % tc.log_every == 0 or step == tc.max_steps:
                logger.log({**{k: v / window for k, v in sums.items()}, "lr": optim.scheduler.get_last_lr()[0],
                            "grad_norm": float(grad_norm)}, step=step)
                sums, window = dict.fromkeys(sums, 0.0), 0
            stopping = stop.requested()
            if (tc.save_every and step % tc.save_every == 0) or step == tc.max_steps or stopping:
                path = save_checkpoint(ckpt_root, model=model, tokenizer=tokenizer, step=step,
                                       optimizer=optim.optimizer, scheduler=optim.scheduler,
                                       data_state={"epoch": epoch, "index": index}, config=cfg, keep_last=tc.keep_last)
            if stopping:
                logger.close()
                stop.exit(step, path)
    logger.close()

    # ---- save, evaluate
    final = export_model(out / "final", model, tokenizer, cfg)
    after = pairwise_accuracy(model, tokenizer, test, tc.max_length, tc.batch_size) if test else None
    summary = {"steps": step, "final": str(final), "pairs": len(pairs), "test_pairs": len(test),
               "heldout_pairwise_accuracy_before": before, "heldout_pairwise_accuracy": after}
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    if test:
        print(f"held-out pairwise accuracy: {100 * before:.1f}% -> {100 * after:.1f}% ({len(test)} pairs)", flush=True)
    mark_done(out, summary)
    return summary


if __name__ == "__main__":
    run(main)
