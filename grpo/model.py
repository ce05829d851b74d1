"""The trainable DeepSeek-V3 policy: transformers' DeepseekV3 modules plus what DeepSeek trained with.

A forward pass returns ``.logits`` and ``.aux_loss``; with ``labels`` also ``.loss``:

    loss     = L_LM + aux_loss                                     (L_LM: mean next-token CE, -100 ignored)
    aux_loss = alpha * sum_{MoE layers l} L_Bal^l  +  (lambda / D) * sum_{k=1..D} L_MTP^k

aux_loss is computed when labels are given or in training mode with gradients on (a GRPO step adds
it to its own loss); it is 0 in inference (rollouts, reference log-probs), which also counts no loads.

    L_Bal^l  the sequence-wise balance loss of layer l (grpo.moe.balance_loss), mean over sequences
    MTP depth k (0-indexed positions, h^0 = the main model's final hidden states, after its final norm):
        h^k_i    = TRM_k( W_k [ RMSNorm(Emb(t_{i+k})) ; RMSNorm(h^{k-1}_i) ] )     W_k: 2d -> d (eh_proj)
        P^k_i    = softmax(OutHead(RMSNorm(h^k_i)))      OutHead / Emb shared with the main model
        L_MTP^k  = mean over positions with a target of -log P^k_i[t_{i+k+1}]

and after every optimizer step the trainer calls ``update_router_bias`` (aux-loss-free balancing,
b_i += gamma * sign(mean load - load_i) over the loads of the global batch since the last call).

Layout: the main layers, attention (MLA, YaRN), dense MLPs and MoE blocks are transformers' own
``DeepseekV3*`` modules with their parameter names, so checkpoints interchange with transformers'
``DeepseekV3ForCausalLM`` and DeepSpeed AutoEP recognises the MoE blocks. Only the router is
replaced (same parameters, routing through the pure ``grpo.moe.route``, remembers its choice, can
replay forced choices), and MTP module k is appended as ``model.layers.{num_hidden_layers + k - 1}``
(enorm, hnorm, eh_proj, shared_head.norm and a full MoE decoder block), as in DeepSeek's release.

Departures from the report: the MTP concatenation order is [emb; h] (the order of the released
weights; the report writes [h; emb], equivalent up to a permutation of W_k's columns); the MTP
modules' routers are balanced and counted like any MoE layer;
lambda is a constant (the report uses 0.3 then 0.1: change ``mtp_loss_weight`` between runs).
Without ``labels``, MTP targets are the input tokens; padding (attention_mask 0) is excluded from the
balance loss, the loads and the MTP targets. In training, MTP runs only while lambda > 0.

Checkpoints are in DeepSeek's release format (what vLLM / SGLang serve): each MTP layer also stores
copies of the shared embedding and output head (``model.layers.{N}.embed_tokens.weight``,
``model.layers.{N}.shared_head.head.weight``; ignored on load, the model shares the main ones), and
config.json carries every routing field those servers read (``RELEASE_ROUTING`` fixed, the rest from
the config; ``ROUTING_KEYS``). vLLM defaults scoring_func to softmax and creates the correction bias
only for topk_method noaux_tc, so without them a checkpoint would be served with the wrong routing.
"""
from __future__ import annotations

import contextlib
import functools
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, DeepseekV3Config, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, create_causal_mask, sdpa_mask
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3DecoderLayer,
    DeepseekV3ForCausalLM,
    DeepseekV3MoE,
    DeepseekV3RMSNorm,
    DeepseekV3TopkRouter,
)

from grpo import moe
from grpo.config import ConfigError
from grpo.model_dir import check_model_dir

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def padded_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA with MLA's value heads zero-padded on CPU to the query/key head size (d_nope + d_rope
    vs d_v): PyTorch's fused CPU kernel needs equal sizes and otherwise falls back to the math path, about 2x
    slower for forward + backward. The padded output columns are zeros and are dropped."""
    pad = query.shape[-1] - value.shape[-1]
    if pad <= 0 or query.device.type != "cpu":
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    out, weights = sdpa_attention_forward(module, query, key, F.pad(value, (0, pad)), attention_mask, **kwargs)
    return out[..., : value.shape[-1]], weights


AttentionInterface.register("sdpa_padded", padded_sdpa_attention)
AttentionMaskInterface.register("sdpa_padded", sdpa_mask)


@dataclass(kw_only=True)
class ModelConfig:
    """Which policy to build and how its DeepSeek-V3 training extras behave."""

    init: str = "tiny"  # preset name (recipes/<name>/model.yaml, checked first), a checkpoint dir, or a hub id
    # fields of init's model config (the preset's or config.json's), e.g. {num_hidden_layers: 2}; a preset's own
    # settings belong in its model.yaml, so that a recipe stays valid for model.init=<any model dir>
    overrides: dict[str, Any] = field(default_factory=dict)
    dtype: Literal["float32", "bfloat16"] = "float32"
    bias_update_speed: float = 0.001  # gamma of the aux-loss-free bias update
    freeze_router_bias: bool = False
    seq_aux_alpha: float = 1e-4  # alpha of the sequence-wise balance loss
    mtp_layers: int = 1  # D, number of MTP modules (0 removes them and their parameters)
    mtp_loss_weight: float = 0.3  # lambda
    # activation checkpointing of the decoder layers (MTP's included; the memory planner's ``--recompute full``):
    # each layer keeps only its input and recomputes its activations in the backward pass, SFT and RL alike; the
    # recomputation routes to the experts the forward chose (``PolicyRouter.keep_routing``) and counts no loads
    gradient_checkpointing: bool = False
    experts_implementation: Literal["grouped_mm", "batched_mm", "eager"] = "grouped_mm"  # eager = per-expert loop
    attn_implementation: Literal["sdpa_padded", "sdpa", "eager"] = "sdpa_padded"  # sdpa_padded: faster on CPU

    def __post_init__(self):
        for name in ("bias_update_speed", "seq_aux_alpha", "mtp_loss_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.mtp_layers < 0:
            raise ConfigError("mtp_layers", f"must be >= 0, got {self.mtp_layers}")


# The routing this policy implements, in the config keys DeepSeek's release and vLLM / SGLang use. transformers'
# DeepseekV3Config has no such fields (it always routes this way); configs may carry them only with these values.
RELEASE_ROUTING: dict[str, Any] = {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "moe_layer_freq": 1}
# Every config key vLLM's / SGLang's DeepSeek-V2/V3 loaders read for routing and MoE / MTP layer placement.
ROUTING_KEYS = (
    "scoring_func", "topk_method", "norm_topk_prob", "n_group", "topk_group", "routed_scaling_factor",
    "num_experts_per_tok", "n_routed_experts", "first_k_dense_replace", "moe_layer_freq", "num_nextn_predict_layers",
)


def check_release_routing(values, prefix: str = "") -> None:
    """Refuse a routing key (RELEASE_ROUTING) of ``values`` (a config or a mapping) holding another value."""
    for key, allowed in RELEASE_ROUTING.items():
        value = values.get(key) if isinstance(values, dict) else getattr(values, key, None)
        if value is not None and value != allowed:
            raise ConfigError(f"{prefix}{key}", f"this policy implements only {key}={allowed!r}, got {value!r}")


class PolicyRouter(DeepseekV3TopkRouter):
    """transformers' router (same ``weight`` and ``e_score_correction_bias``), routing via ``moe.route``.

    Remembers the last call's scores [N, E] and indices [N, K] for the policy's losses and load
    counts; ``forced_indices`` ([N, K] or [B, T, K]) replays given expert choices instead of selecting.
    ``load`` [E] accumulates (fp32, never cast with the model) until ``update_router_bias``.
    """

    def __init__(self, config: DeepseekV3Config):
        super().__init__(config)
        self.forced_indices: torch.Tensor | None = None
        self.last_scores: torch.Tensor | None = None
        self.last_indices: torch.Tensor | None = None
        self.load: torch.Tensor | None = None
        self.last_balance: torch.Tensor | None = None
        self.last_max_vio: float | None = None

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.autocast(hidden_states.device.type, enabled=False):  # V3 gates in fp32, also under autocast
            logits = F.linear(hidden_states.view(-1, self.hidden_dim).float(), self.weight.float())
        route = functools.partial(moe.route, bias=self.e_score_correction_bias, n_group=self.num_group,
                                  topk_group=self.topk_group, top_k=self.top_k, norm=self.norm_topk_prob,
                                  scale=self.routed_scaling_factor)
        forced = self.forced_indices
        if forced is None and torch.is_grad_enabled():
            # the selection has no gradient: made outside autograd, the graph is the same whether the experts are
            # selected or forced, as the recomputation of a checkpointed layer (``keep_routing``) needs
            with torch.no_grad():
                forced = route(logits)[1]
        weights, indices, scores = route(logits, forced=forced)
        self.last_scores, self.last_indices = scores, indices.detach()
        return logits, weights, indices

    def keep_routing(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """The ``context_fn`` of ``torch.utils.checkpoint`` for this router's layer: the forward keeps the experts
        it chose; the recomputation in the backward pass routes to them (so the recomputed graph is the forward's,
        also under routing replay, whose ``force_routing`` block has closed by then) and leaves ``last_*``, which
        the forward's loss and load bookkeeping read, as the forward set them."""
        chosen: list[torch.Tensor] = []

        @contextlib.contextmanager
        def forward():
            yield
            chosen.append(self.last_indices)

        @contextlib.contextmanager
        def recompute():
            kept = self.forced_indices, self.last_scores, self.last_indices
            self.forced_indices = chosen[0]
            try:
                yield
            finally:
                self.forced_indices, self.last_scores, self.last_indices = kept

        return forward(), recompute()


def _keep_layer_routing(layer: DeepseekV3DecoderLayer):
    """``PolicyRouter.keep_routing`` of the router the layer holds now (a partial over the layer, not a closure:
    a deep copy of the model, such as the trainer's reference, then points at its own layers)."""
    return layer.mlp.gate.keep_routing()


def _use_policy_router(layer: DeepseekV3DecoderLayer, config: DeepseekV3Config) -> None:
    if isinstance(layer.mlp, DeepseekV3MoE):
        layer.mlp.gate = PolicyRouter(config)


class MTPLayer(DeepseekV3DecoderLayer):
    """MTP module k, stored as ``model.layers.{num_hidden_layers + k - 1}`` like DeepSeek's release."""

    def __init__(self, config: DeepseekV3Config, layer_idx: int):
        super().__init__(config, layer_idx)
        _use_policy_router(self, config)
        self.enorm = DeepseekV3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hnorm = DeepseekV3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = nn.ModuleDict({"norm": DeepseekV3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)})

    def forward(self, hidden_states: torch.Tensor, inputs_embeds: torch.Tensor, **kwargs) -> torch.Tensor:
        """hidden_states [B, n, d] = h^{k-1}_{0..n-1}; inputs_embeds [B, n, d] = Emb(t_{k..k+n-1}) -> h^k [B, n, d]."""
        merged = self.eh_proj(torch.cat([self.enorm(inputs_embeds), self.hnorm(hidden_states)], dim=-1))
        return super().forward(merged, **kwargs)


@dataclass
class PolicyOutput(MoeCausalLMOutputWithPast):
    """``loss`` = lm_loss + aux_loss; aux_loss = alpha * balance_loss + lambda * mtp_loss (all scalars)."""

    lm_loss: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None


class DeepseekV3Policy(DeepseekV3ForCausalLM):
    """transformers' DeepseekV3ForCausalLM + policy routers, balance loss, MTP (module docstring)."""

    def __init__(self, config: DeepseekV3Config):
        check_release_routing(config)
        super().__init__(config)
        n_main, n_mtp = config.num_hidden_layers, config.num_nextn_predict_layers
        for layer in self.model.layers:
            _use_policy_router(layer, config)
        self.model.layers.extend(MTPLayer(config, n_main + k) for k in range(n_mtp))
        # A checkpoint's MTP layers are not an error when this model was built without (some of) them.
        main = "|".join(str(i) for i in range(n_main + n_mtp))
        # DeepSeek's release also stores copies of the shared embedding and head inside its MTP layer.
        self._keys_to_ignore_on_load_unexpected = {
            rf"^model\.layers\.(?!(?:{main})\.)\d+\.", r"^model\.layers\.\d+\.(?:embed_tokens|shared_head\.head)\."
        }
        self.loss_type = "ForCausalLM"
        self.policy_config = ModelConfig()
        self.last_mtp_loss: torch.Tensor | None = None
        self.post_init()

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return True  # the experts are transformers' DeepseekV3Experts (grouped_mm / batched_mm / eager loop)

    def routers(self) -> Iterator[tuple[int, PolicyRouter]]:
        """(layer index, router) of every MoE layer, MTP layers included."""
        for i, layer in enumerate(self.model.layers):
            if isinstance(getattr(layer.mlp, "gate", None), PolicyRouter):  # also inside grpo.parallel's EP blocks
                yield i, layer.mlp.gate

    def mtp_layers(self) -> list[MTPLayer]:
        return list(self.model.layers[self.config.num_hidden_layers:])

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=checkpoint,
                                    every_n_layers: int = 1) -> None:
        """As transformers (what ``activation_checkpointing_enable`` calls), and each MoE layer's checkpoint keeps
        its routing for the recomputation (``PolicyRouter.keep_routing``; the router is looked up per call, so
        grpo.parallel's EP blocks swapped in later are covered)."""
        super()._set_gradient_checkpointing(enable, gradient_checkpointing_func, every_n_layers)
        for i, _ in self.routers():
            layer = self.model.layers[i]
            layer._gradient_checkpointing_func = functools.partial(
                gradient_checkpointing_func, context_fn=functools.partial(_keep_layer_routing, layer))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> PolicyOutput:
        """input_ids [B, T]; attention_mask [B, T] (1 = token); labels [B, T] (-100 ignored, shifted inside)."""
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs,
        )
        hidden = out.last_hidden_state  # [B, T, d]
        logits = self.lm_head(slice_logits_to_keep(hidden, logits_to_keep))
        batch, seq = hidden.shape[:2]
        mask = attention_mask.bool() if attention_mask is not None and attention_mask.shape == (batch, seq) else None
        n_main = self.config.num_hidden_layers
        routed = [(r, mask) for i, r in self.routers() if i < n_main]
        training = self.training and torch.is_grad_enabled()
        compute_aux = training or labels is not None
        cfg = self.policy_config
        zero = hidden.new_zeros((), dtype=torch.float32)
        mtp_loss = None
        # in training only when it is weighted in; in evaluation with labels, as a metric
        if compute_aux and input_ids is not None and self.mtp_layers() and (cfg.mtp_loss_weight > 0 or not training):
            targets = labels if labels is not None else (input_ids if mask is None else input_ids.masked_fill(~mask, -100))
            mtp_loss, mtp_routed = self._mtp_loss(hidden, input_ids, targets, mask, position_ids)
            routed += mtp_routed
            self.last_mtp_loss = mtp_loss.detach()
        balance = zero
        for router, m in routed:
            scores, indices = router.last_scores, router.last_indices
            if training:
                load = moe.expert_load(indices.view(*m.shape, -1) if m is not None else indices, scores.shape[-1], m)
                router.load = load if router.load is None else router.load + load
            if compute_aux:
                b, t = (m.shape if m is not None else (batch, scores.shape[0] // batch))
                layer_loss = moe.balance_loss(scores.view(b, t, -1), indices.view(b, t, -1), m)
                router.last_balance = layer_loss.detach()
                balance = balance + layer_loss
            router.last_scores = None
        aux = zero + cfg.seq_aux_alpha * balance
        if mtp_loss is not None:
            aux = aux + cfg.mtp_loss_weight * mtp_loss
        loss = lm_loss = None
        if labels is not None:
            lm_loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            loss = lm_loss + aux
        return PolicyOutput(
            loss=loss, aux_loss=aux, logits=logits, cache=out.cache, hidden_states=out.hidden_states,
            attentions=out.attentions, router_logits=out.router_logits, lm_loss=lm_loss,
            balance_loss=balance if compute_aux else None, mtp_loss=mtp_loss,
        )

    def _mtp_loss(self, hidden, input_ids, targets, mask, position_ids):
        """Mean over depths k of the MTP cross-entropy; also the (router, token mask) of each depth."""
        seq = input_ids.shape[1]
        losses, routed = [], []
        for k, layer in enumerate(self.mtp_layers(), start=1):
            n = seq - k  # positions i = 0..n-1 combine h^{k-1}_i with Emb(t_{i+k})
            if n < 2:
                break
            depth_mask = None if mask is None else mask[:, :n] & mask[:, k:]
            pos = position_ids[..., :n] if position_ids is not None else torch.arange(n, device=hidden.device)[None]
            embeds = self.model.embed_tokens(input_ids[:, k:])
            causal = create_causal_mask(
                config=self.config, inputs_embeds=embeds, attention_mask=depth_mask, cache=None, position_ids=pos
            )
            hidden = layer(
                hidden[:, :n], embeds, attention_mask=causal, position_ids=pos,
                position_embeddings=self.model.rotary_emb(embeds, pos),
            )
            logits = self.lm_head(layer.shared_head["norm"](hidden[:, : n - 1]))  # predicts t_{i+k+1}
            target = targets[:, k + 1:]
            ce = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100, reduction="sum")
            losses.append(ce / (target != -100).sum().clamp(min=1))
            routed.append((layer.mlp.gate, depth_mask))
        loss = torch.stack(losses).mean() if losses else hidden.new_zeros((), dtype=torch.float32)
        return loss, routed

    def save_pretrained(self, save_directory, *args, state_dict: dict[str, torch.Tensor] | None = None, **kwargs):
        """As transformers, in DeepSeek's release format: each MTP layer also holds copies of the shared
        embedding and head; config.json names the architecture DeepseekV3ForCausalLM (loadable anywhere) and
        carries every routing field vLLM / SGLang read (ROUTING_KEYS). ``state_dict``: as transformers (e.g.
        gathered weights); on processes that do not write (``is_main_process`` False) nothing is added."""
        if kwargs.get("is_main_process", True):
            state_dict = self._release_state_dict(self.state_dict() if state_dict is None else state_dict)
        super().save_pretrained(save_directory, *args, state_dict=state_dict, **kwargs)
        if not kwargs.get("is_main_process", True):
            return
        path = Path(save_directory) / "config.json"
        config = json.loads(path.read_text())
        config["architectures"] = ["DeepseekV3ForCausalLM"]
        config.update({key: getattr(self.config, key) for key in ROUTING_KEYS if key not in RELEASE_ROUTING})
        config.update(RELEASE_ROUTING)
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def _release_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state_dict`` plus ``model.layers.{i}.embed_tokens.weight`` / ``.shared_head.head.weight`` (copies: a
        safetensors file holds no shared storage) for each MTP layer i present in it."""
        embed = state_dict.get("model.embed_tokens.weight")
        head = state_dict.get("lm_head.weight", embed)  # a tied head is saved as the embedding only
        if embed is None:
            return state_dict
        state_dict = dict(state_dict)
        n_main = self.config.num_hidden_layers
        for i in range(n_main, n_main + self.config.num_nextn_predict_layers):
            prefix = f"model.layers.{i}."
            if any(k.startswith(prefix) for k in state_dict):
                state_dict[f"{prefix}embed_tokens.weight"] = embed.detach().clone()
                state_dict[f"{prefix}shared_head.head.weight"] = head.detach().clone()
        return state_dict


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / DeepSpeed engine wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


@torch.no_grad()
def update_router_bias(model: nn.Module, group=None) -> None:
    """Aux-loss-free balancing step; call after every optimizer step, on every rank (it all-reduces).

    Loads counted since the last call (training-mode forwards with grad enabled, all micro-batches)
    are summed over ``group`` (default: the world) when torch.distributed is initialised, so every
    rank applies the same update b_i += gamma * sign(mean load - load_i). Records MaxVio per layer.
    No-op for models that are not a DeepseekV3Policy.
    """
    policy = _unwrap(model)
    if not isinstance(policy, DeepseekV3Policy):
        return
    routers = [r for _, r in policy.routers()]
    if not routers:
        return
    bias0 = routers[0].e_score_correction_bias
    loads = torch.stack([
        r.load.to(bias0.device) if r.load is not None else torch.zeros_like(bias0, dtype=torch.float32)
        for r in routers
    ])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(loads, group=group)
    cfg = policy.policy_config
    gamma = 0.0 if cfg.freeze_router_bias else cfg.bias_update_speed
    mean = loads.mean(dim=1)
    max_vio = (loads.amax(dim=1) / mean.clamp(min=1e-30) - 1).masked_fill(mean == 0, float("nan"))
    for router, load in zip(routers, loads):
        router.load = None
        if gamma:  # a layer without tokens has sign(mean - load) = 0: unchanged
            bias = router.e_score_correction_bias
            bias.copy_(moe.bias_update(bias.float(), load.to(bias.device), gamma))
    for router, vio in zip(routers, max_vio.tolist()):  # one host synchronisation for all layers
        if vio == vio:  # layers that routed no token keep their last MaxVio
            router.last_max_vio = vio


def moe_metrics(model: nn.Module) -> dict[str, float]:
    """Per MoE layer: max_vio (global batch of the last update, else loads counted so far), bias_norm,
    balance_loss (last forward, without alpha); aggregates moe/max_vio_mean, moe/bias_norm_mean,
    moe/balance_loss (sum over layers) and moe/mtp_loss (last forward). {} for non-V3 models."""
    policy = _unwrap(model)
    if not isinstance(policy, DeepseekV3Policy):
        return {}
    metrics: dict[str, float] = {}
    vios, norms, balances = [], [], []
    for i, router in policy.routers():
        vio = router.last_max_vio
        if vio is None and router.load is not None:
            vio = moe.max_violation(router.load)
        if vio is not None:
            metrics[f"moe/layer{i}/max_vio"] = vio
            vios.append(vio)
        norms.append(metrics.setdefault(f"moe/layer{i}/bias_norm", float(router.e_score_correction_bias.float().norm())))
        if router.last_balance is not None:
            balances.append(metrics.setdefault(f"moe/layer{i}/balance_loss", float(router.last_balance)))
    if vios:
        metrics["moe/max_vio_mean"] = sum(vios) / len(vios)
    if norms:
        metrics["moe/bias_norm_mean"] = sum(norms) / len(norms)
    if balances:
        metrics["moe/balance_loss"] = sum(balances)
    if policy.last_mtp_loss is not None:
        metrics["moe/mtp_loss"] = float(policy.last_mtp_loss)
    return metrics


def last_routing(model: nn.Module) -> dict[int, torch.Tensor]:
    """Expert indices [N, K] (N = B*T of that call) chosen by each MoE layer in its last forward."""
    return {i: r.last_indices for i, r in _unwrap(model).routers() if r.last_indices is not None}


@contextlib.contextmanager
def force_routing(model: nn.Module, indices: dict[int, torch.Tensor]):
    """Routing replay: inside the block, layer i routes its tokens to ``indices[i]`` ([N, K] or [B, T, K])."""
    routers = dict(_unwrap(model).routers())
    unknown = sorted(set(indices) - set(routers))
    if unknown:
        raise ValueError(f"force_routing: layers {unknown} are not MoE layers; MoE layers: {sorted(routers)}")
    try:
        for i, idx in indices.items():
            routers[i].forced_indices = idx
        yield
    finally:
        for i in indices:
            routers[i].forced_indices = None


CONFIG_KEYS = {f.name for f in fields(DeepseekV3Config)} | set(DeepseekV3Config.attribute_map) | {
    "rope_scaling", "rope_theta", "num_nextn_predict_layers"
} | set(RELEASE_ROUTING)


def presets() -> list[str]:
    return sorted(p.parent.name for p in RECIPES.glob("*/model.yaml"))


def preset_config(name: str, overrides: dict[str, Any] | None = None) -> DeepseekV3Config:
    """The DeepseekV3Config of recipes/<name>/model.yaml with ``overrides`` applied (keys validated)."""
    path = RECIPES / name / "model.yaml"
    values = yaml.safe_load(path.read_text()) or {}
    for source, mapping in ((str(path), values), ("overrides", overrides or {})):
        unknown = sorted(set(mapping) - CONFIG_KEYS)
        if unknown:
            raise ConfigError(f"{source}: {unknown[0]}" if source != "overrides" else f"overrides.{unknown[0]}",
                              f"not a DeepseekV3Config field; allowed: {', '.join(sorted(CONFIG_KEYS))}")
        check_release_routing(mapping, f"{source}: " if source != "overrides" else "overrides.")
    try:
        return DeepseekV3Config(**{**values, **(overrides or {})})
    except (TypeError, ValueError) as e:
        raise ConfigError("overrides", f"invalid model config for preset {name!r}: {e}") from None


def check_routing(config: DeepseekV3Config) -> None:
    """Group-limited routing needs equal groups of >= 2 experts (groups are scored by their top-2 sum);
    the release routing keys, where present, hold the values this policy implements."""
    check_release_routing(config)
    experts, groups = config.n_routed_experts, config.n_group
    if groups < 1 or experts % groups or experts // groups < 2:
        raise ConfigError("n_group", f"must split n_routed_experts={experts} into equal groups of >= 2 experts")
    if not 1 <= config.topk_group <= groups:
        raise ConfigError("topk_group", f"must be in 1..n_group={groups}, got {config.topk_group}")
    if not 1 <= config.num_experts_per_tok <= config.topk_group * experts // groups:
        raise ConfigError("num_experts_per_tok", f"must be in 1..{config.topk_group * experts // groups} "
                          f"(the experts of topk_group groups), got {config.num_experts_per_tok}")


def load_policy(cfg: ModelConfig, tokenizer) -> PreTrainedModel:
    """The policy: a fresh DeepseekV3Policy for a preset (vocab, pad/bos/eos from ``tokenizer``), or
    ``from_pretrained`` of a checkpoint dir / hub id (DeepseekV3Policy for model_type deepseek_v3, any
    other causal LM through AutoModelForCausalLM, without the V3 extras). A local dir is checked first
    (``grpo.model_dir.check_model_dir``: config.json with model_type, complete weights)."""
    dtype = getattr(torch, cfg.dtype)
    impl = dict(attn_implementation=cfg.attn_implementation)
    if (RECIPES / cfg.init / "model.yaml").is_file():
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        config = preset_config(cfg.init, {
            **cfg.overrides, "vocab_size": len(tokenizer), "pad_token_id": pad,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "num_nextn_predict_layers": cfg.mtp_layers,
        })
        check_routing(config)
        model = DeepseekV3Policy._from_config(config, dtype=dtype, experts_implementation=cfg.experts_implementation, **impl)
    else:
        check_model_dir(cfg.init, "init")  # a local dir: one-line errors for a missing / half-written one
        try:
            config = AutoConfig.from_pretrained(cfg.init)
        except OSError as e:
            raise ConfigError("init", f"{cfg.init!r} is not a preset ({', '.join(presets())}), a local checkpoint "
                              f"directory or a reachable hub id: {e}") from None
        known = set(RELEASE_ROUTING) if config.model_type == "deepseek_v3" else set()
        unknown = sorted(k for k in cfg.overrides if not hasattr(config, k) and k not in known)
        if unknown:
            raise ConfigError(f"overrides.{unknown[0]}", f"not a field of the {config.model_type} config")
        if config.model_type == "deepseek_v3":
            check_release_routing(cfg.overrides, "overrides.")
        for key, value in cfg.overrides.items():
            setattr(config, key, value)
        if config.model_type == "deepseek_v3":
            config.num_nextn_predict_layers = cfg.mtp_layers
            check_routing(config)
            model = DeepseekV3Policy.from_pretrained(
                cfg.init, config=config, dtype=dtype, experts_implementation=cfg.experts_implementation, **impl
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(cfg.init, config=config, dtype=dtype, **impl)
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
    if isinstance(model, DeepseekV3Policy):
        model.policy_config = cfg
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model
