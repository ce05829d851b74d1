"""The DeepSeek-V3 policy: parity with transformers, checkpoints, balancing, MTP, expert kernels, API."""
import multiprocessing

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers import PreTrainedTokenizerFast

from grpo.config import ConfigError
from grpo.model import (
    DeepseekV3Policy,
    ModelConfig,
    force_routing,
    last_routing,
    load_policy,
    moe_metrics,
    preset_config,
    update_router_bias,
)
from grpo.params import count_params

V = 97


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    vocab.update({f"t{i}": i for i in range(4, V)})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")


def small_config(mtp=1, **kw):
    """Every V3 feature on: q/kv compression, YaRN (sequences longer than the original 16), group routing."""
    values = dict(
        vocab_size=V, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
        n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2, q_lora_rank=32, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=64, pad_token_id=0,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        num_nextn_predict_layers=mtp,
    )
    return DeepseekV3Config(**{**values, **kw})


def random_policy(seed=0, **kw):
    torch.manual_seed(seed)
    model = DeepseekV3Policy(small_config(**kw)).eval()
    for _, router in model.routers():
        router.e_score_correction_bias.normal_(std=0.05)
    return model


def tokens(batch=2, seq=24, seed=1):
    return torch.randint(4, V, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_logits_equal_transformers_and_checkpoints_interchange(tmp_path):
    ours = random_policy()
    x = tokens()
    mask = torch.ones_like(x)
    mask[1, :5] = 0  # left padding
    ours.save_pretrained(tmp_path / "ours")
    ref, info = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ours", output_loading_info=True)
    ref.eval()
    # transformers' class leaves out exactly the MTP layer (model.layers.3.*) and nothing else
    assert info["missing_keys"] == set() and info["unexpected_keys"]
    assert all(k.startswith("model.layers.3.") for k in info["unexpected_keys"])
    assert {"model.layers.3.eh_proj.weight", "model.layers.3.shared_head.norm.weight"} <= info["unexpected_keys"]
    logits = ours(x, attention_mask=mask).logits
    assert torch.allclose(logits, ref(x, attention_mask=mask).logits, atol=1e-5, rtol=1e-5)
    ours.set_attn_implementation("sdpa_padded")  # the CPU-fast attention of load_policy: same numbers
    assert torch.allclose(ours(x, attention_mask=mask).logits, logits, atol=1e-5, rtol=1e-5)
    greedy = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(x, **greedy), ref.generate(x, **greedy))
    # the correction bias and the group limit are live in this test: dropping either changes the logits
    biases = {i: r.e_score_correction_bias.clone() for i, r in ours.routers()}
    for _, r in ours.routers():
        r.e_score_correction_bias.zero_()
    assert not torch.allclose(ours(x, attention_mask=mask).logits, logits, atol=1e-4)
    for i, r in ours.routers():
        r.e_score_correction_bias.copy_(biases[i])
    # round trip through our class is exact, MTP and bias included
    again = DeepseekV3Policy.from_pretrained(tmp_path / "ours").eval()
    assert again.state_dict().keys() == ours.state_dict().keys()
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ours.state_dict().items())
    assert torch.equal(again(x, attention_mask=mask).logits, logits)
    # a checkpoint without MTP (transformers' own) loads into ours; the MTP module is freshly initialised
    ref.save_pretrained(tmp_path / "theirs")
    loaded = DeepseekV3Policy.from_pretrained(tmp_path / "theirs").eval()
    assert torch.allclose(loaded(x, attention_mask=mask).logits, logits, atol=1e-5, rtol=1e-5)
    assert 0.01 < loaded.model.layers[3].eh_proj.weight.std() < 0.03


@torch.no_grad()
def test_plain_automodel_gives_transformers_class(tmp_path):
    random_policy().save_pretrained(tmp_path)
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)) is DeepseekV3ForCausalLM


def test_grouped_expert_kernel_equals_loop_reference():
    grads = {}
    for impl in ("eager", "grouped_mm"):
        model = random_policy().train()
        model.set_experts_implementation(impl)
        out = model(tokens(), labels=tokens())
        out.loss.backward()
        grads[impl] = (out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    (logits_a, grads_a), (logits_b, grads_b) = grads["eager"], grads["grouped_mm"]
    assert torch.allclose(logits_a, logits_b, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and any("experts.gate_up_proj" in n for n in grads_a)
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-4), name


def test_loss_is_lm_plus_weighted_aux():
    model = random_policy().train()
    model.policy_config = ModelConfig(seq_aux_alpha=0.01, mtp_loss_weight=0.5)
    out = model(tokens(), labels=tokens())
    assert out.balance_loss.item() > 0 and out.mtp_loss.item() > 0
    assert torch.allclose(out.aux_loss, 0.01 * out.balance_loss + 0.5 * out.mtp_loss)
    assert torch.allclose(out.loss, out.lm_loss + out.aux_loss)
    with torch.no_grad():
        assert model.eval()(tokens()).aux_loss.item() == 0.0  # inference computes no extras


def test_loads_count_training_forwards_only_and_exclude_padding():
    model = random_policy(mtp=0).train()
    x, mask = tokens(), torch.ones(2, 24, dtype=torch.long)
    mask[0, :4] = 0
    with torch.no_grad():
        model(x, attention_mask=mask)  # rollout-style forward: not counted
    model.eval()(x, attention_mask=mask)  # eval mode: not counted
    assert all(r.load is None for _, r in model.routers())
    model.train()
    for _ in range(2):  # two micro-batches accumulate
        model(x, attention_mask=mask)
    for _, router in model.routers():
        assert router.load.sum().item() == 2 * 44 * 3  # 2 passes x 44 real tokens x top-3
    update_router_bias(model)
    assert all(r.load is None for _, r in model.routers())


def checkpointed_step(checkpointing: bool, kind: str, replay: dict | None = None):
    """One loss + backward + router-bias update of the small policy (MTP, YaRN, group routing on) in training
    mode: ``sft`` (labels: LM + balance + MTP loss) or ``grpo`` (the trainer's path: blocked output layer on the
    final hidden states, grpo_loss + aux_loss, ``replay`` experts forced in the forward only, the backward after
    the ``force_routing`` block has closed). Returns loss, gradients, loads, biases and the saved-tensor bytes
    the backward keeps (what activation checkpointing cuts)."""
    from grpo.loss import LossConfig, LossNorm, grpo_loss, head_logprobs_and_entropy

    model = random_policy().train()
    model.policy_config = ModelConfig(seq_aux_alpha=0.1, bias_update_speed=0.01, mtp_loss_weight=0.3)
    if checkpointing:  # as load_policy enables it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    x, mask = tokens(2, 40), torch.ones(2, 40, dtype=torch.long)
    mask[1, :6] = 0  # left padding
    saved = {}

    def pack(t):
        saved[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if kind == "sft":
            labels = x.masked_fill(mask == 0, -100)
            out = model(x, attention_mask=mask, labels=labels, use_cache=False)
            loss = out.loss
        else:
            keep = torch.arange(23, 39)  # the last 16 positions predict the completion x[:, 24:]
            with force_routing(model, replay or {}):
                out = model(x, attention_mask=mask, logits_to_keep=keep[:0], output_hidden_states=True,
                            use_cache=False)
                logp, _ = head_logprobs_and_entropy(out.hidden_states[-1][:, keep], model.lm_head.weight, x[:, 24:], 0.7)
            old = logp.detach() + 0.05 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(3))
            completion = torch.ones(2, 16)
            loss = grpo_loss(logp=logp, old_logp=old, advantages=torch.tensor([1.0, -0.5]), mask=completion,
                             cfg=LossConfig(loss_type="dapo"), norm=LossNorm.of(completion)).loss + out.aux_loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    loads = {i: r.load.clone() for i, r in model.routers()}
    update_router_bias(model)
    biases = {i: r.e_score_correction_bias.clone() for i, r in model.routers()}
    return loss.detach(), grads, loads, biases, sum(saved.values())


def random_routes(model, seed=5):
    """Valid forced experts (K distinct per token) for every main MoE layer, for tokens(2, 40)."""
    g = torch.Generator().manual_seed(seed)
    k, e = model.config.num_experts_per_tok, model.config.n_routed_experts
    return {i: torch.rand(2, 40, e, generator=g).argsort(-1)[..., :k] for i, _ in model.routers()
            if i < model.config.num_hidden_layers}


@pytest.mark.parametrize("kind", ["sft", "grpo", "grpo_replay"])
def test_activation_checkpointing_gives_the_same_step_with_less_saved(kind):
    """Checkpointed decoder layers (MTP's included): the same loss, gradients (balance loss and MTP through the
    recomputed routers), expert loads (counted once, not again by the recomputation) and bias update, with less
    kept for the backward. With routing replay the recomputation must route to the replayed experts although the
    replay block has closed before the backward."""
    replay = random_routes(random_policy()) if kind == "grpo_replay" else None
    (loss0, grads0, loads0, bias0, saved0), (loss1, grads1, loads1, bias1, saved1) = (
        checkpointed_step(on, kind.split("_")[0], replay) for on in (False, True))
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-7)
    assert grads1.keys() == grads0.keys()
    assert any(".mlp.gate.weight" in n for n in grads0) and any("layers.3." in n for n in grads0)  # balance, MTP
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-7, msg=name)
    for i in loads0:
        assert torch.equal(loads1[i], loads0[i]) and torch.equal(bias1[i], bias0[i]), i
    assert loads0[1].sum() == 74 * 3  # 40 + 34 real tokens x top-3: once per forward
    assert saved1 < saved0 / 2, (saved1, saved0)
    if replay:  # the replayed experts are not the ones the router would choose: the replay is live
        model = random_policy().train()
        with torch.no_grad():
            model(tokens(2, 40))
        chosen = model.model.layers[1].mlp.gate.last_indices.view(2, 40, -1).sort(-1).values
        assert (chosen != replay[1].sort(-1).values).any(-1).float().mean() > 0.5


def test_load_policy_turns_activation_checkpointing_on(tokenizer):
    model = load_policy(ModelConfig(overrides={"num_hidden_layers": 2}, gradient_checkpointing=True), tokenizer)
    assert all(layer.gradient_checkpointing for layer in model.model.layers)


def max_vios(model):
    return {k: v for k, v in moe_metrics(model).items() if k.endswith("max_vio")}


def _update_on_rank(rank, init_file, results):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model = random_policy(mtp=0).train()
    model.policy_config = ModelConfig(bias_update_speed=0.1)
    model(tokens(seed=10 + rank))  # each rank sees its own micro-batch
    update_router_bias(model)
    results.put((rank, (max_vios(model), {i: r.e_score_correction_bias.tolist() for i, r in model.routers()})))
    torch.distributed.destroy_process_group()


def test_bias_update_uses_loads_summed_over_ranks(tmp_path):
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_update_on_rank, args=(r, tmp_path / "pg", results)) for r in range(2)]
    for p in procs:
        p.start()
    per_rank = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    # single process, both micro-batches: the update from the global batch
    model = random_policy(mtp=0).train()
    model.policy_config = ModelConfig(bias_update_speed=0.1)
    for rank in range(2):
        model(tokens(seed=10 + rank))
    update_router_bias(model)
    expected = (max_vios(model), {i: r.e_score_correction_bias.tolist() for i, r in model.routers()})
    assert per_rank[0] == per_rank[1] == expected
    one_rank = random_policy(mtp=0).train()
    one_rank(tokens(seed=10))
    update_router_bias(one_rank)
    assert max_vios(one_rank) != expected[0]  # so the ranks did sum their loads


def skewed_model(tokenizer, **cfg):
    """Tiny preset, one MoE layer (no training) whose router strongly prefers experts 0 and 1 for every token."""
    torch.manual_seed(0)
    model = load_policy(ModelConfig(overrides={"num_hidden_layers": 2}, mtp_layers=0, **cfg), tokenizer).train()
    direction = torch.randn(model.config.hidden_size)
    direction /= direction.norm()
    with torch.no_grad():
        model.model.embed_tokens.weight += 0.3 * direction  # a component shared by every token
        gate = model.model.layers[1].mlp.gate.weight
        gate.normal_(std=0.13)
        gate[:2] += direction
    return model


def max_vio_over_steps(model, steps):
    batch = tokens(8, 64, seed=0)
    vios = []
    for _ in range(steps):
        model(batch)
        update_router_bias(model)
        vios.append(moe_metrics(model)["moe/layer1/max_vio"])
    return vios


def test_bias_update_lowers_max_vio_on_skewed_router(tokenizer):
    vios = max_vio_over_steps(skewed_model(tokenizer, bias_update_speed=0.02), 30)
    assert vios[0] > 2.5  # 8 experts, top-2: 3.0 when two experts take every token
    assert max(vios[-5:]) < 0.5 * vios[0]


@pytest.mark.parametrize("cfg", [dict(bias_update_speed=0.0), dict(bias_update_speed=0.02, freeze_router_bias=True)])
def test_no_bias_change_when_gamma_zero_or_frozen(tokenizer, cfg):
    model = skewed_model(tokenizer, **cfg)
    vios = max_vio_over_steps(model, 5)
    assert vios[0] > 2.5 and len(set(vios)) == 1
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.abs().sum() == 0


def test_mtp_learns_repetitive_sequence_and_targets_t_plus_2(tokenizer):
    torch.manual_seed(0)
    model = load_policy(ModelConfig(overrides={"num_hidden_layers": 2}), tokenizer).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    periodic = torch.tensor([[5, 9, 13, 7, 11] * 8] * 2)

    def step(x):
        out = model(x, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        update_router_bias(model)
        return out.mtp_loss.item()

    losses = [step(periodic) for _ in range(25)]
    assert losses[-1] < 0.3 * losses[0]
    assert moe_metrics(model)["moe/mtp_loss"] == pytest.approx(losses[-1])
    # on i.i.d. tokens t_{i+2} is unpredictable: an MTP aligned to t_{i+1} (which it sees) would copy it
    random_losses = [step(tokens(2, 40, seed=100 + i)) for i in range(25)]
    assert min(random_losses[-5:]) > 0.8 * torch.log(torch.tensor(float(V))).item()


def test_mtp_disabled_removes_its_parameters(tokenizer):
    model = load_policy(ModelConfig(mtp_layers=0), tokenizer).train()
    n_layers = model.config.num_hidden_layers
    assert len(model.model.layers) == n_layers
    names = [n for n, _ in model.named_parameters()]
    assert not any(k in n for n in names for k in ("eh_proj", "enorm", "hnorm", "shared_head"))
    opt = torch.optim.AdamW(model.parameters())
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == count_params(model.config).total
    x = tokens()
    out = model(x, labels=x)
    assert out.mtp_loss is None and torch.allclose(out.aux_loss, 1e-4 * out.balance_loss)
    with_mtp = load_policy(ModelConfig(mtp_layers=1), tokenizer)
    extra = sum(p.numel() for p in with_mtp.parameters()) - sum(p.numel() for p in model.parameters())
    assert extra == count_params(with_mtp.config).mtp


@torch.no_grad()
def test_routing_replay():
    model = random_policy()
    x = tokens()
    logits = model(x).logits
    chosen = last_routing(model)
    assert set(chosen) == {1, 2}  # the MoE layers of the main model
    with force_routing(model, chosen):
        assert torch.equal(model(x).logits, logits)
    with force_routing(model, {1: torch.zeros_like(chosen[1])}):
        assert not torch.allclose(model(x).logits, logits)
    assert model.model.layers[1].mlp.gate.forced_indices is None
    with pytest.raises(ValueError, match="not MoE layers"):
        with force_routing(model, {0: chosen[1]}):
            pass


def test_load_policy_preset_uses_tokenizer_and_dtype(tokenizer):
    model = load_policy(ModelConfig(dtype="bfloat16", overrides={"num_hidden_layers": 2}), tokenizer)
    assert isinstance(model, DeepseekV3Policy)
    assert model.config.vocab_size == len(tokenizer) and model.config.pad_token_id == 0
    assert model.config.eos_token_id == 1 and model.config.bos_token_id == 2
    assert model.lm_head.weight.dtype == torch.bfloat16
    gate = model.model.layers[1].mlp.gate
    assert gate.weight.dtype == torch.float32 and gate.e_score_correction_bias.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == count_params(model.config).total + count_params(
        model.config).mtp


def test_load_policy_checkpoint_dir_and_any_causal_lm(tokenizer, tmp_path):
    random_policy().save_pretrained(tmp_path / "v3")
    model = load_policy(ModelConfig(init=str(tmp_path / "v3"), mtp_layers=0, seq_aux_alpha=0.5), tokenizer)
    assert isinstance(model, DeepseekV3Policy) and model.policy_config.seq_aux_alpha == 0.5
    assert len(model.model.layers) == 3
    # the checkpoint's MTP layer is not reported as unexpected when MTP is off
    _, info = DeepseekV3Policy.from_pretrained(tmp_path / "v3", config=model.config, output_loading_info=True)
    assert info["unexpected_keys"] == set() and info["missing_keys"] == set()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "llama")
    llama = load_policy(ModelConfig(init=str(tmp_path / "llama")), tokenizer)
    assert isinstance(llama, LlamaForCausalLM)
    out = llama(tokens(), labels=tokens())
    assert out.loss is not None
    update_router_bias(llama)  # no-op for a model without V3 routers
    assert moe_metrics(llama) == {}


def test_config_errors_name_the_key(tokenizer):
    with pytest.raises(ConfigError, match="overrides.hiden_size"):
        load_policy(ModelConfig(overrides={"hiden_size": 8}), tokenizer)
    with pytest.raises(ConfigError, match="^init: model dir '/no/such/dir': does not exist; "):
        load_policy(ModelConfig(init="/no/such/dir"), tokenizer)
    with pytest.raises(ConfigError, match="mtp_layers"):
        ModelConfig(mtp_layers=-1)
    with pytest.raises(ConfigError, match="n_group"):
        load_policy(ModelConfig(overrides={"n_group": 3}), tokenizer)
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        load_policy(ModelConfig(overrides={"num_experts_per_tok": 5}), tokenizer)  # 1 group of 4 experts


def test_metrics_keys(tokenizer):
    model = load_policy(ModelConfig(), tokenizer).train()
    model(tokens(), labels=tokens())
    update_router_bias(model)
    metrics = moe_metrics(model)
    n = model.config.num_hidden_layers
    for i in range(1, n + 1):  # MoE layers and the MTP layer (index n)
        assert {f"moe/layer{i}/max_vio", f"moe/layer{i}/bias_norm", f"moe/layer{i}/balance_loss"} <= metrics.keys()
    assert {"moe/max_vio_mean", "moe/bias_norm_mean", "moe/balance_loss", "moe/mtp_loss"} <= metrics.keys()
    assert metrics["moe/layer1/bias_norm"] > 0 and all(isinstance(v, float) for v in metrics.values())


def test_671b_parameter_counts():
    counts = count_params(preset_config("v3-671b"))
    assert abs(counts.total - 671e9) / 671e9 < 0.01
    assert round(counts.activated / 1e9) == 37  # report: "37B activated"
    assert abs(counts.activated - 36.7e9) / 36.7e9 < 0.01  # README_WEIGHTS.md: 36.7B
    assert abs(counts.mtp - 11.5e9) / 11.5e9 < 0.015  # README_WEIGHTS.md: 11.5B unique MTP parameters
    assert abs(counts.total + counts.mtp_as_released - 685e9) / 685e9 < 0.01  # the 685B release
    assert abs(count_params(preset_config("v3-mini")).total - 0.46e9) / 0.46e9 < 0.01
