"""Language-consistency reward (DeepSeek-R1, sec. 2.3.3): the share of the reasoning written in the target language.

    r = (units of the reasoning in the target script) / (units of the reasoning in any script)

Departures from the paper: the language is identified by its writing system (Unicode script), so English
and French are both "latin" and Chinese and Japanese both "cjk"; this is what mixed-language CoT (the failure
R1 targets) looks like, and it needs no language model.

Units: for space-separated scripts (latin, cyrillic, greek, arabic, hebrew, devanagari, bengali, hangul, ...)
a unit is a word, a maximal run of letters of one script; one-letter words are neutral (they are mostly
variables: x, n, α). For scripts written without spaces (cjk = Han + kana, thai) every character is a unit.
Neutral, i.e. removed before counting: math (``$..$``, ``$$..$$``, ``\\(..\\)``, ``\\[..\\]``,
``\\begin{..}..\\end{..}``), LaTeX commands, code (fenced and inline), tags like ``<think>``, digits,
punctuation and symbols.

Reasoning: the text before ``</think>`` (after ``<think>`` when present); if there is no ``</think>``, the
text after ``<think>``; without any tag, the whole completion.

Target: the ``language`` column when present (an ISO 639-1 code such as ``en``/``zh``/``ru``/``ar``, or a
script name), else the script with the most units in the prompt. The reward is None (not applicable) when
the reasoning has no units (empty or only math) or the prompt has no units to detect a language from.
"""
from __future__ import annotations

import bisect
import re

_RANGES = sorted([
    (0x41, 0x5A, "latin"), (0x61, 0x7A, "latin"), (0xC0, 0xD6, "latin"), (0xD8, 0xF6, "latin"), (0xF8, 0x24F, "latin"),
    (0x1E00, 0x1EFF, "latin"), (0x370, 0x3FF, "greek"), (0x1F00, 0x1FFF, "greek"), (0x400, 0x52F, "cyrillic"),
    (0x530, 0x58F, "armenian"), (0x590, 0x5FF, "hebrew"), (0x600, 0x6FF, "arabic"), (0x750, 0x77F, "arabic"),
    (0x8A0, 0x8FF, "arabic"), (0x900, 0x97F, "devanagari"), (0x980, 0x9FF, "bengali"), (0xE00, 0xE7F, "thai"),
    (0x10A0, 0x10FF, "georgian"), (0x1100, 0x11FF, "hangul"), (0x3130, 0x318F, "hangul"), (0xAC00, 0xD7AF, "hangul"),
    (0x3040, 0x30FF, "cjk"), (0x3400, 0x4DBF, "cjk"), (0x4E00, 0x9FFF, "cjk"), (0xF900, 0xFAFF, "cjk"),
    (0x20000, 0x2FA1F, "cjk"),
])
_STARTS = [r[0] for r in _RANGES]
CHARACTER_SCRIPTS = frozenset({"cjk", "thai"})
SCRIPTS = frozenset(r[2] for r in _RANGES)
LANGUAGE_SCRIPTS = {
    **dict.fromkeys("en fr de es it pt nl sv no da fi pl cs sk sl hr ro hu tr vi id ms tl sw et lv lt sq eu ca gl".split(), "latin"),
    **dict.fromkeys("ru uk be bg sr mk kk ky mn tg".split(), "cyrillic"),
    **dict.fromkeys("zh ja".split(), "cjk"), "ko": "hangul", "el": "greek", "he": "hebrew", "yi": "hebrew",
    **dict.fromkeys("ar fa ur ps".split(), "arabic"), **dict.fromkeys("hi mr ne sa".split(), "devanagari"),
    "bn": "bengali", "th": "thai", "ka": "georgian", "hy": "armenian",
}

_NEUTRAL = re.compile(
    r"```.*?```|`[^`\n]*`"
    r"|\$\$.*?\$\$|\$[^$]*\$|\\\(.*?\\\)|\\\[.*?\\\]|\\begin\{(\w+\*?)\}.*?\\end\{\1\}"
    r"|\\[A-Za-z]+|<[^<>\n]{1,40}>",
    re.S,
)


def script_of(char: str) -> str | None:
    """The script of one character (see ``SCRIPTS``), or None for digits, punctuation, symbols..."""
    code = ord(char)
    i = bisect.bisect_right(_STARTS, code) - 1
    return _RANGES[i][2] if i >= 0 and code <= _RANGES[i][1] else None


def script_units(text: str) -> dict[str, int]:
    """Units per script in text, after removing neutral spans (the counting rules are in the module docstring)."""
    counts: dict[str, int] = {}
    run_script, run_len = None, 0
    for char in _NEUTRAL.sub(" ", text) + " ":
        script = script_of(char)
        if script in CHARACTER_SCRIPTS:
            counts[script] = counts.get(script, 0) + 1
        if script == run_script and script is not None:
            run_len += 1
            continue
        if run_script is not None and run_script not in CHARACTER_SCRIPTS and run_len > 1:
            counts[run_script] = counts.get(run_script, 0) + 1
        run_script, run_len = script, 1
    return counts


def reasoning_of(completion: str) -> str:
    """The reasoning part of a completion (rules in the module docstring)."""
    if "</think>" in completion:
        return completion.split("</think>", 1)[0].split("<think>", 1)[-1]
    return completion.split("<think>", 1)[-1]


def target_script(prompt: str, language: str | None = None) -> str | None:
    """Script of the row's ``language`` value (code or script name), else the prompt's dominant script."""
    if language is not None:
        key = str(language).strip().lower().replace("_", "-").split("-")[0]
        if key in SCRIPTS:
            return key
        if key in LANGUAGE_SCRIPTS:
            return LANGUAGE_SCRIPTS[key]
        raise ValueError(f"language_consistency: unknown language {language!r}; use an ISO 639-1 code "
                         f"({', '.join(sorted(LANGUAGE_SCRIPTS))}) or a script ({', '.join(sorted(SCRIPTS))})")
    counts = script_units(prompt)
    return max(counts, key=counts.get) if counts else None


def language_consistency(prompts: list[str], completions: list[str], language: list[str | None] | None = None,
                         **_) -> list[float | None]:
    """Fraction of the reasoning's units in the target script, per completion; None when not applicable."""
    languages = language if language is not None else [None] * len(prompts)
    if len(languages) != len(prompts) or len(completions) != len(prompts):
        raise ValueError(f"language_consistency: {len(prompts)} prompts, {len(completions)} completions, "
                         f"{len(languages)} 'language' values")
    out: list[float | None] = []
    for prompt, completion, lang in zip(prompts, completions, languages):
        target = target_script(prompt, lang)
        counts = script_units(reasoning_of(completion))
        total = sum(counts.values())
        out.append(None if target is None or total == 0 else counts.get(target, 0) / total)
    return out
