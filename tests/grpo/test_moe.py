"""Routing and balancing math of grpo.moe on hand-computed tensors."""
import math

import pytest
import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

from grpo import moe


def logit(p):
    return math.log(p / (1 - p))


def test_route_group_limit_and_bias_for_selection_only():
    # 4 experts in 2 groups {0,1}, {2,3}. Scores: 0.9, 0.1 | 0.6, 0.6 -> group sums 1.0 | 1.2.
    logits = torch.tensor([[logit(0.9), logit(0.1), logit(0.6), logit(0.6)]])
    bias = torch.zeros(4)
    w, idx, s = moe.route(logits, bias, n_group=2, topk_group=1, top_k=1, norm=True, scale=1.0)
    assert idx.tolist() == [[2]] or idx.tolist() == [[3]]  # the best expert (0) sits in the losing group
    assert w.tolist() == [[pytest.approx(1.0)]]
    # without the group limit expert 0 wins
    _, idx, _ = moe.route(logits, bias, n_group=2, topk_group=2, top_k=1)
    assert idx.tolist() == [[0]]
    # the bias moves selection (expert 1 gets +1.0) but the weights use the raw scores
    bias = torch.tensor([0.0, 1.0, 0.0, 0.0])
    w, idx, s = moe.route(logits, bias, n_group=2, topk_group=1, top_k=2, norm=False, scale=2.5)
    assert sorted(idx[0].tolist()) == [0, 1]
    got = dict(zip(idx[0].tolist(), w[0].tolist()))
    assert got[0] == pytest.approx(0.9 * 2.5) and got[1] == pytest.approx(0.1 * 2.5)
    assert torch.allclose(s, torch.tensor([[0.9, 0.1, 0.6, 0.6]]))


def test_route_normalises_then_scales_and_replays_forced_choice():
    logits = torch.tensor([[logit(0.8), logit(0.2), logit(0.4), logit(0.5)]])
    w, idx, _ = moe.route(logits, torch.zeros(4), n_group=1, topk_group=1, top_k=2, norm=True, scale=2.0)
    got = dict(zip(idx[0].tolist(), w[0].tolist()))
    assert got == {0: pytest.approx(2 * 0.8 / 1.3), 3: pytest.approx(2 * 0.5 / 1.3)}
    w, idx, _ = moe.route(logits, torch.zeros(4), n_group=1, topk_group=1, top_k=2, scale=1.0,
                          forced=torch.tensor([[1, 2]]))
    assert idx.tolist() == [[1, 2]] and w[0].tolist() == [pytest.approx(0.2 / 0.6), pytest.approx(0.4 / 0.6)]


def test_route_matches_transformers_router():
    torch.manual_seed(0)
    config = DeepseekV3Config(hidden_size=16, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                              routed_scaling_factor=2.5)
    router = DeepseekV3TopkRouter(config)
    router.weight.data.normal_()
    router.e_score_correction_bias.normal_(std=0.3)
    x = torch.randn(50, 16)
    logits, w_ref, idx_ref = router(x)
    for by_argmax in (False, True):
        w, idx, _ = moe.route(logits, router.e_score_correction_bias, n_group=4, topk_group=2, top_k=4, scale=2.5,
                              by_argmax=by_argmax)
        order_ref, order = idx_ref.sort(-1), idx.sort(-1)
        assert torch.equal(order_ref.values, order.values)
        assert torch.allclose(w_ref.gather(1, order_ref.indices), w.gather(1, order.indices))


def test_top_by_argmax_by_hand():
    x = torch.tensor([[0.1, 0.7, -1.0, 0.7, 0.3], [float("-inf"), 2.0, 1.0, 0.0, -3.0]])
    assert moe.top_by_argmax(x, 3).tolist() == [[1, 3, 4], [1, 2, 3]]  # largest first, ties to the lower index


def test_expert_load_excludes_padding():
    idx = torch.tensor([[[0, 1], [1, 2], [3, 3]]])  # [B=1, T=3, K=2]
    mask = torch.tensor([[True, True, False]])
    assert moe.expert_load(idx, 4, mask).tolist() == [1, 2, 1, 0]
    assert moe.expert_load(idx, 4).tolist() == [1, 2, 1, 2]


def test_balance_loss_by_hand():
    # One sequence, T=2 tokens, E=2 experts, K=1. Scores s = [[0.2, 0.6], [0.5, 0.5]].
    scores = torch.tensor([[[0.2, 0.6], [0.5, 0.5]]])
    idx = torch.tensor([[[1], [0]]])
    # f = E/(K T) * counts = 2/2 * [1, 1] = [1, 1];  s' = [[.25, .75], [.5, .5]] -> P = [0.375, 0.625]
    assert moe.balance_loss(scores, idx).item() == pytest.approx(1.0)
    idx = torch.tensor([[[1], [1]]])  # f = [0, 2] -> L = 2 * 0.625
    assert moe.balance_loss(scores, idx).item() == pytest.approx(1.25)
    # a padded second token: T = 1, f = 2 * [0, 1], P = [0.25, 0.75] -> 1.5; a fully padded sequence is skipped
    scores2 = torch.cat([scores, torch.rand(1, 2, 2)])
    idx2 = torch.cat([idx, torch.zeros(1, 2, 1, dtype=torch.long)])
    mask = torch.tensor([[True, False], [False, False]])
    assert moe.balance_loss(scores2, idx2, mask).item() == pytest.approx(1.5)


def test_balance_loss_gradient_flows_through_scores_only():
    scores = torch.tensor([[[0.2, 0.6], [0.5, 0.5]]], requires_grad=True)
    moe.balance_loss(scores, torch.tensor([[[1], [1]]])).backward()
    # d/ds of sum_i f_i * P_i with f = [0, 2]: nonzero, and pushes expert 1's share down
    assert scores.grad is not None and scores.grad[0, 0, 1] > 0


def test_bias_update_and_max_violation():
    bias = torch.zeros(4)
    load = torch.tensor([10.0, 2.0, 4.0, 4.0])  # mean 5
    assert moe.bias_update(bias, load, 0.1).tolist() == pytest.approx([-0.1, 0.1, 0.1, 0.1])
    assert moe.bias_update(bias, torch.full((4,), 3.0), 0.1).tolist() == [0, 0, 0, 0]
    assert moe.max_violation(load) == pytest.approx(1.0)
    assert moe.max_violation(torch.zeros(4)) == 0.0
