"""The GRPO policy loss and its variants (GRPO, BNPO, Dr. GRPO, DAPO, GSPO), as small pure functions.

Objective (minimised: L = -J). For completions o_1..o_N (G per prompt) of lengths |o_i|, mask m_it,
per-sequence advantages A_i (grpo.advantages), rollout-time log-probs log pi_old, reference log-probs
log pi_ref:

    J = AGG_{i,t} [ min(r_it A_i, clip(r_it, 1 - eps_low, 1 + eps_high) A_i) - beta D_it + alpha H_it ]

    token level (GRPO, DeepSeekMath eq. 3):   r_it = pi(o_it | q, o_i,<t) / pi_old(o_it | q, o_i,<t)
    sequence level (GSPO):                    s_i  = exp( (1/|o_i|) sum_t log r_it )
        used in the per-token stop-gradient form r_it = sg[s_i] * pi(o_it) / sg[pi(o_it)]: its value is
        s_i for every token and its gradient is GSPO's s_i A_i (1/|o_i|) sum_t grad log pi(o_it).
    k3 KL (Schulman's unbiased estimator):    D_it = pi_ref/pi - log(pi_ref/pi) - 1
    entropy bonus:                            H_it = -sum_v pi(v | q, o_i,<t) log pi(v | q, o_i,<t)
    two-sided clip (``delta``, INTELLECT-2): the unclipped term uses min(r_it, delta).

    AGG (``loss_type``, TRL's names):
        grpo:    (1/N) sum_i (1/|o_i|) sum_t           per-sequence token mean, then mean (original GRPO)
        bnpo:    (1/sum_{i,t} m_it) sum_{i,t}           token mean of each micro-batch, averaged over them
        dapo:    (1/T) sum_{i,t}                        token mean over the whole optimizer-step batch, T its tokens
        dr_grpo: (1/(N * L_max)) sum_{i,t}              token sum over a constant length (Dr. GRPO)

For gradient accumulation the normalisers N, T are those of the whole optimizer step (`LossNorm`), so
summing the micro-batch losses gives exactly the loss of the full batch.

Departures from the papers: pi_old is the rollout engine's log-prob under the sampling distribution
(logits / temperature, before top-k/top-p/min-p truncation), not a recomputation, so rollout/training
numerical mismatch enters the ratio (as in TRL with vLLM); the trainer recomputes pi with the same
temperature. GSPO uses the same ``epsilon``/``epsilon_high`` knobs (the GSPO paper clips s_i to about
[1 - 3e-4, 1 + 4e-4]: set them accordingly). The KL term sits inside the
per-token objective (DeepSeekMath), not in the reward (PPO/InstructGPT). Truncated completions
(``mask_truncated_completions``) keep their advantages in the group statistics but get no loss tokens
(DAPO's overlong filtering). log r_it is capped at ``MAX_LOG_RATIO`` = 20 before the exponential (as veRL
does): r = e^20 is far outside any clip range, and without the cap a rollout log-prob more than 88 nats below
the trainer's makes r = inf, which the min() hides in the loss but turns into a NaN gradient (0 * inf).

Rollout correction (the engine and the trainer compute log pi in different arithmetic: in bf16 they differ).
``old_logprobs: rollout`` uses the engine's log-probs as log pi_old (above). ``recompute`` takes log pi_old from
the trainer's own forward over the batch before the first update (one extra no-grad forward per step, as veRL
does), so the first update's ratio is exactly 1 and the clip never acts on numerical noise; the rollout then
enters only through the importance weight w_it = pi_old^train(o_it) / pi_rollout(o_it):

    TIS (``rollout_is``)    token:    per_token <- min(w_it, C) * per_token          (C = ``rollout_is_cap``)
                            sequence: per_token <- min(prod_t w_it, C) * per_token
    MIS (``rollout_mask``)  token:    tokens with w_it outside [low, high] leave the loss mask
                            sequence: sequences whose geometric mean exp(mean_t log w_it) is outside the band
                            leave it (the geometric mean, so the band means the same at every length)

The weights multiply the clipped surrogate only (not the KL or entropy terms) and carry no gradient; MIS changes
the loss mask before the normalisers are taken. Defaults: ``rollout``, no TIS, no MIS. Measured (bench/mismatch.py,
the trainer's ``mismatch/*`` metrics): on the tiny policy after cold-start SFT, bf16 weights on the CPU, the first
RL step's k3 is 2.5e-4 with 0.15% of tokens outside the clip band, where the extra forward of ``recompute`` would
cost about a third of the update's time for little; on random-weight v3-mini in bf16 on a GPU 7-8% of tokens are
outside the band (issue 15's probe), where ``recompute`` + token TIS (C = 2) is the setting to use. No RL run
compared the options' learning curves yet: the defaults are the cheap ones, not a measured optimum.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from grpo.config import ConfigError

MAX_LOG_RATIO = 20.0


@dataclass(kw_only=True)
class LossConfig:
    """The policy loss (formulas in the module docstring)."""

    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "grpo"
    importance_sampling_level: Literal["token", "sequence"] = "token"  # sequence = GSPO
    epsilon: float = 0.2  # eps_low
    epsilon_high: float | None = None  # clip-higher (DAPO uses 0.28); None = epsilon
    delta: float | None = None  # two-sided clipping cap on the unclipped ratio (> 1 + epsilon_high)
    beta: float = 0.0  # k3 KL coefficient; 0 = no reference model is loaded
    entropy_coef: float = 0.0  # alpha, entropy bonus
    mask_truncated_completions: bool = False  # completions cut at max_new_tokens get no loss tokens
    # rollout/trainer mismatch (the "Rollout correction" section of the module docstring)
    old_logprobs: Literal["rollout", "recompute"] = "rollout"  # where log pi_old comes from
    rollout_is: Literal["none", "token", "sequence"] = "none"  # truncated importance sampling (TIS)
    rollout_is_cap: float = 2.0  # C of TIS
    rollout_mask: Literal["none", "token", "sequence"] = "none"  # masked importance sampling (MIS)
    rollout_mask_band: list[float] = field(default_factory=lambda: [0.5, 2.0])  # kept weights: low <= w <= high

    def __post_init__(self):
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        if not 0 <= self.epsilon < 1:
            raise ConfigError("epsilon", f"must be in [0, 1), got {self.epsilon}")
        if self.epsilon_high < 0:
            raise ConfigError("epsilon_high", f"must be >= 0, got {self.epsilon_high}")
        if self.delta is not None and self.delta <= 1 + self.epsilon_high:
            raise ConfigError("delta", f"must be > 1 + epsilon_high = {1 + self.epsilon_high}, got {self.delta}")
        if self.beta < 0:
            raise ConfigError("beta", f"must be >= 0, got {self.beta}")
        if (self.rollout_is != "none" or self.rollout_mask != "none") and self.old_logprobs != "recompute":
            raise ConfigError("old_logprobs", "rollout_is / rollout_mask weight by pi_old(train) / pi_rollout: they "
                              "need old_logprobs: recompute (with 'rollout' the two are the same numbers)")
        if self.rollout_is_cap < 1:
            raise ConfigError("rollout_is_cap", f"must be >= 1, got {self.rollout_is_cap}")
        low, high = (self.rollout_mask_band + [None, None])[:2]
        if len(self.rollout_mask_band) != 2 or not 0 <= low < 1 < high:
            raise ConfigError("rollout_mask_band", f"must be [low, high] with 0 <= low < 1 < high, got "
                              f"{self.rollout_mask_band}")


@dataclass(kw_only=True)
class LossNorm:
    """Normalisers of one optimizer step's batch, over all its micro-batches (on this process)."""

    sequences: float  # N: completions in the optimizer step's batch
    tokens: float  # T: completion tokens (mask sum) in it
    max_completion_length: int  # L_max for dr_grpo
    micro_batches: int = 1  # bnpo: local token means are averaged over this many micro-batches

    @classmethod
    def of(cls, mask: Tensor, max_completion_length: int | None = None) -> "LossNorm":
        """Normalisers when ``mask`` [N, L] is the whole optimizer step's batch."""
        return cls(sequences=mask.shape[0], tokens=float(mask.sum()),
                   max_completion_length=max_completion_length or mask.shape[1])


@dataclass
class LossOutput:
    loss: Tensor  # [] this micro-batch's share of the optimizer step's loss
    metrics: dict[str, Tensor]  # [] detached token means over the micro-batch: kl, entropy, clip_low/high, clip, ratio
    tokens: float  # mask sum of the micro-batch (weight of ``metrics`` when averaging micro-batches)


def _tiled_log_softmax(tile_logits, ids: Tensor, n: int, vocab: int, rows: int, cols: int):
    """(lse, logp, entropy), each [n] fp32, of the logits that ``tile_logits(s, k, c, w)`` gives for rows
    s..s+k-1 and vocabulary entries c..c+w-1 (``_tiles``; fp32, already divided by the temperature, not changed
    here), in any order. Across a row's tiles the statistics combine online: with the running
    maximum m, S = sum_v e^(z_v - m) and Q = sum_v e^(z_v - m) z_v are rescaled by e^(m_old - m_new) when a tile
    raises m; then lse = m + log S, logp = z_y - lse, H = lse - Q / S. Tile temporaries live in buffers made once
    per call (here and in the callers' ``tile_logits``): a fresh large tensor per tile costs a page fault per 4 KB
    on the CPU (glibc hands allocations above its threshold straight to mmap), which took as long as the GEMMs
    (2-core CPU, 2026-12-06)."""
    y, dev = ids.reshape(-1), ids.device
    m = torch.full((n,), -math.inf, device=dev)
    total, zsum, zy = (torch.zeros(n, device=dev) for _ in range(3))
    e_buf = torch.empty(min(rows, n) * min(cols, vocab), device=dev)
    for s, k, c, w in _tiles(n, vocab, rows, cols):
        z = tile_logits(s, k, c, w)
        m_old, m_new = m[s:s + k], torch.maximum(m[s:s + k], z.amax(-1))
        rescale = (m_old - m_new).exp_()
        e = torch.sub(z, m_new[:, None], out=e_buf[:k * w].view(k, w)).exp_()
        total[s:s + k].mul_(rescale).add_(e.sum(-1))
        zsum[s:s + k].mul_(rescale).add_(e.mul_(z).sum(-1))
        m_old.copy_(m_new)
        if w == vocab:  # whole rows (materialised logits: many small row blocks, where each op counts)
            zy[s:s + k] = z.gather(-1, y[s:s + k, None])[:, 0]
        else:
            local, inside = _in_tile(y[s:s + k], c, w)
            zy[s:s + k] = torch.where(inside, z.gather(-1, local[:, None])[:, 0], zy[s:s + k])
    lse = total.log() + m
    return lse, zy - lse, lse - zsum / total


def _tiles(n: int, vocab: int, rows: int, cols: int):
    """(first row, rows, first vocabulary entry, entries) of each tile."""
    for s in range(0, n, rows):
        for c in range(0, vocab, cols):
            yield s, min(rows, n - s), c, min(cols, vocab - c)


def _in_tile(y: Tensor, c: int, w: int) -> tuple[Tensor, Tensor]:
    """Targets y [k] as columns of the tile of vocabulary entries c..c+w-1 (clamped into it) and whether inside."""
    local = y - c
    return local.clamp(0, w - 1), (local >= 0) & (local < w)


class _SelectiveLogSoftmax(torch.autograd.Function):
    """log softmax(z / T)[y] and (without gradient) the entropy of softmax(z / T), in blocks of rows, never
    materialising log_softmax(z) [N, L, V]: each block is read once forward and once backward, and its
    temporaries stay in cache.

    Per row, with m = max_v z_v / T, e_v = exp(z_v / T - m), S = sum_v e_v:
        lse = m + log S,   logp = z_y / T - lse,   H = lse - sum_v e_v z_v / (T S)
    and d logp / dz_v = (1[v = y] - softmax(z / T)_v) / T. With ``overwrite`` (fp32 logits) the gradient is
    written over the logits, block by block, instead of into a second [N, L, V] buffer."""

    @staticmethod
    def forward(ctx, logits: Tensor, ids: Tensor, temperature: float, rows: int, overwrite: bool = False):
        flat = logits.reshape(-1, logits.shape[-1])
        as_is = flat.dtype == torch.float32 and temperature == 1
        buf = None if as_is else torch.empty(min(rows, flat.shape[0]), flat.shape[1], device=flat.device)

        def block(s, k, c, w):  # whole rows; fp32 first, then / T (as .float() / T)
            z = flat[s:s + k]
            return z if as_is else _scaled(buf[:k].copy_(z), temperature)

        lse, logp, ent = _tiled_log_softmax(block, ids, *flat.shape, rows, flat.shape[1])
        ctx.save_for_backward(logits, ids, lse)
        ctx.temperature, ctx.rows, ctx.overwrite = temperature, rows, overwrite
        logp, ent = logp.view(ids.shape), ent.view(ids.shape)
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp: Tensor, _grad_entropy: Tensor):
        logits, ids, lse = ctx.saved_tensors
        T, rows = ctx.temperature, ctx.rows
        flat, y = logits.reshape(-1, logits.shape[-1]), ids.reshape(-1, 1)
        g = grad_logp.reshape(-1, 1).float() / T
        grad = flat if ctx.overwrite and flat.dtype == torch.float32 else torch.empty(flat.shape, device=flat.device)
        for s in range(0, flat.shape[0], rows):
            z = flat[s:s + rows].float()
            p = torch.sub(z if T == 1 else z / T, lse[s:s + rows, None], out=grad[s:s + rows]).exp_()
            p.mul_(-g[s:s + rows]).scatter_add_(-1, y[s:s + rows], g[s:s + rows])
        return grad.to(logits.dtype).view(logits.shape), None, None, None, None


def _scaled(z: Tensor, temperature: float) -> Tensor:
    """z / T in place (z itself at T = 1)."""
    return z if temperature == 1 else z.div_(temperature)


def _head_block(h: Tensor, weight: Tensor, temperature: float, out: Tensor) -> Tensor:
    """z = fp32(h W^T) / T for a block of rows h [k, d], written into out [k, V] fp32: the GEMM as ``lm_head`` then
    ``.float()`` give it (in W's dtype, or autocast's)."""
    if h.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled(h.device.type):
        torch.mm(h, weight.t(), out=out)
    else:
        out.copy_(F.linear(h, weight))
    return _scaled(out, temperature)


class _HeadLogSoftmax(torch.autograd.Function):
    """The output layer fused with ``_SelectiveLogSoftmax``: logits z = h W^T are made tile by tile (``rows`` positions
    x ``cols`` vocabulary entries, in one reused buffer) and dropped, so neither the forward nor the backward holds
    [N, L, V]; only h, W and one fp32 log-sum-exp per row are saved. Forward: ``_tiled_log_softmax``. Backward per
    tile: g_z = (1[v = y] - e^(z_v - lse)) g / T with z recomputed under the forward's
    autocast state (so that they are the forward's logits), d h += g_z W_tile, d W_tile += g_z^T h_rows."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, ids: Tensor, temperature: float, rows: int, cols: int):
        flat = hidden.reshape(-1, hidden.shape[-1])
        n, vocab = flat.shape[0], weight.shape[0]
        z_buf = torch.empty(min(rows, n) * min(cols, vocab), device=weight.device)
        lse, logp, ent = _tiled_log_softmax(
            lambda s, k, c, w: _head_block(flat[s:s + k], weight[c:c + w], temperature, z_buf[:k * w].view(k, w)),
            ids, n, vocab, rows, cols)
        ctx.save_for_backward(hidden, weight, ids, lse)
        ctx.temperature, ctx.rows, ctx.cols = temperature, rows, cols
        dev_type = hidden.device.type
        ctx.autocast = torch.is_autocast_enabled(dev_type), torch.get_autocast_dtype(dev_type)
        logp, ent = logp.view(ids.shape), ent.view(ids.shape)
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp: Tensor, _grad_entropy: Tensor):
        hidden, weight, ids, lse = ctx.saved_tensors
        T = ctx.temperature
        flat, y = hidden.reshape(-1, hidden.shape[-1]), ids.reshape(-1)
        n, vocab, dev = flat.shape[0], weight.shape[0], weight.device
        g = grad_logp.reshape(-1).float() / T
        fp32 = flat.dtype == weight.dtype == torch.float32
        grad_h = torch.zeros(flat.shape, device=dev)  # fp32: accumulated over vocabulary tiles
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=dev)
        z_buf = torch.empty(min(ctx.rows, n) * min(ctx.cols, vocab), device=dev)
        enabled, cast = ctx.autocast
        for s, k, c, w in _tiles(n, vocab, ctx.rows, ctx.cols):
            with torch.autocast(dev.type, dtype=cast, enabled=enabled):
                z = _head_block(flat[s:s + k], weight[c:c + w], T, z_buf[:k * w].view(k, w))
            local, inside = _in_tile(y[s:s + k], c, w)
            gz = z.sub_(lse[s:s + k, None]).exp_().mul_(-g[s:s + k, None])
            gz.scatter_add_(-1, local[:, None], torch.where(inside, g[s:s + k], 0.0)[:, None])
            grad_h[s:s + k] += torch.mm(gz, weight[c:c + w]) if fp32 else (gz.to(weight.dtype) @ weight[c:c + w]).float()
            grad_w[c:c + w].addmm_(gz.t(), flat[s:s + k].float())
        return grad_h.to(flat.dtype).view(hidden.shape), grad_w.to(weight.dtype), None, None, None, None


def head_logprobs_and_entropy(hidden: Tensor, weight: Tensor, ids: Tensor, temperature: float = 1.0,
                              *, entropy: bool = True, rows: int | None = None,
                              cols: int | None = None) -> tuple[Tensor, Tensor | None]:
    """``logprobs_and_entropy(hidden @ weight.T, ids, temperature)`` without materialising the logits: hidden
    [N, L, d] (the final normed hidden states at the positions that predict ``ids`` [N, L]), weight [V, d] (the
    output layer). Tiles of ``rows`` positions x ``cols`` vocabulary entries. Defaults: on CPU up to 2,048 rows and
    ~16 MB of fp32 logits per tile (GEMMs with many rows and columns: a [128, 32,000] block ran the logits GEMM at
    half the speed of a [2,048, 2,048] one on a 2-core EPYC); on GPU ~1 GB of rows x the whole vocabulary. The
    entropy carries no gradient."""
    n, vocab = hidden.shape[0] * hidden.shape[1], weight.shape[0]
    if hidden.device.type == "cpu":
        rows = rows or max(1, min(n, 2048))
        cols = cols or max(1, (1 << 22) // max(1, min(rows, n)))
    else:
        rows = rows or max(1, (1 << 28) // vocab)
        cols = cols or vocab
    logp, ent = _HeadLogSoftmax.apply(hidden, weight, ids, temperature, rows, cols)
    return logp, ent if entropy else None


def logprobs_and_entropy(logits: Tensor, ids: Tensor, temperature: float = 1.0, *, entropy: bool = True,
                         entropy_grad: bool = False, overwrite_logits: bool = False) -> tuple[Tensor, Tensor | None]:
    """log softmax(z / T)[ids] and the entropy of softmax(z / T). logits [N, L, V], ids [N, L] -> ([N, L], [N, L]).

    ``entropy=False`` returns None for it. Without ``entropy_grad`` (the usual case: entropy only logged)
    a blocked kernel is used (blocks of ~1 MB on CPU, ~1 GB on GPU); the entropy then has no gradient, and
    with ``overwrite_logits`` the backward pass writes the logits' gradient over fp32 logits (one [N, L, V]
    buffer less; only for logits that nothing reads after the backward pass)."""
    if not entropy_grad:
        block = (1 << 20) if logits.device.type == "cpu" else (1 << 30)
        rows = max(1, block // (4 * logits.shape[-1]))
        logp, ent = _SelectiveLogSoftmax.apply(logits, ids, temperature, rows, overwrite_logits)
        return logp, ent if entropy else None
    z = logits.float()
    logp_all = F.log_softmax(z if temperature == 1 else z / temperature, dim=-1)
    logp = logp_all.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1) if entropy else None


def log_importance_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor, level: str) -> Tensor:
    """log r_it [N, L]: token level log pi - log pi_old; sequence level (GSPO) sg[log s_i] + log pi - sg[log pi]."""
    log_ratio = logp - old_logp
    if level == "token":
        return log_ratio
    seq = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    return seq.detach() + logp - logp.detach()


def capped_ratio(log_ratio: Tensor) -> Tensor:
    """r = exp(min(log r, MAX_LOG_RATIO)) (module docstring). [N, L] -> [N, L]."""
    return log_ratio.clamp(max=MAX_LOG_RATIO).exp()


def clipped_surrogate(log_ratio: Tensor, advantages: Tensor, cfg: LossConfig) -> Tensor:
    """Per-token -min(r A, clip(r, 1-eps_low, 1+eps_high) A), with r = ``capped_ratio`` and capped at delta when
    set. [N, L], [N] -> [N, L]."""
    ratio = capped_ratio(log_ratio)
    clipped = ratio.clamp(1 - cfg.epsilon, 1 + cfg.epsilon_high)
    if cfg.delta is not None:
        ratio = ratio.clamp(max=cfg.delta)
    adv = advantages[:, None]
    return -torch.min(ratio * adv, clipped * adv)


def k3(d: Tensor) -> Tensor:
    """e^d - 1 - d elementwise, >= 0. As expm1(d) - d: exp(d) - 1 rounds at 1 (an fp32 ulp there is 1.2e-7, far
    above d^2 / 2 for small d) and went slightly negative; expm1 keeps d's precision. The clamp at 0 absorbs the
    last-bit rounding that remains where d^2 / 2 is below half an ulp of d."""
    return (torch.expm1(d) - d).clamp(min=0)


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """D = pi_ref/pi - log(pi_ref/pi) - 1 per token (>= 0, unbiased for KL(pi || pi_ref)). [N, L] -> [N, L]."""
    return k3(ref_logp - logp)


class Mismatch(NamedTuple):
    """Sums over the tokens of a batch of the rollout/trainer log-prob gap d = log pi_train - log pi_rollout
    (``mismatch`` divides by ``tokens``); max_abs is a maximum."""

    tokens: float
    abs_diff: float  # sum |d|
    max_abs: float
    k3: float  # sum of rho - 1 - log rho (``k3(d)``), rho = e^d: the k3 estimate of KL(pi_rollout || pi_train), samples from pi_rollout
    outside: float  # tokens whose rho is outside [1 - eps_low, 1 + eps_high] (the clip would act on noise)

    @staticmethod
    def of(train_logp: Tensor, rollout_logp: Tensor, mask: Tensor, cfg: "LossConfig") -> "Mismatch":
        """[N, L] each (mask 1 = a sampled completion token)."""
        on = mask.bool()
        d = (train_logp.detach().float() - rollout_logp.float())[on]
        rho = capped_ratio(d)
        return Mismatch(tokens=float(on.sum()), abs_diff=float(d.abs().sum()),
                        max_abs=float(d.abs().max()) if d.numel() else 0.0,
                        k3=float(k3(d.clamp(max=MAX_LOG_RATIO)).sum()),
                        outside=float(((rho < 1 - cfg.epsilon) | (rho > 1 + cfg.epsilon_high)).sum()))

    def __add__(self, other: "Mismatch") -> "Mismatch":
        return Mismatch(*(a + b for a, b in zip(self[:2], other[:2])), max(self.max_abs, other.max_abs),
                        *(a + b for a, b in zip(self[3:], other[3:])))

    def metrics(self) -> dict[str, float]:
        n = max(self.tokens, 1.0)
        return {"mismatch/mean_abs": self.abs_diff / n, "mismatch/max_abs": self.max_abs, "mismatch/k3": self.k3 / n,
                "mismatch/outside_clip": self.outside / n}


class Correction(NamedTuple):
    weights: Tensor | None  # [N, L] fp32 truncated IS weights (TIS), None without
    keep: Tensor  # [N, L] fp32 1 = token kept by MIS (all ones without)
    metrics: dict[str, float]


def rollout_correction(train_old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, cfg: "LossConfig") -> Correction:
    """TIS weights and MIS mask from w_it = pi_old^train / pi_rollout (module docstring), [N, L] each."""
    m = mask.float()
    log_w = (train_old_logp.float() - rollout_logp.float()) * m
    n_tok, n_seq = m.sum().clamp(min=1), (m.sum(-1) > 0).sum().clamp(min=1)
    metrics: dict[str, float] = {}
    weights = None
    if cfg.rollout_is != "none":
        log_tis = log_w if cfg.rollout_is == "token" else log_w.sum(-1, keepdim=True).expand_as(log_w)
        raw = capped_ratio(log_tis)
        weights = raw.clamp(max=cfg.rollout_is_cap) * m
        metrics["mismatch/tis_weight"] = float(weights.sum() / n_tok)
        metrics["mismatch/tis_capped"] = float(((raw > cfg.rollout_is_cap) & m.bool()).sum() / n_tok)
    keep = m.new_ones(m.shape)
    if cfg.rollout_mask != "none":
        low, high = cfg.rollout_mask_band
        if cfg.rollout_mask == "token":
            w = capped_ratio(log_w)
        else:  # per-token geometric mean of the sequence: the band means the same at every length
            w = capped_ratio(log_w.sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)).expand_as(log_w)
        keep = ((w >= low) & (w <= high)).float()
        metrics["mismatch/mis_masked"] = float(((1 - keep) * m).sum() / n_tok)
        if cfg.rollout_mask == "sequence":
            metrics["mismatch/mis_masked_sequences"] = float((((1 - keep) * m).sum(-1) > 0).sum() / n_seq)
    return Correction(weights, keep, metrics)


def loss_mask(completion_mask: Tensor, truncated: Tensor, cfg: LossConfig) -> Tensor:
    """Tokens that enter the loss: completion_mask [N, L], minus whole truncated rows (truncated [N] bool) if asked."""
    if not cfg.mask_truncated_completions:
        return completion_mask
    return completion_mask * (~truncated.bool())[:, None].to(completion_mask.dtype)


def aggregate(per_token: Tensor, mask: Tensor, loss_type: str, norm: LossNorm) -> Tensor:
    """Reduce per-token losses [N, L] to this micro-batch's share of the step loss (AGG in the module docstring)."""
    masked = per_token * mask
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / norm.sequences
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1) / norm.micro_batches
    if loss_type == "dapo":
        return masked.sum() / max(norm.tokens, 1.0)
    if loss_type == "dr_grpo":
        return masked.sum() / (norm.sequences * norm.max_completion_length)
    raise ValueError(f"unknown loss_type {loss_type!r}; allowed: grpo, bnpo, dapo, dr_grpo")


def grpo_loss(*, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, cfg: LossConfig, norm: LossNorm,
              ref_logp: Tensor | None = None, entropy: Tensor | None = None,
              is_weights: Tensor | None = None) -> LossOutput:
    """The policy loss of one micro-batch.

    logp [N, L] (with grad), old_logp [N, L] (rollout), advantages [N], mask [N, L] (1 = completion token
    that counts), ref_logp [N, L] (required when beta > 0), entropy [N, L] (required when entropy_coef > 0;
    with grad)."""
    mask = mask.to(logp.dtype)
    log_ratio = log_importance_ratio(logp, old_logp, mask, cfg.importance_sampling_level)
    per_token = clipped_surrogate(log_ratio, advantages, cfg)
    if is_weights is not None:
        per_token = per_token * is_weights
    metrics: dict[str, Tensor] = {}
    if cfg.beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + cfg.beta * kl
        metrics["kl"] = kl
    if cfg.entropy_coef > 0:
        if entropy is None:
            raise ValueError("entropy_coef > 0 needs entropy")
        per_token = per_token - cfg.entropy_coef * entropy
    if entropy is not None:
        metrics["entropy"] = entropy
    ratio = capped_ratio(log_ratio.detach())
    adv = advantages[:, None]
    low = ((ratio < 1 - cfg.epsilon) & (adv < 0)).float()
    high = ((ratio > 1 + cfg.epsilon_high) & (adv > 0)).float()
    metrics.update(clip_low=low, clip_high=high, clip=low + high, ratio=ratio)
    tokens = mask.sum().clamp(min=1)
    return LossOutput(
        loss=aggregate(per_token, mask, cfg.loss_type, norm),
        metrics={k: (v.detach() * mask).sum() / tokens for k, v in metrics.items()},
        tokens=float(mask.sum()),
    )
