"""One DeepSeek-V3 decoder layer, as pure functions over ``grpo.engine.containers``: the only definition of
the layer the engine runs (prefill and decode share the projections, norms, output projection and MLP
blocks; they differ in the attention form). ``grpo.model`` / transformers' modules are its test reference.

Multi-head latent attention (DeepSeek-V2/V3), per layer, for a token with hidden state h at position t:

    c_t   = RMSNorm(W_DKV h)            [R]    latent, R = kv_lora_rank
    k^R_t = RoPE_t(W_KR h)              [Dr]   shared roped key
    q_h   = [q^C_h ; RoPE_t(q^R_h)]     per head, from q_b_proj(RMSNorm(q_a_proj h)) (or q_proj h)
    k_h   = [W_UK,h c ; k^R],  v_h = W_UV,h c          (kv_b_proj = [W_UK ; W_UV] per head)
    o     = W_O concat_h softmax_s(scale * q_h . k_h,s) v_h,s

Only [c_t ; k^R_t] is cached (``grpo.engine.cache.LatentCache``). Decode (absorbed): q_h . k_h,s =
(W_UK,h^T q^C_h) . c_s + q^R_h . k^R_s, so the query is mapped into latent space (W_UK folded into the query
projection), attention runs over the cached latents directly, and its output (softmax @ c) is mapped by
W_UV,h then W_O. Prefill runs the ordinary form with causal SDPA over each prompt.
Every layer returns the next layer's normed input (its next_norm applied to the new residual stream), so
the norm fuses with the residual add under torch.compile.

The interchangeable pieces (decode attention core, MoE block, routing, routed experts, pair order) come in
a ``LayerOps`` table picked once at bind time (``grpo.engine.ops``).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from grpo.engine.containers import Attention, Dense, Dims, Layer, Moe, Mtp, Projection


class LayerOps(NamedTuple):
    """The interchangeable ops of a layer (a ``torch.compile`` static argument: plain functions).

    attend(q_latent [n, m, H, R], q_rope [n, m, H, Dr], keys [n, S, R+Dr], own [n, m, R+Dr], pos [n], scale)
        -> [n, m, H, R]: decode attention of m tokens per sequence over cached positions < pos and their own
        latents, causal among them (``attend``, or ``grpo.kernels.mla_decode``);
    moe(h [T, D], m: Moe, dims, ops, block) -> [T, D]: routed + shared experts (``grpo.engine.experts``);
    route(h [T, D], m: Moe, routing) -> (weights [T, K] fp32, idx [T, K]);
    routed(h, m, idx, weights, act, order) -> [T, D]: the routed experts alone;
    order(experts [M], n_experts) -> (perm [M], ends [E] int32): token-expert pairs grouped by expert.
    """

    attend: Callable
    moe: Callable
    route: Callable
    routed: Callable
    order: Callable


def norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm as one fused op (statistics in fp32; in bf16 the weight is applied before the
    single rounding instead of after it)."""
    return F.rms_norm(x, weight.shape, weight, eps)


def rope_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """RoPE of x [..., Dr] with cos/sin broadcastable to [..., Dr/2] (attention factor included): each pair
    (a, b) becomes (a cos - b sin, a sin + b cos), in real arithmetic (inductor does not fuse complex ops).
    Pairs are transformers' ((2j, 2j+1) with rope_interleave, else (j, j+Dr/2)); the output keeps each pair
    adjacent, a fixed permutation of transformers' layout that queries and cached keys share, so every q.k
    is unchanged."""
    half = x.shape[-1] // 2
    a, b = (x.unflatten(-1, (half, 2)).unbind(-1) if interleave else x.chunk(2, dim=-1))
    a, b = a.float(), b.float()
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).to(x.dtype)


def project(h: torch.Tensor, p: Projection, a: Attention, d: Dims, cos: torch.Tensor, sin: torch.Tensor):
    """Queries and latent of h [..., D] (the normed input) at rotations cos/sin [..., Dr/2]. Returns
    (q [..., H, X - Dr] the unrotated query part: q^C plain, q^L absorbed; q_rope [..., H, Dr];
    c [..., R] the normed latent; k_rope [..., Dr])."""
    if p.q is None:
        q, kv = F.linear(h, p.in_proj).split([p.in_proj.shape[0] - d.rank - d.rope, d.rank + d.rope], dim=-1)
    else:
        q, kv = F.linear(h, p.q), F.linear(h, p.in_proj)
    if p.q_b is not None:
        q = F.linear(norm(q, a.q_norm, d.eps.q), p.q_b)
    q = q.unflatten(-1, (d.heads, -1))
    c = norm(kv[..., : d.rank], a.kv_norm, d.eps.kv)
    k_rope = rope_pairs(kv[..., d.rank:], cos, sin, d.interleave)
    q_rope = rope_pairs(q[..., -d.rope:], cos.unsqueeze(-2), sin.unsqueeze(-2), d.interleave)
    return q[..., : -d.rope], q_rope, c, k_rope


def attend(q_latent: torch.Tensor, q_rope: torch.Tensor, keys: torch.Tensor, own: torch.Tensor, pos: torch.Tensor,
           scale: float) -> torch.Tensor:
    """Absorbed attention of m consecutive tokens per sequence (positions pos .. pos+m-1): query i's softmax
    runs over [q.k_s for s < pos ; q.own_j for j <= i] (the new tokens' own latents merged into the same
    softmax, causal among them: the distribution of writing them first and attending over s <= pos + i),
    then the probabilities times the latents. Shapes as ``LayerOps.attend``; only positions < pos are read."""
    n, m, heads, rank = q_latent.shape
    q_full = torch.cat((q_latent, q_rope), dim=-1).view(n, m * heads, -1)  # row i H + h: token i, head h
    scores = torch.bmm(q_full, keys.transpose(1, 2)).float() * scale  # [n, mH, S]
    scores = scores.masked_fill(torch.arange(keys.shape[1], device=keys.device) >= pos[:, None, None], float("-inf"))
    own_scores = torch.bmm(q_full.float(), own.float().transpose(1, 2)) * scale  # [n, mH, m]
    later = torch.arange(m, device=own.device) > torch.arange(m, device=own.device).repeat_interleave(heads)[:, None]
    own_scores = own_scores.masked_fill(later, float("-inf"))
    top = torch.maximum(scores.amax(dim=-1, keepdim=True), own_scores.amax(dim=-1, keepdim=True))
    e, e_own = (scores - top).exp(), (own_scores - top).exp()
    total = e.sum(dim=-1, keepdim=True) + e_own.sum(dim=-1, keepdim=True)
    probs = (e / total).to(q_latent.dtype)  # [n, mH, S], its own tensor (an odd-strided slice takes a slow GEMM)
    p_own = (e_own / total).to(q_latent.dtype)  # [n, mH, m]
    # m = 1: a broadcast product (the same values); a bmm over K = 1 takes a slow CPU path (107 vs 8 us, EPYC)
    out_own = p_own * own[..., :rank] if m == 1 else torch.bmm(p_own, own[..., :rank])
    out = torch.bmm(probs, keys[..., :rank]) + out_own
    return out.view(n, m, heads, rank)


def dense(h: torch.Tensor, m: Dense, act: str) -> torch.Tensor:
    """The gated MLP: down(act(gate h) * up h)."""
    g, u = F.linear(h, m.gate_up).chunk(2, dim=-1)
    return F.linear(ACT2FN[act](g) * u, m.down)


def mlp(h: torch.Tensor, m, d: Dims, ops: LayerOps, block: int) -> torch.Tensor:
    """The layer's MLP block on h [..., D]: a dense MLP, a DeepSeekMoE block through ``ops.moe`` (``block``:
    the Triton MoE row block, 0 otherwise), or a foreign module called as it is (expert parallelism stays
    inside it)."""
    if isinstance(m, Dense):
        return dense(h, m, d.act)
    flat = h.flatten(0, -2)
    return (ops.moe(flat, m, d, ops, block) if isinstance(m, Moe) else m(flat)).view_as(h)


def _finish(x: torch.Tensor, out: torch.Tensor, w: Layer, d: Dims, ops: LayerOps, block: int):
    """The rest of the layer after attention: x + W_O out, then x + MLP(post_norm x). Returns (x, next_norm x)."""
    x = x + F.linear(out, w.attn.o)
    x = x + mlp(norm(x, w.post_norm, d.eps.post), w.mlp, d, ops, block)
    return x, norm(x, w.next_norm, d.eps.next)


def decode_layer(x: torch.Tensor, h: torch.Tensor, keys: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, w: Layer, *, dims: Dims, ops: LayerOps, block: int = 0):
    """One decoder layer for m new tokens per sequence at positions pos .. pos+m-1 (absorbed attention, causal
    among them): m = 1 is a decode step, m > 1 a multi-token (verify) step.

    x [n, m, D] hidden states and h [n, m, D] their RMSNorm by the layer's input norm; keys [n, S, R+Dr] the
    layer's cache (only positions < pos are read; it is not written); pos [n]; cos/sin [n, m, Dr/2]. Returns
    (x [n, m, D] after the layer, its next_norm [n, m, D], latents [n, m, R+Dr] to write at pos .. pos+m-1)."""
    a = w.attn
    q_latent, q_rope, c, k_rope = project(h, a.absorbed, a, dims, cos, sin)
    latent = torch.cat((c, k_rope), dim=-1)
    out_latent = ops.attend(q_latent, q_rope, keys, latent, pos, dims.scale)  # [n, m, H, R]
    out = torch.bmm(out_latent.flatten(0, 1).transpose(0, 1), a.w_uv_t).transpose(0, 1)  # [n m, H, Dv]
    return (*_finish(x, out.reshape(x.shape[:-1] + (-1,)), w, dims, ops, block), latent)


def mtp_input(e: torch.Tensor, prev: torch.Tensor, w: Mtp) -> tuple[torch.Tensor, torch.Tensor]:
    """The input of an MTP module's block at position i (``grpo.model``'s MTP forward): from e [..., D], the
    embedding of token t_{i+1}, and prev [..., D], the previous depth's hidden state at i,
    x = eh_proj [RMSNorm(e) ; RMSNorm(prev)]. Returns (x, its input norm) for ``decode_layer`` /
    ``prefill_layer`` over ``w.layer``."""
    x = F.linear(torch.cat((norm(e, w.enorm, w.eps[0]), norm(prev, w.hnorm, w.eps[1])), dim=-1), w.eh_proj)
    return x, norm(x, w.in_norm, w.eps[2])


def prefill_layer(x: torch.Tensor, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, w: Layer, *, dims: Dims,
                  ops: LayerOps):
    """One decoder layer over a batch of prompts (ordinary attention form, causal SDPA over each prompt).

    x [B, P, D] (prompts padded on the right) and h its input norm; cos/sin [P, Dr/2]. Returns (x [B, P, D]
    after the layer, its next_norm, latents [B, P, R+Dr] to cache)."""
    a, d = w.attn, dims
    q_nope, q_rope, c, k_rope = project(h, a.plain, a, d, cos, sin)
    kv = F.linear(c, a.kv_b).unflatten(-1, (d.heads, d.nope + d.v_dim))  # [B, P, H, Dn + Dv]
    keys = torch.cat((kv[..., : d.nope], k_rope[:, :, None].expand(-1, -1, d.heads, -1)), dim=-1)
    queries = torch.cat((q_nope, q_rope), dim=-1)
    out = F.scaled_dot_product_attention(queries.transpose(1, 2), keys.transpose(1, 2), kv[..., d.nope:].transpose(1, 2),
                                         is_causal=True, scale=d.scale)  # [B, H, P, Dv]
    return (*_finish(x, out.transpose(1, 2).flatten(2), w, d, ops, 0), torch.cat((c, k_rope), dim=-1))
