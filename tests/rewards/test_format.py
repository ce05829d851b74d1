import pytest

from rewards.format import format_checks, format_reward

CODE = "<think>loop over it</think>\nHere:\n```python\ndef f(x):\n    return x\n```\n"


@pytest.mark.parametrize("completion,source,expected", [
    (r"<think>add them</think> The answer is $\boxed{5}$.", "math", 1.0),
    (r"  <think>add</think>\boxed{5}  ", "math", 1.0),
    (r"<think>add</think>\[\boxed{\frac{1}{2}}\]", "math", 1.0),
    (r"<think>add</think>\boxed{5} because reasons", "math", 0.0),  # text after the answer
    (r"<think>add</think>5", "math", 0.0),  # no boxed answer
    (r"<think>add</think>\boxed{}", "math", 0.0),  # empty box
    (r"<think>add</think>\boxed{5", "math", 0.0),  # unbalanced
    (r"<think>  </think>\boxed{5}", "math", 0.0),  # blank reasoning
    (r"<think>a</think><think>b</think>\boxed{5}", "math", 0.0),  # two of each tag
    (r"<think>a</think>\boxed{5}</think>", "math", 0.0),
    (r"</think>a<think>\boxed{5}", "math", 0.0),  # wrong order
    (r"hi <think>a</think>\boxed{5}", "math", 0.0),  # text before the opening tag
    (r"<think>a \boxed{5}", "math", 0.0),  # never closed
    (r"\boxed{5}", "math", 0.0),
    (CODE, "code", 1.0),
    (CODE + "trailing words", "code", 0.0),
    ("<think>x</think>```python\nprint(1)\n", "code", 0.0),  # fence not closed
    ("<think>x</think>```\nprint(1)\n```", "code", 0.0),  # not a python block
    (r"<think>x</think>\boxed{5}", "code", 0.0),
    (CODE, "math", 0.0),
    (CODE, None, 1.0),
    (r"<think>x</think>\boxed{5}", None, 1.0),
    ("<think>x</think>plain prose answer", None, 0.0),
    ("<think>x</think>plain prose answer", "general", 1.0),
    ("<think>x</think>   ", "general", 0.0),
])
def test_strict(completion, source, expected):
    assert format_reward(["p"], [completion], source=[source]) == [expected]


def test_without_source_column_and_kwargs_ignored():
    assert format_reward(["p", "p"], [CODE, r"<think>x</think>\boxed{1}"], answer=["1", "1"]) == [1.0, 1.0]


def test_think_prefilled():
    ok, reopened = r"reason here</think>\boxed{5}", r"<think>reason</think>\boxed{5}"
    assert format_reward(["p", "p"], [ok, reopened], think_prefilled=True) == [1.0, 0.0]
    assert format_reward(["p"], [ok]) == [0.0]


def test_soft_partial_credit():
    completions = [
        r"<think>a</think>\boxed{5}",  # all four
        r"<think>a</think>\boxed{5} extra",  # tags, reasoning, answer
        r"<think>a</think> 5",  # tags, reasoning
        r"<think></think>",  # tags
        r"\boxed{5}",  # reasoning text exists (whole completion) but no closing tag -> reasoning only
        "",
    ]
    assert format_reward(["p"] * 6, completions, source=["math"] * 6, soft=True) == [1.0, 0.75, 0.5, 0.25, 0.25, 0.0]
    assert format_checks(r"\boxed{5}", "math") == (False, True, False, False)


def test_source_length_mismatch():
    with pytest.raises(ValueError, match="source"):
        format_reward(["p", "p"], ["a", "b"], source=["math"])
