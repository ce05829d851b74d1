"""Expert parallelism parity: 2 CPU processes (gloo, ``accelerate launch`` with recipes/accelerate/cpu_2proc.yaml),
ep_size=2 through DeepSpeed AutoEP, against 1 process with the plain model on the same global batch.

One launch runs every multi-process case (this file is also the worker: ``--worker DIR``); the tests compare
its results with single-process references computed here. Tolerances (fp32): losses and gradient norms
rel 1e-5, weights after 2 AdamW steps atol 2e-5 (measured ~1e-6: the order of floating-point sums differs),
router biases and expert loads exactly (they are counts and sign updates).
The batches give both ranks the same number of sequences and tokens, so the mean over ranks of per-rank
losses is the single-process loss of the global batch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from grpo.config import ConfigError
from grpo.loss import LossConfig, LossNorm, grpo_loss, logprobs_and_entropy
from grpo.model import DeepseekV3Policy, ModelConfig, moe_metrics, preset_config, update_router_bias
from grpo.parallel import ParallelConfig, build_deepspeed_config
from grpo.rollout import RolloutEngine, SamplingConfig

REPO = Path(__file__).resolve().parents[2]
NO_DEEPSPEED = "DeepSpeed is not installed (pip install --no-build-isolation -r requirements-deepspeed.txt)"
needs_deepspeed = pytest.mark.skipif(find_spec("deepspeed") is None, reason=NO_DEEPSPEED)

TINY = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2, first_k_dense_replace=1,
            num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8, num_experts_per_tok=3, n_group=4,
            topk_group=2, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
            vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, num_nextn_predict_layers=1)
POLICY = ModelConfig(bias_update_speed=0.01, seq_aux_alpha=0.01, mtp_layers=1, mtp_loss_weight=0.3)
OPTIM = dict(lr=1e-3, weight_decay=0.1, max_grad_norm=1.0)
PROMPT, COMPLETION = 6, 10
LENGTHS = [10, 7, 8, 9]  # completion lengths; halves (rank 0: rows 0-1, rank 1: rows 2-3) hold 17 tokens each
ROLLOUT = SamplingConfig(temperature=0.0, max_new_tokens=5, max_batch=4, stop_token_ids=[2], cuda_graphs=False)
ROLLOUT_PROMPTS = [[[1, 5, 9, 4]], [[1, 7, 3], [1, 11, 12, 13, 14], [1, 20]]]  # per rank: 1 prompt vs 3


BF16_OPTIM = dict(lr=3e-6, weight_decay=0.1, max_grad_norm=0.0)


def bf16_grad(shape) -> torch.Tensor:
    """A fixed gradient of small integers times 2^-3 (exact in bf16), never zero."""
    g = torch.randint(1, 4, shape, generator=torch.Generator().manual_seed(sum(shape) + len(shape))).float()
    return g * torch.where(torch.arange(g.numel()).view(shape) % 3 == 0, -0.125, 0.125)


def load_policy_from(path) -> DeepseekV3Policy:
    model = DeepseekV3Policy.from_pretrained(path, dtype=torch.float32)
    model.policy_config = POLICY
    return model.train()  # from_pretrained returns eval mode; loads are counted in training forwards


def sft_loss(model, batch, rows):
    x = batch["sft_ids"][rows]
    return model(input_ids=x, labels=x).loss


def grpo_step_loss(model, batch, rows):
    """The GRPO trainer's objective on a fixed rollout batch: clipped surrogate ('grpo' aggregation) + aux_loss."""
    ids, attn, mask = batch["ids"][rows], batch["attention_mask"][rows], batch["completion_mask"][rows]
    out = model(input_ids=ids, attention_mask=attn)
    logp, _ = logprobs_and_entropy(out.logits[:, PROMPT - 1:-1], ids[:, PROMPT:])
    pg = grpo_loss(logp=logp, old_logp=batch["old_logp"][rows], advantages=batch["advantages"][rows], mask=mask,
                   cfg=LossConfig(loss_type="grpo"), norm=LossNorm.of(mask))
    return pg.loss + out.aux_loss


def local_loads(model) -> list[torch.Tensor]:
    return [r.load.clone() for _, r in model.routers()]


# ---------------------------------------------------------------------------------------------------------
# worker: runs under `accelerate launch`, one process per rank
# ---------------------------------------------------------------------------------------------------------
def _train(engine, loss_fn, batch, rows, steps, record):
    import torch.distributed as dist

    from grpo.parallel import full_state_dict

    for step in range(steps):
        loss = loss_fn(engine, batch, rows)
        engine.backward(loss, scale_wrt_gas=False)
        engine.step()
        if step == 0:
            loads = local_loads(engine.module)
            record["loads"] = [[torch.empty_like(t) for _ in range(dist.get_world_size())] for t in loads]
            for gathered, t in zip(record["loads"], loads):
                dist.all_gather(gathered, t)
        update_router_bias(engine)
        total = loss.detach().clone()
        dist.all_reduce(total)
        record.setdefault("losses", []).append(total.item() / dist.get_world_size())
        record.setdefault("grad_norms", []).append(float(engine.get_global_grad_norm()))
        record.setdefault("max_vio", []).append({k: v for k, v in moe_metrics(engine).items() if "max_vio" in k})
    record["state"] = full_state_dict(engine)


def worker(out: Path) -> None:
    import torch.distributed as dist

    from grpo.parallel import (expert_parallel_group, full_state_dict, load_full_state_dict, load_optimizer_state,
                               make_accelerator, parallelize, save_optimizer_state, save_pretrained)

    accelerator = make_accelerator(timeout_s=120)
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = torch.load(out / "batch.pt")
    rows = slice(rank * 4 // world, (rank + 1) * 4 // world)
    results = {}

    # SFT, ZeRO-1, starting from a checkpoint written by a single process (ep_size=1 -> 2)
    engine, _ = parallelize(load_policy_from(out / "init"), OPTIM, ep_size=2, zero_stage=1)
    rollout = RolloutEngine(engine.module, None, ROLLOUT, ep_group=expert_parallel_group(engine))
    ro = rollout.generate(ROLLOUT_PROMPTS[rank], group_size=2)
    results["rollout"] = dict(ids=ro.completion_ids, mask=ro.completion_mask, logprobs=ro.logprobs)
    results["sft"] = record = {}
    zero = engine.optimizer  # DeepSpeed's MoE parameter groups: (name, is MoE, tensors, ranks partitioning them)
    record["groups"] = [(g["name"], bool(g.get("moe")), len(zero.bit16_groups[i]), zero.partition_count[i])
                        for i, g in enumerate(zero.optimizer.param_groups)]
    _train(engine, sft_loss, batch, rows, 2, record)
    save_pretrained(engine, out / "sft_ep2")
    # resume at the same layout: (weights, optimizer partitions) saved, one step, restored, the same step again
    save_optimizer_state(engine, out)
    saved = full_state_dict(engine)
    third = []
    for _ in range(2):
        engine.backward(sft_loss(engine, batch, rows), scale_wrt_gas=False)
        engine.step()
        third.append(full_state_dict(engine))
        load_full_state_dict(engine, saved)
        load_optimizer_state(engine, out)
    results["resume_diff"] = max((third[0][k] - third[1][k]).abs().max().item() for k in saved)

    # GRPO, ZeRO-2
    engine, _ = parallelize(load_policy_from(out / "init"), OPTIM, ep_size=2, zero_stage=2)
    results["grpo"] = record = {}
    _train(engine, grpo_step_loss, batch, rows, 2, record)

    # bf16 weights through DeepSpeed (ZeRO-1 over both ranks): one AdamW step at lr 3e-6 on a loss linear in the
    # parameters, so the gradient is exactly BF16_GRAD on every rank whatever the arithmetic
    from deepspeed.utils import safe_get_full_fp32_param

    engine, _ = parallelize(load_policy_from(out / "init").to(torch.bfloat16), BF16_OPTIM, ep_size=1, zero_stage=1)
    params = dict(engine.module.named_parameters())
    engine.backward(sum((p.float() * bf16_grad(p.shape)).sum() for p in params.values()), scale_wrt_gas=False)
    engine.step()
    results["bf16"] = {"masters": {n: safe_get_full_fp32_param(p).clone() for n, p in params.items()},
                       "weights": {n: p.detach().clone() for n, p in params.items()}}

    torch.save(results, out / f"rank{rank}.pt")
    accelerator.wait_for_everyone()


def hang_worker(out: Path) -> None:
    """Rank 1 stops answering once the EP model is built; rank 0's next forward (an all-to-all in DeepSpeed's
    expert-parallel group, which DeepSpeed creates with torch's 30-minute default) must fail after the recipe's
    timeout."""
    import torch.distributed as dist

    from grpo.parallel import make_accelerator, parallelize

    timeout = 10  # startup skew between the ranks on a busy machine stays well below this
    make_accelerator(timeout_s=timeout)
    engine, _ = parallelize(load_policy_from(out / "init"), OPTIM, ep_size=2, zero_stage=1, timeout_s=timeout)
    dist.barrier()
    if dist.get_rank() == 1:
        time.sleep(300)
    start = time.time()
    try:
        engine(input_ids=torch.randint(3, TINY["vocab_size"], (1, 8)))
    finally:
        (out / "rank0_waited.json").write_text(json.dumps(time.time() - start))


# ---------------------------------------------------------------------------------------------------------
# tests (single process: references, then compare)
# ---------------------------------------------------------------------------------------------------------
def _launch(out: Path, mode: str, timeout: int) -> subprocess.CompletedProcess:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "recipes/accelerate/cpu_2proc.yaml"), "--main_process_port", str(port),
           str(Path(__file__).resolve()), mode, str(out)]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _initial_model(path: Path) -> DeepseekV3Policy:
    torch.manual_seed(0)
    model = DeepseekV3Policy._from_config(preset_config("tiny", TINY), dtype=torch.float32)
    with torch.no_grad():
        for _, router in model.routers():  # a non-zero correction bias, so selection depends on it
            router.e_score_correction_bias.copy_(torch.randn(TINY["n_routed_experts"]) * 0.05)
    model.save_pretrained(path)
    return load_policy_from(path)


def _batch(model) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    n = len(LENGTHS)
    completion_mask = torch.arange(COMPLETION)[None] < torch.tensor(LENGTHS)[:, None]
    ids = torch.randint(3, TINY["vocab_size"], (n, PROMPT + COMPLETION), generator=g)
    ids[:, PROMPT:] = ids[:, PROMPT:].masked_fill(~completion_mask, TINY["pad_token_id"])
    attention_mask = torch.cat([torch.ones(n, PROMPT, dtype=torch.bool), completion_mask], dim=1).long()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention_mask).logits
        logp, _ = logprobs_and_entropy(logits[:, PROMPT - 1:-1], ids[:, PROMPT:])
    old_logp = (logp + 0.3 * torch.randn(logp.shape, generator=g)) * completion_mask  # ratios away from 1: clipping
    return dict(sft_ids=torch.randint(3, TINY["vocab_size"], (n, 16), generator=g), ids=ids,
                attention_mask=attention_mask, completion_mask=completion_mask.float(), old_logp=old_logp,
                advantages=torch.tensor([1.0, -0.5, 0.8, -1.2]))


def _reference(model, loss_fn, batch, steps=2) -> dict:
    matrices = [p for p in model.parameters() if p.ndim >= 2]  # the stages' AdamW: decay on matrices only
    vectors = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": matrices}, {"params": vectors, "weight_decay": 0.0}], lr=OPTIM["lr"],
                                  weight_decay=OPTIM["weight_decay"])
    record = {}
    for step in range(steps):
        loss = loss_fn(model, batch, slice(None))
        loss.backward()
        record.setdefault("grad_norms", []).append(float(torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                                                           OPTIM["max_grad_norm"])))
        optimizer.step()
        optimizer.zero_grad()
        if step == 0:
            record["loads"] = local_loads(model)
        update_router_bias(model)
        record.setdefault("losses", []).append(loss.item())
        record.setdefault("max_vio", []).append({k: v for k, v in moe_metrics(model).items() if "max_vio" in k})
    record["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return record


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    if find_spec("deepspeed") is None:
        pytest.skip(NO_DEEPSPEED)
    out = tmp_path_factory.mktemp("ep")
    model = _initial_model(out / "init")
    batch = _batch(model)
    torch.save(batch, out / "batch.pt")
    proc = _launch(out, "--worker", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return dict(out=out, batch=batch, ranks=ranks,
                sft=_reference(load_policy_from(out / "init"), sft_loss, batch),
                grpo=_reference(load_policy_from(out / "init"), grpo_step_loss, batch))


def _assert_same_training(ep: dict, ref: dict):
    assert ep["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    assert ep["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-5)
    assert ref["grad_norms"][0] > OPTIM["max_grad_norm"]  # clipping active: the norm over sharded experts matters
    assert set(ep["state"]) == set(ref["state"])  # transformers' names, experts gathered
    for key, value in ref["state"].items():
        tol = 0 if key.endswith("e_score_correction_bias") else 2e-5
        torch.testing.assert_close(ep["state"][key], value, atol=tol, rtol=0, msg=key)


def test_sft_step_ep2_matches_single_process(run):
    _assert_same_training(run["ranks"][0]["sft"], run["sft"])
    # experts (w1, w2, w3 of the MoE and MTP layers) in their own ZeRO group, partitioned over their expert-data-
    # parallel group (2 ranks / ep 2 = 1 rank); everything else partitioned over both ranks
    groups = run["ranks"][0]["sft"]["groups"]
    assert [g for g in groups if g[1]] == [("ep_size_2", True, 6, 1)]
    assert {g[3] for g in groups if not g[1]} == {2}
    for key, value in run["ranks"][0]["sft"]["state"].items():  # both ranks hold the same full model
        torch.testing.assert_close(run["ranks"][1]["sft"]["state"][key], value, atol=0, rtol=0)


def test_grpo_step_ep2_zero2_matches_single_process(run):
    _assert_same_training(run["ranks"][0]["grpo"], run["grpo"])


def test_router_bias_update_reduces_loads_over_ranks(run):
    for case in ("sft", "grpo"):
        ep, ref = run["ranks"][0][case], run[case]
        for per_rank, total in zip(ep["loads"], ref["loads"]):
            assert not torch.equal(per_rank[0], per_rank[1])  # the ranks route differently: the sum matters
            torch.testing.assert_close(per_rank[0] + per_rank[1], total, atol=0, rtol=0)
        assert ep["max_vio"] == ref["max_vio"]  # MaxVio of the global batch on every step
        bias = [k for k in ref["state"] if k.endswith("e_score_correction_bias")]
        assert len(bias) == 2  # the MoE layer and the MTP layer
        for k in bias:
            assert not torch.equal(ref["state"][k], load_policy_from(run["out"] / "init").state_dict()[k])


def test_gathered_checkpoint_loads_at_ep1(run):
    loaded = DeepseekV3Policy.from_pretrained(run["out"] / "sft_ep2", dtype=torch.float32).state_dict()
    ep = run["ranks"][0]["sft"]["state"]
    assert set(loaded) == set(ep)
    for key, value in ep.items():
        torch.testing.assert_close(loaded[key], value, atol=0, rtol=0, msg=key)
    # and the other way: the workers started from a single-process checkpoint and reproduced its first loss
    assert run["ranks"][0]["sft"]["losses"][0] == pytest.approx(run["sft"]["losses"][0], rel=1e-6)


def test_resume_at_same_layout_repeats_the_step_exactly(run):
    assert run["ranks"][0]["resume_diff"] == 0.0
    assert run["ranks"][1]["resume_diff"] == 0.0


def test_rollouts_under_ep_match_single_process(run):
    """Rank 0 has 1 prompt, rank 1 has 3 (more than its slots): rank 0 idles through dummy steps, no hang."""
    model = load_policy_from(run["out"] / "init")
    for rank, prompts in enumerate(ROLLOUT_PROMPTS):
        ref = RolloutEngine(model, None, ROLLOUT).generate(prompts, group_size=2)
        ep = run["ranks"][rank]["rollout"]
        assert torch.equal(ep["ids"], ref.completion_ids) and torch.equal(ep["mask"], ref.completion_mask)
        torch.testing.assert_close(ep["logprobs"], ref.logprobs, atol=1e-5, rtol=0)


def test_deepspeed_bf16_keeps_fp32_masters_that_equal_the_fp32_adamw_step(run):
    """DeepSpeed's bf16 path: fp32 masters stepped like fp32 AdamW from the same weights and gradient (lr 3e-6),
    the bf16 weights the masters rounded to bf16."""
    model = load_policy_from(run["out"] / "init").to(torch.bfloat16)
    start = {n: p.detach().float() for n, p in model.named_parameters()}
    ref = {n: torch.nn.Parameter(w.clone()) for n, w in start.items()}
    for p in ref.values():
        p.grad = bf16_grad(p.shape)
    torch.optim.AdamW([{"params": [p for p in ref.values() if p.ndim >= 2]},
                       {"params": [p for p in ref.values() if p.ndim < 2], "weight_decay": 0.0}],
                      lr=BF16_OPTIM["lr"], weight_decay=BF16_OPTIM["weight_decay"], betas=(0.9, 0.999),
                      foreach=False).step()
    got = run["ranks"][0]["bf16"]
    moved = 0
    for n, p in ref.items():
        master = got["masters"][n]
        assert master.dtype == torch.float32
        torch.testing.assert_close(master, p.detach(), rtol=1e-6, atol=0, msg=n)
        assert torch.equal(got["weights"][n], master.to(torch.bfloat16)), n
        moved += int((master != start[n]).sum())
    assert moved == sum(p.numel() for p in ref.values())  # every weight moved by ~3e-6 in fp32


@needs_deepspeed
def test_hung_rank_ends_job_within_timeout(tmp_path):
    _initial_model(tmp_path / "init")
    start = time.time()
    proc = _launch(tmp_path, "--hang-worker", timeout=240)
    elapsed = time.time() - start
    assert proc.returncode != 0
    waited = json.loads((tmp_path / "rank0_waited.json").read_text())
    assert 9.5 <= waited < 40, waited  # the 10 s process-group timeout, not the 300 s sleep
    assert elapsed < 200


def test_deepspeed_config_fills_auto_and_refuses_conflicts():
    base = REPO / "recipes/deepspeed/zero2_ep.json"
    cfg = build_deepspeed_config(OPTIM, ep_size=4, zero_stage=None, deepspeed_config=str(base), bf16=True)
    assert cfg["zero_optimization"]["stage"] == 2 and cfg["bf16"]["enabled"] is True
    assert cfg["expert_parallel"] == dict(enabled=True, autoep_size=4, preset_model="deepseek_v3",
                                          use_grouped_mm=False, load_balance_coeff=None)
    assert cfg["gradient_clipping"] == 1.0 and cfg["managed_gradient_accumulation"] is False
    assert cfg["optimizer"]["params"]["lr"] == 1e-3 and cfg["optimizer"]["params"]["weight_decay"] == 0.1
    with pytest.raises(ConfigError, match="zero_optimization.stage"):
        build_deepspeed_config(OPTIM, ep_size=4, zero_stage=1, deepspeed_config=str(base))
    assert "expert_parallel" not in build_deepspeed_config(OPTIM, ep_size=1, zero_stage=1)
    with pytest.raises(ConfigError, match="learning rate"):
        build_deepspeed_config({"weight_decay": 0.1}, ep_size=2, zero_stage=1)
    with pytest.raises(ConfigError, match="ep_size"):
        ParallelConfig(ep_size=0)
    with pytest.raises(ConfigError, match="deepspeed_config"):
        ParallelConfig(deepspeed_config="recipes/deepspeed/nope.json")


if __name__ == "__main__":
    {"--worker": worker, "--hang-worker": hang_worker}[sys.argv[1]](Path(sys.argv[2]))
