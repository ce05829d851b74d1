"""Math answer checking: extraction, normalisation, and sympy equivalence under a hard timeout.

Reward (``accuracy``)::

    r(y, a) = 1  if every distinct final answer extracted from completion y is equivalent to gold a
              0  otherwise (no answer, hedged answers with a wrong one, parse failure, timeout)
              None when the row has no gold answer (e.g. a code row in a mixed batch)

Extraction (``extract_answers``), applied to the text after the last ``</think>`` if there is one,
else to the whole completion, in this order of precedence:
  1. every ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces matched); several DIFFERENT boxed values
     are a hedge: each of them must be equivalent to the gold, so ``\\boxed{3} or \\boxed{4}`` scores 0;
  2. the last ``<answer>...</answer>``;
  3. the last "the (final) answer is X" / "final answer: X" (up to the end of its sentence or line);
  4. the last GSM8K-style ``#### X``.

Normalisation policy (``normalize``): ``$`` and ``\\(\\)`` delimiters, ``\\left``/``\\right``/``\\big``,
spacing commands (``\\! \\, \\; \\quad``), ``\\displaystyle`` and a trailing period are dropped;
``\\dfrac``/``\\tfrac``/``\\cfrac`` -> ``\\frac``; ``\\frac12`` -> ``\\frac{1}{2}``, ``\\sqrt3`` -> ``\\sqrt{3}``;
degrees (``^\\circ``, ``°``) and percent signs (``\\%``) are dropped, so ``50\\%`` equals ``50``; units
(a trailing ``\\text{ cm}`` or plain words after a number) are dropped; other ``\\text{..}``/``\\mathrm{..}``
wrappers are unwrapped; thousands separators (``1,000``, ``1{,}000``, ``1\\,000``) are removed when the
whole answer is one number; ``(C)`` -> ``C``; letters compare case-insensitively (as sympy symbols do).

Equivalence (``is_equivalent`` / ``verify_batch``):
  * fast path, in-process, no sympy: equal normalised strings; or both sides simple numbers
    (integers, decimals, ``a/b``, ``\\frac{a}{b}``, mixed ``2\\frac{1}{2}``): exact rational equality when
    both are exact, else relative tolerance ``REL_TOL = 5e-6`` (|g - p| <= 5e-6 * max(|g|, |p|): every
    correct rounding to 6 significant digits passes, roundings to 5 digits or fewer generally do not);
  * otherwise a worker process parses both sides with latex2sympy2_extended and compares them:
    numbers exactly (difference zero at 60 significant digits) unless a decimal is involved (REL_TOL);
    expressions with symbols by evaluation at several fixed random points (identity testing), falling back
    to ``simplify``; ``x = 3`` vs ``3`` by the assignment's right-hand side; equations by proportional
    ``lhs - rhs``; univariate inequalities and intervals as solution sets; finite sets as unordered,
    tuples as ordered; intervals with bracket types respected (``(1,2]`` != ``(1,2)``, and an open
    interval ``(a,b)`` equals the pair ``(a,b)``); matrices element-wise; the symbol ``i`` is the
    imaginary unit.

Timeouts are enforced from outside: checks run in a persistent pool of plain worker subprocesses
(``python -I`` loading this file by path, so only the stdlib, sympy and latex2sympy are imported there,
never torch or the trainer's main module). The parent waits on pipes with a deadline and kills and replaces
a worker that overruns; the check then counts as not equivalent. No signals are used, so it works from
any thread; concurrent callers are served one batch at a time.
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import re
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from fractions import Fraction

REL_TOL = 5e-6
DEFAULT_TIMEOUT = 3.0
WORKER_STARTUP_TIMEOUT = 120.0
WORKER_MEMORY_BYTES = 2 << 30

# ----------------------------------------------------------------------------------------------------
# Extraction


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """Content of the brace group opening at text[start] == '{' and the index after it."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif c == "}" and (i == 0 or text[i - 1] != "\\"):
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
    return None


_BOX = re.compile(r"\\(?:boxed|fbox)\s*(\{|[^\s{\\$])")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)
_ANSWER_IS = re.compile(r"(?:final\s+answer(?:\s+is)?|answer\s+is)\s*:?\s*(.+?)(?:\.(?=\s|$)|\n|$)", re.I)
_HASHES = re.compile(r"####\s*(.+?)\s*(?:\n|$)")


def _boxed_all(text: str) -> list[str]:
    out = []
    for m in _BOX.finditer(text):
        if m.group(1) == "{":
            got = _braced(text, m.start(1))
            if got is not None:
                out.append(got[0].strip())
        else:  # "\boxed 5" form: one token
            out.append(re.match(r"[^\s$]+", text[m.start(1) :]).group(0))
    return [b for b in out if b]


def answer_region(completion: str) -> str:
    """The part of a completion that is graded: after the last ``</think>``, else all of it."""
    return completion.rsplit("</think>", 1)[1] if "</think>" in completion else completion


def extract_answers(text: str) -> list[str]:
    """All final-answer candidates of ``text`` (see the module docstring for the precedence)."""
    boxed = _boxed_all(text)
    if boxed:
        return boxed
    for pattern in (_ANSWER_TAG, _ANSWER_IS, _HASHES):
        found = pattern.findall(text)
        if found:
            return [found[-1].strip(" \t*$")]  # also markdown emphasis: **Final Answer:** 12
    return []


def extract_answer(text: str) -> str | None:
    """The last final-answer candidate of ``text``, or None."""
    found = extract_answers(text)
    return found[-1] if found else None


def _gold_answer(gold: str) -> str:
    """A gold column value may be a bare answer or a solution with a boxed / #### answer."""
    found = extract_answers(gold) if ("\\boxed" in gold or "\\fbox" in gold or "####" in gold) else []
    return found[-1] if found else gold


# ----------------------------------------------------------------------------------------------------
# Normalisation

_UNICODE = {"\u2212": "-", "\u00d7": "\\times ", "\u00f7": "\\div ", "\u03c0": "\\pi ", "\u221e": "\\infty ",
            "\u2264": "\\le ", "\u2265": "\\ge ", "\u00b0": "", "\u221a": "\\sqrt"}
_WRAPPERS = r"(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|mbox|boldsymbol|bm)"
_UNIT_TEXT = re.compile(r"^(?P<v>.*\d.*?)\s*\\" + _WRAPPERS + r"\{\s*[A-Za-z][A-Za-z .]*\}(?:\^\{?\d\}?)?$")
_UNIT_WORDS = re.compile(r"^(?P<v>[-+]?[\d.,/]+)\s*(?:[A-Za-z]{2,}\.?\s*)+(?:\^\{?\d\}?)?$")
_NOT_UNITS = {"pi", "or", "and", "sqrt", "infty"}
_SPACING = re.compile(r"(?<!\\)\\(?:!|,|;|:| |quad\b|qquad\b)|~")
_DELIMS = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|big|Big|bigg|Bigg)(?![A-Za-z])\s*")
_DROP = re.compile(r"\\(?:displaystyle|textstyle|scriptstyle)(?![A-Za-z])|\\\$|\$|\\%|%|\\(?:degree)(?![A-Za-z])"
                   r"|\^\s*\{?\s*\\circ\s*\}?|\^\s*\{\s*\}")
_TEXT_SEP = re.compile(r"\s*\\" + _WRAPPERS + r"\{\s*(?:or|and)\s*\}\s*|\s+(?:or|and)\s+")
_UNWRAP = re.compile(r"\\" + _WRAPPERS + r"\s*\{([^{}]*)\}")
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$|^[-+]?\d{1,3}(?: \d{3})+(?:\.\d+)?$")
_CHOICE = re.compile(r"^\(([A-Za-z])\)$")
_ASSIGN = re.compile(r"^(?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?\w+\}?)?\s*=\s*([^=]+)$")


def normalize(answer: str) -> str:
    """Canonical string form of one answer (the policy is in the module docstring)."""
    s = answer.strip()
    for a, b in _UNICODE.items():
        s = s.replace(a, b)
    s = re.sub(r"^\\[\[(]|\\[\])]$", "", s.strip())
    s = _DROP.sub("", s)
    s = _DELIMS.sub("", s)
    s = _SPACING.sub(" ", s)
    s = re.sub(r"\\[dtc]frac(?![A-Za-z])", r"\\frac", s)
    s = re.sub(r"\\[dt]binom(?![A-Za-z])", r"\\binom", s)
    s = re.sub(r"\\(?:varnothing)(?![A-Za-z])", r"\\emptyset", s)
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*(\d)\s*\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\s*(\{[^{}]*\})\s*(\d)", r"\\frac\1{\2}", s)
    s = re.sub(r"\\sqrt\s*([0-9A-Za-z])", r"\\sqrt{\1}", s)
    s = s.replace("{,}", ",")
    s = " ".join(s.split()).rstrip(".").strip()
    for _ in range(2):
        m = _UNIT_TEXT.match(s)
        if m:
            s = m.group("v").strip()
    m = _UNIT_WORDS.match(s)
    if m and not set(re.findall(r"[A-Za-z]+", s[m.end("v"):].lower())) & _NOT_UNITS:
        s = m.group("v")
    s = _TEXT_SEP.sub(", ", s)
    for _ in range(3):
        s = _UNWRAP.sub(r"\1", s)
    s = " ".join(s.split()).rstrip(".").strip()
    s = re.sub(r"([(\[{])\s+|\s+([)\]}])", lambda m: m.group(1) or m.group(2), s)
    if _THOUSANDS.match(s):
        s = s.replace(",", "").replace(" ", "")
    m = _CHOICE.match(s)
    return m.group(1) if m else s


def _key(s: str) -> str:
    """String-comparison key: no spaces, ``_{8}`` -> ``_8``, letters outside commands lower-cased."""
    s = re.sub(r"(\\[A-Za-z]+)|([A-Z])", lambda m: m.group(1) or m.group(2).lower(), s)
    return re.sub(r"_\{(\w+)\}", r"_\1", s.replace(" ", ""))


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


def _close(a: Fraction, b: Fraction, exact: bool) -> bool:
    return a == b if exact else abs(a - b) <= REL_TOL * max(abs(a), abs(b))


def _fast(gold: str, pred: str) -> bool | None:
    """Decide in-process when cheap (True/False), or None when sympy is needed. Inputs are normalised."""
    if not pred:
        return False
    if _key(gold) == _key(pred):
        return True
    if "=" in gold and "=" not in pred and (m := _ASSIGN.match(gold)):
        gold = m.group(1).strip()
    elif "=" in pred and "=" not in gold and (m := _ASSIGN.match(pred)):
        pred = m.group(1).strip()
    if _key(gold) == _key(pred):
        return True
    if _BASE_NUMBER.search(gold) or _BASE_NUMBER.search(pred):
        return False
    g, p = _simple_number(gold), _simple_number(pred)
    if g is not None and p is not None:
        return _close(g[0], p[0], g[1] and p[1])
    return None


# ----------------------------------------------------------------------------------------------------
# Sympy comparison (runs inside worker processes only)

_PROBE_POINTS = [0.5377, 1.8339, -2.2588, 0.8622, 0.3188]
_POINTS_NEEDED = 3
_WARMUP = [(r"\frac{1}{2}", "x + 1"), ("(1, 2]", "[1, 2)"), (r"\{1, 2\}", "2, 1"), ("x < 3", r"(-\infty, 3)"),
           (r"\sqrt{2}", "1.414214"), ("y = 2x + 1", "2x - y + 1 = 0"), (r"\begin{pmatrix}1\\2\end{pmatrix}", "(1, 2)")]


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

    expr = _latex2sympy(s)
    i = Symbol("i")
    if isinstance(expr, MatrixBase):
        return expr.applyfunc(lambda e: e.xreplace({i: I}))
    return expr.xreplace({i: I}) if hasattr(expr, "xreplace") else expr


def _sympy_equal(gold: str, pred: str) -> bool:
    """Worker-side check of two normalised answers; an unparsable side is not equivalent."""
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


def _equal(g, p) -> bool:
    from sympy import Expr, MatrixBase, Set, Tuple

    try:
        if g == p:
            return True
    except Exception:
        pass
    ga, pa = _assignment(g), _assignment(p)
    if ga and pa:
        return ga[0] == pa[0] and _equal(ga[1], pa[1])
    if ga and not _is_relation(p):
        return _equal(ga[1], p)
    if pa and not _is_relation(g):
        return _equal(g, pa[1])
    if _is_relation(g) and _is_relation(p):
        return _relations_equal(g, p)
    if _is_relation(g) and isinstance(p, Set):
        return _equal(_as_set(g), p)
    if _is_relation(p) and isinstance(g, Set):
        return _equal(g, _as_set(p))
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
            return diff <= REL_TOL * scale
        if diff <= 1e-40 * scale:
            return True
        return diff <= 1e-12 * scale and _simplify_zero(d, simplify)
    tol = REL_TOL if inexact else 1e-12
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
            gold, pred = json.loads(line)
            ok = _sympy_equal(gold, pred)
        except (Exception, MemoryError, RecursionError):
            ok = False
        out.write("1\n" if ok else "0\n")
        out.flush()


# ----------------------------------------------------------------------------------------------------
# Worker pool (parent side)

_BOOT = (
    "import importlib.util as u, sys; s = u.spec_from_file_location('_rewards_math_worker', sys.argv[1]); "
    "m = u.module_from_spec(s); s.loader.exec_module(m); m._worker_main()"
)


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
        self.task: int | None = None
        self.deadline = 0.0

    def send(self, task: int, gold: str, pred: str, timeout: float) -> bool:
        try:
            self.proc.stdin.write((json.dumps([gold, pred]) + "\n").encode())
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


class VerifierPool:
    """A persistent pool of sympy worker subprocesses with per-check wall-clock deadlines.

    Workers start lazily on the first call. A worker that overruns its check's deadline is killed and
    replaced (the check is not equivalent); one that dies mid-check likewise. Thread-safe: concurrent
    ``run`` calls are served one at a time.
    """

    def __init__(self, size: int | None = None):
        self.size = size or _default_size()
        self.pid = os.getpid()
        self.workers: list[_Worker] = []
        self.lock = threading.Lock()
        self.timeouts = 0

    def run(self, pairs: list[tuple[str, str]], timeout: float = DEFAULT_TIMEOUT) -> list[bool]:
        """Equivalence of each normalised (gold, pred) pair, each check limited to ``timeout`` seconds."""
        if timeout <= 0:
            raise ValueError(f"math verification timeout must be > 0 seconds, got {timeout}")
        results: list[bool | None] = [None] * len(pairs)
        with self.lock:
            pending = deque(range(len(pairs)))
            try:
                while pending or any(w.task is not None for w in self.workers):
                    while len(self.workers) < min(self.size, max(1, len(pending) + self._busy())):
                        self.workers.append(_Worker())
                    for w in self.workers:
                        if w.ready and w.task is None and pending:
                            i = pending.popleft()
                            if not w.send(i, *pairs[i], timeout):
                                pending.appendleft(i)
                    self._wait(results)
            except BaseException:  # e.g. KeyboardInterrupt: no worker may keep a task of this batch
                for w in list(self.workers):
                    self._drop(w)
                raise
        return results  # type: ignore[return-value]

    def _busy(self) -> int:
        return sum(w.task is not None for w in self.workers)

    def _wait(self, results: list) -> None:
        now = time.monotonic()
        deadlines = [w.deadline if w.task is not None else w.started + WORKER_STARTUP_TIMEOUT
                     for w in self.workers if w.task is not None or not w.ready]
        wait = max(0.0, min(deadlines) - now) if deadlines else 0.0
        poller = select.poll()  # not select.select: the trainer may hold fds above FD_SETSIZE
        for w in self.workers:
            poller.register(w.fd, select.POLLIN)
        readable = {fd for fd, _ in poller.poll(wait * 1000)}
        for w in list(self.workers):
            if w.fd in readable:
                lines = w.read_lines()
                if lines is None:
                    self._died(w, results)
                    continue
                for line in lines:
                    if line == "ready":
                        w.ready = True
                    elif w.task is not None:
                        results[w.task] = line == "1"
                        w.task = None
        now = time.monotonic()
        for w in list(self.workers):
            if w.task is not None and now >= w.deadline:
                results[w.task] = False
                self.timeouts += 1
                self._drop(w)
                self.workers.append(_Worker())  # warm the replacement now, not on the next call
            elif not w.ready and now >= w.started + WORKER_STARTUP_TIMEOUT:
                tail = w.stderr_tail()
                self._drop(w)
                raise RuntimeError(f"math verification worker did not start within {WORKER_STARTUP_TIMEOUT:.0f}s "
                                   f"(needs sympy and latex2sympy2_extended in {sys.executable}); stderr:\n{tail}")

    def _died(self, w: _Worker, results: list) -> None:
        if not w.ready:
            tail = w.stderr_tail()
            self._drop(w)
            raise RuntimeError(f"math verification worker exited during start-up (needs sympy and "
                               f"latex2sympy2_extended in {sys.executable}); stderr:\n{tail}")
        if w.task is not None:
            results[w.task] = False
        self._drop(w)

    def _drop(self, w: _Worker) -> None:
        w.kill()
        self.workers.remove(w)

    def close(self) -> None:
        if os.getpid() != self.pid:
            return
        with self.lock:
            for w in list(self.workers):
                self._drop(w)


_POOL: VerifierPool | None = None
_POOL_LOCK = threading.Lock()
_CACHE: dict[tuple[str, str], bool] = {}
_CACHE_MAX = 200_000


def get_pool() -> VerifierPool:
    """The process-wide verifier pool (created on first use, sized to the usable CPU cores).

    A forked child (e.g. a data-loader worker) gets a pool of its own; the parent's workers stay the parent's."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.pid != os.getpid():
            _POOL = VerifierPool()
            atexit.register(_POOL.close)
        return _POOL


def verify_batch(golds: list[str], preds: list[str], timeout: float = DEFAULT_TIMEOUT, cache: bool = True,
                 pool: VerifierPool | None = None) -> list[bool]:
    """Equivalence of each (gold, pred) answer pair; sympy work is spread over the worker pool.

    Answers may carry ``\\boxed{}`` / ``$`` / ``####``; cheap cases are decided in-process; identical
    pairs are checked once (and remembered across calls when ``cache``). ``pool`` defaults to ``get_pool()``.
    """
    if len(golds) != len(preds):
        raise ValueError(f"verify_batch: {len(golds)} golds but {len(preds)} preds")
    pairs = [(normalize(_gold_answer(g)), normalize(_gold_answer(p))) for g, p in zip(golds, preds)]
    decided: dict[tuple[str, str], bool] = {}
    todo: dict[tuple[str, str], None] = {}  # insertion-ordered set
    for pair in pairs:
        if pair in decided or pair in todo:
            continue
        if cache and pair in _CACHE:
            decided[pair] = _CACHE[pair]
        elif (fast := _fast(*pair)) is not None:
            decided[pair] = fast
        else:
            todo[pair] = None
    if todo:
        checked = dict(zip(todo, (pool or get_pool()).run(list(todo), timeout)))
        decided.update(checked)
        if cache:
            if len(_CACHE) > _CACHE_MAX:
                _CACHE.clear()
            _CACHE.update(checked)
    return [decided[pair] for pair in pairs]


def is_equivalent(gold: str, pred: str, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Whether answer ``pred`` is mathematically equivalent to ``gold`` (both LaTeX answer strings)."""
    return verify_batch([gold], [pred], timeout)[0]


def correctness(completions: list[str], answer: list[str | None] | None,
                timeout: float = DEFAULT_TIMEOUT) -> list[bool | None]:
    """Per completion: all its distinct final answers equal the gold (None where the gold is missing)."""
    if answer is None:
        raise ValueError("accuracy needs the dataset column 'answer' (gold answers; None for rows without one)")
    if len(answer) != len(completions):
        raise ValueError(f"accuracy: column 'answer' has {len(answer)} values for {len(completions)} completions")
    golds, preds, owner = [], [], []
    out: list[bool | None] = [None] * len(completions)
    for i, (completion, gold) in enumerate(zip(completions, answer)):
        if gold is None or not str(gold).strip():
            continue
        out[i] = False
        distinct = {_key(normalize(a)): a for a in extract_answers(answer_region(completion))}
        for pred in distinct.values():
            golds.append(str(gold))
            preds.append(pred)
            owner.append(i)
    verdicts = verify_batch(golds, preds, timeout) if golds else []
    per_row: dict[int, list[bool]] = {}
    for i, ok in zip(owner, verdicts):
        per_row.setdefault(i, []).append(ok)
    for i, oks in per_row.items():
        out[i] = all(oks)
    return out


def accuracy(prompts: list[str], completions: list[str], answer: list[str | None] | None = None,
             timeout: float = DEFAULT_TIMEOUT, **_) -> list[float | None]:
    """1.0 if the completion's final answer is equivalent to the row's ``answer``, else 0.0; None without gold."""
    return [None if ok is None else float(ok) for ok in correctness(completions, answer, timeout)]
