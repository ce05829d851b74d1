"""Typed containers of one DeepSeek-V3 decoder layer for the pure layer functions (``grpo.engine.layer``).

Sizes: D hidden, H heads, Dn / Dr / Dv the per-head nope / rope / value dims, R = kv_lora_rank, Q the q LoRA
rank (or D without one), E routed experts, I an expert's intermediate size, SI the shared expert's.
``Dims`` holds only Python scalars (hashable: a ``torch.compile`` static argument); the weight containers
hold tensors (the model's parameters or stacked copies of them, never detached clones).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch


class Eps(NamedTuple):
    """RMSNorm epsilons: the latent's norm, the q LoRA's (0.0 without one), the post-attention norm, and the
    norm applied to the layer's output (the next layer's input norm, or the final norm after the last)."""

    kv: float
    q: float
    post: float
    next: float


class Routing(NamedTuple):
    """``grpo.moe.route``'s settings of a DeepSeekMoE block."""

    n_group: int
    topk_group: int
    top_k: int
    norm: bool
    scale: float


class Dims(NamedTuple):
    """Static sizes of one layer: heads H, Dn, Dr, Dv, rank R, the softmax scale (with YaRN's mscale), the
    RoPE pair layout (transformers' rope_interleave), the activation's name, the epsilons, and the routing
    (None for a dense MLP)."""

    heads: int
    nope: int
    rope: int
    v_dim: int
    rank: int
    scale: float
    interleave: bool
    act: str
    eps: Eps
    routing: Optional[Routing]


class Projection(NamedTuple):
    """Query and latent projection of one attention form. in_proj [Qr + R + Dr, D] = [q_a_proj (or the query
    rows without a q LoRA) ; kv_a_proj]: one GEMM; or in_proj = kv_a_proj [R + Dr, D] alone and q [H X, D] the
    query rows as a GEMM of their own (the plain form without a q LoRA: no stacked copy); q_b [H X, Q] the q
    LoRA's up-projection (None without one). Per head the query has X = Dn + Dr values (plain form: prefill)
    or R + Dr (absorbed form: W_UK folded in, ``grpo.engine.v3.absorbed_query``: decode)."""

    in_proj: torch.Tensor
    q: Optional[torch.Tensor]
    q_b: Optional[torch.Tensor]


class Attention(NamedTuple):
    """One MLA block: the two projection forms, q_norm [Q] (None without a q LoRA), kv_norm [R],
    kv_b [H (Dn + Dv), R] = [W_UK ; W_UV] per head, w_uv_t [H, R, Dv] (a view of kv_b), o [D, H Dv]."""

    absorbed: Projection
    plain: Projection
    q_norm: Optional[torch.Tensor]
    kv_norm: torch.Tensor
    kv_b: torch.Tensor
    w_uv_t: torch.Tensor
    o: torch.Tensor


class Dense(NamedTuple):
    """A gated MLP: gate_up [2I, D] = [gate_proj ; up_proj] (one GEMM), down [D, I]."""

    gate_up: torch.Tensor
    down: torch.Tensor


class Stacked(NamedTuple):
    """Every expert of a DeepSeekMoE block as two GEMMs (``grpo.engine.experts.moe_stacked``): up(x [T, D])
    -> [T, 2 E I + 2 SI], each routed expert's gate then up columns, then the shared expert's gate and up;
    down(x [T, E I + SI]) -> [T, D], the routed experts' down projections side by side, then the shared one's
    (``grpo.onednn.packed_linear`` over stacked copies of the weights)."""

    up: Callable
    down: Callable


class Moe(NamedTuple):
    """A DeepSeekMoE block (transformers' fused expert layout): the shared expert (a ``Dense`` of
    intermediate size SI), router [E, D], bias [E] (selection only), gate_up [E, 2I, D], down [E, D, I], and
    where the op table runs every expert on every token, ``Stacked`` (else None)."""

    shared: Dense
    router: torch.Tensor
    bias: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    stacked: Optional[Stacked] = None


class Layer(NamedTuple):
    """One decoder layer: attention, post_norm [D], the MLP block (``Dense``, ``Moe``, or a ``Foreign``
    module from ``grpo.engine.experts``), next_norm [D] (the next layer's input norm, or the final norm)."""

    attn: Attention
    post_norm: torch.Tensor
    mlp: object
    next_norm: torch.Tensor


class Mtp(NamedTuple):
    """An MTP module (``grpo.model``'s ``MTPLayer``): enorm [D] and hnorm [D] (the norms of the token
    embedding and of the previous depth's hidden state), eh_proj [D, 2D], in_norm [D] (its block's input
    norm), their epsilons (enorm, hnorm, in_norm), and its block as a ``Layer`` whose next_norm is the
    shared head's norm (so the block's normed output feeds the shared output head)."""

    enorm: torch.Tensor
    hnorm: torch.Tensor
    eh_proj: torch.Tensor
    in_norm: torch.Tensor
    eps: tuple[float, float, float]
    layer: Layer


class Pending(NamedTuple):
    """Per slot, the MTP positions whose inputs are known but that the MTP block has not run yet: the last
    ``count`` positions below the slot's position p (p - count .. p - 1), with the main model's final hidden
    states there (hidden [slots, k+1, D], first count rows valid) and the tokens that follow them (tokens
    [slots, k+1]; the last one is the slot's next input token, kept in ``grpo.engine.v3.V3Decoder.tokens``)."""

    hidden: torch.Tensor
    tokens: torch.Tensor
    count: torch.Tensor
