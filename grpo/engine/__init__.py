"""The rollout engine (see ``grpo.rollout`` for what it computes).

- ``scheduler``: ``RolloutEngine``, continuous batching over the slots of a decoder; ``slots``: its host-side
  bookkeeping; ``config``: ``SamplingConfig`` and ``Rollout``.
- ``protocol``: ``Decoder``, the interface the scheduler drives (prefill, one decode step, slot moves,
  weight rebinding). Adding a decoder for another architecture means implementing it.
- ``v3``: the DeepSeek-V3 decoder (MLA latent cache in ``cache``, CUDA-graph replay in ``graphs``), whose
  layer is defined once in ``layer`` (with ``experts`` for the MoE blocks) over the typed containers of
  ``containers``, run through the op table ``ops`` picked at bind time.
- ``speculative``: MTP self-speculative decoding (drafts of the policy's MTP module verified by the main model
  in one multi-token step; exact sampling distribution and logprobs).
- ``generic``: any Hugging Face causal LM through its own forward.
"""
