"""The decoder's op table (``Ops``), picked once per bind from the device, dtype and model: the one place
that decides between the torch reference, the compiled layers and the Triton kernels.

- ``eager``: the layer functions uncompiled. CPU; CUDA in fp32/fp16, while recording routes, or with a
  foreign MLP block. On CUDA the pair order is a compiled function (the routing is not: see ``eager``), and
  outside bf16 the routed experts run as ``routed_all``. On the CPU in fp32 with few experts per choice
  (``stacks_experts``) the decode's MoE blocks run every expert on every token as two GEMMs
  (``moe_stacked``) on oneDNN-packed weights (``grpo.onednn.packed_linear``).
- ``compiled``: CUDA in bf16: each layer's decode and prefill are one ``torch.compile``d function, so inductor
  fuses the norms, RoPE, masking, softmax and routing around the GEMMs. With ``triton`` the decode's
  attention, routing and routed + shared experts are ``grpo.kernels``' Triton kernels (the prefill keeps the
  grouped GEMMs: the kernels are tuned for decode's few rows per expert). The attention kernel takes the m
  queries per sequence of a decode (m = 1) or multi-token verify step.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from grpo import kernels
from grpo.engine.containers import Layer, Moe
from grpo.engine.experts import (Foreign, RecordingRoute, counting_order, moe_kernels, moe_stacked, moe_torch,
                                 route_torch, routed_all, routed_grouped, sorted_order)
from grpo.engine.layer import LayerOps, attend, decode_layer, prefill_layer


class Ops(NamedTuple):
    """decode / prefill: ``decode_layer`` / ``prefill_layer`` or their compiled forms, with the layer ops
    decode_ops / prefill_ops. kernels: the decode runs the Triton kernels (the attention kernel reads
    positions < pos of the whole cache, so one span serves all steps; the MoE row block is chosen per step)."""

    decode: Callable
    prefill: Callable
    decode_ops: LayerOps
    prefill_ops: LayerOps
    kernels: bool


# Compiled once per process: every decoder (rebuilt or rebound on each generate) reuses the compiled code.
# Weights are inputs, so dense / MoE layers (x op tables) are the layer functions' only variants; the
# decoder marks the batch and span (prefill: batch and width) dynamic and keeps every other size static.
_compiled_decode = torch.compile(decode_layer)
_compiled_prefill = torch.compile(prefill_layer)
_compiled_order = torch.compile(counting_order, dynamic=True)


# Every expert on every token costs E / K times the routed experts' FLOPs; on the CPU at decode's batch sizes
# two large GEMMs still beat ~2E small ones up to this ratio (measured at E = 4 K only: bench/grpo_step.py's
# 20M model, its 32-row rollout 0.705 -> 0.594 s, medians of twelve interleaved pairs, 2-core AMD EPYC).
STACKED_MAX_RATIO = 4


def stacks_experts(device: torch.device, dtype: torch.dtype, config) -> bool:
    """Whether the decode's MoE blocks run as ``moe_stacked``: CPU, fp32, E <= STACKED_MAX_RATIO * K."""
    return (device.type == "cpu" and dtype == torch.float32
            and config.n_routed_experts <= STACKED_MAX_RATIO * config.num_experts_per_tok)


def eager(device: torch.device, dtype: torch.dtype, sink: list | None = None, stacked: bool = False) -> Ops:
    """The uncompiled table (module docstring); with ``sink`` the routing appends its choices there; with
    ``stacked`` the decode's MoE blocks are ``moe_stacked`` (their ``Moe.stacked`` set)."""
    cuda = device.type == "cuda"
    # the routing runs uncompiled: the dynamic-shape compile of route_torch failed in inductor ("CantSplit: s75
    # not divisible by s75*s76") for v3-mini's group-limited routing in fp32 on an H100 (2026-12-06), prefill and
    # decode alike
    route = route_torch if sink is None else RecordingRoute(route_torch, sink)
    ops = LayerOps(attend=attend, moe=moe_torch, route=route,
                   routed=routed_all if cuda and dtype != torch.bfloat16 else routed_grouped,
                   order=_compiled_order if cuda else sorted_order)
    return Ops(decode_layer, prefill_layer, ops._replace(moe=moe_stacked) if stacked else ops, ops, kernels=False)


def compiled(triton: bool) -> Ops:
    """The compiled table (module docstring), with the Triton kernels in the decode when ``triton``."""
    torch_ops = LayerOps(attend=attend, moe=moe_torch, route=route_torch, routed=routed_grouped, order=counting_order)
    decode_ops = torch_ops._replace(attend=kernels.mla_decode, moe=moe_kernels) if triton else torch_ops
    return Ops(_compiled_decode, _compiled_prefill, decode_ops, torch_ops, kernels=triton)


def select(layers: list[Layer], device: torch.device, dtype: torch.dtype, act: str, sink: list | None) -> Ops:
    """The table for these layers: compiled on CUDA in bf16 unless routes are recorded or an MLP block is
    foreign; the Triton kernels when available and they fit (SiLU, row-major bf16 expert weights)."""
    foreign = any(isinstance(w.mlp, Foreign) for w in layers)
    if device.type != "cuda" or dtype != torch.bfloat16 or sink is not None or foreign:
        stacked = all(w.mlp.stacked is not None for w in layers if isinstance(w.mlp, Moe))
        return eager(device, dtype, sink, stacked=stacked)
    return compiled(triton=kernels.AVAILABLE and act == "silu" and all(
        t.stride(-1) == 1 and t.dtype == torch.bfloat16
        for w in layers if isinstance(w.mlp, Moe) for t in (w.mlp.gate_up, w.mlp.down, w.mlp.shared.down)))
