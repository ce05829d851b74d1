"""CUDA-graph replay of the engine's per-step device work: the V3 decode step (``CudaGraphStep``) and the
speculative round (``grpo.engine.speculative.Speculator``), both through ``BucketedGraphs``."""
from __future__ import annotations

from typing import Callable

import torch


class BucketedGraphs:
    """``step(batch, span, uniform [batch, *width]) -> outputs`` (free of host syncs) replayed from CUDA graphs,
    one per (batch bucket, span bucket); only the uniforms are drawn outside, from ``generator``.

    Batch buckets are powers of two up to the slot count (and the slot count); spans are rounded up to a
    multiple of ``span_step`` (one span, the cache length, with the decoder's Triton kernels, which read
    positions < pos whatever the span). Before each replay ``free(n, batch)`` puts rows n..batch-1 (free slots,
    whose outputs are ignored) where their writes stay inside their own cache rows; the prefill of their next
    sequence rewrites those rows before they are read. Each capture follows a warm-up run on a side stream
    (it compiles); ``state`` lists the decoder tensors a step changes besides the cache, whose [:batch] rows are
    restored after the warm-up (the cache latents it wrote are rewritten identically by the replay). Graphs
    share one memory pool, so the returned outputs are only valid until the next call. Parameters must keep
    their storage (in-place optimizer updates are fine); after replacing parameter tensors, call the engine's
    ``release()``."""

    def __init__(self, decoder, step: Callable, generator: torch.Generator, width: tuple[int, ...],
                 state: list[torch.Tensor], free: Callable[[int, int], None], span_step: int = 64):
        self.decoder, self.step, self.generator, self.state, self.free = decoder, step, generator, state, free
        self.span_step = span_step
        slots = decoder.slots
        self.buckets = sorted({2**i for i in range(slots.bit_length()) if 2**i < slots} | {slots})
        self.uniform = torch.zeros(slots, *width, device=decoder.device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, tuple]] = {}

    def __call__(self, n: int, span: int) -> tuple:
        """The step's outputs for a batch bucket >= n (rows n.. are the free slots') at a span bucket >= span."""
        batch = next(b for b in self.buckets if b >= n)
        max_len = self.decoder.max_len
        span = max_len if self.decoder.ops.kernels else min(max_len, -(-span // self.span_step) * self.span_step)
        self.free(n, batch)
        torch.rand(batch, *self.uniform.shape[1:], generator=self.generator, out=self.uniform[:batch])
        if (batch, span) not in self.graphs:
            self.graphs[batch, span] = self._capture(batch, span)
        graph, out = self.graphs[batch, span]
        graph.replay()
        return out

    def _capture(self, batch: int, span: int):
        saved = [t[:batch].clone() for t in self.state]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.step(batch, span, self.uniform[:batch])
        torch.cuda.current_stream().wait_stream(stream)
        for t, s in zip(self.state, saved):
            t[:batch] = s
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.step(batch, span, self.uniform[:batch])
        return graph, out


class CudaGraphStep:
    """One decode step (``decode_step``) replayed from ``BucketedGraphs``; free slots decode at position 0.

    ``sampler(logits [b, V], uniform [b]) -> (tokens [b], logprobs [b])`` must be free of host syncs."""

    def __init__(self, decoder, sampler, generator: torch.Generator, span_step: int = 64):
        self.decoder, self.sampler = decoder, sampler
        self.graphs = BucketedGraphs(decoder, self._step, generator, (), [decoder.tokens, decoder.positions],
                                     self._free, span_step)

    def __call__(self, n: int, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [n] and logprobs [n] sampled for slots 0..n-1 (attention over positions < span)."""
        tokens, logprobs = self.graphs(n, span)
        return tokens[:n], logprobs[:n]

    def _free(self, n: int, batch: int) -> None:
        self.decoder.positions[n:batch] = 0

    def _step(self, batch: int, span: int, uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return decode_step(self.decoder, self.sampler, batch, span, uniform)


def decode_step(decoder, sampler, n: int, span: int, uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One plain decode step of slots 0..n-1 (positions < span), eager or captured: ``decoder.decode``, then
    ``sampler(logits [n, V], uniform [n]) -> (tokens [n], logprobs [n])``; the sampled tokens become the next
    inputs and the positions advance by one."""
    tokens, logprobs = sampler(decoder.decode(n, span), uniform)
    decoder.tokens[:n] = tokens
    decoder.positions[:n] += 1
    return tokens, logprobs
