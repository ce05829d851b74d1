"""Token sampling for the rollout engine: temperature, top-k, top-p, min-p, and the logprob the trainer needs.

For logits z of one position and temperature T > 0 the engine reports, for the sampled token y,

    logprob(y) = log softmax(z / T)_y                        (the full, untruncated distribution at T)

and draws y from the truncated, renormalised distribution

    p_T      = softmax(z / T)
    keep     = top-k set of p_T  (k = top_k; all tokens when top_k = 0)
    q        = p_T restricted to keep, renormalised
    keep    &= top-p nucleus of q: the smallest prefix of q sorted descending whose mass reaches top_p
    keep    &= { i : p_T(i) >= min_p * max_j p_T(j) }
    y        ~ p_T restricted to keep, renormalised

The reported logprob is that of the distribution *before* truncation, because that is what the trainer's
teacher-forced forward pass recomputes (log softmax(z / T)); truncation only shapes which tokens are drawn.
The order top-k -> top-p -> min-p is that of transformers' logits processors. T = 0 means greedy (argmax);
its logprob is log softmax(z)_y (temperature 1).

Drawing uses one uniform number per row and the inverse CDF of the kept probabilities (no per-vocabulary
noise: generating V random numbers per row costs more than the model on a CPU), choosing a block of the
vocabulary from block sums and then the token inside it. With top-k no distribution over the vocabulary is
normalised or cut: the k largest logits are found first (softmax is monotonic; only the groups of tokens with
the largest maxima are ranked), and p_T of those k and the logprob need only log softmax(z / T) at them (on
CUDA log sum_v exp(z_v / T) in one pass; on CPU torch's fused log_softmax, faster there). On CUDA it is a fixed sequence of tensor ops without host synchronisation (it runs inside the decode
step's CUDA graph).
"""
from __future__ import annotations

import torch

from grpo import kernels


def sample(
    logits: torch.Tensor,
    uniform: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row. logits [B, V] (any float dtype), uniform [B] in [0, 1).

    Returns tokens [B] int64 and logprobs [B] fp32 = log softmax(logits / temperature) at the tokens
    (temperature 1 when greedy), i.e. the untruncated distribution at the sampling temperature.
    """
    z = logits.float()
    if temperature not in (0.0, 1.0):
        z = z / temperature
    if temperature == 0:
        tokens = z.argmax(dim=-1)
        return tokens, _log_softmax_at(z, tokens[:, None])[:, 0]
    if 0 < top_k < z.shape[-1]:  # softmax is monotonic: the top-k of z is that of p_T
        _, idx = _topk(z, top_k, ordered=top_p < 1.0)  # only top-p needs them sorted
        logp = _log_softmax_at(z, idx)
        chosen = inverse_cdf(_cut(logp.exp(), top_p=top_p, min_p=min_p), uniform)[:, None]
        return idx.gather(1, chosen).squeeze(1), logp.gather(1, chosen).squeeze(1)
    probs = torch.softmax(z, dim=-1)  # the distribution over the whole vocabulary is needed
    if top_p < 1.0:
        cand, idx = truncate(probs, top_p=top_p, min_p=min_p)
        tokens = idx.gather(1, inverse_cdf(cand, uniform)[:, None]).squeeze(1)
    else:
        tokens = inverse_cdf(_cut(probs, min_p=min_p), uniform)
    # a drawn token has probability >= ~1e-38, so the fp32 log is accurate to ~1e-7
    return tokens, probs.gather(1, tokens[:, None]).squeeze(1).log()


def distribution(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 min_p: float = 0.0) -> torch.Tensor:
    """The distribution ``sample`` draws from, as probabilities [B, V] (fp32): softmax(logits / T) truncated
    by top-k -> top-p -> min-p and renormalised (module docstring); one-hot at the argmax when greedy."""
    z = logits.float()
    if temperature == 0:
        return torch.zeros_like(z).scatter_(1, z.argmax(dim=-1, keepdim=True), 1.0)
    probs = torch.softmax(z / temperature, dim=-1)
    if 0 < top_k < z.shape[-1] or top_p < 1.0:
        weights, idx = truncate(probs, top_k=top_k, top_p=top_p, min_p=min_p)
        probs = torch.zeros_like(probs).scatter_(1, idx, weights)
    else:
        probs = _cut(probs, min_p=min_p)
    return probs / probs.sum(dim=-1, keepdim=True)


def truncate(
    probs: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates of the truncated distribution. probs [B, V] = softmax(logits / T).

    Returns (weights [B, C], indices [B, C]) sorted by descending probability: the probabilities of the
    kept tokens and 0 for the dropped ones (C = top_k; without top-k up to V). The most likely token is
    always kept. Without top-k, top-p sorts the whole vocabulary, except on CPU where it first tries the 1024
    most likely tokens (exact when they hold at least top_p of the mass in every row; one host sync).
    """
    vocab = probs.shape[-1]
    if 0 < top_k < vocab:
        vals, idx = _topk(probs, top_k)
    elif probs.device.type == "cpu" and vocab > 1024:  # a CPU sort of the vocabulary costs more than the model
        vals, idx = _topk(probs, 1024)
        if bool((vals.sum(dim=-1) < top_p).any()):
            vals, idx = probs.sort(dim=-1, descending=True)
    else:  # no host sync (CUDA graphs)
        vals, idx = probs.sort(dim=-1, descending=True)
    return _cut(vals, top_p=top_p, min_p=min_p, total=None if 0 < top_k < vocab else 1.0), idx


def _cut(vals: torch.Tensor, *, top_p: float = 1.0, min_p: float = 0.0, total: float | None = None) -> torch.Tensor:
    """Zero the probabilities ``vals`` [B, C] outside the top-p nucleus and below min_p * max. With top-p,
    vals are sorted descending and ``total`` is the mass they are renormalised by (None: their own sum,
    i.e. the top-k renormalised distribution); without top-p any order works."""
    if top_p < 1.0:
        mass_before = (vals.cumsum(dim=-1) - vals) / (vals.sum(dim=-1, keepdim=True) if total is None else total)
        vals = vals.masked_fill(mass_before >= top_p, 0.0)
    if min_p > 0:
        vals = vals.masked_fill(vals < min_p * vals.amax(dim=-1, keepdim=True), 0.0)
    return vals


def _log_softmax_at(z: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """log softmax(z) [B, V] at the positions ``at`` [B, C], which hold each row's maximum. On CPU torch's fused
    log_softmax, then the gather (1.8 vs 3.2 ms for a blocked exp-sum at [128, 32,000] on a 2-core EPYC); on
    CUDA log sum_v exp(z_v - m) + m from that maximum m, one pass that the compiled sampler fuses (no [B, V]
    output)."""
    if z.device.type == "cpu":
        return torch.log_softmax(z, dim=-1).gather(1, at)
    vals = z.gather(1, at)
    top = vals.amax(dim=-1, keepdim=True)
    return vals - ((z - top).exp().sum(dim=-1, keepdim=True).log() + top)


def _block(vocab: int, sizes: tuple[int, ...]) -> int:
    """The first of ``sizes`` that divides the vocabulary size (0: none)."""
    return next((b for b in sizes if vocab % b == 0), 0)


def _topk(scores: torch.Tensor, k: int, ordered: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk, exact, through groups: with the vocabulary split into G groups of g tokens
    (on CPU group j = tokens j, j + G, j + 2G, ...: a strided view, so the group maxima are one vectorised
    pass; on CUDA g adjacent tokens),
    the k largest entries lie in the k groups with the largest maxima; only those k * g entries are ranked,
    and only the k winners are sorted (descending; in no particular order when not ``ordered``). On CUDA g is
    the smallest of 16..128 that leaves at most ``kernels.TOPK_MAX_COLUMNS`` groups (a 163,840-token vocabulary:
    64), so the group ranking (and the candidates' while k g <= that too) runs in the bisection kernel rather
    than torch.topk: a v3-16b decode step at batch 128 13.56 vs 14.11 ms with the unrolled pair sum of
    ``grpo.engine.experts.moe_kernels`` (H100, bf16, 2026-12-08)."""
    batch, vocab = scores.shape
    sizes = (16, 8, 32)
    if scores.device.type == "cuda":
        sizes = tuple(b for b in (16, 32, 64, 128) if vocab // b <= kernels.TOPK_MAX_COLUMNS) + sizes
    size = _block(vocab, sizes)
    if not size or 4 * k * size > vocab:
        return scores.topk(k, dim=-1, sorted=ordered)
    groups = vocab // size
    if scores.device.type == "cpu":
        best = _largest(scores.view(batch, size, groups).amax(dim=1), k)  # [B, k] groups
        idx = (best[:, None, :] + torch.arange(size)[:, None] * groups).view(batch, size * k)
    else:  # groups of adjacent tokens: coalesced reads
        best = _largest(scores.view(batch, groups, size).amax(dim=2), k)
        idx = (best[:, :, None] * size + torch.arange(size, device=scores.device)).view(batch, k * size)
    cand = scores.gather(1, idx)
    pos = _largest(cand, k)
    if not ordered:
        return cand.gather(1, pos), idx.gather(1, pos)
    vals, order = cand.gather(1, pos).sort(dim=-1, descending=True)
    return vals, idx.gather(1, pos.gather(1, order))


def _largest(x: torch.Tensor, k: int) -> torch.Tensor:
    """Positions [B, k] of the k largest entries of each row of x [B, n], in no particular order: on CUDA
    Triton's row top-k by bisection (``grpo.kernels.topk_indices``) where it applies, else torch.topk (on a
    2-core EPYC with torch's two threads 1.9x faster than numpy's single-threaded argpartition at [128, 2,000],
    even with one thread)."""
    cuda = x.device.type == "cuda"
    if cuda and kernels.AVAILABLE and x.dtype == torch.float32 and x.shape[-1] <= kernels.TOPK_MAX_COLUMNS:
        return kernels.topk_indices(x, k)
    return x.topk(k, dim=-1, sorted=False).indices


def inverse_cdf(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Index drawn per row with probability proportional to ``weights`` [B, C] (>= 0; zeros never drawn)
    using the uniforms [B]: the first index whose cumulative weight exceeds uniform * total. With a block
    size dividing C, the block is chosen first from the block sums, then the index within it."""
    batch, size = weights.shape
    block = _block(size, (256, 128, 64, 32))
    if not block or size <= 4 * block:
        cdf = weights.cumsum(dim=-1)
        return torch.searchsorted(cdf, _target(uniform, cdf[:, -1:]), right=True).squeeze(1).clamp_(max=size - 1)
    blocks = weights.view(batch, size // block, block)
    block_cdf = blocks.sum(dim=-1).cumsum_(dim=-1)  # [B, nb]
    target = _target(uniform, block_cdf[:, -1:])
    chosen = torch.searchsorted(block_cdf, target, right=True).clamp_(max=block_cdf.shape[-1] - 1)  # [B, 1]
    before = torch.where(chosen > 0, block_cdf.gather(1, (chosen - 1).clamp(min=0)), 0.0)
    inner = blocks.gather(1, chosen[:, :, None].expand(-1, -1, block)).squeeze(1).cumsum(dim=-1)  # [B, block]
    rest = torch.minimum(target - before, inner[:, -1:] * (1 - 1e-6)).clamp_(min=0)  # rounding stays inside
    within = torch.searchsorted(inner, rest, right=True).clamp_(max=block - 1)
    return (chosen * block + within).squeeze(1)


def _target(uniform: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """uniform * total, kept below total so that fp32 rounding never lands past the last nonzero weight."""
    return torch.minimum(uniform.to(total.dtype)[:, None] * total, total * (1 - 1e-6))


class StopStrings:
    """Detects stop strings in the tail of a completion by decoding only its last few tokens.

    A token sequence stops when the decoded text of its last ``window`` tokens contains a stop string;
    ``window`` = longest stop string in characters + 2 tokens, enough as long as tokens decode to at least
    one character. The completion keeps the token that completed the stop string.
    """

    def __init__(self, tokenizer, stop_strings: list[str]):
        if stop_strings and tokenizer is None:
            raise ValueError("stop_strings need a tokenizer to decode completions; pass one to RolloutEngine")
        if any(not s for s in stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {stop_strings!r}")
        self.tokenizer, self.stop_strings = tokenizer, list(stop_strings)
        self.window = max((len(s) for s in stop_strings), default=0) + 2

    def __bool__(self) -> bool:
        return bool(self.stop_strings)

    def hit(self, tokens: list[int]) -> bool:
        text = self.tokenizer.decode(tokens[-self.window:], skip_special_tokens=False)
        return any(s in text for s in self.stop_strings)
