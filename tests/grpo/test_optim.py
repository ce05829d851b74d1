"""grpo.optim: fp32 master weights under bf16 parameters, on the local path and through the GRPO trainer."""
import json
import math
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from grpo.config import ConfigError
from grpo.loss import LossConfig
from grpo.model import ModelConfig, load_policy
from grpo.optim import AdamWConfig, build_step
from grpo.rollout import SamplingConfig
from tests.grpo.test_trainer import SMALL, make, tokenizer  # noqa: F401 (module fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

LR = 3e-6  # DeepSeek-R1's RL learning rate


def _bf16_policy():
    torch.manual_seed(0)
    return load_policy(ModelConfig(init="tiny", mtp_layers=0, overrides=SMALL, dtype="bfloat16"), tokenizer())


def _loss(model):
    ids = torch.randint(3, 16, (4, 12), generator=torch.Generator().manual_seed(1))
    return model(input_ids=ids, labels=ids).loss


def test_bf16_step_equals_the_fp32_adamw_step_on_the_masters():
    model = _bf16_policy()
    cfg = AdamWConfig(lr=LR, betas=[0.9, 0.95], weight_decay=0.1, max_grad_norm=0.0)
    step = build_step(model, cfg, total_steps=10)
    names = [n for n, p in model.named_parameters()]
    start = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    assert any(p.dtype == torch.bfloat16 for p in model.parameters())
    step.backward(_loss(step.model))
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters()}
    assert step.step().stepped
    # the reference: torch's (unfused, fp32) AdamW from the same fp32 weights and the same gradient
    ref = {n: nn.Parameter(start[n].clone()) for n in names}
    for n in names:
        ref[n].grad = grads[n]
    torch.optim.AdamW([{"params": [ref[n] for n in names if ref[n].ndim >= 2], "weight_decay": 0.1},
                       {"params": [ref[n] for n in names if ref[n].ndim < 2], "weight_decay": 0.0}],
                      lr=LR, betas=(0.9, 0.95), foreach=False).step()
    masters = dict(zip(names, step.optimizer.masters))
    moved = 0
    for n, p in model.named_parameters():
        torch.testing.assert_close(masters[n].detach(), ref[n].detach(), rtol=1e-6, atol=0, msg=n)
        assert masters[n].dtype == torch.float32
        assert torch.equal(p.detach(), masters[n].detach().to(p.dtype)), n  # the compute copy = bf16(master)
        moved += int((masters[n].detach() != start[n]).sum())
    total = sum(p.numel() for p in model.parameters())
    assert moved / total > 0.99  # AdamW's first step moves every weight with a gradient by ~lr
    # without masters most of that update would round away in bf16
    lost = sum(int((start[n].to(torch.bfloat16) == ref[n].detach().to(torch.bfloat16)).sum()) for n in names)
    assert lost / total > 0.5


def test_masters_round_trip_through_state_dict():
    model = _bf16_policy()
    step = build_step(model, AdamWConfig(lr=1e-3), total_steps=10)
    for _ in range(2):
        step.backward(_loss(step.model))
        step.step()
    saved = step.optimizer.state_dict()
    fresh = build_step(_bf16_policy(), AdamWConfig(lr=1e-3), total_steps=10)
    fresh.optimizer.load_state_dict(saved)
    # the low-precision parameters' masters come from the optimizer state (fp32 parameters are their own
    # masters and come back with the model's weights)
    assert len(fresh.optimizer.low) > 0
    for (p, a), (q, b) in zip(step.optimizer.low, fresh.optimizer.low):
        assert torch.equal(a, b) and torch.equal(p, q)
    fp32 = build_step(load_policy(ModelConfig(init="tiny", mtp_layers=0, overrides=SMALL), tokenizer()),
                      AdamWConfig(lr=1e-3), total_steps=10)
    with pytest.raises(ValueError, match="fp32 master weights"):
        fp32.optimizer.load_state_dict(saved)


def test_non_finite_gradient_skips_the_update():
    model = nn.Linear(4, 4).to(torch.bfloat16)
    step = build_step(model, AdamWConfig(lr=1e-2), total_steps=10)
    before = [p.detach().clone() for p in model.parameters()]
    step.backward(model(torch.full((2, 4), math.inf, dtype=torch.bfloat16)).sum())
    result = step.step()
    assert not result.stepped and not math.isfinite(result.grad_norm)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert step.scheduler.last_epoch == 0 and all(p.grad is None for p in model.parameters())


def test_optimizer_settings_are_validated():
    with pytest.raises(ConfigError, match="adam_betas"):
        AdamWConfig(lr=1e-3, betas=[0.9])
    with pytest.raises(ConfigError, match="lr"):
        AdamWConfig(lr=0.0)


def test_grpo_in_bf16_keeps_the_engine_on_the_refreshed_bf16_copy(tmp_path):
    """Every RL step: the policy's bf16 parameters (what the rollout engine decodes with, same storage) equal the
    fp32 masters cast to bf16; mismatch metrics are finite and logged."""
    trainer = make(tmp_path, max_steps=3, lr=LR, loss=LossConfig(loss_type="dapo"))
    trainer.policy.to(torch.bfloat16)  # as model.dtype: bfloat16 loads it (the router stays fp32)
    trainer.policy.model.layers[1].mlp.gate.float()
    trainer.optim = build_step(trainer.policy, trainer.cfg.adamw, total_steps=3)
    trainer.model = trainer.optim.model
    ptrs = [p.data_ptr() for p in trainer.policy.parameters()]
    masters = trainer.optim.optimizer.masters
    start = [m.detach().clone() for m in masters]
    trainer.train()
    for p, m in zip(trainer.policy.parameters(), masters):
        assert m.dtype == torch.float32
        assert torch.equal(p.detach(), m.detach().to(p.dtype))
    assert [p.data_ptr() for p in trainer.policy.parameters()] == ptrs  # refreshed in place
    assert sum(int((m.detach() != s).sum()) for m, s in zip(masters, start)) > 0.9 * sum(m.numel() for m in masters)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "mismatch/k3" in r]
    assert len(steps) == 3
    for r in steps:
        for key in ("mismatch/k3", "mismatch/mean_abs", "mismatch/max_abs", "mismatch/outside_clip"):
            assert math.isfinite(r[key]) and r[key] >= 0, (key, r[key])
    assert steps[0]["mismatch/max_abs"] > 0  # bf16 engine vs bf16 trainer: not bitwise the same arithmetic


def test_recompute_and_corrections_in_a_run(tmp_path):
    """old_logprobs: recompute makes the first update's ratio 1 (the clip never fires on rollout noise) and the
    TIS / MIS metrics appear."""
    loss = LossConfig(loss_type="dapo", old_logprobs="recompute", rollout_is="token", rollout_mask="sequence")
    trainer = make(tmp_path, max_steps=1, minibatches=1, lr=LR, loss=loss)
    metrics = trainer.train_step()[0]
    assert metrics["ratio"] == pytest.approx(1.0, abs=1e-6) and metrics["clip"] == 0.0
    assert metrics["mismatch/k3"] < 1e-8  # fp32: the engine's log-probs are the trainer's
    assert metrics["mismatch/tis_weight"] == pytest.approx(1.0, abs=1e-4) and metrics["mismatch/mis_masked"] == 0.0


def test_rollout_routing_replay_cuts_the_bf16_mismatch(tmp_path):
    """bf16: the engine's and the trainer's router inputs differ by rounding, near-tied experts flip and their
    tokens' log-probs jump; replaying the engine's experts in the trainer's forward (R3) takes that out."""
    def first_step(replay):  # the tiny preset (3 MoE layers), sharper next-token distributions as after training
        trainer = make(tmp_path / replay, max_steps=1, minibatches=1, lr=LR, routing_replay=replay, overrides={},
                       sampling=SamplingConfig(max_new_tokens=24, max_batch=32))
        trainer.policy.to(torch.bfloat16)
        with torch.no_grad():
            trainer.policy.lm_head.weight.mul_(8)
        for _, router in trainer.policy.routers():
            router.float()
        return trainer.train_step()[0]

    off, r3 = first_step("off"), first_step("rollout")
    assert off["mismatch/expert_flips"] > 0 and "mismatch/expert_flips/layer_1" in off
    assert "mismatch/expert_flips" not in r3  # nothing to compare: the trainer used the engine's experts
    assert r3["mismatch/k3"] < off["mismatch/k3"] / 3, (r3["mismatch/k3"], off["mismatch/k3"])
    assert r3["mismatch/max_abs"] < off["mismatch/max_abs"]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_heap sets glibc's mallopt; no glibc here")
def test_keep_freed_heap_reuses_large_blocks_without_page_faults():
    # a fresh process: the setting is process-wide, and every CPU LocalStep in this one has made it
    script = """
import resource, torch
from grpo.optim import keep_freed_heap

def faults():  # of a fresh 64 MiB tensor, filled and freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 << 20)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults()
print(faults(), keep_freed_heap(), *[faults() for _ in range(6)])
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout.split()
    plain, kept, after = int(out[0]), out[1], [int(v) for v in out[3:]]
    assert plain > 10_000 and kept == "True"  # glibc maps blocks over 32 MiB afresh each time
    # once the heap has grown (the first call, sometimes one more), the block is reused: no fresh pages
    assert sum(f < 1_000 for f in after) >= 3, after
