"""MTP self-speculative decoding (``grpo.engine.speculative``): the multi-token verify step equals one-token
decode steps, the sampled distribution equals non-speculative sampling (chi-square), the returned logprobs
equal teacher forcing (refill, stops inside accepted runs), greedy is unchanged, acceptance is reported,
and configurations that cannot speculate are refused."""
import pytest
import torch
from transformers import DeepseekV3Config

import grpo.engine.slots as slots_mod
from grpo.config import ConfigError
from grpo.engine.speculative import accept
from grpo.engine.v3 import V3Decoder
from grpo.model import DeepseekV3Policy
from grpo.rollout import RolloutEngine, SamplingConfig
from tests.grpo.test_rollout import llama_model, teacher_forced_logprobs

VOCAB = 48
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19, 20], [21, 22], [23]]


def policy(sharpen: float = 8.0, mtp: int = 1, **overrides) -> DeepseekV3Policy:
    """A small random V3 policy with an MTP module; the output head is scaled by ``sharpen`` so that the
    policy's and the drafts' distributions are peaked and different (a wrong acceptance rule shows)."""
    torch.manual_seed(0)
    cfg = DeepseekV3Config(**{
        **dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
               first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
               n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, q_lora_rank=32, kv_lora_rank=16,
               qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=256,
               num_nextn_predict_layers=mtp, pad_token_id=0, eos_token_id=1, bos_token_id=1),
        **overrides})
    model = DeepseekV3Policy(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)
        for _, router in model.routers():
            router.e_score_correction_bias.normal_(0, 0.1)
    return model


def verify_and_steps(model, prompts: list[list[int]], tokens: torch.Tensor):
    """The same prompts in two V3 decoders; ``tokens`` [n, m] fed as m one-token decode steps into one and as one
    verify step into the other. Returns (one-step decoder, verify decoder, verify logits [n, m, V], the one-step
    logits stacked [n, m, V], prompt lengths)."""
    n, m = tokens.shape
    steps = V3Decoder(model, slots=n, max_len=64, draft_tokens=1)
    multi = V3Decoder(model, slots=n, max_len=64, draft_tokens=1)
    lens = torch.tensor([len(p) for p in prompts], device=tokens.device)
    for dec in (steps, multi):
        dec.prefill(prompts, [[i] for i in range(n)])
        dec.positions[:n] = lens
    one = []
    for j in range(m):
        steps.tokens[:n] = tokens[:, j]
        one.append(steps.decode(n, int(steps.positions[:n].max()) + 1))
        steps.positions[:n] += 1
    return steps, multi, multi.lm_head(multi.verify(tokens, int(lens.max()) + 1)), torch.stack(one, dim=1), lens


@torch.inference_mode()
def test_multi_token_step_equals_one_token_steps():
    """fp32: a verify step over m tokens gives the logits and cache latents of m one-token decode steps."""
    model, m = policy(), 4
    tokens = torch.randint(3, VOCAB, (3, m), generator=torch.Generator().manual_seed(1))
    steps, multi, logits, ref, lens = verify_and_steps(model, PROMPTS[:3], tokens)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    for s, n in enumerate(lens.tolist()):
        written = slice(0, n + m)
        torch.testing.assert_close(multi.cache.data[:, s, written], steps.cache.data[:, s, written], atol=1e-5,
                                   rtol=1e-5)


def test_acceptance_rule_emits_the_target_distribution():
    """``accept`` alone: one position, p and q fixed and different; the emitted first token ~ p (the
    rejection residual included)."""
    n, g = 200_000, torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])
    drafts = torch.multinomial(q, n, replacement=True, generator=g)[:, None]
    tokens, count = accept(p.expand(n, 2, 4), q.expand(n, 1, 4), drafts, torch.rand(n, 2, generator=g))
    freq = torch.bincount(tokens[:, 0], minlength=4) / n
    torch.testing.assert_close(freq, p, atol=5e-3, rtol=0)
    assert 0.5 < (count == 2).float().mean() < 0.7  # sum min(p, q) = 0.6 accepted


def chi_square_p(a: torch.Tensor, b: torch.Tensor) -> float:
    """p-value of the two-sample chi-square test that token samples a and b come from one distribution
    (bins with fewer than 10 expected counts merged)."""
    counts = torch.stack([torch.bincount(a, minlength=VOCAB), torch.bincount(b, minlength=VOCAB)]).double()
    order = counts.sum(0).argsort(descending=True)
    counts = counts[:, order]
    small = counts.sum(0) < 20
    counts = torch.cat([counts[:, ~small], counts[:, small].sum(1, keepdim=True)], dim=1)
    counts = counts[:, counts.sum(0) > 0]
    expected = counts.sum(1, keepdim=True) * counts.sum(0, keepdim=True) / counts.sum()
    stat = ((counts - expected) ** 2 / expected).sum()
    df = counts.shape[1] - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.double), stat / 2))


@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.8, top_k=6, top_p=0.9)],
                         ids=["plain", "topk-topp"])
def test_speculative_sampling_reproduces_the_token_distribution(sampling):
    """Per-position token histograms of 3000 samples (positions 2..5: the first comes from the prefill)
    against non-speculative sampling of the same policy, k = 2 chained drafts; fixed seeds."""
    model = policy()
    rows, new = 3000, 5
    samples = {}
    for mode, seed in (("none", 1), ("mtp", 2)):
        cfg = SamplingConfig(**sampling, max_new_tokens=new, stop_token_ids=[], max_batch=rows, seed=seed,
                             speculative=mode, speculative_tokens=2)
        engine = RolloutEngine(model, None, cfg)
        samples[mode] = engine.generate([[5, 6, 7]], rows).completion_ids
    assert engine.stats["spec_accept_rate_1"] < 0.95  # drafts are rejected: the residual draws are exercised
    for t in range(1, new):
        assert chi_square_p(samples["none"][:, t], samples["mtp"][:, t]) > 1e-3, t


@pytest.mark.parametrize("lag", [0, 1], ids=["read-each-round", "pipelined"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.7, top_k=10, top_p=0.9),
                                      dict(temperature=1.2, min_p=0.05)], ids=["plain", "topk-topp", "minp"])
def test_speculative_logprobs_equal_teacher_forcing_with_refill_and_stops(monkeypatch, k, sampling, lag):
    """15 rows through 7 slots (refill), stop tokens hit inside accepted runs and the token limit cuts runs;
    pipelined (lag 1, as on CUDA): each round's counts are read while the next round runs, whose positions the
    device advanced."""
    cut = []
    add_runs = slots_mod.Outputs.add_runs

    def recording(self, rows, tokens, logprobs, count):
        before = self.count[rows].clone()
        done = add_runs(self, rows, tokens, logprobs, count)
        cut.extend(zip(done.tolist(), (self.count[rows] - before < count).tolist()))
        return done

    monkeypatch.setattr(slots_mod.Outputs, "add_runs", recording)
    model = policy(sharpen=3.0)
    stop = [40, 41, 42, 43]
    cfg = SamplingConfig(**sampling, max_new_tokens=12, stop_token_ids=stop, max_batch=7, seed=3,
                         speculative="mtp", speculative_tokens=k)
    engine = RolloutEngine(model, None, cfg)
    engine._lag = lag
    ro = engine.generate(PROMPTS, 3)
    assert {"stop", "length"} <= set(ro.finish_reason)
    if k > 1:
        assert any(done and inside for done, inside in cut)  # a run ended inside (stop or limit)
    for r, ref in enumerate(teacher_forced_logprobs(model, ro, sampling["temperature"])):
        torch.testing.assert_close(ro.logprobs[r, : len(ref)], ref, atol=1e-4, rtol=0)
        ids = ro.completion_ids[r, : ro.lengths[r]].tolist()
        assert not set(ids[:-1]) & set(stop) and (ro.finish_reason[r] == "stop") == (ids[-1] in stop)


@pytest.mark.parametrize("lag", [0, 1], ids=["read-each-round", "pipelined"])
def test_greedy_is_unchanged_and_acceptance_is_reported(lag):
    model = policy(sharpen=3.0)
    out = {}
    for mode in ("none", "mtp"):
        cfg = SamplingConfig(temperature=0.0, max_new_tokens=16, stop_token_ids=[1], max_batch=4,
                             speculative=mode, speculative_tokens=3)
        engine = RolloutEngine(model, None, cfg)
        engine._lag = lag
        out[mode] = engine.generate(PROMPTS, 1)
    assert torch.equal(out["none"].completion_ids, out["mtp"].completion_ids)
    torch.testing.assert_close(out["none"].logprobs, out["mtp"].logprobs, atol=1e-5, rtol=0)
    stats = out["mtp"].stats
    assert {"spec_accept_rate_1", "spec_accept_rate_2", "spec_accept_rate_3", "spec_tokens_per_step"} <= set(stats)
    assert 1.0 <= stats["spec_tokens_per_step"] <= 4.0 and stats["decode_steps"] < stats["decode_tokens"] + 1


def test_policies_that_cannot_speculate_are_refused():
    with pytest.raises(ConfigError, match="speculative"):
        RolloutEngine(policy(mtp=0), None, SamplingConfig(speculative="mtp", stop_token_ids=[]))
    with pytest.raises(ConfigError, match="speculative"):
        RolloutEngine(llama_model(), None, SamplingConfig(speculative="mtp", stop_token_ids=[]))
    with pytest.raises(ConfigError, match="speculative"):
        SamplingConfig(speculative="mtp", record_routing=True)
    with pytest.raises(ConfigError, match="speculative_tokens"):
        SamplingConfig(speculative="mtp", speculative_tokens=0)


@torch.inference_mode()
def test_drafts_are_the_mtp_module_under_teacher_forcing(monkeypatch):
    """fp32: in every round the first draft's distribution q is the MTP module's at the slot's last position as
    the trained module computes it (``grpo.model``'s MTP forward over the emitted sequence: main-model hidden
    state at i, embedding of t_{i+1}), also after rounds that emitted 1..k+1 tokens (pending positions). The
    exactness tests hold for any q, so a wrong draft would only show as a low acceptance (on an H100, 0.3% from a
    fit that did not generalise; this pins the engine's side)."""
    from transformers.masking_utils import create_causal_mask

    import grpo.engine.speculative as spec
    model, k, rounds = policy(sharpen=3.0), 2, 6
    dec = V3Decoder(model, slots=3, max_len=64, draft_tokens=k)
    prompts = PROMPTS[:3]
    logits = dec.prefill(prompts, [[0], [1], [2]])
    first = logits.argmax(dim=-1)
    dec.tokens[:3], dec.positions[:3] = first, torch.tensor([len(p) for p in prompts])
    seqs = [p + [int(t)] for p, t in zip(prompts, first)]
    drafted, kept = [], []
    accept = spec.accept

    def recording(p, q, drafts, uniform):
        drafted.append(q[:, 0].clone())
        return accept(p, q, drafts, uniform)

    monkeypatch.setattr(spec, "accept", recording)
    speculator = spec.Speculator(dec, dict(temperature=1.0), torch.Generator().manual_seed(0))
    starts = []
    for _ in range(rounds):
        starts.append(dec.positions[:3].clone())
        tokens, _, count = speculator(3, int(dec.positions[:3].max()) + k + 1)
        for s in range(3):
            seqs[s] += tokens[s, : count[s]].tolist()
        assert dec.positions[:3].tolist() == (starts[-1] + count).tolist()  # the round advances them
        kept.append(count)
    assert set(torch.cat(kept).tolist()) >= {1, 2}  # rounds with and without rejections
    layer = model.mtp_layers()[0]
    for s, seq in enumerate(seqs):
        ids = torch.tensor([seq])
        hidden = model.model(ids).last_hidden_state
        n = ids.shape[1] - 1
        embeds = model.model.embed_tokens(ids[:, 1:])
        pos = torch.arange(n)[None]
        mask = create_causal_mask(config=model.config, inputs_embeds=embeds, attention_mask=None, cache=None,
                                  position_ids=pos)
        h = layer(hidden[:, :n], embeds, attention_mask=mask, position_ids=pos,
                  position_embeddings=model.model.rotary_emb(embeds, pos))
        q_ref = torch.softmax(model.lm_head(layer.shared_head["norm"](h))[0].float(), dim=-1)  # row i: t_{i+2}
        for r in range(rounds):
            at = int(starts[r][s]) - 1  # the slot's input t_p at position p: MTP position p - 1 drafts t_{p+1}
            torch.testing.assert_close(drafted[r][s], q_ref[at], atol=1e-5, rtol=1e-4)
