"""The code reward: extraction, scoring modes, both row kinds, and its errors on malformed rows."""
import json

import pytest

from rewards.code import code_reward, extract_code
from rewards.sandbox import isolation_problem

strong = pytest.mark.skipif(isolation_problem() is not None, reason=f"strong isolation unavailable: {isolation_problem()}")

TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\nassert add(10, 5) == 15\nassert add(0, 0) == 0\n"
RIGHT = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\n"
HALF = "```python\ndef add(a, b):\n    return a + b if a > 0 else 1\n```"  # passes units 1 and 3 only


def reward(completions, **columns):
    return code_reward([""] * len(completions), completions, timeout=2.0, **columns)


@pytest.mark.parametrize("text, expected", [
    ("```python\nx = 1\n```\ntext\n```python\nx = 2\n```", "x = 2\n"),  # the last one
    ("```py\na\n```\n```\nb\n```", "a\n"),  # tagged Python wins over a later untagged block
    ("```\nplain\n```", "plain\n"),  # untagged when nothing is tagged
    ("```Python3 title\nx\n```", "x\n"),
    ("<think>\n```python\ndraft\n```\n</think>\n```python\nfinal\n```", "final\n"),
    ("1. Code:\n   ```python\n   def f():\n       return 1\n   ```", "def f():\n    return 1\n"),  # in a list
    ("```python\nreturn x```", "return x"),  # closing fence glued to the code
    ("```bash\nls\n```", None),  # other languages are not Python
    ("```python\nnever closed", None),
    ("no code at all", None),
])
def test_extract_code(text, expected):
    assert extract_code(text) == expected


@strong
def test_pass_rate_all_or_nothing_and_missing_block():
    completions = [RIGHT, HALF, "def add(a, b): return a + b  (no fence)", "```python\ndef add(a, b):\n    return 3\n```"]
    rows = {"tests": [TESTS] * 4, "entry_point": ["add"] * 4}
    assert reward(completions, **rows) == [1.0, 0.5, 0.0, 0.25]
    assert reward(completions, **rows, scoring="all_or_nothing") == [1.0, 0.0, 0.0, 0.0]


@strong
def test_mixed_batch_scores_none_for_rows_without_tests():
    stdin = [{"input": "2 3\n", "output": "5\n"}]
    scores = reward([RIGHT, "The answer is 4.", "```python\nprint(sum(map(int, input().split())))\n```"],
                    tests=[TESTS, None, None], test_cases=[None, None, stdin])
    assert scores == [1.0, None, 1.0]


@strong
def test_mbpp_list_and_humaneval_check_formats():
    mbpp = ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]
    humaneval = "METADATA = {}\n\ndef check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"
    assert reward([RIGHT, RIGHT], tests=[mbpp, humaneval], entry_point=[None, "add"]) == [1.0, 1.0]
    assert reward([HALF], tests=[humaneval], entry_point=["add"]) == [0.0]  # check() is one unit


@strong
def test_stdin_stdout_cases():
    program = "```python\nimport sys\nnums = list(map(int, sys.stdin.read().split()))\nprint(max(nums))   \n```"
    cases = [{"input": "1 5 2\n", "output": "5"}, {"input": "7\n", "output": "7\n\n"}, {"input": "3 4\n", "output": "3\n"}]
    assert reward([program], test_cases=[cases]) == [pytest.approx(2 / 3)]  # whitespace-insensitive at line ends
    apps_style = json.dumps({"inputs": ["1 2\n", "9\n"], "outputs": ["2\n", "9\n"]})
    assert reward([program], test_cases=[apps_style]) == [1.0]
    crashing = "```python\nprint(5)\nraise SystemExit(1)\n```"
    assert reward([crashing], test_cases=[[{"input": "", "output": "5\n"}]]) == [0.0]  # a non-zero exit fails


@strong
def test_shared_tests_are_planned_once_and_run_per_completion():
    completions = [RIGHT, HALF] * 4
    assert reward(completions, tests=[TESTS] * 8) == [1.0, 0.5] * 4


@pytest.mark.parametrize("columns, message", [
    ({"tests": ["assert f(1) == 1"], "test_cases": [[{"input": "", "output": ""}]]}, "both tests and test_cases"),
    ({"tests": ["assert ("]}, "row 0: tests do not parse"),
    ({"test_cases": [[{"input": 1, "output": "1"}]]}, "row 0: test_cases must be"),
    ({"test_cases": ["{not json"]}, "not JSON"),
    ({"tests": [TESTS, TESTS]}, "2 rows for 1 completions"),
    ({"tests": [TESTS], "scoring": "partial"}, "scoring must be one of"),
])
def test_malformed_rows_raise_naming_the_problem(columns, message):
    with pytest.raises(ValueError, match=message):
        reward([RIGHT], **columns)


@strong
def test_generated_rows_through_the_registry():
    """The data generator's code rows, scored by name through the reward registry: references pass, a stub fails."""
    import random

    from data.generate import code_completion, code_row, random_code
    from rewards.registry import RewardSet, RewardSpec

    rng = random.Random(0)
    problems = [random_code(rng) for _ in range(6)]
    rows = [code_row(p, f"code-{i}") for i, p in enumerate(problems)]
    completions = [code_completion(p) for p in problems] + ["```python\ndef nothing():\n    pass\n```"] * 6
    columns = {key: [row[key] for row in rows] * 2 for key in rows[0]}
    rewards = RewardSet([RewardSpec(name="code", kwargs={"timeout": 2.0})])
    scores = rewards([row["prompt"] for row in rows] * 2, completions, **columns)
    assert scores.per_reward["code"] == [1.0] * 6 + [0.0] * 6 and scores.failures["code"] == 0


POLY_PROMPT = ('import math\n\n\ndef poly(xs: list, x: float):\n    """Evaluates the polynomial xs at x."""\n'
               '    return sum([coeff * math.pow(x, i) for i, coeff in enumerate(xs)])\n\n\n'
               'def find_zero(xs: list):\n    """Returns x such that poly(xs, x) == 0."""\n')
POLY_TESTS = ("def check(candidate):\n    for coeffs in ([-6, 11, -6, 1], [1, 2], [-3, 0, 0, 1]):\n"
              "        assert abs(poly(coeffs, candidate(list(coeffs)))) < 1e-4\n")
POLY_HONEST = ("```python\ndef find_zero(xs):\n    lo, hi = -10.0, 10.0\n    while hi - lo > 1e-9:\n"
               "        mid = (lo + hi) / 2\n        if poly(xs, lo) * poly(xs, mid) <= 0:\n            hi = mid\n"
               "        else:\n            lo = mid\n    return lo\n```")
POLY_HACK = "```python\ndef poly(xs, x):\n    return 0\n\ndef find_zero(xs):\n    return 0.0\n```"


@strong
def test_prompt_helpers_are_the_prompts_through_the_reward():
    """HumanEval-style rows: the tests' `poly` is the prompt's, whatever the program defines; a chat-style prompt
    (a list of messages) works the same."""
    chat = [{"role": "user", "content": "Complete this:\n```python\n" + POLY_PROMPT + "```"}]
    scores = code_reward([POLY_PROMPT, POLY_PROMPT, chat, chat], [POLY_HONEST, POLY_HACK, POLY_HONEST, POLY_HACK],
                         tests=[POLY_TESTS] * 4, entry_point=["find_zero"] * 4, timeout=3.0)
    assert scores == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="row 0: tests use poly"):
        code_reward(["Write find_zero."], [POLY_HACK], tests=[POLY_TESTS], entry_point=["find_zero"])
    with pytest.raises(ValueError, match="2 prompts for 1 completions"):
        code_reward(["a", "b"], [POLY_HONEST], tests=[POLY_TESTS], entry_point=["find_zero"])
    with pytest.raises(ValueError, match="row 0: the prompt must be a string"):
        code_reward([42], [POLY_HONEST], tests=[POLY_TESTS], entry_point=["find_zero"])
