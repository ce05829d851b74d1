"""Checkpoints of the DeepSeek-V3 policy are in DeepSeek's release format (what vLLM / SGLang serve)."""
import json

import pytest
import torch
from safetensors import safe_open
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from grpo.checkpoint import load_checkpoint, save_checkpoint
from grpo.config import ConfigError
from grpo.model import DeepseekV3Policy, ModelConfig, load_policy
from tests.grpo.test_model import V, tokenizer  # noqa: F401 (module fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

N = 2  # main layers; the MTP layer is model.layers.2

# What vLLM's and SGLang's DeepSeek-V2/V3 loaders read for routing and MoE / MTP placement, with this policy's values.
EXPECTED_ROUTING = {
    "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True, "n_group": 2, "topk_group": 1,
    "routed_scaling_factor": 2.5, "num_experts_per_tok": 2, "n_routed_experts": 4, "first_k_dense_replace": 1,
    "moe_layer_freq": 1, "num_nextn_predict_layers": 1,
}


def tiny_config(**kw):
    values = dict(
        vocab_size=V, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=N,
        first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2, n_shared_experts=1,
        n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.5,
        q_lora_rank=16, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8,
        max_position_embeddings=32, pad_token_id=0, bos_token_id=2, eos_token_id=1, num_nextn_predict_layers=1,
    )
    return DeepseekV3Config(**{**values, **kw})


def tiny_policy(seed=0, **kw):
    torch.manual_seed(seed)
    model = DeepseekV3Policy(tiny_config(**kw)).eval()
    for _, router in model.routers():
        router.e_score_correction_bias.normal_(std=0.05)
    return model


def tokens():
    return torch.randint(4, V, (2, 12), generator=torch.Generator().manual_seed(1))


def read_weights(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@torch.no_grad()
def test_saved_checkpoint_has_release_layout_and_reloads_exactly(tmp_path, tokenizer):
    model = tiny_policy()
    model.save_pretrained(tmp_path)
    weights = read_weights(tmp_path)
    mtp = f"model.layers.{N}."
    # DeepSeek's MTP layer: embed_tokens, enorm, hnorm, eh_proj, the block, shared_head (norm + head)
    for name in ("embed_tokens.weight", "enorm.weight", "hnorm.weight", "eh_proj.weight",
                 "shared_head.norm.weight", "shared_head.head.weight", "mlp.gate.e_score_correction_bias"):
        assert mtp + name in weights, name
    assert torch.equal(weights[mtp + "embed_tokens.weight"], model.model.embed_tokens.weight)
    assert torch.equal(weights[mtp + "shared_head.head.weight"], model.lm_head.weight)
    DeepseekV3ForCausalLM.save_pretrained(model, tmp_path / "plain")  # transformers' own save: only these two more
    assert set(weights) == set(read_weights(tmp_path / "plain")) | {mtp + "embed_tokens.weight",
                                                                     mtp + "shared_head.head.weight"}
    config = json.loads((tmp_path / "config.json").read_text())
    assert {k: config.get(k) for k in EXPECTED_ROUTING} == EXPECTED_ROUTING
    assert config["architectures"] == ["DeepseekV3ForCausalLM"]

    x = tokens()
    logits = model(x).logits
    again, info = DeepseekV3Policy.from_pretrained(tmp_path, output_loading_info=True)
    assert info["unexpected_keys"] == set() and info["missing_keys"] == set()
    assert torch.equal(again.eval()(x).logits, logits)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())
    loaded = load_policy(ModelConfig(init=str(tmp_path), attn_implementation="sdpa"), tokenizer).eval()
    assert torch.allclose(loaded(x).logits, logits, atol=1e-6, rtol=1e-6)
    # saving the reloaded model writes the same release format again
    again.save_pretrained(tmp_path / "again")
    assert read_weights(tmp_path / "again").keys() == weights.keys()
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == config


@torch.no_grad()
def test_training_checkpoints_are_in_release_format(tmp_path):
    model = tiny_policy()
    path = save_checkpoint(tmp_path, model=model, tokenizer=None, step=1)
    weights = read_weights(path)
    assert torch.equal(weights[f"model.layers.{N}.embed_tokens.weight"], model.model.embed_tokens.weight)
    assert torch.equal(weights[f"model.layers.{N}.shared_head.head.weight"], model.lm_head.weight)
    config = json.loads((path / "config.json").read_text())
    assert {k: config.get(k) for k in EXPECTED_ROUTING} == EXPECTED_ROUTING
    fresh = tiny_policy(seed=1)
    load_checkpoint(path, model=fresh, restore_rng=False)
    x = tokens()
    assert torch.equal(fresh(x).logits, model(x).logits)


def test_release_routing_keys_accepted_with_policy_values_only(tmp_path, tokenizer):
    small = {"num_hidden_layers": 2}
    ok = {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "moe_layer_freq": 1}
    model = load_policy(ModelConfig(overrides={**small, **ok}, mtp_layers=0), tokenizer)
    assert model.config.scoring_func == "sigmoid"
    with pytest.raises(ConfigError, match=r"^overrides\.scoring_func: .*only scoring_func='sigmoid'.*'softmax'$"):
        load_policy(ModelConfig(overrides={**small, "scoring_func": "softmax"}), tokenizer)
    with pytest.raises(ConfigError, match=r"^overrides\.topk_method: .*noaux_tc"):
        load_policy(ModelConfig(overrides={**small, "topk_method": "greedy"}), tokenizer)
    with pytest.raises(ConfigError, match=r"moe_layer_freq: .*only moe_layer_freq=1"):
        load_policy(ModelConfig(overrides={**small, "moe_layer_freq": 2}), tokenizer)
    # a checkpoint whose config.json routes with softmax is refused, by load_policy and by from_pretrained
    tiny_policy().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "scoring_func": "softmax"}))
    with pytest.raises(ConfigError, match=r"scoring_func: .*only scoring_func='sigmoid'"):
        load_policy(ModelConfig(init=str(tmp_path)), tokenizer)
    with pytest.raises(ConfigError, match=r"scoring_func"):
        DeepseekV3Policy.from_pretrained(tmp_path)
    # ... unless the run overrides it back to the implemented value
    assert load_policy(ModelConfig(init=str(tmp_path), overrides={"scoring_func": "sigmoid"}), tokenizer)
    with pytest.raises(ConfigError, match="scoring_func"):
        DeepseekV3Policy(tiny_config(scoring_func="softmax"))
