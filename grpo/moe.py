"""DeepSeek-V3 routing and load balancing, as small pure functions (DeepSeek-V3 report, Sec. 2.1.2).

Routing of token t over N_r routed experts split into G groups (``route``):

    s_{i,t}  = sigmoid(u_t . e_i)                                   affinity scores            [N, E]
    c_{i,t}  = s_{i,t} + b_i                                        biased scores (selection only)
    group score of group g = sum of the two largest c_{i,t} in g;   keep the ``topk_group`` best groups
    TopK_t   = the K_r experts with largest c_{i,t} among the kept groups  (no capacity, no token dropping)
    g_{i,t}  = scale * s_{i,t} / sum_{j in TopK_t} s_{j,t}   for i in TopK_t   (b never enters the weights)

Auxiliary-loss-free balancing (``bias_update``), after each optimizer step, from the loads of the whole
global batch (count of tokens routed to each expert):

    b_i <- b_i + gamma * sign(mean_j load_j - load_i)

Sequence-wise balance loss (``balance_loss``), per sequence of T tokens, then averaged over sequences:

    f_i = N_r / (K_r T) * sum_t 1[i in TopK_t]         (a constant: no gradient)
    P_i = 1/T * sum_t s'_{i,t},   s'_{i,t} = s_{i,t} / sum_j s_{j,t}
    L_Bal = sum_i f_i P_i                                (the caller multiplies by alpha)

MaxVio (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing"): max_i load_i / mean_i load_i - 1.

Departures: padding tokens (mask False) are excluded from loads, f and P, and T counts only the real
tokens of each sequence; the report leaves padding unspecified.
"""
from __future__ import annotations

import torch


def route(
    logits: torch.Tensor,
    bias: torch.Tensor,
    *,
    n_group: int,
    topk_group: int,
    top_k: int,
    norm: bool = True,
    scale: float = 1.0,
    forced: torch.Tensor | None = None,
    by_argmax: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-limited sigmoid top-k routing.

    logits [N, E] (fp32 router logits), bias [E] (correction bias, used for selection only).
    ``forced`` [N, K]: expert indices to use instead of selecting (routing replay); weights are still
    computed from these logits. ``by_argmax`` selects through ``top_by_argmax`` instead of torch.topk (the
    same experts, in another order; it fuses under torch.compile). Returns weights [N, K] fp32, indices
    [N, K] int64, scores [N, E] fp32.
    """
    scores = logits.sigmoid()
    if forced is None:
        top = top_by_argmax if by_argmax else lambda x, k: torch.topk(x, k, dim=-1, sorted=False)[1]
        n_tokens, n_experts = scores.shape
        choice = scores + bias
        grouped = choice.view(n_tokens, n_group, n_experts // n_group)
        group_scores = grouped.gather(-1, top(grouped, 2)).sum(dim=-1)
        group_mask = torch.zeros_like(group_scores).scatter_(1, top(group_scores, topk_group), 1)
        expert_mask = group_mask.unsqueeze(-1).expand(-1, n_group, n_experts // n_group).reshape(n_tokens, n_experts)
        choice = choice.masked_fill(~expert_mask.bool(), float("-inf"))
        indices = top(choice, top_k)
    else:
        indices = forced.reshape(scores.shape[0], -1).to(device=scores.device, dtype=torch.long)
    weights = scores.gather(1, indices)
    if norm:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scale, indices, scores


def top_by_argmax(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [..., k] of the k largest values along the last dim, largest first, by k rounds of argmax
    (ties: the lowest index). For small k this compiles into one fused kernel, where torch.topk stays a
    library call of its own."""
    picked = []
    for _ in range(k):
        picked.append(x.argmax(dim=-1, keepdim=True))
        x = x.scatter(-1, picked[-1], float("-inf"))
    return torch.cat(picked, dim=-1)


def expert_load(indices: torch.Tensor, n_experts: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens routed to each expert. indices [..., K]; mask [...] bool (False = padding). Returns [E] fp32.
    A scatter-add of fixed size: no host synchronisation (``bincount`` and boolean indexing need one)."""
    ones = torch.ones(indices.shape, device=indices.device) if mask is None else \
        mask.to(device=indices.device, dtype=torch.float32)[..., None].expand(indices.shape)
    return torch.zeros(n_experts, device=indices.device).scatter_add_(0, indices.reshape(-1), ones.reshape(-1))


def balance_loss(scores: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sequence-wise balance loss L_Bal (without alpha), mean over sequences with at least one token.

    scores [B, T, E] sigmoid affinities; indices [B, T, K] selected experts; mask [B, T] bool.
    """
    batch, seq, n_experts = scores.shape
    top_k = indices.shape[-1]
    m = torch.ones(batch, seq, device=scores.device) if mask is None else mask.to(scores.device, torch.float32)
    tokens = m.sum(dim=1)  # [B]
    hits = torch.zeros(batch, n_experts, device=scores.device)
    hits.scatter_add_(1, indices.reshape(batch, seq * top_k), m.repeat_interleave(top_k, dim=1))
    denom = tokens.clamp(min=1).unsqueeze(1)
    f = hits * n_experts / (top_k * denom)  # [B, E]
    p = ((scores / scores.sum(dim=-1, keepdim=True)) * m.unsqueeze(-1)).sum(dim=1) / denom  # [B, E]
    per_seq = (f * p).sum(dim=-1)
    valid = (tokens > 0).float()
    return (per_seq * valid).sum() / valid.sum().clamp(min=1)


def bias_update(bias: torch.Tensor, load: torch.Tensor, gamma: float) -> torch.Tensor:
    """New correction bias: b + gamma * sign(mean(load) - load). bias, load [E]."""
    return bias + gamma * torch.sign(load.mean() - load).to(bias.dtype)


def max_violation(load: torch.Tensor) -> float:
    """MaxVio = max(load) / mean(load) - 1 (0 = perfectly balanced); 0 when no tokens were routed."""
    mean = load.float().mean()
    return float(load.max() / mean - 1) if mean > 0 else 0.0
