"""The GRPO training loop: rollout -> rewards -> advantages -> mu x minibatch updates -> router bias -> log.

One step (what ``max_steps`` counts) on each process:

  1. take B = ``prompts_per_step`` prompts from the shuffled data stream; the engine samples G completions
     each and returns log pi_old under its sampling distribution (logits / T).
     DAPO dynamic sampling: groups whose combined rewards are all equal are dropped and B more prompts are
     drawn, for at most ``max_sampling_rounds`` rounds (all processes run the same number of rounds); a
     batch still short is filled with dropped groups (zero advantage; logged as ``sampling/shortfall``).
  2. rewards (the ``rewards`` callable, ``grpo.reward_types``) -> advantages (``grpo.advantages``) over the
     batch of every process.
  3. once per batch: reference log-probs (beta > 0); with ``routing_replay``, the experts pi_old
     picks under teacher forcing (replayed in every update forward, GSPO's Routing Replay); with
     ``loss.old_logprobs: recompute``, log pi_old by the trainer's forward and the TIS/MIS correction.
  4. mu passes over the B*G rows, each shuffled and split into ``minibatches`` optimizer steps accumulated
     over micro-batches (each forward on its rows' own columns, a plain output layer at their completion tokens
     only): loss = grpo_loss (grpo.loss) + the policy's MoE aux_loss; then one ``grpo.optim`` step (clip, AdamW
     on fp32 masters, LR schedule); ``update_router_bias``. A non-finite loss or gradient norm skips the optimizer step;
     ``max_bad_steps`` in a row stop the run. On CPU the updates (like the engine's decoding) run on fewer
     intra-op threads while other processes keep cores busy (``grpo.engine.threads``), unless ``cpu_threads``
     fixes the count.
  5. reference reset every ``ref_reset_every`` steps; metrics; checkpoint every ``save_every`` steps.

Mismatch metrics (``mismatch/*``, grpo.loss.Mismatch): the gap between the engine's log-probs and the trainer's
for the same tokens, from a forward the step runs anyway: the recompute pass (all rows), else the forwards of
the step's first optimizer step (all rows when ``minibatches`` = 1), before any update changes the policy.

The policy log-probs are recomputed with the rollout temperature (logits / T) so that the ratio compares
the same distributions. Resuming (``resume_from``, by default the latest checkpoint under output_dir, see
``grpo.checkpoint.resume_point``) restores policy, optimizer, scheduler, reference, RNG states (the engine's
sampler generator included), data position and counters: a resumed run continues exactly as the uninterrupted
one; ``resume_from: none`` starts over and removes the old checkpoints. SIGINT/SIGTERM: the current step
finishes, a checkpoint is saved and ``train`` raises SystemExit(128 + signal) (``grpo.checkpoint.StopOnSignal``).
Devices and processes come from accelerate; ``grpo.optim.build_step`` is the one place that wraps model and optimizer (DDP, or with ``parallel.ep_size > 1`` / ``parallel.zero_stage`` a DeepSpeed
engine from ``grpo.parallel.parallelize``, routed experts sharded over ep_size ranks); under EP the ranks decode
rollouts in lockstep (``RolloutEngine(ep_group=...)``). The engine decodes with the policy's own parameters: in
bf16 they are the bf16 copy of the fp32 masters, refreshed in place by every optimizer step.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import Tensor

from grpo import checkpoint
from grpo.advantages import AdvantageConfig, combine_rewards, compute_advantages, group_stats, rewards_tensor
from grpo.config import ConfigError
from grpo.engine.v3 import is_v3
from grpo.logger import MetricsLogger
from grpo.loss import (LossConfig, LossNorm, Mismatch, grpo_loss, head_logprobs_and_entropy, logprobs_and_entropy,
                       loss_mask, rollout_correction)
from grpo.model import force_routing, last_routing, moe_metrics, update_router_bias
from grpo.optim import AdamWConfig, build_step, uses_deepspeed
from grpo.parallel import ParallelConfig, expert_parallel_group
from grpo.reward_types import RewardScores, RewardTags
from grpo.rollout import RolloutEngine, SamplingConfig, cpu_threads


@dataclass(kw_only=True)
class TrainerConfig:
    """The RL loop. Counts are per process: a step samples prompts_per_step * group_size completions."""

    max_steps: int = 100  # rollout batches
    prompts_per_step: int = 8  # B
    group_size: int = 8  # G (TRL num_generations)
    mu: int = 1  # passes over each rollout batch (TRL num_iterations)
    minibatches: int = 1  # optimizer steps per pass
    micro_batch_size: int = 8  # completions per forward/backward
    lr: float = 1e-6
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0  # optimizer steps
    weight_decay: float = 0.0  # on matrices only (not norms, biases)
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    max_grad_norm: float = 1.0  # 0 = no clipping (the norm is still logged)
    bf16: bool = False  # bf16 autocast for the forward passes
    seed: int = 0  # data order and minibatch shuffling
    loss: LossConfig = field(default_factory=LossConfig)
    advantages: AdvantageConfig = field(default_factory=AdvantageConfig)
    ref_reset_every: int = 0  # steps; 0 = never (R1: 400)
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, sample more
    max_sampling_rounds: int = 4  # bound on rollout rounds per step with dynamic_sampling
    # V3 policies: replay expert choices in the trainer's forwards. old: pi_old's under teacher forcing (GSPO's
    # Routing Replay); rollout: the engine's own (R3; the rollout engine then records them on its module path)
    routing_replay: Literal["off", "old", "rollout"] = "off"
    save_every: int = 50  # steps; 0 = only at the end
    keep_last: int = 3
    # "latest": output_dir/checkpoints' newest (a fresh start if none); "none": start over, removing them; or a dir
    resume_from: str | None = "latest"
    sample_every: int = 10  # steps between logged completion samples; 0 = never
    samples_logged: int = 4
    max_bad_steps: int = 3  # consecutive skipped (non-finite) optimizer steps before stopping
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # ep_size > 1 or zero_stage: DeepSpeed
    cpu_threads: int = 0  # CPU only: intra-op threads for the updates; 0 = auto (grpo.rollout.cpu_threads)
    # the output layer and log-probs computed together in blocks of positions (grpo.loss.head_logprobs_and_entropy)
    # when a micro-batch's fp32 logits [tokens, V] (its completions' tokens, padding excluded) would exceed this many
    # MiB (0: always): the update then never holds them. Same values and gradients as the plain head, which is as
    # fast or faster below the bound (three GEMMs, no recompute: bench/grpo_step.py's CPU update on a 2-core EPYC,
    # 1.68 vs 1.87 s at 64 tokens, 6.94 vs 6.88 s at 256, 1,000 MiB of logits, where the tiles hold 1.5x less
    # memory); float("inf"): never
    chunked_head_mb: float = 1024.0

    def __post_init__(self):
        positive = ("max_steps", "prompts_per_step", "group_size", "mu", "minibatches", "micro_batch_size",
                    "max_sampling_rounds", "keep_last", "max_bad_steps")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("warmup_steps", "ref_reset_every", "save_every", "sample_every", "samples_logged", "cpu_threads",
                    "chunked_head_mb"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"must be >= 0, got {getattr(self, key)}")
        if self.lr <= 0 or self.max_grad_norm < 0 or self.weight_decay < 0:
            raise ConfigError("lr", f"lr must be > 0, max_grad_norm and weight_decay >= 0 (got {self.lr}, "
                              f"{self.max_grad_norm}, {self.weight_decay})")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError("adam_betas", f"must be two numbers in [0, 1), got {self.adam_betas}")
        if self.group_size < 2:
            raise ConfigError("group_size", f"GRPO needs >= 2 completions per prompt for a baseline, got {self.group_size}")
        n = self.prompts_per_step * self.group_size
        if n % self.minibatches:
            raise ConfigError("minibatches", f"the batch of prompts_per_step * group_size = {n} completions must "
                              f"split into {self.minibatches} equal minibatches")
        if (n // self.minibatches) % self.micro_batch_size:
            raise ConfigError("micro_batch_size", f"a minibatch of {n // self.minibatches} completions must split "
                              f"into micro-batches of {self.micro_batch_size}")

    @property
    def deepspeed(self) -> bool:
        """Model and optimizer are a DeepSpeed engine (grpo.parallel: experts sharded over ep_size ranks, ZeRO)."""
        return uses_deepspeed(self.parallel)

    @property
    def adamw(self) -> AdamWConfig:
        return AdamWConfig(lr=self.lr, betas=self.adam_betas, weight_decay=self.weight_decay,
                           max_grad_norm=self.max_grad_norm, schedule=self.lr_scheduler, warmup_steps=self.warmup_steps)

    @property
    def completions_per_step(self) -> int:
        return self.prompts_per_step * self.group_size


@dataclass
class Samples:
    """Scored rollouts of whole groups on this process; N = groups * G rows, F reward functions."""

    rows: list[dict]  # [N/G] the data row of each group
    prompts: list[str]  # [N] prompt text given to the rewards
    prompt_ids: list[list[int]]  # [N]
    completion_ids: list[Tensor]  # [N] each [len_i] int64
    logprobs: list[Tensor]  # [N] each [len_i] fp32, log pi_old
    truncated: list[bool]  # [N] stopped by max_new_tokens
    completions: list[str]  # [N] decoded
    rewards: Tensor  # [N, F] fp32, NaN = the function does not apply
    routing: list[Tensor]  # [N] the engine's experts (Rollout.routing) when it records them, else empty

    def groups(self, idx: list[int], G: int) -> "Samples":
        rows = [r for g in idx for r in range(g * G, g * G + G)]
        pick = lambda xs: [xs[r] for r in rows] if xs else []  # noqa: E731
        return Samples(rows=[self.rows[g] for g in idx], prompts=pick(self.prompts), prompt_ids=pick(self.prompt_ids),
                       completion_ids=pick(self.completion_ids), logprobs=pick(self.logprobs),
                       truncated=pick(self.truncated), completions=pick(self.completions),
                       rewards=self.rewards[rows] if rows else self.rewards[:0], routing=pick(self.routing))

    @staticmethod
    def cat(parts: list["Samples"]) -> "Samples":
        return Samples(**{f.name: (torch.cat([getattr(p, f.name) for p in parts]) if f.name == "rewards"
                                   else [x for p in parts for x in getattr(p, f.name)])
                          for f in dataclasses.fields(Samples)})


@dataclass
class RolloutBatch:
    """What the updates of one step consume: N rows, P = longest prompt (left-padded), L = longest completion."""

    prompt_ids: Tensor  # [N, P] int64, left-padded
    prompt_mask: Tensor  # [N, P] bool
    completion_ids: Tensor  # [N, L] int64, right-padded
    completion_mask: Tensor  # [N, L] bool
    old_logprobs: Tensor  # [N, L] fp32 log pi_old (rollout)
    loss_mask: Tensor  # [N, L] fp32: tokens in the loss
    advantages: Tensor  # [N] fp32
    ref_logprobs: Tensor | None = None  # [N, L] fp32
    train_old_logprobs: Tensor | None = None  # [N, L] fp32 log pi_old by the trainer's forward (old_logprobs: recompute)
    is_weights: Tensor | None = None  # [N, L] fp32 TIS weights (loss.rollout_is)
    routing: dict[int, Tensor] | None = None  # MoE layer -> [N, P+L, K] experts replayed in the trainer's forwards
    rollout_routing: dict[int, Tensor] | None = None  # MoE layer -> [N, P+L, K] the engine's (-1: not recorded)

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]


def pad_rows(rows: list[list[int]] | list[Tensor], value: float, *, left: bool = False, dtype=torch.long) -> tuple[Tensor, Tensor]:
    """Stack variable-length rows into [N, max_len] (+ bool mask), padding on the right (or left)."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=dtype)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        n = len(r)
        cols = slice(width - n, width) if left else slice(0, n)
        out[i, cols] = torch.as_tensor(r, dtype=dtype)
        mask[i, cols] = True
    return out, mask


class PromptStream:
    """Data rows in a fresh seeded permutation each epoch; (epoch, index) is the resumable position."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError("the prompt dataset is empty")
        self.n, self.seed, self.epoch, self.index = n, seed, 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.index == self.n:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation()
            take = min(k - len(out), self.n - self.index)
            out += self._order[self.index:self.index + take]
            self.index += take
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation()


RewardFn = Callable[..., RewardScores]  # (prompts, completions, **columns) -> RewardScores (e.g. a RewardSet)


class GRPOTrainer:
    """``GRPOTrainer(cfg, model=..., tokenizer=..., sampling=..., rewards=..., rows=..., encode=...,
    output_dir=...).train()``.

    output_dir receives ``checkpoints/``, ``metrics.jsonl``, ``tables/completions.jsonl`` and ``wandb/``.
    rows: data rows, each with a ``prompt`` string (given to the rewards) and any reward columns (answer,
    tests, source, ...); encode(row) -> prompt token ids (chat template applied). rewards: any callable returning
    ``grpo.reward_types.RewardScores`` (e.g. a ``rewards.registry.RewardSet``); it also receives the column
    ``completion_lengths``. The metrics read a reward's meaning from its tags only: ``accuracy`` is, over the rows
    where a ``verifiable`` reward applies, the mean of the largest verifiable score. run_config: the stage config
    saved with every checkpoint. accelerator: a configured ``accelerate.Accelerator`` (default: one from the launch
    environment).
    """

    def __init__(self, cfg: TrainerConfig, *, model, tokenizer, sampling: SamplingConfig, rewards: RewardFn,
                 rows: list[dict], encode: Callable[[dict], list[int]], output_dir: str, run_name: str = "grpo",
                 wandb_mode: str = "offline", run_config: Any = None, accelerator: Accelerator | None = None):
        if sampling.temperature <= 0:
            raise ConfigError("sampling.temperature", "GRPO samples its groups: temperature must be > 0")
        if cfg.group_size > sampling.max_batch:
            raise ConfigError("sampling.max_batch", f"must be >= group_size = {cfg.group_size} (a group decodes together)")
        bad = [i for i, r in enumerate(rows) if not isinstance(r.get("prompt"), str)]
        if bad:
            raise ValueError(f"data row {bad[0]} has no string 'prompt' (keys: {sorted(rows[bad[0]])})")
        self.cfg, self.sampling, self.tokenizer, self.rewards = cfg, sampling, tokenizer, rewards
        self.rows, self.encode, self.run_config = rows, encode, run_config
        self.output_dir, self.run_name, self.wandb_mode = Path(output_dir), run_name, wandb_mode
        self.accelerator = accelerator or Accelerator()
        acc = self.accelerator
        self.updates_per_step = cfg.mu * cfg.minibatches
        self.reference = None
        if cfg.loss.beta > 0:  # frozen copy; not built at all when beta = 0
            self.reference = copy.deepcopy(model).to(acc.device).eval().requires_grad_(False)
        self.optim = build_step(model, cfg.adamw, total_steps=cfg.max_steps * self.updates_per_step,
                                parallel=cfg.parallel, accelerator=acc)
        self.model, self.policy = self.optim.model, self.optim.module
        self._mismatch = Mismatch(0.0, 0.0, 0.0, 0.0, 0.0)
        self._flips: dict[int, list[int]] = {}  # MoE layer -> [tokens whose experts differ from the engine's, tokens]
        # the engine records its expert choices for rollout routing replay, and on the CPU (where its module path
        # runs anyway) for the mismatch metrics
        record = is_v3(self.policy) and (cfg.routing_replay == "rollout" or acc.device.type == "cpu")
        if cfg.routing_replay != "off" and not is_v3(self.policy):
            raise ConfigError("routing_replay", "needs a DeepSeek-V3 policy (grpo.model); this model has no MoE routers")
        engine_cfg = dataclasses.replace(sampling, seed=sampling.seed + acc.process_index,
                                         record_routing=sampling.record_routing or record)
        ep_group = expert_parallel_group(self.model) if cfg.deepspeed else None  # EP ranks decode in lockstep
        self.engine = RolloutEngine(self.policy, tokenizer, engine_cfg, ep_group=ep_group)
        self.stream = PromptStream(len(rows), cfg.seed)
        self.step = 0
        self.bad_in_a_row = 0
        self.skipped_total = 0
        self.ref_step = 0  # the reference equals the policy after this step (0 = the initial policy)
        self.reward_names: list[str] = []  # filled from the first RewardScores
        self.reward_weights: dict[str, float] = {}
        self.reward_tags: list[RewardTags] = []  # in the order of reward_names
        self._failures: dict[str, int] = {}  # reward name -> samples scored 0 after raising, this step
        self.ckpt_root = self.output_dir / "checkpoints"
        self.resumed_from = checkpoint.resume_point(self.output_dir, cfg.resume_from, run_config)
        if self.resumed_from is not None:
            self._resume(self.resumed_from)
            if acc.is_main_process:
                print(f"{run_name}: resumed from {self.resumed_from} at step {self.step} (of {cfg.max_steps})", flush=True)
        else:
            checkpoint.start_fresh(self.output_dir, cfg.resume_from)

    # ---- checkpointing ---------------------------------------------------------------------------------
    def save(self) -> Path:
        path = checkpoint.save_checkpoint(
            self.ckpt_root, model=self.model, tokenizer=self.tokenizer, step=self.step, optimizer=self.optim.optimizer,
            scheduler=self.optim.scheduler, data_state=self.stream.state(), generators={"rollout": self.engine.generator},
            extra={"bad_in_a_row": self.bad_in_a_row, "skipped_total": self.skipped_total, "ref_step": self.ref_step},
            config=self.run_config, keep_last=self.cfg.keep_last, accelerator=self.accelerator)
        if self.reference is not None and self.ref_step > 0:
            checkpoint.export_model(path / "reference", self.reference, None, accelerator=self.accelerator)
        return path

    def _resume(self, where) -> None:
        state = checkpoint.load_checkpoint(where, model=self.model, optimizer=self.optim.optimizer, scheduler=self.optim.scheduler,
                                           generators={"rollout": self.engine.generator}, accelerator=self.accelerator)
        self.step = state.step
        self.stream.load_state(state.data_state)
        self.bad_in_a_row = state.extra["bad_in_a_row"]
        self.skipped_total = state.extra["skipped_total"]
        self.ref_step = state.extra["ref_step"]
        if self.reference is not None and self.ref_step > 0:
            saved = state.path / "reference"
            if not (saved / "config.json").is_file():
                raise FileNotFoundError(f"{state.path} was saved after a reference reset but has no {saved}")
            loaded = type(self.reference).from_pretrained(saved, dtype=next(self.reference.parameters()).dtype)
            self.reference.load_state_dict(loaded.state_dict())

    # ---- rollout ----------------------------------------------------------------------------------------
    def _rollout(self, row_idx: list[int]) -> Samples:
        G, rows = self.cfg.group_size, [self.rows[i] for i in row_idx]
        ro = self.engine.generate([self.encode(r) for r in rows], G)
        n = len(ro.finish_reason)
        lengths = ro.lengths.tolist()
        completion_ids = [ro.completion_ids[i, :lengths[i]] for i in range(n)]
        completions = self.tokenizer.batch_decode([c.tolist() for c in completion_ids], skip_special_tokens=True)
        prompts = [r["prompt"] for r in rows for _ in range(G)]
        keys = sorted({k for r in rows for k in r} - {"prompt"})
        columns = {k: [r.get(k) for r in rows for _ in range(G)] for k in keys}
        scores = self.rewards(prompts, completions, completion_lengths=lengths, **columns)
        self.reward_names, self.reward_weights = list(scores.per_reward), scores.weights
        self.reward_tags = [scores.tags_of(n) for n in self.reward_names]
        self._failures = {k: self._failures.get(k, 0) + v for k, v in scores.failures.items()}
        return Samples(rows=rows, prompts=prompts, prompt_ids=ro.prompt_ids, completion_ids=completion_ids,
                       logprobs=[ro.logprobs[i, :lengths[i]] for i in range(n)],
                       truncated=[f == "length" for f in ro.finish_reason], completions=completions,
                       rewards=rewards_tensor(scores.per_reward, self.reward_names), routing=ro.routing or [])

    def _weights(self) -> Tensor:
        return torch.tensor([self.reward_weights[k] for k in self.reward_names])

    def _zero_std(self, s: Samples) -> Tensor:
        return group_stats(combine_rewards(s.rewards, self._weights()), self.cfg.group_size)[3]

    def _sample(self) -> tuple[Samples, Samples, dict[str, float]]:
        """(the batch of B groups, everything generated this step, sampling stats)."""
        cfg, acc = self.cfg, self.accelerator
        B, W, rank = cfg.prompts_per_step, acc.num_processes, acc.process_index
        kept, dropped, generated = [], [], []
        rounds = 0
        for rounds in range(1, (cfg.max_sampling_rounds if cfg.dynamic_sampling else 1) + 1):
            s = self._rollout(self.stream.take(B * W)[rank * B:(rank + 1) * B])
            generated.append(s)
            if not cfg.dynamic_sampling:
                kept.append(s)
                break
            zero = self._zero_std(s).tolist()
            kept.append(s.groups([g for g, z in enumerate(zero) if not z], cfg.group_size))
            dropped.append(s.groups([g for g, z in enumerate(zero) if z], cfg.group_size))
            have = torch.tensor([sum(len(k.rows) for k in kept)], device=acc.device)
            if int((acc.gather(have) if W > 1 else have).min()) >= B:  # every process has its B groups
                break
        pool = Samples.cat(kept + dropped)  # kept groups first, then dropped ones to fill a shortfall
        batch = pool.groups(list(range(B)), cfg.group_size)
        n_kept = sum(len(k.rows) for k in kept)
        stats = {"sampling/rounds": rounds, "sampling/shortfall": max(0, B - n_kept)} if cfg.dynamic_sampling else {}
        return batch, Samples.cat(generated), stats

    # ---- batch preparation ------------------------------------------------------------------------------
    def _advantages(self, batch: Samples):
        """Advantages over the batch of every process (groups never straddle processes); this process's rows."""
        acc = self.accelerator
        rewards = batch.rewards.to(acc.device)
        everything = acc.gather(rewards) if acc.num_processes > 1 else rewards
        adv = compute_advantages(everything, self._weights(), self.cfg.group_size, self.cfg.advantages)
        n = rewards.shape[0]
        return adv.advantages[acc.process_index * n:(acc.process_index + 1) * n].cpu()

    def _to_batch(self, s: Samples, advantages: Tensor) -> RolloutBatch:
        pad = self.engine.pad_id
        prompt_ids, prompt_mask = pad_rows(s.prompt_ids, pad, left=True)
        completion_ids, completion_mask = pad_rows(s.completion_ids, pad)
        old, _ = pad_rows(s.logprobs, 0.0, dtype=torch.float32)
        truncated = torch.tensor(s.truncated)
        batch = RolloutBatch(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                             completion_mask=completion_mask, old_logprobs=old, advantages=advantages,
                             loss_mask=loss_mask(completion_mask.float(), truncated, self.cfg.loss))
        if s.routing:
            batch.rollout_routing = self._rollout_routing(s, prompt_ids.shape[1], completion_ids.shape[1])
            if self.cfg.routing_replay == "rollout":  # positions the engine never saw get K valid dummy experts
                batch.routing = {k: torch.where(v < 0, torch.arange(v.shape[-1]), v) for k, v in batch.rollout_routing.items()}
        return batch

    def _rollout_routing(self, s: Samples, P: int, L: int) -> dict[int, Tensor]:
        """The engine's experts in the batch layout (left-padded prompts, then completions): layer -> [N, P+L, K]
        int64, -1 where the engine routed nothing (padding, the last completion token)."""
        layers = [i for i, _ in self.policy.routers() if i < self.policy.config.num_hidden_layers]  # not MTP
        K = s.routing[0].shape[-1]
        out = torch.full((len(s.routing), P + L, len(layers), K), -1, dtype=torch.long)
        for r, (routes, prompt) in enumerate(zip(s.routing, s.prompt_ids)):
            start = P - len(prompt)
            out[r, start:start + len(routes)] = routes.long()
        return {layer: out[:, :, j] for j, layer in enumerate(layers)}

    def _forward(self, model, batch: RolloutBatch, idx: Tensor, *, grad: bool, entropy: bool = True):
        """log pi(o_t) [n, L] and entropy [n, L] (or None) of rows ``idx`` at the rollout temperature; the MoE
        aux loss; with ``routing`` set, experts are forced to pi_old's choices."""
        dev, L = self.accelerator.device, batch.completion_ids.shape[1]
        cols = self._columns(batch, idx)
        ids = torch.cat([batch.prompt_ids[idx], batch.completion_ids[idx]], dim=1)[:, cols].to(dev)
        mask = torch.cat([batch.prompt_mask[idx], batch.completion_mask[idx]], dim=1)[:, cols].to(dev)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        replay = {i: r[idx][:, cols].to(dev) for i, r in batch.routing.items()} if batch.routing else {}
        p, n = batch.prompt_ids.shape[1] - cols.start, len(idx)  # this micro-batch's prompt width, rows
        completion, w = ids[:, p:], ids.shape[1] - p  # w: its completion width (<= L)
        keep = torch.arange(p - 1, p + w - 1, device=dev)  # positions whose logits predict the completion
        head, T = self._plain_head(), self.sampling.temperature
        entropy_grad = grad and self.cfg.loss.entropy_coef > 0
        with torch.set_grad_enabled(grad), self._autocast(), force_routing(model, replay) if replay else contextlib.nullcontext():
            if head is None:  # the model's own output layer, at every completion position
                out = model(input_ids=ids, attention_mask=mask.long(), position_ids=positions, use_cache=False,
                            logits_to_keep=keep)
                logp, ent = logprobs_and_entropy(out.logits, completion, T, entropy=entropy, entropy_grad=entropy_grad,
                                                 overwrite_logits=True)
            else:  # the output layer at the completions' tokens only: the padding after each one's end is skipped
                out = model(input_ids=ids, attention_mask=mask.long(), position_ids=positions, use_cache=False,
                            logits_to_keep=keep[:0], output_hidden_states=True)
                where = batch.completion_mask[idx, :w].flatten().nonzero().squeeze(1).to(dev)
                h = out.hidden_states[-1][:, keep].flatten(0, 1).index_select(0, where)[None]  # [1, tokens, d]
                y = completion.flatten().index_select(0, where)[None]
                if 4 * len(where) * head.shape[0] > self.cfg.chunked_head_mb * 2**20 and not entropy_grad:
                    logp, ent = head_logprobs_and_entropy(h, head, y, T, entropy=entropy)  # no [tokens, V] logits
                else:
                    logp, ent = logprobs_and_entropy(F.linear(h, head), y, T, entropy=entropy,
                                                     entropy_grad=entropy_grad, overwrite_logits=True)
                logp, ent = (None if t is None else t.new_zeros(n * w).index_copy(0, where, t[0]).view(n, w)
                             for t in (logp, ent))
        aux = getattr(out, "aux_loss", None)
        logp, ent = (None if t is None else F.pad(t, (0, L - w)) for t in (logp, ent))  # 0 past this micro-batch
        return logp, ent, (aux if aux is not None and grad else None)

    @staticmethod
    def _columns(batch: RolloutBatch, idx: Tensor) -> slice:
        """The columns of the batch's [left-padded prompts | right-padded completions] layout that rows ``idx``
        use: from their longest prompt's first token to their longest completion's last. A micro-batch's forward
        runs on these only, so the padding that only other rows need costs nothing (same values: padding is
        masked out of the attention, the routing loads and the balance loss)."""
        P = batch.prompt_ids.shape[1]
        return slice(P - int(batch.prompt_mask[idx].sum(1).max()), P + int(batch.completion_mask[idx].sum(1).max()))

    def _count_expert_flips(self, batch: RolloutBatch, idx: Tensor) -> None:
        """After a forward over rows ``idx`` that chose its own experts: per MoE layer, the tokens whose expert set
        differs from the rollout engine's (where the engine recorded them) -> ``self._flips``."""
        if batch.rollout_routing is None or self.cfg.routing_replay == "rollout":
            return
        for layer, chosen in last_routing(self.policy).items():
            if layer not in batch.rollout_routing:
                continue
            engine = batch.rollout_routing[layer][idx][:, self._columns(batch, idx)]  # [n, columns, K]
            seen = engine[..., 0] >= 0
            differ = chosen.view(engine.shape).cpu().sort(-1).values != engine.sort(-1).values
            counts = self._flips.setdefault(layer, [0, 0])
            counts[0] += int((differ.any(-1) & seen).sum())
            counts[1] += int(seen.sum())

    def _flip_metrics(self) -> dict[str, float]:
        if not self._flips:
            return {}
        m = {f"mismatch/expert_flips/layer_{layer}": f / max(n, 1) for layer, (f, n) in sorted(self._flips.items())}
        m["mismatch/expert_flips"] = sum(f for f, _ in self._flips.values()) / max(sum(n for _, n in self._flips.values()), 1)
        return m

    def _plain_head(self) -> Tensor | None:
        """The output layer's weight when it is a plain bias-free linear map of the final hidden states (no logit
        soft-capping): ``_forward`` then applies it itself, at the completions' tokens only (in blocks, without
        fp32 logits, above ``chunked_head_mb``); else None (the model's own head at every completion position)."""
        head = self.policy.get_output_embeddings()
        plain = (type(head) is torch.nn.Linear and head.bias is None
                 and getattr(self.policy.config, "final_logit_softcapping", None) is None)
        return head.weight if plain else None

    def _autocast(self):
        return torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16)

    @torch.no_grad()
    def _precompute(self, batch: RolloutBatch) -> dict[str, float]:
        """Once per batch, in micro-batches: reference log-probs, the experts pi_old routes to, and with
        ``old_logprobs: recompute`` log pi_old from the trainer's own forward, its gap to the rollout's (the
        mismatch metrics) and the TIS weights / MIS mask (grpo.loss). Returns the correction's metrics."""
        cfg = self.cfg
        recompute = cfg.loss.old_logprobs == "recompute"
        old_routes = cfg.routing_replay == "old"
        if self.reference is None and not old_routes and not recompute:
            return {}
        n_main = getattr(self.policy.config, "num_hidden_layers", 0)
        refs, routes, olds = [], {}, []
        for idx in torch.arange(len(batch)).split(cfg.micro_batch_size):
            if self.reference is not None:
                refs.append(self._forward(self.reference, batch, idx, grad=False, entropy=False)[0].float().cpu())
            if old_routes or recompute:
                olds.append(self._forward(self.model, batch, idx, grad=False, entropy=False)[0].float().cpu())
                self._count_expert_flips(batch, idx)
            if old_routes:  # in the batch's layout; columns outside this micro-batch's: any valid experts
                cols, width = self._columns(batch, idx), batch.prompt_ids.shape[1] + batch.completion_ids.shape[1]
                for layer, chosen in last_routing(self.policy).items():
                    if layer < n_main:
                        full = torch.arange(chosen.shape[-1]).repeat(len(idx), width, 1)
                        full[:, cols] = chosen.view(len(idx), -1, chosen.shape[-1]).cpu()
                        routes.setdefault(layer, []).append(full)
        if refs:
            batch.ref_logprobs = torch.cat(refs)
        if old_routes:
            batch.routing = {layer: torch.cat(parts) for layer, parts in routes.items()}
        if not recompute:
            return {}
        batch.train_old_logprobs = torch.cat(olds) * batch.completion_mask
        self._mismatch = Mismatch.of(batch.train_old_logprobs, batch.old_logprobs, batch.completion_mask, cfg.loss)
        fix = rollout_correction(batch.train_old_logprobs, batch.old_logprobs, batch.completion_mask, cfg.loss)
        batch.is_weights = fix.weights
        batch.loss_mask = batch.loss_mask * fix.keep
        return fix.metrics

    # ---- updates ----------------------------------------------------------------------------------------
    def _optimizer_step(self, batch: RolloutBatch, idx: Tensor, sums: dict[str, float], first: bool) -> None:
        """One optimizer step over rows ``idx``. ``first``: no update yet this step, so the forward is pi_old as
        the trainer computes it: with ``old_logprobs: rollout`` its gap to the rollout's log-probs is logged."""
        cfg, acc, dev, opt = self.cfg, self.accelerator, self.accelerator.device, self.optim
        micro = idx.split(cfg.micro_batch_size)
        tokens = batch.loss_mask[idx].sum().to(dev)
        if acc.num_processes > 1:
            tokens = acc.reduce(tokens, reduction="sum") / acc.num_processes
        norm = LossNorm(sequences=len(idx), tokens=float(tokens), micro_batches=len(micro),
                        max_completion_length=self.sampling.max_new_tokens)
        step_loss = torch.zeros((), device=dev)
        for k, m in enumerate(micro):
            with opt.micro_batch(last=k == len(micro) - 1):
                logp, ent, aux = self._forward(self.model, batch, m, grad=True)
                old = batch.old_logprobs[m].to(dev)
                if first and batch.train_old_logprobs is None:
                    self._mismatch += Mismatch.of(logp, old, batch.completion_mask[m].to(dev), cfg.loss)
                    self._count_expert_flips(batch, m)
                if batch.train_old_logprobs is not None:
                    old = batch.train_old_logprobs[m].to(dev)
                out = grpo_loss(logp=logp, old_logp=old, advantages=batch.advantages[m].to(dev),
                                mask=batch.loss_mask[m].to(dev), cfg=cfg.loss, norm=norm, entropy=ent,
                                ref_logp=None if batch.ref_logprobs is None else batch.ref_logprobs[m].to(dev),
                                is_weights=None if batch.is_weights is None else batch.is_weights[m].to(dev))
                loss = out.loss + (aux.float() / len(micro) if aux is not None else 0.0)
                opt.backward(loss)
            step_loss += loss.detach()
            for key, v in out.metrics.items():
                sums[key] = sums.get(key, 0.0) + float(v) * out.tokens
            sums["tokens"] = sums.get("tokens", 0.0) + out.tokens
            if aux is not None:
                sums["aux_loss"] = sums.get("aux_loss", 0.0) + float(aux.detach())
        result = opt.step()
        if result.stepped and math.isfinite(float(step_loss)):
            self.bad_in_a_row = 0
            sums["loss"] = sums.get("loss", 0.0) + float(step_loss)
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + result.grad_norm
            sums["optimizer_steps"] = sums.get("optimizer_steps", 0.0) + 1
        else:
            self.bad_in_a_row += 1
            self.skipped_total += 1
        update_router_bias(self.model)  # also after a skipped step: it consumes (and resets) that step's loads
        if self.bad_in_a_row >= cfg.max_bad_steps:
            raise RuntimeError(f"{self.bad_in_a_row} optimizer steps in a row had a non-finite loss or gradient "
                               f"(last loss {float(step_loss)}, grad norm {result.grad_norm}) at step {self.step + 1}; "
                               f"stopping (max_bad_steps={cfg.max_bad_steps}). Lower the lr or check the rewards.")

    def _update(self, batch: RolloutBatch) -> dict[str, float]:
        cfg = self.cfg
        n, sums = len(batch), {}
        per_minibatch = n // cfg.minibatches
        self.model.train()
        for epoch in range(cfg.mu):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(
                (cfg.seed * 1_000_003 + self.step) * 1_009 + epoch)) if self.updates_per_step > 1 else torch.arange(n)
            for k, idx in enumerate(order.split(per_minibatch)):
                self._optimizer_step(batch, idx, sums, first=epoch == 0 and k == 0)
        tokens, steps = max(sums.pop("tokens", 0.0), 1.0), max(sums.pop("optimizer_steps", 0.0), 1.0)
        metrics = {k: sums.pop(k) / tokens for k in ("kl", "entropy", "clip_low", "clip_high", "clip", "ratio") if k in sums}
        metrics.update({k: v / steps for k, v in sums.items()})
        metrics["train_tokens"] = float(batch.completion_mask.sum()) * cfg.mu
        return metrics

    # ---- one step and the loop --------------------------------------------------------------------------
    def train_step(self) -> tuple[dict[str, float], Samples, Tensor]:
        """One RL step; returns (metrics, the batch's samples, their advantages)."""
        cfg = self.cfg
        start = time.perf_counter()
        self._failures = {}
        self.policy.eval()
        batch_samples, generated, metrics = self._sample()
        rollout_s = time.perf_counter() - start
        advantages = self._advantages(batch_samples)
        batch = self._to_batch(batch_samples, advantages)
        train_start = time.perf_counter()
        self._mismatch, self._flips = Mismatch(0.0, 0.0, 0.0, 0.0, 0.0), {}
        with cpu_threads(self.accelerator.device, self.cfg.cpu_threads):
            metrics.update(self._precompute(batch))
            metrics.update(self._update(batch))
            metrics.update(self._mismatch.metrics())
            metrics.update(self._flip_metrics())
            metrics = self._reduce(metrics)
        self.step += 1
        if self.reference is not None and cfg.ref_reset_every and self.step % cfg.ref_reset_every == 0:
            self.reference.load_state_dict(self.policy.state_dict())
            self.ref_step = self.step
        train_s = time.perf_counter() - train_start
        generated_tokens = sum(len(c) for c in generated.completion_ids)
        metrics.update(self._sample_metrics(generated))
        metrics.update(moe_metrics(self.policy))
        metrics.update({
            "lr": self.optim.scheduler.get_last_lr()[0], "skipped_steps": self.skipped_total,
            "tokens_per_s/rollout": generated_tokens / max(rollout_s, 1e-9),
            "tokens_per_s/train": metrics.pop("train_tokens") / max(train_s, 1e-9),
            "time/rollout_s": rollout_s, "time/train_s": train_s, "time/step_s": time.perf_counter() - start,
        })
        return metrics, batch_samples, advantages

    def _reduce(self, metrics: dict[str, float]) -> dict[str, float]:
        """Mean of each metric over the processes (the same keys everywhere)."""
        if self.accelerator.num_processes == 1:
            return metrics
        keys = sorted(metrics)
        values = torch.tensor([metrics[k] for k in keys], device=self.accelerator.device)
        return dict(zip(keys, self.accelerator.reduce(values, reduction="mean").tolist()))

    def _sample_metrics(self, s: Samples) -> dict[str, float]:
        """Reward, accuracy, length and zero-std statistics over everything generated this step, all processes."""
        acc = self.accelerator
        rewards = s.rewards
        lengths = torch.tensor([len(c) for c in s.completion_ids], dtype=torch.float32)
        truncated = torch.tensor(s.truncated, dtype=torch.float32)
        sources = [row.get("source") for row in s.rows for _ in range(self.cfg.group_size)]
        failures = torch.tensor([float(self._failures.get(n, 0)) for n in self.reward_names])
        if acc.num_processes > 1:  # whole groups per process: gathering keeps them intact
            rewards, lengths, truncated = (acc.gather(t.to(acc.device)).cpu() for t in (rewards, lengths, truncated))
            failures = acc.reduce(failures.to(acc.device), reduction="sum").cpu()
            sources = gather_object(sources)
        m: dict[str, float] = {}
        for f, name in enumerate(self.reward_names):
            col = rewards[:, f]
            col = col[~col.isnan()]
            if col.numel():
                m[f"rewards/{name}/mean"] = float(col.mean())
                m[f"rewards/{name}/std"] = float(col.std()) if col.numel() > 1 else 0.0
            m[f"rewards/{name}/failures"] = float(failures[f])
        total = combine_rewards(rewards, self._weights())
        m["reward"] = float(total.nanmean())
        for src in sorted({x for x in sources if isinstance(x, str)}):  # by_source/<source>/{reward,<reward name>}
            mine = torch.tensor([x == src for x in sources])
            m[f"by_source/{src}/reward"] = float(total[mine].nanmean())
            for f, name in enumerate(self.reward_names):
                col = rewards[mine, f]
                if (~col.isnan()).any():
                    m[f"by_source/{src}/{name}"] = float(col.nanmean())
        correct = [rewards[:, f] for f, tags in enumerate(self.reward_tags) if tags.verifiable]
        if correct:  # accuracy: per row where one applies, the best verifiable score (math answer, code pass rate)
            scores = torch.stack(correct, -1)
            known = ~scores.isnan().all(-1)
            if known.any():
                m["accuracy"] = float(scores[known].nan_to_num(0.0).amax(-1).mean())
        m["completions/mean_length"] = float(lengths.mean())
        m["completions/max_length"] = float(lengths.max())
        m["completions/clipped_ratio"] = float(truncated.mean())
        m["frac_reward_zero_std"] = float(group_stats(total, self.cfg.group_size)[3].float().mean())
        return m

    def _log_samples(self, logger: MetricsLogger, s: Samples, advantages: Tensor) -> None:
        G, table = self.cfg.group_size, []
        for r in range(0, len(s.prompts), max(1, len(s.prompts) // max(self.cfg.samples_logged, 1)))[:self.cfg.samples_logged]:
            row = {"prompt": s.prompts[r], "completion": s.completions[r], "advantage": float(advantages[r]),
                   "group": r // G}
            for f, name in enumerate(self.reward_names):
                v = float(s.rewards[r, f])
                row[f"reward/{name}"] = None if math.isnan(v) else v
            table.append(row)
        logger.log_table("completions", table, step=self.step)

    def train(self, evaluate: Callable[[], dict[str, float]] | None = None, every: int = 0) -> dict[str, float]:
        """Run to ``max_steps`` (from the resumed step); checkpoints every ``save_every`` and at the end.
        ``evaluate`` (the stage's, e.g. a held-out curve point; called on every process) is logged at step 0 of
        a fresh run and after every ``every``-th step."""
        cfg = self.cfg
        metrics: dict[str, float] = {}
        with MetricsLogger(self.output_dir, project="r1-grpo", run_name=self.run_name, config=self.run_config,
                           wandb_mode=self.wandb_mode, total_steps=cfg.max_steps, initial_step=self.step,
                           is_main=self.accelerator.is_main_process) as logger, checkpoint.StopOnSignal() as stop:
            if evaluate is not None and every and self.step == 0:
                logger.log(evaluate(), step=0)
            while self.step < cfg.max_steps:
                metrics, samples, advantages = self.train_step()
                if evaluate is not None and every and self.step % every == 0:
                    metrics = {**metrics, **evaluate()}
                logger.log(metrics, step=self.step)
                if cfg.sample_every and self.step % cfg.sample_every == 0:
                    self._log_samples(logger, samples, advantages)
                stopping = stop.requested(self.accelerator)
                if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == cfg.max_steps or stopping:
                    path = self.save()
                if stopping:
                    stop.exit(self.step, path)
        return metrics
