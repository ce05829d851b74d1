"""DeepSeekMoE blocks for ``grpo.engine.layer``: routing (``grpo.moe.route``: sigmoid scores, bias for
selection, group-limited top-k) and the routed experts, in the forms a ``LayerOps`` table picks from.

- ``routed_grouped``: token-expert pairs sorted by expert (``sorted_order``, or ``counting_order``: no sort,
  a few fused kernels under torch.compile), two grouped GEMMs (``torch.nn.functional.grouped_mm``, the
  kernel transformers' default "grouped_mm" experts use); no Python loop over experts.
- ``routed_all``: every expert on every token as batched GEMMs (CUDA in fp32/fp16: the grouped kernel is
  bf16-only there and its fallback reads the offsets on the host, which a CUDA graph cannot capture).
- ``moe_kernels``: routing, routed and shared experts through the Triton kernels of ``grpo.kernels``.
- ``moe_stacked``: every routed expert on every token and the shared expert, two GEMMs in all (the CPU's
  decode: ``grpo.engine.ops.stacks_experts``).
- ``Foreign``: an MLP block that is not transformers' layout (e.g. DeepSpeed AutoEP's replacement), called as
  a module so that expert parallelism stays inside it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from grpo import kernels
from grpo.engine.containers import Dims, Moe, Routing
from grpo.engine.layer import LayerOps, dense
from grpo.moe import route


def route_torch(h: torch.Tensor, m: Moe, r: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing of h [T, D]: the router GEMM in fp32 (transformers' arithmetic), ``grpo.moe.route`` by
    argmax rounds. Returns (weights [T, K] fp32, expert indices [T, K])."""
    weights, idx, _ = route(F.linear(h.float(), m.router.float()), m.bias, n_group=r.n_group,
                            topk_group=r.topk_group, top_k=r.top_k, norm=r.norm, scale=r.scale, by_argmax=True)
    return weights, idx


class RecordingRoute:
    """A ``LayerOps.route`` that appends each call's expert choices [T, K] to ``sink`` (routing replay)."""

    def __init__(self, route_fn, sink: list):
        self.route_fn, self.sink = route_fn, sink

    def __call__(self, h: torch.Tensor, m: Moe, r: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        weights, idx = self.route_fn(h, m, r)
        self.sink.append(idx)
        return weights, idx


def moe_torch(h: torch.Tensor, m: Moe, d: Dims, ops: LayerOps, block: int) -> torch.Tensor:
    """Routed (``ops.route``, ``ops.routed``) plus shared experts of h [T, D]."""
    weights, idx = ops.route(h, m, d.routing)
    return ops.routed(h, m, idx, weights, d.act, ops.order) + dense(h, m.shared, d.act)


def moe_stacked(h: torch.Tensor, m: Moe, d: Dims, ops: LayerOps, block: int) -> torch.Tensor:
    """Routed + shared experts of h [T, D] as two GEMMs over ``m.stacked``: the up GEMM gives every routed
    expert's gate and up columns and the shared expert's, each routed expert's act(gate) * up is scaled by
    its routing weight (0 where not chosen: E / K times the routed FLOPs), and the down GEMM sums over all
    experts at once. ``moe_torch``'s values within fp32 rounding (the weight applied before the down
    projection; the sum over experts in the GEMM's order)."""
    weights, idx = ops.route(h, m, d.routing)
    n, (n_experts, inter2, _) = h.shape[0], m.gate_up.shape
    mix = h.new_zeros(n, n_experts).scatter_(1, idx, weights.to(h.dtype))
    up = m.stacked.up(h)
    g, u = up[:, : n_experts * inter2].unflatten(1, (n_experts, 2, inter2 // 2)).unbind(2)  # [T, E, I] each
    shared_g, shared_u = up[:, n_experts * inter2:].chunk(2, dim=-1)
    act = ACT2FN[d.act]
    return m.stacked.down(torch.cat(((act(g) * u * mix[..., None]).flatten(1), act(shared_g) * shared_u), dim=1))


def routed_grouped(h: torch.Tensor, m: Moe, idx: torch.Tensor, weights: torch.Tensor, act: str, order) -> torch.Tensor:
    """sum_k weights[t, k] * Expert_{idx[t, k]}(h_t) for h [T, D], idx/weights [T, K]: the pairs in expert
    order (``order``), two grouped GEMMs, products and sum in fp32 (as transformers accumulates)."""
    n, top_k = idx.shape
    perm, offs = order(idx.reshape(-1), m.gate_up.shape[0])
    g, u = F.grouped_mm(h[perm // top_k], m.gate_up.transpose(1, 2), offs=offs).chunk(2, dim=-1)
    y = F.grouped_mm(ACT2FN[act](g) * u, m.down.transpose(1, 2), offs=offs) * weights.reshape(-1)[perm, None]
    return torch.empty_like(y).index_put_((perm,), y).view(n, top_k, -1).sum(dim=1).to(h.dtype)


def routed_all(h: torch.Tensor, m: Moe, idx: torch.Tensor, weights: torch.Tensor, act: str, order) -> torch.Tensor:
    """``routed_grouped``'s result with every expert on every token (E/K times the expert FLOPs) as batched
    GEMMs: static shapes, no host sync (``order`` unused)."""
    g, u = torch.matmul(h, m.gate_up.transpose(1, 2)).chunk(2, dim=-1)  # [E, T, I]
    y = torch.bmm(ACT2FN[act](g) * u, m.down.transpose(1, 2))  # [E, T, D]
    mix = torch.zeros(h.shape[0], m.gate_up.shape[0], device=h.device).scatter_(1, idx, weights)  # [T, E]
    return torch.einsum("etd,te->td", y.float(), mix).to(h.dtype)


def moe_kernels(h: torch.Tensor, m: Moe, d: Dims, ops: LayerOps, block: int) -> torch.Tensor:
    """Routed + shared experts of h [n, D] through ``grpo.kernels`` with MoE row blocks of ``block``. The
    shared expert (intermediate size c I) joins the routed ones as c more experts of every token with weight
    1, expert E + j being its intermediate columns jI..(j+1)I - 1 (exact: SiLU * up is per column, the down
    projection a sum over columns), so one pair of MoE GEMMs computes both. The routing kernel (bf16 or fp32
    router) needs power-of-two expert and group counts; otherwise ``ops.route``."""
    n, r, n_experts = h.shape[0], d.routing, m.gate_up.shape[0]
    c = m.shared.down.shape[1] // (m.gate_up.shape[1] // 2)
    if m.router.dtype in (torch.bfloat16, torch.float32) and all(v & (v - 1) == 0 for v in (n_experts, r.n_group)):
        weights, idx = kernels.route(h, m.router, m.bias, r.n_group, r.topk_group, r.top_k, r.norm, r.scale, shared=c)
    else:
        weights, idx = ops.route(h, m, r)
        idx = torch.cat((idx, torch.arange(n_experts, n_experts + c, device=h.device).expand(n, c)), dim=1)
        weights = torch.cat((weights, weights.new_ones(n, c)), dim=1)
    per_token = idx.shape[1]
    schedule = kernels.moe_schedule_kernel if n * per_token <= kernels.SCHEDULE_MAX_PAIRS else kernels.moe_schedule
    pairs, block_expert = schedule(idx, n_experts + c, block)
    inner = kernels.moe_up(h, m.gate_up, m.shared.gate_up, pairs, block_expert, per_token)
    y = kernels.moe_down(inner, m.down, m.shared.down, pairs, block_expert, weights.reshape(-1)).view(n, per_token, -1)
    out = y[:, 0]
    for k in range(1, per_token):  # one fused elementwise kernel: half the time of .sum(dim=1) (H100, v3-16b)
        out = out + y[:, k]
    return out.to(h.dtype)


def sorted_order(experts: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-expert pairs grouped by expert. experts [M] expert id of each pair. Returns perm [M] (the pairs
    in expert order, ties in pair order: a stable sort) and ends [E] int32 (end row of each expert's pairs)."""
    expert_sorted, perm = experts.sort(stable=True)
    ends = torch.searchsorted(expert_sorted, torch.arange(n_experts, device=experts.device), right=True)
    return perm, ends.to(torch.int32)


def counting_order(experts: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``sorted_order`` by counting: pair m of expert e goes to row start_e + #(earlier pairs of e), with
    start_e = ends_e - count_e. O(M * E) work, no sort; under ``torch.compile`` a couple of fused kernels."""
    onehot = F.one_hot(experts, n_experts)  # [M, E]
    counts = onehot.sum(dim=0)
    ends = counts.cumsum(dim=0)
    rows = ends[experts] - counts[experts] + (onehot.cumsum(dim=0) * onehot).sum(dim=1) - 1
    perm = torch.empty_like(experts).scatter_(0, rows, torch.arange(experts.numel(), device=experts.device))
    return perm, ends.to(torch.int32)


class Foreign:
    """An MLP block called as a module, e.g. an expert-parallel MoE block: [T, D] -> [T, D]. Its router's
    last choices (``PolicyRouter.last_indices``) go to ``sink`` when one is set."""

    def __init__(self, module: nn.Module, sink: list | None):
        self.module, self.sink = module, sink

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        y = self.module(h[None])
        chosen = getattr(getattr(self.module, "gate", None), "last_indices", None)
        if self.sink is not None and chosen is not None:
            self.sink.append(chosen)
        return (y[0] if isinstance(y, tuple) else y).view_as(h)
