"""Triton kernels for the V3 decode step on CUDA (``grpo.engine.layer.decode_layer`` with the Triton op table
of ``grpo.engine.ops``): MLA attention over the latent cache, routing (router GEMM + group-limited top-k), the
routed experts as two fused MoE GEMMs, and the sampler's row top-k (``grpo.sampling``). Optional: ``AVAILABLE``
is False without Triton (or without CUDA), and the decoder and sampler then run the same math as torch ops. Each
kernel is a ``torch.library.custom_op``, so the compiled decode layer calls it as one opaque op; tests check
each against a torch reference (tests/grpo/test_kernels.py; on a CPU also under TRITON_INTERPRET=1).

``mla_decode`` (absorbed MLA, m new tokens per sequence at positions pos..pos+m-1; H heads, latent rank R,
rope dim Dr), for new token i and head h:

    s_ih,t = scale * [q^L_ih ; q^R_ih] . keys_t    for cached positions t < pos, and t = own latents 0..i
    out_ih = sum_t softmax_t(s_ih)_t * keys_t[:R]   [n, m, H, R]

one program per sequence and 16 (token, head) rows, so each cached latent is read once for those rows (the torch
form reads the cache twice: scores, then probs @ latents); when m H is 17..32 (v3-mini's verify step: m = 2 x 16
heads) and there are at least ``MLA_WIDE_FROM`` sequences, 32 rows a program: the cache is read once per sequence,
not twice; with fewer sequences the GPU's multiprocessors would go idle (H100, 256-position cache: 16.4 vs 20.4
us at 32 sequences, 33.1 vs 27.9 us at 200, 66.3 vs 47.7 us at 256 x 512 positions). Online softmax in fp32, the
own latents first, then blocks of cached positions.
Departure from the torch path: the scores stay in fp32 (the torch path rounds q.k to bf16 first).

``moe_up`` / ``moe_down`` (routed experts; token-expert pairs m = (t, k) of expert e_m, weight w_m):

    a_m = silu(W_gate[e_m] h_t) * (W_up[e_m] h_t)      [pairs, I]    (``moe_up``, bf16 out)
    y_m = w_m * W_down[e_m] a_m                         [n*K, D] fp32 (``moe_down``, in pair order)

The shared expert (intermediate size c I) rides along as experts E..E+c-1 of every token with weight 1, each
one I-column slice of it, so the same two launches compute routed and shared experts.
The pairs are laid out by ``moe_schedule``: grouped by expert, each expert's rows padded to a multiple of
the block size, so every block of rows has one expert and a program multiplies its rows by one weight tile
(vLLM's fused-MoE layout). The block size is chosen so that at decode most experts fill one block, and each
expert's weights are read about once per step. The activation is applied in fp32 before the one rounding
(the torch path rounds the two GEMM outputs to bf16 first). ``moe_schedule`` is the torch form of the layout
(runs anywhere); ``moe_schedule_kernel`` gives the same tensors in one launch.

``route``: the router GEMM (fp32 accumulation of exact bf16 products) and ``grpo.moe.route(...,
by_argmax=True)``, 16 tokens per program. ``topk_indices``: the k largest entries of each row by bisection
on the bits of the k-th value (one program per row).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

AVAILABLE = triton is not None and torch.cuda.is_available()
# Launch parameters, picked by timing block sizes, warps and pipeline stages on one H200 at v3-mini shapes
# (batch 64 and 256); ``moe_up``'s per MoE row block (BM): with 16-row blocks (v3-mini at batch 64, v3-16b at
# 128) 128 x 128 tiles ran 5-11% faster on an H100 (v3-16b 281 -> 266 us a layer, v3-mini 54 -> 48 us); with
# 64-row blocks they exceed the shared memory.
MLA_CONFIG = dict(BS=64, num_warps=4, num_stages=2)
MLA_WIDE_FROM = 128  # sequences from which 17..32 (token, head) rows share one program (module docstring)
MOE_UP_CONFIG = {16: dict(BN=128, BK=128, num_warps=4, num_stages=3), 32: dict(BN=64, BK=64, num_warps=4, num_stages=3),
                 64: dict(BN=64, BK=64, num_warps=4, num_stages=3)}
MOE_DOWN_CONFIG = dict(BN=128, BK=128, num_warps=4, num_stages=3)
ROUTE_CONFIG = dict(BK=256, num_warps=2, num_stages=3)
TOPK_MAX_COLUMNS = 4096  # ``topk_indices`` holds a whole row in registers
SCHEDULE_MAX_PAIRS = 16384  # ``moe_schedule_kernel`` holds every pair's expert in each program's registers


def _pow2(x: int, least: int = 16) -> int:
    return max(least, 1 << (x - 1).bit_length())


def moe_block(pairs: int, n_experts: int) -> int:
    """Rows per block for ``pairs`` token-expert pairs: the mean rows per expert rounded up to a power of
    two, between 16 and 64 (at least one full block for most experts; a tile the tensor cores take)."""
    return min(64, _pow2(-(-pairs // n_experts)))


def moe_blocks(pairs: int, n_experts: int, block: int) -> int:
    """Blocks of ``block`` rows that any routing of ``pairs`` pairs over ``n_experts`` fills at most:
    ceil((pairs + E (block - 1)) / block) (each expert pads fewer than ``block`` rows)."""
    return (pairs + n_experts * (block - 1) + block - 1) // block


def moe_schedule(idx: torch.Tensor, n_experts: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block layout of the token-expert pairs. idx [n, K] expert of each pair (pair m = t * K + k).

    Returns pairs [blocks * block] (the pair in each row, -1 in padding rows; within an expert in pair
    order) and block_expert [blocks] (the expert of each block; n_experts for unused blocks), with
    blocks = ``moe_blocks(n K, E, block)``, the most any routing needs. Counting, no sort: a few
    fused kernels under torch.compile, no host sync.
    """
    flat = idx.reshape(-1)
    m = flat.shape[0]
    onehot = F.one_hot(flat, n_experts)  # [M, E]
    counts = onehot.sum(dim=0)
    padded = (counts + block - 1) // block * block
    ends = padded.cumsum(dim=0)
    rows = ends[flat] - padded[flat] + (onehot.cumsum(dim=0) * onehot).sum(dim=1) - 1
    blocks = moe_blocks(m, n_experts, block)
    pairs = torch.full((blocks * block,), -1, dtype=flat.dtype, device=flat.device)
    pairs = pairs.scatter(0, rows, torch.arange(m, device=flat.device))
    block_expert = (torch.arange(blocks, device=flat.device)[:, None] * block >= ends).sum(dim=1)
    return pairs, block_expert


if triton is not None:

    @triton.jit
    def _mla_decode_kernel(q_ptr, qr_ptr, keys_ptr, own_ptr, pos_ptr, out_ptr, scale,
                           s_qn, s_qm, s_qh, s_rn, s_rm, s_rh, s_kn, s_ks, s_own, s_om, s_on, s_oq, s_oh,
                           M: tl.constexpr, H: tl.constexpr, R: tl.constexpr, DR: tl.constexpr,
                           HB: tl.constexpr, RB: tl.constexpr, DB: tl.constexpr, BS: tl.constexpr):
        n = tl.program_id(0)
        ws, rs, ds = tl.program_id(1) * HB + tl.arange(0, HB), tl.arange(0, RB), tl.arange(0, DB)
        wm, rm, dm = ws < M * H, rs < R, ds < DR
        qi, hs = ws // H, ws % H  # row w: query (new token) qi, head hs
        q_lat = tl.load(q_ptr + n * s_qn + qi[:, None] * s_qm + hs[:, None] * s_qh + rs[None, :],
                        mask=wm[:, None] & rm[None, :], other=0.0)
        q_rope = tl.load(qr_ptr + n * s_rn + qi[:, None] * s_rm + hs[:, None] * s_rh + ds[None, :],
                         mask=wm[:, None] & dm[None, :], other=0.0)
        top = tl.full((HB,), float("-inf"), tl.float32)
        total = tl.zeros((HB,), tl.float32)
        acc = tl.zeros((HB, RB), tl.float32)
        for j in tl.static_range(M):  # the new tokens' own latents, causal among them (token 0 is seen by all)
            own_c = tl.load(own_ptr + n * s_own + j * s_om + rs, mask=rm, other=0.0)
            own_r = tl.load(own_ptr + n * s_own + j * s_om + R + ds, mask=dm, other=0.0)
            own_s = (tl.sum(q_lat.to(tl.float32) * own_c[None, :].to(tl.float32), axis=1)
                     + tl.sum(q_rope.to(tl.float32) * own_r[None, :].to(tl.float32), axis=1)) * scale  # [HB]
            own_s = tl.where(qi >= j, own_s, float("-inf"))
            new_top = tl.maximum(top, own_s)
            alpha, p_own = tl.exp(top - new_top), tl.exp(own_s - new_top)
            total = total * alpha + p_own
            acc = acc * alpha[:, None] + p_own[:, None] * own_c[None, :].to(tl.float32)
            top = new_top
        length = tl.load(pos_ptr + n)
        k_row = keys_ptr + n * s_kn
        for start in range(0, length, BS):
            ss = start + tl.arange(0, BS)
            valid = ss < length
            kc = tl.load(k_row + ss[:, None] * s_ks + rs[None, :], mask=valid[:, None] & rm[None, :], other=0.0)
            kr = tl.load(k_row + ss[:, None] * s_ks + R + ds[None, :], mask=valid[:, None] & dm[None, :], other=0.0)
            s = (tl.dot(q_lat, tl.trans(kc)) + tl.dot(q_rope, tl.trans(kr))) * scale  # [HB, BS] fp32
            s = tl.where(valid[None, :], s, float("-inf"))
            new_top = tl.maximum(top, tl.max(s, axis=1))
            alpha = tl.exp(top - new_top)
            p = tl.exp(s - new_top[:, None])
            total = total * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(kc.dtype), kc)
            top = new_top
        out = acc / total[:, None]
        tl.store(out_ptr + n * s_on + qi[:, None] * s_oq + hs[:, None] * s_oh + rs[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=wm[:, None] & rm[None, :])

    @triton.jit
    def _moe_up_kernel(h_ptr, w_ptr, s_ptr, pairs_ptr, block_expert_ptr, out_ptr, D, I, SI, n_routed, n_experts,
                       s_hn, s_we, s_wn, s_sn, s_on,
                       TOP_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        b, j = tl.program_id(0), tl.program_id(1)
        e = tl.load(block_expert_ptr + b)
        if e < n_experts:
            rows = b * BM + tl.arange(0, BM)
            pair = tl.load(pairs_ptr + rows)
            real = pair >= 0
            tok = tl.where(real, pair // TOP_K, 0)
            cols = j * BN + tl.arange(0, BN)
            cm = cols < I
            ks = tl.arange(0, BK)
            if e < n_routed:  # gate rows, then up rows, of expert e
                g_rows = w_ptr + e.to(tl.int64) * s_we
                u_rows = g_rows + I * s_wn
                s_n = s_wn
            else:  # the shared expert's slice e - n_routed: gate rows of it, up rows SI further
                g_rows = s_ptr + (e - n_routed).to(tl.int64) * I * s_sn
                u_rows = g_rows + SI * s_sn
                s_n = s_sn
            gate = tl.zeros((BM, BN), tl.float32)
            up = tl.zeros((BM, BN), tl.float32)
            for k in range(0, D, BK):
                km = (k + ks) < D
                a = tl.load(h_ptr + tok[:, None] * s_hn + (k + ks)[None, :], mask=real[:, None] & km[None, :], other=0.0)
                wg = tl.load(g_rows + cols[:, None] * s_n + (k + ks)[None, :], mask=cm[:, None] & km[None, :], other=0.0)
                wu = tl.load(u_rows + cols[:, None] * s_n + (k + ks)[None, :], mask=cm[:, None] & km[None, :], other=0.0)
                gate = tl.dot(a, tl.trans(wg), gate)
                up = tl.dot(a, tl.trans(wu), up)
            act = gate * tl.sigmoid(gate) * up
            tl.store(out_ptr + rows[:, None] * s_on + cols[None, :], act.to(out_ptr.dtype.element_ty), mask=cm[None, :])

    @triton.jit
    def _moe_down_kernel(x_ptr, w_ptr, s_ptr, pairs_ptr, block_expert_ptr, weight_ptr, out_ptr, D, I, n_routed,
                         n_experts, s_xn, s_we, s_wn, s_sn, s_on,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        b, j = tl.program_id(0), tl.program_id(1)
        e = tl.load(block_expert_ptr + b)
        if e < n_experts:
            rows = b * BM + tl.arange(0, BM)
            pair = tl.load(pairs_ptr + rows)
            real = pair >= 0
            cols = j * BN + tl.arange(0, BN)
            cm = cols < D
            ks = tl.arange(0, BK)
            if e < n_routed:
                w_rows = w_ptr + e.to(tl.int64) * s_we
                s_n = s_wn
            else:  # columns (e - n_routed) I.. of the shared expert's down projection
                w_rows = s_ptr + (e - n_routed).to(tl.int64) * I
                s_n = s_sn
            acc = tl.zeros((BM, BN), tl.float32)
            for k in range(0, I, BK):
                km = (k + ks) < I
                a = tl.load(x_ptr + rows[:, None] * s_xn + (k + ks)[None, :], mask=km[None, :], other=0.0)
                w = tl.load(w_rows + cols[:, None] * s_n + (k + ks)[None, :], mask=cm[:, None] & km[None, :], other=0.0)
                acc = tl.dot(a, tl.trans(w), acc)
            acc = acc * tl.load(weight_ptr + pair, mask=real, other=0.0)[:, None]
            tl.store(out_ptr + pair[:, None] * s_on + cols[None, :], acc, mask=real[:, None] & cm[None, :])

    @triton.jit
    def _moe_schedule_kernel(idx_ptr, pairs_ptr, block_expert_ptr, M, n_experts, n_blocks,
                             BLOCK: tl.constexpr, MP: tl.constexpr, EP: tl.constexpr):
        e = tl.program_id(0)
        ms = tl.arange(0, MP)
        ids = tl.load(idx_ptr + ms, mask=ms < M, other=n_experts).to(tl.int32)
        es = tl.arange(0, EP)
        counts = tl.histogram(ids, EP)
        padded = tl.where(es < n_experts, (counts + BLOCK - 1) // BLOCK * BLOCK, 0)
        start = tl.sum(tl.where(es < e, padded, 0), axis=0)
        count = tl.sum(tl.where(es == e, counts, 0), axis=0)
        mine = tl.sum(tl.where(es == e, padded, 0), axis=0)
        hit = ids == e
        tl.store(pairs_ptr + start + tl.cumsum(hit.to(tl.int32), axis=0) - 1, ms.to(tl.int64), mask=hit)
        rs = tl.arange(0, BLOCK)
        tl.store(pairs_ptr + start + count + rs, tl.full((BLOCK,), -1, tl.int64), mask=rs < mine - count)
        for b in range(start // BLOCK, (start + mine) // BLOCK):
            tl.store(block_expert_ptr + b, e.to(tl.int64))
        if e == n_experts - 1:  # the unused blocks after the last expert's
            for b in range((start + mine) // BLOCK, n_blocks):
                tl.store(pairs_ptr + b * BLOCK + rs, tl.full((BLOCK,), -1, tl.int64))
                tl.store(block_expert_ptr + b, tl.full((), n_experts, tl.int64))

    @torch.library.custom_op("grpo::moe_schedule_kernel", mutates_args=())
    def moe_schedule_kernel(idx: torch.Tensor, n_experts: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``moe_schedule`` (the same outputs) in one launch: program e counts every expert's pairs
        (a histogram), places expert e's pairs, padding rows and blocks."""
        m = idx.numel()
        blocks = moe_blocks(m, n_experts, block)
        pairs = torch.empty(blocks * block, dtype=torch.int64, device=idx.device)
        block_expert = torch.empty(blocks, dtype=torch.int64, device=idx.device)
        _moe_schedule_kernel[(n_experts,)](idx, pairs, block_expert, m, n_experts, blocks, BLOCK=block,
                                           MP=_pow2(m), EP=_pow2(n_experts + 1), num_warps=4)
        return pairs, block_expert

    @moe_schedule_kernel.register_fake
    def _(idx, n_experts, block):
        blocks = moe_blocks(idx.numel(), n_experts, block)
        return idx.new_empty(blocks * block), idx.new_empty(blocks)

    @triton.jit
    def _route_kernel(h_ptr, router_ptr, bias_ptr, weight_ptr, idx_ptr, N, D, scale, s_h, s_r,
                      E: tl.constexpr, G: tl.constexpr, TOPG: tl.constexpr, K: tl.constexpr, SHARED: tl.constexpr,
                      KP: tl.constexpr, NORM: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                      LOGITS: tl.constexpr):
        ts = tl.program_id(0) * BT + tl.arange(0, BT)
        tm = ts < N
        es = tl.arange(0, E)
        cols = tl.arange(0, BK)
        if LOGITS:  # h_ptr holds the router logits [N, E]
            logits = tl.load(h_ptr + ts[:, None] * s_h + es[None, :], mask=tm[:, None], other=0.0)
        else:
            logits = tl.zeros((BT, E), tl.float32)
            for k in range(0, D, BK):
                cm = (k + cols) < D
                a = tl.load(h_ptr + ts[:, None] * s_h + (k + cols)[None, :], mask=tm[:, None] & cm[None, :], other=0.0)
                w = tl.load(router_ptr + es[:, None] * s_r + (k + cols)[None, :], mask=cm[None, :], other=0.0)
                if E >= 16:
                    logits = tl.dot(a, tl.trans(w), logits)
                else:  # below the tensor cores' smallest tile
                    logits += tl.sum(a[:, None, :].to(tl.float32) * w[None, :, :].to(tl.float32), axis=2)
        scores = tl.sigmoid(logits)
        choice = scores + tl.load(bias_ptr + es)[None, :]
        if TOPG < G:
            grouped = tl.reshape(choice, (BT, G, E // G))
            first = tl.argmax(grouped, axis=2)
            inner = tl.arange(0, E // G)[None, None, :]
            group_score = tl.max(grouped, axis=2) + tl.max(tl.where(inner == first[:, :, None], float("-inf"), grouped), axis=2)
            gs = tl.arange(0, G)[None, :]
            kept = tl.zeros((BT, G), tl.int32)
            for _ in tl.static_range(TOPG):
                hit = gs == tl.argmax(group_score, axis=1)[:, None]
                kept = tl.where(hit, 1, kept)
                group_score = tl.where(hit, float("-inf"), group_score)
            kept = tl.reshape(tl.broadcast_to(kept[:, :, None], (BT, G, E // G)), (BT, E))
            choice = tl.where(kept != 0, choice, float("-inf"))
        ks = tl.arange(0, KP)[None, :]
        idx = tl.zeros((BT, KP), tl.int32)
        weight = tl.zeros((BT, KP), tl.float32)
        for k in tl.static_range(K):
            pick = tl.argmax(choice, axis=1)
            hit = es[None, :] == pick[:, None]
            idx = tl.where(ks == k, pick[:, None], idx)
            weight = tl.where(ks == k, tl.sum(tl.where(hit, scores, 0.0), axis=1)[:, None], weight)
            choice = tl.where(hit, float("-inf"), choice)
        if NORM:
            weight = weight / (tl.sum(weight, axis=1)[:, None] + 1e-20)
        extra = (ks >= K) & (ks < K + SHARED)
        idx = tl.where(extra, E + ks - K, idx)
        weight = tl.where(extra, 1.0, weight * scale)
        out = ts[:, None] * (K + SHARED) + ks
        tl.store(idx_ptr + out, idx.to(tl.int64), mask=tm[:, None] & (ks < K + SHARED))
        tl.store(weight_ptr + out, weight, mask=tm[:, None] & (ks < K + SHARED))

    @torch.library.custom_op("grpo::route", mutates_args=())
    def route(h: torch.Tensor, router: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int, top_k: int,
              norm: bool, scale: float, shared: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The router GEMM and ``grpo.moe.route(h @ router^T, bias, ..., by_argmax=True)`` in one launch:
        (weights [N, K] fp32, indices [N, K] int64) from h [N, D] and router [E, D] (E a power of two). A bf16
        router's logits accumulate in fp32 over exact bf16 products inside the kernel (transformers upcasts both
        to fp32 first: the same products, another summation order); an fp32 router's (transformers keeps a
        loaded model's router weight in fp32) are transformers' own fp32 GEMM, F.linear(h.float(), router), and
        the kernel only selects (an fp32 dot in the kernel was slower: 16.8 vs 15.1 ms per v3-16b decode step
        at batch 128 on an H100). The same selection and order (argmax rounds, ties to the lower index); sigmoid
        in Triton's arithmetic (within an ulp of torch's). ``shared`` more columns per token name experts
        E..E+shared-1 with weight 1 (the shared expert's slices, ``moe_up``)."""
        n, dim = h.shape
        top = router.shape[0]
        weights = torch.empty(n, top_k + shared, dtype=torch.float32, device=h.device)
        idx = torch.empty(n, top_k + shared, dtype=torch.int64, device=h.device)
        logits = router.dtype == torch.float32
        src = F.linear(h.float(), router) if logits else h
        if n:
            _route_kernel[(triton.cdiv(n, 16),)](
                src, router, bias, weights, idx, n, dim, scale, src.stride(0), router.stride(0), E=top, G=n_group,
                TOPG=topk_group, K=top_k, SHARED=shared, KP=_pow2(top_k + shared, 1), NORM=norm, BT=16,
                LOGITS=logits, **ROUTE_CONFIG)
        return weights, idx

    @route.register_fake
    def _(h, router, bias, n_group, topk_group, top_k, norm, scale, shared=0):
        n = h.shape[0]
        return (torch.empty(n, top_k + shared, device=h.device),
                torch.empty(n, top_k + shared, dtype=torch.int64, device=h.device))

    @triton.jit
    def _topk_kernel(x_ptr, out_ptr, N, k, s_x, s_o, NP: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, NP)
        x = tl.load(x_ptr + row * s_x + cols, mask=cols < N, other=float("-inf"))
        bits = x.to(tl.int32, bitcast=True)
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # an int32 with the float order
        lo = tl.full((), -2147483648, tl.int64)  # the largest T with #(key >= T) >= k, by bisection
        hi = tl.full((), 2147483647, tl.int64)
        for _ in range(32):
            mid = lo + (hi - lo + 1) // 2
            enough = tl.sum((key >= mid).to(tl.int32), axis=0) >= k
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid - 1)
        above, tie = key > lo, key == lo
        keep = above | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= k - tl.sum(above.to(tl.int32), axis=0)))
        tl.store(out_ptr + row * s_o + tl.cumsum(keep.to(tl.int32), axis=0) - 1, cols, mask=keep)

    @torch.library.custom_op("grpo::topk_indices", mutates_args=())
    def topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
        """Column indices [B, k] (int64) of the k largest entries of each row of x [B, N] fp32 (N at most
        ``TOPK_MAX_COLUMNS``), in column order (ties at the k-th value: the lower columns). One program per
        row finds the k-th largest value by bisection on its bits (32 counting passes over the row in
        registers), then writes the columns at or above it; torch.topk takes about 30 us at [256, 2000]."""
        out = torch.empty(x.shape[0], k, dtype=torch.int64, device=x.device)
        width = _pow2(x.shape[1])
        if x.shape[0]:
            _topk_kernel[(x.shape[0],)](x, out, x.shape[1], k, x.stride(0), out.stride(0), NP=width,
                                        num_warps=4 if width <= 1024 else 8)
        return out

    @topk_indices.register_fake
    def _(x, k):
        return torch.empty(x.shape[0], k, dtype=torch.int64, device=x.device)

    @torch.library.custom_op("grpo::mla_decode", mutates_args=())
    def mla_decode(q_latent: torch.Tensor, q_rope: torch.Tensor, keys: torch.Tensor, own: torch.Tensor,
                   pos: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of m new tokens per sequence, queries [q_latent ; q_rope] ([n, m, H, R] and [n, m, H, Dr],
        any strides with a unit last one), over keys [n, S, R+Dr] (positions < pos [n]) and the new tokens' own
        latents own [n, m, R+Dr], token i seeing own latents 0..i; returns [n, m, H, R] in q_latent's dtype
        (module docstring; ``grpo.engine.layer.attend``'s arithmetic)."""
        n, m, heads, rank = q_latent.shape
        rope = q_rope.shape[-1]
        out = q_latent.new_empty(n, m, heads, rank)
        rows = 32 if 16 < m * heads <= 32 and n >= MLA_WIDE_FROM else 16
        if n:
            _mla_decode_kernel[(n, triton.cdiv(m * heads, rows))](
                q_latent, q_rope, keys, own, pos, out, scale, q_latent.stride(0), q_latent.stride(1),
                q_latent.stride(2), q_rope.stride(0), q_rope.stride(1), q_rope.stride(2), keys.stride(0),
                keys.stride(1), own.stride(0), own.stride(1), out.stride(0), out.stride(1), out.stride(2),
                M=m, H=heads, R=rank, DR=rope, HB=rows, RB=_pow2(rank), DB=_pow2(rope), **MLA_CONFIG)
        return out

    @mla_decode.register_fake
    def _(q_latent, q_rope, keys, own, pos, scale):
        return torch.empty_like(q_latent, memory_format=torch.contiguous_format)

    @torch.library.custom_op("grpo::moe_up", mutates_args=())
    def moe_up(h: torch.Tensor, gate_up: torch.Tensor, shared_gate_up: torch.Tensor, pairs: torch.Tensor,
               block_expert: torch.Tensor, per_token: int) -> torch.Tensor:
        """silu(gate) * up of every row of the ``moe_schedule`` layout: h [n, D], gate_up [E, 2I, D]
        (transformers' fused layout) for experts e < E, shared_gate_up [2 SI, D] (the shared expert's gate
        rows, then its up rows) for experts E + j, j < SI / I (its columns jI..(j+1)I - 1); pair m is token
        m // per_token. Returns [rows, I] in h's dtype (padding rows are 0)."""
        n_routed, inter2, dim = gate_up.shape
        block = pairs.shape[0] // block_expert.shape[0]
        shared_inter = shared_gate_up.shape[0] // 2
        out = h.new_empty(pairs.shape[0], inter2 // 2)
        config = MOE_UP_CONFIG[block]
        _moe_up_kernel[(block_expert.shape[0], triton.cdiv(inter2 // 2, config["BN"]))](
            h, gate_up, shared_gate_up, pairs, block_expert, out, dim, inter2 // 2, shared_inter, n_routed,
            n_routed + shared_inter // (inter2 // 2), h.stride(0), gate_up.stride(0), gate_up.stride(1),
            shared_gate_up.stride(0), out.stride(0), TOP_K=per_token, BM=block, **config)
        return out

    @moe_up.register_fake
    def _(h, gate_up, shared_gate_up, pairs, block_expert, per_token):
        return h.new_empty(pairs.shape[0], gate_up.shape[1] // 2)

    @torch.library.custom_op("grpo::moe_down", mutates_args=())
    def moe_down(x: torch.Tensor, down: torch.Tensor, shared_down: torch.Tensor, pairs: torch.Tensor,
                 block_expert: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """w_m * W_down[e_m] x_row for each pair m: x [rows, I] (``moe_up``'s output), down [E, D, I] for
        experts e < E, shared_down [D, SI] for experts E + j (its columns jI..(j+1)I - 1), weights [pairs]
        fp32 in pair order. Returns [pairs, D] fp32 in pair order."""
        n_routed, dim, inter = down.shape
        block = pairs.shape[0] // block_expert.shape[0]
        out = torch.empty(weights.shape[0], dim, device=x.device, dtype=torch.float32)
        _moe_down_kernel[(block_expert.shape[0], triton.cdiv(dim, MOE_DOWN_CONFIG["BN"]))](
            x, down, shared_down, pairs, block_expert, weights, out, dim, inter, n_routed,
            n_routed + shared_down.shape[1] // inter, x.stride(0), down.stride(0), down.stride(1),
            shared_down.stride(0), out.stride(0), BM=block, **MOE_DOWN_CONFIG)
        return out

    @moe_down.register_fake
    def _(x, down, shared_down, pairs, block_expert, weights):
        return torch.empty(weights.shape[0], down.shape[1], device=x.device, dtype=torch.float32)
