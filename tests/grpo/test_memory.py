"""grpo.memory: parameter split, ZeRO/EP accounting by hand, a published per-GPU figure, and the activation
formula against the tensors autograd actually saves on a tiny policy."""
from __future__ import annotations

import pytest
import torch

from grpo.config import ConfigError
from grpo.memory import GiB, Layout, activation_bytes_per_token, layer_params, main, plan, stage_params
from grpo.model import DeepseekV3Policy, ModelConfig, preset_config
from grpo.params import count_params


@pytest.fixture(scope="module")
def v3():
    return preset_config("v3-671b")


def test_stage_split_covers_the_analytic_count(v3):
    for pp in (1, 4, 16):
        stages = stage_params(v3, pp, mtp=True)
        counted = count_params(v3)
        assert sum(s.replicated + s.routed for s in stages) == counted.total + counted.mtp
        assert sum(s.moe_layers for s in stages) == 58 + 1 and sum(s.dense_layers for s in stages) == 3
    routed = 58 * 256 * 3 * 7168 * 2048  # 653.9 B of the 671 B sit in routed experts
    assert stage_params(v3, 1, mtp=False)[0].routed == routed


def test_moe_parameters_of_a_pp16_ep8_stage_match_the_published_figure(v3):
    """Zhang & Su (2025), "Memory Analysis on the Training Course of DeepSeek Models" (arXiv:2502.07846): with
    16 pipeline stages and EP8, a 4-MoE-layer stage holds 11,641,290,752 bytes of bf16 MoE parameters per GPU
    (32 routed experts, the shared expert and the router per layer)."""
    p = layer_params(v3)
    stage = stage_params(v3, 16, mtp=True)[1]  # layers 4..7, all MoE
    assert stage.moe_layers == 4
    assert 2 * (stage.routed // 8 + 4 * p["moe_replicated"]) == 11_641_290_752


def test_zero_and_ep_accounting_by_hand(v3):
    p = layer_params(v3)
    psi_d = sum(p[k] for k in ("embed", "head")) + 61 * p["attn"] + 3 * p["dense_ffn"] + 58 * p["moe_replicated"]
    psi_d += p["attn"] + p["moe_replicated"] + p["mtp_extra"]  # MTP module
    psi_e = 59 * p["moe_routed"] // 64
    m = plan(v3, Layout(gpus=256, ep=64, zero=1))
    assert (m.params_replicated, m.params_experts) == (psi_d, psi_e)
    assert m.weights == 2 * (psi_d + psi_e) and m.gradients == 2 * (psi_d + psi_e)
    owned = psi_d / 256 + psi_e / 4  # dense over 256 ranks, experts over their 4-rank EDP group
    assert m.optimizer == pytest.approx(12 * owned + 4 * max(psi_d / 256, psi_e / 4))
    z2 = plan(v3, Layout(gpus=256, ep=64, zero=2))
    assert z2.gradients == pytest.approx(2 * owned) and z2.weights == m.weights and z2.optimizer == m.optimizer
    # more ranks shrink only the partitioned terms; bf16 moments and fp32 grads as in the DeepSeek-V3 report
    assert plan(v3, Layout(gpus=512, ep=64, zero=1)).optimizer < m.optimizer
    v3_like = plan(v3, Layout(gpus=256, ep=64, zero=1, moment_bytes=2, grad_bytes=4))
    assert v3_like.optimizer == pytest.approx(8 * owned + 4 * max(psi_d / 256, psi_e / 4))
    assert v3_like.gradients == 2 * m.gradients


def test_published_v3_layout_fits_an_80gb_gpu_with_recomputation(v3):
    """The DeepSeek-V3 report's layout (2048 H800 80 GB: PP16, EP64, ZeRO-1 DP, bf16 AdamW moments, fp32
    gradients, no tensor parallelism): weights, gradients and optimizer take < 20 GiB per GPU; activations of
    4096-token micro-batches fit only with recomputation (the report recomputes and caches activations in FP8)."""
    lay = dict(gpus=2048, pp=16, ep=64, zero=1, moment_bytes=2, grad_bytes=4, seq_len=4096)
    m = plan(v3, Layout(**lay, recompute="full"))
    assert (m.weights + m.gradients + m.optimizer) / GiB < 20
    assert m.total / GiB < 80 < plan(v3, Layout(**lay)).total / GiB


def test_activation_formula_matches_saved_tensors():
    """Autograd-saved bytes per token of a tiny policy (fp32, CPU) at two lengths: the part linear in the
    sequence length is the CPU attention's probabilities (H * 4 bytes per key and layer, which fused GPU
    attention does not keep); the rest matches the formula."""
    config = preset_config("tiny", dict(num_hidden_layers=3, num_nextn_predict_layers=1, vocab_size=512,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2))
    torch.manual_seed(0)
    model = DeepseekV3Policy._from_config(config, dtype=torch.float32, attn_implementation="sdpa").train()
    model.policy_config = ModelConfig(mtp_layers=1)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_per_token(seq: int) -> float:
        seen: dict[int, int] = {}

        def pack(t):
            seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            return t

        x = torch.randint(3, 512, (1, seq))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=x, labels=x)
        return sum(n for ptr, n in seen.items() if ptr not in params) / seq

    short, long = saved_per_token(128), saved_per_token(256)
    per_key = (long - short) / 128
    attention_layers = config.num_hidden_layers + 1
    assert per_key == pytest.approx(attention_layers * config.num_attention_heads * 4, rel=0.02)
    a = activation_bytes_per_token(config, act_bytes=4)
    formula = (a["mla"] + a["dense_ffn"] + 3 * (a["mla"] + a["moe_ffn"]) + a["mtp_extra"] + 2 * a["head"])
    measured = short - 128 * per_key
    assert measured == pytest.approx(formula, rel=0.05)


def test_bad_layouts_name_the_setting(v3):
    with pytest.raises(ConfigError, match="ep"):
        plan(v3, Layout(gpus=96, ep=96))  # 256 experts not divisible by 96
    with pytest.raises(ConfigError, match="ep"):
        Layout(gpus=48, ep=32)
    with pytest.raises(ConfigError, match="pp"):
        Layout(gpus=100, pp=16)


def test_cli_prints_the_breakdown(capsys):
    main(["--preset", "v3-671b", "--gpus", "128,256", "--ep", "64", "--zero", "1", "--seq-len", "4096",
          "--micro-batch", "1"])
    out = capsys.readouterr().out
    assert out.count("total") == 2 and "4 routed experts per MoE layer per rank, edp=4" in out
    with pytest.raises(SystemExit):
        main(["--preset", "v3-671b", "--gpus", "100", "--ep", "64"])
