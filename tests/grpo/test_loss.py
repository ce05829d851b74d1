import math

import pytest
import torch
import torch.nn.functional as F

from grpo.config import ConfigError
from grpo.loss import (LossConfig, _SelectiveLogSoftmax, LossNorm, aggregate, clipped_surrogate, grpo_loss, k3_kl, log_importance_ratio,
                       head_logprobs_and_entropy, logprobs_and_entropy, loss_mask)


def close(t, expected, **kw):
    torch.testing.assert_close(t, torch.as_tensor(expected, dtype=torch.float32), atol=1e-5, rtol=1e-5, **kw)


def test_token_clip_symmetric():
    log_ratio = torch.tensor([[1.5, 0.5, 1.0]]).log()
    cfg = LossConfig(epsilon=0.2)
    # A = +1: -min(r, clip(r)) ; A = -1: -min(-r, -clip(r)) = max(r, clip(r))
    close(clipped_surrogate(log_ratio, torch.tensor([1.0]), cfg), [[-1.2, -0.5, -1.0]])
    close(clipped_surrogate(log_ratio, torch.tensor([-1.0]), cfg), [[1.5, 0.8, 1.0]])


def test_clip_higher_and_delta():
    log_ratio = torch.tensor([[1.5, 0.5]]).log()
    close(clipped_surrogate(log_ratio, torch.tensor([1.0]), LossConfig(epsilon=0.2, epsilon_high=0.28)), [[-1.28, -0.5]])
    # two-sided: the unclipped ratio is capped at delta = 1.4 for negative advantages
    close(clipped_surrogate(log_ratio, torch.tensor([-1.0]), LossConfig(epsilon=0.2, delta=1.4)), [[1.4, 0.8]])


def test_gspo_sequence_ratio_value():
    logp = torch.tensor([[math.log(0.4), math.log(0.3), 0.0]])
    old = torch.tensor([[math.log(0.2), math.log(0.3), 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    # s = exp((log 2 + 0) / 2) = sqrt(2) for every token
    close(log_importance_ratio(logp, old, mask, "sequence").exp(), [[math.sqrt(2)] * 3])
    close(log_importance_ratio(logp, old, mask, "token").exp(), [[2.0, 1.0, 1.0]])


def test_k3_kl():
    # pi = .5, pi_ref = .25: .5 - log .5 - 1
    close(k3_kl(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])), [0.5 + math.log(2) - 1])
    close(k3_kl(torch.tensor([-1.3]), torch.tensor([-1.3])), [0.0])


def test_k3_is_never_negative_and_keeps_small_gaps():
    """fp32 log-probs a few ulps apart (an fp32 run's rollout/trainer gap): exp(d) - 1 - d rounded at 1 and went
    negative (-1.5e-9 per token in the mismatch metric); k3 is >= 0 and within an ulp of d of the float64 value."""
    g = torch.Generator().manual_seed(0)
    train = -torch.rand(4096, generator=g) * 5
    rollout = train + torch.randn(4096, generator=g) * 1e-6
    d = train - rollout
    exact = torch.expm1(d.double()) - d.double()
    assert float((d.exp() - 1 - d).min()) < -1e-8  # the old formula's rounding
    got = k3_kl(rollout, train)
    assert float(got.min()) >= 0
    torch.testing.assert_close(got.double(), exact, rtol=0, atol=2e-13)  # ulp(1e-6) = 1.1e-13
    metric = Mismatch.of(train[None], rollout[None], torch.ones(1, 4096), LossConfig()).metrics()["mismatch/k3"]
    assert metric >= 0 and metric == pytest.approx(float(exact.mean()), abs=2e-14)


def test_aggregations():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    norm = LossNorm(sequences=2, tokens=4, max_completion_length=3, micro_batches=2)
    close(aggregate(per_token, mask, "grpo", norm), (2.0 + 4.0) / 2)
    close(aggregate(per_token, mask, "dapo", norm), 10.0 / 4)
    close(aggregate(per_token, mask, "dr_grpo", norm), 10.0 / (2 * 3))
    close(aggregate(per_token, mask, "bnpo", norm), 10.0 / 4 / 2)


def test_micro_batches_sum_to_full_batch():
    g = torch.Generator().manual_seed(0)
    per_token = torch.randn(4, 5, generator=g)
    mask = (torch.rand(4, 5, generator=g) > 0.3).float()
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        norm = LossNorm.of(mask, 5)
        full = aggregate(per_token, mask, loss_type, norm)
        parts = aggregate(per_token[:2], mask[:2], loss_type, norm) + aggregate(per_token[2:], mask[2:], loss_type, norm)
        close(parts, full)


def test_loss_mask_truncated():
    m = torch.ones(3, 2)
    truncated = torch.tensor([False, True, False])
    close(loss_mask(m, truncated, LossConfig(mask_truncated_completions=True)), [[1, 1], [0, 0], [1, 1]])
    close(loss_mask(m, truncated, LossConfig()), m)


def test_logprobs_and_entropy_temperature():
    logits = torch.tensor([[[2.0, 0.0, 0.0]]])
    logp, ent = logprobs_and_entropy(logits, torch.tensor([[0]]), temperature=2.0)
    p = torch.tensor([math.e, 1.0, 1.0]) / (math.e + 2)  # softmax([1, 0, 0])
    close(logp, [[math.log(p[0])]])
    close(ent, [[float(-(p * p.log()).sum())]])


def test_blocked_logprobs_match_log_softmax():
    """The blocked kernel (entropy without gradient) equals log_softmax in value and gradient, any block size."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 11, generator=g)
    ids = torch.randint(11, (3, 5), generator=g)
    weights = torch.randn(3, 5, generator=g)
    a = logits.clone().requires_grad_(True)
    logp, ent = logprobs_and_entropy(a, ids, 0.7, entropy_grad=True)
    (logp * weights).sum().backward()
    for rows in (1, 4, 15, 64):
        b = logits.clone().requires_grad_(True)
        logp_b, ent_b = _SelectiveLogSoftmax.apply(b, ids, 0.7, rows)
        (logp_b * weights).sum().backward()
        close(logp_b, logp.detach())
        close(ent_b, ent.detach())
        close(b.grad, a.grad)
    assert not logprobs_and_entropy(logits.requires_grad_(True), ids)[1].requires_grad


def test_blocked_logprobs_of_bf16_logits_divide_in_fp32():
    """bf16 logits (the bf16 head's output) are made fp32 before the temperature divides them, as .float() / T."""
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(2, 6, 300, generator=g) * 4).bfloat16()
    ids = torch.randint(300, (2, 6), generator=g)
    logp, ent = _SelectiveLogSoftmax.apply(logits, ids, 0.7, 5)
    ref = torch.log_softmax(logits.float() / 0.7, dim=-1)
    torch.testing.assert_close(logp, ref.gather(-1, ids[..., None]).squeeze(-1), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(ent, -(ref.exp() * ref).sum(-1), rtol=1e-6, atol=1e-5)


def _policy(n=3, length=4, vocab=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(n, length, vocab, generator=g, requires_grad=True)
    ids = torch.randint(vocab, (n, length), generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.float32)[:n]
    adv = torch.randn(n, generator=g)
    return theta, ids, mask, adv


def _score(theta, ids):
    """d log softmax(theta)[id] / d theta = onehot(id) - softmax(theta): [N, L, V]."""
    return F.one_hot(ids, theta.shape[-1]).float() - theta.detach().softmax(-1)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_gradient_is_policy_gradient_at_rollout_policy(level):
    """With pi = pi_old (ratio 1, no clipping), grad L = -(1/N) sum_i A_i (1/|o_i|) sum_t grad log pi(o_it)."""
    theta, ids, mask, adv = _policy()
    logp, _ = logprobs_and_entropy(theta, ids)
    cfg = LossConfig(importance_sampling_level=level)
    out = grpo_loss(logp=logp, old_logp=logp.detach(), advantages=adv, mask=mask, cfg=cfg, norm=LossNorm.of(mask))
    out.loss.backward()
    n, lengths = mask.shape[0], mask.sum(-1)
    expected = -(adv / lengths / n)[:, None, None] * mask[..., None] * _score(theta, ids)
    close(theta.grad, expected)
    close(out.loss, -(adv.sum() / n))


def test_gradient_dapo_and_dr_grpo():
    for loss_type, denom in (("dapo", 9.0), ("dr_grpo", 3 * 4.0)):
        theta, ids, mask, adv = _policy()
        logp, _ = logprobs_and_entropy(theta, ids)
        out = grpo_loss(logp=logp, old_logp=logp.detach(), advantages=adv, mask=mask,
                        cfg=LossConfig(loss_type=loss_type), norm=LossNorm.of(mask))
        out.loss.backward()
        close(theta.grad, -(adv / denom)[:, None, None] * mask[..., None] * _score(theta, ids))


def test_gspo_gradient_off_policy():
    """Unclipped GSPO: grad L = -(1/N) sum_i s_i A_i (1/|o_i|) sum_t grad log pi(o_it)."""
    theta, ids, mask, adv = _policy(seed=1)
    logp, _ = logprobs_and_entropy(theta, ids)
    old = logp.detach() + 0.01 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(2))
    out = grpo_loss(logp=logp, old_logp=old, advantages=adv, mask=mask,
                    cfg=LossConfig(importance_sampling_level="sequence", epsilon=0.5), norm=LossNorm.of(mask))
    out.loss.backward()
    lengths = mask.sum(-1)
    s = (((logp.detach() - old) * mask).sum(-1) / lengths).exp()
    close(theta.grad, -(s * adv / lengths / 3)[:, None, None] * mask[..., None] * _score(theta, ids))


def test_clipped_tokens_get_no_gradient():
    theta, ids, mask, _ = _policy()
    logp, _ = logprobs_and_entropy(theta, ids)
    adv = torch.ones(3)
    old = logp.detach() - 1.0  # ratio e > 1.2 with A > 0: clipped everywhere
    out = grpo_loss(logp=logp, old_logp=old, advantages=adv, mask=mask, cfg=LossConfig(), norm=LossNorm.of(mask))
    out.loss.backward()
    close(theta.grad, torch.zeros_like(theta))
    close(out.metrics["clip_high"], 1.0)
    close(out.metrics["clip_low"], 0.0)


def test_rollout_logprob_far_below_the_trainers_gives_a_finite_gradient():
    """A token the rollout scored 100 nats below the trainer (r = e^100 = inf in fp32): clipped with A > 0, so
    no gradient, and the other tokens' gradients stay finite and unchanged (no 0 * inf = NaN)."""
    theta, ids, mask, _ = _policy()
    logp, _ = logprobs_and_entropy(theta, ids)
    old = logp.detach().clone()
    old[0, 0] -= 100.0
    adv = torch.ones(3)
    out = grpo_loss(logp=logp, old_logp=old, advantages=adv, mask=mask, cfg=LossConfig(loss_type="dapo"), norm=LossNorm.of(mask))
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(theta.grad).all()
    theta2 = theta.detach().clone().requires_grad_()
    logp2, _ = logprobs_and_entropy(theta2, ids)
    mask2 = mask.clone()
    mask2[0, 0] = 0  # the same loss without that (clipped) token's zero contribution
    grpo_loss(logp=logp2, old_logp=logp2.detach(), advantages=adv, mask=mask2, cfg=LossConfig(loss_type="dapo"),
              norm=LossNorm.of(mask)).loss.backward()
    close(theta.grad, theta2.grad)


def test_kl_and_entropy_terms():
    theta, ids, mask, adv = _policy()
    logp, ent = logprobs_and_entropy(theta, ids, entropy_grad=True)
    ref = logp.detach() - 0.5
    beta, alpha = 0.1, 0.01
    out = grpo_loss(logp=logp, old_logp=logp.detach(), advantages=adv, mask=mask, ref_logp=ref, entropy=ent,
                    cfg=LossConfig(beta=beta, entropy_coef=alpha, loss_type="dapo"), norm=LossNorm.of(mask))
    kl = math.exp(-0.5) + 0.5 - 1  # pi_ref / pi = e^-.5 on every token
    expected = (-(adv[:, None]) + beta * kl - alpha * ent.detach()) * mask
    close(out.loss, expected.sum() / mask.sum())
    close(out.metrics["kl"], kl)
    out.loss.backward()
    # KL part of the gradient: beta * (1 - pi_ref/pi) grad log pi, per token / T
    theta2 = theta.detach().clone().requires_grad_(True)
    logp2, ent2 = logprobs_and_entropy(theta2, ids, entropy_grad=True)
    ((-(adv[:, None]) * logp2 - alpha * ent2) * mask).sum().div(mask.sum()).backward()
    kl_grad = beta * (1 - math.exp(-0.5)) * mask[..., None] * _score(theta, ids) / mask.sum()
    close(theta.grad, theta2.grad + kl_grad)


def test_missing_inputs_and_bad_config():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp=x, old_logp=x, advantages=torch.zeros(1), mask=x + 1, cfg=LossConfig(beta=0.1), norm=LossNorm.of(x))
    with pytest.raises(ValueError, match="entropy"):
        grpo_loss(logp=x, old_logp=x, advantages=torch.zeros(1), mask=x + 1, cfg=LossConfig(entropy_coef=0.1),
                  norm=LossNorm.of(x))
    with pytest.raises(ConfigError, match="delta"):
        LossConfig(delta=1.1)
    with pytest.raises(ConfigError, match="epsilon"):
        LossConfig(epsilon=1.5)
    assert LossConfig(epsilon=0.3).epsilon_high == 0.3


# ---- rollout/trainer mismatch: metrics, TIS, MIS ------------------------------------------------------------
from grpo.loss import Mismatch, rollout_correction  # noqa: E402

# two sequences; row 0 has 3 tokens, row 1 has 2 (last column padding)
TRAIN = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, 0.0]])
ROLLOUT = torch.tensor([[-1.5, -2.0, -0.1], [-0.3, -3.2, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
# d = train - rollout: row 0: 0.5, 0, -0.4; row 1: 0, 2.0


def test_mismatch_metrics_by_hand():
    m = Mismatch.of(TRAIN, ROLLOUT, MASK, LossConfig(epsilon=0.2, epsilon_high=0.28)).metrics()
    d = [0.5, 0.0, -0.4, 0.0, 2.0]
    assert m["mismatch/mean_abs"] == pytest.approx(sum(abs(x) for x in d) / 5)
    assert m["mismatch/max_abs"] == pytest.approx(2.0)
    assert m["mismatch/k3"] == pytest.approx(sum(math.exp(x) - 1 - x for x in d) / 5)
    # rho = e^d: 1.65 (> 1.28), 1, 0.67 (< 0.8), 1, 7.39 (> 1.28)
    assert m["mismatch/outside_clip"] == pytest.approx(3 / 5)
    both = Mismatch.of(TRAIN[:1], ROLLOUT[:1], MASK[:1], LossConfig()) + Mismatch.of(TRAIN[1:], ROLLOUT[1:], MASK[1:], LossConfig())
    assert both.metrics() == pytest.approx(Mismatch.of(TRAIN, ROLLOUT, MASK, LossConfig()).metrics())


def test_truncated_importance_sampling_by_hand():
    token = rollout_correction(TRAIN, ROLLOUT, MASK, LossConfig(old_logprobs="recompute", rollout_is="token",
                                                                rollout_is_cap=2.0))
    expected = torch.tensor([[math.exp(0.5), 1.0, math.exp(-0.4)], [1.0, 2.0, 0.0]])  # e^2 = 7.39 capped at 2
    torch.testing.assert_close(token.weights, expected)
    assert token.metrics["mismatch/tis_capped"] == pytest.approx(1 / 5)
    assert torch.equal(token.keep, torch.ones(2, 3))
    seq = rollout_correction(TRAIN, ROLLOUT, MASK, LossConfig(old_logprobs="recompute", rollout_is="sequence",
                                                              rollout_is_cap=2.0))
    # row 0: prod w = e^(0.5 + 0 - 0.4) = e^0.1; row 1: e^2 -> capped at 2; padding weight 0
    torch.testing.assert_close(seq.weights, torch.tensor([[math.exp(0.1)] * 3, [2.0, 2.0, 0.0]]))


def test_masked_importance_sampling_by_hand():
    token = rollout_correction(TRAIN, ROLLOUT, MASK, LossConfig(old_logprobs="recompute", rollout_mask="token",
                                                                rollout_mask_band=[0.7, 1.5]))
    # w = 1.65 (out), 1, 0.67 (out), 1, 7.39 (out)
    torch.testing.assert_close(token.keep, torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]))
    assert token.weights is None and token.metrics["mismatch/mis_masked"] == pytest.approx(3 / 5)
    seq = rollout_correction(TRAIN, ROLLOUT, MASK, LossConfig(old_logprobs="recompute", rollout_mask="sequence",
                                                              rollout_mask_band=[0.5, 2.0]))
    # geometric means: row 0 e^(0.1/3) = 1.03 (kept), row 1 e^(2/2) = 2.72 (dropped)
    torch.testing.assert_close(seq.keep, torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    assert seq.metrics["mismatch/mis_masked_sequences"] == pytest.approx(1 / 2)


def test_tis_weights_scale_the_surrogate_only():
    cfg = LossConfig(loss_type="bnpo", beta=0.1, old_logprobs="recompute", rollout_is="token")
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    args = dict(old_logp=logp.detach(), advantages=torch.tensor([1.0]), mask=torch.ones(1, 2), cfg=cfg,
                norm=LossNorm.of(torch.ones(1, 2)), ref_logp=torch.tensor([[-1.5, -2.0]]))
    plain = grpo_loss(logp=logp, **args).loss
    weighted = grpo_loss(logp=logp, is_weights=torch.tensor([[2.0, 0.5]]), **args).loss
    # ratio 1: surrogate -A per token; plain = mean(-1 + beta kl), weighted = mean(-w + beta kl)
    kl = (math.exp(-0.5) + 0.5 - 1) * 0.1
    assert float(plain.detach()) == pytest.approx((-1 - 1 + kl) / 2)
    assert float(weighted.detach()) == pytest.approx((-2.0 - 0.5 + kl) / 2)


def test_corrections_need_recompute():
    with pytest.raises(ConfigError, match="old_logprobs"):
        LossConfig(rollout_is="token")
    with pytest.raises(ConfigError, match="rollout_mask_band"):
        LossConfig(old_logprobs="recompute", rollout_mask="token", rollout_mask_band=[1.1, 2.0])


@pytest.mark.parametrize("rows,cols", [(1, None), (5, None), (7, 50), (21, 50), (64, None),  # 21 = all rows
                                       (5, 7), (21, 16), (3, 1), (64, 49)])  # 5 and 7 do not divide 21 and 50
def test_head_logprobs_equal_the_materialised_logits(rows, cols):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 7, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    ids, weights = torch.randint(0, 50, (3, 7), generator=g), torch.randn(3, 7, generator=g)
    # fp32 GEMMs of other shapes: last-bit differences
    check_head_against_materialised(h, w, ids, weights, rows, cols, dict(rtol=1e-6, atol=1e-5),
                                    dict(rtol=1e-5, atol=1e-6))


def check_head_against_materialised(h, w, ids, weights, rows, cols, value_tol: dict, grad_tol: dict) -> None:
    """``head_logprobs_and_entropy`` at T 0.7 in tiles of rows x cols against the materialised logits h W^T:
    log-probs and entropies within value_tol, the gradients of sum(logp * weights) by h and W within grad_tol."""
    logp, ent = head_logprobs_and_entropy(h, w, ids, 0.7, rows=rows, cols=cols)
    ref, ref_ent = logprobs_and_entropy(h @ w.t(), ids, 0.7)
    torch.testing.assert_close(logp, ref, **value_tol)
    torch.testing.assert_close(ent, ref_ent, **value_tol)
    got = torch.autograd.grad((logp * weights).sum(), (h, w))
    want = torch.autograd.grad((ref * weights).sum(), (h, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **grad_tol)


def test_head_logprobs_under_autocast_recompute_the_forwards_logits():
    """fp32 weights under bf16 autocast (train.bf16 with fp32 weights): the forward's logits are a bf16 GEMM, and the
    backward's recomputed probabilities must be those logits' (a recompute outside autocast, in fp32, would not
    sum to one against the forward's log-sum-exp). Reference: the same bf16-GEMM logits, then fp32 autograd."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 9, 32, generator=g, requires_grad=True)
    w = (torch.randn(300, 32, generator=g) * 0.5).requires_grad_()
    ids, weights = torch.randint(0, 300, (2, 9), generator=g), torch.randn(2, 9, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, _ = head_logprobs_and_entropy(h, w, ids, 0.7, rows=5, cols=64)
    grad_h, = torch.autograd.grad((logp * weights).sum(), h)
    z = F.linear(h.detach().bfloat16(), w.detach().bfloat16()).float()
    ref = torch.log_softmax(z / 0.7, dim=-1).gather(-1, ids[..., None]).squeeze(-1)
    torch.testing.assert_close(logp, ref, rtol=1e-6, atol=1e-5)
    gz = (F.one_hot(ids, 300) - torch.softmax(z / 0.7, dim=-1)) * (weights / 0.7)[..., None]
    torch.testing.assert_close(grad_h, gz @ w.detach(), rtol=1e-4, atol=1e-5)
