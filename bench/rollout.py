"""Rollout engine vs transformers' ``generate``: same random-weight DeepSeek-V3 model, same prompts, same run.

    python bench/rollout.py --device cpu    # 20M config (vocab 32000, hidden 256, 4 layers), fp32,
                                            # batch 128, 32-token prompts, 64 new tokens; goal >= 5x
    python bench/rollout.py --device cuda   # 0.46B config, bf16, 64-token prompts, 256 new tokens,
                                            # batch 256 (goal >= 20x) and batch 64

    python bench/rollout.py --speculative mtp --checkpoint DIR [--speculative-tokens 1 2 3]
        # MTP self-speculative vs plain decoding of the same engine on a trained V3 checkpoint (CPU: the tiny
        # SFT checkpoint), prompts from --prompts (default DIR/../../data/math_test.jsonl, field "prompt").
        # Prints the acceptance rate per draft position, tokens per verify step, and generated tokens/s of
        # speculative over plain decoding as a ratio (wall and process CPU time, best of --reps, with the load
        # average). A checkpoint without MTP weights gets its MTP module fitted first, the main model frozen,
        # by self-distillation: --fit-steps Adam steps of the MTP loss on the policy's own sampled
        # completions of the training prompts (DIR/../../data/math_train.jsonl), printed as "mtp_fit".

The model configs are those of the anchor measurements (shared/anchors/{cpu,gpu}_anchor.py). Both sides
sample at temperature 1 with top-k 50 (transformers' default for ``do_sample=True``) and generate exactly
``new`` tokens (no early stop: min_new_tokens for generate, no stop tokens for the engine); best of
``--reps`` timed runs after a warm-up, in wall time and in process CPU time (the CPU-time ratio is the
robust one on a shared machine with one thread per side: OMP_NUM_THREADS=1). On CUDA the decode step
time is (time(new) - time(1)) / (new - 1) and the roofline fraction is (bytes of weights + cache read per
decode step) / step time / the GPU's memory bandwidth (``GPU_BYTES_PER_S`` by device name; --bandwidth-tbs for
another GPU).
Prints one JSON line per shape.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from grpo.rollout import RolloutEngine, SamplingConfig  # noqa: E402

VOCAB = 32000
GPU_BYTES_PER_S = {"H200": 4.8e12, "H100 80GB HBM3": 3.35e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12,
                   "A100-SXM4-80GB": 2.039e12, "A100-SXM4-40GB": 1.555e12}  # datasheet HBM bandwidth


def gpu_bandwidth(override_tbs: float | None) -> float:
    """Bytes/s of this GPU's memory (``--bandwidth-tbs`` wins; else the datasheet figure of its name)."""
    if override_tbs:
        return override_tbs * 1e12
    name = torch.cuda.get_device_name()
    found = [bw for key, bw in GPU_BYTES_PER_S.items() if key in name]
    if not found:
        raise SystemExit(f"unknown memory bandwidth of {name!r} (known: {', '.join(GPU_BYTES_PER_S)}); "
                         "pass --bandwidth-tbs")
    return found[0]
COMMON = dict(vocab_size=VOCAB, first_k_dense_replace=1, n_shared_experts=1, pad_token_id=0, eos_token_id=1, bos_token_id=1)
CPU_CONFIG = dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                  topk_group=1, q_lora_rank=128, kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32,
                  v_head_dim=32, max_position_embeddings=1024)
GPU_CONFIG = dict(hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=16, n_routed_experts=32, num_experts_per_tok=4, n_group=4,
                  topk_group=2, q_lora_rank=384, kv_lora_rank=256, qk_rope_head_dim=32, qk_nope_head_dim=64,
                  v_head_dim=64, max_position_embeddings=4096)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def best_of(fn, reps: int, device: str) -> tuple[float, float]:
    """(fastest wall time, least process CPU time) of ``reps`` calls, in seconds."""
    wall, cpu = [], []
    for _ in range(reps):
        sync(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return min(wall), min(cpu)


def hf_generate(model, ids: torch.Tensor, new: int):
    kw = dict(do_sample=True, max_new_tokens=new, min_new_tokens=new, pad_token_id=0, eos_token_id=1)
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)


def weight_bytes_per_step(model) -> int:
    """Bytes of parameters a decode step reads: everything except the embedding table (a few rows) and MTP."""
    skip = {id(model.model.embed_tokens.weight)}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in skip)


def run_shape(model, device: str, batch: int, prompt_len: int, new: int, reps: int, goal: float | None,
              bandwidth: float | None) -> dict:
    ids = torch.randint(3, VOCAB, (batch, prompt_len), generator=torch.Generator().manual_seed(0)).to(device)
    hf_generate(model, ids, 4)
    hf_s, hf_cpu = best_of(lambda: hf_generate(model, ids, new), reps, device)

    def engine(n_new: int) -> RolloutEngine:
        cfg = SamplingConfig(temperature=1.0, top_k=50, max_new_tokens=n_new, stop_token_ids=[], max_batch=batch)
        return RolloutEngine(model, None, cfg)

    prompts = ids.tolist()
    full, first = engine(new), engine(1)
    full.generate(prompts, 1)  # warm-up (captures the CUDA graphs of every length bucket)
    ours_s, ours_cpu = best_of(lambda: full.generate(prompts, 1), reps, device)
    ours_threads = full.stats.get("threads")
    row = dict(what="rollout_vs_hf_generate", device=device, dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
               batch=batch, prompt_len=prompt_len, new_tokens=new, threads=torch.get_num_threads(),
               ours_threads=ours_threads,
               hf_seconds=round(hf_s, 3), hf_tokens_per_s=round(batch * new / hf_s, 1),
               ours_seconds=round(ours_s, 3), ours_tokens_per_s=round(batch * new / ours_s, 1),
               ratio=round(hf_s / ours_s, 2), hf_cpu_seconds=round(hf_cpu, 3), ours_cpu_seconds=round(ours_cpu, 3),
               cpu_time_ratio=round(hf_cpu / ours_cpu, 2), goal=goal)
    if device == "cuda":
        first.generate(prompts, 1)
        prefill_s = best_of(lambda: first.generate(prompts, 1), reps, device)[0]
        step_s = (ours_s - prefill_s) / (new - 1)
        cache_per_token = full._decoder.cache.bytes_per_token
        mean_len = prompt_len + new / 2
        step_bytes = weight_bytes_per_step(model) + batch * mean_len * cache_per_token
        row.update(decode_step_ms=round(step_s * 1e3, 3), bytes_per_step=int(step_bytes),
                   roofline_fraction=round(step_bytes / step_s / bandwidth, 3), bandwidth_tbs=bandwidth / 1e12,
                   gpu=torch.cuda.get_device_name())
    return row


def jsonl_prompts(path: Path, limit: int) -> list[str]:
    with open(path) as f:
        return [json.loads(line)["prompt"] for line in f][:limit]


def fit_mtp(model, prompts: list[list[int]], steps: int, pad_id: int, samples: int = 4) -> dict:
    """Fit the policy's MTP module (main model frozen) to the policy's own samples: ``samples`` completions
    per prompt at temperature 1 (plain decoding), then ``steps`` Adam steps of ``_mtp_loss`` over batches
    of 32 of them, with the main model's final hidden states computed once."""
    start = time.perf_counter()
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=160, max_batch=256, seed=1)
    ro = RolloutEngine(model, None, cfg).generate(prompts, samples)
    seqs = [p + ro.completion_ids[r, : ro.lengths[r]].tolist() for r, p in enumerate(ro.prompt_ids)]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for r, s in enumerate(seqs):
        ids[r, : len(s)], mask[r, : len(s)] = torch.tensor(s), True
    with torch.no_grad():
        hidden = torch.cat([model.model(ids[i:i + 64], attention_mask=mask[i:i + 64].long()).last_hidden_state
                            for i in range(0, len(seqs), 64)])
    model.requires_grad_(False)
    mtp = model.mtp_layers()[0]
    mtp.requires_grad_(True)
    opt = torch.optim.Adam(mtp.parameters(), lr=2e-3)
    g, losses = torch.Generator().manual_seed(0), []
    for _ in range(steps):
        b = torch.randint(0, len(seqs), (32,), generator=g)
        loss, _ = model._mtp_loss(hidden[b], ids[b], ids[b].masked_fill(~mask[b], -100), mask[b], None)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.requires_grad_(False)
    return dict(what="mtp_fit", sequences=len(seqs), tokens=int(mask.sum()), steps=steps,
                mtp_loss_first=round(losses[0], 3), mtp_loss_last=round(sum(losses[-20:]) / len(losses[-20:]), 3),
                seconds=round(time.perf_counter() - start, 1))


def speculative_rows(args) -> None:
    """MTP self-speculative vs plain decoding of the same engine on ``args.checkpoint`` (module docstring)."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from data.chat import encode_prompt
    from grpo.model import ModelConfig, load_policy

    ckpt = Path(args.checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    model = load_policy(ModelConfig(init=str(ckpt), mtp_layers=1), tokenizer).eval()
    mtp_key = f"model.layers.{model.config.num_hidden_layers}.eh_proj.weight"
    with safe_open(ckpt / "model.safetensors", "pt") as f:
        trained = mtp_key in f.keys()
    data = Path(args.prompts).parent if args.prompts else ckpt.parents[1] / "data"
    test_file = Path(args.prompts or data / "math_test.jsonl")
    test = [encode_prompt(tokenizer, p) for p in jsonl_prompts(test_file, args.rows)]
    print(json.dumps(dict(what="model", checkpoint=str(ckpt), mtp_weights_in_checkpoint=trained,
                          params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 2), torch=torch.__version__,
                          date=time.strftime("%Y-%m-%d"))), flush=True)
    if not trained:
        train = [encode_prompt(tokenizer, p) for p in jsonl_prompts(data / "math_train.jsonl", 256)]
        print(json.dumps(fit_mtp(model, train, args.fit_steps, tokenizer.pad_token_id)), flush=True)

    def timed(k: int) -> tuple[dict, float, float, int]:
        cfg = SamplingConfig(temperature=1.0, max_new_tokens=args.new_tokens or 160, max_batch=len(test), seed=0,
                             speculative="mtp" if k else "none", speculative_tokens=max(k, 1))
        engine = RolloutEngine(model, tokenizer, cfg)
        engine.generate(test, 1)  # warm-up
        runs = []
        for _ in range(args.reps):
            engine.generator.manual_seed(0)
            start, start_cpu = time.perf_counter(), time.process_time()
            ro = engine.generate(test, 1)
            runs.append((time.perf_counter() - start, time.process_time() - start_cpu, int(ro.lengths.sum())))
        wall, cpu, tokens = min(runs)
        return engine.stats, wall, cpu, tokens

    _, plain_s, plain_cpu, plain_tokens = timed(0)
    for k in args.speculative_tokens:
        stats, spec_s, spec_cpu, spec_tokens = timed(k)
        rates = {key.replace("spec_", ""): round(v, 3) for key, v in stats.items() if key.startswith("spec_accept")}
        print(json.dumps(dict(
            what="speculative_vs_plain", device="cpu", speculative="mtp", k=k, rows=len(test),
            threads=stats.get("threads"), load_avg_1m=round(os.getloadavg()[0], 2), **rates,
            tokens_per_verify_step=round(stats["spec_tokens_per_step"], 3),
            plain_tokens=plain_tokens, spec_tokens=spec_tokens,
            plain_tokens_per_s=round(plain_tokens / plain_s, 1), spec_tokens_per_s=round(spec_tokens / spec_s, 1),
            ratio=round(spec_tokens / spec_s / (plain_tokens / plain_s), 3),
            cpu_time_ratio=round(spec_tokens / spec_cpu / (plain_tokens / plain_cpu), 3))), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--batch", type=int, nargs="*", help="batch sizes (default: 128 on cpu, 256 and 64 on cuda)")
    ap.add_argument("--prompt-len", type=int)
    ap.add_argument("--new-tokens", type=int)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--bandwidth-tbs", type=float, help="cuda: this GPU's memory bandwidth in TB/s for the roofline "
                    "(default: the datasheet figure of its name)")
    ap.add_argument("--speculative", choices=["none", "mtp"], default="none")
    ap.add_argument("--checkpoint", help="--speculative mtp: a trained V3 checkpoint dir (tokenizer included)")
    ap.add_argument("--speculative-tokens", type=int, nargs="*", default=[1, 2, 3])
    ap.add_argument("--prompts", help="--speculative mtp: test prompts, JSON lines with a 'prompt' field")
    ap.add_argument("--rows", type=int, default=64, help="--speculative mtp: prompts decoded together")
    ap.add_argument("--fit-steps", type=int, default=300, help="--speculative mtp: MTP fit steps (no MTP weights)")
    args = ap.parse_args()
    if args.speculative == "mtp":
        if not args.checkpoint:
            raise SystemExit("--speculative mtp needs --checkpoint DIR (a trained V3 checkpoint)")
        speculative_rows(args)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    cpu = args.device == "cpu"
    torch.manual_seed(0)
    config = DeepseekV3Config(**COMMON, **(CPU_CONFIG if cpu else GPU_CONFIG))
    model = DeepseekV3ForCausalLM(config).eval()
    bandwidth = None if cpu else gpu_bandwidth(args.bandwidth_tbs)
    if not cpu:
        model = model.to(torch.bfloat16).cuda()
    batches = args.batch or ([128] if cpu else [256, 64])
    prompt_len = args.prompt_len or (32 if cpu else 64)
    new = args.new_tokens or (64 if cpu else 256)
    print(json.dumps(dict(what="model", params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
                          torch=torch.__version__, date=time.strftime("%Y-%m-%d"))), flush=True)
    for batch in batches:
        goal = {("cpu", 128): 5.0, ("cuda", 256): 20.0}.get((args.device, batch))
        print(json.dumps(run_shape(model, args.device, batch, prompt_len, new, args.reps, goal, bandwidth)), flush=True)


if __name__ == "__main__":
    main()
