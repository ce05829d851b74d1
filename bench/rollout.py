"""Rollout engine vs transformers' ``generate``: same random-weight DeepSeek-V3 model, same prompts, same run.

    python bench/rollout.py --device cpu    # 20M config (vocab 32000, hidden 256, 4 layers), fp32,
                                            # batch 128, 32-token prompts, 64 new tokens; goal >= 5x
    python bench/rollout.py --device cuda   # 0.46B config, bf16, 64-token prompts, 256 new tokens,
                                            # batch 256 (goal >= 20x) and batch 64

    python bench/rollout.py --speculative mtp --checkpoint DIR [--speculative-tokens 1 2 3]
        # MTP self-speculative vs plain decoding of the same engine on a trained V3 checkpoint (CPU: the tiny
        # SFT checkpoint), prompts from --prompts (default DIR/../../data/math_test.jsonl, field "prompt").
        # Prints the acceptance rate per draft position, tokens per verify step, and generated tokens/s of
        # speculative over plain decoding as a ratio (wall and process CPU time, with the load average), each
        # side's tokens and time summed over --reps runs with seeds 0..reps-1 (with stops, a run's time hangs on
        # its longest completion: on an H200 at 200 rows seed 0 alone gave 1.35x, 16 seeds 1.10x), and the
        # acceptance over all of them. --samples G completions per prompt and --max-batch S decode slots (default:
        # all rows at once) run the prompts through S slots with refill, as an RL rollout does: the tail of the
        # last completions then weighs less than when every row starts together. A checkpoint without MTP
        # weights gets its MTP module fitted first, the main model frozen, by self-distillation: --fit-steps Adam
        # steps of the MTP loss on the policy's own sampled completions of the training prompts
        # (DIR/../../data/math_train.jsonl), printed as "mtp_fit".
    python bench/rollout.py --device cuda --speculative mtp [--preset v3-mini] --rows 256 --new-tokens 256
        # without --checkpoint: the preset with random weights, its output layer x --sharpen, and an MTP module
        # fitted as above on its own samples of random prompts (fp32), then decoded in bf16; no stop tokens.
        # Its acceptance means nothing: the fit memorises its samples and does not generalise (H100,
        # 2026-12-06: MTP loss 0.78 on the fit's samples, 18.8 on held-out ones; acceptance 0.3% in fp32 and
        # bf16 alike, the engine's p and q equal to teacher forcing); use a trained checkpoint (after SFT).
        # --fit-steps 0 leaves the MTP module random (made in bf16 on CUDA): it accepts ~nothing, so the
        # ratio is 1 / (the cost of a round in plain decode steps), e.g. for --preset v3-16b

The model configs are those of the anchor measurements (shared/anchors/{cpu,gpu}_anchor.py). Both sides
sample at temperature 1 with top-k 50 (transformers' default for ``do_sample=True``) and generate exactly
``new`` tokens (no early stop: min_new_tokens for generate, no stop tokens for the engine); best of
``--reps`` timed runs after a warm-up, in wall time and in process CPU time (the CPU-time ratio is the
robust one on a shared machine with one thread per side: OMP_NUM_THREADS=1). On CUDA the decode step
time is (time(new) - time(1)) / (new - 1) and the roofline fraction is (bytes of weights + cache read per
decode step) / step time / the GPU's memory bandwidth (``GPU_BYTES_PER_S`` by device name; --bandwidth-tbs for
another GPU).
Prints one JSON line per shape.

Reasoning shapes and real sizes (issue 20; defaults unchanged):

    python bench/rollout.py --device cuda --batch 256 --prompt-len 512 --new-tokens 4096 --long-tail \
        --hf-new-tokens 256 --reps 1
        # completion lengths drawn from a log-normal (median --tail-median, sigma --tail-sigma, capped at
        # --new-tokens: a few percent at the cap), forced as stops on both sides (the engine's rows finish and
        # free their slots at their length; generate gets its eos forced there, and runs to the longest);
        # prints the engine's tokens/s over time (--timeline windows)
    python bench/rollout.py --device cuda --preset v3-16b --batch 64 128 256 --prompt-len 256 \
        --new-tokens 512 --hf-new-tokens 32 --reps 1
        # recipes/<preset>/model.yaml with random bf16 weights made on the GPU

--hf-new-tokens N times ``generate`` on N new tokens only (at the full batch) where the full length would
take too long, and estimates its full time as t(1) + (steps - 1) x its measured step time ((t(N) - t(1)) /
(N - 1)); generate's step time grows with the context, so the estimate is a lower bound on its time and the
printed ratio a lower bound on ours (the row says ``hf_estimated``). The roofline's bytes per step count
the routed experts a step reads as the expected fraction of experts hit by batch x top-k uniform choices
(``experts_read_fraction``; all of them at these batch sizes).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, LogitsProcessor, LogitsProcessorList

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from grpo.engine import slots as engine_slots, speculative  # noqa: E402
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


def hf_generate(model, ids: torch.Tensor, new: int, lengths: torch.Tensor | None = None):
    """``generate`` of exactly ``new`` tokens, or with ``lengths`` [batch] each row's eos forced at its length
    (``ForcedStops``) and up to ``new`` tokens."""
    if lengths is None:
        kw = dict(min_new_tokens=new)
    else:
        kw = dict(logits_processor=LogitsProcessorList([ForcedStops(ids.shape[1], lengths.to(ids.device), 1)]))
    kw.update(do_sample=True, max_new_tokens=new, pad_token_id=0, eos_token_id=1)
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)


class ForcedStops(LogitsProcessor):
    """Row r samples eos exactly as its lengths[r]-th new token (never before): stop positions as the long-tail
    shape draws them, for ``generate``."""

    def __init__(self, prompt_len: int, lengths: torch.Tensor, eos: int):
        self.prompt_len, self.lengths, self.eos = prompt_len, lengths, eos

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        last = self.lengths == input_ids.shape[1] - self.prompt_len + 1
        scores[:, self.eos] = float("-inf")
        scores[last] = float("-inf")
        scores[last, self.eos] = 0.0
        return scores


@contextlib.contextmanager
def forced_lengths(lengths: torch.Tensor):
    """The engine's rows finish ('stop') at lengths[row] tokens: its ``Outputs.add_runs`` (every token goes
    through it) marks them done as a stop token would (the slot is freed and refilled). One token a step."""
    add_runs = engine_slots.Outputs.add_runs

    def forced(self, rows, tokens, logprobs, count):
        done = add_runs(self, rows, tokens, logprobs, count)
        hit = ~self.finished[rows] & (self.count[rows] >= lengths[rows])
        for j in hit.nonzero().flatten().tolist():
            self.reason[int(rows[j])] = "stop"
        self.finished[rows[hit]] = True
        return done | hit

    engine_slots.Outputs.add_runs = forced
    try:
        yield
    finally:
        engine_slots.Outputs.add_runs = add_runs


def experts_read_fraction(config, tokens: int) -> float:
    """Expected fraction of a MoE layer's routed experts that ``tokens`` tokens hit, each choosing top-k of E
    uniformly (a lead for random weights: 1 - (1 - k/E)^tokens)."""
    k, e = config.num_experts_per_tok, config.n_routed_experts
    return 1.0 - (1.0 - k / e) ** tokens


def weight_bytes_per_step(model, tokens: int | None = None) -> int:
    """Bytes of parameters a decode step of ``tokens`` sequences reads: everything except the embedding table
    (a few rows) and MTP, the routed experts scaled by ``experts_read_fraction`` (all of them when None)."""
    skip = {id(model.model.embed_tokens.weight)}
    fraction = 1.0 if tokens is None else experts_read_fraction(model.config, tokens)
    return int(sum(p.numel() * p.element_size() * (fraction if ".experts." in name else 1.0)
                   for name, p in model.named_parameters() if id(p) not in skip))


def hf_timed(model, ids: torch.Tensor, new: int, hf_new: int | None, reps: int, device: str,
             lengths: torch.Tensor | None = None) -> dict:
    """``generate``'s wall and CPU seconds for ``new`` tokens (or forced ``lengths``, running to the longest):
    measured, or with ``hf_new`` < the steps needed estimated from ``hf_new`` steps (module docstring)."""
    steps = new if lengths is None else int(lengths.max())
    if not hf_new or hf_new >= steps:
        s, cpu = best_of(lambda: hf_generate(model, ids, new, lengths), reps, device)
        return dict(hf_seconds=s, hf_cpu_seconds=cpu, hf_estimated=False)
    one, one_cpu = best_of(lambda: hf_generate(model, ids, 1), reps, device)
    part, part_cpu = best_of(lambda: hf_generate(model, ids, hf_new), reps, device)
    step, step_cpu = (part - one) / (hf_new - 1), (part_cpu - one_cpu) / (hf_new - 1)
    return dict(hf_seconds=one + (steps - 1) * step, hf_cpu_seconds=one_cpu + (steps - 1) * step_cpu,
                hf_estimated=True, hf_timed_new_tokens=hf_new, hf_step_ms=round(step * 1e3, 3),
                hf_steps_estimated=steps)


def run_shape(model, device: str, batch: int, prompt_len: int, new: int, reps: int, goal: float | None,
              bandwidth: float | None, hf_new: int | None = None) -> dict:
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(0)).to(device)
    hf_generate(model, ids, 4)
    hf = hf_timed(model, ids, new, hf_new, reps, device)
    hf_s, hf_cpu = hf["hf_seconds"], hf["hf_cpu_seconds"]

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
    if hf["hf_estimated"]:
        row.update({k: v for k, v in hf.items() if k not in ("hf_seconds", "hf_cpu_seconds")})
    if device == "cuda":
        first.generate(prompts, 1)
        prefill_s = best_of(lambda: first.generate(prompts, 1), reps, device)[0]
        step_s = (ours_s - prefill_s) / (new - 1)
        cache_per_token = full._decoder.cache.bytes_per_token
        mean_len = prompt_len + new / 2
        step_bytes = weight_bytes_per_step(model, batch) + batch * mean_len * cache_per_token
        row.update(decode_step_ms=round(step_s * 1e3, 3), bytes_per_step=int(step_bytes),
                   experts_read_fraction=round(experts_read_fraction(model.config, batch), 4),
                   roofline_fraction=round(step_bytes / step_s / bandwidth, 3), bandwidth_tbs=bandwidth / 1e12,
                   gpu=torch.cuda.get_device_name())
    return row


def tail_lengths(batch: int, new: int, median: float, sigma: float) -> torch.Tensor:
    """[batch] completion lengths: log-normal (``median``, ``sigma``) rounded and clipped to 1..new (the mass
    above new sits at the cap)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(batch, generator=g, dtype=torch.float64)
    return (median * torch.exp(sigma * z)).round().clamp(1, new).long()


def timeline(launches: list[tuple[float, int]], start: float, end: float, windows: int) -> list[dict]:
    """The engine's generated tokens/s and mean active sequences in ``windows`` equal spans of [start, end],
    from (host time, sequences) at each decode step's launch (on CUDA one step runs ahead of the host)."""
    width = (end - start) / windows
    out = []
    for w in range(windows):
        lo, hi = start + w * width, start + (w + 1) * width
        inside = [n for t, n in launches if lo <= t < hi]
        out.append(dict(t_s=round(hi - start, 3), tokens_per_s=round(sum(inside) / width, 1),
                        active=round(sum(inside) / max(len(inside), 1), 1)))
    return out


def run_long_tail(model, device: str, batch: int, prompt_len: int, new: int, reps: int, hf_new: int | None,
                  max_batch: int | None, median: float, sigma: float, windows: int) -> dict:
    """The long-tail shape (module docstring): ours and ``generate`` on the same forced completion lengths."""
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(0)).to(device)
    lengths = tail_lengths(batch, new, median, sigma)
    tokens = int(lengths.sum())
    hf_generate(model, ids, 4)
    hf = hf_timed(model, ids, new, hf_new, reps, device, lengths)
    cfg = SamplingConfig(temperature=1.0, top_k=50, max_new_tokens=new, stop_token_ids=[], max_batch=max_batch or batch)
    engine = RolloutEngine(model, None, cfg)
    launches: list[tuple[float, int]] = []
    launch = engine._launch

    def recorded(dec, slots, out, **kw):
        launches.append((time.perf_counter(), slots.n))
        return launch(dec, slots, out, **kw)

    engine._launch = recorded
    prompts = ids.tolist()
    runs = []
    with forced_lengths(lengths):
        engine.generate(prompts, 1)  # warm-up (CUDA graphs of every batch bucket)
        for _ in range(reps):
            launches.clear()
            sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            ro = engine.generate(prompts, 1)
            sync(device)
            end = time.perf_counter()
            runs.append((end - start, time.process_time() - start_cpu, timeline(launches, start, end, windows),
                         dict(engine.stats)))
            if not torch.equal(ro.lengths, lengths):
                raise SystemExit("the engine's completion lengths differ from the forced ones")
    ours_s, ours_cpu, tl, stats = min(runs, key=lambda r: r[0])
    q = torch.quantile(lengths.double(), torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
    row = dict(what="rollout_long_tail_vs_hf_generate", device=device,
               dtype=str(next(model.parameters()).dtype).replace("torch.", ""), batch=batch,
               max_batch=max_batch or batch, prompt_len=prompt_len, max_new_tokens=new,
               lengths=dict(dist=f"lognormal(median {median}, sigma {sigma}) clipped to 1..{new}", total=tokens,
                            mean=round(tokens / batch, 1), p50=round(q[0], 1), p90=round(q[1], 1), p99=round(q[2], 1), max=int(lengths.max()),
                            at_cap=round(float((lengths == new).float().mean()), 4)),
               hf_seconds=round(hf["hf_seconds"], 3), hf_tokens_per_s=round(tokens / hf["hf_seconds"], 1),
               ours_seconds=round(ours_s, 3), ours_tokens_per_s=round(tokens / ours_s, 1),
               ratio=round(hf["hf_seconds"] / ours_s, 2), hf_cpu_seconds=round(hf["hf_cpu_seconds"], 3),
               ours_cpu_seconds=round(ours_cpu, 3), decode_steps=stats["decode_steps"],
               mean_step_ms=round(ours_s / stats["decode_steps"] * 1e3, 3), goal=20.0,
               **{k: v for k, v in hf.items() if k not in ("hf_seconds", "hf_cpu_seconds")})
    if device == "cuda":
        row["gpu"] = torch.cuda.get_device_name()
    row["timeline"] = tl
    return row


def build_model(args, cpu: bool):
    """The bench's random-weight model: the anchor config of the device, or recipes/<preset>/model.yaml made
    directly on the GPU in bf16 (a 16B model is neither made on the CPU nor held there in fp32)."""
    torch.manual_seed(0)
    positions = (args.prompt_len or 0) + (args.new_tokens or 0) + 64
    if args.preset is None:
        base = CPU_CONFIG if cpu else GPU_CONFIG
        config = DeepseekV3Config(**COMMON, **{**base, "max_position_embeddings": max(base["max_position_embeddings"],
                                                                                       positions)})
        model = DeepseekV3ForCausalLM(config).eval()
        return model if cpu else model.to(torch.bfloat16).cuda()
    from grpo.model import preset_config
    config = preset_config(args.preset)
    config.pad_token_id, config.eos_token_id, config.bos_token_id = 0, 1, 1
    config.max_position_embeddings = max(config.max_position_embeddings, positions)
    dtype = torch.float32 if cpu else torch.bfloat16
    with torch.device(args.device):
        return DeepseekV3ForCausalLM._from_config(config, dtype=dtype).eval()


def jsonl_prompts(path: Path, limit: int) -> list[str]:
    with open(path) as f:
        return [json.loads(line)["prompt"] for line in f][:limit]


def fit_mtp(model, prompts: list[list[int]], steps: int, pad_id: int, samples: int = 4, new: int = 160,
            stop_ids: list[int] | None = None) -> dict:
    """Fit the policy's MTP module (main model frozen) to the policy's own samples: ``samples`` completions
    per prompt at temperature 1 (plain decoding, at most ``new`` tokens), then ``steps`` Adam steps of
    ``_mtp_loss`` over batches of 32 of them, with the main model's final hidden states computed once. The
    samples of the last eighth of the prompts are held out: ``mtp_loss_heldout`` is the loss there after the
    fit (a fit that memorises its samples shows as a low ``mtp_loss_last`` and a high held-out loss: the
    random-weight preset's case on an H100, 0.78 vs 18.8)."""
    start = time.perf_counter()
    device = next(model.parameters()).device
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=new, max_batch=256, seed=1, stop_token_ids=stop_ids)
    ro = RolloutEngine(model, None, cfg).generate(prompts, samples)
    seqs = [p + ro.completion_ids[r, : ro.lengths[r]].tolist() for r, p in enumerate(ro.prompt_ids)]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for r, s in enumerate(seqs):
        ids[r, : len(s)], mask[r, : len(s)] = torch.tensor(s), True
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        hidden = torch.cat([model.model(ids[i:i + 64], attention_mask=mask[i:i + 64].long()).last_hidden_state
                            for i in range(0, len(seqs), 64)])
    model.requires_grad_(False)
    mtp = model.mtp_layers()[0]
    mtp.requires_grad_(True)
    opt = torch.optim.Adam(mtp.parameters(), lr=2e-3)
    g, losses = torch.Generator().manual_seed(0), []
    fit = len(seqs) - (len(prompts) // 8) * samples  # rows are prompt-major: the last prompts' samples held out
    for _ in range(steps):
        b = torch.randint(0, fit, (32,), generator=g).to(device)
        loss, _ = model._mtp_loss(hidden[b], ids[b], ids[b].masked_fill(~mask[b], -100), mask[b], None)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.requires_grad_(False)
    with torch.no_grad():
        held = [(model._mtp_loss(hidden[i:i + 32], ids[i:i + 32], ids[i:i + 32].masked_fill(~mask[i:i + 32], -100),
                                 mask[i:i + 32], None)[0].item(), int(mask[i:i + 32].sum()))
                for i in range(fit, len(seqs), 32)]
    return dict(what="mtp_fit", sequences=fit, tokens=int(mask[:fit].sum()), steps=steps,
                mtp_loss_first=round(losses[0], 3), mtp_loss_last=round(sum(losses[-20:]) / len(losses[-20:]), 3),
                heldout_sequences=len(seqs) - fit,
                mtp_loss_heldout=round(sum(v * n for v, n in held) / max(sum(n for _, n in held), 1), 3) if held else None,
                seconds=round(time.perf_counter() - start, 1))


def random_mtp_policy(args):
    """``--speculative mtp`` without a checkpoint: recipes/<--preset, default v3-mini>/model.yaml with one MTP
    module and random weights, the output layer scaled by ``--sharpen`` (next-token distributions about as
    sharp as a trained model's, as ``bench/mismatch.py``), made in fp32 on the device (the MTP fit runs in
    fp32; decoding in bf16 on CUDA), or in bf16 when there is no fit."""
    from grpo.model import DeepseekV3Policy, preset_config

    torch.manual_seed(0)
    config = preset_config(args.preset or "v3-mini", {"num_nextn_predict_layers": 1})
    config.pad_token_id, config.eos_token_id, config.bos_token_id = 0, 1, 1
    bf16 = args.device == "cuda" and args.spec_dtype == "bfloat16" and not args.fit_steps  # nothing to fit in fp32
    with torch.device(args.device):
        model = DeepseekV3Policy._from_config(config, dtype=torch.bfloat16 if bf16 else torch.float32).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(args.sharpen)
    return model


def speculative_rows(args) -> None:
    """MTP self-speculative vs plain decoding of the same engine on ``args.checkpoint``, or on a random-weight
    preset whose MTP module is fitted first (module docstring)."""
    tokenizer, stop_ids = None, None
    if args.checkpoint:
        from safetensors import safe_open
        from transformers import AutoTokenizer

        from data.chat import encode_prompt
        from grpo.model import ModelConfig, load_policy

        ckpt = Path(args.checkpoint)
        tokenizer = AutoTokenizer.from_pretrained(ckpt)
        model = load_policy(ModelConfig(init=str(ckpt), mtp_layers=1), tokenizer).eval().to(args.device)
        mtp_key = f"model.layers.{model.config.num_hidden_layers}.eh_proj.weight"
        with safe_open(ckpt / "model.safetensors", "pt") as f:
            trained = mtp_key in f.keys()
        data = Path(args.prompts).parent if args.prompts else ckpt.parents[1] / "data"
        test_file = Path(args.prompts or data / "math_test.jsonl")
        test = [encode_prompt(tokenizer, p) for p in jsonl_prompts(test_file, args.rows)]
        pad_id = tokenizer.pad_token_id
        if not trained:
            train = [encode_prompt(tokenizer, p) for p in jsonl_prompts(data / "math_train.jsonl", 256)]
        source = dict(checkpoint=str(ckpt), mtp_weights_in_checkpoint=trained)
    else:
        model, trained, pad_id, stop_ids = random_mtp_policy(args), False, 0, []
        g = torch.Generator().manual_seed(0)
        vocab, length = model.config.vocab_size, args.prompt_len or 64
        test = torch.randint(3, vocab, (args.rows, length), generator=g).tolist()
        train = torch.randint(3, vocab, (256, length), generator=g).tolist()
        source = dict(preset=args.preset or "v3-mini", random_weights=True, sharpen=args.sharpen, prompt_len=length)
    print(json.dumps(dict(what="model", **source, params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
                          torch=torch.__version__, date=time.strftime("%Y-%m-%d"))), flush=True)
    if not trained and args.fit_steps:
        print(json.dumps(fit_mtp(model, train, args.fit_steps, pad_id, stop_ids=stop_ids)), flush=True)
    if args.device == "cuda" and args.spec_dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    new = args.new_tokens or 160
    slots = args.max_batch or len(test) * args.samples

    def timed(k: int) -> tuple[dict, float, float, int]:
        cfg = SamplingConfig(temperature=1.0, max_new_tokens=new, max_batch=slots, seed=0,
                             speculative="mtp" if k else "none", speculative_tokens=max(k, 1), stop_token_ids=stop_ids)
        engine = RolloutEngine(model, tokenizer, cfg)
        engine.generate(test, args.samples)  # warm-up
        runs, kept = [], torch.zeros(k + 1, dtype=torch.long)
        for seed in range(args.reps):
            engine.generator.manual_seed(seed)
            sync(args.device)
            start, start_cpu = time.perf_counter(), time.process_time()
            ro = engine.generate(test, args.samples)
            sync(args.device)
            runs.append((time.perf_counter() - start, time.process_time() - start_cpu, int(ro.lengths.sum())))
            if k:
                kept += engine.kept  # this run's rounds (zeroed at each generate)
        wall, cpu, tokens = (sum(r[i] for r in runs) for i in range(3))
        acc = speculative.acceptance(kept)
        rates = {f"accept_rate_{j}": round(acc[f"spec_accept_rate_{j}"], 3) for j in range(1, k + 1)}
        rates["tokens_per_verify_step"] = round(acc["spec_tokens_per_step"], 3)
        return rates, engine.stats.get("threads"), wall, cpu, tokens

    _, _, plain_s, plain_cpu, plain_tokens = timed(0)
    for k in args.speculative_tokens:
        acceptance, threads, spec_s, spec_cpu, spec_tokens = timed(k)
        print(json.dumps(dict(
            what="speculative_vs_plain", device=args.device, speculative="mtp", k=k, rows=len(test),
            samples=args.samples, max_batch=slots,
            new_tokens=new, dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
            gpu=torch.cuda.get_device_name() if args.device == "cuda" else None,
            threads=threads, load_avg_1m=round(os.getloadavg()[0], 2), **acceptance,
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
    ap.add_argument("--preset", choices=["v3-mini", "v3-16b"], help="recipes/<preset>/model.yaml with random "
                    "weights (bf16, made on the GPU) instead of the anchor config")
    ap.add_argument("--hf-new-tokens", type=int, help="time generate on this many new tokens and estimate its "
                    "full time (module docstring)")
    ap.add_argument("--long-tail", action="store_true", help="log-normal completion lengths forced as stops on "
                    "both sides (module docstring); --new-tokens is the cap")
    ap.add_argument("--tail-median", type=float, default=1200.0, help="--long-tail: median completion length")
    ap.add_argument("--tail-sigma", type=float, default=0.7, help="--long-tail: log-normal sigma")
    ap.add_argument("--max-batch", type=int, help="--long-tail and --speculative mtp: the engine's decode slots "
                    "(default: every row at once)")
    ap.add_argument("--timeline", type=int, default=16, help="--long-tail: windows of the tokens/s timeline")
    ap.add_argument("--speculative", choices=["none", "mtp"], default="none")
    ap.add_argument("--checkpoint", help="--speculative mtp: a trained V3 checkpoint dir (tokenizer included)")
    ap.add_argument("--speculative-tokens", type=int, nargs="*", default=[1, 2, 3])
    ap.add_argument("--prompts", help="--speculative mtp: test prompts, JSON lines with a 'prompt' field")
    ap.add_argument("--rows", type=int, default=64, help="--speculative mtp: test prompts")
    ap.add_argument("--samples", type=int, default=1, help="--speculative mtp: completions per prompt")
    ap.add_argument("--fit-steps", type=int, default=300, help="--speculative mtp: MTP fit steps (no MTP weights; 0: no fit)")
    ap.add_argument("--spec-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                    help="--speculative mtp on cuda: the dtype decoded in")
    ap.add_argument("--sharpen", type=float, default=8.0, help="--speculative mtp without --checkpoint: output "
                    "layer scale of the random-weight preset")
    args = ap.parse_args()
    if args.samples < 1 or (args.max_batch is not None and args.max_batch < args.samples):
        ap.error(f"--samples must be >= 1 and --max-batch (if given) >= --samples (a prompt's samples decode "
                 f"together), got --samples {args.samples} --max-batch {args.max_batch}")
    if args.speculative == "mtp":
        speculative_rows(args)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    cpu = args.device == "cpu"
    model = build_model(args, cpu)
    bandwidth = None if cpu else gpu_bandwidth(args.bandwidth_tbs)
    batches = args.batch or ([128] if cpu else [256, 64])
    prompt_len = args.prompt_len or (32 if cpu else 64)
    new = args.new_tokens or (64 if cpu else 256)
    print(json.dumps(dict(what="model", preset=args.preset or ("cpu anchor" if cpu else "gpu anchor (v3-mini)"),
                          params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
                          torch=torch.__version__, date=time.strftime("%Y-%m-%d"))), flush=True)
    for batch in batches:
        if args.long_tail:
            row = run_long_tail(model, args.device, batch, prompt_len, new, args.reps, args.hf_new_tokens,
                                args.max_batch, args.tail_median, args.tail_sigma, args.timeline)
        else:
            goal = {("cpu", 128): 5.0, ("cuda", 256): 20.0}.get((args.device, batch))
            row = run_shape(model, args.device, batch, prompt_len, new, args.reps, goal, bandwidth, args.hf_new_tokens)
        print(json.dumps(row), flush=True)
        if not cpu:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
