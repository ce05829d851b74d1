import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import grpo.optim
import grpo.trainer
from grpo.config import ConfigError
from grpo.loss import LossConfig
from grpo.model import ModelConfig, load_policy
from grpo.rollout import SamplingConfig
from grpo.trainer import GRPOTrainer, PromptStream, TrainerConfig, pad_rows
from grpo.reward_types import RewardScores
from rewards.registry import RewardSet, RewardSpec

SMALL = dict(num_hidden_layers=2, hidden_size=64, q_lora_rank=32, kv_lora_rank=16, intermediate_size=128,
             moe_intermediate_size=32)


pytestmark = pytest.mark.usefixtures("one_thread")


def tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"t{i}": i for i in range(3, 16)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def target_reward(prompts, completions, **columns):
    """Fraction of the completion's tokens equal to t5; rows marked ``flat`` score 0.5 whatever they say."""
    flat = columns.get("flat") or [False] * len(completions)
    values = [0.5 if f else c.split().count("t5") / max(1, len(c.split())) for c, f in zip(completions, flat)]
    return RewardScores({"target": values}, {"target": 1.0}, {"target": 0})


def llama(tok):
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, eos_token_id=1)
    return LlamaForCausalLM(config)


def make(tmp_path, *, rows=None, sampling=None, arch="v3", overrides=SMALL, rewards=target_reward, **kw):
    tok = tokenizer()
    torch.manual_seed(0)
    model = load_policy(ModelConfig(init="tiny", mtp_layers=0, overrides=overrides), tok) if arch == "v3" else llama(tok)
    rows = rows or [{"prompt": " ".join(f"t{3 + (i * 7 + j) % 13}" for j in range(4))} for i in range(16)]
    kw = {"prompts_per_step": 4, "group_size": 8, "micro_batch_size": 16, "minibatches": 2, "lr": 3e-3, "save_every": 0,
          "loss": LossConfig(loss_type="dapo"), **kw}
    sampling = sampling or SamplingConfig(max_new_tokens=6, max_batch=32)
    return GRPOTrainer(TrainerConfig(**kw), model=model, tokenizer=tok, sampling=sampling, rewards=rewards,
                       rows=rows, encode=lambda r: tok.encode(r["prompt"]), output_dir=str(tmp_path), wandb_mode="disabled")


def user_verifier(prompts, completions, kind, **_):
    """A user's verifier: 1 when the completion says t5 or t6, else 0; only on ``custom`` rows."""
    return [float(bool({"t5", "t6"} & set(c.split()))) if k == "custom" else None for c, k in zip(completions, kind)]


user_verifier.reward_tags = {"verifiable": True}


def always_one(prompts, completions, **_):
    return [1.0] * len(completions)


HERE = __name__


def accuracy_of(trainer, samples):
    """The accuracy metric recomputed from the rewards: per row the best verifiable score that applies."""
    verifiable = [f for f, name in enumerate(trainer.reward_names) if name in ("accuracy", f"{HERE}:user_verifier")]
    per_row = [max(v for v in (float(samples.rewards[r, f]) for f in verifiable) if not math.isnan(v))
               for r in range(len(samples.prompts)) if not samples.rewards[r, verifiable].isnan().all()]
    return sum(per_row) / len(per_row)


def test_custom_verifiable_reward_counts_toward_accuracy_like_the_builtin(tmp_path):
    """Math rows (the built-in accuracy applies) and custom rows (a dotted-path verifier applies): the accuracy
    metric takes each row's verifiable score, whoever wrote it; an untagged reward (always 1) stays out."""
    rows = [{"prompt": " ".join(f"t{3 + (i * 7 + j) % 13}" for j in range(4)), "kind": kind,
             "answer": "7" if kind == "math" else None} for i in range(8) for kind in ("math", "custom")]
    rewards = RewardSet([RewardSpec(name="accuracy"), RewardSpec(name=f"{HERE}:user_verifier"),
                         RewardSpec(name=f"{HERE}:always_one", weight=0.1)])
    t = make(tmp_path, rows=rows, rewards=rewards)
    _, generated, _ = t._sample()
    m = t._sample_metrics(generated)
    assert [tags.verifiable for tags in t.reward_tags] == [True, True, False]
    assert m["accuracy"] == pytest.approx(accuracy_of(t, generated))
    custom = ~generated.rewards[:, 1].isnan()
    assert custom.any() and (~custom).any() and 0 < float(generated.rewards[custom, 1].mean()) < 1
    assert m["accuracy"] != pytest.approx(float(generated.rewards[~custom, 0].mean()))  # the custom rows count
    assert m[f"rewards/{HERE}:user_verifier/mean"] == pytest.approx(float(generated.rewards[custom, 1].mean()))
    # the recipe turns the tag off: the custom rows no longer count, the math rows alone make the accuracy
    t.rewards = RewardSet([RewardSpec(name="accuracy"),
                           RewardSpec(name=f"{HERE}:user_verifier", tags={"verifiable": False})])
    _, generated, _ = t._sample()
    m = t._sample_metrics(generated)
    math_rows = ~generated.rewards[:, 0].isnan()
    assert m["accuracy"] == pytest.approx(float(generated.rewards[math_rows, 0].mean()))


def test_no_verifiable_reward_no_accuracy_metric(tmp_path):
    rewards = RewardSet([RewardSpec(name=f"{HERE}:always_one"),
                         RewardSpec(name=f"{HERE}:user_verifier", tags={"verifiable": False})])
    rows = [{"prompt": "t3 t4", "kind": "custom"}] * 4
    t = make(tmp_path, rows=rows, rewards=rewards)
    m = t._sample_metrics(t._sample()[1])
    assert "accuracy" not in m and m[f"rewards/{HERE}:always_one/mean"] == 1.0


def rewards_over(trainer, steps):
    return [trainer.train_step()[0]["reward"] for _ in range(steps)]


def test_grpo_learns_and_zero_advantages_do_not(tmp_path):
    grpo = rewards_over(make(tmp_path / "a", max_steps=6, lr=1e-2), 6)
    control = make(tmp_path / "b", max_steps=6, lr=1e-2)
    control._advantages = lambda batch: torch.zeros(len(batch.prompts))
    flat = rewards_over(control, 6)
    assert grpo[0] < 0.15 and flat[0] < 0.15  # ~1/13 of the tokens by chance
    assert sum(grpo[-2:]) / 2 > 0.5, grpo
    assert sum(flat[-2:]) / 2 < 0.2, flat


def test_first_update_ratio_is_one_at_rollout_temperature(tmp_path):
    """The trainer's recomputed log-probs (logits / T) match the engine's: ratio 1 before any update."""
    t = make(tmp_path, max_steps=1, minibatches=1, micro_batch_size=32,
             sampling=SamplingConfig(max_new_tokens=6, max_batch=32, temperature=0.7))
    m = t.train_step()[0]
    assert abs(m["ratio"] - 1) < 1e-4 and m["clip"] == 0.0
    for key in ("rewards/target/mean", "completions/clipped_ratio", "frac_reward_zero_std", "moe/max_vio_mean",
                "tokens_per_s/rollout", "tokens_per_s/train", "entropy", "grad_norm", "aux_loss"):
        assert math.isfinite(m[key]), key
    assert t.reference is None  # beta = 0: no reference model


@pytest.mark.parametrize("arch", ["v3", "llama"])
def test_recomputed_logprobs_equal_the_engines(tmp_path, arch):
    """Left-padded prompts of different lengths, T = 0.7: the training forward reproduces pi_old token by token."""
    rows = [{"prompt": " ".join(f"t{3 + j}" for j in range(1 + i % 5))} for i in range(8)]
    t = make(tmp_path, rows=rows, arch=arch, sampling=SamplingConfig(max_new_tokens=6, max_batch=32, temperature=0.7))
    samples = t._sample()[0]
    batch = t._to_batch(samples, torch.zeros(len(samples.prompts)))
    assert len(set(map(len, samples.prompt_ids))) > 1
    logp, _, _ = t._forward(t.model, batch, torch.arange(len(batch)), grad=False)
    diff = ((logp - batch.old_logprobs) * batch.completion_mask).abs().max()
    assert diff < 1e-4, diff


def weights(trainer):
    return {k: v.clone() for k, v in trainer.policy.state_dict().items()}


def test_kill_and_resume_matches_uninterrupted(tmp_path):
    kw = dict(max_steps=3, save_every=2, mu=2, loss=LossConfig(beta=0.05), ref_reset_every=2, lr_scheduler="cosine",
              sample_every=1)
    full = make(tmp_path / "full", **kw)
    full.train()
    killed = make(tmp_path / "run", **kw)
    real_update = killed._update

    def update_then_die(batch):
        if killed.step == 2:
            raise KeyboardInterrupt  # killed in step 3, after its rollout (sampler RNG and data stream moved on)
        return real_update(batch)

    killed._update = update_then_die
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    resumed = make(tmp_path / "run", resume_from="latest", **kw)
    assert resumed.step == 2 and resumed.ref_step == 2
    resumed.train()

    def losses(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: (r["loss"], r["reward"], r["kl"]) for r in rows}

    a, b = losses("full"), losses("run")
    for step in (1, 2, 3):
        assert a[step] == pytest.approx(b[step], rel=1e-5, abs=1e-7)
    wa, wb = weights(full), weights(resumed)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    assert any("e_score_correction_bias" in k for k in wa)  # the routing bias is part of what matched
    ra, rb = full.reference.state_dict(), resumed.reference.state_dict()
    assert all(torch.allclose(ra[k], rb[k]) for k in ra)
    assert (tmp_path / "full" / "tables" / "completions.jsonl").is_file()


def test_non_finite_steps_are_skipped_then_stop(tmp_path):
    t = make(tmp_path, max_steps=3, max_bad_steps=3)
    before = weights(t)
    t._advantages = lambda batch: torch.full((len(batch.prompts),), float("nan"))
    m = t.train_step()[0]  # two optimizer steps, both skipped
    assert m["skipped_steps"] == 2 and t.bad_in_a_row == 2
    after = weights(t)
    assert all(torch.equal(before[k], after[k]) for k in before if "e_score_correction_bias" not in k)
    with pytest.raises(RuntimeError, match="non-finite"):
        t.train_step()


def test_dynamic_sampling_drops_flat_groups(tmp_path):
    rows = [{"prompt": f"t{3 + i % 13} t4", "flat": i % 2 == 0} for i in range(16)]
    t = make(tmp_path, rows=rows, max_steps=1, dynamic_sampling=True, max_sampling_rounds=3)
    m, batch, adv = t.train_step()
    assert m["sampling/rounds"] >= 2  # half of every round is flat: one round cannot fill 4 groups
    assert not any(r["flat"] for r in batch.rows[: 4 - int(m["sampling/shortfall"])])
    assert m["frac_reward_zero_std"] >= 0.5
    assert t.stream.state()["index"] == 4 * m["sampling/rounds"]


def test_routing_replay_runs_with_pi_old_experts(tmp_path):
    t = make(tmp_path, max_steps=1, routing_replay="old", minibatches=1, micro_batch_size=32)
    m = t.train_step()[0]
    assert abs(m["ratio"] - 1) < 1e-4


def test_config_validation():
    with pytest.raises(ConfigError, match="minibatches"):
        TrainerConfig(prompts_per_step=3, group_size=4, minibatches=5)
    with pytest.raises(ConfigError, match="micro_batch_size"):
        TrainerConfig(prompts_per_step=4, group_size=4, minibatches=2, micro_batch_size=3)
    with pytest.raises(ConfigError, match="group_size"):
        TrainerConfig(group_size=1)


def test_prompt_stream_and_padding():
    s = PromptStream(3, seed=1)
    first = s.take(5)
    assert sorted(first[:3]) == [0, 1, 2] and s.state() == {"epoch": 1, "index": 2}
    again = PromptStream(3, seed=1)
    again.load_state({"epoch": 1, "index": 2})
    assert again.take(1) == s.take(1)
    ids, mask = pad_rows([[1, 2], [3]], 0, left=True)
    assert ids.tolist() == [[1, 2], [0, 3]] and mask.tolist() == [[True, True], [False, True]]


TWO_PROCESS_SCRIPT = """
import json, sys, torch
sys.path[:0] = [{root!r}, {tests!r}]
torch.set_num_threads(1)
import test_trainer as T
from grpo.advantages import AdvantageConfig
from grpo.loss import LossConfig
from grpo.model import ModelConfig, load_policy
from grpo.parallel import make_accelerator
from grpo.rollout import SamplingConfig
from grpo.trainer import GRPOTrainer, TrainerConfig
tok = T.tokenizer()
torch.manual_seed(0)
model = load_policy(ModelConfig(init="tiny", mtp_layers=0, overrides=T.SMALL), tok)
rows = [{{"prompt": f"t{{3 + i % 13}} t4", "flat": i % 2 == 0}} for i in range(16)]
cfg = TrainerConfig(prompts_per_step=2, group_size=4, micro_batch_size=4, minibatches=2, lr=1e-2, max_steps=2,
                    dynamic_sampling=True, loss=LossConfig(loss_type="dapo", beta=0.01),
                    advantages=AdvantageConfig(scale="batch"))
t = GRPOTrainer(cfg, model=model, tokenizer=tok, sampling=SamplingConfig(max_new_tokens=6, max_batch=32),
                rewards=T.target_reward, rows=rows, encode=lambda r: tok.encode(r["prompt"]), output_dir={out!r},
                wandb_mode="disabled", accelerator=make_accelerator())
m = t.train()
w = torch.cat([p.detach().flatten() for p in t.policy.parameters()])
b = torch.cat([r.e_score_correction_bias.flatten() for _, r in t.policy.routers()])
rank = t.accelerator.process_index
with open({out!r} + f".result{{rank}}.json", "w") as f:  # a file per rank: the two stdouts interleave
    json.dump({{"rank": rank, "w": w.double().sum().item(), "w_abs": w.abs().double().sum().item(),
               "bias": b.abs().sum().item(), "reward": m["reward"], "rounds": m["sampling/rounds"],
               "index": t.stream.state()["index"]}}, f)
"""


def test_two_processes_stay_in_sync(tmp_path):
    """DDP on 2 CPU processes (gloo): same weights and router bias on both ranks, metrics over both, dynamic
    sampling rounds agreed, each rank on its own slice of the data stream, checkpoint written once."""
    root = Path(__file__).resolve().parents[2]
    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESS_SCRIPT.format(root=str(root), tests=str(Path(__file__).parent),
                                                 out=str(tmp_path / "run")))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(root / "recipes/accelerate/cpu_2proc.yaml"), "--main_process_port", "0", str(script)]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("run.result*.json"))]
    assert proc.returncode == 0 and len(results) == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    a, b = sorted(results, key=lambda r: r["rank"])
    assert a["w"] == b["w"] and a["w_abs"] == b["w_abs"] and a["bias"] == b["bias"] and a["bias"] > 0
    assert a["reward"] == b["reward"] and a["rounds"] == b["rounds"] and a["index"] == b["index"]
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()


@pytest.mark.parametrize("arch", ["v3", "generic"])
def test_chunked_head_gives_the_same_step(tmp_path, arch):
    """The output layer fused with the log-probs (no [n, L, V] logits) gives the plain head's losses, metrics and
    weights after two RL steps (fp32)."""
    runs = {}
    for chunked in (True, False):
        t = make(tmp_path / str(chunked), arch=arch, max_steps=2, chunked_head_mb=0 if chunked else float("inf"))
        metrics = [t.train_step()[0] for _ in range(2)]
        runs[chunked] = metrics, {k: v.detach().clone() for k, v in t.policy.state_dict().items()}
    (m1, w1), (m0, w0) = runs[True], runs[False]
    for a, b in zip(m1, m0):
        for key in ("loss", "grad_norm", "entropy", "ratio"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    for key in w0:
        torch.testing.assert_close(w1[key], w0[key], rtol=1e-5, atol=1e-6, msg=key)


def padded_batch(t):
    """A rollout batch whose rows end at different lengths (row r keeps its first 1 + r % L tokens), as completions
    that stop early leave padding after their end."""
    samples = t._sample()[0]
    batch = t._to_batch(samples, torch.linspace(-1, 1, len(samples.prompts)))
    L = batch.completion_ids.shape[1]
    batch.completion_mask = (torch.arange(L)[None] < 1 + torch.arange(len(batch))[:, None] % L).to(batch.completion_mask.dtype)
    batch.loss_mask = batch.completion_mask.float()
    return batch


@pytest.mark.parametrize("arch", ["v3", "llama"])
@pytest.mark.parametrize("bound", [0.0, float("inf")])
def test_output_layer_at_the_completion_tokens_only_gives_the_full_heads_values_and_gradients(tmp_path, arch, bound):
    """The log-probs, entropies and parameter gradients of ``_forward`` (the output layer applied at the completions'
    tokens only, blocked or plain) equal those of the model's own head at every position, on the tokens; 0 on the
    padding (fp32)."""
    t = make(tmp_path, arch=arch, chunked_head_mb=bound)
    batch, idx = padded_batch(t), torch.arange(16)
    mask = batch.completion_mask[idx].float()
    weight = torch.randn(mask.shape, generator=torch.Generator().manual_seed(0)) * mask
    runs = []
    for plain_head in (t._plain_head, lambda: None):  # the head at the tokens; the model's own head everywhere
        t._plain_head = plain_head
        logp, ent, _ = t._forward(t.model, batch, idx, grad=True)
        t.model.zero_grad(set_to_none=True)
        (logp * weight).sum().backward()
        runs.append((logp.detach(), ent.detach(), {k: p.grad.clone() for k, p in t.policy.named_parameters()
                                                   if p.grad is not None}))
    (logp, ent, grads), (logp_full, ent_full, grads_full) = runs
    torch.testing.assert_close(logp * mask, logp_full * mask, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent * mask, ent_full * mask, rtol=1e-5, atol=1e-5)
    assert (logp[mask == 0] == 0).all() and (ent[mask == 0] == 0).all() and (mask == 0).any()
    assert grads.keys() == grads_full.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], grads_full[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("routing_replay", ["off", "old"])
def test_micro_batches_skip_the_padding_that_only_other_rows_need(tmp_path, monkeypatch, routing_replay):
    """A micro-batch's forward runs on its own columns (longest prompt to longest completion): log-probs, entropies,
    aux loss, gradients and (routing replay) pi_old's experts equal those of the forward over the batch's full
    width on the tokens; 0 past the micro-batch's columns (fp32)."""
    rows = [{"prompt": " ".join(f"t{3 + j}" for j in range(1 + i % 5))} for i in range(16)]
    t = make(tmp_path, rows=rows, routing_replay=routing_replay)
    batch, idx = padded_batch(t), torch.tensor([0, 9, 18, 27])  # one row of each group, completions of 1-4 tokens
    width = batch.prompt_ids.shape[1] + batch.completion_ids.shape[1]
    cols = t._columns(batch, idx)
    assert cols.stop - cols.start < width
    valid = torch.cat([batch.prompt_mask[idx], batch.completion_mask[idx]], dim=1).bool()
    mask = batch.completion_mask[idx].float()
    weight = torch.randn(mask.shape, generator=torch.Generator().manual_seed(0)) * mask
    t.model.train()
    runs = []
    for trimmed in (True, False):
        if not trimmed:
            monkeypatch.setattr(GRPOTrainer, "_columns", staticmethod(lambda b, i: slice(0, width)))
        t._precompute(batch)
        routes = {k: v[idx][valid] for k, v in batch.routing.items()} if routing_replay == "old" else {}
        logp, ent, aux = t._forward(t.model, batch, idx, grad=True)
        t.model.zero_grad(set_to_none=True)
        ((logp * weight).sum() + aux).backward()
        runs.append((logp.detach(), ent.detach(), float(aux.detach()), routes,
                     {k: p.grad.clone() for k, p in t.policy.named_parameters() if p.grad is not None}))
    (logp, ent, aux, routes, grads), (logp_full, ent_full, aux_full, routes_full, grads_full) = runs
    torch.testing.assert_close(logp * mask, logp_full * mask, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent * mask, ent_full * mask, rtol=1e-5, atol=1e-5)
    assert (logp[:, cols.stop - batch.prompt_ids.shape[1]:] == 0).all()
    assert aux == pytest.approx(aux_full, rel=1e-5, abs=1e-7)
    assert routes.keys() == routes_full.keys() and all(torch.equal(routes[k], routes_full[k]) for k in routes)
    for k in grads_full:
        torch.testing.assert_close(grads[k], grads_full[k], rtol=1e-4, atol=1e-6, msg=k)


def test_output_layer_runs_in_blocks_only_above_the_bound_of_its_tokens(tmp_path, monkeypatch):
    """train.chunked_head_mb: the blocked output layer once the fp32 logits of the completions' tokens (padding
    excluded) exceed the bound, the plain head at or below it."""
    t = make(tmp_path)
    batch, idx = padded_batch(t), torch.arange(16)
    tokens, vocab = int(batch.completion_mask[idx].sum()), t.policy.get_output_embeddings().weight.shape[0]
    assert tokens < batch.completion_mask[idx].numel()
    blocked = []
    head = grpo.trainer.head_logprobs_and_entropy
    monkeypatch.setattr(grpo.trainer, "head_logprobs_and_entropy", lambda h, w, y, *a, **k: (blocked.append(y.shape), head(h, w, y, *a, **k))[1])
    for positions, expected in ((tokens, []), (tokens - 1, [(1, tokens)])):
        blocked.clear()
        t.cfg.chunked_head_mb = 4 * vocab * positions / 2**20
        t._forward(t.model, batch, idx, grad=True)
        assert blocked == expected
    with pytest.raises(ConfigError, match="chunked_head_mb"):
        TrainerConfig(chunked_head_mb=-1)


def test_activation_checkpointing_gives_the_same_steps_with_routing_replay(tmp_path, monkeypatch):
    """Checkpointed decoder layers (model.gradient_checkpointing, as load_policy enables it) with routing replay
    and the blocked output layer: two RL steps give the same losses, metrics, router biases and weights (fp32).
    A checkpointed model trains with torch's GEMMs on the CPU (not ``grpo.onednn``'s: ``LocalStep.micro_batch``),
    so the run without checkpointing does too here (another GEMM changes the summation order)."""
    monkeypatch.setattr(grpo.optim, "linears", contextlib.nullcontext)
    runs = {}
    for on in (True, False):
        t = make(tmp_path / str(on), max_steps=2, routing_replay="old", chunked_head_mb=0)
        if on:
            t.policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        metrics = [t.train_step()[0] for _ in range(2)]
        runs[on] = metrics, {k: v.detach().clone() for k, v in t.policy.state_dict().items()}
    (m1, w1), (m0, w0) = runs[True], runs[False]
    for a, b in zip(m1, m0):
        for key in ("loss", "grad_norm", "aux_loss", "ratio", "moe/max_vio_mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    assert any("e_score_correction_bias" in k for k in w0)
    for key in w0:
        torch.testing.assert_close(w1[key], w0[key], rtol=1e-5, atol=1e-6, msg=key)
