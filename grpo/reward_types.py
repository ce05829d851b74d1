"""What the trainer's reward callable returns: the scores of one batch by named rewards, with what they mean.

The trainer (``grpo.trainer``) consumes only these types and never names a reward: what a score means to its
metrics travels with it as ``RewardTags``. ``rewards.registry.RewardSet`` builds them from a recipe (tags
declared by the reward function, overridden by the recipe); any callable returning ``RewardScores`` will do.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass(frozen=True)
class RewardTags:
    """What a reward's score means to the trainer's metrics (the advantages use only scores and weights)."""

    verifiable: bool = False  # a correctness score in [0, 1] (answer checked, tests passed): counts toward `accuracy`

    @classmethod
    def names(cls) -> list[str]:
        """The tag names a reward or a recipe may set."""
        return [f.name for f in fields(cls)]


@dataclass
class RewardScores:
    """Scores of one batch of N completions by F named rewards; every dict is keyed by reward name.

    per_reward: name -> [N] float | None (None: does not apply to that sample; the dict's order is the rewards'
    order);  weights: name -> weight;  failures: name -> samples scored 0 after raising or returning NaN/inf
    (``rewards_on_error: zero``);  tags: name -> RewardTags (a name without an entry has the default tags).
    """

    per_reward: dict[str, list[float | None]]
    weights: dict[str, float]
    failures: dict[str, int]
    tags: dict[str, RewardTags] = field(default_factory=dict)

    def total(self) -> list[float]:
        """[N] sum over rewards of weight * value, with ``None`` counting 0."""
        n = len(next(iter(self.per_reward.values()), []))
        return [sum(self.weights[k] * (v[i] or 0.0) for k, v in self.per_reward.items()) for i in range(n)]

    def tags_of(self, name: str) -> RewardTags:
        return self.tags.get(name, RewardTags())
