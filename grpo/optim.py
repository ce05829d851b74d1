"""One optimizer step for every training loop (SFT, reward model, GRPO): backward, clip, AdamW, LR schedule,
zero-grad, and mixed precision, behind one small interface (``TrainStep``), built once by ``build_step``.

    step = build_step(model, AdamWConfig(lr=...), total_steps=..., parallel=cfg.parallel, accelerator=acc)
    for k, micro in enumerate(micro_batches):
        with step.micro_batch(last=k == len(micro_batches) - 1):
            step.backward(step.model(**micro).loss / len(micro_batches))
    result = step.step()       # StepResult(grad_norm, stepped)

Precision. The model's parameters are the compute copy: fp32, or bf16 (``model.dtype: bfloat16``). Every
parameter stored below fp32 gets an fp32 master weight, and AdamW steps the masters with fp32 state:

    g_master = fp32(g_bf16)          clip over the masters' gradients (max_grad_norm)
    w_master <- AdamW(w_master, g_master)           m, v in fp32
    w_bf16   <- bf16(w_master)       copied in place: the same storage, so whatever holds references to the
                                     parameters (the rollout engine's bound weights, its CUDA graphs) stays valid
                                     and reads the refreshed bf16 copy at its next bind

Parameters already in fp32 (the V3 router's gate and correction bias, which transformers keeps in fp32) are their
own masters. Without masters, AdamW on bf16 weights at lr 3e-6 rounds most updates away (bf16 has 8 significant
bits: an update below w * 2^-9 is lost); the masters make every path learn as fp32 does. There is no option to
train bf16 weights directly. A bf16 checkpoint loads into fp32 masters (the upcast weights); checkpoints keep
the masters in the optimizer state (``state_dict``), so a resumed run continues bit for bit; exported weights
stay in the model's dtype.

Paths (chosen once, by ``build_step``):
    local      one process, or DDP through accelerate (``prepare_model``; DDP reduces the gradients of the
               compute copy, in its dtype): masters and AdamW here.
    deepspeed  ``grpo.parallel.parallelize`` (ZeRO 1/2, routed experts sharded over ``ep_size`` ranks) when
               ``parallel.ep_size > 1`` or ``parallel.zero_stage`` is set: DeepSpeed's ZeRO optimizer keeps the
               fp32 masters of its bf16 parameters itself (and writes them back after each step, as here).
A non-finite gradient norm skips the update (weights, AdamW state and the schedule unchanged; ``stepped`` False):
the caller decides when to give up.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import math
from dataclasses import dataclass, field
from typing import ContextManager, Literal, NamedTuple, Protocol

import torch
from torch import Tensor, nn
from transformers import get_scheduler

from grpo.config import ConfigError
from grpo.onednn import linears
from grpo.parallel import ParallelConfig, parallelize


@dataclass(kw_only=True)
class AdamWConfig:
    """AdamW with decoupled weight decay on matrices only (not norms, biases, router bias) and an LR schedule."""

    lr: float
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 = no clipping (the norm is still returned)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0  # optimizer steps of linear warm-up (every schedule)

    def __post_init__(self):
        if self.lr <= 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        if self.max_grad_norm < 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ConfigError("max_grad_norm", f"max_grad_norm, weight_decay and warmup_steps must be >= 0, got "
                              f"{self.max_grad_norm}, {self.weight_decay}, {self.warmup_steps}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("adam_betas", f"must be two numbers in [0, 1), got {self.betas}")


class StepResult(NamedTuple):
    grad_norm: float  # total gradient norm before clipping
    stepped: bool  # False: the norm was not finite and the update was skipped


class TrainStep(Protocol):
    """What a training loop drives: forward on ``model``, ``backward`` per micro-batch, ``step`` per update."""

    model: nn.Module  # call the forward on this (a DDP or DeepSpeed wrapper, or the module itself)
    module: nn.Module  # the unwrapped model (parameters = the compute copy the rollout engine reads)
    optimizer: object  # for checkpoints: state_dict() / load_state_dict(), or DeepSpeed's ZeRO optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler

    def micro_batch(self, last: bool) -> ContextManager: ...  # wrap forward + backward of one micro-batch
    def backward(self, loss: Tensor) -> None: ...
    def step(self) -> StepResult: ...


def param_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices (ndim >= 2) only."""
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def _scheduler(optimizer: torch.optim.Optimizer, cfg: AdamWConfig, total_steps: int):
    name = "constant_with_warmup" if cfg.schedule == "constant" else cfg.schedule
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps)


class MasterAdamW:
    """AdamW over fp32 masters of the (possibly bf16) parameters ``params`` (module docstring).

    ``state_dict`` holds AdamW's state and the masters of the low-precision parameters, so a checkpoint restores
    the weights AdamW actually steps, not their bf16 rounding."""

    def __init__(self, params: list[nn.Parameter], cfg: AdamWConfig):
        self.params = params
        self.masters = [p if p.dtype == torch.float32 else nn.Parameter(p.detach().float()) for p in params]
        self.low = [(p, m) for p, m in zip(params, self.masters) if m is not p]
        by_id = {id(p): m for p, m in zip(params, self.masters)}
        groups = [{**g, "params": [by_id[id(p)] for p in g["params"]]} for g in param_groups(params, cfg.weight_decay)]
        self.adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=True)

    def grads_to_masters(self) -> None:
        for p, m in self.low:
            m.grad = None if p.grad is None else p.grad.float()

    @torch.no_grad()
    def step(self) -> None:
        self.adamw.step()
        self.copy_to_params()

    @torch.no_grad()
    def copy_to_params(self) -> None:
        if self.low:
            torch._foreach_copy_([p.data for p, _ in self.low], [m.data for _, m in self.low])

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        for _, m in self.low:
            m.grad = None

    def state_dict(self) -> dict:
        return {"adamw": self.adamw.state_dict(), "masters": [m.detach().clone() for _, m in self.low]}

    def load_state_dict(self, state: dict) -> None:
        masters = state["masters"]
        if len(masters) != len(self.low) or any(a.shape != m.shape for a, (_, m) in zip(masters, self.low)):
            raise ValueError(f"optimizer state holds {len(masters)} fp32 master weights, this model has "
                             f"{len(self.low)} low-precision parameters: saved with another model dtype?")
        with torch.no_grad():
            for saved, (_, m) in zip(masters, self.low):
                m.copy_(saved)
        self.adamw.load_state_dict(state["adamw"])
        self.copy_to_params()


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (glibc's malloc.h)


def keep_freed_heap() -> bool:
    """CPU training: glibc's malloc keeps freed blocks of any size in the process heap (mmap threshold 1 GiB, no
    trimming below 2 GiB) instead of returning blocks over 32 MiB to the kernel, so each step's large temporaries
    (the [tokens, vocab] logits, the embedding and output-layer gradients) reuse memory that is already mapped in
    place of page-faulting fresh pages in every step: the CPU's counterpart of torch's CUDA caching allocator.
    Measured on the 2-core EPYC, bench/grpo_step.py's update: ~100k minor faults and 1.15 s -> 0 and 1.04 s.
    Process-wide and kept for its lifetime; the resident set stays at its peak. False where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1))


class LocalStep:
    """One process or DDP (accelerate). Masters in ``MasterAdamW``."""

    def __init__(self, model: nn.Module, cfg: AdamWConfig, total_steps: int, accelerator=None):
        self.accelerator = accelerator
        if accelerator is not None:
            model = accelerator.prepare_model(model)
        self.model = model
        self.module = accelerator.unwrap_model(model) if accelerator is not None else model
        self.cpu = next(self.module.parameters()).device.type == "cpu"
        if self.cpu:
            keep_freed_heap()
        self.cfg = cfg
        self.optimizer = MasterAdamW([p for p in self.module.parameters() if p.requires_grad], cfg)
        self.scheduler = _scheduler(self.optimizer.adamw, cfg, total_steps)

    def micro_batch(self, last: bool) -> ContextManager:
        """DDP's no_sync before the last micro-batch; on the CPU, fp32 linear layers through oneDNN
        (``grpo.onednn.linears``) unless the model recomputes activations: the recomputation runs in the
        backward pass, outside the context, and must save what the forward saved."""
        ddp = self.accelerator is not None and self.accelerator.num_processes > 1
        stack = contextlib.ExitStack()
        if ddp and not last:
            stack.enter_context(self.model.no_sync())
        if self.cpu and not getattr(self.module, "is_activation_checkpointing", False):
            stack.enter_context(linears())
        return stack

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def step(self) -> StepResult:
        opt = self.optimizer
        opt.grads_to_masters()
        norm = float(torch.nn.utils.clip_grad_norm_(opt.masters, self.cfg.max_grad_norm or math.inf))
        stepped = math.isfinite(norm)
        if stepped:
            opt.step()
            self.scheduler.step()
        opt.zero_grad()
        return StepResult(norm, stepped)


class DeepSpeedStep:
    """``grpo.parallel.parallelize``: the engine reduces, clips and steps (fp32 masters in its ZeRO optimizer)."""

    def __init__(self, model: nn.Module, cfg: AdamWConfig, total_steps: int, parallel: ParallelConfig):
        adamw = {"lr": cfg.lr, "betas": cfg.betas, "weight_decay": cfg.weight_decay, "max_grad_norm": cfg.max_grad_norm}
        self.model, self.optimizer = parallelize(model, adamw, **dataclasses.asdict(parallel))
        self.module = self.model.module
        self.scheduler = _scheduler(self.optimizer.optimizer, cfg, total_steps)

    def micro_batch(self, last: bool) -> ContextManager:
        return contextlib.nullcontext()  # DeepSpeed reduces in step()

    def backward(self, loss: Tensor) -> None:
        self.model.backward(loss, scale_wrt_gas=False)

    def step(self) -> StepResult:
        self.model.step()  # reduce, clip, AdamW on the fp32 masters, copy back, zero grads
        norm = float(self.model.get_global_grad_norm())
        stepped = math.isfinite(norm)  # DeepSpeed skips the update itself on a non-finite norm
        if stepped:
            self.scheduler.step()
        return StepResult(norm, stepped)


def uses_deepspeed(parallel: ParallelConfig) -> bool:
    return parallel.ep_size > 1 or parallel.zero_stage is not None


def build_step(model: nn.Module, cfg: AdamWConfig, *, total_steps: int, parallel: ParallelConfig | None = None,
               accelerator=None) -> TrainStep:
    """The training step for ``model``: DeepSpeed when ``parallel`` asks for EP or ZeRO, else local (DDP under
    ``accelerate launch`` when ``accelerator`` is given). The model must already be on its device for the local
    path when no accelerator places it."""
    if parallel is not None and uses_deepspeed(parallel):
        return DeepSpeedStep(model, cfg, total_steps, parallel)
    return LocalStep(model, cfg, total_steps, accelerator)
