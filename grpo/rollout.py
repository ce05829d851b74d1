"""Rollout engine: G sampled completions per prompt, with the logprobs the trainer will recompute.

For prompt x_i (i < P) and sample j < G, row r = i*G + j of the result holds a completion y_r drawn
token by token from the policy pi at temperature T, truncated by top-k/top-p/min-p (``grpo.sampling``), and

    logprobs[r, t] = log softmax(z_t / T)[y_{r,t}],  z_t = policy logits given (x_i, y_{r,<t})

i.e. the log-probability under the untruncated temperature-T distribution, which is what the trainer's
teacher-forced forward pass gives (in fp32 the two agree to ~1e-6). A completion ends at a stop token
(kept, finish_reason 'stop'), at a token that completes a stop string (kept, 'stop') or after
max_new_tokens tokens ('length').

Two backends with the same sampler and logprob semantics:

- DeepSeek-V3 policies (config.model_type == "deepseek_v3"): ``grpo.v3_decode`` (MLA latent cache,
  absorbed-attention decode, grouped expert GEMMs; on CUDA the Triton kernels of ``grpo.kernels``) under a
  continuous-batching scheduler. ``max_batch``
  slots; groups queue until G slots are free; newly admitted groups are prefilled once per prompt (latents
  copied to the G slots) between decode steps, at most ``prefill_tokens`` (padded) prompt tokens at a time.
  Finished sequences free their slot at once and active slots are kept contiguous (the last active slot
  moves into the hole), so a decode step runs on exactly the active sequences. On CUDA a decode step
  (forward + sampling) is replayed from a CUDA graph captured per (batch bucket, length bucket), and the
  host reads a step's tokens while the next step runs. On CPU the decode drops to one intra-op thread when
  the machine is oversubscribed (``cpu_threads``).
- any other Hugging Face causal LM: the model's own forward with a DynamicCache, in waves of
  max_batch // G groups (left-padded prompts prefilled once, cache repeated G times, finished rows dropped
  from the batch). No refill between waves.

Expert parallelism: every rank must enter every forward (the MoE all-to-all needs all ranks). With
``ep_group`` the V3 loop all-reduces two flags per iteration (anyone still busy / anyone prefilling); a
rank with nothing to do runs a one-token dummy prefill or decode until all ranks are done, so every rank
calls the same sequence of forwards. The MoE blocks themselves (e.g. DeepSpeed AutoEP's) are called as
modules, so their collectives run inside them; decode steps then run eagerly (no CUDA graphs).

Randomness: a torch.Generator seeded with ``seed`` when the engine is built; the same engine state and
inputs give the same rollouts (per device type). One uniform per sampled token is drawn from it.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.distributed as dist
from torch import nn
from transformers import DynamicCache

from grpo.config import ConfigError
from grpo.sampling import StopStrings, sample
from grpo.v3_decode import CudaGraphStep, V3Decoder, is_v3

_compiled_sample = torch.compile(sample)  # one per process: every engine's graphs reuse its variants


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
    stats: dict[str, float] = field(default_factory=dict)  # prefill/decode counts and timing
    # [N] each [len(prompt) + length - 1, MoE layers, K] int16 (record_routing): the experts each MoE layer chose
    # for the prompt tokens and every completion token but the last (the engine never feeds that one back)
    routing: list[torch.Tensor] | None = None


class _Outputs:
    """Per-row generated tokens and logprobs (CPU), stop detection and finish reasons."""

    def __init__(self, rows: int, cfg: SamplingConfig, pad_id: int, stop_ids: torch.Tensor, stops: StopStrings):
        self.max_new, self.stop_ids, self.stops = cfg.max_new_tokens, stop_ids, stops
        self.tokens = torch.full((rows, cfg.max_new_tokens), pad_id, dtype=torch.long)
        self.logprobs = torch.zeros(rows, cfg.max_new_tokens)
        self.count = torch.zeros(rows, dtype=torch.long)
        self.finished = torch.zeros(rows, dtype=torch.bool)
        self.reason = [""] * rows
        self.routes: list[torch.Tensor | None] | None = [None] * rows if cfg.record_routing else None

    def add_routes(self, rows: torch.Tensor, positions: torch.Tensor, routes: torch.Tensor) -> None:
        """Routes [m, layers, K] of the tokens at ``positions`` [m] of ``rows`` [m] (finished rows ignored)."""
        for r, p, x in zip(rows.tolist(), positions.tolist(), routes):
            if not self.finished[r]:
                self.routes[r][p] = x

    def add(self, rows: torch.Tensor, tokens: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
        """Append one token to each unfinished row of ``rows`` [m] (CPU tensors); returns done [m] bool,
        True for the rows this token finished (tokens for already finished rows are ignored)."""
        done = torch.zeros(len(rows), dtype=torch.bool)
        live = (~self.finished[rows]).nonzero().flatten()
        rows, tokens, logprobs = rows[live], tokens[live], logprobs[live]
        at = self.count[rows]
        self.tokens[rows, at] = tokens
        self.logprobs[rows, at] = logprobs.float()
        self.count[rows] = at + 1
        stop = torch.isin(tokens, self.stop_ids)
        if self.stops:
            for j in (~stop).nonzero().flatten().tolist():
                stop[j] = self.stops.hit(self.tokens[int(rows[j]), : at[j] + 1].tolist())
        ended = stop | (at + 1 >= self.max_new)
        for j in ended.nonzero().flatten().tolist():
            self.reason[int(rows[j])] = "stop" if stop[j] else "length"
        self.finished[rows[ended]] = True
        done[live[ended]] = True
        return done


class _Slots:
    """Host-side state of the V3 decode slots. Active slots are 0..n-1; slot s holds result row ``row[s]``
    with ``pos[s]`` tokens in its cache; ``slot[r]`` is the slot of active row r (-1 otherwise)."""

    def __init__(self, dec: V3Decoder, rows: int):
        slots = dec.tokens.shape[0]
        self.dec, self.n = dec, 0
        self.row = torch.full((slots,), -1, dtype=torch.long)
        self.pos = torch.zeros(slots, dtype=torch.long)
        self.slot = torch.full((rows,), -1, dtype=torch.long)

    def assign(self, rows: torch.Tensor, lengths: torch.Tensor) -> slice:
        """Give ``rows`` the next free slots (their caches hold ``lengths`` tokens)."""
        new = slice(self.n, self.n + len(rows))
        self.row[new], self.pos[new] = rows, lengths
        self.slot[rows] = torch.arange(new.start, new.stop)
        self.n = new.stop
        return new

    def release(self, rows: torch.Tensor) -> None:
        """Free the slots of ``rows``; the last active slots move into the holes (cache rows included)."""
        if not len(rows):
            return
        done = torch.zeros(self.n, dtype=torch.bool)
        done[self.slot[rows]] = True
        live = self.n - len(rows)
        holes = done[:live].nonzero().flatten()
        movers = (~done[live:]).nonzero().flatten() + live
        if len(holes):
            src, dst = _to_device(movers, self.dec.device), _to_device(holes, self.dec.device)
            self.dec.cache.move(src, dst)
            self.dec.tokens[dst] = self.dec.tokens[src]
            self.row[holes], self.pos[holes] = self.row[movers], self.pos[movers]
            self.slot[self.row[holes]] = holes
        self.slot[rows] = -1
        self.row[live:self.n], self.pos[live:self.n] = -1, 0
        self.n = live


@dataclass
class _Step:
    """A launched decode step: result rows of slots 0..n-1 at launch, sampled tokens/logprobs on the host
    (filled asynchronously on CUDA until ``ready``)."""

    rows: torch.Tensor
    tokens: torch.Tensor
    logprobs: torch.Tensor
    ready: Optional[torch.cuda.Event]


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without waiting for the queued GPU work (pinned, asynchronous copy;
    the pinned block is not reused before the copy has run)."""
    return t if device.type == "cpu" else t.pin_memory().to(device, non_blocking=True)


@contextlib.contextmanager
def cpu_threads(device: torch.device, fixed: int = 0):
    """On CPU, torch's intra-op threads inside the block: ``fixed``, or ``auto_cpu_threads`` when 0; restored
    afterwards. Yields the count used (None off the CPU)."""
    if device.type != "cpu":
        yield None
        return
    before = torch.get_num_threads()
    torch.set_num_threads(fixed or auto_cpu_threads(before))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def auto_cpu_threads(default: int) -> int:
    """Intra-op threads for CPU work: ``default`` (torch's setting), or 1 when the machine is busy (1-minute
    load average above the core count). A parallel region whose threads are descheduled waits at its
    barrier: on a shared 2-core machine (load 2.6) two threads made a rollout 20x and a GRPO update 12x
    slower than one thread; alone, one thread costs at most a factor of the core count. Used by the engine's
    decoding and by ``grpo.trainer``'s updates."""
    if not hasattr(os, "getloadavg"):
        return default
    return 1 if os.getloadavg()[0] > (os.cpu_count() or 1) else default


def _any_rank(flags: list[bool], group) -> list[bool]:
    """Element-wise OR of ``flags`` over the ranks of ``group`` (identity without a group)."""
    if group is None:
        return flags
    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    t = torch.tensor(flags, dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [bool(v) for v in t.tolist()]


class RolloutEngine:
    """``RolloutEngine(model, tokenizer, cfg).generate(prompts, group_size) -> Rollout``.

    model: a causal LM (DeepSeek-V3 gets the fast path); tokenizer: used for eos/pad ids and stop strings
    (may be None when cfg.stop_token_ids is given and no stop strings are used); ep_group: the expert-parallel
    process group when the policy's experts are sharded (see module docstring).
    """

    def __init__(self, model: nn.Module, tokenizer, cfg: SamplingConfig, *, ep_group=None):
        self.model, self.tokenizer, self.cfg, self.ep_group = model, tokenizer, cfg, ep_group
        self.device = next(model.parameters()).device
        if cfg.backend == "v3" and not is_v3(model):
            raise ConfigError("backend", f"'v3' needs a model with model_type 'deepseek_v3', got {model.config.model_type!r}")
        self.backend = "v3" if cfg.backend == "v3" or cfg.backend == "auto" and is_v3(model) else "generic"
        if ep_group is not None and self.backend != "v3":
            raise ValueError("ep_group (expert parallelism) is only supported by the DeepSeek-V3 backend")
        if cfg.record_routing and self.backend != "v3":
            raise ConfigError("record_routing", "needs a DeepSeek-V3 policy (the V3 backend); this model has no "
                              "routed experts to record")
        self.stops = StopStrings(tokenizer, cfg.stop_strings)
        self.stop_ids = torch.tensor(self._stop_ids(), dtype=torch.long)
        self.pad_id = next(i for i in (getattr(tokenizer, "pad_token_id", None), model.config.pad_token_id,
                                       int(self.stop_ids[0]) if len(self.stop_ids) else None, 0) if i is not None)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self._decoder: V3Decoder | None = None
        self._graphs: CudaGraphStep | None = None
        self._lag = 1 if self.device.type == "cuda" else 0  # decode steps in flight before reading results
        self.stats: dict[str, float] = {}

    def _stop_ids(self) -> list[int]:
        if self.cfg.stop_token_ids is not None:
            return list(self.cfg.stop_token_ids)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is None:
            eos = self.model.config.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    # ---- public API --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], group_size: int) -> Rollout:
        """Sample ``group_size`` completions for each prompt (token ids). See ``Rollout`` for the layout."""
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if group_size > self.cfg.max_batch:
            raise ValueError(f"group_size {group_size} exceeds max_batch {self.cfg.max_batch}: a group decodes together")
        vocab = self.model.config.vocab_size
        for i, p in enumerate(prompts):
            if len(p) == 0 or min(p) < 0 or max(p) >= vocab:
                raise ValueError(f"prompt {i} must be a non-empty list of token ids in [0, {vocab}), got {p[:8]}...")
        rows = len(prompts) * group_size
        out = _Outputs(rows, self.cfg, self.pad_id, self.stop_ids, self.stops)
        self.stats = dict(prefill_calls=0, prefill_tokens=0, decode_steps=0, decode_tokens=0)
        start = time.perf_counter()
        with cpu_threads(self.device, self.cfg.cpu_threads) as threads:
            if threads is not None:
                self.stats["threads"] = threads
            if rows:
                (self._run_v3 if self.backend == "v3" else self._run_generic)(prompts, group_size, out)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stats["seconds"] = time.perf_counter() - start
        width = int(out.count.max()) if rows else 0
        mask = torch.arange(width)[None] < out.count[:, None]
        return Rollout(
            prompt_ids=[list(p) for p in prompts for _ in range(group_size)],
            completion_ids=out.tokens[:, :width].clone(),
            completion_mask=mask,
            logprobs=out.logprobs[:, :width] * mask,
            lengths=out.count.clone(),
            finish_reason=out.reason,
            group=torch.arange(rows) // group_size,
            stats=dict(self.stats),
            routing=None if out.routes is None else [
                out.routes[r][: len(prompts[r // group_size]) + int(out.count[r]) - 1] for r in range(rows)],
        )

    def generate_text(self, prompts: list[str], group_size: int = 1) -> list[str]:
        """Tokenize ``prompts`` (no special tokens added), generate, and decode the N completions."""
        ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        ro = self.generate(ids, group_size)
        return [self.tokenizer.decode(ro.completion_ids[r, : ro.lengths[r]].tolist(), skip_special_tokens=True)
                for r in range(len(ro.finish_reason))]

    def release(self) -> None:
        """Free the cache and CUDA graphs (they are rebuilt on the next generate)."""
        self._decoder = self._graphs = None

    @property
    def _sampling(self) -> dict:
        c = self.cfg
        return dict(temperature=c.temperature, top_k=c.top_k, top_p=c.top_p, min_p=c.min_p)

    def _sample_compiled(self, logits: torch.Tensor, uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``sample`` through ``torch.compile`` (the CUDA graphs' sampler): the float conversion, group
        maxima, log-sum-exp and inverse CDF fuse into a few kernels: 0.23 -> 0.06-0.07 ms on an H200 at batch
        256, vocabulary 32000, top-k 50 (with the Triton top-k). The batch is the only dynamic size."""
        with torch._dynamo.config.patch(automatic_dynamic_shapes=False, recompile_limit=64):
            torch._dynamo.maybe_mark_dynamic(logits, 0)
            torch._dynamo.maybe_mark_dynamic(uniform, 0)
            return _compiled_sample(logits, uniform, **self._sampling)

    def _sample(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        uniform = torch.rand(logits.shape[0], generator=self.generator, device=self.device)
        return sample(logits, uniform, **self._sampling)

    # ---- DeepSeek-V3: slots, refill, latent cache ----------------------------------------------------------
    def _decoder_for(self, max_len: int) -> V3Decoder:
        d = self._decoder
        if d is None or d.cache.max_len < max_len or d.tokens.shape[0] != self.cfg.max_batch:
            self._decoder = self._graphs = None
            self._decoder = V3Decoder(self.model, slots=self.cfg.max_batch, max_len=-(-max_len // 64) * 64)
            if self.cfg.record_routing:
                self._decoder.record_routing()
            # an expert-parallel all-to-all sizes its messages on the host, recording appends on the host: not capturable
            if self.device.type == "cuda" and self.cfg.cuda_graphs and self.ep_group is None and not self.cfg.record_routing:
                self._graphs = CudaGraphStep(self._decoder, self._sample_compiled, self.generator)
        else:
            d.bind()
        return self._decoder

    def _run_v3(self, prompts: list[list[int]], group_size: int, out: _Outputs) -> None:
        """Continuous batching. On CUDA the results of a decode step are read while the next one runs
        (lag 1): a finished sequence is noticed one step late and its slot decodes one ignored token."""
        lag = self._lag
        # + lag: a slot that finished by length may decode once more before the host notices
        dec = self._decoder_for(max(map(len, prompts)) + self.cfg.max_new_tokens + lag)
        slots = _Slots(dec, len(prompts) * group_size)
        queue, pending = deque(range(len(prompts))), deque()
        while True:
            admit = self._admissions(queue, prompts, group_size, slots.n)
            busy, prefilling = _any_rank([bool(queue or admit or pending) or slots.n > 0, bool(admit)], self.ep_group)
            if not busy:
                return
            if prefilling:
                self._prefill(dec, slots, prompts, admit, group_size, out)
            if slots.n > 0:
                pending.append(self._launch(dec, slots, out))
            elif self.ep_group is not None:  # keep the expert all-to-all matched across ranks
                dec.positions[0] = 0
                dec.decode(1, 1)
                if out.routes is not None:
                    dec.take_routes()
            while len(pending) > (lag if slots.n > 0 else 0):
                step = pending.popleft()
                if step.ready is not None:
                    step.ready.synchronize()
                slots.release(step.rows[out.add(step.rows, step.tokens, step.logprobs)])

    def _admissions(self, queue: deque, prompts, G: int, n: int) -> list[int]:
        """Prompts (queue order) whose G samples fit in the free slots, within the prefill token budget."""
        admit, width = [], 0
        while queue and n + (len(admit) + 1) * G <= self.cfg.max_batch:
            width = max(width, len(prompts[queue[0]]))
            if admit and width * (len(admit) + 1) > self.cfg.prefill_tokens:
                break
            admit.append(queue.popleft())
        return admit

    def _prefill(self, dec: V3Decoder, slots: _Slots, prompts, admit: list[int], G: int, out: _Outputs) -> None:
        if not admit:  # expert parallelism: another rank is prefilling
            dec.prefill([[self.pad_id]], [[]])
            if out.routes is not None:
                dec.take_routes()
            return
        first = slots.n
        logits = dec.prefill([prompts[i] for i in admit], [[first + j * G + g for g in range(G)] for j in range(len(admit))])
        if out.routes is not None:  # prompt routes: [len(admit) * width] tokens, right-padded prompts
            routes = dec.take_routes()
            routes = routes.view(len(admit), -1, *routes.shape[1:])
            for j, i in enumerate(admit):
                n = len(prompts[i])
                for g in range(G):
                    out.routes[i * G + g] = routes.new_zeros(n + self.cfg.max_new_tokens + self._lag, *routes.shape[2:])
                    out.routes[i * G + g][:n] = routes[j, :n]
        self.stats["prefill_calls"] += 1
        self.stats["prefill_tokens"] += sum(len(prompts[i]) for i in admit)
        tokens, logprobs = self._sample(logits.repeat_interleave(G, dim=0))
        rows = torch.tensor([i * G + g for i in admit for g in range(G)])
        new = slots.assign(rows, torch.tensor([len(prompts[i]) for i in admit]).repeat_interleave(G))
        dec.tokens[new] = tokens
        slots.release(rows[out.add(rows, tokens.cpu(), logprobs.cpu())])

    def _launch(self, dec: V3Decoder, slots: _Slots, out: _Outputs) -> _Step:
        """Decode one token for every active slot; the results are copied to the host asynchronously."""
        n = slots.n
        dec.positions[:n].copy_(_to_device(slots.pos[:n], dec.device), non_blocking=True)
        span = int(slots.pos[:n].max()) + 1
        if self._graphs is not None:
            tokens, logprobs = self._graphs(n, span)
        else:
            tokens, logprobs = self._sample(dec.decode(n, span))
            dec.tokens[:n] = tokens
        if out.routes is not None:
            out.add_routes(slots.row[:n], slots.pos[:n], dec.take_routes())
        slots.pos[:n] += 1
        self.stats["decode_steps"] += 1
        self.stats["decode_tokens"] += n
        if self.device.type == "cpu":
            return _Step(slots.row[:n].clone(), tokens, logprobs, None)
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) for t in (tokens, logprobs)]
        ready = torch.cuda.Event()
        ready.record()
        return _Step(slots.row[:n].clone(), *host, ready)

    # ---- any causal LM: waves with the model's own forward and cache ---------------------------------------
    def _run_generic(self, prompts: list[list[int]], group_size: int, out: _Outputs) -> None:
        cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        was_training = self.model.training
        self.model.eval()
        try:
            per_wave = max(1, self.cfg.max_batch // group_size)
            for start in range(0, len(prompts), per_wave):
                wave = list(range(start, min(start + per_wave, len(prompts))))
                self._wave(cache_kw, prompts, wave, group_size, out)
        finally:
            self.model.train(was_training)

    def _wave(self, cache_kw: str, prompts, wave: list[int], G: int, out: _Outputs) -> None:
        width = max(len(prompts[i]) for i in wave)
        ids = torch.full((len(wave), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(wave), width, dtype=torch.long)
        for b, i in enumerate(wave):  # left padding, as transformers' generate
            ids[b, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[b, width - len(prompts[i]):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                            logits_to_keep=1, **{cache_kw: cache}).logits[:, -1]
        self.stats["prefill_calls"] += 1
        self.stats["prefill_tokens"] += sum(len(prompts[i]) for i in wave)
        cache.batch_repeat_interleave(G)
        mask, last = mask.repeat_interleave(G, dim=0), positions[:, -1].repeat_interleave(G)
        rows = torch.tensor([i * G + g for i in wave for g in range(G)])
        tokens, logprobs = self._sample(logits.repeat_interleave(G, dim=0))
        done = out.add(rows, tokens.cpu(), logprobs.cpu())
        while not bool(done.all()):
            if bool(done.any()):
                keep = (~done).nonzero().flatten()
                keep_d = keep.to(self.device)
                cache.batch_select_indices(keep_d)
                rows, mask, last, tokens = rows[keep], mask[keep_d], last[keep_d], tokens[keep_d]
            mask = torch.cat((mask, mask.new_ones(len(rows), 1)), dim=1)
            last = last + 1
            logits = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=last[:, None],
                                use_cache=True, **{cache_kw: cache}).logits[:, -1]
            tokens, logprobs = self._sample(logits)
            self.stats["decode_steps"] += 1
            self.stats["decode_tokens"] += len(rows)
            done = out.add(rows, tokens.cpu(), logprobs.cpu())
