"""fp32 GEMMs on x86 CPUs through oneDNN rather than torch's default BLAS (MKL).

On the 2-core AMD EPYC (Zen 4) VM this project is measured on, torch's fp32 mm runs at ~40-50% of the rate
oneDNN reaches on the same shapes (2026-12-08, torch 2.13 CPU wheel, two threads): [2,048 x 256] x [256 x
32,000] 200-214 ms against 84-87 ms, [3,072 x 256] x [256 x 128] 1.3-1.9 against 0.57-0.93 ms, and at decode's
few rows [32 x 256] x [256 x 2,304] 0.31-0.40 against 0.13 ms on a packed weight. Intel CPUs are unmeasured.
Two uses:

- ``packed_linear(weight)``: x -> x W^T for a weight that stays fixed (the rollout engine's decode), oneDNN
  on a copy of the weight reordered once into its blocked layout (at decode shapes faster than on the plain
  weight: 0.13 vs 0.16 ms above).
- ``linears()``: a context in which every ``F.linear`` on fp32 CPU tensors outside autocast runs as
  ``Linear``, whose forward and both backward GEMMs go through oneDNN (on the plain weight: a training weight
  changes every step). The local training step (``grpo.optim.LocalStep``) runs each micro-batch's forward and
  backward inside it on the CPU: the SFT, reward-model and GRPO updates.

Values are F.linear's within fp32 rounding (another summation order), not reduced precision: oneDNN computes
fp32 GEMMs in fp32 unless its fpmath mode is lowered (torch.backends.mkldnn's fp32_precision, or
ONEDNN_DEFAULT_FPMATH_MODE), which this module never does. Elsewhere (other CPUs, CUDA, other dtypes)
everything stays torch's.
"""
from __future__ import annotations

import contextlib
import platform
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

AVAILABLE = platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()


def _gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T + bias by oneDNN; weight a plain [N, K] tensor (any strides) or a packed one."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _fits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return (AVAILABLE and all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors)  # no subclasses
            and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and x.dim() >= 2 and weight.dim() == 2 and x.numel() > 0 and not torch.is_autocast_enabled("cpu"))


def packed_linear(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> F.linear(x, weight) for a weight that does not change afterwards (re-make it when it does): on an
    fp32 CPU weight with oneDNN on x86, oneDNN's GEMM on a reordered copy made here; else F.linear."""
    if not _fits(weight, weight):
        return lambda x: F.linear(x, weight)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
    return lambda x: _gemm(x, packed)


class Linear(torch.autograd.Function):
    """F.linear(x, weight, bias) for x [..., K], weight [N, K], bias [N] or None, with y = x W^T + b,
    dx = dy W and dW = dy^T x (over all rows of x) as oneDNN GEMMs; db = the sum of dy over the rows. dW is
    taken as (x^T dy)^T where N > K, the larger side as oneDNN's weight operand (EPYC: the output layer's
    [32,000 x 2,048] x [2,048 x 256] 166 vs 212 ms alone, bench/grpo_step.py's update 1.53 -> 1.43 s; the
    layers' shapes, timed both ways, follow the same rule)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return _gemm(x, weight, bias)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        rows = dy.reshape(-1, dy.shape[-1])
        dx = _gemm(dy, weight.t()) if need_x else None
        flat = x.reshape(-1, x.shape[-1])
        if not need_w:
            dw = None
        elif weight.shape[0] > weight.shape[1]:
            dw = _gemm(flat.t(), rows.t()).t()
        else:
            dw = _gemm(rows.t(), flat.t())
        return dx, dw, rows.sum(0) if need_b else None


class _Linears(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight, bias = _linear_args(*args, **kwargs)
            if _fits(x, weight, bias):
                return Linear.apply(x, weight, bias)
        return func(*args, **kwargs)


def _linear_args(input, weight, bias=None):
    return input, weight, bias


def linears() -> ContextManager:
    """Inside: ``F.linear`` on fp32 CPU tensors outside autocast is ``Linear`` (module docstring); a no-op
    context where oneDNN or x86 is missing."""
    return _Linears() if AVAILABLE else contextlib.nullcontext()
