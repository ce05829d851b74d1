"""grpo.kernels: the MoE block layout (everywhere), and the Triton kernels against torch references (CUDA;
on a CPU with Triton installed they also run under TRITON_INTERPRET=1, in fp32)."""
import os

import pytest
import torch
import torch.nn.functional as F

from grpo import kernels

INTERPRET = kernels.triton is not None and os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if kernels.AVAILABLE else "cpu"
needs_triton = pytest.mark.skipif(not (kernels.AVAILABLE or INTERPRET), reason="needs Triton with CUDA (or TRITON_INTERPRET=1)")
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
TOL = dict(atol=3e-2, rtol=3e-2) if DEVICE == "cuda" else dict(atol=1e-5, rtol=1e-5)

if INTERPRET:  # numpy 2 refuses int() of the interpreter's one-element scalars (a dynamic loop bound)
    from triton.runtime import interpreter

    _patch = interpreter._patch_lang_tensor

    def _patch_index(tensor, *scope):  # newer Triton also passes a patch scope
        _patch(tensor, *scope)
        tensor.__index__ = lambda self: int(self.handle.data.reshape(-1)[0])

    interpreter._patch_lang_tensor = _patch_index


@pytest.mark.parametrize("n,top_k,n_experts", [(1, 2, 8), (7, 2, 8), (64, 4, 32), (256, 4, 32)])
def test_moe_schedule_groups_pairs_by_expert_in_padded_blocks(n, top_k, n_experts):
    idx = torch.stack([torch.randperm(n_experts)[:top_k] for _ in range(n)])
    idx[0, 0] = 3
    block = kernels.moe_block(n * top_k, n_experts)
    pairs, block_expert = kernels.moe_schedule(idx, n_experts, block)
    assert pairs.shape == (block_expert.shape[0] * block,)
    assert sorted(pairs[pairs >= 0].tolist()) == list(range(n * top_k))  # every pair exactly once
    flat = idx.reshape(-1)
    for b, e in enumerate(block_expert.tolist()):
        rows = pairs[b * block:(b + 1) * block]
        real = rows[rows >= 0]
        if e == n_experts:  # unused blocks come last and hold no pair
            assert len(real) == 0 and (block_expert[b:] == n_experts).all()
        else:
            assert (flat[real] == e).all() and (real.diff() > 0).all()  # one expert, pair order
            assert rows[0] >= 0  # a block of an expert starts with one of its pairs
    used = int((block_expert < n_experts).sum())
    assert used == sum(-(-int(c) // block) for c in torch.bincount(flat, minlength=n_experts))


@needs_triton
@pytest.mark.parametrize("wide_from", [0, 10**9])  # programs of 32 or of 16 (token, head) rows when m H is 17..32
@pytest.mark.parametrize("heads,m", [(4, 1), (20, 1), (16, 2), (5, 4), (12, 3)])
def test_mla_decode_equals_softmax_attention_over_positions_below_pos_and_the_own_latents(heads, m, wide_from,
                                                                                          monkeypatch):
    """m new tokens per sequence: token i attends the cache below pos and the own latents 0..i."""
    monkeypatch.setattr(kernels, "MLA_WIDE_FROM", wide_from)
    torch.manual_seed(0)
    n, rank, rope, span = 6, 64, 16, 100
    keys = torch.randn(n + 2, span + 20, rank + rope, device=DEVICE, dtype=DTYPE)[:n, :span]  # a strided view
    q = torch.randn(n, m, heads, rank + rope, device=DEVICE, dtype=DTYPE)
    own = torch.randn(n, m, rank + rope, device=DEVICE, dtype=DTYPE)
    pos = torch.tensor([0, 1, 63, 64, 65, 99 - m], device=DEVICE)
    q_latent = q[..., :rank].transpose(0, 2).contiguous().transpose(0, 2)  # strided, as the decode step's
    out = kernels.mla_decode(q_latent, q[..., rank:], keys, own, pos, 0.3)
    every = torch.cat((keys, own), dim=1).float()  # [n, span + m, R + Dr]
    scores = torch.einsum("nihd,nsd->nihs", q.float(), every) * 0.3
    cached = torch.arange(span, device=DEVICE)[None, None] < pos[:, None, None]  # [n, 1, span]
    own_seen = torch.ones(m, m, dtype=torch.bool, device=DEVICE).tril()[None].expand(n, -1, -1)  # [n, i, j]
    seen = torch.cat((cached.expand(-1, m, -1), own_seen), dim=2)  # [n, i, span + m]
    probs = scores.masked_fill(~seen[:, :, None], float("-inf")).softmax(-1)
    ref = torch.einsum("nihs,nsr->nihr", probs, every[..., :rank])
    torch.testing.assert_close(out.float(), ref, **TOL)


@needs_triton
@pytest.mark.parametrize("n,shared", [(1, 1), (7, 2), (64, 1), (64, 0)])
def test_fused_moe_equals_a_loop_over_pairs(n, shared):
    """Routed pairs and the shared expert's slices (experts E + j: its columns jI..(j+1)I - 1)."""
    torch.manual_seed(n)
    dim, inter, n_experts, top_k = 64, 32, 8, 2
    h = torch.randn(n, dim, device=DEVICE, dtype=DTYPE)
    gate_up = torch.randn(n_experts, 2 * inter, dim, device=DEVICE, dtype=DTYPE) / 8
    down = torch.randn(n_experts, dim, inter, device=DEVICE, dtype=DTYPE) / 8
    shared_gate_up = torch.randn(2 * shared * inter, dim, device=DEVICE, dtype=DTYPE) / 8
    shared_down = torch.randn(dim, shared * inter, device=DEVICE, dtype=DTYPE) / 8
    idx = torch.stack([torch.randperm(n_experts, device=DEVICE)[:top_k] for _ in range(n)])
    idx = torch.cat((idx, torch.arange(n_experts, n_experts + shared, device=DEVICE).expand(n, shared)), dim=1)
    per_token = top_k + shared
    weights = torch.rand(n * per_token, device=DEVICE)
    pairs, block_expert = kernels.moe_schedule(idx, n_experts + shared, kernels.moe_block(n * top_k, n_experts))
    inner = kernels.moe_up(h, gate_up, shared_gate_up, pairs, block_expert, per_token)
    y = kernels.moe_down(inner, down, shared_down, pairs, block_expert, weights)
    ref = torch.empty(n * per_token, dim, device=DEVICE)
    for m, e in enumerate(idx.reshape(-1).tolist()):
        if e < n_experts:
            w_gate_up, w_down = gate_up[e], down[e]
        else:
            cols = torch.arange((e - n_experts) * inter, (e - n_experts + 1) * inter, device=DEVICE)
            w_gate_up, w_down = shared_gate_up[torch.cat((cols, shared * inter + cols))], shared_down[:, cols]
        g, u = (w_gate_up.float() @ h[m // per_token].float()).chunk(2)
        ref[m] = weights[m] * (w_down.float() @ (F.silu(g) * u).to(DTYPE).float())
    torch.testing.assert_close(y, ref, **TOL)
    if shared:  # the slices together are the shared expert
        g, u = (shared_gate_up.float() @ h.float().T).chunk(2)
        whole = (shared_down.float() @ (F.silu(g) * u)).T
        slices = (ref / weights[:, None]).view(n, per_token, dim)[:, top_k:].sum(dim=1)
        torch.testing.assert_close(slices, whole, **(TOL if DEVICE == "cuda" else dict(atol=1e-4, rtol=1e-4)))


@pytest.mark.skipif(not kernels.AVAILABLE, reason="needs Triton with CUDA")
@pytest.mark.parametrize("vocab,k", [(163840, 50), (129280, 50), (32000, 50), (151936, 20)])
def test_sampler_topk_through_the_kernel_equals_torch_topk(vocab, k):
    from grpo.sampling import _topk

    scores = torch.randn(7, vocab, device="cuda", generator=torch.Generator("cuda").manual_seed(vocab))
    vals, idx = _topk(scores, k)
    ref = scores.topk(k, dim=-1)
    assert torch.equal(vals, ref.values) and torch.equal(idx, ref.indices)


@needs_triton
@pytest.mark.parametrize("cols,k", [(2000, 50), (800, 50), (17, 16), (4096, 1)])
def test_topk_indices_equal_torch_topk(cols, k):
    torch.manual_seed(cols)
    x = torch.randn(5, cols, device=DEVICE) * 3
    x[0, :3] = -float("inf")
    x[1] = -x[1].abs()  # negative values order by magnitude the other way
    x[2, 5:] = x[2, 4]  # ties at the k-th value: the lowest columns are kept
    idx = kernels.topk_indices(x, k)
    assert (idx.diff(dim=-1) > 0).all()  # column order
    ref = x.topk(k, dim=-1)
    torch.testing.assert_close(x.gather(1, idx).sort(dim=-1, descending=True).values, ref.values, atol=0, rtol=0)
    for r in (1, 3, 4):  # no ties
        assert idx[r].tolist() == ref.indices[r].sort().values.tolist()
    kth = ref.values[2, -1]
    above = (x[2] > kth).nonzero().flatten()
    ties = (x[2] == kth).nonzero().flatten()[: k - len(above)]
    assert idx[2].tolist() == torch.cat((above, ties)).sort().values.tolist()


@needs_triton
@pytest.mark.parametrize("n,top_k,n_experts", [(1, 2, 8), (7, 2, 8), (64, 4, 32), (256, 4, 32)])
def test_moe_schedule_kernel_equals_the_torch_layout(n, top_k, n_experts):
    idx = torch.stack([torch.randperm(n_experts)[:top_k] for _ in range(n)]).to(DEVICE)
    block = kernels.moe_block(n * top_k, n_experts)
    for got, ref in zip(kernels.moe_schedule_kernel(idx, n_experts, block), kernels.moe_schedule(idx, n_experts, block)):
        assert torch.equal(got, ref)


@needs_triton
@pytest.mark.parametrize("n_experts,n_group,topk_group,top_k,norm,scale", [
    (32, 4, 2, 4, True, 1.0), (64, 8, 4, 8, True, 2.5), (32, 1, 1, 2, False, 1.0), (32, 4, 4, 3, True, 1.0),
    (8, 2, 1, 2, True, 1.0)])
@pytest.mark.parametrize("router_dtype", sorted({DTYPE, torch.float32}, key=str))  # fp32: logits by F.linear
def test_route_kernel_selects_what_route_selects(n_experts, n_group, topk_group, top_k, norm, scale, router_dtype):
    from grpo.moe import route
    torch.manual_seed(top_k)
    h = torch.randn(37, 100, device=DEVICE, dtype=DTYPE)
    router = (torch.randn(n_experts, 100, device=DEVICE) / 5).to(DTYPE).to(router_dtype)
    bias = torch.randn(n_experts, device=DEVICE) * 0.1
    kw = dict(n_group=n_group, topk_group=topk_group, top_k=top_k, norm=norm, scale=scale)
    weights, idx = kernels.route(h, router, bias, **kw)
    ref_weights, ref_idx, _ = route(h.float() @ router.float().T, bias, **kw, by_argmax=True)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=1e-5)
    weights, idx = kernels.route(h, router, bias, **kw, shared=2)  # two shared slices: experts E, E + 1
    assert torch.equal(idx[:, :top_k], ref_idx) and (idx[:, top_k:] == torch.tensor([n_experts, n_experts + 1], device=DEVICE)).all()
    torch.testing.assert_close(weights[:, :top_k], ref_weights, atol=1e-6, rtol=1e-5)
    assert (weights[:, top_k:] == 1).all()


@needs_triton
@pytest.mark.parametrize("overrides", [{}, dict(q_lora_rank=None, rope_interleave=False, n_shared_experts=2)])
def test_decode_layers_through_the_kernels_equal_the_torch_reference(overrides):
    """A whole decode step with every layer's attention and experts (routed + shared) in the kernels."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from grpo.engine import ops as engine_ops
    from grpo.engine.layer import decode_layer, prefill_layer
    from grpo.engine.v3 import V3Decoder
    torch.manual_seed(0)
    cfg = DeepseekV3Config(**{**dict(
        vocab_size=64, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
        num_experts_per_tok=2, n_group=2, topk_group=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=64, pad_token_id=0), **overrides})
    model = DeepseekV3ForCausalLM(cfg).eval().to(DEVICE, DTYPE)
    dec = V3Decoder(model, slots=4, max_len=32)
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
        dec.prefill([[5, 6, 7, 8, 9, 10], [11, 12, 13]], [[0, 2], [1, 3]])
        dec.positions[:] = torch.tensor([6, 3, 6, 3])
        dec.tokens[:] = torch.tensor([20, 21, 22, 23])
        dec.ops = engine_ops.eager(dec.device, dec.dtype)  # the torch reference
        ref, ref_cache = dec.decode(4, 16).float(), dec.cache.data.float()
        dec.cache.data[:, torch.arange(4), dec.positions] = 0
        dec.ops = engine_ops.compiled(triton=True)._replace(decode=decode_layer, prefill=prefill_layer)
        out = dec.decode(4, 16).float()
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(dec.cache.data.float(), ref_cache, **TOL)
