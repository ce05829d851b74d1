"""Final-answer extraction from model completions and dataset answer fields (pure Python, no sympy).

``final_answers(text)`` returns the candidate answer strings of a text, found by the first rule that
applies, in this order (a text with several ``</think>`` is graded after the last one; one that opens
``<think>`` and never closes it has no answer):

  0. a *bare answer*: the text is a formula with no running prose (``17``, ``x = 5``, ``(1, 2]``,
     ``3 \\text{ or } 4``, ``5 km²``): the whole text;
  1. every ``\\boxed{..}`` / ``\\fbox{..}`` (braces matched; ``\\boxed 5``): all of them, in order; a box whose
     content is prose is read with the rules below (``\\boxed{\\text{The answer is } 5}`` -> ``5``);
  2. the last ``<answer>..</answer>``, its content read with the rules below;
  3. the last answer phrase: "final answer", "the answer is/are", "answer:", "the correct option is"
     (markdown emphasis allowed),
     then what follows up to the end of that sentence, read as a *fragment* (below);
  4. the last GSM8K-style ``#### X``;
  5. (a trailing remark in parentheses with prose is dropped first: ``x = -1 (the other root is extraneous)``)
     the value a main clause states when the last span sits in a subordinate clause after it (``The minimum
     value is 4, attained when $x = 2$.`` -> ``4``); else
     the last math span (``$..$``, ``$$..$$``, ``\\(..\\)``, ``\\[..\\]``, the last line of an align or
     equation environment) that is not a lone variable (``... values of $k$.``), joined with the spans of
     the same kind before it that a comma, "and" or "or" separates (``$x = 1$ and $y = 2$`` -> ``x = 1, y = 2``;
     ``$3$ and $5$`` -> ``3, 5``);
     A number after the last span that follows "is" wins over it (``the remainder when $2^{100}$ is divided by 7
     is 5.`` -> ``5``; ``so the smallest $k$ is 17.`` -> ``17``);
  6. the last number (``-12``, ``3.5``, ``1,000``, ``3/4``, ``25%``, ``3:8``, ``5km``): the formula that ends its
     sentence when that is more than the number (``we get x = 3 and y = -1.``, ``the values are 1, 2, and 3.``,
     ``It takes 2 1/2 hours.``), else the number right after the sentence's last ``=`` (``9 + 6 = 15 liters out
     of the 24`` -> ``15``), else the number;
  7. a leading "yes" / "no" (``Yes, it is possible.``); else one or two words, after the last "is" of the last
     sentence if it has one (``Monday``, ``The function is even.`` -> ``even``).

A fragment (what follows an answer phrase, or the content of ``<answer>``) is read as: a leading math span
group; else its leading formula (up to the first prose word: ``17 apples, since ..`` -> ``17``); else, when it
opens with prose, what follows its last "is / are / equals / =" (``the smallest $k$ is 17`` -> ``17``); else
every number it holds, as one list (``probably 3, maybe 4`` -> ``3, 4``, which no single gold equals).

Only the last ``MAX_REGION_CHARS`` (20,000) characters of the region are read, in time linear in their length;
Asymptote figures (``[asy]..[/asy]``), GSM8K calculator notes (``<<9*2=18>>``) and markdown emphasis
(``**12**``) are removed first. The checker (``rewards.math``) splits an answer ``A or B`` into alternatives.
Rules 1-7 never look inside the reasoning before ``</think>``. Dataset gold fields use the same function
(``$x = 11$`` -> ``x = 11``; ``\\boxed{1}\\boxed{2}`` -> two candidates the checker joins into one list).
"""
from __future__ import annotations

import re

# words a formula may contain without being prose: connectives, constants, function names, common units
_MATH_WORDS = {
    "and", "or", "sqrt", "pi", "inf", "infty", "infinity", "log", "ln", "sin", "cos", "tan", "cot", "sec", "csc",
    "exp", "mod", "gcd", "lcm", "min", "max", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh", "det", "deg",
    "cm", "mm", "km", "kg", "mg", "ml", "mph", "kmh", "sec", "min", "hr", "hrs", "ft", "yd", "mi", "lb", "lbs",
    "oz", "usd", "eur", "gbp", "inr", "rs", "sq", "cu",
}
# short English words that end a formula: "17 of them", "5 is"
_STOP_SHORT = {"of", "is", "to", "an", "at", "by", "if", "so", "we", "it", "on", "as", "be", "are", "was", "the"}
_COMMAND = re.compile(r"\\[A-Za-z]+")
_TEXT_GROUP = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|mbox|operatorname)\s*\{[^{}]*\}")
_WORD = re.compile(r"[A-Za-z]+")
_ENVIRON = re.compile(r"\\(?:begin|end)\s*\{[A-Za-z*]+\}")
_UNWRAP_TEXT = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mbox)\s*\{([^{}]*)\}")

MAX_REGION_CHARS = 20_000  # only the end of a longer answer region is read (the final answer is at its end)
_BOX = re.compile(r"\\(?:boxed|fbox)\s*(\{|[^\s{\\$])")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)
_PHRASE = re.compile(
    r"(?:\bfinal\s+answers?\b(?:\s+(?:is|are|would\s+be|will\s+be))?|\bthe\s+answers?\s+(?:is|are|would\s+be|will\s+be)\b"
    r"|\bcorrect\s+(?:option|choice)\s+is\b"
    r"|\banswers?\s+(?:is|are)\b|\banswers?\s*(?=[*_]*\s*[:=]))[\s*_#:=]*", re.I)
_HASHES = re.compile(r"####\s*(.+?)\s*(?:\n|$)")
_ENV = r"(?:align|equation|gather|eqnarray|multline|displaymath|math)\*?"
_ENV_OPEN = re.compile(r"\\begin\{(" + _ENV + r")\}")
_NOISE = re.compile(r"\[asy\].*?\[/asy\]", re.S)  # Asymptote figures
_CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K calculator notes
_BOLD = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*|__(?=\S)(.+?)(?<=\S)__")  # markdown emphasis
ATTACHED_UNITS = ("km", "kg", "cm", "mm", "mg", "ml", "mL", "m", "g", "s", "h", "L", "min", "sec", "hr", "hrs", "mph",
                  "kmh", "ft", "yd", "mi", "lb", "lbs", "oz")  # units written against a number: 5km, 12kg
_NUMBER = re.compile(r"(?<![\w.^_])[-\u2212]?\d+(?:,\d{3}|(?<=\d) \d{3}(?!\d))*(?:\.\d+)?(?:/\d+|:\d+)?"
                     r"(?:\s?\\?%)?(?:(?![\w^])|(?=(?:" + "|".join(ATTACHED_UNITS) + r")(?:\^?[23²³])?\b))")
_JOINER = re.compile(r"^\s*(?:,|;|\band\b|\bor\b|,\s*and\b|,\s*or\b)\s*$", re.I)
_LONE_VARIABLE = re.compile(r"^(?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?\w+\}?)?(?:\([A-Za-z]\))?$")
_NEGATION = re.compile(r"\b(?:not|no|never|isn't|cannot|can't|wrong|incorrect)\b", re.I)
_COPULA = re.compile(r"\b(?:is|are|equals|equal\s+to|was|were|be|becomes|gives)\b|=", re.I)


def answer_region(completion: str) -> str:
    """The part of a completion that is graded: after the last ``</think>``; nothing when a ``<think>`` is never
    closed (the completion was cut in its reasoning); else all of it."""
    if "</think>" in completion:
        return completion.rsplit("</think>", 1)[1]
    return "" if "<think>" in completion else completion


def braced(text: str, start: int) -> tuple[str, int] | None:
    """Content of the brace group opening at text[start] == '{' and the index after it (None: unbalanced)."""
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


def _brace_pairs(text: str) -> dict[int, int]:
    """Index of each unescaped '{' -> index of its matching '}' (one pass; unbalanced ones are left out)."""
    pairs, stack = {}, []
    for i, c in enumerate(text):
        if c in "{}" and (i == 0 or text[i - 1] != "\\"):
            if c == "{":
                stack.append(i)
            elif stack:
                pairs[stack.pop()] = i
    return pairs


def boxed_all(text: str) -> list[str]:
    """Contents of every ``\\boxed{}`` / ``\\fbox{}`` of ``text`` in order (empty or unbalanced ones skipped)."""
    out, pairs = [], None
    for m in _BOX.finditer(text):
        if m.group(1) == "{":
            pairs = _brace_pairs(text) if pairs is None else pairs
            close = pairs.get(m.start(1))
            if close is not None:
                out.append(text[m.start(1) + 1:close].strip())
        else:  # "\boxed 5": one token
            out.append(re.match(r"[^\s$]+", text[m.start(1):]).group(0))
    return [b for b in out if b]


def _prose_words(s: str) -> list[str]:
    """Words of ``s`` that are prose: outside LaTeX commands and \\text{}, 3+ letters, not math/unit words."""
    s = _COMMAND.sub(" ", _TEXT_GROUP.sub(" ", _ENVIRON.sub(" ", s)))
    return [w for w in _WORD.findall(s) if (len(w) >= 3 and w.lower() not in _MATH_WORDS and not w.isupper())
            or w.lower() in _STOP_SHORT]


def is_bare(text: str) -> bool:
    """Whether ``text`` is a formula with no prose, no math delimiters and no answer markers."""
    s = text.strip()
    if not s or "\n\n" in s or len(s) > 2000:
        return False
    if re.search(r"\\boxed|\\fbox|<answer>|</think>|####|(?<!\\)\$|\\\(|\\\[", s):
        return False
    return not _prose_words(s)


class _Span:
    """One math span: text[start:end], its formula, and whether single ``$`` delimit it."""

    __slots__ = ("a", "b", "content", "dollar")

    def __init__(self, a: int, b: int, content: str, dollar: bool = False):
        self.a, self.b, self.content, self.dollar = a, b, content, dollar

    def start(self) -> int:
        return self.a

    def end(self) -> int:
        return self.b


def _all_spans(text: str) -> list[_Span]:
    """Every delimited formula of ``text`` in order. ``$`` is read as TeX reads it: ``$x,$$y,$`` is two inline
    formulas, ``$$..$$`` outside one is display math, ``\\$`` is a dollar sign."""
    found: list[_Span] = []
    i, n = 0, len(text)
    unclosed: set[str] = set()  # closers not found after some point: not searched for again (linear time)
    while i < n:
        got = _delimited(text, i, unclosed) if text[i] == "\\" else None
        if got:
            found.append(got)
            i = got.b
            continue
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == "$":
            display = text.startswith("$$", i)
            close = _closing_dollar(text, i + (2 if display else 1), display)
            if close < 0:
                i += 1
                continue
            inner = text[i + (2 if display else 1):close]
            end = close + (2 if display else 1)
            found.append(_Span(i, end, _clean(inner), dollar=not display))
            i = end
            continue
        i += 1
    return found


def _delimited(text: str, i: int, unclosed: set[str]) -> _Span | None:
    """The ``\\[..\\]``, ``\\(..\\)`` or math environment opening at text[i], if it closes."""
    two = text[i:i + 2]
    if two in ("\\[", "\\("):
        closer = "\\]" if two == "\\[" else "\\)"
        j = -1 if closer in unclosed else text.find(closer, i + 2)
        if j < 0:
            unclosed.add(closer)
            return None
        return _Span(i, j + 2, _clean(text[i + 2:j]))
    m = _ENV_OPEN.match(text, i)
    if not m:
        return None
    closer = f"\\end{{{m.group(1)}}}"
    j = -1 if closer in unclosed else text.find(closer, m.end())
    if j < 0:
        unclosed.add(closer)
        return None
    return _Span(i, j + len(closer), _environment_formula(text[m.end():j]))


def _closing_dollar(text: str, j: int, display: bool) -> int:
    """Index of the ``$`` (or ``$$``) closing a formula whose content starts at ``j``; -1 if none."""
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c == "$":
            if not display:
                return j
            return j if text.startswith("$$", j) else -1
        j += 1
    return -1


def _clean(content: str) -> str:
    return content.strip().rstrip(".,;").strip()


def _environment_formula(body: str) -> str:
    """An align / equation environment's last line, without alignment marks (``&= 3\\sqrt{13}.``)."""
    lines = [ln for ln in _top_lines(body) if ln.strip()]
    last = re.sub(r"\\(?:nonumber|notag|tag\{[^{}]*\}|label\{[^{}]*\})", "", lines[-1] if lines else "")
    return _clean(_outside_environments(last, lambda part: part.replace("&", "")))


def _outside_environments(text: str, fn) -> str:
    """``fn`` applied to the parts of ``text`` outside ``\\begin{..}..\\end{..}`` blocks (matrices keep their ``&``)."""
    out, depth, start, i = [], 0, 0, 0
    while i < len(text):
        if text.startswith("\\begin{", i):
            if depth == 0:
                out.append(fn(text[start:i]))
                start = i
            depth += 1
        elif text.startswith("\\end{", i) and depth:
            depth -= 1
            if depth == 0:
                close = text.find("}", i)
                i = close + 1 if close >= 0 else len(text)
                out.append(text[start:i])
                start = i
                continue
        i += 1
    out.append(fn(text[start:]) if depth == 0 else text[start:])
    return "".join(out)


def _top_lines(body: str) -> list[str]:
    """``body`` split at the ``\\\\`` line breaks that no inner environment (a matrix) holds."""
    lines, depth, start, i = [], 0, 0, 0
    while i < len(body):
        if body.startswith("\\begin{", i):
            depth += 1
        elif body.startswith("\\end{", i):
            depth = max(0, depth - 1)
        elif body.startswith("\\\\", i) and depth == 0:
            lines.append(body[start:i])
            i += 2
            start = i
            continue
        i += 2 if body[i] == "\\" else 1
    lines.append(body[start:])
    return lines


def _spans(text: str) -> list[_Span]:
    """Math spans of ``text``: ``$..$``, ``$$..$$``, ``\\(..\\)``, ``\\[..\\]`` and align/equation environments.

    A ``$`` pair around prose, or around a number that opens an amount (``$5 and $6``, ``$840+$756``), is
    currency, not a span."""
    out = []
    for sp in _all_spans(text):
        prose = _prose_words(sp.content)  # a "$" pair around prose is currency; short words are variables (abc)
        if not sp.content or len(prose) >= 2 or any(len(w) >= 5 or w.lower() in _STOP_SHORT for w in prose):
            continue
        raw = text[sp.a + 1:sp.b - 1]
        if sp.dollar and raw[:1].isdigit() and (raw[-1:].isspace() or text[sp.b:sp.b + 1].isdigit()):
            continue
        if sp.dollar and (sp.content[-1:] in "=+-*/" or sp.content[:1] in "=*/"):  # "$15*13=$": two amounts
            continue
        out.append(sp)
    return out


def _span_content(sp: _Span) -> str:
    return sp.content


def _kind(content: str) -> str:
    """'assignment' (``x = 1``), 'value' (no letters: ``3``, ``\\frac{1}{2}``) or 'other': spans join only within
    one of the first two kinds."""
    sides = content.split("=")
    if len(sides) == 2 and re.fullmatch(r"\s*(?:\\angle\s*)?(?:[A-Za-z]{1,3}|\\[A-Za-z]+)(?:_\{?\w+\}?)?(?:\([a-z]\))?\s*",
                                        sides[0]):
        return "assignment"
    if "=" not in content and not re.search(r"[A-Za-z]", re.sub(r"\\[A-Za-z]+", "", content)):
        return "value"
    return "other"


def _span_group(text: str, spans: list[re.Match], last: int, forward: bool = False) -> str:
    """Span ``last`` joined with its neighbours of the same kind that a comma / "and" / "or" separates (the spans
    before it, or with ``forward`` the spans after it): ``$x = 1$ and $y = 2$`` -> ``x = 1, y = 2``."""
    kind = _kind(_span_content(spans[last]))
    first = end = last
    if kind != "other":
        if forward:
            while end + 1 < len(spans) and _kind(_span_content(spans[end + 1])) == kind and _JOINER.match(
                    text[spans[end].end():spans[end + 1].start()]):
                end += 1
        else:
            while first > 0 and _kind(_span_content(spans[first - 1])) == kind and _JOINER.match(
                    text[spans[first - 1].end():spans[first].start()]):
                first -= 1
    return ", ".join(_span_content(m) for m in spans[first:end + 1])


def _sentence_end(text: str) -> int:
    """Index where the sentence starting at text[0] ends: '.', '!' or '?' followed by space or end (outside math
    spans and braces), or a line break after some text; math spans are skipped whole."""
    spans = {sp.a: sp.b for sp in _all_spans(text)}
    i, depth, seen = 0, 0, False
    while i < len(text):
        if i in spans:
            i, seen = spans[i], True
            continue
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth = max(0, depth - 1)
        elif depth == 0 and c in ".!?" and (i + 1 == len(text) or text[i + 1].isspace()):
            if not (c == "." and i > 0 and text[i - 1].isdigit() and i + 1 < len(text) and text[i + 1].isdigit()):
                return i
        elif c == "\n" and seen:
            return i
        seen = seen or not c.isspace()
        i += 1
    return len(text)


def _leading_formula(s: str) -> str:
    """The formula at the start of ``s``, up to the first prose word (trailing punctuation dropped)."""
    out = []
    for tok in re.split(r"(\s+)", s):
        if tok.strip() and _prose_words(tok.strip(",.;:!?()")) and not tok.strip().startswith("\\"):
            break
        out.append(tok)
    return "".join(out).strip().rstrip(",.;:!?").strip()


def read_fragment(fragment: str) -> str | None:
    """The answer in a short piece of text that follows an answer phrase (see the module docstring)."""
    s = fragment.strip().strip("*_").strip()
    s = re.sub(r"^[:=\s*_]+", "", s)
    if not s:
        return None
    spans = _spans(s)
    if spans and not s[:spans[0].start()].strip(" *_:"):
        return _span_group(s, spans, 0, forward=True)
    lead = _leading_formula(s)
    if lead and not re.fullmatch(r"[\W_]*", lead):
        return lead
    copulas = [m for m in _COPULA.finditer(s) if not any(sp.start() <= m.start() < sp.end() for sp in spans)]
    if copulas:
        tail = s[copulas[-1].end():]
        got = read_fragment(tail) if tail.strip() else None
        if got:
            return got
    if spans:
        return _span_group(s, spans, len(spans) - 1)
    if _NEGATION.search(s):  # "not 5": no answer rather than the number it denies
        return None
    numbers = [m.group(0) for m in _NUMBER.finditer(s)]
    return ", ".join(numbers) if numbers else None


def _last_number(region: str, numbers: list[re.Match]) -> str:
    """The answer that the last number of ``region`` belongs to: the formula that ends its sentence when it is
    more than the number (``we get x = 3 and y = -1``, ``values are 1, 2, and 3``, ``takes 2 1/2 hours``), else
    the number right after the sentence's last ``=`` (``9 + 6 = 15 liters out of the 24 liters`` -> 15), else
    the last number."""
    last = numbers[-1]
    start = max(max(region.rfind(c, 0, last.start()) for c in (". ", ".\n", "\n", "! ", "? ")), -1) + 1
    run = _trailing_formula(region[start:last.end() + _sentence_end(region[last.end():])])
    if run and run.strip() != last.group(0) and last.group(0) in run:
        return run
    equals = region.rfind("=", start, last.start())
    if equals >= 0:
        after = [m for m in numbers if m.start() > equals and not region[equals + 1:m.start()].strip(" $")]
        if after:
            return after[0].group(0)
    return last.group(0)


_RUN_STOP = {"a", "in", "at", "for", "per", "each", "than", "from", "with", "after", "over", "into", "by"}


def _trailing_formula(sentence: str, copula_before: bool = False, drop: int = 3) -> str | None:
    """The formula that ends ``sentence``, after dropping up to ``drop`` trailing prose words (units, "in total");
    with ``copula_before`` only when "is / are / equals / =" comes right before it."""
    tokens = sentence.strip().rstrip(".!?;:,").split()
    dropped = 0
    while tokens and dropped < drop and (_prose_words(tokens[-1].strip(",.;:!?()"))
                                       or tokens[-1].lower() in ("a", "in", "per", "each")):
        tokens.pop()
        dropped += 1
    run: list[str] = []
    while tokens and len(run) < 200 and not _prose_words(tokens[-1].strip(",.;:!?()")) and tokens[-1].lower() not in _RUN_STOP:
        run.append(tokens.pop())
    run.reverse()
    while run and run[0].lower().strip(",") in ("and", "or", ",", "="):
        run.pop(0)
    if not run or not re.search(r"\d", " ".join(run)):
        return None
    if copula_before and not (tokens and re.fullmatch(r"(?:is|are|equals|was|be)", tokens[-1].lower())):
        return None
    return " ".join(run).strip(",;: ")


_TRAILING_REMARK = re.compile(r"\s*(?<!\\)\((?=[^()]*(?<![\\A-Za-z])[A-Za-z]{3})[^()]*(?<!\\)\)[\s.]*$")
_SUBORDINATE = re.compile(r",?\s*\b(?:when|where|whenever|if|since|because|attained|achieved|reached|occurring)\b", re.I)


def _main_clause_answer(region: str, last: _Span) -> str | None:
    """In ``The minimum value is 4, attained when $x = 2$.``, the value the main clause states (4) rather than the
    last span, which a subordinate clause holds."""
    start = max(max(region.rfind(c, 0, last.start()) for c in (". ", ".\n", "\n", "! ", "? ")), -1) + 1
    sentence = region[start:last.start()]
    clause = _SUBORDINATE.search(sentence)
    if not clause or not re.search(r"\b(?:is|are|equals|was)\b", sentence[:clause.start()], re.I):
        return None
    main = sentence[:clause.start()]
    run = _trailing_formula(main, copula_before=True, drop=0)
    if not run:
        return None
    spans = _spans(run)
    return _span_group(run, spans, len(spans) - 1) if spans else run


def final_answers(text: str) -> list[str]:
    """All final-answer candidates of ``text`` by the first rule that applies (module docstring); [] if none."""
    region = _CALCULATOR.sub("", _NOISE.sub(" ", answer_region(text)[-MAX_REGION_CHARS:]))
    region = _BOLD.sub(lambda m: m.group(1) or m.group(2), region).strip()  # markdown **12**
    if not region:
        return []
    if is_bare(region):
        return [region]
    if _BOX.search(region):  # boxes decide; empty or unbalanced ones (a truncated completion) give no answer
        out = []
        for b in boxed_all(region):
            plain = _UNWRAP_TEXT.sub(r" \1 ", b)
            out.append((read_fragment(plain) or b) if _prose_words(plain) else b)
        return out
    tags = _ANSWER_TAG.findall(region)
    if tags:
        inner = tags[-1].strip()
        got = [inner] if is_bare(inner) else final_answers(inner) if inner else []
        return got
    phrases = list(_PHRASE.finditer(region))
    for m in reversed(phrases[-5:]):
        rest = region[m.end():m.end() + 2000]
        got = read_fragment(rest[:_sentence_end(rest)])
        if got:
            return [got]
    hashes = _HASHES.findall(region)
    if hashes:
        return [hashes[-1].strip(" \t*$")]
    region = _TRAILING_REMARK.sub("", region)  # "x = -1 (the other root x = 3 is extraneous)."
    spans = _spans(region)
    numbers = list(_NUMBER.finditer(region))
    if spans and (main := _main_clause_answer(region, spans[-1])):
        return [main]
    if spans:
        last = len(spans) - 1
        after = [m for m in numbers if m.start() >= spans[last].end()]
        if after and (_LONE_VARIABLE.match(spans[last].content)  # "so the smallest $k$ is 17."
                      or _trailing_formula(region[spans[last].end():], copula_before=True)):  # "$2^{100}$ .. is 5."
            return [_last_number(region, after)]
        while last > 0 and _LONE_VARIABLE.match(spans[last].content):  # "... values of $k$ satisfy it."
            last -= 1
        return [_span_group(region, spans, last)]
    if numbers:
        return [_last_number(region, numbers)]
    if m := re.match(r"\W*(yes|no)\b(?=\s*[,.!;]|\s*$)", region, re.I):  # "Yes, it is possible."
        return [m.group(1)]
    sentence = re.split(r"(?<=[.!?])\s+|\n", region.strip())[-1]
    copulas = list(_COPULA.finditer(sentence))  # "The function is even." -> even
    tail = sentence[copulas[-1].end():] if copulas else sentence
    return [w] if (w := _few_words(tail)) else []


def _few_words(text: str) -> str | None:
    """``text`` when it is one or two plain words (``even``, ``Monday``), else None."""
    words = text.strip(" .!*_").split()
    return " ".join(words) if 0 < len(words) <= 2 and re.fullmatch(r"[A-Za-z][A-Za-z' -]*", " ".join(words)) else None
