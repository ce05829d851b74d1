"""Math answer checking: extraction, normalisation, and sympy equivalence under a hard timeout.

Reward (``accuracy``)::

    r(y, a) = 1  if the final answer extracted from completion y is equivalent to gold a
              0  otherwise (no answer, a hedge with a wrong candidate, parse failure, timeout)
              None when the row has no gold answer (e.g. a code row in a mixed batch)

Extraction (``rewards.math_extract.final_answers``; its docstring has the precedence): after the last
``</think>``, a bare formula, else every ``\\boxed{}``, else the last ``<answer>``, else the last "final answer"
/ "the answer is" phrase, else ``####``, else the last math span (``$..$``, ``\\[..\\]``...), else the last
number. The gold goes through the same extraction (``$x = 11$``, ``\\boxed{1}\\boxed{2}``). Several different
final answers (several boxes, or one answer ``A or B``) are a hedge: the completion is right when every one of
them equals the gold, or when together, as one list, they equal a gold of several parts (``\\boxed{3},
\\boxed{5}`` vs ``\\{3, 5\\}``); so ``\\boxed{3} or \\boxed{4}`` scores 0 against 3 (``multiple_answers="last"``
grades the last one only); more than ``MAX_CANDIDATES`` (8) distinct answers score 0.

Normalisation (``normalize``): ``$``/``\\(\\)`` delimiters, ``\\left``/``\\right``, spacing commands,
``\\displaystyle`` and a trailing period are dropped; ``\\dfrac`` -> ``\\frac``, ``\\frac12`` -> ``\\frac{1}{2}``;
``>=``/``\\geq``/``\\geqslant`` -> ``\\geq`` (likewise ``<=``, ``!=``/``\\ne``, unicode); ``km²`` -> ``km^2``;
with ``units``: degrees (inside ``\\sin`` and the like they are pi/180), percent, currency (``\\$``, ``€``,
``£``, ``USD``...) and unit suffixes (``\\text{ kg}``, ``5 km²``, ``12 meters``, ``5 m``, ``5km``) are dropped;
plain-text math is read as LaTeX (``sqrt(3)/2``, ``pi``, ``3 1/2``, ``five``); ``\\text{..}``/``\\mathrm{..}`` are unwrapped (``\\mathrm{e}`` = ``e``);
thousands separators in either locale (``1,000``, ``1{,}000``, ``1\\,000``, ``2.500,50``, ``1.000.000``) are
removed when the answer is one number, and ``3,75`` may also read as 3.75 when the other side is a number;
``[[1, 2], [3, 4]]`` is a matrix; ``\\{x \\mid x > 2\\}`` is its condition; a chain ``y = 2 + 3 = 5`` keeps its
last side; ``(C)``, ``C)``, ``Option C`` -> ``C``, and ``(B) 12`` may read as ``B`` or ``12``.

Equivalence (``verify_batch`` / ``is_equivalent`` / ``correctness``, options in ``MathConfig``):
  * labels: with ``assignment``, a side written as ``label = value`` (``x = 3``, ``f(x) = ..``, ``(a, b) = (5, 1)``,
    ``PQ = 6, RS = 2``, ``S_1 : S_2 = 3 : 8``) is compared by its values when the other side has no ``=``;
  * numbers, in-process: exact rationals exactly (``2^{300}`` != ``2^{300}+1``); two decimals within ``rel_tol``
    (relative); a decimal against an exact value at the precision the decimal is written to: it must be the
    exact value correctly rounded to its last digit, with at least ``approx_min_digits`` significant digits
    (``2.6457513`` = ``\\sqrt{7}``, ``3.14`` = ``\\pi``, but ``0.33`` != ``1/3`` and ``2.64`` != ``\\sqrt 7``; a
    rounding of a rounding to one more digit passes: within 0.55 units of the last digit);
  * the rest in a worker process: both sides parsed with latex2sympy2_extended (math-verify's parser as a
    fallback when ours cannot parse a side); expressions with symbols by evaluation at fixed random points,
    falling back to ``simplify``; equations by proportional ``lhs - rhs``; relations, ``x \\in S`` and
    intervals as solution sets (``t \\in [1, 4]`` = ``1 \\le t \\le 4``, ``2 < g(x) < 5`` = ``(2, 5)``, ``x < 1 or
    x > 2`` = ``(-\\infty, 1) \\cup (2, \\infty)``); finite sets and comma lists unordered, tuples ordered,
    interval brackets respected (``(1,2]`` != ``(1,2)``); ``\\pm 7`` = ``\\{-7, 7\\}``; a ratio ``3 : 8`` as 3/8;
    matrices element-wise; the symbol ``i`` is the imaginary unit. ``sets="strict"`` compares a relation only
    with a relation and a set only with a set.
  * refused on purpose: numerals in other bases (``52_8``) unless written the same; approximations coarser
    than ``approx_min_digits``; a list against a single value; any check that overruns its timeout.

Timeouts are enforced from outside: checks run in a persistent pool of plain worker subprocesses
(``python -I``, only the stdlib, sympy, latex2sympy2_extended and math-verify are imported there, never torch
or the trainer's main module). The parent waits on pipes with a deadline and kills and replaces a worker
that overruns; the check then counts as not equivalent. No signals are used, so it works from any thread;
concurrent callers share the workers check by check (a hanging check of one caller holds up another's checks
by at most its timeout and a worker restart, never by a whole batch).
"""
from __future__ import annotations

import atexit
import dataclasses
import functools
import json
import logging
import os
import re
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Literal

if __name__ != "_rewards_math_worker":  # the worker process only compares normalised strings
    from rewards.math_extract import _BOX, ATTACHED_UNITS, answer_region, final_answers
    from rewards.math_extract import braced as _braced  # noqa: F401  (rewards.format reads boxes with it)

REL_TOL = 5e-6
DEFAULT_TIMEOUT = 3.0
WORKER_STARTUP_TIMEOUT = 120.0
WORKER_MEMORY_BYTES = 2 << 30
MAX_ANSWER_CHARS = 2000  # longer answers are not parsed (a reward hack, or garbage): not equivalent


@dataclasses.dataclass(frozen=True)
class MathConfig:
    """Options of the math checker; each is also a key of the ``accuracy`` reward's ``kwargs``."""

    timeout: float = DEFAULT_TIMEOUT  # seconds per sympy check, enforced from outside the worker
    rel_tol: float = REL_TOL  # two decimals: |a - b| <= rel_tol * max(|a|, |b|)
    approx_min_digits: int | None = 3  # a decimal vs an exact value: significant digits it needs (None: rel_tol)
    assignment: bool = True  # "x = 3" equals "3"; "PQ = 6, RS = 2" equals "6, 2"
    sets: Literal["lenient", "strict"] = "lenient"  # strict: relations only vs relations, sets only vs sets
    units: bool = True  # drop units, currency, degrees and percent signs
    multiple_answers: Literal["all", "last"] = "all"  # several distinct final answers: all must be right / last

    def __post_init__(self):
        def bad(name, allowed):
            raise ValueError(f"math checker option {name}={getattr(self, name)!r}: expected {allowed}")

        for name in ("timeout", "rel_tol"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v != v:
                bad(name, "a number > 0")
        if self.rel_tol >= 1:
            bad("rel_tol", "a number in (0, 1)")
        v = self.approx_min_digits
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            bad("approx_min_digits", "an integer >= 1 or None")
        for name in ("assignment", "units"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "true or false")
        for name, allowed in (("sets", ("lenient", "strict")), ("multiple_answers", ("all", "last"))):
            if getattr(self, name) not in allowed:
                bad(name, " or ".join(repr(a) for a in allowed))

    @classmethod
    def from_options(cls, config: "MathConfig | None" = None, **options) -> "MathConfig":
        """``config`` (default: the defaults) with ``options`` replaced; an unknown key is an error naming the known."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown math checker option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        base = config or cls()
        if not isinstance(base, cls):
            raise ValueError(f"config must be a MathConfig, got {type(base).__name__}")
        return dataclasses.replace(base, **options) if options else base

    def worker_options(self) -> tuple:
        return (self.rel_tol, self.approx_min_digits, self.sets == "strict", self.assignment)


DEFAULT_CONFIG = MathConfig()

# ----------------------------------------------------------------------------------------------------
# Extraction (the rules are in rewards.math_extract)


def extract_answers(text: str) -> list[str]:
    """All final-answer candidates of a completion (``rewards.math_extract.final_answers``)."""
    return final_answers(text)


def extract_answer(text: str) -> str | None:
    """The last final-answer candidate of ``text``, or None."""
    found = final_answers(text)
    return found[-1] if found else None


def _candidates(text: str) -> list[str]:
    """Final-answer candidates of one side (gold field, answer string or completion); the text itself when
    no rule finds one and it is short (``Monday!``)."""
    text = str(text)
    found = [part for answer in final_answers(text) for part in _alternatives(answer)]
    if found:
        return found
    region = answer_region(text).strip()
    return [region] if region and len(region) <= 100 and not _BOX_ANY.search(region) else []


_BOX_ANY = re.compile(r"\\(?:boxed|fbox)")
_OR = re.compile(r"\s*(?:\\(?:q?quad|,|;)\s*)*(?:\\(?:text|textrm|mathrm|mbox)\s*\{\s*or\s*\}|\bor\b)(?:\s*\\(?:q?quad|,|;))*\s*")


def _alternatives(answer: str) -> list[str]:
    """An answer of the form ``A or B`` as its alternatives ``[A, B]`` (split outside brackets), else ``[answer]``.
    Alternatives are judged like several boxes: all equal to the gold, or together equal to a gold list."""
    if " or " not in answer and "{or}" not in answer.replace(" ", ""):
        return [answer]
    parts, start = [], 0
    for m in _OR.finditer(answer):
        before = answer[:m.start()]
        if sum(before.count(c) for c in "([{") == sum(before.count(c) for c in ")]}"):  # outside brackets
            parts.append(answer[start:m.start()].strip())
            start = m.end()
    if not parts:
        return [answer]
    parts.append(answer[start:].strip())
    return parts if all(parts) else [answer]

# ----------------------------------------------------------------------------------------------------
# Normalisation

_UNICODE = {"\u2212": "-", "\u2013": "-", "\u00d7": "\\times ", "\u00f7": "\\div ", "\u03c0": "\\pi ",
            "\u221e": "\\infty ", "\u2264": "\\leq ", "\u2265": "\\geq ", "\u2260": "\\neq ", "\u221a": "\\sqrt",
            "\u00b2": "^2", "\u00b3": "^3", "\u00b9": "^1", "\u22c5": "\\cdot ", "\u00b7": "\\cdot ",
            "\u222a": "\\cup ", "\u2229": "\\cap ", "\u2208": "\\in ", "\u00a0": " ", "\u2009": " ", "\u202f": " ",
            "\u2248": "\\approx ", "\u00bd": "\\frac{1}{2}", "\u00bc": "\\frac{1}{4}", "\u00be": "\\frac{3}{4}",
            "\u2153": "\\frac{1}{3}", "\u2154": "\\frac{2}{3}", "\u2070": "^0", "\u2074": "^4", "\u00b1": "\\pm ",
            "\u00b0": "^\\circ ", "\u211d": "\\mathbb{R}", "\u2216": "\\setminus ", "\u2026": "\\ldots ",
            **{chr(0x2080 + d): f"_{d}" for d in range(10)}}
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())} | {"thirty": "30", "forty": "40", "fifty": "50", "sixty": "60",
                                                     "seventy": "70", "eighty": "80", "ninety": "90", "hundred": "100"}
_PLAIN_FUNCTION = re.compile(r"(?<![\\A-Za-z])(sqrt|sin|cos|tan|ln|log|exp)\s*\(")
_RELATION_OPS = [(re.compile(r">=|\\geqslant(?![A-Za-z])|\\geq?(?![A-Za-z])"), r"\\geq "),
                 (re.compile(r"<=|\\leqslant(?![A-Za-z])|\\leq?(?![A-Za-z])"), r"\\leq "),
                 (re.compile(r"(?<![\d)}!])!=|\\neq?(?![A-Za-z])"), r"\\neq ")]  # 5!=120 is a factorial
_WRAPPERS = r"(?:text|textbf|textit|textrm|textnormal|mathrm|mathbf|mathit|mathsf|mbox|boldsymbol|bm|operatorname)"
_UNIT_TEXT = re.compile(r"\s*\\" + _WRAPPERS + r"\s*\{\s*~?\s*[A-Za-z][A-Za-z ./]*(?:\^\{?\d\}?)?\}"
                        r"(?:\^\{?\d\}?)?(?:\s*/\s*\\" + _WRAPPERS + r"\s*\{\s*[A-Za-z]+\s*\}(?:\^\{?\d\}?)?)?$")
_UNIT_WORDS = re.compile(r"^(?P<v>[-+]?\d[\d.,]*(?:/\d+)?)(?P<sp>\s*)(?P<u>(?:[A-Za-z]+\.?(?:\^\{?\d\}?)?"
                         r"(?:\s*/\s*[A-Za-z]+(?:\^\{?\d\}?)?)?\s*)+)$")
_ONE_LETTER_UNITS = set("mgshlLKNJWV")
_NOT_UNITS = {"pi", "or", "and", "sqrt", "infty", "e", "i"}
_CURRENCY = re.compile(r"\\(?:euro|texteuro|pounds|textsterling|yen|textyen|textdollar)(?![A-Za-z])|[\u20ac\u00a3\u00a5\u20b9\u20bd\u20a9]"
                       r"|^(?:USD|EUR|GBP|INR|CHF|JPY|CNY|RMB|AUD|CAD|Rs\.?)\s*(?=[-+]?\d)")
_SPACING = re.compile(r"(?<!\\)\\(?:,|;|:| |quad\b|qquad\b)|~")
_DELIMS = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|big|Big|bigg|Bigg)(?![A-Za-z])\s*")
_DROP = re.compile(r"\\(?:displaystyle|textstyle|scriptstyle)(?![A-Za-z])|\\\$|\$")
_DROP_UNITS = re.compile(r"\\%|%|\\(?:degree)(?![A-Za-z])|\^\s*\{?\s*\\circ\s*\}?|\^\s*\{\s*\}")
_TEXT_SEP = re.compile(r"\s*\\" + _WRAPPERS + r"\{\s*(?:or|and)\s*\}\s*|\s+(?:or|and)\s+")
_UNWRAP = re.compile(r"\\" + _WRAPPERS + r"\s*\{([^{}]*)\}")
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$|^[-+]?\d{1,3}(?: \d{3})+(?:\.\d+)?$")
_EU_NUMBER = re.compile(r"^[-+]?\d{1,3}(?:[. ]\d{3})+,\d+$|^[-+]?\d{1,3}(?:\.\d{3}){2,}$")
_DECIMAL_COMMA = re.compile(r"^([-+]?\d+),(\d{1,2}|\d{4,})$")
_CHOICE = re.compile(r"^(?:\(([A-Za-z])\)|(?:(?:option|choice)\s*\(?)?([A-E])[).]?|(?:option|choice)\s*\(?([a-e])\)?)$", re.I)
_LIST_MATRIX = re.compile(r"^\[\s*\[.*\]\s*\]$")
_MEMBERSHIP = re.compile(r"^([^=<>]+?)\s*\\in\s+(?!\\mathbb)(.+)$")
_SET_BUILDER = re.compile(r"^\\\{\s*[A-Za-z]\s*(?:\\in\s*\\mathbb\s*\{?R\}?\s*)?(?:\\mid|\||:)\s*(.+?)\s*\\\}$")


def _matrix_from_lists(s: str) -> str:
    """``[[1, 2], [3, 4]]`` -> a pmatrix (rows of equal length), else ``s``."""
    rows = re.findall(r"\[([^\[\]]*)\]", s[1:-1])
    cells = [[c.strip() for c in r.split(",")] for r in rows]
    if not cells or any(len(r) != len(cells[0]) for r in cells) or not all(all(r) for r in cells):
        return s
    return "\\begin{pmatrix}" + "\\\\".join("&".join(r) for r in cells) + "\\end{pmatrix}"


def normalize(answer: str, units: bool = True) -> str:
    """Canonical string form of one answer (the policy is in the module docstring)."""
    s = str(answer).strip()
    if len(s) > MAX_ANSWER_CHARS:  # refused by the checker anyway: not worth any work
        return s
    for a, b in _UNICODE.items():
        s = s.replace(a, b)
    s = re.sub(r"^\\[\[(]|\\[\])]$", "", s.strip())
    s = _plain_text_math(s)
    s = re.sub(r"\\(?:tag|label)\*?\{[^{}]*\}", "", s)
    s = re.sub(r"\\(?:SI|qty)\s*\{([^{}]*)\}\s*\{[^{}]*\}|\\num\s*\{([^{}]*)\}", lambda m: m.group(1) or m.group(2), s)
    s = re.sub(r"(?<=\d)(?:\{,\}|,\s*\\!\s*)(?=\d{3}(?!\d))", "", s)  # 10{,}080, 10,\!080: thousands
    if "=" in s:  # a computation: 200,000-130,000=70,000 has thousands separators, not list commas
        s = re.sub(r"(?<![\d.])(\d{1,3})((?:,\d{3})+)(?![\d,])", lambda m: m.group(1) + m.group(2).replace(",", ""), s)
    s = _DROP.sub("", s)
    if re.search(r"\\(?:sin|cos|tan|cot|sec|csc)(?![A-Za-z])", s):  # \sin 30^\circ: degrees are pi/180 there
        s = re.sub(r"(\d+(?:\.\d+)?)\s*\^\s*\{?\s*\\circ\s*\}?", r"(\1\\pi/180)", s)
    if units:
        s = _DROP_UNITS.sub("", s)
        s = _CURRENCY.sub("", s.strip())
    s = _DELIMS.sub("", s)
    s = _SPACING.sub(" ", s.replace("\\!", ""))
    for pattern, repl in _RELATION_OPS:
        s = pattern.sub(repl, s)
    s = re.sub(r"\\[dtc]frac(?![A-Za-z])", r"\\frac", s)
    s = re.sub(r"\\[dt]binom(?![A-Za-z])", r"\\binom", s)
    s = re.sub(r"\\(?:varnothing)(?![A-Za-z])", r"\\emptyset", s)
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*(\d)\s*\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\s*(\{[^{}]*\})\s*(\d)", r"\\frac\1{\2}", s)
    s = re.sub(r"\\sqrt\s*([0-9A-Za-z])", r"\\sqrt{\1}", s)
    s = s.replace("{,}", ",")
    s = re.sub(r"(?<=\d)\s*(?:\\[lc]?dots|\.\.\.)\s*$", "", s)  # 2.6457513...: the digits shown
    s = " ".join(s.split()).rstrip(".").strip()
    s = re.sub(r"^=\s*", "", s)  # an aligned line "&= 3\sqrt{13}"
    if units:
        for _ in range(2):  # a number followed by \text{ cm}: the number
            m = _UNIT_TEXT.search(s)
            if m and re.search(r"\d", s[:m.start()]):
                s = s[:m.start()].strip()
        s = _strip_unit_words(s)
    s = re.sub(r"\s*,(?:\s*,)+\s*", ", ", _TEXT_SEP.sub(", ", s))  # "1, 2, and 3"
    for _ in range(3):
        s = _UNWRAP.sub(r"\1", s)
    s = " ".join(s.split()).rstrip(".").strip()
    if units:
        s = _strip_unit_words(s)  # \text{7 days}
    s = re.sub(r"([(\[{])\s+|\s+([)\]}])", lambda m: m.group(1) or m.group(2), s)
    if _THOUSANDS.match(s):
        s = s.replace(",", "").replace(" ", "")
    elif _EU_NUMBER.match(s):
        s = s.replace(".", "").replace(" ", "").replace(",", ".")
    if _LIST_MATRIX.match(s):
        s = _matrix_from_lists(s)
    if m := _SET_BUILDER.match(s):  # {x | x > 2}: the condition, a relation compared as its solution set
        s = m.group(1).strip()
    if (m := _MEMBERSHIP.match(s)) and _is_label(m.group(1)):  # g(x) \in (2, 5): the set
        s = m.group(2).strip()
    approx = re.split(r"\\approx(?![A-Za-z])", s)
    if len(approx) > 1 and approx[-1].strip():  # x \approx 2.65, \sqrt{7} \approx 2.65: the value
        s = approx[-1].strip()
    parts = _top_split(s, "=")
    if len(_top_split(s, ",")) == 1 and all(p.strip() for p in parts) and (
            len(parts) >= 3 or len(parts) == 2 and not re.search(r"[A-Za-z]", parts[0])):
        last = -2 if len(parts) >= 3 and re.fullmatch(r"\s*[A-Za-z]\s*", parts[-1]) else -1
        return normalize(parts[last], units)  # a chain y = 2 + 3 = 5 (.. = 17 = x), or 5 + 7 = 12: the last value
    m = _CHOICE.match(s)  # (C), C), Option C
    return next(g for g in m.groups() if g) if m else s


def _strip_unit_words(s: str) -> str:
    """``12 meters``, ``60 km/h``, ``5 m``, ``5km`` -> the number; against the number only the units of
    ``ATTACHED_UNITS`` (``5km``, ``5m``, not ``5xy``), after a space one-letter words only if they are units."""
    m = _UNIT_WORDS.match(s)
    if not m:
        return s
    words = [w.lower() for w in re.findall(r"[A-Za-z]+", m.group("u"))]
    if set(words) & _NOT_UNITS:
        return s
    if not m.group("sp"):  # 5km is a number of km; 5xy is a product
        unit = re.sub(r"\^\{?\d\}?|\.", "", m.group("u").strip())
        return m.group("v") if unit in ATTACHED_UNITS or unit.split("/")[0] in ATTACHED_UNITS else s
    one_letter = len(words) == 1 and len(words[0]) == 1
    return m.group("v") if not one_letter or m.group("u").strip() in _ONE_LETTER_UNITS else s


def _plain_text_math(s: str) -> str:
    """Plain-text math as LaTeX: ``sqrt(3)/2`` -> ``\\sqrt{3}/2``, a lone ``pi`` -> ``\\pi``, ``inf`` -> ``\\infty``,
    ``3 1/2`` -> ``3\\frac{1}{2}``, a number word (``five``, ``five apples``) -> ``5``."""
    for _ in range(4):
        m = _PLAIN_FUNCTION.search(s)
        if not m:
            break
        depth, j = 0, m.end() - 1
        for j in range(m.end() - 1, len(s)):
            depth += {"(": 1, ")": -1}.get(s[j], 0)
            if depth == 0:
                break
        if depth:
            break
        inner = s[m.end():j]
        s = s[:m.start()] + (f"\\sqrt{{{inner}}}" if m.group(1) == "sqrt" else f"\\{m.group(1)}{{({inner})}}") + s[j + 1:]
    s = re.sub(r"(?<![\\A-Za-z])pi(?![A-Za-z])", r"\\pi ", s)
    s = re.sub(r"(?<![\\A-Za-z])(?:inf|infinity)(?![A-Za-z])", r"\\infty ", s)
    if m := re.fullmatch(r"([-+]?\d+)\s+(\d+)/(\d+)", s):
        s = f"{m.group(1)}\\frac{{{m.group(2)}}}{{{m.group(3)}}}"
    if m := re.fullmatch(r"([A-Za-z]+)(\s+[A-Za-z]+)?", s):
        s = _NUMBER_WORDS.get(m.group(1).lower(), s)
    return s


def _top_split(s: str, sep: str) -> list[str]:
    """``s`` split at the occurrences of the one-character ``sep`` outside brackets of any kind."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(s):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth = max(0, depth - 1)
        elif c == sep and depth == 0 and not (sep == "=" and i > 0 and s[i - 1] in "<>!:"):
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start:])
    return parts


_LABEL_NOISE = re.compile(r"_\{[^{}]*\}|_\\?\w+|\^\{?\\prime\}?|'|\\(?:angle|measuredangle|triangle|overline|overrightarrow"
                          r"|vec|widehat|hat|bar|mathrm|text|operatorname|left|right)(?![A-Za-z])|[{}]|\bm(?=\\angle)")
_GREEK = re.compile(r"\\(?:alpha|beta|gamma|delta|epsilon|varepsilon|zeta|eta|theta|vartheta|iota|kappa|lambda|mu|nu|xi"
                    r"|rho|sigma|tau|upsilon|phi|varphi|chi|psi|omega|Gamma|Delta|Theta|Lambda|Xi|Sigma|Phi|Psi|Omega)"
                    r"(?![A-Za-z])")


def _is_label(lhs: str) -> bool:
    """Whether the left side of ``lhs = value`` names what the value is (``x``, ``f(x)``, ``(a, b)``, ``PQ``,
    ``S_1 : S_2``, ``m\\angle ABC``) rather than being part of an equation (``x + y``, ``2x``)."""
    s = _GREEK.sub("a", _LABEL_NOISE.sub("", lhs)).strip()
    return bool(s) and re.fullmatch(r"[A-Za-z(),:\s|]+", s) is not None and re.search(r"[A-Za-z]", s) is not None


def _values(s: str) -> str | None:
    """``s`` without its labels when it is ``label = value`` or a comma list of those, else None."""
    pieces = _top_split(s, ",") if "=" in s else []
    if not pieces:
        return None
    values = []
    for k, piece in enumerate(pieces):
        sides = _top_split(piece, "=")
        if k and len(sides) == 1 and "=" not in pieces[-1] and "=" in pieces[0]:
            values.append(piece.strip())  # x = 2, 3: one label for the list
            continue
        if len(sides) != 2 or not _is_label(sides[0]) or not sides[1].strip():
            return None
        values.append(sides[1].strip())
    return ", ".join(values)


def _last_side(s: str) -> str:
    """The last side of ``s = t`` (``3! \\times 5! = 720`` -> ``720``), when it is one equation; else ``s``."""
    parts = _top_split(s, "=")
    return parts[-1].strip() if len(parts) == 2 and len(_top_split(s, ",")) == 1 and parts[-1].strip() else s


def _key(s: str) -> str:
    """String-comparison key: no spaces, ``_{8}`` -> ``_8``, letters outside commands lower-cased."""
    s = re.sub(r"(\\[A-Za-z]+)|([A-Z])", lambda m: m.group(1) or m.group(2).lower(), s)
    return re.sub(r"_\{(\w+)\}", r"_\1", s.replace(" ", ""))


def _side_variants(raw: str, cfg: MathConfig) -> list[str]:
    """Normalised readings of one answer: the reading, plus 3.75 for ``3,75``, 0.5 for ``50%``, and ``B`` and ``12``
    for ``(B) 12``."""
    s = normalize(raw, cfg.units)
    out = [s]
    if m := _DECIMAL_COMMA.match(s):
        out.append(f"{m.group(1)}.{m.group(2)}")
    if cfg.units and "%" in raw and _simple_number(s) is not None:
        out.append(f"\\frac{{{s}}}{{100}}")
    if m := _CHOICE_WITH_VALUE.match(s):  # "(B) 12": the choice, or its value
        out += [m.group(1), normalize(m.group(2), cfg.units)]
    return out


_CHOICE_WITH_VALUE = re.compile(r"^\(([A-E])\)(?::\s*|\s+)([^-+*/^=\s].*)$")


def _pair_variants(gold: str, pred: str, cfg: MathConfig) -> list[tuple[str, str]]:
    """The normalised (gold, pred) pairs that decide one raw pair: it holds when any of them does."""
    out: list[tuple[str, str]] = []
    for g in _side_variants(gold, cfg):
        for p in _side_variants(pred, cfg):
            pair = (g, p)
            if cfg.assignment and ("=" in g) != ("=" in p):  # x = 3 vs 3; 3! \times 5! = 720 vs 720
                if "=" in g:
                    pair = (normalize(_values(g) or _last_side(g), cfg.units), p)
                else:
                    pair = (g, normalize(_values(p) or _last_side(p), cfg.units))
            if pair not in out:
                out.append(pair)
    return out


_BASE_NUMBER = re.compile(r"(?<![A-Za-z\\\d])\d+_\{?\w+\}?")  # 52_8: a numeral in base 8, compared as written


_INT = re.compile(r"^[-+]?\d+$")
_DEC = re.compile(r"^[-+]?(?:\d+\.\d*|\.\d+|\d+(?:\.\d+)?[eE][-+]?\d+)$")
_SLASH = re.compile(r"^([-+]?\d+)/(\d+)$")
_FRAC = re.compile(r"^([-+]?)\\frac\{([-+]?\d+)\}\{([-+]?\d+)\}$")
_MIXED = re.compile(r"^([-+]?)(\d+)\s*\\frac\{(\d+)\}\{(\d+)\}$")


def _simple_number(s: str) -> tuple[Fraction, bool] | None:
    """(value, exact) for integers, decimals, a/b, \\frac{a}{b} and mixed numbers; else None."""
    try:
        if _INT.match(s):
            return Fraction(int(s)), True
        if _DEC.match(s):
            return Fraction(s), False
        if m := _SLASH.match(s):
            return Fraction(int(m.group(1)), int(m.group(2))), True
        if m := _FRAC.match(s):
            v = Fraction(int(m.group(2)), int(m.group(3)))
            return (-v if m.group(1) == "-" else v), True
        if m := _MIXED.match(s):
            v = int(m.group(2)) + Fraction(int(m.group(3)), int(m.group(4)))
            return (-v if m.group(1) == "-" else v), True
    except (ZeroDivisionError, ValueError):
        return None
    return None


def decimal_precision(text: str) -> tuple[int, int] | None:
    """(decimal places, significant digits) of a decimal numeral as written (``2.6457`` -> (4, 5)), else None."""
    try:
        d = Decimal(text.strip().lstrip("+"))
    except (InvalidOperation, ValueError):
        return None
    if not d.is_finite():
        return None
    sign, digits, exponent = d.as_tuple()
    return max(0, -exponent), len(str(int("".join(map(str, digits)) or "0")))


def approx_matches(exact, approx: Fraction, places: int, digits: int, min_digits: int | None, rel_tol: float) -> bool:
    """Whether a decimal ``approx`` written with ``places`` decimals / ``digits`` significant digits stands for the
    exact value ``exact`` (a Fraction or float): equal, or the correct rounding at that precision with enough digits."""
    if exact == approx:
        return True
    if min_digits is None:
        return abs(exact - approx) <= rel_tol * max(abs(exact), abs(approx))
    if digits < min_digits:
        return False
    # 0.55 units in the last place: a correct rounding (0.5), or a rounding of the rounding to one more digit
    # (sympy's N(sqrt(5), 10) prints 2.236067978 where sqrt(5) = 2.2360679774998)
    return abs(Fraction(exact) - approx) <= Fraction(55, 100 * 10 ** places)


def _numbers_equal(gold: str, g: tuple[Fraction, bool], pred: str, p: tuple[Fraction, bool], cfg: MathConfig) -> bool:
    if g[1] and p[1]:
        return g[0] == p[0]
    if not g[1] and not p[1]:
        return g[0] == p[0] or abs(g[0] - p[0]) <= Fraction(cfg.rel_tol) * max(abs(g[0]), abs(p[0]))
    exact, (approx, text) = (g[0], (p[0], pred)) if g[1] else (p[0], (g[0], gold))
    prec = decimal_precision(text)
    return prec is not None and approx_matches(exact, approx, *prec, cfg.approx_min_digits, cfg.rel_tol)


def _fast(gold: str, pred: str, cfg: MathConfig = DEFAULT_CONFIG) -> bool | None:
    """Decide in-process when cheap (True/False), or None when sympy is needed. Inputs are normalised."""
    if not pred or not gold:
        return False
    if _key(gold) == _key(pred):
        return True
    if len(gold) > MAX_ANSWER_CHARS or len(pred) > MAX_ANSWER_CHARS:
        return False
    if _BASE_NUMBER.search(gold) or _BASE_NUMBER.search(pred):
        return False
    g, p = _simple_number(gold), _simple_number(pred)
    if g is not None and p is not None:
        return _numbers_equal(gold, g, pred, p, cfg)
    return None


# ----------------------------------------------------------------------------------------------------
# Sympy comparison (runs inside worker processes only)

_PROBE_POINTS = [0.5377, 1.8339, -2.2588, 0.8622, 0.3188]
_POINTS_NEEDED = 3
_WARMUP = [(r"\frac{1}{2}", "x + 1"), ("(1, 2]", "[1, 2)"), (r"\{1, 2\}", "2, 1"), ("x < 3", r"(-\infty, 3)"),
           (r"\sqrt{2}", "1.414214"), ("y = 2x + 1", "2x - y + 1 = 0"), (r"\begin{pmatrix}1\\2\end{pmatrix}", "(1, 2)"),
           (r"\sqrt{7}", "2.6458"), (r"t \in [1, 4]", r"1 \leq t \leq 4"), ("x^{2}", r"\text{\#}\,\square")]


@functools.cache
def _converters():
    """(SLL-mode converter class, stock converter class) of latex2sympy2_extended, built on first use."""
    from antlr4.atn.PredictionMode import PredictionMode
    from latex2sympy2_extended.latex2sympy2 import _Latex2Sympy

    class SLLConverter(_Latex2Sympy):
        def create_parser(self, latex_str):
            parser = super().create_parser(latex_str)
            parser._interp.predictionMode = PredictionMode.SLL
            return parser

    return SLLConverter, _Latex2Sympy


def _latex2sympy(s: str):
    """latex2sympy2_extended's conversion with ANTLR two-stage parsing: the fast SLL prediction mode first,
    full LL only when SLL reports a syntax error (SLL never yields a different tree; it only gives up)."""
    from latex2sympy2_extended import NormalizationConfig, normalize_latex

    s = normalize_latex(s, NormalizationConfig(basic_latex=True, units=False, malformed_operators=True, nits=False,
                                               boxed="none"))
    sll, ll = _converters()
    try:
        return sll().parse(s)
    except Exception:
        return ll().parse(s)


@functools.lru_cache(maxsize=4096)
def _parse(s: str):
    from sympy import I, MatrixBase, Symbol

    try:
        expr = _latex2sympy(s)
    except Exception:
        expr = _math_verify_parse(s)
    i = Symbol("i")
    if isinstance(expr, MatrixBase):
        return expr.applyfunc(lambda e: e.xreplace({i: I}))
    return expr.xreplace({i: I}) if hasattr(expr, "xreplace") else expr


def _math_verify_parse(s: str):
    """math-verify's parser (its own timeout off: the pool times the whole check from outside)."""
    from math_verify import parse

    for got in parse(f"${s}$", parsing_timeout=None):
        if isinstance(got, str):
            continue
        if getattr(got, "is_Number", False) and re.search(r"\\in\b|[<>=]|\\[lg]eq|\\neq|\\cup", s):
            break  # a relation or a set read as one of its numbers (g(x) \in (2, 5) -> 5): not a reading
        return got
    raise ValueError(f"unparsable: {s[:80]!r}")


# per-check options, set by the worker loop: (relative tolerance, approximation digits or None, strict sets,
# assignments compared by their value)
_OPTS = (REL_TOL, 3, False, True)


def _sympy_equal(gold: str, pred: str, opts: tuple | list = ()) -> bool:
    """Worker-side check of two normalised answers; an unparsable side is not equivalent."""
    global _OPTS
    _OPTS = tuple(opts) if opts else (REL_TOL, 3, False, True)
    try:
        g, p = _parse(gold), _parse(pred)
    except Exception:
        return False
    return bool(_equal(g, p))


def _is_relation(x) -> bool:
    from sympy import And
    from sympy.core.relational import Relational

    return isinstance(x, Relational) or (isinstance(x, And) and all(isinstance(a, Relational) for a in x.args))


def _assignment(x):
    """(lhs symbol, rhs) for ``x = value``-style equations (lhs a lone symbol or function call)."""
    from sympy import Eq, Symbol
    from sympy.core.function import AppliedUndef

    if isinstance(x, Eq) and isinstance(x.lhs, (Symbol, AppliedUndef)):
        return x.lhs, x.rhs
    return None


def _membership(x):
    """``x \\in S`` (parsed as Eq(x, S)) -> S; anything else unchanged."""
    from sympy import Eq, Set

    if isinstance(x, Eq) and isinstance(x.rhs, Set) and not isinstance(x.lhs, Set):
        return x.rhs
    return x


def _relation_list_as_set(x):
    """A list of relations in one variable (``x < 1, x > 2``: "or") -> the union of their solution sets."""
    from sympy import FiniteSet, Tuple, Union

    if (isinstance(x, (FiniteSet, Tuple)) and len(x.args) > 1 and all(_is_relation(a) for a in x.args)
            and len(x.free_symbols) == 1):
        sets = [_as_set(a) for a in x.args]
        if all(s is not a for s, a in zip(sets, x.args)):
            return Union(*sets)
    return x


def _same_label(a, b) -> bool:
    """Labels of two assignments that name the same thing: equal, or ``y`` and a function ``f(x)`` (a graph)."""
    from sympy import Symbol
    from sympy.core.function import AppliedUndef

    def y_and_call(u, v) -> bool:
        return isinstance(u, Symbol) and u.name == "y" and isinstance(v, AppliedUndef)

    return a == b or y_and_call(a, b) or y_and_call(b, a)


def _equal(g, p) -> bool:
    from sympy import Expr, MatrixBase, Set, Tuple

    try:
        if g == p:
            return True
    except Exception:
        pass
    g, p = _membership(g), _membership(p)
    strict = _OPTS[2]
    if not strict:
        g, p = _relation_list_as_set(g), _relation_list_as_set(p)
    ga, pa = _assignment(g), _assignment(p)
    if ga and pa:
        return _same_label(ga[0], pa[0]) and _equal(ga[1], pa[1])
    if ga and not _is_relation(p):
        return _OPTS[3] and _equal(ga[1], p)
    if pa and not _is_relation(g):
        return _OPTS[3] and _equal(g, pa[1])
    if _is_relation(g) and _is_relation(p):
        return _relations_equal(g, p)
    if _is_relation(g) and isinstance(p, Set):
        return not strict and _equal(_as_set(g), p)
    if _is_relation(p) and isinstance(g, Set):
        return not strict and _equal(g, _as_set(p))
    if isinstance(g, MatrixBase) or isinstance(p, MatrixBase):
        return _matrices_equal(g, p)
    if isinstance(g, (Set, Tuple)) or isinstance(p, (Set, Tuple)):
        return _sets_equal(g, p)
    if isinstance(g, Expr) and isinstance(p, Expr):
        return _exprs_equal(g, p)
    return False


def _as_set(rel):
    """Solution set of a univariate relation (or chain), else the relation itself."""
    from sympy import S

    from sympy import Dummy
    from sympy.core.function import AppliedUndef

    calls = rel.atoms(AppliedUndef)  # 2 < g(x) < 5: the unknown is g(x)
    if len(calls) == 1:
        rel = rel.xreplace({calls.pop(): Dummy("u", real=True)})
    elif calls:
        return rel
    free = rel.free_symbols
    if len(free) != 1:
        return rel
    try:
        return rel.as_set().intersect(S.Reals)
    except Exception:
        return rel


def _relations_equal(g, p) -> bool:
    from sympy import Eq

    if isinstance(g, Eq) and isinstance(p, Eq):
        if g.free_symbols != p.free_symbols:
            return False
        return _proportional(g.lhs - g.rhs, p.lhs - p.rhs)
    gs, ps = _as_set(g), _as_set(p)
    if gs is not g and ps is not p:
        return _equal(gs, ps)
    from sympy.core.relational import Relational

    if isinstance(g, Relational) and isinstance(p, Relational):
        if type(g) is type(p) and _exprs_equal(g.lhs - g.rhs, p.lhs - p.rhs):
            return True
        return type(g) is type(p.reversed) and _exprs_equal(g.lhs - g.rhs, p.rhs - p.lhs)
    return False


def _proportional(a, b) -> bool:
    """a = c * b for a nonzero constant c (equations with the same solution set up to scaling)."""
    ratio = a / b
    symbols = sorted(ratio.free_symbols, key=str)
    ratios = [r for r in (_point_value(ratio, k, symbols) for k in range(len(_PROBE_POINTS))) if r is not None]
    if len(ratios) < _POINTS_NEEDED or ratios[0] == 0:
        return False
    return all(abs(r - ratios[0]) <= 1e-9 * abs(ratios[0]) for r in ratios)


def _elements(x):
    """Ordered elements of a tuple, an as-written finite set, or an open interval read as a pair."""
    from sympy import FiniteSet, Interval, Tuple

    if isinstance(x, Tuple):
        return list(x.args)
    if isinstance(x, FiniteSet):
        return list(getattr(x, "_unsorted_args", x.args))
    if isinstance(x, Interval) and x.left_open and x.right_open:
        return [x.start, x.end]
    return None


def _matched(gs: list, ps: list) -> bool:
    """A perfect matching of equal elements (unordered comparison)."""
    ps = list(ps)
    if len(gs) != len(ps):
        return False
    for g in gs:
        for j, p in enumerate(ps):
            if _equal(g, p):
                del ps[j]
                break
        else:
            return False
    return True


def _sets_equal(g, p) -> bool:
    from sympy import FiniteSet, Interval, Set, Tuple, Union

    if isinstance(g, Interval) and isinstance(p, Interval):
        return (g.left_open, g.right_open) == (p.left_open, p.right_open) and _equal(g.start, p.start) and _equal(g.end, p.end)
    if isinstance(g, Union) and isinstance(p, Union):
        return _matched(list(g.args), list(p.args))
    if isinstance(g, FiniteSet) and isinstance(p, FiniteSet):
        return _matched(list(g.args), list(p.args))
    if isinstance(g, FiniteSet) and len(g) == 1 and not isinstance(p, Set):
        return _equal(g.args[0], p)
    if isinstance(p, FiniteSet) and len(p) == 1 and not isinstance(g, Set):
        return _equal(g, p.args[0])
    if isinstance(g, Tuple) or isinstance(p, Tuple):
        ge, pe = _elements(g), _elements(p)
        return ge is not None and pe is not None and len(ge) == len(pe) and all(map(_equal, ge, pe))
    if isinstance(g, Set) and isinstance(p, Set):
        try:
            return g.symmetric_difference(p).is_empty is True
        except Exception:
            return False
    return False


def _matrices_equal(g, p) -> bool:
    from sympy import MatrixBase

    if isinstance(g, MatrixBase) and isinstance(p, MatrixBase):
        return g.shape == p.shape and all(map(_equal, g, p))
    m, other = (g, p) if isinstance(g, MatrixBase) else (p, g)
    elems = _elements(other)
    if elems is None or 1 not in m.shape or len(elems) != len(m):
        return False
    return all(map(_equal, list(m), elems)) if m is g else all(map(_equal, elems, list(m)))


def _point_value(expr, k: int, symbols: list):
    """expr evaluated at probe point k (a complex number), or None when not finite / not numeric.

    Symbol j of ``symbols`` (the union of both sides' symbols, sorted) gets a distinct value per point."""
    subs = {s: _PROBE_POINTS[(k + 2 * j) % len(_PROBE_POINTS)] + 0.1173 * j for j, s in enumerate(symbols)}
    try:
        v = complex(expr.evalf(30, subs=subs))
    except Exception:
        return None
    return v if v == v and abs(v) != float("inf") else None


def _exprs_equal(g, p) -> bool:
    from sympy import Float, simplify

    inexact = g.has(Float) or p.has(Float)
    if inexact and _OPTS[1] is not None and (g.is_Float != p.is_Float) and not (g.free_symbols or p.free_symbols):
        approx, exact = (g, p) if g.is_Float else (p, g)
        if not exact.has(Float):  # a decimal against an exact value: at the precision it is written to
            return _approx_equal(exact, approx)
    if not (g.free_symbols or p.free_symbols):
        try:
            d = (g - p).doit()
            if d.is_Rational and not inexact:  # sympy already reduced the difference exactly: 2^{300} vs 2^{300}+1
                return d == 0
            gv, pv = complex(g.evalf(60)), complex(p.evalf(60))
            diff = abs(complex(d.evalf(60)))
        except Exception:
            return False
        scale = max(abs(gv), abs(pv))
        if not scale < float("inf"):
            return False  # infinities: only structurally equal ones match (checked by the caller)
        if inexact:
            return diff <= _OPTS[0] * scale
        if diff <= 1e-40 * scale:
            return True
        return diff <= 1e-12 * scale and _simplify_zero(d, simplify)
    tol = _OPTS[0] if inexact else 1e-12
    symbols = sorted(g.free_symbols | p.free_symbols, key=str)
    agreed = 0
    for k in range(len(_PROBE_POINTS)):
        gv, pv = _point_value(g, k, symbols), _point_value(p, k, symbols)
        if gv is None or pv is None:
            continue
        if abs(gv - pv) > tol * max(abs(gv), abs(pv), 1e-12):
            return False
        agreed += 1
    return agreed >= _POINTS_NEEDED or _simplify_zero(g - p, simplify)


def _approx_equal(exact, approx) -> bool:
    """A Float against an exact number: the digits it shows (trailing zeros dropped) must be the correct rounding."""
    try:
        shown_text = str(Decimal(str(approx)).normalize())
        prec = decimal_precision(shown_text)
        value = exact.evalf(40)
        if prec is None or not value.is_real or not value.is_finite:
            return False
        shown = Fraction(shown_text)
        return approx_matches(Fraction(str(value)), shown, *prec, _OPTS[1], _OPTS[0])
    except Exception:
        return False


def _simplify_zero(diff, simplify) -> bool:
    try:
        return simplify(diff) == 0
    except Exception:
        return False


def _worker_main() -> None:
    """Worker loop: one JSON [gold, pred] per stdin line -> one line "1"/"0" on stdout."""
    import resource
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.disable(logging.WARNING)  # math-verify warns on every call with its timeouts off; stderr is a file
    parent = os.getppid()

    def exit_with_parent():  # even in the middle of a runaway computation
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=exit_with_parent, daemon=True).start()
    try:
        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    except (ValueError, OSError):
        pass
    for gold, pred in _WARMUP:  # pay the imports and sympy's first-use costs before reporting ready
        _sympy_equal(gold, pred)
    _parse.cache_clear()
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        try:
            gold, pred, *opts = json.loads(line)
            ok = _sympy_equal(gold, pred, opts)
        except (Exception, MemoryError, RecursionError):
            ok = False
        out.write("1\n" if ok else "0\n")
        out.flush()


# ----------------------------------------------------------------------------------------------------
# Worker pool (parent side)

_BOOT = (
    "import importlib.util as u, sys; s = u.spec_from_file_location('_rewards_math_worker', sys.argv[1]); "
    "m = u.module_from_spec(s); sys.modules[s.name] = m; s.loader.exec_module(m); m._worker_main()"
)  # loaded by path: the worker imports nothing of the project (the module skips its extraction import there)


class _Worker:
    def __init__(self):
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _BOOT, os.path.abspath(__file__)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, bufsize=0,
        )
        self.fd = self.proc.stdout.fileno()
        self.buf = b""
        self.ready = False
        self.started = time.monotonic()
        self.task: tuple | None = None  # (the _Call, the index of the pair in it)
        self.deadline = 0.0

    def send(self, task, gold: str, pred: str, timeout: float, options: tuple = ()) -> bool:
        try:
            self.proc.stdin.write((json.dumps([gold, pred, *options]) + "\n").encode())
        except (BrokenPipeError, OSError):
            return False
        self.task, self.deadline = task, time.monotonic() + timeout
        return True

    def read_lines(self) -> list[str] | None:
        """Complete lines available now, or None at EOF (the worker died)."""
        chunk = os.read(self.fd, 65536)
        if not chunk:
            return None
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        return [line.decode() for line in lines]

    def stderr_tail(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-2000:]

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.log):
            f.close()


def _default_size() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class _Call:
    """One ``VerifierPool.run`` call: its pairs, their verdicts, and the indices not yet sent to a worker."""

    def __init__(self, pairs: list[tuple], timeout: float):
        self.pairs, self.timeout = pairs, timeout
        self.results: list[bool | None] = [None] * len(pairs)
        self.pending = deque(range(len(pairs)))
        self.left = len(pairs)  # checks without a verdict yet
        self.cancelled = False


class VerifierPool:
    """A persistent pool of sympy worker subprocesses with per-check wall-clock deadlines.

    Workers start lazily on the first call. A worker that overruns its check's deadline is killed and
    replaced (the check is not equivalent); one that dies mid-check likewise. Thread-safe: concurrent
    ``run`` calls share the workers check by check: a free worker takes the next check of the call with the
    fewest checks running (the longest-waiting of those), so a call never waits for another call's whole
    batch: with every worker busy, its next check goes to the first one that frees (at most one timeout away,
    plus a restart when that worker was killed), and from then on it keeps its share of the workers.
    A check's deadline runs from when it is sent to a worker. One calling thread at a time drives the
    workers (sends, reads, kills) for everyone while the others wait for their verdicts; a verdict goes to
    the call and index its worker was given, so verdicts never cross calls.
    """

    def __init__(self, size: int | None = None):
        self.size = size or _default_size()
        self.pid = os.getpid()
        self.workers: list[_Worker] = []
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.calls: deque[_Call] = deque()  # calls with checks not yet sent, in turn order
        self.driving = False  # a thread is running the workers (only that thread touches them)
        self.timeouts = 0
        self._wake_r, self._wake_w = os.pipe()  # a new call wakes the driver out of its poll
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    def run(self, pairs: list[tuple], timeout: float = DEFAULT_TIMEOUT) -> list[bool]:
        """Equivalence of each normalised (gold, pred) pair, each check limited to ``timeout`` seconds.

        A pair may carry ``MathConfig.worker_options()`` as further items: (gold, pred, *options)."""
        if timeout <= 0:
            raise ValueError(f"math verification timeout must be > 0 seconds, got {timeout}")
        call = _Call(list(pairs), timeout)
        if not call.left:
            return []
        with self.cond:
            self.calls.append(call)
            self._wake()
            try:
                while call.left:
                    if self.driving:
                        self.cond.wait()
                    else:
                        self._drive(call)
            except BaseException:  # e.g. KeyboardInterrupt: no worker may keep a check of this call
                call.cancelled = True
                if call in self.calls:
                    self.calls.remove(call)
                if not self.driving:
                    self._reap()
                    self.cond.notify_all()  # a waiting call may drive now
                else:
                    self._wake()  # the driver kills the workers still busy with this call
                raise
        return call.results  # type: ignore[return-value]

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # already signalled

    def _drive(self, call: _Call) -> None:
        """Run the workers for every call until ``call`` has all its verdicts (the lock held, released while polling)."""
        self.driving = True
        try:
            while call.left:
                self._reap()
                self._dispatch()
                wait = self._wait_seconds()
                poller = select.poll()  # not select.select: the trainer may hold fds above FD_SETSIZE
                poller.register(self._wake_r, select.POLLIN)
                for w in self.workers:
                    poller.register(w.fd, select.POLLIN)
                self.cond.release()
                try:
                    readable = {fd for fd, _ in poller.poll(wait * 1000)}
                finally:
                    self.cond.acquire()
                self._collect(readable)
        except BaseException:  # a worker's state may be half-updated: drop them all, others' checks start again
            self._drop_all()
            raise
        finally:
            self.driving = False
            self.cond.notify_all()

    def _reap(self) -> None:
        """Kill the workers busy with a check of a cancelled call."""
        for w in list(self.workers):
            if w.task is not None and w.task[0].cancelled:
                self._drop(w)

    def _dispatch(self) -> None:
        """Start workers as needed, then give each idle ready worker the next check, one call after another."""
        pending = sum(len(c.pending) for c in self.calls)
        while len(self.workers) < min(self.size, max(1, pending + self._busy())):
            self.workers.append(_Worker())
        running: dict[int, int] = {}
        for w in self.workers:
            if w.task is not None:
                running[id(w.task[0])] = running.get(id(w.task[0]), 0) + 1
        for w in self.workers:
            if not self.calls:
                break
            if w.ready and w.task is None:
                c = min(self.calls, key=lambda c: running.get(id(c), 0))  # the first of those with fewest running
                self.calls.remove(c)
                i = c.pending.popleft()
                if not w.send((c, i), c.pairs[i][0], c.pairs[i][1], c.timeout, tuple(c.pairs[i][2:])):
                    c.pending.appendleft(i)
                    self.calls.appendleft(c)
                    continue
                running[id(c)] = running.get(id(c), 0) + 1
                if c.pending:
                    self.calls.append(c)  # its turn again after the others'

    def _busy(self) -> int:
        return sum(w.task is not None for w in self.workers)

    def _wait_seconds(self) -> float:
        now = time.monotonic()
        deadlines = [w.deadline if w.task is not None else w.started + WORKER_STARTUP_TIMEOUT
                     for w in self.workers if w.task is not None or not w.ready]
        return min(1.0, max(0.0, min(deadlines) - now)) if deadlines else 1.0

    def _verdict(self, w: _Worker, ok: bool) -> None:
        c, i = w.task
        w.task = None
        if c.results[i] is None:
            c.results[i] = ok
            c.left -= 1
            if not c.left:
                self.cond.notify_all()

    def _collect(self, readable: set) -> None:
        if self._wake_r in readable:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        for w in list(self.workers):
            if w.fd in readable:
                lines = w.read_lines()
                if lines is None:
                    self._died(w)
                    continue
                for line in lines:
                    if line == "ready":
                        w.ready = True
                    elif w.task is not None:
                        self._verdict(w, line == "1")
        now = time.monotonic()
        for w in list(self.workers):
            if w.task is not None and now >= w.deadline:
                self._verdict(w, False)
                self.timeouts += 1
                self._drop(w)
                self.workers.append(_Worker())  # warm the replacement now, not on the next call
            elif not w.ready and now >= w.started + WORKER_STARTUP_TIMEOUT:
                tail = w.stderr_tail()
                self._drop(w)
                raise RuntimeError(f"math verification worker did not start within {WORKER_STARTUP_TIMEOUT:.0f}s "
                                   f"(needs sympy and latex2sympy2_extended in {sys.executable}); stderr:\n{tail}")

    def _died(self, w: _Worker) -> None:
        if not w.ready:
            tail = w.stderr_tail()
            self._drop(w)
            raise RuntimeError(f"math verification worker exited during start-up (needs sympy and "
                               f"latex2sympy2_extended in {sys.executable}); stderr:\n{tail}")
        if w.task is not None:
            self._verdict(w, False)
        self._drop(w)

    def _drop(self, w: _Worker) -> None:
        w.kill()
        self.workers.remove(w)

    def _drop_all(self) -> None:
        """Kill every worker; the checks they had go back to their calls' queues (sent again later, afresh)."""
        for w in list(self.workers):
            if w.task is not None and not w.task[0].cancelled:
                c, i = w.task
                if c.results[i] is None:
                    c.pending.appendleft(i)
                    if c not in self.calls:
                        self.calls.appendleft(c)
            w.task = None
            self._drop(w)

    def close(self) -> None:
        if os.getpid() != self.pid:
            return
        with self.cond:
            while self.driving:
                self.cond.wait()
            self._drop_all()  # a call still waiting gets new workers from its own thread
            self.cond.notify_all()


_POOL: VerifierPool | None = None
_POOL_LOCK = threading.Lock()
_CACHE: dict[tuple, bool] = {}
_CACHE_MAX = 200_000
MAX_CANDIDATES = 8  # a completion with more distinct final answers than this is a scatter of guesses: 0


def get_pool() -> VerifierPool:
    """The process-wide verifier pool (created on first use, sized to the usable CPU cores).

    A forked child (e.g. a data-loader worker) gets a pool of its own; the parent's workers stay the parent's."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.pid != os.getpid():
            _POOL = VerifierPool()
            atexit.register(_POOL.close)
        return _POOL


def _distinct(answers: list[str], cfg: MathConfig) -> list[str]:
    seen: dict[str, str] = {}
    for a in answers:
        seen.setdefault(_key(normalize(a, cfg.units)), a)
    return list(seen.values())


def _row_plan(gold_text: str, pred_text: str, cfg: MathConfig) -> list[list[tuple[str, str]]]:
    """How one row is decided: alternatives (any may hold), each a list of raw answer pairs (all must hold)."""
    golds = _distinct(_candidates(gold_text), cfg)
    preds = _distinct(_candidates(pred_text), cfg)
    if not golds or not preds or len(preds) > MAX_CANDIDATES:
        return []
    gold = ", ".join(golds)  # a gold of several boxes is one answer of several parts
    if len(preds) == 1 or cfg.multiple_answers == "last":
        return [[(gold, preds[-1])]]
    return [[(gold, p) for p in preds], [(gold, ", ".join(preds))]]


def _judge(golds: list[str], preds: list[str], cfg: MathConfig, cache: bool, pool: VerifierPool | None) -> list[bool]:
    plans = [_row_plan(g, p, cfg) for g, p in zip(golds, preds)]
    raw_pairs = {pair: None for plan in plans for alt in plan for pair in alt}
    variants = {pair: _pair_variants(*pair, cfg) for pair in raw_pairs}
    opts = cfg.worker_options()
    decided: dict[tuple[str, str], bool] = {}
    todo: dict[tuple[str, str], None] = {}  # insertion-ordered set
    for pair in (v for vs in variants.values() for v in vs):
        if pair in decided or pair in todo:
            continue
        if cache and (known := _CACHE.get(pair + opts)) is not None:  # one lookup: another thread may clear it
            decided[pair] = known
        elif (fast := _fast(*pair, cfg)) is not None:
            decided[pair] = fast
        else:
            todo[pair] = None
    if todo:
        checked = dict(zip(todo, (pool or get_pool()).run([pair + opts for pair in todo], cfg.timeout)))
        decided.update(checked)
        if cache:
            if len(_CACHE) > _CACHE_MAX:
                _CACHE.clear()
            _CACHE.update({pair + opts: ok for pair, ok in checked.items()})
    holds = {pair: any(decided[v] for v in vs) for pair, vs in variants.items()}
    return [any(all(holds[pair] for pair in alt) for alt in plan) for plan in plans]


def verify_batch(golds: list[str], preds: list[str], timeout: float | None = None, cache: bool = True,
                 pool: VerifierPool | None = None, config: MathConfig | None = None, **options) -> list[bool]:
    """Equivalence of each (gold, pred); both sides may be bare answers or texts (a completion, a solution with a
    ``\\boxed{}``), read by the same extraction. Cheap cases are decided in-process, the rest spread over the
    worker pool; identical pairs are checked once (and remembered across calls when ``cache``). ``options`` are
    ``MathConfig`` fields (``timeout`` too); ``pool`` defaults to ``get_pool()``.
    """
    if len(golds) != len(preds):
        raise ValueError(f"verify_batch: {len(golds)} golds but {len(preds)} preds")
    if timeout is not None:
        options["timeout"] = timeout
    cfg = MathConfig.from_options(config, **options)
    return _judge([str(g) for g in golds], [str(p) for p in preds], cfg, cache, pool)


def is_equivalent(gold: str, pred: str, timeout: float | None = None, config: MathConfig | None = None,
                  **options) -> bool:
    """Whether answer ``pred`` is equivalent to ``gold``: the same judgement as ``correctness([pred], [gold])``."""
    return verify_batch([gold], [pred], timeout, config=config, **options)[0]


def correctness(completions: list[str], answer: list[str | None] | None, timeout: float | None = None,
                config: MathConfig | None = None, **options) -> list[bool | None]:
    """Per completion: its final answer equals the gold (None where the gold is missing or blank)."""
    if answer is None:
        raise ValueError("accuracy needs the dataset column 'answer' (gold answers; None for rows without one)")
    if len(answer) != len(completions):
        raise ValueError(f"accuracy: column 'answer' has {len(answer)} values for {len(completions)} completions")
    rows = [i for i, gold in enumerate(answer) if gold is not None and str(gold).strip()]
    verdicts = verify_batch([str(answer[i]) for i in rows], [completions[i] for i in rows], timeout,
                            config=config, **options) if rows else []
    out: list[bool | None] = [None] * len(completions)
    for i, ok in zip(rows, verdicts):
        out[i] = ok
    return out


def accuracy(prompts: list[str], completions: list[str], answer: list[str | None] | None = None,
             **kwargs) -> list[float | None]:
    """1.0 if the completion's final answer is equivalent to the row's ``answer``, else 0.0; None without gold.

    Keyword arguments: the dataset's other columns (lists, ignored) and the recipe's options, the fields of
    ``MathConfig`` (``timeout``, ``rel_tol``, ``approx_min_digits``, ``assignment``, ``sets``, ``units``,
    ``multiple_answers``); any other non-column keyword is an error."""
    fields = {f.name for f in dataclasses.fields(MathConfig)}
    options = {k: v for k, v in kwargs.items() if k in fields}
    stray = sorted(k for k, v in kwargs.items() if k not in fields and not isinstance(v, (list, tuple)))
    if stray:
        raise ValueError(f"accuracy: unknown option(s) {', '.join(stray)}; options: {', '.join(sorted(fields))}")
    return [None if ok is None else float(ok) for ok in correctness(completions, answer, **options)]


accuracy.reward_tags = {"verifiable": True}  # a correctness score: counts toward the trainer's accuracy metric
