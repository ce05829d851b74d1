"""The generic ``Decoder``: any Hugging Face causal LM through its own forward and a ``DynamicCache``.

Cache row s is slot s. A prefill left-pads its prompts (as transformers' generate), runs them once and
repeats each prompt's cache rows for its slots; a decode step runs the model on slots 0..n-1 (rows past n,
freed slots, are dropped first) with an attention mask that hides each slot's left padding. The cache
cannot take new prompts next to running ones (``refill`` False): the scheduler admits prompts in waves, when
every slot is free. The model runs in eval mode (its training flag is restored after each forward).
"""
from __future__ import annotations

import contextlib
import inspect
import sys

import torch
from torch import nn
from transformers import DynamicCache


@contextlib.contextmanager
def _eval(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class GenericDecoder:
    refill = False
    max_len = sys.maxsize  # the cache grows with the sequences

    def __init__(self, model: nn.Module, *, slots: int, pad_id: int):
        self.model, self.slots, self.pad_id = model, slots, pad_id
        self.device = next(model.parameters()).device
        self.cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.tokens = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.pad = torch.zeros(slots, dtype=torch.long, device=self.device)  # left padding of each slot's cache
        self.cache: DynamicCache | None = None

    def bind(self) -> None:
        """Nothing to reread: the model's forward reads its current weights."""

    def _rows(self) -> int:
        return self.cache.layers[0].keys.shape[0]

    def _forward(self, **kw) -> torch.Tensor:
        with _eval(self.model):
            return self.model(use_cache=True, **kw, **{self.cache_kw: self.cache}).logits[:, -1]

    def prefill(self, prompts: list[list[int]], slots: list[list[int]]) -> torch.Tensor:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for b, p in enumerate(prompts):  # left padding, as transformers' generate
            ids[b, width - len(p):] = torch.tensor(p)
            mask[b, width - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        self.cache = DynamicCache(config=self.model.config)
        logits = self._forward(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                               logits_to_keep=1)
        source = torch.zeros(max(s for targets in slots for s in targets) + 1, dtype=torch.long)
        for b, targets in enumerate(slots):
            source[targets] = b
        source = source.to(self.device)
        self.cache.batch_select_indices(source)  # row s: its prompt's cache
        self.pad[: len(source)] = width - mask.sum(-1)[source]
        return logits

    def decode(self, n: int, span: int) -> torch.Tensor:
        if self._rows() > n:
            self.cache.batch_select_indices(torch.arange(n, device=self.device))
        length = self.cache.get_seq_length() + 1
        mask = (torch.arange(length, device=self.device) >= self.pad[:n, None]).long()
        return self._forward(input_ids=self.tokens[:n, None], attention_mask=mask, position_ids=self.positions[:n, None])

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        rows = torch.arange(self._rows(), device=self.device)
        rows[dst] = src
        self.cache.batch_select_indices(rows)
        self.pad[dst] = self.pad[src]
        self.tokens[dst] = self.tokens[src]
        self.positions[dst] = self.positions[src]
