"""The DeepSeek-V3 ``Decoder``: MLA latent cache, absorbed decode, one layer definition (``grpo.engine.layer``).

Works directly on the weights of transformers' ``DeepseekV3ForCausalLM`` (and of ``grpo.model``'s policy,
which keeps its module and parameter names): ``bind`` reads them into typed containers
(``grpo.engine.containers``) that hold references, except the stacked projections (one GEMM for q_a and
kv_a, one for gate and up) and the query projection with W_UK folded in (``absorbed_query``): copies kept
in buffers that every bind refills in place (CUDA graphs hold their addresses). ``bind`` also picks the op
table (``grpo.engine.ops``). RoPE cos/sin come from the model's own rotary module (so YaRN and its attention
factor match transformers), and the softmax scale is the attention module's (qk_head_dim^-1/2 times YaRN
mscale^2). A decode step reads each layer's cache (positions < pos) and writes all layers' latents with one
scatter after the last layer; a prefill runs each prompt once and writes its latents to all of its group's
slots. Departure from transformers' eager forward: same math, different summation order (fp32 differences
~1e-6).

Multi-token steps (``verify``): m tokens per slot at positions pos .. pos+m-1 in one forward, each layer
attending over its cache below pos and over the m new latents, causal among them. All m latents are
written; the caller then advances the slot's position by the tokens it keeps, so the latents of rejected
tokens stay behind in the cache beyond the slot's position, where nothing reads them before a later step
rewrites them (every step reads only positions < pos and writes pos onwards).

With ``draft_tokens`` = k > 0 (``grpo.engine.speculative``) the policy's first MTP module is bound too (its
block's cache is the cache's last layer) and ``mtp_step`` runs it; ``pending`` holds each slot's MTP
positions not yet run (``grpo.engine.containers.Pending``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts, DeepseekV3MLP, DeepseekV3MoE

from grpo import kernels
from grpo.config import ConfigError
from grpo.engine.cache import LatentCache
from grpo.engine.containers import Attention, Dense, Dims, Eps, Layer, Moe, Mtp, Pending, Projection, Routing, Stacked
from grpo.engine.experts import Foreign
from grpo.engine.layer import mtp_input
from grpo.engine.ops import select, stacks_experts
from grpo.onednn import packed_linear


def is_v3(model) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == "deepseek_v3"


def mtp_module(model) -> nn.Module:
    """The policy's first MTP module (``grpo.model``: ``model.layers.{num_hidden_layers}``); ConfigError naming
    ``sampling.speculative`` when there is none."""
    layers, n_main = model.model.layers, model.config.num_hidden_layers
    if len(layers) <= n_main or not hasattr(layers[n_main], "eh_proj"):
        raise ConfigError("speculative", "'mtp' drafts with the policy's MTP module and this policy has none "
                          "(load it with model.mtp_layers >= 1 from a checkpoint that has MTP weights)")
    return layers[n_main]


def _rms(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """transformers' RMSNorm module ``norm`` applied to x as one fused op."""
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


def _linear(module: nn.Module):
    """A plain nn.Linear is applied through F.linear (no module-call overhead); anything else (e.g. an adapter
    wrapper) is called as a module."""
    if type(module) is nn.Linear:
        weight, bias = module.weight, module.bias
        return lambda x: F.linear(x, weight, bias)
    return module


def _weight(module: nn.Module) -> torch.Tensor:
    """The weight of a bias-free nn.Linear: the layer functions take weight tensors."""
    if type(module) is not nn.Linear or module.bias is not None:
        raise TypeError(f"the V3 decoder needs bias-free nn.Linear projections, got {module!r}; use backend='generic'")
    return module.weight


def _stacked(buffers: dict, key, *weights: torch.Tensor) -> torch.Tensor:
    """The weights stacked by rows (one GEMM for all), in ``buffers[key]``, refilled in place."""
    rows = sum(w.shape[0] for w in weights)
    buf = buffers.get(key)
    if buf is None or buf.shape[0] != rows:
        with torch.inference_mode(False):  # a normal tensor: later binds refill it, in inference mode or not
            buf = buffers[key] = torch.empty(rows, weights[0].shape[1], dtype=weights[0].dtype, device=weights[0].device)
    with torch.no_grad():
        return torch.cat(weights, out=buf)


def absorbed_query(weight: torch.Tensor, kv_b: torch.Tensor, d: Dims) -> torch.Tensor:
    """The query projection with W_UK folded in (DeepSeek-V2's absorption): weight [H (Dn + Dr), in] of
    q_proj or q_b_proj -> [H (R + Dr), in], per head [W_UK,h^T W^C_h ; W^R_h], so that one GEMM gives
    [q^L_h ; q^R_h] with q^L_h = W_UK,h^T q^C_h. The product is taken in fp32 and rounded once. It holds
    (R + Dr) / (Dn + Dr) times the projection's parameters (3x for V3's shapes)."""
    q = weight.view(d.heads, d.nope + d.rope, -1)
    w_uk = kv_b.view(d.heads, d.nope + d.v_dim, d.rank)[:, : d.nope]
    latent = torch.bmm(w_uk.transpose(1, 2).float(), q[:, : d.nope].float())
    return torch.cat((latent.to(weight.dtype), q[:, d.nope:]), dim=1).view(-1, weight.shape[1])


def _dense(mlp: nn.Module, buffers: dict) -> Dense:
    return Dense(_stacked(buffers, (mlp, "gate_up"), _weight(mlp.gate_proj), _weight(mlp.up_proj)), _weight(mlp.down_proj))


def _stack_experts(experts: DeepseekV3Experts, shared: Dense) -> Stacked:
    """``Stacked`` over copies of a block's routed experts (transformers' layout) and its shared expert."""
    with torch.no_grad():
        dim = experts.gate_up_proj.shape[-1]
        up = torch.cat((experts.gate_up_proj.reshape(-1, dim), shared.gate_up))
        down = torch.cat((experts.down_proj.transpose(0, 1).reshape(dim, -1), shared.down), dim=1)
    return Stacked(packed_linear(up), packed_linear(down))


def bind_layer(layer: nn.Module, next_norm: nn.Module, config, buffers: dict, sink: list | None) -> tuple[Layer, Dims]:
    """The containers of one transformers decoder layer (``next_norm``: the next layer's input norm, or the
    final norm); ``sink`` goes to a foreign MLP block (routing replay)."""
    a, block = layer.self_attn, layer.mlp
    native_moe = isinstance(block, DeepseekV3MoE) and isinstance(block.experts, DeepseekV3Experts)
    routing = Routing(config.n_group, config.topk_group, config.num_experts_per_tok, config.norm_topk_prob,
                      config.routed_scaling_factor) if native_moe else None
    lora = a.q_lora_rank is not None
    eps = Eps(kv=a.kv_a_layernorm.variance_epsilon, q=a.q_a_layernorm.variance_epsilon if lora else 0.0,
              post=layer.post_attention_layernorm.variance_epsilon, next=next_norm.variance_epsilon)
    d = Dims(a.num_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, a.kv_lora_rank, a.scaling,
             bool(getattr(config, "rope_interleave", False)), config.hidden_act, eps, routing)
    q_up, kv_a, kv_b = _weight(a.q_b_proj if lora else a.q_proj), _weight(a.kv_a_proj_with_mqa), _weight(a.kv_b_proj)
    with torch.no_grad():
        query = absorbed_query(q_up, kv_b, d)
    if lora:  # decode and prefill share the stacked [q_a ; kv_a]
        in_proj = _stacked(buffers, (layer, "in_proj"), _weight(a.q_a_proj), kv_a)
        absorbed = Projection(in_proj, None, _stacked(buffers, (layer, "q_b"), query))
        plain = Projection(in_proj, None, q_up)
    else:
        absorbed = Projection(_stacked(buffers, (layer, "in_proj"), query, kv_a), None, None)
        plain = Projection(kv_a, q_up, None)
    w_uv_t = kv_b.view(d.heads, d.nope + d.v_dim, d.rank)[:, d.nope:].transpose(1, 2)
    attn = Attention(absorbed, plain, a.q_a_layernorm.weight if lora else None, a.kv_a_layernorm.weight, kv_b, w_uv_t,
                     _weight(a.o_proj))
    if native_moe:
        shared, experts = _dense(block.shared_experts, buffers), block.experts
        stack = stacks_experts(experts.gate_up_proj.device, experts.gate_up_proj.dtype, config)
        mlp = Moe(shared, block.gate.weight, block.gate.e_score_correction_bias, experts.gate_up_proj,
                  experts.down_proj, _stack_experts(experts, shared) if stack else None)
    else:
        mlp = _dense(block, buffers) if isinstance(block, DeepseekV3MLP) else Foreign(block, sink)
    return Layer(attn, layer.post_attention_layernorm.weight, mlp, next_norm.weight), d


class V3Decoder:
    """Batched prefill and decode over ``slots`` sequences of at most ``max_len`` tokens each (a ``Decoder``).

    Host-side state is the caller's (which slots are active); the device state here is the latent cache,
    ``tokens`` [slots] (the next input token of each slot) and ``positions`` [slots] (``Decoder``).
    """

    refill = True

    def __init__(self, model: nn.Module, *, slots: int, max_len: int, draft_tokens: int = 0):
        config = model.config
        rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
        if rope_type in ("dynamic", "longrope"):
            raise ValueError(f"rope_type {rope_type!r} depends on the sequence length; the V3 decoder precomputes "
                             "RoPE once per cache: use backend='generic'")
        self.model, self.config, self.slots, self.draft_tokens = model, config, slots, draft_tokens
        weight = model.lm_head.weight
        self.device, self.dtype = weight.device, weight.dtype
        self._buffers: dict = {}  # the stacked weights (``bind_layer``)
        self.sink: list | None = None  # expert choices of the MoE layers while recording (``record_routing``)
        self.bind()
        self.cache = LatentCache(layers=len(self.layers) + (self.mtp is not None), slots=slots, max_len=max_len,
                                 kv_lora_rank=config.kv_lora_rank, rope_dim=config.qk_rope_head_dim, dtype=self.dtype,
                                 device=self.device)
        positions = torch.arange(max_len, device=self.device)[None]
        cos, sin = model.model.rotary_emb(torch.empty(0, device=self.device, dtype=self.dtype), positions)
        half = cos.shape[-1] // 2  # cos/sin = cat(f, f) per position: one angle per rotated pair
        self.cos, self.sin = cos[0, :, :half].float(), sin[0, :, :half].float()  # [max_len, Dr/2]
        self.tokens = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.rows = torch.arange(slots, device=self.device) * max_len  # first cache row of each slot
        self.pending = None if self.mtp is None else Pending(
            torch.zeros(slots, draft_tokens + 1, config.hidden_size, dtype=self.dtype, device=self.device),
            torch.zeros(slots, draft_tokens + 1, dtype=torch.long, device=self.device),
            torch.zeros(slots, dtype=torch.long, device=self.device))

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def bind(self) -> None:
        """(Re)read the model's modules and weights into the layer containers and pick the op table (the cache
        is kept). On CPU the decode step's lm_head and stacked experts are packed copies
        (``grpo.onednn.packed_linear``) made here: call bind() after changing the weights
        (``RolloutEngine.generate`` does)."""
        base = self.model.model
        modules = base.layers[: self.config.num_hidden_layers]
        self.embed, self.in_norm, self.lm_head = base.embed_tokens, modules[0].input_layernorm, _linear(self.model.lm_head)
        head = self.model.lm_head
        plain = type(head) is nn.Linear and head.bias is None
        self.decode_head = packed_linear(head.weight) if plain else self.lm_head
        norms = [m.input_layernorm for m in modules[1:]] + [base.norm]
        bound = [bind_layer(m, n, self.config, self._buffers, self.sink) for m, n in zip(modules, norms)]
        self.layers, self.dims = [w for w, _ in bound], [d for _, d in bound]
        self.mtp = self.mtp_dims = None
        if self.draft_tokens:
            m = mtp_module(self.model)
            block, dims = bind_layer(m, m.shared_head["norm"], self.config, self._buffers, self.sink)
            eps = (m.enorm.variance_epsilon, m.hnorm.variance_epsilon, m.input_layernorm.variance_epsilon)
            self.mtp = Mtp(m.enorm.weight, m.hnorm.weight, _weight(m.eh_proj), m.input_layernorm.weight, eps, block)
            self.mtp_dims = dims
        every = self.layers if self.mtp is None else self.layers + [self.mtp.layer]
        self.ops = select(every, self.device, self.dtype, self.config.hidden_act, self.sink)

    def record_routing(self) -> None:
        """From now on keep every MoE layer's expert choices per processed token (``take_routes``); the layers
        then run uncompiled, without Triton kernels or CUDA graphs."""
        self.sink = []
        self.bind()

    def take_routes(self) -> torch.Tensor:
        """The expert choices since the last call, [T, MoE layers, K] (T tokens of the last forward), on the host."""
        routes = torch.stack(self.sink, dim=1).to("cpu", torch.int16)
        self.sink.clear()
        return routes

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        self.cache.move(src, dst)
        self.tokens[dst] = self.tokens[src]
        self.positions[dst] = self.positions[src]
        for t in self.pending or ():
            t[dst] = t[src]

    def decode(self, n: int, span: int) -> torch.Tensor:
        """One token for slots 0..n-1: input ``tokens[:n]`` at ``positions[:n]`` (every position < span).
        Writes their latents to the cache and returns logits [n, V]. Static shapes for given (n, span)."""
        return self.decode_head(self.verify(self.tokens[:n, None], span)[:, 0])

    def verify(self, tokens: torch.Tensor, span: int) -> torch.Tensor:
        """The main model on m tokens per slot: tokens [n, m] at positions[:n] .. positions[:n] + m - 1 of
        slots 0..n-1 (every position < span). Writes all their latents (module docstring) and returns the
        final hidden states under the final norm [n, m, D] (``lm_head`` gives the logits)."""
        x = self.embed(tokens)
        pos = self.positions[:tokens.shape[0]]
        return self._layers(x, _rms(x, self.in_norm), pos, span, 0, self.layers, self.dims)[1]

    def mtp_step(self, tokens: torch.Tensor, prev: torch.Tensor, pos: torch.Tensor, span: int):
        """The MTP module on m positions per slot: position pos + i of slot s combines prev [n, m, D] (the
        previous depth's hidden state there) with the embedding of tokens [n, m] (the token after it); its
        block reads its cache below pos and writes all m latents. Returns (its hidden states [n, m, D], them
        under the shared head's norm [n, m, D]: ``lm_head`` gives the logits of the rows that need them)."""
        x, h = mtp_input(self.embed(tokens), prev, self.mtp)
        return self._layers(x, h, pos, span, len(self.layers), [self.mtp.layer], [self.mtp_dims])

    def _layers(self, x: torch.Tensor, h: torch.Tensor, pos: torch.Tensor, span: int, first: int, layers: list,
                dims: list) -> tuple[torch.Tensor, torch.Tensor]:
        """x [n, m, D] (h: its input norm) through ``layers`` (with ``dims``), whose caches are the cache's
        layers first, first + 1, ...: m tokens of slots 0..n-1 at positions pos .. pos + m - 1 (pos [n]),
        reading each slot's cache below pos (< span) and writing all m latents with one scatter after the
        last layer. Returns the last layer's (x, h) (h = x under its next_norm)."""
        n, m = x.shape[:2]
        at = pos[:, None] + torch.arange(m, device=self.device)  # [n, m]
        cos, sin, latents = self.cos[at], self.sin[at], []
        ops = self.ops
        # Batch and span are the only dynamic sizes: every other size (m included) and every int argument stays
        # a constant (symbolic model sizes broke inductor's code generation), and a second model with other
        # sizes gets its own static variants. Compiled variants per model: dense / MoE layer x batch 1 / more x
        # span < / = max_len (the cache view's strides); with the Triton kernels, dense / MoE x MoE block size
        # (16, 32, 64) x batch 1 / more (they read positions < pos of the whole cache, so the span does not
        # matter).
        pairs = n * m * self.config.num_experts_per_tok
        block = kernels.moe_block(pairs, self.config.n_routed_experts) if ops.kernels else 0
        span = self.cache.max_len if ops.kernels else span
        with torch._dynamo.config.patch(automatic_dynamic_shapes=False, recompile_limit=64):
            for i, (w, d) in enumerate(zip(layers, dims), start=first):
                keys = self.cache.data[i, :n, :span]
                for t in (x, h, pos, cos, sin, keys):
                    torch._dynamo.maybe_mark_dynamic(t, 0)
                torch._dynamo.maybe_mark_dynamic(keys, 1)
                x, h, latent = ops.decode(x, h, keys, pos, cos, sin, w, dims=d, ops=ops.decode_ops,
                                          block=block if d.routing else 0)
                latents.append(latent)
        cache = self.cache.data[first:first + len(layers)].view(len(layers), -1, self.cache.data.shape[-1])
        cache.index_copy_(1, (self.rows[:n, None] + at).flatten(), torch.stack(latents).flatten(1, 2))
        return x, h

    def prefill(self, prompts: list[list[int]], slots: list[list[int]]) -> torch.Tensor:
        """Run each prompt once and write its latents to every slot in ``slots[i]`` (positions 0..len-1).
        Returns the logits at each prompt's last token [len(prompts), V]. With the MTP module, it also runs
        over positions 0..len-2 (the token after the last position is yet to be sampled: that position is
        left pending)."""
        lens = [len(p) for p in prompts]
        ids = torch.zeros(len(prompts), max(lens), dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = torch.tensor(p)
        ids = ids.to(self.device)
        x = self.embed(ids)
        _, h = self._prefill_layers(x, _rms(x, self.in_norm), lens, slots, 0, self.layers, self.dims)
        last = h[torch.arange(len(prompts)), torch.tensor(lens) - 1]  # [B, D]
        if self.mtp is not None:
            if ids.shape[1] > 1:  # one-token prompts leave only their pending position
                x, hm = mtp_input(self.embed(ids[:, 1:]), h[:, :-1], self.mtp)
                self._prefill_layers(x, hm, [n - 1 for n in lens], slots, len(self.layers), [self.mtp.layer],
                                     [self.mtp_dims])
            targets = [s for group in slots for s in group]
            source = torch.tensor([b for b, group in enumerate(slots) for _ in group], device=self.device)
            self.pending.hidden[targets, 0] = last[source]
            self.pending.count[targets] = 1
        return self.lm_head(last)

    def _prefill_layers(self, x: torch.Tensor, h: torch.Tensor, lens: list[int], slots: list[list[int]], first: int,
                        layers: list, dims: list) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, W, D] (right-padded sequences; h its input norm) through ``layers`` at positions 0..W-1; the
        latents of positions < lens[b] go to every slot of ``slots[b]`` (cache layers first, first + 1, ...).
        Returns the last layer's (x, h)."""
        batch, width = x.shape[:2]
        src, dst = [], []
        for b, (n, targets) in enumerate(zip(lens, slots)):
            for s in targets:
                src.extend(range(b * width, b * width + n))
                dst.extend(range(s * self.cache.max_len, s * self.cache.max_len + n))
        src = torch.tensor(src, dtype=torch.long, device=self.device)
        dst = torch.tensor(dst, dtype=torch.long, device=self.device)
        cos, sin = self.cos[:width], self.sin[:width]
        ops = self.ops
        with torch._dynamo.config.patch(automatic_dynamic_shapes=False, recompile_limit=64):  # as for decode
            for i, (w, d) in enumerate(zip(layers, dims), start=first):
                for t, marked in ((x, (0, 1)), (h, (0, 1)), (cos, (0,)), (sin, (0,))):
                    for k in marked:
                        torch._dynamo.maybe_mark_dynamic(t, k)
                x, h, latent = ops.prefill(x, h, cos, sin, w, dims=d, ops=ops.prefill_ops)
                self.cache.data[i].view(-1, latent.shape[-1]).index_copy_(0, dst, latent.view(batch * width, -1)[src])
        return x, h
