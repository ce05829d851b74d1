"""Rollout engine: G sampled completions per prompt, with the logprobs the trainer will recompute.

For prompt x_i (i < P) and sample j < G, row r = i*G + j of the result holds a completion y_r drawn
token by token from the policy pi at temperature T, truncated by top-k/top-p/min-p (``grpo.sampling``), and

    logprobs[r, t] = log softmax(z_t / T)[y_{r,t}],  z_t = policy logits given (x_i, y_{r,<t})

i.e. the log-probability under the untruncated temperature-T distribution, which is what the trainer's
teacher-forced forward pass gives (in fp32 the two agree to ~1e-6). A completion ends at a stop token
(kept, finish_reason 'stop'), at a token that completes a stop string (kept, 'stop') or after
max_new_tokens tokens ('length').

The engine lives in ``grpo.engine``: a scheduler (``grpo.engine.scheduler``) drives a ``Decoder``
(``grpo.engine.protocol``: prefill, one decode step, slot moves, weight rebinding). Two decoders, with the
same sampler and logprob semantics:

- DeepSeek-V3 policies (config.model_type == "deepseek_v3"): ``grpo.engine.v3`` (MLA latent cache,
  absorbed-attention decode, grouped expert GEMMs; one layer definition, ``grpo.engine.layer``, run through
  an op table picked at bind time, ``grpo.engine.ops``: torch, compiled, or the Triton kernels of
  ``grpo.kernels``). Continuous batching: ``max_batch``
  slots; groups queue until G slots are free; newly admitted groups are prefilled once per prompt (latents
  copied to the G slots) between decode steps, at most ``prefill_tokens`` (padded) prompt tokens at a time.
  Finished sequences free their slot at once and active slots are kept contiguous (the last active slot
  moves into the hole), so a decode step runs on exactly the active sequences. On CUDA a decode step
  (forward + sampling) is replayed from a CUDA graph captured per (batch bucket, length bucket)
  (``grpo.engine.graphs``), and the host reads a step's tokens while the next step runs. On CPU the decode
  runs on fewer intra-op threads while other processes keep cores busy (``grpo.engine.threads``).
- any other Hugging Face causal LM: ``grpo.engine.generic``, the model's own forward with a DynamicCache,
  in waves of max_batch // G groups (within the same ``prefill_tokens`` budget; left-padded prompts
  prefilled once, cache rows repeated G times, finished rows dropped from the batch). No refill between
  waves.

Speculative decoding (``speculative: mtp``, V3 policies with an MTP module): ``grpo.engine.speculative``.
The policy's MTP module drafts ``speculative_tokens`` tokens per sequence, the main model verifies them in
one multi-token step and the speculative-sampling rule accepts or resamples them, so the completions have
exactly the distribution above and the logprobs are the same quantity (no trainer correction). Rounds run
without CUDA graphs and read each round's result before the next; acceptance is in ``Rollout.stats``.

Expert parallelism: every rank must enter every forward (the MoE all-to-all needs all ranks). With
``ep_group`` the V3 loop all-reduces two flags per iteration (anyone still busy / anyone prefilling); a
rank with nothing to do runs a one-token dummy prefill or decode until all ranks are done, so every rank
calls the same sequence of forwards. The MoE blocks themselves (e.g. DeepSpeed AutoEP's) are called as
modules, so their collectives run inside them; decode steps then run eagerly (no CUDA graphs).

Randomness: a torch.Generator seeded with ``seed`` when the engine is built; the same engine state and
inputs give the same rollouts (per device type). One uniform per sampled token is drawn from it.
"""
from grpo.engine.config import Rollout, SamplingConfig
from grpo.engine.scheduler import RolloutEngine
from grpo.engine.threads import auto_cpu_threads, cpu_threads

__all__ = ["Rollout", "RolloutEngine", "SamplingConfig", "auto_cpu_threads", "cpu_threads"]
