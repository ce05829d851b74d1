import ast
from pathlib import Path

import pytest

from grpo.reward_types import RewardScores, RewardTags

GRPO = Path(__file__).resolve().parents[2] / "grpo"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level and conditional imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


def test_grpo_imports_nothing_from_rewards():
    """The trainer names no reward: what it needs of one travels in grpo.reward_types."""
    files = sorted(GRPO.glob("*.py"))
    assert GRPO / "trainer.py" in files
    offenders = {f.name: m for f in files for m in imported_modules(f) if m == "rewards" or m.startswith("rewards.")}
    assert offenders == {}


def test_scores_total_and_default_tags():
    s = RewardScores({"a": [1.0, None], "b": [0.5, 2.0]}, {"a": 2.0, "b": 1.0}, {"a": 0, "b": 0},
                     {"a": RewardTags(verifiable=True)})
    assert s.total() == pytest.approx([2.5, 2.0])
    assert s.tags_of("a").verifiable and s.tags_of("b") == RewardTags()
    assert RewardTags.names() == ["verifiable"]
