"""The MLA latent cache of ``grpo.engine.v3.V3Decoder``."""
from __future__ import annotations

import torch


class LatentCache:
    """Preallocated MLA cache. ``data`` [layers, slots, max_len, kv_lora_rank + qk_rope_head_dim]:
    per slot and position the normalised latent c (first kv_lora_rank values) and the roped key k^R."""

    def __init__(self, *, layers: int, slots: int, max_len: int, kv_lora_rank: int, rope_dim: int, dtype, device):
        self.data = torch.zeros(layers, slots, max_len, kv_lora_rank + rope_dim, dtype=dtype, device=device)

    @property
    def max_len(self) -> int:
        return self.data.shape[2]

    @property
    def bytes_per_token(self) -> int:
        """Bytes of cache per token of one sequence, all layers: layers * (R + Dr) * itemsize."""
        return self.data.shape[0] * self.data.shape[3] * self.data.element_size()

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy whole slots src[i] -> dst[i] (disjoint index sets)."""
        self.data[:, dst] = self.data[:, src]
