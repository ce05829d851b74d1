import math

import pytest
import torch

from grpo.advantages import AdvantageConfig, combine_rewards, compute_advantages, group_stats, rewards_tensor
from grpo.config import ConfigError

NAN = float("nan")


def adv(rewards, group_size, weights=None, **kw):
    r = torch.tensor(rewards, dtype=torch.float32)
    r = r[:, None] if r.dim() == 1 else r
    w = torch.ones(r.shape[1]) if weights is None else torch.tensor(weights)
    return compute_advantages(r, w, group_size, AdvantageConfig(eps=0.0, **kw))


def close(t, expected):
    torch.testing.assert_close(t, torch.tensor(expected, dtype=torch.float32), atol=1e-5, rtol=1e-5)


def test_group_mean_std_r1():
    # group [1, 0, .5]: mean .5, unbiased std sqrt((.25 + .25 + 0) / 2) = .5
    out = adv([1.0, 0.0, 0.5], 3)
    close(out.advantages, [1.0, -1.0, 0.0])
    close(out.group_std, [0.5])
    assert out.zero_std.tolist() == [False]


def test_epsilon_is_added_to_std():
    out = compute_advantages(torch.tensor([[1.0], [0.0], [0.5]]), torch.ones(1), 3, AdvantageConfig(eps=0.5))
    close(out.advantages, [0.5, -0.5, 0.0])  # (r - .5) / (.5 + .5)


def test_dr_grpo_no_std_scaling():
    close(adv([1.0, 0.0, 0.5], 3, scale="none").advantages, [0.5, -0.5, 0.0])


def test_leave_one_out_baseline():
    # b_0 = (0 + .5)/2 = .25, b_1 = (1 + .5)/2 = .75, b_2 = (1 + 0)/2 = .5
    close(adv([1.0, 0.0, 0.5], 3, baseline="leave_one_out", scale="none").advantages, [0.75, -0.75, 0.0])


def test_batch_std_and_zero_std_groups():
    out = adv([1.0, 0.0, 0.5, 2.0, 2.0, 2.0], 3, scale="batch")
    # batch mean 1.25; squared deviations .0625 + 1.5625 + .5625 + 3 * .5625 = 3.875; unbiased var 3.875 / 5
    sigma = math.sqrt(3.875 / 5)
    close(out.advantages, [0.5 / sigma, -0.5 / sigma, 0.0, 0.0, 0.0, 0.0])
    assert out.zero_std.tolist() == [False, True]
    close(out.group_std, [0.5, 0.0])


def test_none_excluded_from_group_stats():
    # valid {1, 0}: mean .5, std sqrt(.5); the None row gets 0
    out = adv([1.0, NAN, 0.0], 3)
    s = math.sqrt(0.5)
    close(out.advantages, [0.5 / s, 0.0, -0.5 / s])
    assert torch.isnan(out.rewards[1])
    # one valid row only: no signal
    out = adv([NAN, 3.0, NAN], 3)
    close(out.advantages, [0.0, 0.0, 0.0])
    assert out.zero_std.tolist() == [True]


def test_weighted_sum_then_normalize_vs_normalize_then_sum():
    # two functions, weights (1, 2); f1 does not apply to row 0
    rewards = [[1.0, NAN], [0.0, 0.5]]
    total = adv(rewards, 2, weights=[1.0, 2.0])
    close(total.rewards, [1.0, 1.0])  # 1*1 + 0 ; 1*0 + 2*.5
    close(total.advantages, [0.0, 0.0])
    assert total.zero_std.tolist() == [True]
    # per function: f0 over {1, 0} -> +-1/sqrt(.5)*.5 ; f1 has one valid row -> 0
    per = adv(rewards, 2, weights=[1.0, 2.0], combine="normalize_then_sum")
    s = 0.5 / math.sqrt(0.5)
    close(per.advantages, [s, -s])


def test_normalize_then_sum_weights_each_function():
    rewards = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]
    out = adv(rewards, 4, weights=[1.0, 3.0], combine="normalize_then_sum", scale="none")
    # f0 mean .5 -> [.5, -.5, .5, -.5]; f1 mean .5 -> [-.5, .5, .5, -.5]
    close(out.advantages, [0.5 - 1.5, -0.5 + 1.5, 0.5 + 1.5, -0.5 - 1.5])


def test_combine_rewards_all_none_is_nan():
    r = combine_rewards(torch.tensor([[NAN, NAN], [1.0, NAN]]), torch.tensor([1.0, 2.0]))
    assert torch.isnan(r[0]) and r[1] == 1.0


def test_group_stats_counts():
    n, mean, std, zero = group_stats(torch.tensor([1.0, NAN, 3.0, 5.0]), 2)
    assert n.tolist() == [1, 2] and zero.tolist() == [True, False]
    close(mean, [1.0, 4.0])
    close(std, [0.0, math.sqrt(2.0)])


def test_rewards_tensor_orders_columns():
    t = rewards_tensor({"a": [1.0, None], "b": [0.5, 2.0]}, ["b", "a"])
    assert t.shape == (2, 2) and t[0].tolist() == [0.5, 1.0] and t[1, 0] == 2.0 and torch.isnan(t[1, 1])


def test_bad_shapes_and_config():
    with pytest.raises(ValueError, match="whole number of groups"):
        compute_advantages(torch.zeros(5, 1), torch.ones(1), 2, AdvantageConfig())
    with pytest.raises(ValueError, match="F = len"):
        compute_advantages(torch.zeros(4, 2), torch.ones(1), 2, AdvantageConfig())
    with pytest.raises(ConfigError, match="eps"):
        AdvantageConfig(eps=-1.0)
