"""``RolloutEngine``: G sampled completions per prompt through a ``Decoder`` (``grpo.engine.protocol``) under a
continuous-batching scheduler; see ``grpo.rollout`` for the semantics."""
from __future__ import annotations

import time
from collections import deque

import torch
import torch.distributed as dist
from torch import nn

from grpo.config import ConfigError
from grpo.engine.config import Rollout, SamplingConfig
from grpo.engine.generic import GenericDecoder
from grpo.engine.graphs import CudaGraphStep, decode_step
from grpo.engine.protocol import Decoder
from grpo.engine.slots import Outputs, Slots, Step, to_device
from grpo.engine.speculative import Speculator, acceptance
from grpo.engine.threads import cpu_threads
from grpo.engine.v3 import V3Decoder, is_v3, mtp_module
from grpo.sampling import StopStrings, sample

_compiled_sample = torch.compile(sample)  # one per process: every engine's graphs reuse its variants


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
    process group when the policy's experts are sharded (see ``grpo.rollout``).
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
        if cfg.speculative == "mtp":
            if self.backend != "v3":
                raise ConfigError("speculative", "'mtp' needs a DeepSeek-V3 policy with an MTP module (the V3 "
                                  "backend); the generic decoder has no draft model")
            if ep_group is not None:
                raise ConfigError("speculative", "'mtp' is not supported with expert parallelism (ep_group)")
            mtp_module(model)  # ConfigError without one
        self.stops = StopStrings(tokenizer, cfg.stop_strings)
        self.stop_ids = torch.tensor(self._stop_ids(), dtype=torch.long)
        self.pad_id = next(i for i in (getattr(tokenizer, "pad_token_id", None), model.config.pad_token_id,
                                       int(self.stop_ids[0]) if len(self.stop_ids) else None, 0) if i is not None)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self._decoder: Decoder | None = None
        self._graphs: CudaGraphStep | None = None
        self._speculator: Speculator | None = None
        self.draft_tokens = cfg.speculative_tokens if cfg.speculative == "mtp" else 0
        # speculative rounds (per sequence) of the last generate that kept 0..k drafts, counted on the host
        self.kept = torch.zeros(self.draft_tokens + 1, dtype=torch.long)
        # decode steps in flight before reading results: on CUDA one (positions advance on the device, so a
        # step needs nothing from the last one on the host), except while recording routes (read each step)
        self._lag = 1 if self.device.type == "cuda" and not cfg.record_routing else 0
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
        out = Outputs(rows, self.cfg, self.pad_id, self.stop_ids, self.stops)
        self.stats = dict(prefill_calls=0, prefill_tokens=0, decode_steps=0, decode_tokens=0)
        start = time.perf_counter()
        with cpu_threads(self.device, self.cfg.cpu_threads) as threads:
            if threads is not None:
                self.stats["threads"] = threads
            if rows:
                self._run(prompts, group_size, out)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stats["seconds"] = time.perf_counter() - start
        if self.draft_tokens:
            self.stats.update(acceptance(self.kept))
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
        self._decoder = self._graphs = self._speculator = None

    @property
    def _graphs_allowed(self) -> bool:
        """Decode steps may be replayed from CUDA graphs: on CUDA with ``cuda_graphs``, without expert
        parallelism (its all-to-all sizes its messages on the host)."""
        return self.device.type == "cuda" and self.cfg.cuda_graphs and self.ep_group is None

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

    def _sample(self, logits: torch.Tensor, uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return sample(logits, uniform, **self._sampling)

    def _uniform(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.generator, device=self.device)

    # ---- the scheduler: slots, refill, decoder ------------------------------------------------------------
    def _decoder_for(self, max_len: int) -> Decoder:
        """The decoder (rebuilt when its cache is too short for ``max_len`` tokens, else rebound)."""
        d = self._decoder
        if d is not None and d.max_len >= max_len and d.slots == self.cfg.max_batch:
            d.bind()
            return d
        self._decoder = self._graphs = None
        if self.backend == "generic":
            self._decoder = GenericDecoder(self.model, slots=self.cfg.max_batch, pad_id=self.pad_id)
            return self._decoder
        k = self.draft_tokens
        self._decoder = V3Decoder(self.model, slots=self.cfg.max_batch, max_len=-(-max_len // 64) * 64, draft_tokens=k)
        if self.cfg.record_routing:
            self._decoder.record_routing()
        # recording appends on the host: not capturable; a speculative round has its own graphs (``Speculator``)
        if self._graphs_allowed and not self.cfg.record_routing and not k:
            self._graphs = CudaGraphStep(self._decoder, self._sample_compiled, self.generator)
        return self._decoder

    def _run(self, prompts: list[list[int]], group_size: int, out: Outputs) -> None:
        """Continuous batching (waves for a decoder without refill). On CUDA the results of a decode step (or
        speculative round) are read while the next one runs (lag 1): a finished sequence is noticed one step
        late and its slot runs one ignored step."""
        lag, k = self._lag, self.draft_tokens
        # + lag (k + 1): a slot that finished by length may run once more (1..k+1 tokens) before the host notices;
        # + k: a verify step writes k + 1 latents from the slot's position on
        dec = self._decoder_for(max(map(len, prompts)) + self.cfg.max_new_tokens + lag * (k + 1) + k)
        if self.draft_tokens and (self._speculator is None or self._speculator.dec is not dec):  # keeps its graphs
            self._speculator = Speculator(dec, self._sampling, self.generator, self._graphs_allowed)
        self.kept.zero_()
        slots = Slots(dec, len(prompts) * group_size)
        queue, pending = deque(range(len(prompts))), deque()
        while True:
            free = self.cfg.max_batch - slots.n if dec.refill or slots.n == 0 else 0
            admit = self._admissions(queue, prompts, group_size, free)
            busy, prefilling = _any_rank([bool(queue or admit or pending) or slots.n > 0, bool(admit)], self.ep_group)
            if not busy:
                return
            if prefilling:
                self._prefill(dec, slots, prompts, admit, group_size, out)
            if slots.n > 0:
                pending.append(self._launch(dec, slots, out, in_flight=len(pending)))
            elif self.ep_group is not None:  # keep the expert all-to-all matched across ranks
                dec.positions[0] = 0
                dec.decode(1, 1)
                if out.routes is not None:
                    dec.take_routes()
            while len(pending) > (lag if slots.n > 0 else 0):
                step = pending.popleft()
                if step.ready is not None:
                    step.ready.synchronize()
                slots.advance(step.rows, step.count)
                self.stats["decode_tokens"] += int(step.count.sum())
                if k:
                    self.kept += torch.bincount(step.count - 1, minlength=k + 1)
                slots.release(step.rows[out.add_runs(step.rows, step.tokens, step.logprobs, step.count)])

    def _admissions(self, queue: deque, prompts, G: int, free: int) -> list[int]:
        """Prompts (queue order) whose G samples fit in ``free`` slots, within the prefill token budget."""
        admit, width = [], 0
        while queue and (len(admit) + 1) * G <= free:
            width = max(width, len(prompts[queue[0]]))
            if admit and width * (len(admit) + 1) > self.cfg.prefill_tokens:
                break
            admit.append(queue.popleft())
        return admit

    def _prefill(self, dec: Decoder, slots: Slots, prompts, admit: list[int], G: int, out: Outputs) -> None:
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
        tokens, logprobs = self._sample(logits.repeat_interleave(G, dim=0), self._uniform(len(admit) * G))
        rows = torch.tensor([i * G + g for i in admit for g in range(G)])
        lengths = torch.tensor([len(prompts[i]) for i in admit]).repeat_interleave(G)
        new = slots.assign(rows, lengths)
        dec.tokens[new] = tokens
        dec.positions[new] = to_device(lengths, dec.device)
        slots.release(rows[out.add(rows, tokens.cpu(), logprobs.cpu())])

    def _launch(self, dec: Decoder, slots: Slots, out: Outputs, in_flight: int) -> Step:
        """Decode one token for every active slot (a speculative round: 1..k+1 tokens); the step advances the
        slots' positions on the device, and its results are copied to the host asynchronously. ``in_flight``
        steps are launched and not read yet: the host's positions may lag the device's by that many steps."""
        n, k = slots.n, self.draft_tokens
        span = min(int(slots.pos[:n].max()) + in_flight * (k + 1) + k + 1, dec.max_len)
        if self._speculator is not None:
            tokens, logprobs, count = self._speculator(n, span)
        else:
            tokens, logprobs = (self._graphs(n, span) if self._graphs is not None
                                else decode_step(dec, self._sample, n, span, self._uniform(n)))
            tokens, logprobs, count = tokens[:, None], logprobs[:, None], torch.ones(n, dtype=torch.long)
        if out.routes is not None:  # lag 0: the host's positions are the device's
            out.add_routes(slots.row[:n], slots.pos[:n], dec.take_routes())
        self.stats["decode_steps"] += 1
        if self.device.type == "cpu":
            return Step(slots.row[:n].clone(), tokens, logprobs, count, None)
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) if t.is_cuda else t
                for t in (tokens, logprobs, count)]
        ready = torch.cuda.Event()
        ready.record()
        return Step(slots.row[:n].clone(), *host, ready)
