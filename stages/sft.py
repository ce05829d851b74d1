"""Stage 1, cold-start SFT: fine-tune a causal LM on chat-formatted chain-of-thought data.

    python -m stages.sft --recipe recipes/tiny/sft.yaml tokenizer=runs/tiny/tokenizer [key=value ...]
    python -m stages.sft --recipe recipes/tiny/sft.yaml model.init=/path/to/a/hf/model   (its own tokenizer)
    accelerate launch -m stages.sft --recipe recipes/v3-mini/sft.yaml tokenizer=runs/v3-mini/tokenizer

Objective, per optimizer step over the micro-batches m = 1..M of every process (M = grad_accum):

    L(theta) = 1/M * sum_m [ -1/|A_m| * sum_{(b,t) in A_m} log pi_theta(x_{b,t} | x_{b,<t})  +  aux_m ]

A_m = the assistant tokens of micro-batch m (message contents and their end-of-turn token, from
``data.chat.encode_chat``; system/user turns, template markers and padding have label -100), aux_m = the
policy's MoE auxiliary loss (alpha * sequence-wise balance loss + lambda * MTP loss; 0 for other models),
which ``grpo.model.DeepseekV3Policy`` already adds into ``.loss`` when labels are given. Each micro-batch
is a token mean, weighted equally (as TRL's SFTTrainer without ``average_tokens_across_devices``).
After every optimizer step the aux-loss-free router bias is updated (``update_router_bias``).

DeepSeek-R1 trains its cold start on a few thousand long CoT samples; here the built-in generated traces
(``data.generate``'s cot_train) stand in for them. Batching: each epoch a seeded permutation, cut into
pools of 64 micro-batches, each pool sorted by length and cut into micro-batches (padding stays small),
the micro-batches shuffled. Micro-batches that do not fill a last optimizer step of an epoch are
skipped. The data position (epoch, micro-batch index) is checkpointed, so a resumed run continues with
the same batches, optimizer, schedule and RNG streams. Re-running the same command resumes from the latest
checkpoint in ``output_dir`` (``train.resume_from: latest``, the default; ``none`` starts over and removes the
old checkpoints; only the step budget, logging, checkpointing and evaluation keys may differ from the
checkpoint's ``run_config.yaml``, see ``grpo.checkpoint``). SIGINT/SIGTERM: the current optimizer step
finishes, a checkpoint is written, exit status 130/143; a second signal exits at once. ``DONE`` is removed
only once the new run has loaded its inputs, and ``final/``, ``eval.json`` and ``DONE`` are written under a
temporary name, then renamed into place.

Processes: ``accelerate launch`` runs data parallel (DDP) over its processes, each taking its share of
every step's micro-batches; with ``parallel.ep_size > 1`` (or ``parallel.zero_stage``) the policy is
wrapped by ``grpo.parallel.parallelize`` (DeepSpeed AutoEP + ZeRO: routed experts sharded over ep_size
ranks; DeepSpeed clips and steps, weight decay then applies to every parameter).

Writes to ``output_dir``: ``checkpoints/`` (``grpo.checkpoint``), ``final/`` (the model + tokenizer, loadable
by ``AutoModelForCausalLM.from_pretrained`` and as ``model.init`` of the next stage), ``metrics.jsonl``,
``wandb/``, ``eval.json`` (held-out greedy accuracy, see ``stages.evaluate``) and ``DONE`` when complete.
"""
from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import datasets
import torch
import transformers
from accelerate.utils import set_seed

from data.chat import encode_chat
from data.loaders import DataConfig, DataError, load_dataset_split, load_rows, mix_by_weight
from grpo.checkpoint import (StopOnSignal, export_model, load_checkpoint, mark_done, publish, resume_point,
                             save_checkpoint, start_fresh)
from grpo.config import ConfigError, cli, run
from grpo.logger import MetricsLogger
from grpo.model import ModelConfig, load_policy, moe_metrics, presets, update_router_bias
from grpo.optim import AdamWConfig, build_step
from grpo.parallel import ParallelConfig, make_accelerator
from grpo.model_dir import load_tokenizer
from stages.evaluate import HeldoutConfig, curve_point, heldout_accuracy, load_heldout, summary_line, write_results

POOL = 64  # micro-batches per length-sorting pool


@dataclass(kw_only=True)
class TrainConfig:
    """Optimisation and the loop. Batch sizes are per process: an optimizer step sees
    micro_batch_size * grad_accum * num_processes conversations."""

    lr: float = 1e-3
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0  # optimizer steps of linear warm-up
    weight_decay: float = 0.0  # on matrices only (not norms, biases, router bias)
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs
    micro_batch_size: int = 16
    grad_accum: int = 1
    max_seq_len: int = 512  # longer conversations are truncated (rows with no assistant token left are dropped)
    max_grad_norm: float = 1.0  # 0 = no clipping (the norm is still logged)
    bf16: bool = False  # bf16 autocast over fp32 weights; under DeepSpeed bf16 weights (fp32 masters, grpo.optim)
    seed: int = 0  # model init, data order
    log_every: int = 10  # steps
    save_every: int = 0  # steps between checkpoints; 0 = only the final one
    keep_last: int = 2
    # "latest": output_dir/checkpoints' newest (a fresh start if none); "none": start over, removing them; or a dir
    resume_from: str | None = "latest"

    def __post_init__(self):
        for key in ("epochs", "micro_batch_size", "grad_accum", "log_every", "keep_last"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("warmup_steps", "save_every", "weight_decay", "max_grad_norm"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"must be >= 0, got {getattr(self, key)}")
        if self.lr <= 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("max_steps", f"must be >= 1 or null (then epochs counts), got {self.max_steps}")
        if self.max_seq_len < 2:
            raise ConfigError("max_seq_len", f"must be >= 2, got {self.max_seq_len}")
        self.adamw  # validates the optimizer settings

    @property
    def adamw(self) -> AdamWConfig:
        return AdamWConfig(lr=self.lr, betas=self.adam_betas, weight_decay=self.weight_decay,
                           max_grad_norm=self.max_grad_norm, schedule=self.lr_scheduler, warmup_steps=self.warmup_steps)


@dataclass(kw_only=True)
class SFTConfig:
    """One SFT run. Which tokenizer and model config, by what ``model.init`` names:

    - a preset (``recipes/<name>/model.yaml``, e.g. ``tiny``): a model built from scratch with that file's
      architecture (``model.overrides`` on top) and no tokenizer of its own, so ``tokenizer`` is required: the
      vocab size and special tokens come from it (``make sft`` and the pipeline's sft step pass the run's,
      ``tokenizer=runs/<size>/tokenizer``);
    - a model dir or hub id (a stage's ``final/``, a Hugging Face model): its own config.json, tokenizer and chat
      template. ``tokenizer`` left null keeps them; naming one replaces them (the embeddings grow when the
      named vocab is larger), so do that only on purpose.

    The stage recipes name no tokenizer and carry no ``model.overrides``: the preset's architecture fields live in
    its model.yaml, so ``python -m stages.sft --recipe recipes/tiny/sft.yaml model.init=/path/to/qwen`` trains that
    model with its own tokenizer, chat template and config.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: str | None = None  # tokenizer dir or hub id; null: the one saved with model.init (required for a preset)
    data: list[DataConfig] = field(
        default_factory=lambda: [DataConfig(path="runs/tiny/data/cot_train.jsonl")]
    )  # rows with `messages`, or `prompt` + `response` (one user and one assistant turn)
    output_dir: str = "runs/tiny/sft"
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: HeldoutConfig = field(default_factory=HeldoutConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # ep_size > 1 or zero_stage: DeepSpeed
    run_name: str = "sft"
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"

    def __post_init__(self):
        if self.tokenizer is None and self.model.init in presets():
            raise ConfigError("tokenizer", f"required when model.init is the preset {self.model.init!r} (a model "
                              f"built from scratch has no tokenizer); e.g. tokenizer=runs/{self.model.init}/tokenizer "
                              "(what `make sft` passes)")
        if not self.data:
            raise ConfigError("data", "needs at least one dataset")
        self.eval.refuse_curve_under(self.deepspeed)

    @property
    def deepspeed(self) -> bool:
        return self.parallel.ep_size > 1 or self.parallel.zero_stage is not None


# ---- data -------------------------------------------------------------------------------------------------


@dataclass
class Example:
    input_ids: list[int]  # [T] the chat-formatted conversation
    labels: list[int]  # [T] = input_ids on assistant tokens, -100 elsewhere


def to_messages(row: dict) -> list[dict]:
    if "messages" in row:
        return row["messages"]
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]


def load_conversations(cfg: DataConfig) -> list[list[dict]]:
    """Chat rows of one dataset: its `messages` column, else `prompt`/`response` as a two-turn chat."""
    ds, source = load_dataset_split(cfg)
    chat = "messages" in cfg.columns or "messages" in ds.column_names
    try:
        rows = load_rows(cfg, ["messages"] if chat else ["prompt", "response"])
    except DataError as e:
        raise DataError(f"{e} (SFT data needs a 'messages' column, or 'prompt' and 'response' columns)") from None
    return [to_messages(row) for row in rows]


def build_example(tokenizer, messages: list[dict], max_seq_len: int) -> Example | None:
    """Tokenize one conversation; None when truncation leaves no assistant token to learn from."""
    ids, mask = encode_chat(tokenizer, messages, max_len=max_seq_len)
    if sum(mask[1:]) == 0:  # position 0 is never predicted
        return None
    return Example(input_ids=ids, labels=[t if m else -100 for t, m in zip(ids, mask)])


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids [B, T], attention_mask [B, T] (1 = token), labels [B, T] (-100 = no loss)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n], labels[i, :n], attention[i, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Micro-batches (example indices) of one epoch: a permutation seeded by (seed, epoch), length-sorted
    within pools of POOL micro-batches, then the micro-batches shuffled. The count is the same every epoch."""
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    for start in range(0, len(order), POOL * batch_size):
        pool = sorted(order[start:start + POOL * batch_size], key=lambda i: lengths[i])
        batches += [pool[i:i + batch_size] for i in range(0, len(pool), batch_size)]
    rng.shuffle(batches)
    return batches


def step_stream(lengths: list[int], batch_size: int, seed: int, per_step: int, epoch: int,
                index: int) -> Iterator[tuple[int, int, list[list[int]]]]:
    """From data position (epoch, index): (epoch, index after this step, the step's per_step micro-batches)."""
    while True:
        batches = epoch_batches(lengths, batch_size, seed, epoch)
        usable = len(batches) - len(batches) % per_step
        while index < usable:
            yield epoch, index + per_step, batches[index:index + per_step]
            index += per_step
        epoch, index = epoch + 1, 0


def main(argv: list[str] | None = None) -> dict:
    cfg = cli(SFTConfig, description="Stage 1: cold-start chain-of-thought SFT.", argv=argv)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    tc, out = cfg.train, Path(cfg.output_dir)
    ckpt_root = out / "checkpoints"

    # ---- setup
    autocast = tc.bf16 and not cfg.deepspeed
    accelerator = make_accelerator(cfg.parallel.timeout_s, mixed_precision="bf16" if autocast else "no")
    world, rank = accelerator.num_processes, accelerator.process_index
    set_seed(tc.seed)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model.init, "tokenizer" if cfg.tokenizer else "model.init")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    conversations = mix_by_weight([load_conversations(d) for d in cfg.data], [d.weight for d in cfg.data], tc.seed)
    examples = [build_example(tokenizer, m, tc.max_seq_len) for m in conversations]
    examples = [e for e in examples if e is not None]
    heldout = load_heldout(cfg.eval)
    lengths = [len(e.input_ids) for e in examples]
    per_step = tc.grad_accum * world
    steps_per_epoch = len(epoch_batches(lengths, tc.micro_batch_size, tc.seed, 0)) // per_step
    if steps_per_epoch == 0:
        raise ConfigError("train.micro_batch_size", f"{len(examples)} examples do not fill one optimizer step of "
                          f"{per_step} micro-batches of {tc.micro_batch_size}")
    total_steps = tc.max_steps or tc.epochs * steps_per_epoch

    resume = resume_point(out, tc.resume_from, cfg)  # a bad checkpoint or refused change: before the policy loads
    model = load_policy(cfg.model, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    if cfg.deepspeed and tc.bf16:  # DeepSpeed computes in its parameters' dtype: bf16 weights, fp32 masters
        model = model.to(torch.bfloat16)
    optim = build_step(model, tc.adamw, total_steps=total_steps, parallel=cfg.parallel, accelerator=accelerator)
    model, optimizer, scheduler = optim.model, optim.optimizer, optim.scheduler
    step, epoch, index = 0, 0, 0
    if resume:
        state = load_checkpoint(resume, model=model, optimizer=optimizer, scheduler=scheduler, accelerator=accelerator)
        step, epoch, index = state.step, state.data_state["epoch"], state.data_state["index"]
    else:
        start_fresh(out, tc.resume_from)
    if accelerator.is_main_process:  # inputs loaded, about to train: the output is no longer complete
        (out / "DONE").unlink(missing_ok=True)
    stream = step_stream(lengths, tc.micro_batch_size, tc.seed, per_step, epoch, index)

    # ---- loop
    logger = MetricsLogger(out, project="r1-grpo", run_name=cfg.run_name, config=cfg, wandb_mode=cfg.wandb_mode,
                           total_steps=total_steps, initial_step=step, is_main=accelerator.is_main_process)
    logger.write(f"sft: {len(examples)} conversations, {n_params / 1e6:.2f}M parameters, tokenizer "
                 f"{cfg.tokenizer or cfg.model.init} ({len(tokenizer)} tokens), {total_steps} steps "
                 f"({steps_per_epoch}/epoch, {per_step} micro-batches of {tc.micro_batch_size} per step)"
                 + (f", resumed at step {step} from {resume}" if resume else ""))
    sums, tokens, started, window = {}, 0, time.time(), 0  # window: steps since the last metrics row
    curve = cfg.eval.every and heldout and accelerator.is_main_process  # the held-out curve, from step 0
    if curve and step == 0:
        logger.log(curve_point(accelerator.unwrap_model(model), tokenizer, heldout, cfg.eval), step=0)
    with StopOnSignal() as stop:  # SIGINT/SIGTERM: finish this step, checkpoint, exit 130/143
        while step < total_steps:
            epoch, index, micro_batches = next(stream)
            model.train()
            mine = micro_batches[rank::world]
            for k, ids in enumerate(mine):
                batch = {key: v.to(accelerator.device) for key, v in collate([examples[i] for i in ids], pad_id).items()}
                with optim.micro_batch(last=k == len(mine) - 1):
                    output = model(**batch, use_cache=False)
                    optim.backward(output.loss / len(mine))
                for key in ("loss", "lm_loss", "aux_loss"):  # the last two only from the V3 policy
                    if (value := getattr(output, key, None)) is not None:
                        sums[key] = sums.get(key, 0.0) + value.item() / len(mine)
                tokens += int(batch["attention_mask"].sum())
            grad_norm = optim.step().grad_norm  # a non-finite norm skips the update (logged as such)
            update_router_bias(model)
            step, window = step + 1, window + 1

            if step % tc.log_every == 0 or step == total_steps:
                means = accelerator.reduce(torch.tensor([sums.get(k, 0.0) / window for k in sorted(sums)] + [tokens],
                                                        device=accelerator.device), "sum")
                values = dict(zip(sorted(sums), (means[:-1] / world).tolist()))
                elapsed = time.time() - started
                logger.log({**values, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                            "tokens_per_s": float(means[-1]) / elapsed,
                            "epoch": epoch + index / (steps_per_epoch * per_step), **moe_metrics(model)}, step=step)
                sums, tokens, started, window = {}, 0, time.time(), 0
            if curve and step % cfg.eval.every == 0:
                logger.log(curve_point(accelerator.unwrap_model(model), tokenizer, heldout, cfg.eval), step=step)
            stopping = stop.requested(accelerator)
            if (tc.save_every and step % tc.save_every == 0) or step == total_steps or stopping:
                path = save_checkpoint(ckpt_root, model=model, tokenizer=tokenizer, step=step, optimizer=optimizer,
                                       scheduler=scheduler, data_state={"epoch": epoch, "index": index}, config=cfg,
                                       keep_last=tc.keep_last, accelerator=accelerator)
            if stopping:
                logger.close()
                stop.exit(step, path)
    logger.close()

    # ---- save, evaluate
    final = export_model(out / "final", model, tokenizer, cfg, accelerator=accelerator)
    result = {"steps": step, "final": str(final)}
    if heldout and accelerator.is_main_process:
        policy = accelerator.unwrap_model(model)
        if cfg.deepspeed:  # experts may be sharded over ranks: evaluate the exported model on this process
            policy = load_policy(dataclasses.replace(cfg.model, init=str(final)), tokenizer).to(accelerator.device)
        scores = heldout_accuracy(policy, tokenizer, heldout,
                                  max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size)
        print(summary_line(scores, cfg.eval), flush=True)
        write_results(scores, out / ".tmp-eval/eval.json")
        publish(out / ".tmp-eval", out)
        result["heldout"] = scores["summary"]
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        mark_done(out, result)
    return result


if __name__ == "__main__":
    run(main)
