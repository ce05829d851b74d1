from collections import Counter

import pytest

from stages.rejection_sampling import Candidate, FilterConfig, chat_row, filter_candidates, general_count, mix, reject_reason

GOOD_MATH = "<think>\n2 + 3 = 5\n</think>\nThe answer is \\boxed{5}."
GOOD_CODE = "<think>\nadd them\n</think>\n```python\ndef add(a, b):\n    return a + b\n```"


def cand(completion=GOOD_MATH, *, group=0, source="math", correct=True, truncated=False, prompt="What is 2 + 3?"):
    return Candidate(group=group, prompt=prompt, completion=completion, source=source, correct=correct,
                     truncated=truncated)


def test_each_rule_rejects_its_case():
    cfg = FilterConfig()
    assert reject_reason(cand(), cfg) is None
    assert reject_reason(cand(GOOD_CODE, source="code", prompt="Write add(a, b)."), cfg) is None
    assert reject_reason(cand(truncated=True), cfg) == "truncated"
    assert reject_reason(cand(correct=False), cfg) == "incorrect"
    assert reject_reason(cand(correct=None), cfg) == "incorrect"  # could not be verified
    assert reject_reason(cand("2 + 3 = 5. The answer is \\boxed{5}."), cfg) == "format"  # no think block
    assert reject_reason(cand("<think>\n5\n</think>\nThe answer is 5."), cfg) == "format"  # no boxed answer
    assert reject_reason(cand(GOOD_MATH, source="code"), cfg) == "format"  # code rows need a python block
    mixed = "<think>\nadd the numbers 两个 数字 相加\n</think>\nThe answer is \\boxed{5}."
    assert reject_reason(cand(mixed), cfg) == "language"
    # 3 latin words of 9 units (each CJK character is one): kept with a lower threshold
    assert reject_reason(cand(mixed), FilterConfig(min_language=0.3)) is None
    # reasoning without words (only math) has no language: not rejected for it
    assert reject_reason(cand("<think>\n$2+3=5$\n</think>\nThe answer is \\boxed{5}."), cfg) is None


def test_filter_dedupes_caps_and_counts_per_source():
    candidates = [
        cand(group=0), cand(GOOD_MATH.replace("\n", "\n  "), group=0),  # same text up to whitespace
        cand("<think>\n3 + 2 = 5\n</think>\nThe answer is \\boxed{5}.", group=0),
        cand("<think>\n5 = 2 + 3\n</think>\nThe answer is \\boxed{5}.", group=0),  # third distinct: over the cap
        cand(group=1),  # same text for another prompt: kept
        cand(group=2, correct=False), cand(group=2, truncated=True),
        cand(GOOD_CODE, group=3, source="code"), cand("no code", group=3, source="code"),
    ]
    kept, stats = filter_candidates(candidates, FilterConfig(max_per_prompt=2))
    assert [(c.group, c.completion[:12]) for c in kept] == [
        (0, GOOD_MATH[:12]), (0, "<think>\n3 + "), (1, GOOD_MATH[:12]), (3, GOOD_CODE[:12])]
    assert stats["math"] == Counter(sampled=7, kept=3, duplicate=1, over_cap=1, incorrect=1, truncated=1)
    assert stats["code"] == Counter(sampled=2, kept=1, format=1)


def test_general_share_and_mixing():
    assert general_count(600, 0.25, 10_000) == 200  # R1: 600k reasoning + 200k general
    assert general_count(30, 0.5, 10) == 10  # capped by what exists
    assert general_count(7, 0.0, 10) == 0
    with pytest.raises(ValueError, match="general_ratio"):
        general_count(7, 1.0, 10)
    reasoning = [chat_row(f"q{i}", f"a{i}", "math") for i in range(6)]
    general = [chat_row(f"g{i}", f"r{i}", "general") for i in range(5)]
    rows = mix(reasoning, general, 2, seed=0)
    assert len(rows) == 8 and sum(r["source"] == "general" for r in rows) == 2
    assert all(r in rows for r in reasoning)
    assert rows == mix(reasoning, general, 2, seed=0) and rows != mix(reasoning, general, 2, seed=1)
    assert rows[0]["messages"][0]["role"] == "user" and rows[0]["messages"][1]["role"] == "assistant"
