"""What ``RolloutEngine`` is asked for (``SamplingConfig``) and what it returns (``Rollout``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

from grpo.config import ConfigError


@dataclass(kw_only=True)
class SamplingConfig:
    """How ``RolloutEngine`` samples. The returned logprobs are those of the distribution sampled from after
    temperature and BEFORE top-k/top-p/min-p truncation, log softmax(logits / temperature) at the drawn token
    (what the trainer's forward pass recomputes); truncation only restricts which tokens can be drawn."""

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k
    min_p: float = 0.0
    max_new_tokens: int = 256
    stop_strings: list[str] = field(default_factory=list)
    stop_token_ids: Optional[list[int]] = None  # None: the tokenizer's eos (else the model config's)
    seed: int = 0
    max_batch: int = 64  # decode slots (sequences decoded together)
    prefill_tokens: int = 16384  # padded prompt tokens prefilled at once between decode steps
    backend: Literal["auto", "v3", "generic"] = "auto"  # auto: v3 for model_type deepseek_v3
    cuda_graphs: bool = True  # CUDA only
    cpu_threads: int = 0  # CPU only: intra-op threads while generating; 0 = auto (see cpu_threads)
    # V3 only: return each token's routed experts (Rollout.routing) for rollout routing replay and the trainer's
    # mismatch metrics. The decoder then runs its module path (no fused layers, Triton kernels or CUDA graphs).
    record_routing: bool = False
    # V3 policies with an MTP module: "mtp" drafts speculative_tokens tokens per sequence with the policy's first
    # MTP module (chained for more than one) and verifies them in one forward (``grpo.engine.speculative``); the
    # sampled distribution and the returned logprobs stay exactly those of "none". With cuda_graphs each round
    # is replayed from its own CUDA graphs; not with expert parallelism or record_routing.
    speculative: Literal["none", "mtp"] = "none"
    speculative_tokens: int = 1

    def __post_init__(self):
        checks = [
            ("temperature", self.temperature >= 0, "must be >= 0 (0 = greedy)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 = off)"),
            ("min_p", 0 <= self.min_p < 1, "must be in [0, 1)"),
            ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
            ("max_batch", self.max_batch >= 1, "must be >= 1"),
            ("prefill_tokens", self.prefill_tokens >= 1, "must be >= 1"),
            ("cpu_threads", self.cpu_threads >= 0, "must be >= 0 (0 = auto)"),
            ("speculative", self.speculative in ("none", "mtp"), "must be 'none' or 'mtp'"),
            ("speculative_tokens", self.speculative_tokens >= 1, "must be >= 1"),
            ("speculative", self.speculative == "none" or not self.record_routing,
             "'mtp' cannot record routing (record_routing: true): drafts and rejected tokens have no single route"),
        ]
        for key, ok, message in checks:
            if not ok:
                raise ConfigError(key, f"{message}, got {getattr(self, key)!r}")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ConfigError("stop_strings", f"must be non-empty strings, got {self.stop_strings!r}")


@dataclass
class Rollout:
    """N = len(prompts) * G rows; rows i*G .. i*G+G-1 are the samples of prompt i. L = longest completion."""

    prompt_ids: list[list[int]]  # [N] the prompt of each row
    completion_ids: torch.Tensor  # [N, L] int64, pad id after each completion's end
    completion_mask: torch.Tensor  # [N, L] bool, True on generated tokens (stop token included)
    logprobs: torch.Tensor  # [N, L] fp32, log softmax(logits / T) at the token (0 where masked)
    lengths: torch.Tensor  # [N] int64, generated tokens per row
    finish_reason: list[str]  # [N] 'stop' | 'length'
    group: torch.Tensor  # [N] int64, prompt index of each row (= row // G)
    # prefill/decode counts and timing; with speculative decoding also the acceptance
    # (``grpo.engine.speculative.acceptance``)
    stats: dict[str, float] = field(default_factory=dict)
    # [N] each [len(prompt) + length - 1, MoE layers, K] int16 (record_routing): the experts each MoE layer chose
    # for the prompt tokens and every completion token but the last (the engine never feeds that one back)
    routing: list[torch.Tensor] | None = None

