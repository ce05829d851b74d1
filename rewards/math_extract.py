"""Final-answer extraction from model completions and dataset answer fields (pure Python, no sympy).

``final_answers(text)`` returns the candidate answer strings of a text, found by the first rule that
applies, in this order (a text with several ``</think>`` is graded after the last one):

  0. a *bare answer*: the text is a formula with no running prose (``17``, ``x = 5``, ``(1, 2]``,
     ``3 \\text{ or } 4``, ``5 km²``): the whole text;
  1. every ``\\boxed{..}`` / ``\\fbox{..}`` (braces matched; ``\\boxed 5``): all of them, in order; a box whose
     content is prose is read with the rules below (``\\boxed{\\text{The answer is } 5}`` -> ``5``);
  2. the last ``<answer>..</answer>``, its content read with the rules below;
  3. the last answer phrase: "final answer", "the answer is/are", "answer:" (markdown emphasis allowed),
     then what follows up to the end of that sentence, read as a *fragment* (below);
  4. the last GSM8K-style ``#### X``;
  5. the last math span (``$..$``, ``$$..$$``, ``\\(..\\)``, ``\\[..\\]``), joined with the spans before it
     that only a comma, "and" or "or" separates (``$x = 1$ and $y = 2$`` -> ``x = 1, y = 2``);
  6. the last number (``-12``, ``3.5``, ``1,000``, ``3/4``);
  7. a text of at most two words with none of the above (``Monday``): the text.

A fragment (what follows an answer phrase, or the content of ``<answer>``) is read as: a leading math span
group; else its leading formula (up to the first prose word: ``17 apples, since ..`` -> ``17``); else, when it
opens with prose, what follows its last "is / are / equals / =" (``the smallest $k$ is 17`` -> ``17``); else
every number it holds, as one list (``probably 3, maybe 4`` -> ``3, 4``, which no single gold equals).

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

_BOX = re.compile(r"\\(?:boxed|fbox)\s*(\{|[^\s{\\$])")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)
_PHRASE = re.compile(
    r"(?:\bfinal\s+answers?\b(?:\s+(?:is|are|would\s+be|will\s+be))?|\bthe\s+answers?\s+(?:is|are|would\s+be|will\s+be)\b"
    r"|\banswers?\s+(?:is|are)\b|\banswers?\s*(?=[*_]*\s*[:=]))[\s*_#:=]*", re.I)
_HASHES = re.compile(r"####\s*(.+?)\s*(?:\n|$)")
_SPAN = re.compile(r"\$\$(.+?)\$\$|\\\[(.+?)\\\]|\\\((.+?)\\\)|(?<![\\$])\$(?!\$)((?:\\\$|[^$])+?)(?<!\\)\$", re.S)
_NUMBER = re.compile(r"(?<![\w.^_])[-\u2212]?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?(?![\w^])")
_JOINER = re.compile(r"^\s*(?:,|;|\band\b|\bor\b|,\s*and\b|,\s*or\b)?\s*$", re.I)
_NEGATION = re.compile(r"\b(?:not|no|never|isn't|cannot|can't|wrong|incorrect)\b", re.I)
_COPULA = re.compile(r"\b(?:is|are|equals|equal\s+to|was|were|be|becomes|gives)\b|=", re.I)


def answer_region(completion: str) -> str:
    """The part of a completion that is graded: after the last ``</think>``, else all of it."""
    return completion.rsplit("</think>", 1)[1] if "</think>" in completion else completion


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


def boxed_all(text: str) -> list[str]:
    """Contents of every ``\\boxed{}`` / ``\\fbox{}`` of ``text`` in order (empty or unbalanced ones skipped)."""
    out = []
    for m in _BOX.finditer(text):
        if m.group(1) == "{":
            got = braced(text, m.start(1))
            if got is not None:
                out.append(got[0].strip())
        else:  # "\boxed 5": one token
            out.append(re.match(r"[^\s$]+", text[m.start(1):]).group(0))
    return [b for b in out if b]


def _prose_words(s: str) -> list[str]:
    """Words of ``s`` that are prose: outside LaTeX commands and \\text{}, 3+ letters, not math/unit words."""
    s = _COMMAND.sub(" ", _TEXT_GROUP.sub(" ", _ENVIRON.sub(" ", s)))
    return [w for w in _WORD.findall(s) if (len(w) >= 3 and w.lower() not in _MATH_WORDS) or w.lower() in _STOP_SHORT]


def is_bare(text: str) -> bool:
    """Whether ``text`` is a formula with no prose, no math delimiters and no answer markers."""
    s = text.strip()
    if not s or "\n\n" in s or len(s) > 2000:
        return False
    if re.search(r"\\boxed|\\fbox|<answer>|</think>|####|(?<!\\)\$|\\\(|\\\[", s):
        return False
    return not _prose_words(s)


def _spans(text: str) -> list[re.Match]:
    """Math spans of ``text`` (a ``$`` pair around prose, or ``$5 and $``, is currency, not a span)."""
    return [m for m in _SPAN.finditer(text) if not _prose_words(_span_content(m))
            and not (m.group(4) is not None and m.group(4)[:1].isdigit() and m.group(4)[-1:].isspace())]


def _span_content(m: re.Match) -> str:
    return next(g for g in m.groups() if g is not None).strip()


def _span_group(text: str, spans: list[re.Match], last: int) -> str:
    """Span ``last`` joined with the spans before it that only commas / "and" / "or" separate."""
    first = last
    while first > 0 and _JOINER.match(text[spans[first - 1].end():spans[first].start()]):
        first -= 1
    return ", ".join(_span_content(m) for m in spans[first:last + 1])


def _sentence_end(text: str) -> int:
    """Index where the sentence starting at text[0] ends: '.', '!' or '?' followed by space or end (outside math
    spans and braces), or a blank line; math spans are skipped whole."""
    protected = [(m.start(), m.end()) for m in _SPAN.finditer(text)]
    i, depth = 0, 0
    while i < len(text):
        for a, b in protected:
            if a == i:
                i = b
                break
        if i >= len(text):
            break
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth = max(0, depth - 1)
        elif depth == 0 and c in ".!?" and (i + 1 == len(text) or text[i + 1].isspace()):
            if not (c == "." and i > 0 and text[i - 1].isdigit() and i + 1 < len(text) and text[i + 1].isdigit()):
                return i
        elif c == "\n" and (text[i + 1:i + 2] == "\n" or i > 0 and text[:i].strip()):
            return i
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
        k = 0
        while k + 1 < len(spans) and _JOINER.match(s[spans[k].end():spans[k + 1].start()]):
            k += 1
        return _span_group(s, spans, k)
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


def final_answers(text: str) -> list[str]:
    """All final-answer candidates of ``text`` by the first rule that applies (module docstring); [] if none."""
    region = answer_region(text).strip()
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
    for m in reversed(phrases):
        rest = region[m.end():]
        got = read_fragment(rest[:_sentence_end(rest)])
        if got:
            return [got]
    hashes = _HASHES.findall(region)
    if hashes:
        return [hashes[-1].strip(" \t*$")]
    spans = _spans(region)
    if spans:
        return [_span_group(region, spans, len(spans) - 1)]
    numbers = _NUMBER.findall(region)
    if numbers:
        return [numbers[-1]]
    words = region.strip(" .!*_").split()
    return [" ".join(words)] if 0 < len(words) <= 2 and re.fullmatch(r"[A-Za-z][A-Za-z' -]*", " ".join(words)) else []
