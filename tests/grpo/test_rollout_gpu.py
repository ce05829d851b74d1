"""Rollout engine on CUDA with the decode step captured in CUDA graphs: the same agreement checks as on the
CPU (greedy == transformers' generate; sampled logprobs == a teacher-forced forward pass), in fp32."""
import pytest
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from grpo.rollout import RolloutEngine, SamplingConfig

pytestmark = pytest.mark.gpu

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19, 20], [21, 22], [23, 24, 25, 26]]


def v3_cuda():
    torch.manual_seed(0)
    cfg = DeepseekV3Config(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                           num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
                           n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                           q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                           max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    model = DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    return model.cuda()


def test_cuda_graph_greedy_equals_generate():
    model = v3_cuda()
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=12, stop_token_ids=[3], max_batch=3, cuda_graphs=True)
    ro = RolloutEngine(model, None, cfg).generate(PROMPTS, 1)
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([prompt], device="cuda")
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                             pad_token_id=0, eos_token_id=[3])[0, len(prompt):].tolist()
        assert ro.completion_ids[i, : int(ro.lengths[i])].tolist() == ref


def test_cuda_graph_logprobs_equal_teacher_forcing_with_refill():
    model = v3_cuda()
    cfg = SamplingConfig(temperature=0.8, max_new_tokens=16, stop_token_ids=[3, 4], max_batch=4, cuda_graphs=True, seed=1)
    ro = RolloutEngine(model, None, cfg).generate(PROMPTS, 3)  # 15 rows through 4 slots
    for r, n in enumerate(ro.lengths.tolist()):
        prompt = ro.prompt_ids[r]
        ids = torch.tensor([prompt + ro.completion_ids[r, :n].tolist()], device="cuda")
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : -1].float() / 0.8
        ref = torch.log_softmax(logits, -1).gather(1, ids[0, len(prompt):, None]).squeeze(1).cpu()
        torch.testing.assert_close(ro.logprobs[r, :n].cpu(), ref, atol=1e-4, rtol=0)


def test_bf16_grouped_experts_match_transformers():
    """The decode path's routed experts on CUDA in bf16 (compiled routing and counting order, grouped GEMM)
    against transformers' MoE block in bf16, over every batch size the CUDA graphs use."""
    from grpo.engine import ops as engine_ops
    from grpo.engine.experts import moe_torch
    from grpo.engine.v3 import bind_layer
    model = v3_cuda().to(torch.bfloat16)
    moe = model.model.layers[1].mlp
    layer, dims = bind_layer(model.model.layers[1], model.model.norm, model.config, {}, None)
    ops = engine_ops.eager(torch.device("cuda"), torch.bfloat16).decode_ops
    for n in (1, 2, 7, 64):
        h = torch.randn(n, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            torch.testing.assert_close(moe_torch(h, layer.mlp, dims, ops, 0), moe(h[None])[0], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("policy", [False, True])
def test_bf16_compiled_decode_layers_match_the_eager_table(policy):
    """In bf16 on CUDA each layer's prefill and decode are the compiled ``prefill_layer`` and ``decode_layer``:
    same logits and cache as the uncompiled layers (within bf16 rounding), and sampled logprobs through CUDA graphs
    match teacher forcing."""
    from grpo import kernels
    from grpo.engine import ops as engine_ops
    from grpo.engine.v3 import V3Decoder
    from grpo.model import DeepseekV3Policy
    model = v3_cuda().to(torch.bfloat16)
    if policy:  # the project's policy class in bf16: transformers keeps its router weight in fp32
        model = DeepseekV3Policy._from_config(model.config, dtype=torch.bfloat16).cuda().eval()
        assert model.model.layers[1].mlp.gate.weight.dtype == torch.float32
    dec = V3Decoder(model, slots=8, max_len=64)
    fast, reference = dec.ops, engine_ops.eager(dec.device, dec.dtype)
    assert fast.decode is not reference.decode and fast.kernels == kernels.AVAILABLE
    slots = [[0, 5], [1, 6], [2, 7], [3], [4]]
    with torch.no_grad():
        prefill, prefill_cache = dec.prefill(PROMPTS, slots).float(), dec.cache.data.clone()
        dec.ops = reference
        ref = dec.prefill(PROMPTS, slots).float()
        dec.ops = fast
        assert (prefill - ref).abs().max() < 0.05 * ref.abs().max()
        torch.testing.assert_close(prefill_cache, dec.cache.data, atol=2e-2, rtol=2e-2)
        dec.positions[:] = torch.tensor([5, 3, 8, 2, 4, 5, 3, 8])
        dec.tokens[:] = torch.arange(30, 38)
        fused, fused_cache = dec.decode(8, 64).float(), dec.cache.data.clone()
        dec.ops = reference
        ref = dec.decode(8, 64).float()
    assert (fused - ref).abs().max() < 0.05 * ref.abs().max()
    torch.testing.assert_close(fused_cache, dec.cache.data, atol=2e-2, rtol=2e-2)
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=16, stop_token_ids=[3], max_batch=4, cuda_graphs=True, seed=0)
    ro = RolloutEngine(model, None, cfg).generate(PROMPTS, 2)
    for r, n in enumerate(ro.lengths.tolist()):
        prompt = ro.prompt_ids[r]
        ids = torch.tensor([prompt + ro.completion_ids[r, :n].tolist()], device="cuda")
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
        ref = torch.log_softmax(logits, -1).gather(1, ids[0, len(prompt):, None]).squeeze(1).cpu()
        torch.testing.assert_close(ro.logprobs[r, :n].cpu(), ref, atol=0.1, rtol=0)


def test_grouped_topk_on_cuda_equals_torch_topk():
    """The sampler's top-k on CUDA (groups of adjacent tokens, the Triton row top-k) is torch.topk's."""
    from grpo.sampling import _topk
    torch.manual_seed(0)
    for vocab in (32000, 128, 151936):
        x = torch.randn(64, vocab, device="cuda")
        vals, idx = _topk(x, 50)
        ref = x.topk(50, dim=-1)
        assert torch.equal(vals, ref.values) and torch.equal(x.gather(1, idx), ref.values)


# ---- MTP self-speculative decoding on CUDA (grpo.engine.speculative; the CPU tests are test_speculative.py) ----

def spec_policy(dtype=torch.float32):
    """test_speculative's small policy with an MTP module on CUDA; in bf16 through the policy class (its router
    weight stays fp32, as in training), loaded with the same weights."""
    from grpo.model import DeepseekV3Policy
    from tests.grpo.test_speculative import policy
    model = policy(sharpen=3.0)
    if dtype != torch.float32:
        low = DeepseekV3Policy._from_config(model.config, dtype=dtype)
        low.load_state_dict(model.state_dict())
        model = low.eval()
    return model.cuda()


def cuda_teacher_forced(model, ro, temperature):
    out = []
    for r, n in enumerate(ro.lengths.tolist()):
        prompt = ro.prompt_ids[r]
        ids = torch.tensor([prompt + ro.completion_ids[r, :n].tolist()], device="cuda")
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : -1].float() / temperature
        out.append(torch.log_softmax(logits, -1).gather(1, ids[0, len(prompt):, None]).squeeze(1).cpu())
    return out


@pytest.mark.parametrize("k", [1, 3])
def test_speculative_logprobs_equal_teacher_forcing_on_cuda(k):
    """fp32 on CUDA: 15 rows through 7 slots (refill), stops inside accepted runs; the returned logprobs are the
    target's, as without speculation."""
    model = spec_policy()
    stop = [40, 41, 42, 43]
    cfg = SamplingConfig(temperature=0.7, top_k=10, top_p=0.9, max_new_tokens=12, stop_token_ids=stop, max_batch=7,
                         seed=3, speculative="mtp", speculative_tokens=k)
    engine = RolloutEngine(model, None, cfg)
    ro = engine.generate(PROMPTS, 3)
    assert {"stop", "length"} <= set(ro.finish_reason)
    assert 0 < ro.stats["spec_accept_rate_1"] <= 1 and 1 <= ro.stats["spec_tokens_per_step"] <= k + 1
    for r, ref in enumerate(cuda_teacher_forced(model, ro, 0.7)):
        torch.testing.assert_close(ro.logprobs[r, : len(ref)], ref, atol=1e-4, rtol=0)
        ids = ro.completion_ids[r, : ro.lengths[r]].tolist()
        assert not set(ids[:-1]) & set(stop) and (ro.finish_reason[r] == "stop") == (ids[-1] in stop)


def test_speculative_greedy_on_cuda_equals_plain_greedy():
    model = spec_policy()
    out = {}
    for mode in ("none", "mtp"):
        cfg = SamplingConfig(temperature=0.0, max_new_tokens=16, stop_token_ids=[1], max_batch=4, speculative=mode,
                             speculative_tokens=2)
        out[mode] = RolloutEngine(model, None, cfg).generate(PROMPTS, 1)
    assert torch.equal(out["none"].completion_ids, out["mtp"].completion_ids)
    torch.testing.assert_close(out["none"].logprobs, out["mtp"].logprobs, atol=1e-4, rtol=0)


def test_bf16_verify_step_equals_one_token_steps_on_the_compiled_table():
    """bf16 on CUDA: a verify step over m tokens (compiled layers, torch attention for m queries) gives the
    logits and cache latents of m one-token decode steps (compiled layers, the Triton kernels where available)
    within bf16 rounding; the MTP step runs through the same table."""
    from grpo import kernels
    from tests.grpo.test_speculative import verify_and_steps
    model, m = spec_policy(torch.bfloat16), 4
    tokens = torch.randint(3, 48, (3, m), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        steps, multi, logits, ref, lens = verify_and_steps(model, PROMPTS[:3], tokens)
        assert multi.ops.kernels == kernels.AVAILABLE
        logits, ref = logits.float(), ref.float()
        assert (logits - ref).abs().max() < 0.05 * ref.abs().max()
        for s, n in enumerate(lens.tolist()):
            torch.testing.assert_close(multi.cache.data[:, s, : n + m], steps.cache.data[:, s, : n + m], atol=3e-2,
                                       rtol=3e-2)
        hidden, normed = multi.mtp_step(tokens, multi.verify(tokens, int(lens.max()) + 1), lens, int(lens.max()) + m)
        assert hidden.shape == normed.shape == (3, m, model.config.hidden_size)
        assert torch.isfinite(multi.lm_head(normed).float()).all()


def test_bf16_speculative_rollout_on_the_compiled_table():
    """bf16 on CUDA through the compiled table: a speculative rollout with refill and stops returns the target
    logprobs (teacher forcing within bf16 rounding) and reports its acceptance; the drafts of the MTP module are
    accepted at a plausible rate."""
    model = spec_policy(torch.bfloat16)
    for k in (1, 2):
        cfg = SamplingConfig(temperature=1.0, max_new_tokens=16, stop_token_ids=[3], max_batch=4, seed=0,
                             speculative="mtp", speculative_tokens=k)
        ro = RolloutEngine(model, None, cfg).generate(PROMPTS, 2)
        assert 0 < ro.stats["spec_accept_rate_1"] <= 1 and ro.stats["decode_tokens"] >= ro.stats["decode_steps"]
        for r, ref in enumerate(cuda_teacher_forced(model, ro, 1.0)):
            torch.testing.assert_close(ro.logprobs[r, : len(ref)], ref, atol=0.1, rtol=0)


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0),
                                      dict(temperature=0.7, top_k=40, top_p=0.9, min_p=0.01)])
def test_compiled_draw_and_judge_equal_the_eager_ones_on_cuda(sampling):
    """The speculative round's compiled draw and judge (its CUDA-graph form) against the eager functions on the
    same fp32 inputs at two batch sizes (the dynamic one): the same tokens and counts, logprobs within 1e-5."""
    from grpo.engine import speculative as spec
    g = torch.Generator(device="cuda").manual_seed(0)
    for n in (8, 37):
        z = torch.randn(n, 3, 1000, device="cuda", generator=g) * 4
        logits = torch.randn(n, 2, 1000, device="cuda", generator=g) * 4
        u = torch.rand(n, 5, device="cuda", generator=g)
        eager = [spec.draw(logits[:, j], u[:, 3 + j], **sampling) for j in range(2)]
        compiled = [spec._compiled_draw(logits[:, j], u[:, 3 + j], **sampling) for j in range(2)]
        for (q, d), (qc, dc) in zip(eager, compiled):
            assert torch.equal(d, dc)
            torch.testing.assert_close(qc, q, atol=1e-6, rtol=1e-5)
        q, drafts = torch.stack([q for q, _ in eager], 1), torch.stack([d for _, d in eager], 1)
        tokens, logprobs, count = spec.judge(z, q, drafts, u[:, :3], **sampling)
        tokens_c, logprobs_c, count_c = spec._compiled_judge(z, q, drafts, u[:, :3], **sampling)
        assert torch.equal(count, count_c) and torch.equal(tokens, tokens_c)
        torch.testing.assert_close(logprobs_c, logprobs, atol=1e-5, rtol=0)
