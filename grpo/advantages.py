"""Group-relative advantages (GRPO outcome supervision) and their variants.

Objective. A batch holds N = B*G completions: prompt b owns rows b*G .. b*G+G-1 (its group). F reward
functions score every completion: R[i, f], or None ("does not apply", e.g. the code reward on a math
prompt). Weights w[f]. Let V[i, f] = (R[i, f] is not None).

    combine = "sum_then_normalize" (TRL's default, R1):
        r_i   = sum_{f: V[i,f]} w_f R[i,f]                      (a None contributes 0)
        A_i   = normalize(r)_i                                   over the valid rows of each group
    combine = "normalize_then_sum" (GDPO-style, per-objective baselines):
        A_i   = sum_{f: V[i,f]} w_f normalize(R[:, f])_i         each function's group stats use only
                                                                 the rows where it applies
    normalize(r)_i = (r_i - b_i) / (sigma + eps)   (scale = "group" | "batch")
                   = (r_i - b_i)                   (scale = "none", Dr. GRPO)
    baseline = "mean":          b_i = mean_{j in g(i), valid} r_j                       (GRPO, DeepSeekMath eq. 3)
    baseline = "leave_one_out": b_i = mean_{j in g(i), valid, j != i} r_j               (RLOO)
    scale = "group":  sigma = std_{j in g(i), valid} r_j     (unbiased, as TRL's torch.std)
    scale = "batch":  sigma = std_{all valid j} r_j           (group mean, batch std; TRL scale_rewards="batch")

A row with no valid reward (or, for a single function, a None) gets A_i = 0 and stays out of every
mean and std. A group whose valid rewards are all equal (or that has fewer than two valid rows)
carries no signal: its advantages are exactly 0 (per function under normalise-then-sum). Groups whose
combined rewards are all equal are reported in ``zero_std`` (DAPO's dynamic sampling drops them).

Departures from the papers: DeepSeekMath normalises with the group's std without stating the
estimator; we use the unbiased one with eps = 1e-4 added to sigma (as TRL). RLOO is usually unscaled;
here it composes with any ``scale``. GDPO renormalises the summed advantages over the batch; here
normalise-then-sum returns the weighted sum as is (weights keep their meaning).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from grpo.config import ConfigError


@dataclass(kw_only=True)
class AdvantageConfig:
    """How rewards become advantages (see the module docstring for the exact formulas)."""

    baseline: Literal["mean", "leave_one_out"] = "mean"
    scale: Literal["group", "batch", "none"] = "group"
    combine: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize"
    eps: float = 1e-4  # added to sigma before dividing

    def __post_init__(self):
        if self.eps < 0:
            raise ConfigError("eps", f"must be >= 0, got {self.eps}")


@dataclass
class Advantages:
    """Advantages of one rollout batch, N = B*G rows, B groups."""

    advantages: Tensor  # [N] float32
    rewards: Tensor  # [N] combined reward sum_f w_f R[i,f]; NaN where no function applies
    group_std: Tensor  # [B] std of the combined rewards over each group's valid rows (0 when < 2 valid)
    zero_std: Tensor  # [B] bool: the group's valid combined rewards are all equal (no learning signal)


def rewards_tensor(per_reward: dict[str, list[float | None]], names: list[str]) -> Tensor:
    """[N, F] float32 from per-function reward lists, None -> NaN (columns in the order of ``names``)."""
    cols = [[float("nan") if v is None else float(v) for v in per_reward[name]] for name in names]
    return torch.tensor(cols, dtype=torch.float32).T.reshape(-1, len(names))


def combine_rewards(rewards: Tensor, weights: Tensor) -> Tensor:
    """r_i = sum_{f valid} w_f R[i,f]. rewards [N, F] (NaN = None), weights [F] -> [N], NaN where no f is valid."""
    valid = ~rewards.isnan()
    total = (torch.where(valid, rewards, 0.0) * weights).sum(-1)
    return torch.where(valid.any(-1), total, float("nan"))


def group_stats(rewards: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Masked per-group statistics of rewards [N] (NaN = excluded).

    Returns count n_g [B], mean [B], unbiased std [B] (0 when n_g < 2) and zero_std [B]
    (max - min over the valid rows <= 1e-6 * max(1, |max|), or n_g < 2)."""
    r = rewards.view(-1, group_size)
    valid = ~r.isnan()
    n = valid.sum(-1)
    rz = torch.where(valid, r, 0.0)
    mean = rz.sum(-1) / n.clamp(min=1)
    var = torch.where(valid, r - mean[:, None], 0.0).pow(2).sum(-1) / (n - 1).clamp(min=1)
    std = torch.where(n > 1, var.sqrt(), 0.0)
    hi = torch.where(valid, r, -torch.inf).amax(-1)
    lo = torch.where(valid, r, torch.inf).amin(-1)
    spread_zero = (hi - lo) <= 1e-6 * hi.abs().clamp(min=1.0)
    return n, mean, std, (n < 2) | spread_zero


def normalize(rewards: Tensor, group_size: int, cfg: AdvantageConfig) -> Tensor:
    """A_i = (r_i - b_i) / (sigma + eps) for one reward vector [N] (NaN = not applicable -> A_i = 0)."""
    r = rewards.view(-1, group_size)
    valid = ~r.isnan()
    n, mean, std, zero = group_stats(rewards, group_size)
    if cfg.baseline == "mean":
        baseline = mean[:, None]
    else:  # leave one out: (sum of the others) / (n - 1)
        total = torch.where(valid, r, 0.0).sum(-1, keepdim=True)
        baseline = (total - r) / (n[:, None] - 1).clamp(min=1)
    adv = r - baseline
    if cfg.scale == "group":
        adv = adv / (std[:, None] + cfg.eps)
    elif cfg.scale == "batch":
        flat = rewards[~rewards.isnan()]
        sigma = flat.std() if flat.numel() > 1 else rewards.new_zeros(())
        adv = adv / (sigma + cfg.eps)
    adv = torch.where(valid & ~zero[:, None], adv, 0.0)
    return adv.reshape(-1)


def compute_advantages(rewards: Tensor, weights: Tensor, group_size: int, cfg: AdvantageConfig) -> Advantages:
    """Advantages of a batch. rewards [N, F] (NaN = None), weights [F]; N must be a multiple of group_size."""
    if rewards.dim() != 2 or rewards.shape[1] != weights.shape[0]:
        raise ValueError(f"rewards must be [N, F] with F = len(weights) = {weights.shape[0]}, got {tuple(rewards.shape)}")
    if rewards.shape[0] % group_size:
        raise ValueError(f"{rewards.shape[0]} rows are not a whole number of groups of {group_size}")
    rewards, weights = rewards.float(), weights.float().to(rewards.device)
    total = combine_rewards(rewards, weights)
    _, _, std, zero = group_stats(total, group_size)
    if cfg.combine == "sum_then_normalize":
        adv = normalize(total, group_size, cfg)
    else:
        adv = sum(w * normalize(rewards[:, f], group_size, cfg) for f, w in enumerate(weights))
    return Advantages(advantages=adv, rewards=total, group_std=std, zero_std=zero)
