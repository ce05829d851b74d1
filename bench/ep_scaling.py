"""Expert-parallel scaling: training tokens/s per GPU of v3-mini at ep_size=2 on 2 GPUs vs ep_size=1 on 1 GPU.

    python bench/ep_scaling.py                       # GPUs 0 and 1, v3-mini, bf16, 8 x 1024 tokens per GPU per step
    python bench/ep_scaling.py --device cpu --preset tiny --seq-len 64 --micro-batch 2 --steps 2   # smoke run

Weak scaling: every GPU trains on its own micro-batch of the same shape, so at ep_size=2 each GPU holds half of
the routed experts and computes, on average, as many (token, expert) pairs as the single GPU (its own tokens'
and its peer's, exchanged by all-to-all), plus the gradient all-reduce of the replicated parameters.
One training step = policy forward with labels (LM + balance + MTP losses), backward, AdamW step (clip 1.0),
router-bias update with loads summed over ranks. Three runs, each in its own processes:

    plain-ep1      1 GPU, the stages' single-process path (bf16: true, no parallel section): fp32 weights,
                   bf16 autocast, fused torch AdamW
    deepspeed-ep1  1 GPU, grpo.parallel.parallelize(ep_size=1): DeepSpeed ZeRO-1, bf16 weights, fp32 masters
    deepspeed-ep2  2 GPUs (torchrun), grpo.parallel.parallelize(ep_size=2): AutoEP + ZeRO-1, bf16 weights

tokens/s per GPU = micro-batch * seq-len / median step time (each step timed to a device sync; the slowest
rank's median), after --warmup steps.
Efficiency = deepspeed-ep2 per GPU / plain-ep1 (goal >= 0.85), also printed against deepspeed-ep1 (the
same software stack, so the ratio isolates the cost of splitting the experts). Peak memory per GPU is printed
next to grpo.memory's estimate for the DeepSpeed runs. One JSON line per run, then the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from grpo.memory import GiB, Layout, plan  # noqa: E402
from grpo.model import DeepseekV3Policy, ModelConfig, preset_config, update_router_bias  # noqa: E402

OPTIM = dict(lr=1e-5, weight_decay=0.0, max_grad_norm=1.0)


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def worker(args) -> None:
    import torch.distributed as dist

    from grpo.parallel import init_distributed, parallelize

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    cuda = args.device == "cuda"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda and args.mode == "deepspeed" else torch.float32
    torch.manual_seed(0)
    config = preset_config(args.preset, dict(pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                             num_nextn_predict_layers=args.mtp))
    model = DeepseekV3Policy._from_config(config, dtype=dtype, attn_implementation="sdpa",
                                          experts_implementation="grouped_mm").to(device).train()
    model.policy_config = ModelConfig(mtp_layers=args.mtp)
    if args.mode == "plain":
        optimizer = torch.optim.AdamW(model.parameters(), lr=OPTIM["lr"], weight_decay=OPTIM["weight_decay"],
                                      fused=cuda)  # as grpo.trainer

        def step(loss):
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM["max_grad_norm"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            update_router_bias(model)
        net = model
    else:
        net, _ = parallelize(model, OPTIM, ep_size=args.ep, zero_stage=1)

        def step(loss):
            net.backward(loss, scale_wrt_gas=False)
            net.step()
            update_router_bias(net)
    g = torch.Generator().manual_seed(1000 + rank)
    batches = [torch.randint(3, config.vocab_size, (args.micro_batch, args.seq_len), generator=g).to(device)
               for _ in range(2)]

    def run(n: int) -> None:
        for i in range(n):
            x = batches[i % 2]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda and args.mode == "plain"):
                loss = net(input_ids=x, labels=x).loss
            step(loss)

    run(args.warmup)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    dist.barrier()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        run(1)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    elapsed = torch.tensor([statistics.median(times)], device=device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) if cuda else 0], dtype=torch.float64, device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if rank == 0:
        result = dict(run=f"{args.mode}-ep{args.ep}", gpus=world, preset=args.preset, seq_len=args.seq_len,
                      micro_batch=args.micro_batch, steps=args.steps, median_step_s=round(elapsed.item(), 4),
                      tokens_per_s_per_gpu=round(args.micro_batch * args.seq_len / elapsed.item(), 1),
                      peak_gib=round(peak.item() / GiB, 2))
        if args.mode == "deepspeed":
            estimate = plan(config, Layout(gpus=world, ep=args.ep, zero=1, seq_len=args.seq_len,
                                           micro_batch=args.micro_batch, weight_bytes=2 if cuda else 4,
                                           mtp=args.mtp > 0))
            result["planner_gib"] = round(estimate.total / GiB, 2)
        emit(**result)
    dist.destroy_process_group()


def launch(args, mode: str, ep: int) -> dict:
    """Run one measurement in fresh processes (one per GPU) and return its JSON line."""
    env = dict(os.environ)
    if args.device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(args.gpus.split(",")[:ep])
    else:
        env["DS_ACCELERATOR"] = "cpu"
    flags = ["--worker", "--mode", mode, "--ep", str(ep), "--device", args.device, "--preset", args.preset,
             "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch), "--steps", str(args.steps),
             "--warmup", str(args.warmup), "--mtp", str(args.mtp)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ep),
           os.path.abspath(__file__), *flags]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{mode}-ep{ep} failed (exit {proc.returncode})")
    print(lines[-1], flush=True)
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--gpus", default="0,1", help="the two GPUs to use (CUDA_VISIBLE_DEVICES)")
    ap.add_argument("--preset", default="v3-mini")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=8, help="sequences per GPU per step")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--mtp", type=int, default=1, help="MTP modules (the policy's default is 1)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=["plain", "deepspeed"], help=argparse.SUPPRESS)
    ap.add_argument("--ep", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        raise SystemExit(f"needs 2 GPUs, found {torch.cuda.device_count()}")
    emit(what="env", torch=torch.__version__, gpu=torch.cuda.get_device_name() if args.device == "cuda" else "cpu")
    plain = launch(args, "plain", 1)
    ds1 = launch(args, "deepspeed", 1)
    ds2 = launch(args, "deepspeed", 2)
    per_gpu = ds2["tokens_per_s_per_gpu"]
    emit(what="efficiency", ep2_vs_plain_ep1=round(per_gpu / plain["tokens_per_s_per_gpu"], 3),
         ep2_vs_deepspeed_ep1=round(per_gpu / ds1["tokens_per_s_per_gpu"], 3), goal=0.85)


if __name__ == "__main__":
    main()
