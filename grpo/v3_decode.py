"""The DeepSeek-V3 decoder of the rollout engine, now in ``grpo.engine``: ``grpo.engine.v3`` (the decoder),
``grpo.engine.layer`` (the layer), ``grpo.engine.cache`` and ``grpo.engine.graphs``. Names kept here for
existing imports."""
from grpo.engine.cache import LatentCache
from grpo.engine.graphs import CudaGraphStep
from grpo.engine.v3 import V3Decoder, _rms, is_v3

__all__ = ["CudaGraphStep", "LatentCache", "V3Decoder", "_rms", "is_v3"]
