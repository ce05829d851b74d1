"""Deterministic generators for the built-in datasets of the embedded default.

``python -m data.generate --out DIR --seed 0 [--n-math N ...]`` writes JSON-lines files (one object per
line, UTF-8, loadable with ``datasets.load_dataset("json", data_files=...)`` or ``data.loaders.load_rows``):

  math_train / math_test        {id, prompt, answer, solution, source: "math", difficulty, kind}
  math_rl                       the same columns: a separate pool of fresh prompts for reasoning RL (drawn from
                                its own random streams, so its size changes no other file and no tokenizer)
  code_train / code_test        {id, prompt, tests, entry_point, reference, source: "code"}
  cot_train                     {id, messages: [{role, content}, ...], source: "math" | "code"}
  general_train / general_test  {id, prompt, response, source: "general"}
  preferences_train / _test     {id, prompt, chosen, rejected, source: "general" | "math"}

Everything is sized for a ~1-5M-parameter model trained from scratch on a laptop CPU:

* Math comes in three tiers (``difficulty``): 1 = one- and two-digit addition, subtraction,
  multiplication by a digit, ``x + a = b``; 2 = two-operation expressions, ``ax + b = c``, percentages
  with round numbers, simplifying a fraction; 3 = fraction sums and products, ratios, percentage changes,
  linear equations with fractional or negative roots; tier 1 is about 2/3 of each split. Gold answers are exact sympy rationals; the
  ``answer`` column writes them in varied but equivalent LaTeX (``\\frac{3}{4}``, ``\\dfrac34``, ``0.75``,
  ``3/4``, ``12.0`` ...) so answer checking is exercised, while the CoT traces and ``solution`` always
  box the canonical form (integer, or ``\\frac{p}{q}`` in lowest terms) so a tiny model sees one format.
* Reasoning steps are short and mechanical (column addition with carries, multiplying place by place,
  undoing one operation per line) so every step reduces to single-digit facts seen in training.
  A full trace is well under 256 tokens with the tokenizer of ``data.tokenizer`` (mean ~57, max ~110).
* Measured learnability (every trace with its working, ``--terse 0``; default sizes, data seed 0; a
  1M-parameter Llama-style model, d=128, 4 layers, trained from scratch on cot_train + general_train with the
  assistant mask, batch 32, AdamW lr 3e-3 cosine; greedy decoding on math_test): 300 steps -> 2% held-out
  accuracy, 500 -> 17% (23% on tier 1), 1000 -> 57-59% over two seeds (80-86% tier 1, ~25% tier 2, 3-9%
  tier 3), 2000 -> 76%. With every trace written out, RL from a converged SFT model found little to improve
  (README: +0.0 mean over 3 seeds after 2,000 SFT steps), hence the terse traces below.
* Terse traces (``--terse``, default 0.5): that share of the math CoT traces keeps only the last line of its
  working (``<think>\n61 + 67 = 128\n</think>``): R1's cold start is a few thousand readable traces, not the
  skill itself, and here half of them show no reasoning. A model trained on them imitates the mix of the two
  forms and, on new problems, writes the answer down without working most of the time, where it is usually
  wrong. The reward checks only the answer, so reasoning RL has room that more SFT on the same traces does not
  close: it finds that writing the working out pays, and held-out accuracy and response length rise together.
  Measured (tiny V3, data seed 0, held-out math_test n=200, pass@1 from 4-8 samples at T=0.6, 2-core CPU, fp32):
  after SFT of 6,000 steps (its held-out curve: 3,000 steps 32%, 4,000 35%, 5,000 43%, 6,000 42%) 69% of the
  answers are terse and 32% of those correct, against 64% of the 31% with working: pass@1 41.7% +- 3.0, mean
  30.8 tokens. Reasoning RL (recipes/tiny/rl_reasoning.yaml, 80 steps) from a 3,000-step SFT checkpoint (pass@1
  23.5%, 70% terse) raised held-out pass@1 to 52.7% (+29.2 +- 3.0 paired) and the mean response from 30.5 to
  46.4 tokens, with 88% of answers now showing their working. The pipeline's numbers per seed: README.
* Held-out splits are drawn first; train splits never contain a held-out problem: problems are
  deduplicated on their content key (the operands, independent of wording) and on the normalised prompt,
  and disjointness of every train file against every test file is asserted before anything is written.
* Randomness comes from ``random.Random(f"{seed}:{stream}")`` only, so the same seed gives byte-identical
  files and a different seed different data.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import sympy as sp

PLACES = ("ones", "tens", "hundreds", "thousands")
ARITH_TEMPLATES = ("What is {}?", "Compute {}.", "Calculate {}.", "{} = ?", "Evaluate {}.")
EQUATION_TEMPLATES = ("Solve for x: {}.", "Find x if {}.", "If {}, what is x?", "Solve {} for x.")


@dataclass(kw_only=True)
class Sizes:
    """Rows per file. Held-out rows are drawn first; train rows exclude every held-out problem."""

    math: int = field(default=2000, metadata={"help": "math_train rows"})
    math_test: int = field(default=200, metadata={"help": "math_test rows (held out)"})
    math_rl: int = field(default=10000, metadata={"help": "math_rl rows: RL prompts (never a held-out problem)"})
    code: int = field(default=200, metadata={"help": "code_train rows (their CoT traces also go to cot_train)"})
    code_test: int = field(default=30, metadata={"help": "code_test rows (held out)"})
    cot: int = field(default=8000, metadata={"help": "math CoT traces in cot_train (never a held-out problem)"})
    general: int = field(default=600, metadata={"help": "general_train rows"})
    general_test: int = field(default=60, metadata={"help": "general_test rows (held out)"})
    pref: int = field(default=600, metadata={"help": "preferences_train pairs (3/4 general, 1/4 math)"})
    pref_test: int = field(default=60, metadata={"help": "preferences_test pairs (held out)"})

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(f"--n-{f.name.replace('_', '-')} must be >= 0, got {getattr(self, f.name)}")


def normalize_prompt(prompt: str) -> str:
    """Lower-case, collapse whitespace, drop trailing punctuation: two prompts equal under this are duplicates."""
    return " ".join(prompt.lower().split()).rstrip(" .?!")


# ----------------------------------------------------------------------------------------------- math


@dataclass
class MathProblem:
    kind: str
    key: str                 # the problem's content independent of wording, e.g. "add:37+45"
    prompt: str
    value: sp.Rational       # exact gold answer
    steps: list[str]         # reasoning lines (CoT body and solution)


def fraction_text(v: sp.Rational) -> str:
    """Plain-text rational used inside reasoning steps: ``7``, ``-5/3``."""
    return str(v.p) if v.q == 1 else f"{v.p}/{v.q}"


def canonical_latex(v: sp.Rational) -> str:
    """The one form boxed in CoT traces and solutions: ``7``, ``-\\frac{5}{3}``."""
    if v.q == 1:
        return str(v.p)
    return f"{'-' if v < 0 else ''}\\frac{{{abs(v.p)}}}{{{v.q}}}"


def answer_forms(v: sp.Rational) -> list[str]:
    """Equivalent LaTeX spellings of ``v`` used for the ``answer`` column."""
    if v.q == 1:
        return [str(v.p)] * 4 + [f"{v.p}.0"]
    sign, p, q = ("-" if v < 0 else ""), abs(v.p), v.q
    forms = [f"{sign}\\frac{{{p}}}{{{q}}}", f"{sign}\\dfrac{{{p}}}{{{q}}}", f"{sign}\\tfrac{{{p}}}{{{q}}}",
             f"\\frac{{{sign}{p}}}{{{q}}}", f"{sign}{p}/{q}"]
    if p < 10 and q < 10:
        forms.append(f"{sign}\\dfrac{p}{q}")
    if set(sp.factorint(q)) <= {2, 5}:
        places = next(k for k in range(1, 20) if 10**k % q == 0)
        whole, frac = divmod(p * 10**places // q, 10**places)
        forms.append(f"{sign}{whole}.{frac:0{places}d}")
    return forms


def add_steps(a: int, b: int) -> list[str]:
    """Column addition, ones first, carries written out."""
    if a < 10 and b < 10:
        return [f"{a} + {b} = {a + b}"]
    lines, carry, cols = [], 0, max(len(str(a)), len(str(b)))
    for i in range(cols):
        da, db = a // 10**i % 10, b // 10**i % 10
        s = da + db + carry
        terms = f"{da} + {db}" + (f" + {carry}" if carry else "")
        note = f", write {s % 10} carry 1" if s >= 10 and i < cols - 1 else ""
        lines.append(f"{PLACES[i]}: {terms} = {s}{note}")
        carry = s // 10
    return lines + [f"{a} + {b} = {a + b}"]


def sub_steps(a: int, b: int) -> list[str]:
    """Column subtraction of ``b <= a``, ones first, borrows written out."""
    if a < 10:
        return [f"{a} - {b} = {a - b}"]
    lines, borrow = [], 0
    for i in range(len(str(a))):
        da, db = a // 10**i % 10, b // 10**i % 10
        top = f"{da} - {borrow}" if borrow else f"{da}"
        if da - borrow < db:
            lines.append(f"{PLACES[i]}: {top} < {db}, borrow: {da - borrow + 10} - {db} = {da - borrow + 10 - db}")
            borrow = 1
        else:
            lines.append(f"{PLACES[i]}: {top} - {db} = {da - borrow - db}")
            borrow = 0
    return lines + [f"{a} - {b} = {a - b}"]


def mul_steps(a: int, d: int) -> list[str]:
    """``a * d`` for a single digit ``d``: multiply each place of ``a``, then add the round parts."""
    if a < 10:
        return [f"{a} * {d} = {a * d}"]
    parts = [(a // 10**i % 10) * 10**i for i in reversed(range(len(str(a))))]
    parts = [p for p in parts if p]
    lines = [f"{p} * {d} = {p * d}" for p in parts]
    if len(parts) > 1:
        lines.append(" + ".join(str(p * d) for p in parts) + f" = {a * d}")
    return lines


def percent_steps(p: int, n: int) -> tuple[list[str], int]:
    """``p% of n`` for p a multiple of 10 (via 10%) or 25 / 75 (via a quarter)."""
    if p % 10 == 0:
        tenth = n // 10
        lines = [f"10% of {n} = {n} / 10 = {tenth}"]
        if p != 10:
            lines += [f"{p}% of {n} = {p // 10} * {tenth}", *mul_steps(tenth, p // 10)]
        return lines, p * n // 100
    quarter = n // 4
    lines = [f"25% of {n} = {n} / 4 = {quarter}"]
    if p == 75:
        lines += [f"75% of {n} = 3 * {quarter}", *mul_steps(quarter, 3)]
    return lines, p * n // 100


def signed(b: int) -> str:
    """``+ 5`` / ``- 5`` for writing ``ax + b``."""
    return f"+ {b}" if b >= 0 else f"- {-b}"


def m_add(rng: random.Random) -> MathProblem:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return MathProblem("add", f"add:{min(a, b)}+{max(a, b)}", rng.choice(ARITH_TEMPLATES).format(f"{a} + {b}"),
                       sp.Integer(a) + b, add_steps(a, b))


def m_sub(rng: random.Random) -> MathProblem:
    a = rng.randint(0, 99)
    b = rng.randint(0, a)
    return MathProblem("sub", f"sub:{a}-{b}", rng.choice(ARITH_TEMPLATES).format(f"{a} - {b}"),
                       sp.Integer(a) - b, sub_steps(a, b))


def m_mul(rng: random.Random) -> MathProblem:
    d, a = rng.randint(2, 9), rng.randint(2, 99)
    shown = f"{a} * {d}" if rng.random() < 0.5 else f"{d} * {a}"
    return MathProblem("mul", f"mul:{min(a, d)}*{max(a, d)}", rng.choice(ARITH_TEMPLATES).format(shown),
                       sp.Integer(a) * d, mul_steps(a, d))


def m_linear1(rng: random.Random) -> MathProblem:
    form = rng.randrange(3)
    if form < 2:
        x, a = rng.randint(0, 50), rng.randint(1, 50)
        b = x + a
        eq = f"x + {a} = {b}" if form == 0 else f"{a} + x = {b}"
        steps = [f"x = {b} - {a}", *sub_steps(b, a)]
    else:
        a, b = rng.randint(1, 50), rng.randint(0, 50)
        x = a + b
        eq = f"x - {a} = {b}"
        steps = [f"x = {b} + {a}", *add_steps(b, a)]
    return MathProblem("linear1", f"linear1:{eq}", rng.choice(EQUATION_TEMPLATES).format(eq),
                       sp.Integer(x), steps + [f"x = {x}"])


def m_multi(rng: random.Random) -> MathProblem:
    form = rng.randrange(3)
    if form == 0:
        a, b, c = rng.randint(1, 50), rng.randint(2, 9), rng.randint(2, 9)
        expr, value = f"{a} + {b} * {c}", sp.Integer(a) + sp.Integer(b) * c
        steps = [f"multiply first: {b} * {c} = {b * c}", *add_steps(a, b * c)]
    elif form == 1:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        c = rng.randint(1, a * b)
        expr, value = f"{a} * {b} - {c}", sp.Integer(a) * b - c
        steps = [f"multiply first: {a} * {b} = {a * b}", *sub_steps(a * b, c)]
    else:
        a, b, c = rng.randint(1, 20), rng.randint(1, 20), rng.randint(2, 9)
        expr, value = f"({a} + {b}) * {c}", (sp.Integer(a) + b) * c
        steps = [f"brackets first: {a} + {b} = {a + b}", *mul_steps(a + b, c)]
    return MathProblem("multi", f"multi:{expr}", rng.choice(ARITH_TEMPLATES).format(expr), value, steps)


def m_linear2(rng: random.Random) -> MathProblem:
    a, x = rng.randint(2, 9), rng.randint(1, 12)
    b = rng.randint(1, 30)
    if rng.random() < 0.5:
        eq, c = f"{a}x + {b} = {a * x + b}", a * x + b
        steps = [f"{a}x = {c} - {b}", *sub_steps(c, b)]
    else:
        b = min(b, a * x)
        eq, c = f"{a}x - {b} = {a * x - b}", a * x - b
        steps = [f"{a}x = {c} + {b}", *add_steps(c, b)]
    return MathProblem("linear2", f"linear2:{eq}", rng.choice(EQUATION_TEMPLATES).format(eq), sp.Integer(x),
                       steps + [f"x = {a * x} / {a} = {x}"])


def m_percent(rng: random.Random) -> MathProblem:
    p = rng.choice((10, 20, 30, 40, 50, 60, 70, 80, 90, 25, 50, 75))
    n = rng.randint(1, 20) * (10 if p % 10 == 0 else 4)
    steps, value = percent_steps(p, n)
    prompt = rng.choice(("What is {}% of {}?", "Find {}% of {}.", "Calculate {}% of {}.")).format(p, n)
    return MathProblem("percent", f"percent:{p}%{n}", prompt, sp.Rational(p * n, 100), steps)


def m_simplify(rng: random.Random) -> MathProblem:
    q = rng.randint(2, 12)
    p = rng.choice([k for k in range(1, q) if sp.gcd(k, q) == 1])
    g = rng.randint(2, 9)
    num, den = p * g, q * g
    prompt = rng.choice(("Simplify {}/{}.", "Write {}/{} in lowest terms.", "Reduce the fraction {}/{}.")).format(num, den)
    steps = [f"gcd({num}, {den}) = {g}", f"{num} / {g} = {p}", f"{den} / {g} = {q}", f"{num}/{den} = {p}/{q}"]
    return MathProblem("simplify", f"simplify:{num}/{den}", prompt, sp.Rational(p, q), steps)


def m_frac_add(rng: random.Random) -> MathProblem:
    b, d = rng.randint(2, 9), rng.randint(2, 9)
    a, c = rng.randint(1, b - 1), rng.randint(1, d - 1)
    op = rng.choice("+-")
    value = sp.Rational(a, b) + sp.Rational(c, d) if op == "+" else sp.Rational(a, b) - sp.Rational(c, d)
    lcm = sp.ilcm(b, d)
    big_a, big_c = a * lcm // b, c * lcm // d
    total = big_a + big_c if op == "+" else big_a - big_c
    steps = [] if b == d else [f"common denominator: {lcm}", f"{a}/{b} = {big_a}/{lcm}", f"{c}/{d} = {big_c}/{lcm}"]
    steps.append(f"{big_a}/{lcm} {op} {big_c}/{lcm} = {total}/{lcm}")
    if sp.Rational(total, lcm).q != lcm:
        steps.append(f"{total}/{lcm} = {fraction_text(value)}")
    expr = f"{a}/{b} {op} {c}/{d}"
    key = f"frac_add:{' + '.join(sorted((f'{a}/{b}', f'{c}/{d}')))}" if op == "+" else f"frac_add:{expr}"
    return MathProblem("frac_add", key, rng.choice(ARITH_TEMPLATES).format(expr), value, steps)


def m_frac_mul(rng: random.Random) -> MathProblem:
    b, d = rng.randint(2, 9), rng.randint(2, 9)
    a, c = rng.randint(1, b - 1), rng.randint(1, d - 1)
    value = sp.Rational(a, b) * sp.Rational(c, d)
    steps = [f"numerators: {a} * {c} = {a * c}", f"denominators: {b} * {d} = {b * d}"]
    if value.q != b * d:
        steps.append(f"{a * c}/{b * d} = {fraction_text(value)}")
    else:
        steps.append(f"{a}/{b} * {c}/{d} = {a * c}/{b * d}")
    expr = f"{a}/{b} * {c}/{d}"
    return MathProblem("frac_mul", f"frac_mul:{' * '.join(sorted((f'{a}/{b}', f'{c}/{d}')))}", rng.choice(ARITH_TEMPLATES).format(expr), value, steps)


def m_ratio(rng: random.Random) -> MathProblem:
    p, q = rng.sample(range(1, 10), 2)
    while sp.gcd(p, q) != 1:
        p, q = rng.sample(range(1, 10), 2)
    unit = rng.randint(2, 15)
    n, parts = (p + q) * unit, p + q
    which = rng.choice(("larger", "smaller"))
    k = max(p, q) if which == "larger" else min(p, q)
    prompt = rng.choice(("Split {n} in the ratio {p}:{q}. What is the {w} part?",
                         "Divide {n} into two parts in the ratio {p}:{q}. Find the {w} part.")
                        ).format(n=n, p=p, q=q, w=which)
    steps = [f"total parts: {p} + {q} = {parts}", f"one part: {n} / {parts} = {unit}",
             f"{which} part: {k} * {unit} = {k * unit}"]
    return MathProblem("ratio", f"ratio:{n}:{p}:{q}:{which}", prompt, sp.Integer(k * unit), steps)


def m_percent_change(rng: random.Random) -> MathProblem:
    p = rng.choice((10, 20, 30, 40, 50, 25, 75))
    n = rng.randint(1, 20) * (10 if p % 10 == 0 else 4)
    up = rng.random() < 0.5
    steps, change = percent_steps(p, n)
    value = n + change if up else n - change
    steps.append(f"new price: {n} + {change} = {value}" if up else f"new price: {n} - {change} = {value}")
    prompt = f"A price of {n} {'goes up' if up else 'goes down'} by {p}%. What is the new price?"
    return MathProblem("percent_change", f"percent_change:{n}{'+' if up else '-'}{p}%", prompt,
                       sp.Integer(n) + (1 if up else -1) * sp.Rational(p * n, 100), steps)


def m_linear3(rng: random.Random) -> MathProblem:
    while True:
        a, b, c = rng.randint(2, 9), rng.choice([k for k in range(-20, 21) if k]), rng.randint(-20, 20)
        value = sp.Rational(c - b, a)
        if value.q != 1 or value < 0:
            break
    eq = f"{a}x {signed(b)} = {c}"
    steps = [f"{a}x = {c} {signed(-b)} = {c - b}", f"x = {c - b}/{a}"]
    if value.q != a or value.p != c - b:
        steps.append(f"x = {fraction_text(value)}")
    return MathProblem("linear3", f"linear3:{eq}", rng.choice(EQUATION_TEMPLATES).format(eq), value, steps)


# kind -> (difficulty, sampling weight, generator). The easy tier is 2/3 of every split: in a trial with a
# 1M-parameter model (1000 SFT steps of 32 traces) this took easy-tier held-out accuracy from 65% to 82%.
MATH_KINDS: dict[str, tuple[int, float, Callable[[random.Random], MathProblem]]] = {
    "add": (1, 0.30, m_add), "sub": (1, 0.24, m_sub), "mul": (1, 0.24, m_mul), "linear1": (1, 0.22, m_linear1),
    "multi": (2, 0.09, m_multi), "linear2": (2, 0.08, m_linear2), "percent": (2, 0.07, m_percent),
    "simplify": (2, 0.06, m_simplify),
    "frac_add": (3, 0.05, m_frac_add), "frac_mul": (3, 0.04, m_frac_mul), "ratio": (3, 0.04, m_ratio),
    "percent_change": (3, 0.03, m_percent_change), "linear3": (3, 0.04, m_linear3),
}


def random_math(rng: random.Random) -> MathProblem:
    kinds = list(MATH_KINDS)
    kind = rng.choices(kinds, weights=[MATH_KINDS[k][1] for k in kinds])[0]
    return MATH_KINDS[kind][2](rng)


def math_completion(problem: MathProblem, terse: bool = False) -> str:
    """The assistant turn of a CoT trace: reasoning in <think>, then the boxed canonical answer. A terse trace
    keeps only the last reasoning line (the answer written down without the working)."""
    body = problem.steps[-1] if terse else "\n".join(problem.steps)
    return f"<think>\n{body}\n</think>\nThe answer is \\boxed{{{canonical_latex(problem.value)}}}."


def math_row(problem: MathProblem, row_id: str, rng: random.Random) -> dict:
    solution = "\n".join(problem.steps) + f"\nThe answer is $\\boxed{{{canonical_latex(problem.value)}}}$."
    return {"id": row_id, "prompt": problem.prompt, "answer": rng.choice(answer_forms(problem.value)),
            "solution": solution, "source": "math", "difficulty": MATH_KINDS[problem.kind][0], "kind": problem.kind}


# ----------------------------------------------------------------------------------------------- code


@dataclass
class CodeProblem:
    key: str
    prompt: str
    entry_point: str
    reference: str                       # a solution that passes ``tests``
    think: list[str]                     # reasoning lines for the CoT trace
    cases: list[tuple[tuple, object]]    # (arguments, expected result) computed independently of ``reference``

    @property
    def tests(self) -> str:
        lines = (f"assert {self.entry_point}({', '.join(map(repr, args))}) == {want!r}" for args, want in self.cases)
        return "\n".join(dict.fromkeys(lines))


WORDS = ("apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear", "plum", "melon", "tiger", "zebra",
         "horse", "mouse", "eagle", "shark", "whale", "camel", "robot", "piano", "guitar", "river", "ocean", "cloud",
         "storm", "forest", "garden", "castle", "bridge", "rocket", "candle", "pencil", "window", "butter", "coffee",
         "orange", "silver", "yellow", "winter", "summer")
LETTERS = "abcdefghijklmnoprstuvwy"


def _ints(rng: random.Random, n: int = 4, lo: int = -50, hi: int = 50) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(n)]


def _lists(rng: random.Random, n: int = 3) -> list[list[int]]:
    return [_ints(rng, rng.randint(1, 6), -20, 20) for _ in range(n)]


def _strings(rng: random.Random, n: int = 4) -> list[str]:
    return [rng.choice(WORDS) + rng.choice(("", "", " " + rng.choice(WORDS))) for _ in range(n)]


def _code(name: str, signature: str, task: str, body: str, think: list[str], cases: list) -> CodeProblem:
    return CodeProblem(key=f"code:{name}", prompt=f"Write a Python function {name}({signature}) that {task}.",
                       entry_point=name, reference=f"def {name}({signature}):\n    {body}", think=think, cases=cases)


def c_add_k(rng):
    k = rng.randint(1, 99)
    return _code(f"add_{k}", "x", f"returns x plus {k}", f"return x + {k}",
                 ["The input is a number x.", f"Add {k} to it."], [((x,), x + k) for x in _ints(rng)])


def c_subtract_k(rng):
    k = rng.randint(1, 99)
    return _code(f"subtract_{k}", "x", f"returns x minus {k}", f"return x - {k}",
                 ["The input is a number x.", f"Subtract {k} from it."], [((x,), x - k) for x in _ints(rng)])


def c_times_k(rng):
    k = rng.randint(2, 30)
    return _code(f"times_{k}", "x", f"returns x multiplied by {k}", f"return x * {k}",
                 ["The input is a number x.", f"Multiply it by {k}."], [((x,), x * k) for x in _ints(rng)])


def c_divisible(rng):
    k = rng.randint(2, 12)
    xs = [k * rng.randint(-9, 9), k * rng.randint(1, 9) + rng.randint(1, k - 1), *_ints(rng, 2, 0, 100)]
    return _code(f"is_divisible_by_{k}", "n", f"returns True if n is divisible by {k}, else False",
                 f"return n % {k} == 0", [f"n is divisible by {k} when the remainder n % {k} is 0."],
                 [((x,), x % k == 0) for x in xs])


def c_count_greater(rng):
    k = rng.randint(-10, 10)
    return _code(f"count_greater_than_{k}".replace("-", "minus_"), "xs",
                 f"returns how many numbers in the list xs are greater than {k}",
                 f"return sum(1 for x in xs if x > {k})", ["Go through the list.", f"Count the items with x > {k}."],
                 [((xs,), len([x for x in xs if x > k])) for xs in _lists(rng)])


def c_keep_greater(rng):
    k = rng.randint(-10, 10)
    return _code(f"keep_greater_than_{k}".replace("-", "minus_"), "xs",
                 f"returns a list of the numbers in xs that are greater than {k}, in order",
                 f"return [x for x in xs if x > {k}]", ["Go through the list in order.", f"Keep each x with x > {k}."],
                 [((xs,), list(filter(lambda x: x > k, xs))) for xs in _lists(rng)])


def c_count_letter(rng):
    c = rng.choice(LETTERS)
    return _code(f"count_{c}", "s", f"returns how many times the letter '{c}' appears in the string s",
                 f"return s.count('{c}')", [f"Count the occurrences of '{c}' in s."],
                 [((s,), len([ch for ch in s if ch == c])) for s in _strings(rng)])


def c_remove_letter(rng):
    c = rng.choice(LETTERS)
    return _code(f"remove_{c}", "s", f"returns the string s with every letter '{c}' removed",
                 f"return s.replace('{c}', '')", [f"Replace each '{c}' with nothing."],
                 [((s,), "".join(ch for ch in s if ch != c)) for s in _strings(rng)])


def c_repeat(rng):
    k = rng.randint(2, 5)
    return _code(f"repeat_{k}", "s", f"returns the string s repeated {k} times", f"return s * {k}",
                 [f"Multiplying a string by {k} repeats it {k} times."],
                 [((s,), "".join([s] * k)) for s in _strings(rng)])


def c_power(rng):
    k = rng.randint(2, 5)
    return _code(f"power_{k}", "x", f"returns x to the power {k}", f"return x ** {k}", [f"Use x ** {k}."],
                 [((x,), int(sp.Integer(x) ** k)) for x in _ints(rng, 4, -9, 9)])


def c_clamp(rng):
    lo = rng.randint(-10, 10)
    hi = lo + rng.randint(1, 20)
    name = f"clamp_{lo}_{hi}".replace("-", "minus_")
    return _code(name, "x", f"returns x limited to the range {lo} to {hi}", f"return min(max(x, {lo}), {hi})",
                 [f"Values below {lo} become {lo}.", f"Values above {hi} become {hi}."],
                 [((x,), lo if x < lo else hi if x > hi else x) for x in _ints(rng, 5, lo - 20, hi + 20)])


def _fixed(name, signature, task, body, think, oracle, inputs):
    return lambda rng: _code(name, signature, task, body, think, [((x,), oracle(x)) for x in inputs(rng)])


CODE_FAMILIES: list[Callable[[random.Random], CodeProblem]] = [
    c_add_k, c_subtract_k, c_times_k, c_divisible, c_count_greater, c_keep_greater, c_count_letter,
    c_remove_letter, c_repeat, c_power, c_clamp,
    _fixed("max_of_list", "xs", "returns the largest number in the non-empty list xs", "return max(xs)",
           ["max gives the largest item."], lambda xs: sorted(xs)[-1], _lists),
    _fixed("min_of_list", "xs", "returns the smallest number in the non-empty list xs", "return min(xs)",
           ["min gives the smallest item."], lambda xs: sorted(xs)[0], _lists),
    _fixed("sum_of_list", "xs", "returns the sum of the numbers in the list xs", "return sum(xs)",
           ["sum adds all items."], lambda xs: int(sp.Add(*xs)), _lists),
    _fixed("reverse_string", "s", "returns the string s reversed", "return s[::-1]",
           ["The slice s[::-1] reverses a string."], lambda s: "".join(reversed(s)), _strings),
    _fixed("is_even", "n", "returns True if n is even, else False", "return n % 2 == 0",
           ["n is even when n % 2 is 0."], lambda n: n / 2 == n // 2, _ints),
    _fixed("is_odd", "n", "returns True if n is odd, else False", "return n % 2 == 1",
           ["n is odd when n % 2 is 1."], lambda n: n / 2 != n // 2, _ints),
    _fixed("count_vowels", "s", "returns the number of vowels (a, e, i, o, u) in the string s",
           "return sum(1 for c in s if c in 'aeiou')", ["Count the characters of s that are in 'aeiou'."],
           lambda s: len([c for c in s if c in "aeiou"]), _strings),
    _fixed("is_palindrome", "s", "returns True if the string s reads the same backwards, else False",
           "return s == s[::-1]", ["Compare s with its reverse."],
           lambda s: list(s) == list(reversed(s)), lambda rng: [*_strings(rng, 2), "level", "noon"]),
    _fixed("factorial", "n", "returns n! for n >= 0", "return 1 if n == 0 else n * factorial(n - 1)",
           ["0! is 1.", "n! is n times (n - 1)!."], lambda n: int(sp.factorial(n)),
           lambda rng: [0, *_ints(rng, 3, 1, 10)]),
    _fixed("square", "x", "returns x squared", "return x * x", ["Multiply x by itself."],
           lambda x: x**2, _ints),
    _fixed("last_element", "xs", "returns the last item of the non-empty list xs", "return xs[-1]",
           ["xs[-1] is the last item."], lambda xs: xs[len(xs) - 1], _lists),
    _fixed("double_each", "xs", "returns a new list with every number in xs doubled", "return [2 * x for x in xs]",
           ["Build a new list with 2 * x for each x."], lambda xs: [x + x for x in xs], _lists),
    _fixed("sum_of_squares", "xs", "returns the sum of the squares of the numbers in xs",
           "return sum(x * x for x in xs)", ["Square each item, then add them up."],
           lambda xs: int(sp.Add(*[sp.Integer(x) ** 2 for x in xs])), _lists),
    _fixed("is_prime", "n", "returns True if n is a prime number, else False",
           "return n >= 2 and all(n % d for d in range(2, n))", ["A prime is at least 2.", "It has no divisor from 2 to n - 1."],
           lambda n: bool(sp.isprime(n)), lambda rng: [*_ints(rng, 4, 0, 60), 2, 1]),
    _fixed("abs_value", "x", "returns the absolute value of x", "return x if x >= 0 else -x",
           ["Negative numbers flip sign.", "Others stay the same."], lambda x: int(sp.Abs(x)), _ints),
    _fixed("to_upper", "s", "returns the string s in upper case", "return s.upper()",
           ["str.upper converts to upper case."], lambda s: "".join(c.upper() for c in s), _strings),
    _fixed("count_words", "s", "returns the number of words in the string s, separated by spaces",
           "return len(s.split())", ["Split on spaces and count the pieces."], lambda s: s.count(" ") + 1, _strings),
]


def random_code(rng: random.Random) -> CodeProblem:
    return rng.choice(CODE_FAMILIES)(rng)


def code_completion(problem: CodeProblem) -> str:
    body = "\n".join(problem.think)
    return f"<think>\n{body}\n</think>\n```python\n{problem.reference}\n```"


def code_row(problem: CodeProblem, row_id: str) -> dict:
    return {"id": row_id, "prompt": problem.prompt, "tests": problem.tests, "entry_point": problem.entry_point,
            "reference": problem.reference, "source": "code"}


# -------------------------------------------------------------------------------------------- general


@dataclass
class GeneralProblem:
    key: str
    prompt: str
    response: str     # a good answer
    wrong: str        # a plausible but wrong answer (a rejected variant for preference pairs)


CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Peru": "Lima",
    "Chile": "Santiago", "Australia": "Canberra", "Russia": "Moscow", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Greece": "Athens", "Turkey": "Ankara",
    "Ireland": "Dublin", "Austria": "Vienna", "Hungary": "Budapest", "Belgium": "Brussels", "Cuba": "Havana",
    "Netherlands": "Amsterdam", "Switzerland": "Bern", "Thailand": "Bangkok", "Vietnam": "Hanoi",
    "South Korea": "Seoul", "Indonesia": "Jakarta", "Nigeria": "Abuja", "Morocco": "Rabat", "Colombia": "Bogota",
}
OPPOSITES = (("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("day", "night"),
             ("happy", "sad"), ("light", "dark"), ("open", "closed"), ("full", "empty"), ("hard", "soft"),
             ("high", "low"), ("early", "late"), ("rich", "poor"), ("wet", "dry"), ("strong", "weak"),
             ("loud", "quiet"), ("thick", "thin"), ("long", "short"), ("clean", "dirty"), ("left", "right"),
             ("push", "pull"), ("start", "finish"), ("true", "false"), ("win", "lose"), ("old", "new"))
PLURALS = {"child": "children", "mouse": "mice", "foot": "feet", "tooth": "teeth", "man": "men", "woman": "women",
           "person": "people", "goose": "geese", "sheep": "sheep", "box": "boxes", "bus": "buses", "city": "cities",
           "baby": "babies", "leaf": "leaves", "knife": "knives", "cat": "cats", "dog": "dogs", "book": "books",
           "tree": "trees", "car": "cars", "house": "houses", "chair": "chairs", "glass": "glasses", "fox": "foxes"}
UNITS = (("km", "m", 1000), ("m", "cm", 100), ("kg", "g", 1000), ("hours", "minutes", 60),
         ("minutes", "seconds", 60), ("days", "hours", 24), ("weeks", "days", 7), ("liters", "milliliters", 1000),
         ("cm", "mm", 10))
GREETINGS = (("Hello!", "Hello! How can I help you today?"), ("Hi there.", "Hi! What can I do for you?"),
             ("Good morning!", "Good morning! How can I help you?"), ("Thank you!", "You're welcome!"),
             ("Thanks for your help.", "You're welcome. Happy to help!"), ("Goodbye!", "Goodbye! Have a nice day."),
             ("How are you?", "I'm doing well, thank you. How can I help you?"),
             ("Who are you?", "I am a helpful assistant."), ("Good night!", "Good night! Sleep well."))
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
MIXES = (("blue", "yellow", "green"), ("red", "yellow", "orange"), ("red", "blue", "purple"), ("red", "white", "pink"),
         ("black", "white", "gray"))


def g_capital(rng):
    country = rng.choice(sorted(CAPITALS))
    other = rng.choice([c for k, c in sorted(CAPITALS.items()) if k != country])
    prompt = rng.choice(("What is the capital of {}?", "Name the capital of {}.", "Which city is the capital of {}?"))
    return GeneralProblem(f"capital:{country}", prompt.format(country), f"The capital of {country} is {CAPITALS[country]}.",
                          f"The capital of {country} is {other}.")


def g_sort(rng):
    words = rng.sample(WORDS, rng.randint(3, 5))
    shown = ", ".join(words)
    wrong = list(reversed(sorted(words))) if words == sorted(words) else words
    return GeneralProblem(f"sort:{','.join(sorted(words))}", f"Sort these words alphabetically: {shown}.",
                          ", ".join(sorted(words)), ", ".join(wrong))


def g_convert(rng):
    src, dst, factor = rng.choice(UNITS)
    n = rng.randint(2, 20)
    prompt = rng.choice((f"Convert {n} {src} to {dst}.", f"How many {dst} are in {n} {src}?"))
    return GeneralProblem(f"convert:{n}{src}>{dst}", prompt, f"{n} {src} is {n * factor} {dst}.",
                          f"{n} {src} is {n * factor * 10 if rng.random() < 0.5 else n + factor} {dst}.")


def g_greet(rng):
    i = rng.randrange(len(GREETINGS))
    return GeneralProblem(f"greet:{i}", GREETINGS[i][0], GREETINGS[i][1], GREETINGS[(i + 1) % len(GREETINGS)][1])


def g_opposite(rng):
    pair = list(rng.choice(OPPOSITES))
    rng.shuffle(pair)
    other = rng.choice([w for p in OPPOSITES for w in p if w not in pair])
    return GeneralProblem(f"opposite:{pair[0]}", f"What is the opposite of {pair[0]}?",
                          f"The opposite of {pair[0]} is {pair[1]}.", f"The opposite of {pair[0]} is {other}.")


def g_plural(rng):
    word = rng.choice(sorted(PLURALS))
    wrong = word + "s" if PLURALS[word] != word + "s" else word + "es"
    return GeneralProblem(f"plural:{word}", f"What is the plural of {word}?", f"The plural of {word} is {PLURALS[word]}.",
                          f"The plural of {word} is {wrong}.")


def g_upper(rng):
    phrase = " ".join(rng.sample(WORDS, 2))
    return GeneralProblem(f"upper:{phrase}", f"Write '{phrase}' in capital letters.", phrase.upper(), phrase.title())


def g_letters(rng):
    word = rng.choice(WORDS)
    return GeneralProblem(f"letters:{word}", f"How many letters are in the word '{word}'?",
                          f"The word '{word}' has {len(word)} letters.",
                          f"The word '{word}' has {len(word) + rng.choice((-1, 1))} letters.")


def g_backwards(rng):
    word = rng.choice(WORDS)
    return GeneralProblem(f"backwards:{word}", f"Spell '{word}' backwards.", word[::-1], word[::-1][1:] + word[-1])


def g_next(rng):
    seq, what = rng.choice(((DAYS, "day"), (MONTHS, "month")))
    i = rng.randrange(len(seq))
    return GeneralProblem(f"next:{seq[i]}", f"What {what} comes after {seq[i]}?",
                          f"The {what} after {seq[i]} is {seq[(i + 1) % len(seq)]}.",
                          f"The {what} after {seq[i]} is {seq[i - 1]}.")


def g_parity(rng):
    n = rng.randint(1, 999)
    kind, other = ("even", "odd") if n % 2 == 0 else ("odd", "even")
    return GeneralProblem(f"parity:{n}", f"Is {n} even or odd?", f"{n} is {kind}.", f"{n} is {other}.")


def g_compare(rng):
    a, b = rng.sample(range(1, 1000), 2)
    hi, lo = max(a, b), min(a, b)
    return GeneralProblem(f"compare:{lo},{hi}", f"Which is larger, {a} or {b}?", f"{hi} is larger than {lo}.",
                          f"{lo} is larger than {hi}.")


def g_mix(rng):
    a, b, c = rng.choice(MIXES)
    if rng.random() < 0.5:
        a, b = b, a
    other = rng.choice([m[2] for m in MIXES if m[2] != c])
    return GeneralProblem(f"mix:{min(a, b)}+{max(a, b)}", f"What color do you get by mixing {a} and {b}?",
                          f"Mixing {a} and {b} gives {c}.", f"Mixing {a} and {b} gives {other}.")


GENERAL_FAMILIES = [g_capital, g_sort, g_convert, g_greet, g_opposite, g_plural, g_upper, g_letters, g_backwards,
                    g_next, g_parity, g_compare, g_mix]


def random_general(rng: random.Random) -> GeneralProblem:
    return rng.choice(GENERAL_FAMILIES)(rng)


def general_rejected(problem: GeneralProblem, rng: random.Random) -> str:
    """A worse response: wrong, unhelpful, rude, or off-format."""
    style = rng.choice(("wrong", "wrong", "unhelpful", "rude", "off_format"))
    if style == "wrong":
        return problem.wrong
    if style == "unhelpful":
        return rng.choice(("I don't know.", "I can't help with that.", "Why do you want to know?",
                           "You can look that up yourself."))
    if style == "rude":
        return rng.choice(("That is a silly question. ", "Ugh, fine. ", "Obviously, ")) + problem.response + \
            rng.choice(("", " Stop asking me easy things.", " Don't waste my time."))
    return rng.choice((problem.response.upper(), " ".join([problem.response] * 3),
                       f"Well, um, so... {problem.response} ...or maybe not, who knows?"))


def math_rejected(problem: MathProblem, rng: random.Random) -> str:
    """A wrong boxed answer, with or without a reasoning block."""
    wrong = problem.value + rng.choice((-10, -2, -1, 1, 2, 10))
    if rng.random() < 0.5:
        return f"The answer is \\boxed{{{canonical_latex(wrong)}}}."
    return math_completion(problem).rsplit("\\boxed", 1)[0] + f"\\boxed{{{canonical_latex(wrong)}}}."


# ----------------------------------------------------------------------------------------------- splits


TERSE = 0.5       # share of terse math CoT traces (see the module docstring)
MAX_MISSES = 20_000  # consecutive duplicate draws before a problem space counts as exhausted


def draw_unique(make: Callable, n: int, rng: random.Random, exclude: set[str]) -> list:
    """``n`` problems from ``make(rng)``, none sharing a content key or normalised prompt with each other or
    with ``exclude`` (which receives the new ones, so the next draw avoids them too)."""
    out, misses = [], 0
    while len(out) < n:
        problem = make(rng)
        marks = {"key:" + problem.key, "prompt:" + normalize_prompt(problem.prompt)}
        if marks & exclude:
            misses += 1
            if misses > MAX_MISSES:
                raise ValueError(f"could only draw {len(out)} of {n} distinct problems from {make.__name__}: "
                                 f"the problem space is exhausted; ask for fewer rows")
            continue
        misses = 0
        exclude |= marks
        out.append(problem)
    return out


def build(seed: int, sizes: Sizes, terse: float = TERSE) -> dict[str, list[dict]]:
    """All files' rows. Held-out problems are drawn first into per-domain exclusion sets. ``terse``: the share
    of math CoT traces that keep only their last reasoning line (drawn from their own stream)."""
    if not 0 <= terse <= 1:
        raise ValueError(f"--terse must be a fraction in [0, 1], got {terse}")
    rng = {name: random.Random(f"{seed}:{name}") for name in
           ("math_test", "math_train", "cot", "code_test", "code_train", "general_test", "general_train",
            "pref_test", "pref_train", "forms", "rejected", "math_rl", "math_rl_forms", "terse")}
    n_pref_math_test, n_pref_math = sizes.pref_test // 4, sizes.pref // 4
    held_math, held_code, held_general = set(), set(), set()
    math_test = draw_unique(random_math, sizes.math_test, rng["math_test"], held_math)
    pref_math_test = draw_unique(random_math, n_pref_math_test, rng["pref_test"], held_math)
    code_test = draw_unique(random_code, sizes.code_test, rng["code_test"], held_code)
    general_test = draw_unique(random_general, sizes.general_test, rng["general_test"], held_general)
    pref_general_test = draw_unique(random_general, sizes.pref_test - n_pref_math_test, rng["pref_test"], held_general)

    math_train = draw_unique(random_math, sizes.math, rng["math_train"], set(held_math))
    math_rl = draw_unique(random_math, sizes.math_rl, rng["math_rl"], set(held_math))
    cot_math = draw_unique(random_math, sizes.cot, rng["cot"], set(held_math))
    pref_math = draw_unique(random_math, n_pref_math, rng["pref_train"], set(held_math))
    code_train = draw_unique(random_code, sizes.code, rng["code_train"], set(held_code))
    general_train = draw_unique(random_general, sizes.general, rng["general_train"], set(held_general))
    pref_general = draw_unique(random_general, sizes.pref - n_pref_math, rng["pref_train"], set(held_general))

    def chat(prompt: str, completion: str) -> list[dict]:
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]

    def prefs(split: str, general: list[GeneralProblem], maths: list[MathProblem]) -> list[dict]:
        r = rng["rejected"]
        rows = [{"prompt": p.prompt, "chosen": p.response, "rejected": general_rejected(p, r), "source": "general"}
                for p in general]
        rows += [{"prompt": p.prompt, "chosen": math_completion(p), "rejected": math_rejected(p, r), "source": "math"}
                 for p in maths]
        rng[f"pref_{split}"].shuffle(rows)
        return [{"id": f"pref-{split}-{i:05d}", **row} for i, row in enumerate(rows)]

    cot = [{"id": f"cot-math-{i:05d}", "messages": chat(p.prompt, math_completion(p, rng["terse"].random() < terse)),
            "source": "math"} for i, p in enumerate(cot_math)]
    cot += [{"id": f"cot-code-{i:05d}", "messages": chat(p.prompt, code_completion(p)), "source": "code"}
            for i, p in enumerate(code_train)]
    rng["cot"].shuffle(cot)
    files = {
        "math_train": [math_row(p, f"math-train-{i:05d}", rng["forms"]) for i, p in enumerate(math_train)],
        "math_test": [math_row(p, f"math-test-{i:05d}", rng["forms"]) for i, p in enumerate(math_test)],
        "math_rl": [math_row(p, f"math-rl-{i:05d}", rng["math_rl_forms"]) for i, p in enumerate(math_rl)],
        "code_train": [code_row(p, f"code-train-{i:05d}") for i, p in enumerate(code_train)],
        "code_test": [code_row(p, f"code-test-{i:05d}") for i, p in enumerate(code_test)],
        "cot_train": cot,
        "general_train": [{"id": f"general-train-{i:05d}", "prompt": p.prompt, "response": p.response,
                           "source": "general"} for i, p in enumerate(general_train)],
        "general_test": [{"id": f"general-test-{i:05d}", "prompt": p.prompt, "response": p.response,
                          "source": "general"} for i, p in enumerate(general_test)],
        "preferences_train": prefs("train", pref_general, pref_math),
        "preferences_test": prefs("test", pref_general_test, pref_math_test),
    }
    assert_disjoint(files)
    return files


def row_prompts(row: dict) -> list[str]:
    return [m["content"] for m in row["messages"] if m["role"] == "user"] if "messages" in row else [row["prompt"]]


def assert_disjoint(files: dict[str, list[dict]]) -> None:
    """No normalised prompt of a ``*_test`` file occurs in any other file."""
    test = {normalize_prompt(p) for name, rows in files.items() if name.endswith("_test") for r in rows
            for p in row_prompts(r)}
    leaked = sorted({normalize_prompt(p) for name, rows in files.items() if not name.endswith("_test") for r in rows
                     for p in row_prompts(r)} & test)
    if leaked:
        raise AssertionError(f"{len(leaked)} held-out prompts also occur in training files, e.g. {leaked[:3]}")


def write_all(out_dir: str | Path, seed: int = 0, sizes: Sizes | None = None, terse: float = TERSE) -> dict[str, Path]:
    """Generate every file into ``out_dir`` (created if needed); returns {name: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in build(seed, sizes or Sizes(), terse).items():
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed -> byte-identical files)")
    for f in dataclasses.fields(Sizes):
        parser.add_argument(f"--n-{f.name.replace('_', '-')}", dest=f.name, type=int, default=f.default,
                            metavar="N", help=f.metadata["help"])
    parser.add_argument("--terse", type=float, default=TERSE, metavar="FRACTION",
                        help="share of math CoT traces that keep only their last reasoning line")
    args = parser.parse_args(argv)
    try:
        sizes = Sizes(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Sizes)})
        paths = write_all(args.out, args.seed, sizes, args.terse)
    except ValueError as e:
        parser.error(str(e))
    for name, path in paths.items():
        print(f"{path}: {sum(1 for _ in path.open(encoding='utf-8'))} rows")


if __name__ == "__main__":
    main()
