"""Fast inference forward of a DeepSeek-V3 policy for the rollout engine: MLA latent cache, absorbed decode.

Works directly on the weights of transformers' ``DeepseekV3ForCausalLM`` (and of ``grpo.model``'s policy, which
keeps its module and parameter names); it holds references, never copies, so optimizer updates are seen.

Multi-head latent attention (DeepSeek-V2/V3), per layer, for a token with hidden state h at position t:

    c_t   = RMSNorm(W_DKV h)            [R]    latent, R = kv_lora_rank
    k^R_t = RoPE_t(W_KR h)              [Dr]   shared roped key, Dr = qk_rope_head_dim
    q_h   = [q^C_h ; RoPE_t(q^R_h)]     per head, from q_b_proj(RMSNorm(q_a_proj h)) (or q_proj h)
    k_h   = [W_UK,h c ; k^R],  v_h = W_UV,h c          (kv_b_proj = [W_UK ; W_UV] per head)
    o     = W_O concat_h softmax_s(scale * q_h . k_h,s) v_h,s

Cache: only [c_t ; k^R_t] is stored, (R + Dr) values per token per layer (``LatentCache``), instead of
H * (Dn + Dr + Dv) for full keys/values.
Decode (absorbed): q_h . k_h,s = (W_UK,h^T q^C_h) . c_s + q^R_h . k^R_s, so the query is mapped once into latent
space, attention runs over the cached latents directly, and the output is (softmax @ c) mapped by W_UV,h then
W_O. Prefill runs the ordinary (non-absorbed) form with causal SDPA over the prompt and writes the latents of
each prompt to all of its group's slots (one prefill per prompt, G cache copies).
RoPE cos/sin come from the model's own rotary module (so YaRN and its attention factor match transformers),
and the softmax scale is the attention module's (qk_head_dim^-1/2 times YaRN mscale^2).
MoE: routing is ``grpo.moe.route`` (sigmoid scores, bias for selection, group-limited top-k); routed experts
run as two grouped GEMMs over the token-expert pairs sorted by expert (``torch.nn.functional.grouped_mm``,
the same kernel transformers' default "grouped_mm" experts use), no Python loop over experts. On CUDA the
routing and the expert order (a counting sort: one-hot prefix sums, the same order as a stable sort) are
``torch.compile``d into a few fused kernels (~20 tiny kernels per layer at decode otherwise). On CUDA in
fp32/fp16 (no fast grouped kernel) the routed experts run as batched GEMMs of every expert over every token. A ``mlp`` that is not
transformers' layout (e.g. DeepSpeed AutoEP's replacement) is called as a module, so expert parallelism
stays inside it.
On CUDA in bf16 with transformers' own modules, each decoder layer's decode runs as one ``torch.compile``d
pure function (``decode_layer``: weights, the layer's cache and the positions in; the new hidden state, the
next layer's normed input and the token's latent out), so inductor fuses the norms, RoPE, masking, softmax
and routing around the GEMMs; W_UK is folded into the query projection (``_Layer.absorbed_query``: one GEMM
gives the latent-space query); the cache is only read there (the token attends to the cached positions < t,
and to itself through its own latent, merged in one softmax) and all layers' latents are written with one
scatter after the last layer. With Triton (``grpo.kernels``), that function's attention, routing and experts
are Triton kernels, the shared expert computed with the routed ones. Each layer's prefill is likewise one
compiled function (``prefill_layer``, batch and prompt width dynamic).
Departure from transformers' eager forward: same math, different summation order (fp32 differences ~1e-6).
MTP modules are not used for generation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts, DeepseekV3MLP, DeepseekV3MoE

from grpo import kernels
from grpo.moe import route


def is_v3(model) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == "deepseek_v3"


class LatentCache:
    """Preallocated MLA cache. ``data`` [layers, slots, max_len, kv_lora_rank + qk_rope_head_dim]:
    per slot and position the normalised latent c (first kv_lora_rank values) and the roped key k^R."""

    def __init__(self, *, layers: int, slots: int, max_len: int, kv_lora_rank: int, rope_dim: int, dtype, device):
        self.data = torch.zeros(layers, slots, max_len, kv_lora_rank + rope_dim, dtype=dtype, device=device)

    @property
    def max_len(self) -> int:
        return self.data.shape[2]

    @property
    def bytes_per_token(self) -> int:
        """Bytes of cache per token of one sequence, all layers: layers * (R + Dr) * itemsize."""
        return self.data.shape[0] * self.data.shape[3] * self.data.element_size()

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy whole slots src[i] -> dst[i] (disjoint index sets)."""
        self.data[:, dst] = self.data[:, src]


def _rms(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """transformers' RMSNorm as one fused op (statistics in fp32; in bf16 the weight is applied before the
    single rounding instead of after it)."""
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


def _linear(module: nn.Module):
    """A plain nn.Linear is applied through F.linear (no module-call overhead); anything else (e.g. an adapter
    wrapper) is called as a module."""
    if type(module) is nn.Linear:
        weight, bias = module.weight, module.bias
        return lambda x: F.linear(x, weight, bias)
    return module


def _packed_linear(module: nn.Module, rows: int):
    """On CPU with MKL, an fp32 nn.Linear without bias as MKL's packed GEMM for up to ``rows`` input rows:
    the weight is reordered once, here, and each call gives exactly F.linear's result, about 15% faster at
    decode shapes. The packed copy does not follow later weight updates (``V3Decoder.bind`` repacks).
    None when it does not apply."""
    weight = module.weight
    if (type(module) is not nn.Linear or module.bias is not None or weight.device.type != "cpu"
            or weight.dtype != torch.float32 or not torch.backends.mkl.is_available()):
        return None
    packed = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), rows)
    return lambda x: torch.ops.mkl._mkl_linear(x, packed, weight, None, rows)


class _Experts:
    """Routed experts of one MoE block (transformers' fused layout: gate_up_proj [E, 2I, D], down_proj [E, D, I])."""

    def __init__(self, moe: nn.Module, config):
        self.gate, self.experts = moe.gate, moe.experts
        self.n_experts = config.n_routed_experts
        self.kw = dict(n_group=config.n_group, topk_group=config.topk_group, top_k=config.num_experts_per_tok,
                       norm=config.norm_topk_prob, scale=config.routed_scaling_factor)
        self.shared_mlp = _DenseMLP(moe.shared_experts)
        cuda = self.gate.weight.device.type == "cuda"
        self.route = _compiled_route if cuda else route
        self.order = _compiled_order if cuda else sorted_order
        self.combine = _compiled_combine if cuda else combine
        self.sink: list | None = None  # V3Decoder.record_routing: each call appends its expert choices [T, K]

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        logits = F.linear(h.float(), self.gate.weight.float())
        weights, idx, _ = self.route(logits, self.gate.e_score_correction_bias, **self.kw)
        if self.sink is not None:
            self.sink.append(idx)
        return self.routed(h, idx, weights) + self.shared_mlp(h)

    def routed(self, h: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_k weights[t, k] * Expert_{idx[t, k]}(h_t) for h [T, D], idx/weights [T, K]. CUDA's grouped GEMM
        kernel is bf16-only and its fallback reads the offsets on the host (no CUDA graph), so fp32/fp16 on
        CUDA takes the dense form."""
        if h.device.type != "cpu" and h.dtype != torch.bfloat16:
            return self.dense(h, idx, weights)
        return self.grouped(h, idx, weights)

    def grouped(self, h: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Token-expert pairs sorted by expert, two grouped GEMMs."""
        top_k = idx.shape[1]
        perm, offs = self.order(idx.reshape(-1), self.n_experts)
        g, u = F.grouped_mm(h[perm // top_k], self.experts.gate_up_proj.transpose(1, 2), offs=offs).chunk(2, dim=-1)
        y = F.grouped_mm(self.experts.act_fn(g) * u, self.experts.down_proj.transpose(1, 2), offs=offs)
        rank = torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.shape[0], device=perm.device))
        return self.combine(y, rank, weights)

    def dense(self, h: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Every expert on every token (E/K times the expert FLOPs) as batched GEMMs; static shapes, no sync."""
        g, u = torch.matmul(h, self.experts.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)  # [E, T, I]
        y = torch.bmm(self.experts.act_fn(g) * u, self.experts.down_proj.transpose(1, 2))  # [E, T, D]
        mix = torch.zeros(h.shape[0], self.n_experts, device=h.device).scatter_(1, idx, weights)  # [T, E]
        return torch.einsum("etd,te->td", y.float(), mix).to(h.dtype)


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


def combine(y: torch.Tensor, rank: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_k weights[t, k] * y[rank[t K + k]] for the expert outputs y [n K, D] in expert order, rank [n K]
    the row of each pair, weights [n, K] fp32: products and sum in fp32 (as transformers accumulates), [n, D]
    in y's dtype. One gather-multiply-reduce kernel under torch.compile."""
    n, top_k = weights.shape
    return (y[rank].view(n, top_k, -1) * weights[..., None]).sum(dim=1).to(y.dtype)


# Compiled once per process for all batch sizes (inputs of size 1 get their own specialisation); made here,
# not per decoder, so that rebinding the decoder on every generate call reuses the compiled code.
_compiled_route = torch.compile(route, dynamic=True)
_compiled_order = torch.compile(counting_order, dynamic=True)
_compiled_combine = torch.compile(combine, dynamic=True)


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


def decode_layer(x: torch.Tensor, h: torch.Tensor, keys: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, w: dict[str, torch.Tensor], *, dims: tuple, moe: tuple | None,
                 block: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decoder layer for one new token per sequence, as a pure function.

    x [n, D] hidden states and h [n, D] their RMSNorm by the layer's input norm; keys [n, S, R+Dr] the layer's
    cache (only positions < pos are read); pos [n]; cos/sin [n, Dr/2]; w the layer's weights (``_Layer.fused``;
    in_proj = [q_proj or q_a_proj ; kv_a_proj] and gate_up_shared = [gate_proj ; up_proj] of the dense MLP or
    shared experts, each one GEMM; the query projection, q_b or in_proj's first rows, with W_UK folded in). dims =
    (heads, nope, rope, v_dim, rank, scale, interleave, hidden_act, eps); moe = (n_experts, route kwargs) for a
    DeepSeekMoE block, None for a dense MLP. Returns (x [n, D] after the layer, its RMSNorm by w["next_norm"] (the
    next layer's input norm, or the final norm after the last layer: computed here, it fuses with the residual
    add), latent [n, R+Dr] to write at each sequence's position). Attention: softmax over [q.k_s for s < pos ;
    q.k_self] with k_self from the returned latent, the same distribution as writing the latent first and
    attending over s <= pos. block > 0: attention and routed and shared experts through ``grpo.kernels`` (Triton,
    CUDA), with MoE row blocks of that size."""
    heads, nope, rope, v_dim, rank, scale, interleave, act, eps = dims
    act = ACT2FN[act]
    n, span = x.shape[0], keys.shape[1]
    q, kv = F.linear(h, w["in_proj"]).split([w["in_proj"].shape[0] - rank - rope, rank + rope], dim=-1)
    if "q_b" in w:
        q = F.linear(F.rms_norm(q, q.shape[-1:], w["q_norm"], eps["q"]), w["q_b"])
    q = q.reshape(n, heads, rank + rope)  # [q^L ; q^R] per head: W_UK is folded into the query projection
    c = F.rms_norm(kv[:, :rank], (rank,), w["kv_norm"], eps["kv"])
    latent = torch.cat((c, rope_pairs(kv[:, rank:], cos, sin, interleave)), dim=-1)  # [n, R+Dr]
    q_latent = q[..., :rank]  # [n, H, R]
    q_rope = rope_pairs(q[..., rank:], cos[:, None], sin[:, None], interleave)
    if block:
        out_latent = kernels.mla_decode(q_latent, q_rope, keys, latent, pos, scale)
    else:
        q_full = torch.cat((q_latent, q_rope), dim=-1)
        scores = torch.bmm(q_full, keys.transpose(1, 2)).float() * scale  # [n, H, S]
        scores = scores.masked_fill(torch.arange(span, device=x.device) >= pos[:, None, None], float("-inf"))
        own = (q_full.float() * latent[:, None].float()).sum(dim=-1, keepdim=True) * scale  # [n, H, 1]
        top = torch.maximum(scores.amax(dim=-1, keepdim=True), own)
        e, e_own = (scores - top).exp(), (own - top).exp()
        total = e.sum(dim=-1, keepdim=True) + e_own
        probs = (e / total).to(x.dtype)  # [n, H, S], its own tensor (an odd-strided slice takes a slow GEMM)
        out_latent = torch.bmm(probs, keys[..., :rank]) + (e_own / total).to(x.dtype) * c[:, None]  # [n, H, R]
    out = torch.bmm(out_latent.transpose(0, 1), w["w_uv_t"]).transpose(0, 1).reshape(n, heads * v_dim)
    x = x + F.linear(out, w["o"])
    h = F.rms_norm(x, x.shape[-1:], w["post_norm"], eps["post"])
    if moe is not None and block:
        x = x + _experts_by_kernels(h, w, *moe, block)
    else:
        g, u = F.linear(h, w["gate_up_shared"]).chunk(2, dim=-1)
        shared = F.linear(act(g) * u, w["down"])
        x = x + (shared if moe is None else _routed_by_grouped_mm(h, w, *moe, act) + shared)
    return x, F.rms_norm(x, x.shape[-1:], w["next_norm"], eps["next"]), latent


def _routed_by_grouped_mm(h: torch.Tensor, w: dict, n_experts: int, kw: dict, act) -> torch.Tensor:
    """Routed experts of h [n, D]: token-expert pairs in expert order (``counting_order``), two grouped GEMMs."""
    weights, idx, _ = route(F.linear(h.float(), w["router"].float()), w["bias"], **kw, by_argmax=True)
    n, top_k = idx.shape
    perm, offs = counting_order(idx.reshape(-1), n_experts)
    g, u = F.grouped_mm(h[perm // top_k], w["gate_up"].transpose(1, 2), offs=offs).chunk(2, dim=-1)
    y = F.grouped_mm(act(g) * u, w["expert_down"].transpose(1, 2), offs=offs) * weights.reshape(-1)[perm, None]
    return torch.empty_like(y).index_put_((perm,), y).view(n, top_k, -1).sum(dim=1).to(h.dtype)


def prefill_layer(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, w: dict[str, torch.Tensor], *, dims: tuple,
                  moe: tuple | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder layer over a batch of prompts, as a pure function (the prefill counterpart of
    ``decode_layer``, compiled on CUDA in bf16 with the batch and width dynamic): x [B, P, D] (prompts padded
    on the right), cos/sin [P, Dr/2]. Returns (x [B, P, D] after the layer, latents [B, P, R+Dr] to cache).
    Attention in the ordinary (non-absorbed) form, causal SDPA over each prompt; routed experts as grouped
    GEMMs (``_routed_by_grouped_mm``; the Triton MoE kernels are tuned for decode's few rows per expert)."""
    heads, nope, rope, v_dim, rank, scale, interleave, act, eps = dims
    act = ACT2FN[act]
    batch, width, dim = x.shape
    h = F.rms_norm(x, (dim,), w["in_norm"], eps["in"])
    q = F.linear(F.rms_norm(F.linear(h, w["q_a"]), w["q_norm"].shape, w["q_norm"], eps["q"]) if "q_a" in w else h, w["q_up"])
    q = q.view(batch, width, heads, nope + rope)
    kv = F.linear(h, w["kv_a"])
    c = F.rms_norm(kv[..., :rank], (rank,), w["kv_norm"], eps["kv"])
    k_rope = rope_pairs(kv[..., rank:], cos, sin, interleave)  # [B, P, Dr]
    kv_up = F.linear(c, w["kv_b"]).view(batch, width, heads, nope + v_dim)
    keys = torch.cat((kv_up[..., :nope], k_rope[:, :, None].expand(-1, -1, heads, -1)), dim=-1)
    queries = torch.cat((q[..., :nope], rope_pairs(q[..., nope:], cos[:, None], sin[:, None], interleave)), dim=-1)
    out = F.scaled_dot_product_attention(queries.transpose(1, 2), keys.transpose(1, 2), kv_up[..., nope:].transpose(1, 2),
                                         is_causal=True, scale=scale)  # [B, H, P, Dv]
    x = x + F.linear(out.transpose(1, 2).reshape(batch, width, heads * v_dim), w["o"])
    h = F.rms_norm(x, (dim,), w["post_norm"], eps["post"])
    g, u = F.linear(h, w["gate_up_shared"]).chunk(2, dim=-1)
    shared = F.linear(act(g) * u, w["down"])
    if moe is not None:
        shared = _routed_by_grouped_mm(h.view(batch * width, dim), w, *moe, act).view_as(shared) + shared
    return x + shared, torch.cat((c, k_rope), dim=-1)


def _experts_by_kernels(h: torch.Tensor, w: dict, n_experts: int, kw: dict, block: int) -> torch.Tensor:
    """Routed + shared experts of h [n, D] through ``grpo.kernels``. The shared expert (intermediate size
    c I) joins the routed ones as c more experts of every token with weight 1, expert E + j being its
    intermediate columns jI..(j+1)I - 1 (exact: SiLU * up is per column, the down projection a sum over
    columns), so one pair of MoE GEMMs computes both. The fused routing kernel needs a bf16 router and
    power-of-two expert and group counts."""
    n = h.shape[0]
    c = w["down"].shape[1] // (w["gate_up"].shape[1] // 2)
    if w["router"].dtype == torch.bfloat16 and all(v & (v - 1) == 0 for v in (n_experts, kw["n_group"])):
        weights, idx = kernels.route(h, w["router"], w["bias"], **kw, shared=c)
    else:  # transformers keeps a loaded model's router weight in fp32: its logits are an fp32 GEMM
        weights, idx, _ = route(F.linear(h.float(), w["router"].float()), w["bias"], **kw, by_argmax=True)
        idx = torch.cat((idx, torch.arange(n_experts, n_experts + c, device=h.device).expand(n, c)), dim=1)
        weights = torch.cat((weights, weights.new_ones(n, c)), dim=1)
    per_token = idx.shape[1]
    schedule = kernels.moe_schedule_kernel if n * per_token <= kernels.SCHEDULE_MAX_PAIRS else kernels.moe_schedule
    pairs, block_expert = schedule(idx, n_experts + c, block)
    inner = kernels.moe_up(h, w["gate_up"], w["gate_up_shared"], pairs, block_expert, per_token)
    y = kernels.moe_down(inner, w["expert_down"], w["down"], pairs, block_expert, weights.reshape(-1))
    return y.view(n, per_token, -1).sum(dim=1).to(h.dtype)


# One compiled function for all layers: weights are inputs, so the dense first layer and the MoE layers are
# its only two variants; only the batch and span dimensions are dynamic (``V3Decoder._decode_fused``), and
# for the prefill the batch and prompt width (``V3Decoder.prefill``).
_compiled_layer = torch.compile(decode_layer)
_compiled_prefill = torch.compile(prefill_layer)


class _DenseMLP:
    def __init__(self, mlp: nn.Module):
        self.gate, self.up, self.down = _linear(mlp.gate_proj), _linear(mlp.up_proj), _linear(mlp.down_proj)
        self.act = mlp.act_fn

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate(h)) * self.up(h))


def _mlp(mlp: nn.Module, config):
    if isinstance(mlp, DeepseekV3MoE) and isinstance(mlp.experts, DeepseekV3Experts):
        return _Experts(mlp, config)
    if isinstance(mlp, DeepseekV3MLP):
        return _DenseMLP(mlp)

    return _Foreign(mlp)


class _Foreign:
    """An MLP block called as a module, e.g. an expert-parallel MoE block: [T, D] -> [1, T, D]. Its router's
    last choices (``PolicyRouter.last_indices``) go to ``sink`` when one is set."""

    def __init__(self, mlp: nn.Module):
        self.mlp, self.sink = mlp, None

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        y = self.mlp(h[None])
        chosen = getattr(getattr(self.mlp, "gate", None), "last_indices", None)
        if self.sink is not None and chosen is not None:
            self.sink.append(chosen)
        return (y[0] if isinstance(y, tuple) else y).view_as(h)


def _stacked(buffers: dict, key, *weights: torch.Tensor) -> torch.Tensor:
    """The weights stacked by rows (one GEMM for all), in ``buffers[key]``, refilled in place."""
    rows = sum(w.shape[0] for w in weights)
    buf = buffers.get(key)
    if buf is None or buf.shape[0] != rows:
        with torch.inference_mode(False):  # a normal tensor: later binds refill it, in inference mode or not
            buf = buffers[key] = torch.empty(rows, weights[0].shape[1], dtype=weights[0].dtype, device=weights[0].device)
    with torch.no_grad():
        return torch.cat(weights, out=buf)


class _Layer:
    def __init__(self, layer: nn.Module, config):
        a = layer.self_attn
        self.in_norm, self.post_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.heads, self.nope, self.rope, self.v_dim = a.num_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
        self.rank, self.scale = a.kv_lora_rank, a.scaling
        if a.q_lora_rank is None:
            self.q = _linear(a.q_proj)
        else:
            q_a, q_b, q_norm = _linear(a.q_a_proj), _linear(a.q_b_proj), a.q_a_layernorm
            self.q = lambda h: q_b(_rms(q_a(h), q_norm))
        self.kv_a, self.kv_norm, self.kv_b, self.o = _linear(a.kv_a_proj_with_mqa), a.kv_a_layernorm, a.kv_b_proj, _linear(a.o_proj)
        if type(a.kv_b_proj) is not nn.Linear:
            raise TypeError("the absorbed MLA decode needs kv_b_proj to be a plain nn.Linear; use backend='generic'")
        self.mlp = _mlp(layer.mlp, config)
        self.module, self.config = layer, config

    def fused(self, buffers: dict, next_norm: nn.Module) -> tuple[dict[str, torch.Tensor], dict] | None:
        """(weights, static kwargs) of ``decode_layer`` and ``prefill_layer`` for this layer (``next_norm``: the
        next layer's input norm, or the final norm), or None when a module is not transformers' own (an
        adapter wrapper, an expert-parallel MoE block). The stacked weights and the
        query projection with W_UK folded in (``absorbed_query``) are copies kept in ``buffers`` and refilled
        in place on every call (CUDA graphs hold their addresses)."""
        a, mlp, config = self.module.self_attn, self.module.mlp, self.config
        linears = ["kv_a_proj_with_mqa", "o_proj", *(["q_proj"] if a.q_lora_rank is None else ["q_a_proj", "q_b_proj"])]
        dense = mlp.shared_experts if isinstance(self.mlp, _Experts) else mlp
        if not isinstance(self.mlp, (_Experts, _DenseMLP)) or any(
                type(m) is not nn.Linear or m.bias is not None
                for m in [getattr(a, name) for name in linears] + [dense.gate_proj, dense.up_proj, dense.down_proj]):
            return None
        q_up, kv_a = (a.q_proj if a.q_lora_rank is None else a.q_b_proj).weight, a.kv_a_proj_with_mqa.weight
        with torch.no_grad():
            query = self.absorbed_query(q_up)
        w = {"in_norm": self.in_norm.weight, "next_norm": next_norm.weight, "kv_norm": a.kv_a_layernorm.weight,
             "post_norm": self.post_norm.weight, "o": a.o_proj.weight, "down": dense.down_proj.weight,
             "gate_up_shared": _stacked(buffers, (self.module, "gate_up_shared"), dense.gate_proj.weight, dense.up_proj.weight),
             # decode: the absorbed form
             "in_proj": _stacked(buffers, (self.module, "in_proj"), query if a.q_lora_rank is None else a.q_a_proj.weight, kv_a),
             "w_uv_t": self.absorbed_weights()[1],
             # prefill: the ordinary form
             "q_up": q_up, "kv_a": kv_a, "kv_b": a.kv_b_proj.weight}
        eps = {"in": self.in_norm.variance_epsilon, "next": next_norm.variance_epsilon,
               "kv": a.kv_a_layernorm.variance_epsilon, "post": self.post_norm.variance_epsilon}
        if a.q_lora_rank is not None:
            w.update(q_b=_stacked(buffers, (self.module, "q_b"), query), q_norm=a.q_a_layernorm.weight, q_a=a.q_a_proj.weight)
            eps["q"] = a.q_a_layernorm.variance_epsilon
        moe = None
        if isinstance(self.mlp, _Experts):
            w.update(router=mlp.gate.weight, bias=mlp.gate.e_score_correction_bias,
                     gate_up=mlp.experts.gate_up_proj, expert_down=mlp.experts.down_proj)
            moe = (self.mlp.n_experts, self.mlp.kw)
        dims = (self.heads, self.nope, self.rope, self.v_dim, self.rank, self.scale,
                bool(getattr(config, "rope_interleave", False)), config.hidden_act, eps)
        return w, {"dims": dims, "moe": moe}

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, Dn, R] and W_UV^T [H, R, Dv]: views of kv_b_proj.weight [H*(Dn+Dv), R]."""
        w = self.kv_b.weight.view(self.heads, self.nope + self.v_dim, self.rank)
        return w[:, : self.nope], w[:, self.nope:].transpose(1, 2)

    def absorbed_query(self, weight: torch.Tensor) -> torch.Tensor:
        """The query projection with W_UK folded in (DeepSeek-V2's absorption): weight [H (Dn + Dr), in]
        of q_proj or q_b_proj -> [H (R + Dr), in], per head [W_UK,h^T W^C_h ; W^R_h], so that one GEMM gives
        [q^L_h ; q^R_h] with q^L_h = W_UK,h^T q^C_h. The product is taken in fp32 and rounded once. It holds
        (R + Dr) / (Dn + Dr) times the projection's parameters (3x for V3's shapes)."""
        q = weight.view(self.heads, self.nope + self.rope, -1)
        latent = torch.bmm(self.absorbed_weights()[0].transpose(1, 2).float(), q[:, : self.nope].float())
        return torch.cat((latent.to(weight.dtype), q[:, self.nope:]), dim=1).view(-1, weight.shape[1])


class V3Decoder:
    """Batched prefill and decode over ``slots`` sequences of at most ``max_len`` tokens each.

    Host-side state is the caller's (positions, which slots are active); the device state here is the latent
    cache and ``tokens`` [slots] (the next input token of each slot).
    """

    def __init__(self, model: nn.Module, *, slots: int, max_len: int):
        config = model.config
        rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
        if rope_type in ("dynamic", "longrope"):
            raise ValueError(f"rope_type {rope_type!r} depends on the sequence length; the V3 decoder precomputes "
                             "RoPE once per cache: use backend='generic'")
        self.model, self.config = model, config
        weight = model.lm_head.weight
        self.device, self.dtype, self.slots = weight.device, weight.dtype, slots
        self._stacked: dict = {}  # the fused path's stacked weights (``_Layer.fused``)
        self.sink: list | None = None  # expert choices of the MoE layers while recording (``record_routing``)
        self.bind()
        self.interleave = bool(getattr(config, "rope_interleave", False))
        first = self.layers[0]
        self.cache = LatentCache(layers=len(self.layers), slots=slots, max_len=max_len, kv_lora_rank=first.rank,
                                 rope_dim=first.rope, dtype=self.dtype, device=self.device)
        positions = torch.arange(max_len, device=self.device)[None]
        cos, sin = model.model.rotary_emb(torch.empty(0, device=self.device, dtype=self.dtype), positions)
        half = cos.shape[-1] // 2  # cos/sin = cat(f, f) per position: one angle per rotated pair
        self.cos, self.sin = cos[0, :, :half].float(), sin[0, :, :half].float()  # [max_len, Dr/2]
        self.tokens = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.rows = torch.arange(slots, device=self.device) * max_len  # first cache row of each slot
        self.span_range = torch.arange(max_len, device=self.device)

    def bind(self) -> None:
        """(Re)read the model's modules, e.g. after a wrapper replaced some or an optimizer step changed the
        weights (the cache is kept). On CPU the decode step's lm_head is a packed copy (``_packed_linear``)
        made here: call bind() after changing the weights (``RolloutEngine.generate`` does)."""
        base = self.model.model
        self.embed, self.final_norm, self.lm_head = base.embed_tokens, base.norm, _linear(self.model.lm_head)
        self.decode_head = _packed_linear(self.model.lm_head, self.slots) or self.lm_head
        self.layers = [_Layer(layer, self.config) for layer in base.layers[: self.config.num_hidden_layers]]
        for layer in self.layers:
            if hasattr(layer.mlp, "sink"):
                layer.mlp.sink = self.sink
        fast = self.device.type == "cuda" and self.dtype == torch.bfloat16 and self.sink is None
        self.fused = self.fused_layers() if fast else None
        # The Triton kernels (grpo.kernels) take the experts' SiLU and row-major bf16 weights (the fused
        # routing kernel also a bf16 router and power-of-two expert and group counts: ``decode_layer``).
        self.kernels = bool(self.fused) and kernels.AVAILABLE and self.config.hidden_act == "silu" and all(
            w[name].stride(-1) == 1 and w[name].dtype == torch.bfloat16
            for w, static in self.fused if static["moe"] for name in ("gate_up", "expert_down", "down"))

    def record_routing(self) -> None:
        """From now on keep every MoE layer's expert choices per processed token (``take_routes``). The
        module path records them: the fused layers, Triton kernels and CUDA graphs are not used."""
        self.sink = []
        self.bind()

    def take_routes(self) -> torch.Tensor:
        """The expert choices since the last call, [T, MoE layers, K] (T tokens of the last forward), on the host."""
        routes = torch.stack(self.sink, dim=1).to("cpu", torch.int16)
        self.sink.clear()
        return routes

    def fused_layers(self) -> list | None:
        """``_Layer.fused`` of every layer (each with the next one's input norm; the last with the final
        norm), or None when one of them has no fused form."""
        norms = [layer.in_norm for layer in self.layers[1:]] + [self.final_norm]
        fused = [layer.fused(self._stacked, norm) for layer, norm in zip(self.layers, norms)]
        return fused if all(fused) else None

    # ---- rotary ------------------------------------------------------------------------------------------
    def _rope(self, x: torch.Tensor, rotation: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``rope_pairs`` of x [..., T, heads, Dr] with rotation = (cos, sin) [T, Dr/2]."""
        cos, sin = rotation
        return rope_pairs(x, cos[:, None], sin[:, None], self.interleave)

    # ---- decode ------------------------------------------------------------------------------------------
    def decode(self, n: int, span: int) -> torch.Tensor:
        """One token for slots 0..n-1: input ``tokens[:n]`` at ``positions[:n]`` (every position < span).
        Writes their latents to the cache and returns logits [n, V]. Static shapes for given (n, span)."""
        pos = self.positions[:n]
        if self.fused:
            return self._decode_fused(n, span, pos)
        rotation = self.cos[pos], self.sin[pos]
        visible = self.span_range[:span] <= pos[:, None]
        mask = torch.zeros(n, 1, span, dtype=self.dtype, device=self.device).masked_fill_(~visible[:, None], float("-inf"))
        write_rows = self.rows[:n] + pos
        x = self.embed(self.tokens[:n])
        for i, layer in enumerate(self.layers):
            x = x + self._attend_decode(layer, self.cache.data[i], _rms(x, layer.in_norm), rotation, mask, write_rows, span)
            x = x + layer.mlp(_rms(x, layer.post_norm))
        return self.decode_head(_rms(x, self.final_norm))

    def _decode_fused(self, n: int, span: int, pos: torch.Tensor) -> torch.Tensor:
        cos, sin, latents = self.cos[pos], self.sin[pos], []
        x = self.embed(self.tokens[:n])
        h = _rms(x, self.layers[0].in_norm)  # each layer returns the next one's normed input
        # Batch and span are the only dynamic sizes: every other size and every int argument stays a constant
        # (symbolic model sizes broke inductor's code generation), and a second model with other sizes gets
        # its own static variants instead of turning the first one's sizes symbolic. Variants per model:
        # dense / MoE layer x batch 1 / more x span < / = max_len (the cache view's strides); with the Triton
        # kernels, dense / MoE x MoE block size (16, 32, 64) x batch 1 / more (they read positions < pos
        # of the whole cache, so the span does not matter).
        block = kernels.moe_block(n * self.config.num_experts_per_tok, self.config.n_routed_experts) if self.kernels else 0
        span = self.cache.max_len if self.kernels else span
        with torch._dynamo.config.patch(automatic_dynamic_shapes=False, recompile_limit=64):
            for i, (w, static) in enumerate(self.fused):
                keys = self.cache.data[i, :n, :span]
                for t in (x, h, pos, cos, sin, keys):
                    torch._dynamo.maybe_mark_dynamic(t, 0)
                torch._dynamo.maybe_mark_dynamic(keys, 1)
                x, h, latent = _compiled_layer(x, h, keys, pos, cos, sin, w, **static,
                                               block=block if static["moe"] else min(block, 1))
                latents.append(latent)
        cache = self.cache.data.view(len(self.layers), -1, self.cache.data.shape[-1])
        cache.index_copy_(1, self.rows[:n] + pos, torch.stack(latents))
        return self.decode_head(h)  # h: the last layer's output under the final norm

    def _attend_decode(self, layer: _Layer, cache: torch.Tensor, h, rotation, mask, write_rows, span) -> torch.Tensor:
        n, heads, rank = h.shape[0], layer.heads, layer.rank
        q = layer.q(h).view(n, heads, layer.nope + layer.rope)
        kv = layer.kv_a(h)
        latent = torch.cat((_rms(kv[:, :rank], layer.kv_norm), self._rope(kv[:, None, rank:], rotation)[:, 0]), dim=-1)
        cache.view(-1, cache.shape[-1]).index_copy_(0, write_rows, latent)
        w_uk, w_uv_t = layer.absorbed_weights()
        q_latent = torch.bmm(q[..., : layer.nope].transpose(0, 1), w_uk)  # [H, n, R]
        q_full = torch.cat((q_latent.transpose(0, 1), self._rope(q[..., layer.nope:], rotation)), dim=-1)  # [n, H, R+Dr]
        keys = cache[:n, :span]  # [n, span, R+Dr]
        scores = torch.baddbmm(mask, q_full, keys.transpose(1, 2), alpha=layer.scale)  # [n, H, span]
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(h.dtype)
        out_latent = torch.bmm(probs, keys[..., :rank])  # [n, H, R]
        out = torch.bmm(out_latent.transpose(0, 1), w_uv_t)  # [H, n, Dv]
        return layer.o(out.transpose(0, 1).reshape(n, heads * layer.v_dim))

    # ---- prefill -----------------------------------------------------------------------------------------
    def prefill(self, prompts: list[list[int]], slots: list[list[int]]) -> torch.Tensor:
        """Run each prompt once and write its latents to every slot in ``slots[i]`` (positions 0..len-1).
        Returns the logits at each prompt's last token [len(prompts), V]."""
        lens = [len(p) for p in prompts]
        batch, width = len(prompts), max(lens)
        ids = torch.zeros(batch, width, dtype=torch.long)
        src, dst = [], []
        for b, (p, targets) in enumerate(zip(prompts, slots)):
            ids[b, : len(p)] = torch.tensor(p)
            for s in targets:
                src.extend(range(b * width, b * width + len(p)))
                dst.extend(range(s * self.cache.max_len, s * self.cache.max_len + len(p)))
        ids = ids.to(self.device)
        src = torch.tensor(src, dtype=torch.long, device=self.device)
        dst = torch.tensor(dst, dtype=torch.long, device=self.device)
        rotation = self.cos[:width], self.sin[:width]
        x = self.embed(ids)
        if self.fused:  # as for decode: batch and width dynamic, every other size static
            with torch._dynamo.config.patch(automatic_dynamic_shapes=False, recompile_limit=64):
                for i, (w, static) in enumerate(self.fused):
                    for t, dims in ((x, (0, 1)), *((r, (0,)) for r in rotation)):
                        for d in dims:
                            torch._dynamo.maybe_mark_dynamic(t, d)
                    x, latent = _compiled_prefill(x, *rotation, w, **static)
                    self.cache.data[i].view(-1, latent.shape[-1]).index_copy_(0, dst, latent.view(batch * width, -1)[src])
            x = x.view(batch * width, -1)
        else:
            x = x.view(batch * width, -1)
            for i, layer in enumerate(self.layers):
                x = x + self._attend_prefill(layer, self.cache.data[i], _rms(x, layer.in_norm), batch, width, rotation, src, dst)
                x = x + layer.mlp(_rms(x, layer.post_norm))
        last = torch.tensor([b * width + n - 1 for b, n in enumerate(lens)], device=self.device)
        return self.lm_head(_rms(x[last], self.final_norm))

    def _attend_prefill(self, layer: _Layer, cache, h, batch, width, rotation, src, dst) -> torch.Tensor:
        heads, rank, nope = layer.heads, layer.rank, layer.nope
        q = layer.q(h).view(batch, width, heads, nope + layer.rope)
        kv = layer.kv_a(h).view(batch, width, -1)
        c = _rms(kv[..., :rank], layer.kv_norm)
        k_rope = self._rope(kv[..., None, rank:], rotation)  # [B, P, 1, Dr]
        latent = torch.cat((c, k_rope[:, :, 0]), dim=-1).view(batch * width, -1)
        cache.view(-1, cache.shape[-1]).index_copy_(0, dst, latent[src])
        kv_up = layer.kv_b(c).view(batch, width, heads, nope + layer.v_dim)
        keys = torch.cat((kv_up[..., :nope], k_rope.expand(-1, -1, heads, -1)), dim=-1)
        queries = torch.cat((q[..., :nope], self._rope(q[..., nope:], rotation)), dim=-1)
        out = F.scaled_dot_product_attention(queries.transpose(1, 2), keys.transpose(1, 2), kv_up[..., nope:].transpose(1, 2),
                                             is_causal=True, scale=layer.scale)  # [B, H, P, Dv]
        return layer.o(out.transpose(1, 2).reshape(batch * width, heads * layer.v_dim))


class CudaGraphStep:
    """One decode step (``V3Decoder.decode``, then ``sampler``, then the sampled tokens become the next inputs)
    replayed from CUDA graphs, one per (batch bucket, span bucket); only the uniforms are drawn outside.

    ``sampler(logits [b, V], uniform [b]) -> (tokens [b], logprobs [b])`` must be free of host syncs.
    Batch buckets are powers of two up to the slot count (and the slot count); spans are rounded up to a
    multiple of ``span_step`` (one span, the cache length, with the decoder's Triton kernels). Rows
    n..bucket-1 are free slots: they are decoded at position 0 and ignored
    (their cache rows are rewritten by the prefill of their next sequence before being read). Graphs share
    one memory pool, so the returned tensors are only valid until the next call. A step is idempotent for
    fixed inputs (it rewrites the same latents), so the warm-up run before each capture is harmless.
    Parameters must keep their storage (in-place optimizer updates are fine); after replacing parameter
    tensors, call the engine's ``release()``.
    """

    def __init__(self, decoder: V3Decoder, sampler, generator: torch.Generator, span_step: int = 64):
        self.decoder, self.sampler, self.generator, self.span_step = decoder, sampler, generator, span_step
        slots = decoder.tokens.shape[0]
        self.buckets = sorted({2**i for i in range(slots.bit_length()) if 2**i < slots} | {slots})
        self.uniform = torch.zeros(slots, device=decoder.device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    def __call__(self, n: int, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [n] and logprobs [n] sampled for slots 0..n-1 (attention over positions < span)."""
        batch = next(b for b in self.buckets if b >= n)
        max_len = self.decoder.cache.max_len
        # the Triton kernels read positions < pos whatever the span: then one graph per batch bucket
        span = max_len if self.decoder.kernels else min(max_len, -(-span // self.span_step) * self.span_step)
        self.decoder.positions[n:batch] = 0
        torch.rand(batch, generator=self.generator, out=self.uniform[:batch])
        if (batch, span) not in self.graphs:
            self.graphs[batch, span] = self._capture(batch, span)
        graph, tokens, logprobs = self.graphs[batch, span]
        graph.replay()
        return tokens[:n], logprobs[:n]

    def _step(self, batch: int, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, logprobs = self.sampler(self.decoder.decode(batch, span), self.uniform[:batch])
        self.decoder.tokens[:batch] = tokens
        return tokens, logprobs

    def _capture(self, batch: int, span: int):
        inputs = self.decoder.tokens[:batch].clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._step(batch, span)
        torch.cuda.current_stream().wait_stream(stream)
        self.decoder.tokens[:batch] = inputs  # the warm-up consumed them
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            tokens, logprobs = self._step(batch, span)
        return graph, tokens, logprobs
