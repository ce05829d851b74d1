"""Analytic parameter counts of a DeepSeek-V3 config (no model is instantiated).

    attention (MLA)  = d*r_q + r_q + r_q*H*(d_nope+d_rope)          q_a_proj, q_a_layernorm, q_b_proj
                       (or d*H*(d_nope+d_rope) without q compression)
                     + d*(r_kv+d_rope) + r_kv + r_kv*H*(d_nope+d_v)  kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj
                     + H*d_v*d                                       o_proj
    dense FFN        = 3*d*d_ff
    MoE FFN          = (N_r + N_s) * 3*d*d_e + N_r*d (router) ; activated: (K_r + N_s) * 3*d*d_e + N_r*d
    layer            = attention + FFN + 2*d (norms)
    total            = V*d (embedding) + layers + d (final norm) + V*d (output head, unless tied)
    MTP module       = MoE layer + 2*d (enorm, hnorm) + 2*d*d (eh_proj) + d (shared_head.norm)

``total`` and ``activated`` exclude MTP, like the report's "671B total, 37B activated". ``activated``
counts the parameters that enter a token's matrix products: the output head yes, the embedding table
no (a token reads one row of it). For DeepSeek-V3 this gives 671.03B total and 36.63B activated; the
release's README_WEIGHTS.md states 36.7B activated (0.2% away) and the report rounds to 37B (1.0% away;
with the whole embedding table counted it would be 37.55B). The Hugging Face release is 685B = 671B +
the MTP layer as stored there, which repeats the 0.9B embedding and 0.9B head (``mtp_as_released``,
13.46B; README_WEIGHTS: 11.5B unique MTP parameters, ours 11.61B). The correction bias (a buffer) is not
counted.
"""
from __future__ import annotations

from dataclasses import dataclass

from transformers import DeepseekV3Config


@dataclass(frozen=True)
class ParamCount:
    total: int  # main model, without MTP
    activated: int  # per token, without MTP and without the embedding table
    mtp: int  # all MTP modules (embedding and head shared, not counted again)
    mtp_as_released: int  # MTP as stored in DeepSeek's checkpoint (with embedding and head copies)


def count_params(config: DeepseekV3Config) -> ParamCount:
    c = config
    d, heads, qk = c.hidden_size, c.num_attention_heads, c.qk_nope_head_dim + c.qk_rope_head_dim
    if c.q_lora_rank:
        attn = d * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * heads * qk
    else:
        attn = d * heads * qk
    attn += d * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
    attn += c.kv_lora_rank * heads * (c.qk_nope_head_dim + c.v_head_dim) + heads * c.v_head_dim * d
    expert = 3 * d * c.moe_intermediate_size
    router = c.n_routed_experts * d
    dense_layer = attn + 3 * d * c.intermediate_size + 2 * d
    moe_layer = attn + (c.n_routed_experts + c.n_shared_experts) * expert + router + 2 * d
    moe_active = attn + (c.num_experts_per_tok + c.n_shared_experts) * expert + router + 2 * d
    n_dense = min(c.first_k_dense_replace, c.num_hidden_layers)
    n_moe = c.num_hidden_layers - n_dense
    embed = c.vocab_size * d
    head = 0 if c.tie_word_embeddings else c.vocab_size * d
    outer = embed + d + head
    mtp_one = moe_layer + 2 * d + 2 * d * d + d
    n_mtp = c.num_nextn_predict_layers
    return ParamCount(
        total=outer + n_dense * dense_layer + n_moe * moe_layer,
        activated=outer - embed + n_dense * dense_layer + n_moe * moe_active,
        mtp=n_mtp * mtp_one,
        mtp_as_released=n_mtp * (mtp_one + 2 * embed),
    )
