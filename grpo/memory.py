"""Per-rank training memory of a DeepSeek-V3 layout: parameters, gradients, optimizer states, activations.

    python -m grpo.memory --preset v3-671b --gpus 256 --ep 64 --zero 1 --seq-len 4096 --micro-batch 1
    python -m grpo.memory --preset v3-671b --gpus 32,64,128,256 --ep 32 --zero 2 --recompute full

Layout (``grpo.parallel``'s; ``--pp`` adds pipeline stages for comparison with published layouts only,
``grpo.parallel`` itself has no pipeline parallelism). N = gpus = pp * dp; each stage holds a contiguous
slice of the decoder layers (embedding on the first stage; final norm, head and MTP modules on the last);
the dp ranks of a stage form EP groups of e ranks, so edp = dp / e ranks share each expert shard.
Memory of the heaviest stage, per rank, Psi_d = its replicated parameters (everything but routed experts),
Psi_e = its routed-expert parameters / e:

    weights     b_w (Psi_d + Psi_e)                                   b_w = 2 (bf16) or 4 (fp32)
    gradients   b_g (Psi_d + Psi_e)              ZeRO 0, 1            b_g = b_w (DeepSpeed accumulates in the
                b_g (Psi_d / dp + Psi_e / edp)   ZeRO 2                model dtype) unless --grads fp32
    optimizer   (4 + 2 b_m) (Psi_d / dp + Psi_e / edp) + 4 max(Psi_d / dp, Psi_e / edp)      ZeRO 1, 2:
                DeepSpeed's optimizer keeps an fp32 copy of the owned partition (the master weights) and AdamW m, v
                (b_m = 4 fp32, or 2 with --moments bf16); during the step it builds the fp32 gradient of one
                parameter group (dense, then experts) at a time
                (2 b_m + 8 [b_w < 4]) (Psi_d + Psi_e)                  ZeRO 0 (grpo.optim's local step): AdamW
                on fp32 masters under bf16, plus the fp32 copy of the gradient the masters are stepped with
    (the ZeRO paper's (2 + 2 + K) Psi accounting with K = 12, plus that transient gradient copy.)

The weights row is the compute copy the forward and the rollout engine read (bf16 under bf16 training); the
fp32 masters sit in the optimizer row on every path.

Activations: bytes saved for backward per token (``activation_bytes_per_token``), b_a = 2 (bf16) or 4 (fp32)
bytes per activation; h hidden, H heads, d_n/d_r/d_v head dims, r_q/r_kv LoRA ranks, I expert width, I_f
dense FFN width, N_s shared experts, K routed experts per token, E routed experts, V vocabulary:

    RMSNorm      (4 + 2 b_a) h            its fp32 input copy, the normalised input, the output (next matmul's input)
    MLA          RMSNorm + b_a [3 r_q (q_a out, normalised, q_a_layernorm out) + (r_kv + d_r) + 2 r_kv
                 (kv_a out, normalised, kv_a_layernorm out) + 2H(d_n + d_r) (q, k) + H d_v (v) + H d_v
                 (attention out)] + 4H (fp32 log-sum-exp of fused attention: no s x s matrix is stored)
    dense FFN    RMSNorm + b_a 4 I_f      (gate, up, silu(gate), product)
    MoE FFN      RMSNorm + 4h [b_a < 4] (the router's fp32 input) + 12E (fp32 logits, scores, normalised scores)
                 + b_a [K (2h + 4I) + 4 N_s I]   (per routed copy: dispatched input, gate, up, silu, product,
                 expert output kept for the weighting; the shared experts like a dense FFN)
    MTP module   a MoE layer + b_a 5h (enorm in/normalised, hnorm normalised, eh_proj input) + a head
    head         RMSNorm + 4V             (fp32 log-probabilities of the loss; the logits are not kept)

The counts are those of this project's implementation (transformers' modules, grpo.model): the test measures
the tensors autograd saves on a tiny model and finds the formula within a few percent, apart from the
s x s attention probabilities of the CPU (non-fused) attention kernel, which fused GPU attention does not keep.
Assumptions: balanced routing (each rank's experts receive K tokens per local token; a skewed batch
receives more), fused attention (memory linear in sequence length), no dropout, the tensors above stored
once. ``--recompute full`` is the training option ``model.gradient_checkpointing: true`` (activation
checkpointing of every decoder layer, grpo.model): it keeps only each layer's input b_a h per token plus one
layer's activations while it is recomputed (and the head and MTP modules, counted in full here although
grpo.model recomputes the MTP layers too). The head row is SFT's; the RL update's blocked output layer
(``train.chunked_head_mb``, when a micro-batch's logits exceed it) keeps 4 bytes per token (a log-sum-exp) instead
of 4V. With pipeline stages, stage s
holds pp - s micro-batches in flight (1F1B); without, one. Not counted: CUDA context and allocator fragmentation (typically 2-5 GB),
communication buckets (DeepSpeed's reduce/allgather buckets, a few hundred MB each), all-to-all buffers
beyond the dispatched activations above, the rollout KV cache.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Literal

from transformers import DeepseekV3Config

from grpo.config import ConfigError
from grpo.params import count_params

GiB = 1024**3


@dataclass(frozen=True, kw_only=True)
class Layout:
    """How the model is trained: ranks, parallel degrees, ZeRO stage, batch shape, dtypes."""

    gpus: int
    ep: int = 1
    zero: Literal[0, 1, 2] = 1
    pp: int = 1
    seq_len: int = 4096
    micro_batch: int = 1
    recompute: Literal["none", "full"] = "none"
    weight_bytes: int = 2  # 2 = bf16 training (fp32 master weights in the optimizer), 4 = fp32
    grad_bytes: int | None = None  # None: the weight dtype (DeepSpeed's default)
    moment_bytes: int = 4  # AdamW m and v: 4 = fp32, 2 = bf16 (as in the DeepSeek-V3 report)
    mtp: bool = True  # count the model's MTP modules

    def __post_init__(self):
        if self.gpus < 1 or self.pp < 1 or self.ep < 1:
            raise ConfigError("layout", f"gpus, pp and ep must be >= 1, got {self.gpus}, {self.pp}, {self.ep}")
        if self.gpus % self.pp:
            raise ConfigError("pp", f"must divide gpus ({self.gpus}), got {self.pp}")
        if (self.gpus // self.pp) % self.ep:
            raise ConfigError("ep", f"must divide the data-parallel ranks per stage ({self.gpus // self.pp}), got {self.ep}")
        if self.zero not in (0, 1, 2):
            raise ConfigError("zero", f"must be 0, 1 or 2, got {self.zero}")


@dataclass(frozen=True)
class StageParams:
    """Parameters held by one pipeline stage: replicated ones and all of its routed experts (unsharded)."""

    replicated: int
    routed: int
    moe_layers: int  # MoE blocks in the stage, MTP included
    dense_layers: int
    has_head: bool


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per rank (of the heaviest stage). ``params_*`` are parameter counts on this rank."""

    layout: Layout
    params_replicated: int
    params_experts: int
    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


def layer_params(c: DeepseekV3Config) -> dict[str, int]:
    """Per-layer parameter counts: attention (+ 2 norms), dense FFN, MoE replicated part, MoE routed experts,
    MTP extras (enorm, hnorm, eh_proj, shared_head.norm), embedding, head (final norm + lm_head)."""
    d, heads, qk = c.hidden_size, c.num_attention_heads, c.qk_nope_head_dim + c.qk_rope_head_dim
    attn = d * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * heads * qk if c.q_lora_rank else d * heads * qk
    attn += d * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
    attn += c.kv_lora_rank * heads * (c.qk_nope_head_dim + c.v_head_dim) + heads * c.v_head_dim * d + 2 * d
    expert = 3 * d * c.moe_intermediate_size
    return dict(attn=attn, dense_ffn=3 * d * c.intermediate_size, moe_replicated=c.n_shared_experts * expert
                + c.n_routed_experts * d, moe_routed=c.n_routed_experts * expert, mtp_extra=2 * d + 2 * d * d + d,
                embed=c.vocab_size * d, head=d + (0 if c.tie_word_embeddings else c.vocab_size * d))


def stage_params(c: DeepseekV3Config, pp: int, mtp: bool) -> list[StageParams]:
    """Contiguous split of the decoder layers (then MTP modules) over ``pp`` stages, earlier stages taking the
    remainder; embedding on stage 0, head and MTP on the last stage. Checked against grpo.params.count_params."""
    p = layer_params(c)
    n_dense = min(c.first_k_dense_replace, c.num_hidden_layers)
    kinds = ["dense"] * n_dense + ["moe"] * (c.num_hidden_layers - n_dense)
    n_mtp = c.num_nextn_predict_layers if mtp else 0
    if pp > len(kinds):
        raise ConfigError("pp", f"at most {len(kinds)} stages (decoder layers), got {pp}")
    bounds = [sum(len(kinds) // pp + (1 if i < len(kinds) % pp else 0) for i in range(s)) for s in range(pp + 1)]
    stages = []
    for s in range(pp):
        chunk = kinds[bounds[s]:bounds[s + 1]]
        n_moe, last = chunk.count("moe"), s == pp - 1
        replicated = sum(p["attn"] + (p["dense_ffn"] if k == "dense" else p["moe_replicated"]) for k in chunk)
        routed = n_moe * p["moe_routed"]
        if s == 0:
            replicated += p["embed"]
        if last:
            replicated += p["head"] + n_mtp * (p["attn"] + p["moe_replicated"] + p["mtp_extra"])
            routed += n_mtp * p["moe_routed"]
            n_moe += n_mtp
        stages.append(StageParams(replicated, routed, n_moe, chunk.count("dense"), last))
    counted = count_params(c)
    expected = counted.total + (counted.mtp if n_mtp else 0)
    if sum(st.replicated + st.routed for st in stages) != expected:
        raise AssertionError(f"stage split counts {sum(st.replicated + st.routed for st in stages)} parameters, "
                             f"grpo.params.count_params {expected}")
    return stages


def activation_bytes_per_token(c: DeepseekV3Config, act_bytes: int = 2) -> dict[str, int]:
    """Bytes saved for backward per token (module docstring): MLA block, dense FFN, MoE FFN (each with its
    RMSNorm), MTP extras, head."""
    h, heads, b = c.hidden_size, c.num_attention_heads, act_bytes
    norm = (4 + 2 * b) * h
    q = 3 * c.q_lora_rank if c.q_lora_rank else 0
    mla = norm + b * (q + c.kv_lora_rank + c.qk_rope_head_dim + 2 * c.kv_lora_rank
                      + 2 * heads * (c.qk_nope_head_dim + c.qk_rope_head_dim) + 2 * heads * c.v_head_dim) + 4 * heads
    inter, k = c.moe_intermediate_size, c.num_experts_per_tok
    router = (4 * h if b < 4 else 0) + 12 * c.n_routed_experts
    moe = norm + router + b * (k * (2 * h + 4 * inter) + 4 * c.n_shared_experts * inter)
    return dict(mla=mla, dense_ffn=norm + b * 4 * c.intermediate_size, moe_ffn=moe, mtp_extra=b * 5 * h,
                head=norm + 4 * c.vocab_size)


def _stage_activations(c: DeepseekV3Config, st: StageParams, lay: Layout, n_mtp: int, in_flight: int) -> float:
    a = activation_bytes_per_token(c, act_bytes=lay.weight_bytes)
    layers = [a["mla"] + a["dense_ffn"]] * st.dense_layers + [a["mla"] + a["moe_ffn"]] * st.moe_layers
    head = (a["head"] * (1 + n_mtp) + a["mtp_extra"] * n_mtp) if st.has_head else 0
    if lay.recompute == "full":
        per_token = len(layers) * lay.weight_bytes * c.hidden_size + max(layers, default=0) + head
    else:
        per_token = sum(layers) + head
    return per_token * lay.seq_len * lay.micro_batch * in_flight


def plan(c: DeepseekV3Config, lay: Layout) -> MemoryPlan:
    """Per-rank memory of the heaviest pipeline stage (module docstring for every term)."""
    if c.n_routed_experts % lay.ep:
        raise ConfigError("ep", f"must divide n_routed_experts ({c.n_routed_experts}), got {lay.ep}")
    dp = lay.gpus // lay.pp
    edp = dp // lay.ep
    n_mtp = c.num_nextn_predict_layers if lay.mtp else 0
    plans = []
    for s, st in enumerate(stage_params(c, lay.pp, lay.mtp)):
        psi_d, psi_e = st.replicated, st.routed // lay.ep
        owned = psi_d / dp + psi_e / edp if lay.zero >= 1 else psi_d + psi_e
        grad_bytes = lay.grad_bytes or lay.weight_bytes
        if lay.zero >= 1:  # DeepSpeed's ZeRO optimizer: fp32 master copy, m, v; fp32 gradient copy of one group
            optimizer = owned * (4 + 2 * lay.moment_bytes) + 4 * max(psi_d / dp, psi_e / edp)
        else:  # grpo.optim.MasterAdamW: m, v (+ under bf16 the fp32 masters and their fp32 gradient)
            optimizer = owned * (2 * lay.moment_bytes + (8 if lay.weight_bytes < 4 else 0))
        grads = grad_bytes * ((psi_d / dp + psi_e / edp) if lay.zero == 2 else (psi_d + psi_e))
        plans.append(MemoryPlan(lay, psi_d, psi_e, lay.weight_bytes * (psi_d + psi_e), grads, optimizer,
                                _stage_activations(c, st, lay, n_mtp, in_flight=lay.pp - s)))
    return max(plans, key=lambda m: m.total)


def describe(name: str, c: DeepseekV3Config, m: MemoryPlan) -> str:
    lay = m.layout
    dp = lay.gpus // lay.pp
    w = {2: "bf16", 4: "fp32"}
    lines = [
        f"{name} on {lay.gpus} GPUs: pp={lay.pp} x dp={dp}, ep={lay.ep} ({c.n_routed_experts // lay.ep} routed experts "
        f"per MoE layer per rank, edp={dp // lay.ep}), ZeRO-{lay.zero}, {w[lay.weight_bytes]} weights, "
        f"{w[lay.grad_bytes or lay.weight_bytes]} grads, {w[lay.moment_bytes]} AdamW m/v"
        + (", fp32 master weights" if lay.weight_bytes < 4 else ""),
        f"micro-batch {lay.micro_batch} x {lay.seq_len} tokens, recompute={lay.recompute}; heaviest stage per rank: "
        f"{m.params_replicated / 1e9:.2f} B replicated + {m.params_experts / 1e9:.2f} B routed-expert parameters",
        f"  {'weights':<14}{m.weights / GiB:9.2f} GiB",
        f"  {'gradients':<14}{m.gradients / GiB:9.2f} GiB",
        f"  {'optimizer':<14}{m.optimizer / GiB:9.2f} GiB",
        f"  {'activations':<14}{m.activations / GiB:9.2f} GiB",
        f"  {'total':<14}{m.total / GiB:9.2f} GiB   (+ CUDA context, fragmentation, comm buckets: not counted)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from grpo.model import preset_config

    ap = argparse.ArgumentParser(description="Per-rank memory of a DeepSeek-V3 training layout (formulas: module doc).")
    ap.add_argument("--preset", default="v3-671b", help="recipes/<preset>/model.yaml")
    ap.add_argument("--gpus", default="256", help="number of GPUs, or a comma-separated list")
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--zero", type=int, default=1, choices=[0, 1, 2])
    ap.add_argument("--pp", type=int, default=1, help="pipeline stages (planning only; grpo.parallel has none)")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--recompute", choices=["none", "full"], default="none")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="weights (and activations)")
    ap.add_argument("--grads", choices=["bf16", "fp32"], default=None, help="default: the weight dtype")
    ap.add_argument("--moments", choices=["bf16", "fp32"], default="fp32", help="AdamW m and v")
    ap.add_argument("--no-mtp", action="store_true", help="leave out the MTP modules")
    args = ap.parse_args(argv)
    size = {"bf16": 2, "fp32": 4}
    try:
        config = preset_config(args.preset)
        for gpus in (int(g) for g in args.gpus.split(",")):
            lay = Layout(gpus=gpus, ep=args.ep, zero=args.zero, pp=args.pp, seq_len=args.seq_len,
                         micro_batch=args.micro_batch, recompute=args.recompute, weight_bytes=size[args.dtype],
                         grad_bytes=size[args.grads] if args.grads else None, moment_bytes=size[args.moments],
                         mtp=not args.no_mtp)
            print(describe(args.preset, config, plan(config, lay)) + "\n")
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
