"""CUDA-graph replay of the V3 decode step (``grpo.engine.v3.V3Decoder.decode`` + sampling)."""
from __future__ import annotations

import torch


class CudaGraphStep:
    """One decode step (``decoder.decode``, then ``sampler``, then the sampled tokens become the next inputs)
    replayed from CUDA graphs, one per (batch bucket, span bucket); only the uniforms are drawn outside.

    ``sampler(logits [b, V], uniform [b]) -> (tokens [b], logprobs [b])`` must be free of host syncs.
    Batch buckets are powers of two up to the slot count (and the slot count); spans are rounded up to a
    multiple of ``span_step`` (one span, the cache length, with the decoder's Triton kernels). Rows
    n..bucket-1 are free slots: they are decoded at position 0 and ignored
    (their cache rows are rewritten by the prefill of their next sequence before being read). Graphs share
    one memory pool, so the returned tensors are only valid until the next call. A step is idempotent for
    fixed inputs (it rewrites the same latents), so the warm-up run before each capture is harmless.
    Parameters must keep their storage (in-place optimizer updates are fine); after replacing parameter
    tensors, call the engine's ``release()``.
    """

    def __init__(self, decoder, sampler, generator: torch.Generator, span_step: int = 64):
        self.decoder, self.sampler, self.generator, self.span_step = decoder, sampler, generator, span_step
        slots = decoder.slots
        self.buckets = sorted({2**i for i in range(slots.bit_length()) if 2**i < slots} | {slots})
        self.uniform = torch.zeros(slots, device=decoder.device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    def __call__(self, n: int, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [n] and logprobs [n] sampled for slots 0..n-1 (attention over positions < span)."""
        batch = next(b for b in self.buckets if b >= n)
        max_len = self.decoder.max_len
        # the Triton kernels read positions < pos whatever the span: then one graph per batch bucket
        span = max_len if self.decoder.ops.kernels else min(max_len, -(-span // self.span_step) * self.span_step)
        self.decoder.positions[n:batch] = 0
        torch.rand(batch, generator=self.generator, out=self.uniform[:batch])
        if (batch, span) not in self.graphs:
            self.graphs[batch, span] = self._capture(batch, span)
        graph, tokens, logprobs = self.graphs[batch, span]
        graph.replay()
        return tokens[:n], logprobs[:n]

    def _step(self, batch: int, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, logprobs = self.sampler(self.decoder.decode(batch, span), self.uniform[:batch])
        self.decoder.tokens[:batch] = tokens
        return tokens, logprobs

    def _capture(self, batch: int, span: int):
        inputs = self.decoder.tokens[:batch].clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._step(batch, span)
        torch.cuda.current_stream().wait_stream(stream)
        self.decoder.tokens[:batch] = inputs  # the warm-up consumed them
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            tokens, logprobs = self._step(batch, span)
        return graph, tokens, logprobs
