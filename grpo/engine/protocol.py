"""The interface between ``RolloutEngine``'s scheduler and a model: ``Decoder``.

The scheduler owns the host-side state (which result row each slot holds, how many tokens its cache has);
a decoder owns the device state: per slot a cache and the next input token. Slots 0..n-1 are the active
ones. Adding a decoder for another architecture means implementing this protocol (``grpo.engine.v3`` for
DeepSeek-V3, ``grpo.engine.generic`` for any Hugging Face causal LM).
"""
from __future__ import annotations

from typing import Protocol

import torch

from grpo.engine.containers import Pending


class Decoder(Protocol):
    device: torch.device
    slots: int  # decode slots
    max_len: int  # tokens per slot the cache holds (prompt + completion)
    refill: bool  # whether prompts can be prefilled while other slots are decoding (else: waves)
    tokens: torch.Tensor  # [slots] int64 on device: the next input token of each slot
    positions: torch.Tensor  # [slots] int64 on device: its position (= tokens in the slot's cache); the
    # scheduler sets it at the prefill, and each step advances it on the device

    def bind(self) -> None:
        """(Re)read the model's weights (call after an optimizer step; caches are kept)."""

    def prefill(self, prompts: list[list[int]], slots: list[list[int]]) -> torch.Tensor:
        """Run each prompt once and give its cache to every slot in ``slots[i]``. Returns the logits at each
        prompt's last token [len(prompts), V]."""

    def decode(self, n: int, span: int) -> torch.Tensor:
        """One token for slots 0..n-1: input ``tokens[:n]`` at ``positions[:n]`` (all < span); appends to their
        caches and returns logits [n, V]."""

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Move slots src[i] -> dst[i] (cache, next token and position; disjoint index sets on device)."""


class RecordsRouting(Decoder, Protocol):
    """A decoder of an MoE policy that can return each processed token's routed experts."""

    def record_routing(self) -> None:
        """From now on keep the expert choices of every MoE layer per processed token."""

    def take_routes(self) -> torch.Tensor:
        """The expert choices since the last call, [T, MoE layers, K] on the host (T tokens of the last forward)."""


class Drafts(Decoder, Protocol):
    """A decoder that drafts with its policy's MTP module and verifies several tokens per slot in one forward
    (``grpo.engine.speculative``; ``grpo.engine.v3.V3Decoder`` with ``draft_tokens`` = k > 0)."""

    draft_tokens: int  # k
    pending: Pending  # per slot, the MTP positions not run yet

    def verify(self, tokens: torch.Tensor, span: int) -> torch.Tensor:
        """The main model on tokens [n, m] of slots 0..n-1 from ``positions[:n]`` on (latents written); returns
        the final normed hidden states [n, m, D]."""

    def mtp_step(self, tokens: torch.Tensor, prev: torch.Tensor, pos: torch.Tensor, span: int):
        """The MTP module on m positions per slot from pos [n] on; returns (hidden [n, m, D], its normed form
        [n, m, D], the input of ``lm_head``)."""

    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of final normed hidden states."""
