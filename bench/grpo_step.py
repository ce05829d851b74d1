"""One GRPO step (rollout + reward + update) of ``grpo.trainer`` vs TRL's ``GRPOTrainer``: same model weights,
prompts, reward and settings, measured in the same run.

    python bench/grpo_step.py --device cpu    # 20M DeepSeek-V3 config, fp32, 4 prompts x 8 completions x 64
                                              # tokens per step, 32-token prompts; goal >= 5x TRL
    python bench/grpo_step.py --device cuda   # v3-mini (0.46B), bf16, 8 prompts x 8 x 256 tokens, 64-token
                                              # prompts; goal >= 10x TRL
    python bench/grpo_step.py --device cuda --new-tokens 4096 --prompt-len 512 --micro-batch 8 --compare-chunked
                                              # reasoning shape: the update with the blocked output layer
                                              # (train.chunked_head_mb 0) against the plain head

The model configs and TRL settings are those of the anchor measurements (shared/anchors/{cpu,gpu}_anchor.py:
TRL 1.16 without vLLM, beta = 0, one optimizer step per generation batch, reward = completion characters / 100).
Our side runs the project's policy class (``grpo.model.DeepseekV3Policy``, with its routing-bias update and
balance loss) loaded with the same initial weights as TRL's transformers ``DeepseekV3ForCausalLM``, at TRL's
defaults: temperature 1, no top-k/top-p, loss_type dapo, eps 0.2, mu = 1, one minibatch. Step time is the median
over ``--steps`` steps after one warm-up step; tokens/s = completions * max_new_tokens / median step time (as the
anchors count; neither side forces a length, and random weights rarely emit eos); the process CPU time per step
is printed too (robust to other jobs sharing the cores, with --threads 1). Prints one JSON line each for
the environment, our step, TRL's step and the ratio. TRL runs first, in a process of its own (``trl_apart``);
``--trl-keep-heap`` gives it our trainer's CPU heap options (``grpo.optim.keep_freed_heap``) as an extra row.
TRL is skipped with a message when it is not installed.

``--new-tokens``, ``--prompt-len``, ``--prompts``, ``--group``, ``--micro-batch`` change the shape (defaults: the
anchors'); ``--no-anchor`` (or ``--skip-trl``) leaves TRL out. ``--compare-chunked`` runs one rollout, then the
update (``--steps`` timed after one warm-up, on the same batch) with the output layer in blocks (``train.chunked_head_mb``
0) and plain (inf), and prints
for each the update's tokens/s (completion tokens / median update time) and its peak memory above what was held
before it: on CUDA torch.cuda.max_memory_allocated, on the CPU the growth of the process's peak resident set
(VmHWM, reset through /proc/self/clear_refs after returning freed heap with malloc_trim; reported as null with a
note where that is not available); then their ratios. ``--gradient-checkpointing`` turns on
``model.gradient_checkpointing`` for our side.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from grpo.loss import LossConfig  # noqa: E402
from grpo.model import DeepseekV3Policy  # noqa: E402
from grpo.optim import keep_freed_heap  # noqa: E402
from grpo.reward_types import RewardScores  # noqa: E402
from grpo.rollout import SamplingConfig, cpu_threads  # noqa: E402
from grpo.trainer import GRPOTrainer, TrainerConfig  # noqa: E402
from rollout import COMMON, CPU_CONFIG, GPU_CONFIG, VOCAB  # noqa: E402  (bench/rollout.py: the anchor configs)

SHAPES = {  # device -> prompts per step, completions per prompt, prompt tokens, new tokens, lr, model config
    "cpu": dict(prompts=4, group=8, prompt_len=32, new=64, lr=1e-5, config=CPU_CONFIG),
    "cuda": dict(prompts=8, group=8, prompt_len=64, new=256, lr=1e-6, config=GPU_CONFIG),
}


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def prompts(n: int, length: int) -> list[str]:
    g = torch.Generator().manual_seed(1)
    return [" ".join(f"t{int(x)}" for x in torch.randint(3, VOCAB, (length,), generator=g)) for _ in range(n)]


def length_reward(completions, **_) -> list[float]:
    return [len(c) / 100 for c in completions]


def our_trainer(shape: dict, model: torch.nn.Module, tok, texts: list[str], device: str, steps: int,
                out: str) -> GRPOTrainer:
    from accelerate import Accelerator

    n = shape["prompts"] * shape["group"]
    cfg = TrainerConfig(max_steps=steps + 1, prompts_per_step=shape["prompts"], group_size=shape["group"],
                        micro_batch_size=shape["micro_batch"] or n, lr=shape["lr"], bf16=device == "cuda",
                        save_every=0, sample_every=0, loss=LossConfig(loss_type="dapo"))
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=shape["new"], max_batch=n)

    def rewards(prompts, completions, **columns):
        return RewardScores({"length": length_reward(completions)}, {"length": 1.0}, {"length": 0})

    return GRPOTrainer(cfg, model=model, tokenizer=tok, sampling=sampling, rewards=rewards,
                       rows=[{"prompt": t} for t in texts], encode=lambda r: tok.encode(r["prompt"]),
                       output_dir=out, wandb_mode="disabled", accelerator=Accelerator(cpu=device == "cpu"))


def ours(shape: dict, model: torch.nn.Module, tok, texts: list[str], device: str, steps: int) -> dict:
    n = shape["prompts"] * shape["group"]
    with tempfile.TemporaryDirectory() as out:
        trainer = our_trainer(shape, model, tok, texts, device, steps, out)
        times, cpu, lengths, rollout, train = [], [], [], [], []
        for i in range(steps + 1):
            start, start_cpu = time.perf_counter(), time.process_time()
            metrics = trainer.train_step()[0]
            if device == "cuda":
                torch.cuda.synchronize()
            if i:  # the first step warms up (allocations, CUDA graphs)
                times.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
                lengths.append(metrics["completions/mean_length"])
                rollout.append(metrics["time/rollout_s"])
                train.append(metrics["time/train_s"])
    median = statistics.median(times)
    return dict(what="ours_grpo_step", completions_per_step=n, completion_len=shape["new"],
                step_seconds=[round(t, 3) for t in times], median_step_s=round(median, 3),
                median_step_cpu_s=round(statistics.median(cpu), 3), rollout_s=round(statistics.median(rollout), 3), train_s=round(statistics.median(train), 3),
                mean_generated_len=round(statistics.mean(lengths), 1),
                completion_tokens_per_s=round(n * shape["new"] / median, 1))


class PeakMemory:
    """Peak memory above the level at construction, until ``mib()``: CUDA allocations, or on the CPU the growth of
    the peak resident set (None where /proc/self/clear_refs cannot reset it)."""

    def __init__(self, device: str):
        self.device = device
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap goes back, so the next peak is this run's
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
        except OSError:
            self.base = None
            return
        self.base = self._status("VmRSS")

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    def mib(self) -> float | None:
        if self.device == "cuda":
            return round((torch.cuda.max_memory_allocated() - self.base) / 2**20, 1)
        return None if self.base is None else round((self._status("VmHWM") - self.base) / 2**20, 1)


def compare_chunked(shape: dict, model: torch.nn.Module, tok, texts: list[str], device: str, steps: int) -> None:
    """One rollout, then the update on its batch with the blocked output layer and with the plain head."""
    with tempfile.TemporaryDirectory() as out:
        trainer = our_trainer(shape, model, tok, texts, device, steps, out)
        trainer.policy.eval()
        samples = trainer._sample()[0]
        batch = trainer._to_batch(samples, trainer._advantages(samples))
        tokens = float(batch.completion_mask.sum())
        rows = {}
        for chunked in (True, False):
            trainer.cfg.chunked_head_mb = 0 if chunked else float("inf")
            times = []
            with cpu_threads(trainer.accelerator.device, trainer.cfg.cpu_threads):
                peak = PeakMemory(device)
                for i in range(steps + 1):
                    start = time.perf_counter()
                    trainer._update(batch)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    if i:
                        times.append(time.perf_counter() - start)
                memory = peak.mib()
            median = statistics.median(times)
            rows[chunked] = dict(what="update", chunked_head=chunked, completions=len(batch),
                                 micro_batch=trainer.cfg.micro_batch_size, prompt_len=batch.prompt_ids.shape[1],
                                 completion_len=batch.completion_ids.shape[1], completion_tokens=int(tokens),
                                 update_seconds=[round(t, 3) for t in times], median_update_s=round(median, 3),
                                 update_tokens_per_s=round(tokens / median, 1), peak_memory_mib=memory)
            if memory is None:
                rows[chunked]["memory_note"] = "no peak-RSS reset on this system (/proc/self/clear_refs)"
            emit(**rows[chunked])
    on, off = rows[True], rows[False]
    emit(what="chunked_ratio", speedup=round(on["update_tokens_per_s"] / off["update_tokens_per_s"], 2),
         peak_memory_ratio=(round(off["peak_memory_mib"] / on["peak_memory_mib"], 2)
                            if on["peak_memory_mib"] and off["peak_memory_mib"] else None))


def trl(shape: dict, model: torch.nn.Module, tok, texts: list[str], device: str, steps: int) -> dict | None:
    try:
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import GRPOConfig, GRPOTrainer as TRLGRPOTrainer
    except ImportError as e:
        emit(what="trl_grpo_step", skipped=f"TRL is not importable ({e}); `pip install trl==1.16.0` to compare")
        return None
    n = shape["prompts"] * shape["group"]
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(output_dir=out, per_device_train_batch_size=n, num_generations=shape["group"],
                          max_completion_length=shape["new"], learning_rate=shape["lr"], use_cpu=device == "cpu",
                          bf16=device == "cuda", logging_steps=100, max_steps=steps + 1, report_to=[],
                          save_strategy="no", gradient_checkpointing=False, beta=0.0, temperature=1.0,
                          disable_tqdm=True)
        stamps = []

        class Stamp(TrainerCallback):
            def on_step_end(self, *a, **k):
                if device == "cuda":
                    torch.cuda.synchronize()
                stamps.append((time.perf_counter(), time.process_time()))

        trainer = TRLGRPOTrainer(model=model, reward_funcs=length_reward, args=args,
                                 train_dataset=Dataset.from_dict({"prompt": texts}), processing_class=tok)
        trainer.add_callback(Stamp())
        trainer.train()
    times = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]  # step i+1 ends - step i ends: step 1 warms up
    cpu = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])]
    median = statistics.median(times)
    return dict(what="trl_grpo_step", completions_per_step=n, completion_len=shape["new"],
                step_seconds=[round(t, 3) for t in times], median_step_s=round(median, 3),
                median_step_cpu_s=round(statistics.median(cpu), 3),
                completion_tokens_per_s=round(n * shape["new"] / median, 1))


def trl_apart(shape: dict, config, state: dict, texts: list[str], a: argparse.Namespace) -> dict | None:
    """``trl`` in a fresh (spawned) process, run before our side: each side runs as its users run it, with no
    state left by the other (our trainer's process-wide CPU heap options, ``grpo.optim.keep_freed_heap``; the
    heap TRL's run leaves behind, after which our step measured ~15% slower in the same process)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_trl_child, (shape, config, state, texts, a.device, a.steps, a.threads, a.trl_keep_heap))


def _trl_child(shape, config, state, texts, device, steps, threads, keep_heap) -> dict | None:
    if threads:
        torch.set_num_threads(threads)
    if keep_heap:
        keep_freed_heap()
    model = DeepseekV3ForCausalLM(config).to(torch.bfloat16 if device == "cuda" else torch.float32)
    model.load_state_dict(state)
    return trl(shape, model.to(device), tokenizer(), texts, device, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side (after one warm-up step)")
    parser.add_argument("--skip-trl", "--no-anchor", dest="skip_trl", action="store_true", help="leave TRL out")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--new-tokens", type=int, default=None, help="completion length (default: the anchor's)")
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default: the anchor's)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per step (default: the anchor's)")
    parser.add_argument("--group", type=int, default=None, help="completions per prompt (default: the anchor's)")
    parser.add_argument("--micro-batch", type=int, default=None, help="completions per forward (default: all)")
    parser.add_argument("--compare-chunked", action="store_true",
                        help="time the update with the output layer in blocks and plain instead of the step against TRL")
    parser.add_argument("--trl-keep-heap", action="store_true",
                        help="TRL's process with our CPU heap options (grpo.optim.keep_freed_heap)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="model.gradient_checkpointing (ours)")
    a = parser.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if a.device == "cuda" and torch.cuda.device_count() > 1 and not a.skip_trl:
        raise SystemExit("TRL's GRPOTrainer refuses several GPUs visible to one process (nn.DataParallel): "
                         "run with CUDA_VISIBLE_DEVICES=0")
    given = dict(new=a.new_tokens, prompt_len=a.prompt_len, prompts=a.prompts, group=a.group)
    shape = {**SHAPES[a.device], **{k: v for k, v in given.items() if v is not None}, "micro_batch": a.micro_batch}
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    positions = max(shape["config"]["max_position_embeddings"], shape["prompt_len"] + shape["new"])
    config = DeepseekV3Config(**COMMON, **{**shape["config"], "max_position_embeddings": positions},
                              num_nextn_predict_layers=0)
    torch.manual_seed(0)
    reference = DeepseekV3ForCausalLM(config).to(dtype)
    policy = DeepseekV3Policy._from_config(config, dtype=dtype)
    policy.load_state_dict(reference.state_dict())
    if a.gradient_checkpointing:  # as grpo.model.load_policy does
        policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    tok, texts = tokenizer(), prompts(256, shape["prompt_len"])
    emit(what="env", date=datetime.date.today().isoformat(), device=a.device,
         hardware=torch.cuda.get_device_name() if a.device == "cuda" else f"{os.cpu_count()} CPU cores",
         threads=torch.get_num_threads(), torch=torch.__version__, transformers=transformers.__version__,
         params_m=round(sum(p.numel() for p in reference.parameters()) / 1e6, 1),
         shape={k: v for k, v in shape.items() if k != "config"}, gradient_checkpointing=a.gradient_checkpointing)
    if a.compare_chunked:
        compare_chunked(shape, policy, tok, texts, a.device, a.steps)
        return
    theirs = None if a.skip_trl else trl_apart(shape, config, reference.state_dict(), texts, a)
    mine = ours(shape, policy, tok, texts, a.device, a.steps)
    emit(**mine)
    if theirs is not None:
        emit(**theirs, keep_freed_heap=a.trl_keep_heap)
        emit(what="ratio", speedup=round(mine["completion_tokens_per_s"] / theirs["completion_tokens_per_s"], 2),
             cpu_time_speedup=round(theirs["median_step_cpu_s"] / mine["median_step_cpu_s"], 2),
             goal=5 if a.device == "cpu" else 10)


if __name__ == "__main__":
    main()
