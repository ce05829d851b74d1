"""Where the rollout engine's log-probs and the trainer's differ, by precision, with the bf16 gap taken apart.

    python bench/mismatch.py [--device cpu|cuda] [--preset tiny|v3-mini] [--sharpen 8]

A random-weight V3 policy (output layer scaled by ``--sharpen``: sharper next-token distributions, as a trained
model has) samples G completions per prompt with ``RolloutEngine``; the trainer's teacher-forced forward
(``GRPOTrainer._forward``'s arithmetic: one batched forward, ``logprobs_and_entropy``) recomputes their log-probs.
Rows (d = log pi_train - log pi_rollout over the sampled tokens; k3 = KL(pi_rollout || pi_train)):

  engine vs trainer        the gap the trainer sees at its first update, per precision: bf16 weights (what
                           ``model.dtype: bfloat16`` trains: bf16 compute copy of fp32 masters), fp32 weights +
                           bf16 autocast, fp32
  ... with R3                the same with the engine's expert choices replayed in the trainer's forward
                           (``routing_replay: rollout``): what is left once routing flips are taken out
  trainer vs trainer       bf16 only: the same forward over the same tokens, each sequence alone instead of in
                           the batch: no function differs, only the blocking of bf16 sums (the noise floor of
                           bf16 arithmetic that no engine change can remove)
  bf16 logits rounding     bf16 only: the trainer's head in bf16 vs in fp32 (F.linear of fp32 copies): the
                           share that comes from rounding logits of large magnitude to bf16's 8 bits
  routing flips            bf16 only: share of tokens per MoE layer whose top-k experts differ between the
                           batched and the alone forward
  per layer                bf16 only: the engine's prefill (``V3Decoder``, the ordinary attention form; its
                           decode step uses the absorbed form) against the trainer's modules on the same tokens,
                           layer by layer: relative RMS difference of the attention output, of the MLP/MoE output
                           and of the residual stream after the layer, and the share of tokens whose experts
                           differ. Shows where the two bf16 computations part and how the gap grows with depth.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import DeepseekV3Config  # noqa: E402

from grpo.loss import LossConfig, Mismatch, logprobs_and_entropy  # noqa: E402
from grpo.model import DeepseekV3Policy, force_routing, last_routing  # noqa: E402
from grpo.rollout import RolloutEngine, SamplingConfig  # noqa: E402
from grpo.engine.containers import Dense  # noqa: E402
from grpo.engine.experts import route_torch  # noqa: E402
from grpo.engine.layer import mlp, norm, prefill_layer  # noqa: E402
from grpo.engine.v3 import V3Decoder, _rms  # noqa: E402


def teacher_forced(policy, prompts: torch.Tensor, completion: torch.Tensor, *, autocast: bool, fp32_head: bool = False,
                   replay: dict | None = None):
    """log pi(completion) [N, L] from one forward over prompt + completion (the trainer's arithmetic)."""
    ids = torch.cat([prompts, completion], 1)
    keep = torch.arange(prompts.shape[1] - 1, ids.shape[1] - 1, device=ids.device)
    with torch.no_grad(), torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast), \
            force_routing(policy, replay or {}):
        out = policy.model(input_ids=ids, use_cache=False)
        h = out.last_hidden_state[:, keep]
        logits = F.linear(h.float(), policy.lm_head.weight.float()) if fp32_head else policy.lm_head(h)
        routes = {k: v.clone() for k, v in last_routing(policy).items()}
        return logprobs_and_entropy(logits.float(), completion, 1.0, entropy=False)[0], routes


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)), 6)


@torch.no_grad()
def per_layer(policy, ids: torch.Tensor) -> list[dict]:
    """The engine's prefill layer by layer (``grpo.engine.layer``, the op table it binds) vs the trainer's
    modules (hooks), on ids [B, T] (no padding). Each layer's attention output is the layer run on a zero
    residual with no MLP (0 + W_O attn, exact), its MLP output ``layer.mlp`` on the engine's own post-attention
    stream, its residual the real layer's output."""
    seen: dict[tuple[str, int], torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(policy.model.layers[: policy.config.num_hidden_layers]):
        hooks.append(layer.self_attn.register_forward_hook(
            lambda m, a, out, i=i: seen.__setitem__(("attn", i), out[0].reshape(-1, out[0].shape[-1]))))
        hooks.append(layer.mlp.register_forward_hook(
            lambda m, a, out, i=i: seen.__setitem__(("mlp", i), out.reshape(-1, out.shape[-1]))))
    trainer = policy.model(input_ids=ids, use_cache=False, output_hidden_states=True)
    train_routes = {k: v.clone() for k, v in last_routing(policy).items()}
    for h in hooks:
        h.remove()
    B, T = ids.shape
    dec = V3Decoder(policy, slots=B, max_len=T)
    ops, cos, sin = dec.ops.prefill_ops, dec.cos[:T], dec.sin[:T]
    x = dec.embed(ids)
    h = _rms(x, dec.in_norm)
    no_mlp = Dense(x.new_zeros(2, x.shape[-1]), x.new_zeros(x.shape[-1], 1))
    rows = []
    for i, (w, d) in enumerate(zip(dec.layers, dec.dims)):
        attn = prefill_layer(torch.zeros_like(x), h, cos, sin, w._replace(mlp=no_mlp), dims=d, ops=ops)[0]
        post = norm(x + attn, w.post_norm, d.eps.post)
        out = mlp(post, w.mlp, d, ops, 0)
        x, h, _ = prefill_layer(x, h, cos, sin, w, dims=d, ops=ops)
        last = i == len(dec.layers) - 1  # transformers' last hidden state is after the final norm
        row = {"layer": i, "attention": rel(attn.flatten(0, 1), seen[("attn", i)]),
               "mlp": rel(out.flatten(0, 1), seen[("mlp", i)]),
               "residual": rel((h if last else x).flatten(0, 1), trainer.hidden_states[i + 1].reshape(B * T, -1))}
        if i in train_routes:  # the experts the engine's routing picks from its own input
            idx = route_torch(post.flatten(0, 1), w.mlp, d.routing)[1]
            flips = idx.sort(-1).values != train_routes[i].view(idx.shape).sort(-1).values
            row["expert_flips"] = round(float(flips.any(-1).float().mean()), 5)
        rows.append(row)
    return rows


def stats(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> dict:
    m = Mismatch.of(a, b, mask, LossConfig(epsilon=0.2, epsilon_high=0.2)).metrics()
    return {k.split("/")[1]: round(v, 7) for k, v in m.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--sharpen", type=float, default=8.0)
    args = ap.parse_args()
    dev = args.device
    prompts_n, G, L = (8, 4, 32) if dev == "cpu" else (64, 4, 256)
    vocab = 300 if args.preset == "tiny" else 32000
    torch.manual_seed(0)
    root = Path(__file__).resolve().parents[1]
    cfg = DeepseekV3Config(**{**yaml.safe_load((root / f"recipes/{args.preset}/model.yaml").read_text()),
                              "vocab_size": vocab, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1})
    fp32 = DeepseekV3Policy._from_config(cfg, dtype=torch.float32).to(dev).eval()
    with torch.no_grad():
        fp32.lm_head.weight.mul_(args.sharpen)
    bf16 = DeepseekV3Policy._from_config(cfg, dtype=torch.bfloat16).to(dev).eval()
    bf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in fp32.state_dict().items()})
    prompts = torch.randint(3, vocab, (prompts_n, 16)).tolist()
    print(f"{args.preset}, {dev}, {prompts_n} prompts x {G} samples x {L} tokens, sharpen {args.sharpen}")
    for name, policy, autocast in [("bf16 weights", bf16, False), ("fp32 weights + bf16 autocast", fp32, True),
                                   ("fp32", fp32, False)]:
        engine = RolloutEngine(policy, None, SamplingConfig(temperature=1.0, max_new_tokens=L, stop_token_ids=[],
                                                            max_batch=prompts_n * G, cuda_graphs=dev == "cuda"))
        ro = engine.generate(prompts, G)
        p = torch.tensor([q for q in prompts for _ in range(G)], device=dev)
        comp, mask = ro.completion_ids.to(dev), ro.completion_mask.to(dev).float()
        train, routes = teacher_forced(policy, p, comp, autocast=autocast)
        print(json.dumps({"rows": "engine vs trainer", "precision": name, **stats(train, ro.logprobs.to(dev), mask)}))
        # R3: the same, with the engine's experts (recorded by its routing op, layers uncompiled) replayed in the
        # trainer's forward
        rec = RolloutEngine(policy, None, SamplingConfig(temperature=1.0, max_new_tokens=L, stop_token_ids=[],
                                                         max_batch=prompts_n * G, record_routing=True))
        ro3 = rec.generate(prompts, G)
        comp3 = ro3.completion_ids.to(dev)
        routed = torch.stack(ro3.routing)  # [N, P+L-1, layers, K] (no stops: every row has L tokens)
        routed = torch.cat([routed, routed[:, -1:]], 1).long().to(dev)  # the last token's experts: unused
        layers = [i for i, _ in policy.routers() if i < policy.config.num_hidden_layers]  # not the MTP modules
        replay = {layer: routed[:, :, j] for j, layer in enumerate(layers)}
        base, _ = teacher_forced(policy, p, comp3, autocast=autocast)
        r3, _ = teacher_forced(policy, p, comp3, autocast=autocast, replay=replay)
        print(json.dumps({"rows": "engine recording its experts vs trainer", "precision": name, **stats(base, ro3.logprobs.to(dev), mask)}))
        print(json.dumps({"rows": "... with R3", "precision": name, **stats(r3, ro3.logprobs.to(dev), mask)}))
        if name != "bf16 weights":
            continue
        alone = [teacher_forced(policy, p[i:i + 1], comp[i:i + 1], autocast=False) for i in range(len(p))]
        alone_logp = torch.cat([a for a, _ in alone])
        print(json.dumps({"rows": "trainer batched vs alone", "precision": name, **stats(train, alone_logp, mask)}))
        head32, _ = teacher_forced(policy, p, comp, autocast=False, fp32_head=True)
        print(json.dumps({"rows": "bf16 vs fp32 head (trainer)", "precision": name, **stats(train, head32, mask)}))
        print(json.dumps({"rows": "engine vs trainer with fp32 head", "precision": name,
                          **stats(head32, ro.logprobs.to(dev), mask)}))
        flips = {}
        for layer, chosen in routes.items():
            batched = chosen.view(len(p), -1, chosen.shape[-1]).sort(-1).values
            single = torch.cat([r[layer].view(1, -1, chosen.shape[-1]) for _, r in alone]).sort(-1).values
            flips[layer] = round(float((batched != single).any(-1).float().mean()), 5)
        print(json.dumps({"rows": "routing flips per layer (batched vs alone)", "precision": name, **flips}))
        for row in per_layer(policy, torch.cat([p, comp], 1)):
            print(json.dumps({"rows": "per layer, engine prefill vs trainer", "precision": name, **row}))


if __name__ == "__main__":
    main()
