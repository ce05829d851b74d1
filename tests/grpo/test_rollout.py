"""Rollout engine: agreement with transformers' generate (greedy) and with a teacher-forced forward pass
(sampled logprobs), refill, latent cache size, prefill-once, expert-parallel stepping, seeds, stop strings."""
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import grpo.engine.scheduler as rollout_mod
from grpo.config import ConfigError
from grpo.engine import ops as engine_ops
from grpo.engine.experts import counting_order, moe_stacked, routed_all, routed_grouped, sorted_order
from grpo.engine.layer import decode_layer, prefill_layer
from grpo.engine.v3 import V3Decoder, bind_layer
from grpo.rollout import RolloutEngine, SamplingConfig
from grpo.moe import route

VOCAB = 128


def v3_model(**overrides):
    torch.manual_seed(0)
    cfg = DeepseekV3Config(**{
        **dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
               first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
               n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, q_lora_rank=32, kv_lora_rank=16,
               qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=256,
               pad_token_id=0, eos_token_id=1, bos_token_id=1),
        **overrides})
    model = DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():  # a non-zero correction bias, so that selection and weights differ
        for layer in model.model.layers[cfg.first_k_dense_replace:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    return model


def llama_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=0, eos_token_id=1, bos_token_id=1)
    return LlamaForCausalLM(cfg).eval()


PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19, 20], [21, 22], [23, 24, 25, 26]]


def teacher_forced_logprobs(model, ro, temperature):
    """log softmax(logits / T) of each generated token under a full forward pass over prompt + completion."""
    out = []
    for r, n in enumerate(ro.lengths.tolist()):
        prompt = ro.prompt_ids[r]
        ids = torch.tensor([prompt + ro.completion_ids[r, :n].tolist()])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1:-1].float() / temperature
        out.append(torch.log_softmax(logits, -1).gather(1, ids[0, len(prompt):, None]).squeeze(1))
    return out


def check_layout(ro, n_prompts, group_size, max_new, stop_ids, pad_id):
    rows = n_prompts * group_size
    width = int(ro.lengths.max())
    assert ro.completion_ids.shape == ro.completion_mask.shape == ro.logprobs.shape == (rows, width)
    assert ro.group.tolist() == [r // group_size for r in range(rows)]
    assert ro.completion_mask.sum(1).tolist() == ro.lengths.tolist()
    for r in range(rows):
        n = int(ro.lengths[r])
        assert (ro.completion_ids[r, n:] == pad_id).all() and (ro.logprobs[r, n:] == 0).all()
        ids = ro.completion_ids[r, :n].tolist()
        if ro.finish_reason[r] == "stop":
            assert ids[-1] in stop_ids and not set(ids[:-1]) & set(stop_ids)
        else:
            assert ro.finish_reason[r] == "length" and n == max_new and not set(ids) & set(stop_ids)


@pytest.mark.parametrize("lag", [0, 1], ids=["read-each-step", "pipelined"])  # pipelined: as on CUDA
@pytest.mark.parametrize("make", [v3_model, llama_model], ids=["v3", "generic"])
def test_greedy_equals_transformers_generate(make, lag):
    model = make()
    stop = [3]
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=12, stop_token_ids=stop, max_batch=3)  # 5 prompts, 3 slots
    engine = RolloutEngine(model, None, cfg)
    engine._lag = lag
    ro = engine.generate(PROMPTS, 1)
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([prompt])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                             pad_token_id=0, eos_token_id=stop)[0, len(prompt):].tolist()
        if stop[0] in ref:
            ref = ref[: ref.index(stop[0]) + 1]
        assert ro.completion_ids[i, : ro.lengths[i]].tolist() == ref


@pytest.mark.parametrize("make", [v3_model, llama_model], ids=["v3", "generic"])
@pytest.mark.parametrize("sampling", [dict(temperature=0.7, top_k=20, top_p=0.9), dict(temperature=1.3, min_p=0.05),
                                      dict(temperature=1.0)], ids=["topk-topp", "minp", "plain"])
def test_sampled_logprobs_equal_teacher_forcing_with_refill(make, sampling):
    model = make()
    stop = list(range(40, 56))  # 1/8 of the vocabulary: lengths end up mixed between stop and length
    cfg = SamplingConfig(**sampling, max_new_tokens=10, stop_token_ids=stop, max_batch=7, seed=3)
    engine = RolloutEngine(model, None, cfg)
    ro = engine.generate(PROMPTS, 3)  # 15 rows through 7 slots (2 groups at a time)
    check_layout(ro, len(PROMPTS), 3, 10, stop, engine.pad_id)
    assert {"stop", "length"} <= set(ro.finish_reason)
    for r, ref in enumerate(teacher_forced_logprobs(model, ro, sampling["temperature"])):
        torch.testing.assert_close(ro.logprobs[r, : len(ref)], ref, atol=1e-4, rtol=0)


def uncompiled(ops):
    """An op table with its layer functions run eagerly (the compiled ones need CUDA in bf16 here)."""
    return ops._replace(decode=decode_layer, prefill=prefill_layer)


def test_fused_layer_decode_through_the_engine_matches_teacher_forcing(monkeypatch):
    """The engine (refill, stop tokens, mixed lengths) with every layer through the compiled table's layer ops
    (those of CUDA in bf16; here uncompiled, fp32): logprobs equal a teacher-forced forward pass."""
    bind = V3Decoder.bind

    def fused_bind(self):
        bind(self)
        self.ops = uncompiled(engine_ops.compiled(triton=False))

    monkeypatch.setattr(V3Decoder, "bind", fused_bind)
    model = v3_model()
    stop = [40, 41]  # 1/64 of the vocabulary: some rows stop, some run past the first 64-position span
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=70, stop_token_ids=stop, max_batch=7, seed=3)
    engine = RolloutEngine(model, None, cfg)
    ro = engine.generate(PROMPTS, 3)  # 15 rows through 7 slots; spans past one 64-position bucket
    assert engine._decoder.ops.decode_ops.order is counting_order
    assert {"stop", "length"} <= set(ro.finish_reason) and int(ro.lengths.max()) == 70
    for r, ref in enumerate(teacher_forced_logprobs(model, ro, 1.0)):
        torch.testing.assert_close(ro.logprobs[r, : len(ref)], ref, atol=1e-4, rtol=0)


def test_yarn_unfused_query_and_half_split_rope_match_teacher_forcing():
    """q_proj instead of the q LoRA, rope_interleave False, YaRN with an attention factor and mscale."""
    yarn = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, mscale=0.707, mscale_all_dim=1.0,
                rope_theta=10000.0, beta_fast=32, beta_slow=1)
    model = v3_model(q_lora_rank=None, rope_interleave=False, rope_parameters=yarn)
    assert model.model.rotary_emb.attention_scaling != 1.0
    engine = RolloutEngine(model, None, SamplingConfig(temperature=0.8, max_new_tokens=20, stop_token_ids=[], max_batch=6))
    ro = engine.generate(PROMPTS, 2)
    for r, ref in enumerate(teacher_forced_logprobs(model, ro, 0.8)):
        torch.testing.assert_close(ro.logprobs[r, : len(ref)], ref, atol=1e-4, rtol=0)


def test_dense_grouped_and_stacked_experts_agree_with_transformers():
    """The grouped GEMM (CPU, CUDA bf16) and the dense form (CUDA fp32) of the routed experts; the whole block
    as the stacked GEMMs (CPU decode), whose weights are copies that each bind re-makes."""
    model = v3_model()
    moe = model.model.layers[1].mlp
    layer, dims = bind_layer(model.model.layers[1], model.model.norm, model.config, {}, None)
    h = torch.randn(9, model.config.hidden_size)
    weights, idx, _ = route(torch.nn.functional.linear(h, moe.gate.weight), moe.gate.e_score_correction_bias,
                            **dims.routing._asdict())
    with torch.no_grad():
        ref = moe(h[None])[0] - moe.shared_experts(h)
        grouped = routed_grouped(h, layer.mlp, idx, weights, dims.act, sorted_order)
        dense = routed_all(h, layer.mlp, idx, weights, dims.act, sorted_order)
    torch.testing.assert_close(grouped, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dense, ref, atol=1e-6, rtol=1e-5)
    ops = engine_ops.eager(torch.device("cpu"), torch.float32, stacked=True).decode_ops
    assert layer.mlp.stacked is not None and V3Decoder(model, slots=2, max_len=16).ops.decode_ops.moe is moe_stacked
    assert V3Decoder(v3_model(n_routed_experts=16), slots=2, max_len=16).ops.decode_ops.moe is not moe_stacked  # E > 4K
    with torch.no_grad():
        torch.testing.assert_close(moe_stacked(h, layer.mlp, dims, ops, 0), moe(h[None])[0], atol=1e-6, rtol=1e-5)
        moe.experts.down_proj.mul_(2)
        moe.shared_experts.gate_proj.weight.add_(0.1)
        layer = bind_layer(model.model.layers[1], model.model.norm, model.config, {}, None)[0]
        torch.testing.assert_close(moe_stacked(h, layer.mlp, dims, ops, 0), moe(h[None])[0], atol=1e-6, rtol=1e-5)


TABLES = {"eager": lambda: engine_ops.eager(torch.device("cpu"), torch.float32),
          "eager-stacked": lambda: engine_ops.eager(torch.device("cpu"), torch.float32, stacked=True),
          "compiled": lambda: uncompiled(engine_ops.compiled(triton=False))}


@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("overrides", [{}, dict(q_lora_rank=None, rope_interleave=False)])
def test_decode_step_equals_transformers(overrides, table):
    """A decode step through each op table (the compiled one uncompiled here, fp32) gives transformers'
    logits for prompt + token and writes the latents a prefill of prompt + token writes, at mixed positions
    with stale cache rows beyond them."""
    model = v3_model(**overrides)
    dec = V3Decoder(model, slots=4, max_len=32)
    dec.ops = TABLES[table]()
    prompts, tokens = [[5, 6, 7, 8, 9, 10], [11, 12, 13]], [20, 21, 22, 23]
    with torch.no_grad():
        dec.prefill(prompts, [[0, 2], [1, 3]])
        dec.cache.data[:, :, 10:] = torch.randn_like(dec.cache.data[:, :, 10:])  # stale rows the mask must hide
        dec.positions[:] = torch.tensor([6, 3, 6, 3])
        dec.tokens[:] = torch.tensor(tokens)
        logits = dec.decode(4, 16)
        extended = [prompts[s % 2] + [tokens[s]] for s in range(4)]
        ref = torch.stack([model(torch.tensor([ids])).logits[0, -1] for ids in extended])
        cache = dec.cache.data.clone()
        dec.prefill(extended, [[s] for s in range(4)])
    torch.testing.assert_close(logits, ref, atol=2e-5, rtol=1e-5)
    for s, ids in enumerate(extended):
        torch.testing.assert_close(cache[:, s, : len(ids)], dec.cache.data[:, s, : len(ids)], atol=1e-6, rtol=0)


@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("overrides", [{}, dict(q_lora_rank=None, rope_interleave=False)])
def test_prefill_equals_transformers(overrides, table):
    """A prefill through each op table (fp32): transformers' last-token logits for padded prompts copied to
    several slots, and the same cached latents from every table."""
    model = v3_model(**overrides)
    dec = V3Decoder(model, slots=4, max_len=32)
    prompts, slots = [[5, 6, 7, 8, 9, 10], [11, 12, 13]], [[0, 2], [1, 3]]
    with torch.no_grad():
        ref_cache = (dec.prefill(prompts, slots), dec.cache.data.clone())[1]
        dec.cache.data.zero_()
        dec.ops = TABLES[table]()
        logits = dec.prefill(prompts, slots)
        ref = torch.stack([model(torch.tensor([p])).logits[0, -1] for p in prompts])
    torch.testing.assert_close(logits, ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(dec.cache.data, ref_cache, atol=1e-6, rtol=0)


def test_stacked_fused_weights_are_refilled_in_place():
    """The stacked weights (one GEMM for q_a and kv_a, one for gate and up) and the query projection with
    W_UK folded in are copies: each bind refills the same buffers (CUDA graphs hold their addresses) with the
    current weights."""
    model = v3_model()
    dec = V3Decoder(model, slots=2, max_len=16)
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp.shared_experts
    before = dec.layers[1]
    with torch.no_grad():
        attn.kv_a_proj_with_mqa.weight.mul_(2)
        mlp.up_proj.weight.add_(1)
        attn.kv_b_proj.weight.mul_(3)
    dec.bind()
    after = dec.layers[1]
    for get, parts in [(lambda w: w.attn.absorbed.in_proj, [attn.q_a_proj, attn.kv_a_proj_with_mqa]),
                       (lambda w: w.mlp.shared.gate_up, [mlp.gate_proj, mlp.up_proj])]:
        assert get(after).data_ptr() == get(before).data_ptr()
        assert torch.equal(get(after), torch.cat([m.weight for m in parts]))
    assert after.attn.absorbed.q_b.data_ptr() == before.attn.absorbed.q_b.data_ptr()
    # per head h: rows [W_UK,h^T W^C_h ; W^R_h] of the absorbed query projection
    heads, nope, rope, rank = 4, 16, 8, 16
    q = attn.q_b_proj.weight.view(heads, nope + rope, -1)
    w_uk = attn.kv_b_proj.weight.view(heads, nope + 16, rank)[:, :nope]
    ref = torch.cat((w_uk.transpose(1, 2) @ q[:, :nope], q[:, nope:]), dim=1).reshape(heads * (rank + rope), -1)
    torch.testing.assert_close(after.attn.absorbed.q_b, ref, atol=1e-6, rtol=1e-5)


def test_counting_order_equals_a_stable_sort():
    g = torch.Generator().manual_seed(0)
    for pairs, n_experts in [(1, 4), (37, 8), (512, 32)]:
        experts = torch.randint(0, n_experts, (pairs,), generator=g)
        experts[: pairs // 3] = 0  # ties
        perm, ends = counting_order(experts, n_experts)
        ref_perm, ref_ends = sorted_order(experts, n_experts)
        assert perm.tolist() == ref_perm.tolist() and ends.tolist() == ref_ends.tolist()
        assert ends.dtype == torch.int32 and ends[-1] == pairs


def test_latent_cache_holds_only_the_mla_latent():
    model = v3_model()
    cfg = SamplingConfig(max_new_tokens=6, max_batch=4, stop_token_ids=[])
    engine = RolloutEngine(model, None, cfg)
    engine.generate(PROMPTS[:2], 2)
    c, mc = engine._decoder.cache, model.config
    per_token = mc.num_hidden_layers * (mc.kv_lora_rank + mc.qk_rope_head_dim) * 4
    assert c.data.shape == (mc.num_hidden_layers, 4, c.max_len, mc.kv_lora_rank + mc.qk_rope_head_dim)
    assert c.bytes_per_token == per_token
    assert c.data.numel() * c.data.element_size() == per_token * 4 * c.max_len
    full_kv = mc.num_hidden_layers * mc.num_attention_heads * (mc.qk_nope_head_dim + mc.qk_rope_head_dim + mc.v_head_dim) * 4
    assert full_kv > 6 * per_token


def test_each_prompt_is_prefilled_once_per_group(monkeypatch):
    seen = []
    original = V3Decoder.prefill

    def recording(self, prompts, slots):
        seen.extend((tuple(p), len(s)) for p, s in zip(prompts, slots))
        return original(self, prompts, slots)

    monkeypatch.setattr(V3Decoder, "prefill", recording)
    engine = RolloutEngine(v3_model(), None, SamplingConfig(max_new_tokens=5, max_batch=8, stop_token_ids=[]))
    ro = engine.generate(PROMPTS, 4)
    assert sorted(seen) == sorted((tuple(p), 4) for p in PROMPTS)
    assert engine.stats["prefill_tokens"] == sum(map(len, PROMPTS))
    assert ro.stats["prefill_tokens"] == sum(map(len, PROMPTS))


def test_refill_keeps_slots_busy():
    """Short and long sequences mixed: decode steps run on all free slots' replacements, not in waves."""
    engine = RolloutEngine(v3_model(), None, SamplingConfig(max_new_tokens=12, max_batch=4, stop_token_ids=list(range(40, 72))))
    ro = engine.generate([[5, 6, 7]] * 12, 1)
    generated = int(ro.lengths.sum())
    # every decode step but the tail runs 4 slots: far fewer steps than waves of 4 would take
    waves = sum(int(ro.lengths[i:i + 4].max()) for i in range(0, 12, 4))
    assert engine.stats["decode_tokens"] == generated - 12  # the first token of each comes from the prefill
    assert engine.stats["decode_steps"] < waves


def test_seed_reproducibility():
    model = v3_model()
    kw = dict(max_new_tokens=8, max_batch=5, stop_token_ids=[], cpu_threads=1)  # bitwise: fixed thread count
    a = RolloutEngine(model, None, SamplingConfig(**kw, seed=11)).generate(PROMPTS, 2)
    b = RolloutEngine(model, None, SamplingConfig(**kw, seed=11)).generate(PROMPTS, 2)
    c = RolloutEngine(model, None, SamplingConfig(**kw, seed=12)).generate(PROMPTS, 2)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.completion_ids, c.completion_ids)


def letters_tokenizer():
    """Tokens are one or two letters; decoding concatenates them, so strings span token boundaries."""
    pieces = [c for c in "abcdefgh"] + [a + b for a in "abcd" for b in "abcd"]
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{p: i + 3 for i, p in enumerate(pieces)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def test_stop_strings_end_completions_at_the_completing_token():
    tok = letters_tokenizer()
    model = v3_model(vocab_size=len(tok))
    engine = RolloutEngine(model, tok, SamplingConfig(max_new_tokens=30, max_batch=6, stop_strings=["ab", "ca"]))
    ro = engine.generate([[3, 4, 5], [6, 7]], 6)
    reasons = set(ro.finish_reason)
    assert "stop" in reasons
    for r in range(len(ro.finish_reason)):
        ids = ro.completion_ids[r, : ro.lengths[r]].tolist()
        text, before = tok.decode(ids), tok.decode(ids[:-1])
        has = lambda s: "ab" in s or "ca" in s  # noqa: E731
        if ro.finish_reason[r] == "stop":
            assert (has(text) and not has(before)) or ids[-1] == tok.eos_token_id
        else:
            assert not has(text) and len(ids) == 30


def test_expert_parallel_ranks_step_until_all_are_done(monkeypatch):
    """A peer rank that prefills once more and stays busy longer: this rank runs dummy forwards meanwhile,
    and its own results are unchanged."""
    model = v3_model()
    cfg = SamplingConfig(max_new_tokens=6, max_batch=4, stop_token_ids=list(range(40, 72)), seed=5, cpu_threads=1)
    alone = RolloutEngine(model, None, cfg).generate(PROMPTS, 2)

    calls = {"iter": 0, "decode": 0, "prefill": 0}
    def peer(flags, group):  # the other rank: busy for 30 iterations, prefilling at iteration 25
        calls["iter"] += 1
        return [flags[0] or calls["iter"] <= 30, flags[1] or calls["iter"] == 25]

    engine = RolloutEngine(model, None, cfg, ep_group=object())
    monkeypatch.setattr(rollout_mod, "_any_rank", peer)
    dec = engine._decoder_for(max(map(len, PROMPTS)) + cfg.max_new_tokens)
    for name in ("decode", "prefill"):
        fn = getattr(dec, name)
        monkeypatch.setattr(dec, name, lambda *a, _fn=fn, _n=name: (calls.__setitem__(_n, calls[_n] + 1), _fn(*a))[1])
    ro = engine.generate(PROMPTS, 2)
    assert torch.equal(ro.completion_ids, alone.completion_ids) and torch.equal(ro.logprobs, alone.logprobs)
    assert calls["iter"] == 31  # the loop ends only when the peer is done too
    assert calls["decode"] == 30  # one forward (real or dummy) per iteration while anyone is busy
    assert calls["prefill"] == engine.stats["prefill_calls"] + 1  # plus the dummy matching the peer's


def test_generate_text_decodes_completions():
    tok = letters_tokenizer()
    engine = RolloutEngine(v3_model(vocab_size=len(tok)), tok, SamplingConfig(max_new_tokens=4, max_batch=4))
    texts = engine.generate_text(["ab c", "d"], 2)
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts)


def test_bad_inputs_are_named():
    with pytest.raises(ConfigError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ConfigError, match="temperature"):
        SamplingConfig(temperature=-1.0)
    engine = RolloutEngine(v3_model(), None, SamplingConfig(max_batch=4, stop_token_ids=[]))
    with pytest.raises(ValueError, match="group_size 5 exceeds max_batch 4"):
        engine.generate(PROMPTS, 5)
    with pytest.raises(ValueError, match="prompt 1"):
        engine.generate([[5], [VOCAB + 3]], 1)
    with pytest.raises(ValueError, match="stop_strings need a tokenizer"):
        RolloutEngine(v3_model(), None, SamplingConfig(stop_strings=["x"]))
    with pytest.raises(ConfigError, match="backend"):
        RolloutEngine(llama_model(), None, SamplingConfig(backend="v3"))


def test_pipelined_bookkeeping_reads_results_one_step_late():
    """The CUDA loop reads each step's results while the next step runs (lag 1): finished slots decode one
    ignored token and are refilled a step later; results keep the same semantics."""
    model = v3_model()
    stop = list(range(40, 56))
    engine = RolloutEngine(model, None, SamplingConfig(temperature=0.9, max_new_tokens=9, stop_token_ids=stop, max_batch=5))
    engine._lag = 1
    ro = engine.generate(PROMPTS, 2)
    check_layout(ro, len(PROMPTS), 2, 9, stop, engine.pad_id)
    assert engine.stats["decode_tokens"] > int(ro.lengths.sum()) - len(ro.lengths)  # the ignored extra tokens
    for r, ref in enumerate(teacher_forced_logprobs(model, ro, 0.9)):
        torch.testing.assert_close(ro.logprobs[r, : len(ref)], ref, atol=1e-4, rtol=0)


def test_recorded_routing_equals_the_trainers_with_refill_and_stops():
    """record_routing: every prompt and fed-back completion token's experts, per MoE layer, equal the ones the
    policy picks under teacher forcing (fp32), through refills and stops."""
    from grpo.model import DeepseekV3Policy, last_routing

    policy = DeepseekV3Policy(v3_model().config).eval()
    policy.load_state_dict(v3_model().state_dict(), strict=False)
    stop = list(range(40, 56))
    ro = RolloutEngine(policy, None, SamplingConfig(max_new_tokens=10, stop_token_ids=stop, max_batch=7, seed=3,
                                                    record_routing=True)).generate(PROMPTS, 3)
    assert {"stop", "length"} <= set(ro.finish_reason)
    moe_layers = [i for i, _ in policy.routers() if i < policy.config.num_hidden_layers]  # not the MTP layer
    for r, n in enumerate(ro.lengths.tolist()):
        prompt = ro.prompt_ids[r]
        with torch.no_grad():
            policy(input_ids=torch.tensor([prompt + ro.completion_ids[r, :n].tolist()]))
        ours = last_routing(policy)
        assert ro.routing[r].shape == (len(prompt) + n - 1, len(moe_layers), 2)
        for j, layer in enumerate(moe_layers):
            expected = ours[layer][: len(prompt) + n - 1].sort(-1).values
            assert torch.equal(ro.routing[r][:, j].long().sort(-1).values, expected), (r, layer)


def test_record_routing_needs_a_v3_policy():
    with pytest.raises(ConfigError, match="record_routing"):
        RolloutEngine(llama_model(), None, SamplingConfig(record_routing=True, stop_token_ids=[1]))
