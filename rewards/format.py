"""Format reward: ``<think>reasoning</think>`` followed by a final answer in the row's expected form.

A completion c is well formed (reward 1.0, else 0.0) iff all of:
  1. tags: c.lstrip() starts with ``<think>``, and c has exactly one ``<think>`` and exactly one ``</think>``,
     after it. With ``think_prefilled=True`` (the chat template ends the prompt with ``<think>``) the
     completion must contain no ``<think>`` and exactly one ``</think>``;
  2. reasoning: the text between the tags is not blank;
  3. answer form, searched in the text after ``</think>``: for ``source == "math"`` rows a non-empty
     ``\\boxed{...}`` with balanced braces; for ``source == "code"`` a closed fenced block opened by
     ```` ```python ```` (or ```` ```py ````); for any other source just non-blank text; without a
     ``source`` column either a boxed answer or a python block;
  4. nothing after the final answer: after the last boxed answer only whitespace, ``$``, ``.``, ``\\]``,
     ``\\)`` may follow; after the closing fence of the last code block, only whitespace.

``soft=True`` gives partial credit instead: 0.25 for each of 1-4 that holds (4 counts only with 3).
"""
from __future__ import annotations

import re

from rewards.math import _BOX, _braced

_FENCE = re.compile(r"```(?:python|py)[ \t]*\n.*?\n[ \t]*```", re.S)
_TRAILER_AFTER_BOX = re.compile(r"[\s$.]*(?:\\[\])][\s$.]*)?")


def _boxed_end(text: str) -> int | None:
    """Index just after the last non-empty ``\\boxed{...}``/``\\fbox{...}`` of text, or None."""
    end = None
    for m in _BOX.finditer(text):
        if m.group(1) == "{":
            got = _braced(text, m.start(1))
            if got is not None and got[0].strip():
                end = got[1]
    return end


def _answer_checks(answer: str, source: str | None) -> tuple[bool, bool]:
    """(has the expected answer form, nothing follows it) for the text after ``</think>``."""
    box_end = _boxed_end(answer) if source in (None, "math") else None
    fences = list(_FENCE.finditer(answer)) if source in (None, "code") else []
    fence_end = fences[-1].end() if fences else None
    if source not in (None, "math", "code"):
        return bool(answer.strip()), True
    if box_end is None and fence_end is None:
        return False, False
    if box_end is not None and (fence_end is None or box_end > fence_end):
        return True, _TRAILER_AFTER_BOX.fullmatch(answer[box_end:]) is not None
    return True, not answer[fence_end:].strip()


def format_checks(completion: str, source: str | None = None, think_prefilled: bool = False) -> tuple[bool, bool, bool, bool]:
    """The four conditions of the module docstring, in order, for one completion."""
    opens, closes = completion.count("<think>"), completion.count("</think>")
    if think_prefilled:
        tags, body = opens == 0 and closes == 1, completion
    else:
        tags = opens == 1 and closes == 1 and completion.lstrip().startswith("<think>")
        body = completion.split("<think>", 1)[-1]
    reasoning, closed, answer = body.partition("</think>")
    has_answer, clean_end = _answer_checks(answer, source) if closed else (False, False)
    return tags, bool(reasoning.strip()), has_answer, has_answer and clean_end


def format_reward(prompts: list[str], completions: list[str], source: list[str | None] | None = None,
                  think_prefilled: bool = False, soft: bool = False, **_) -> list[float]:
    """1.0 for a well-formed completion, else 0.0 (or 0.25 per satisfied condition with ``soft``)."""
    sources = source if source is not None else [None] * len(completions)
    if len(sources) != len(completions):
        raise ValueError(f"format_reward: column 'source' has {len(sources)} values for {len(completions)} completions")
    out = []
    for completion, src in zip(completions, sources):
        checks = format_checks(completion, src, think_prefilled)
        out.append(sum(checks) / 4 if soft else float(all(checks)))
    return out
