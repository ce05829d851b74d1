"""Sampler: truncation sets on hand-computed distributions, exact blocked top-k, draw frequencies, logprobs."""
import math

import pytest
import torch

from grpo.sampling import StopStrings, inverse_cdf, _topk, sample, truncate


def kept(probs, **kw):
    vals, idx = truncate(torch.tensor([probs]), **kw)
    return sorted(int(i) for v, i in zip(vals[0], idx[0]) if v > 0)


def test_top_k():
    assert kept([0.1, 0.4, 0.2, 0.3], top_k=2) == [1, 3]
    assert kept([0.1, 0.4, 0.2, 0.3], top_k=1) == [1]


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = [0.05, 0.5, 0.15, 0.3]
    assert kept(probs, top_p=0.8) == [1, 3]  # 0.5 + 0.3 reaches 0.8
    assert kept(probs, top_p=0.81) == [1, 2, 3]
    assert kept(probs, top_p=0.1) == [1]  # the most likely token always stays


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    probs = [0.4, 0.3, 0.2, 0.1]
    # after top-3 the masses are 4/9, 3/9, 2/9: the first two hold 7/9 >= 0.75, so the third goes;
    # on the raw distribution 0.4 + 0.3 = 0.7 < 0.75 would keep it
    assert kept(probs, top_k=3, top_p=0.75) == [0, 1]
    assert kept(probs, top_p=0.75) == [0, 1, 2]


def test_min_p_is_relative_to_the_most_likely_token():
    probs = [0.5, 0.3, 0.15, 0.05]
    assert kept(probs, top_k=4, min_p=0.25) == [0, 1, 2]  # threshold 0.125
    assert kept(probs, top_k=4, min_p=0.7) == [0]


@pytest.mark.parametrize("vocab,k", [(4096, 7), (4096, 16), (32000, 50), (1000, 5), (97, 10)])
def test_blocked_topk_is_exact(vocab, k):
    probs = torch.rand(6, vocab, generator=torch.Generator().manual_seed(vocab))
    vals, idx = _topk(probs, k)
    ref = probs.topk(k, dim=-1)
    assert torch.equal(vals, ref.values) and torch.equal(idx, ref.indices)


@pytest.mark.parametrize("size", [8, 4096])  # plain cumsum and block-then-token paths
def testinverse_cdf_frequencies_and_zero_weights(size):
    g = torch.Generator().manual_seed(0)
    weights = torch.rand(size, generator=g) ** 4
    weights[::3] = 0.0
    n = 40000
    draws = inverse_cdf(weights.expand(n, size).clone(), torch.rand(n, generator=g))
    counts = torch.bincount(draws, minlength=size).float()
    assert counts[::3].sum() == 0
    expected = weights / weights.sum() * n
    assert (counts - expected).abs().max() < 6 * expected.max().sqrt() + 1
    # extreme uniforms never land on a zero weight
    edge = inverse_cdf(weights.expand(2, size).clone(), torch.tensor([0.0, 1.0 - 2**-24]))
    assert (weights[edge] > 0).all()


def test_sampling_follows_the_truncated_distribution():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    n = 40000
    tokens, _ = sample(logits.expand(n, 4), torch.rand(n, generator=torch.Generator().manual_seed(1)), top_k=3, top_p=0.75)
    freq = torch.bincount(tokens, minlength=4).float() / n
    torch.testing.assert_close(freq, torch.tensor([4 / 7, 3 / 7, 0.0, 0.0]), atol=0.015, rtol=0)


def test_logprob_is_the_untruncated_tempered_distribution():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(64, 256, generator=g) * 3
    for kw in (dict(temperature=0.6, top_k=5), dict(temperature=1.7, top_p=0.5, min_p=0.1), dict(temperature=1.0)):
        tokens, logprobs = sample(logits, torch.rand(64, generator=g), **kw)
        ref = torch.log_softmax(logits / kw["temperature"], -1).gather(1, tokens[:, None]).squeeze(1)
        torch.testing.assert_close(logprobs, ref, atol=1e-5, rtol=0)
    tokens, logprobs = sample(logits, torch.rand(64, generator=g), temperature=0.0)
    assert torch.equal(tokens, logits.argmax(-1))
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1).amax(-1), atol=1e-5, rtol=0)


def test_top_p_without_top_k_on_a_flat_distribution_sorts_everything():
    logits = torch.zeros(2, 4096)
    logits[:, 7] = math.log(50.0)  # one token with a little mass, the rest flat
    tokens, _ = sample(logits, torch.tensor([0.3, 0.99]), top_p=0.9)
    assert tokens.shape == (2,) and (tokens < 4096).all()
    vals, _ = truncate(torch.softmax(logits, -1), top_p=0.9)
    assert (vals > 0).sum(-1).tolist() == [3682, 3682]  # 1 + (0.9 * 4145 - 50) flat tokens; 1024 would not reach 0.9


class _CharTokenizer:
    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(ord("a") + i) for i in ids)


def test_stop_strings_across_token_boundaries():
    stops = StopStrings(_CharTokenizer(), ["cde", "x"])
    assert stops.hit([0, 1, 2, 3, 4])  # "abcde"
    assert not stops.hit([0, 1, 2, 3])
    assert stops.hit([5] * 50 + [23])  # only the tail is decoded
    assert not StopStrings(_CharTokenizer(), [])
    with pytest.raises(ValueError, match="need a tokenizer"):
        StopStrings(None, ["x"])
