"""Math verification agreement and throughput: rewards.math.verify_batch vs math-verify's verify(parse(g), parse(p)).

Three workloads:
  * the labelled table of the tests (``tests/rewards/test_math_table.py`` by kind, and the equivalence tables of
    ``tests/rewards/test_math.py``): hand-labelled pairs of gold answers and completions / answers; math-verify
    gets a bare LaTeX side wrapped in ``$..$`` (its parser needs delimiters), texts as they are;
and two whose golds are paired with completion-like predictions labelled by construction:
  * MATH-500 (/work/shared/data/math500_test.jsonl; a synthetic set of fractions, radicals, polynomials,
    intervals, tuples and matrices when absent): the gold boxed in a sentence, a re-typeset form (dfrac,
    left/right, spacing), sympy's own LaTeX of the parsed gold, a 10-digit decimal of numeric golds
    (all equivalent) and the gold with its last digit changed (not equivalent);
  * the built-in generator (data.generate): the ``answer`` column's varied spellings (``\\dfrac34``,
    ``0.75``, ``3/4``...) against the canonical CoT completion (equivalent) and against a completion
    boxing the value + 1 (not equivalent).
The anchor is math-verify 0.9.0 called naively, one pair at a time in this process (its signal-based
timeouts), as RL recipes commonly do. Both see the same strings; our pool runs ``--workers`` processes
(default 2, the 2-core target) behind the in-process fast path, with the cache off so every pair is
really checked. Prints checks/s for both, the ratio, their agreement, each one's agreement with the
labels (per kind for the table), every pair ours gets wrong, and a one-line JSON summary.

    .venv/bin/python bench/math_verify.py [--limit 150] [--gen 500] [--workers 2] [--timeout 3]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import sys
import time
from datetime import date
from pathlib import Path

# This file's name shadows the math_verify package when run as a script: take bench/ off the path.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

from rewards.math import VerifierPool, verify_batch  # noqa: E402

MATH500 = Path("/work/shared/data/math500_test.jsonl")


def synthetic_golds(n: int) -> list[str]:
    forms = [r"\frac{{{a}}}{{{b}}}", r"{a}\sqrt{{{b}}}", "x^2+{a}x+{b}", "({a}, {b}]", r"\left( {a}, \frac{{1}}{{{b}}} \right)",
             r"\frac{{\sqrt{{{a}}}}}{{{b}}}", "{a}.{b}", r"[{a}, \infty)", r"\begin{{pmatrix}} {a} \\ {b} \end{{pmatrix}}", "{a}{b}"]
    return [forms[i % len(forms)].format(a=2 + i % 7, b=3 + i % 11) for i in range(n)]


def wrong(gold: str) -> str:
    digits = list(re.finditer(r"\d", gold))
    if not digits:
        return gold + "+1"
    m = digits[-1]
    return gold[: m.start()] + str((int(m.group()) + 1) % 10) + gold[m.end():]


def retypeset(gold: str) -> str:
    s = gold.replace(r"\frac", r"\dfrac").replace(",", ", ").replace("(", r"\left(").replace(")", r"\right)")
    return s.replace(r"\left\left(", r"\left(").replace(r"\right\right)", r"\right)")


def variants(gold: str) -> list[tuple[str, bool]]:
    import sympy
    from latex2sympy2_extended import latex2sympy

    out = [(f"So the answer is $\\boxed{{{gold}}}$.", True), (f"\\boxed{{{retypeset(gold)}}}", True)]
    try:
        if "_" in gold:
            raise ValueError("sympy's LaTeX drops base subscripts such as 52_8")
        expr = latex2sympy(gold)
        out.append((f"\\boxed{{{sympy.latex(expr)}}}", True))
        if isinstance(expr, sympy.Expr) and expr.is_number and expr.is_real and not expr.is_Integer:
            out.append((f"\\boxed{{{sympy.N(expr, 10)}}}", True))
    except Exception:
        pass
    out.append((f"\\boxed{{{wrong(gold)}}}", False))
    return out


def math500(limit: int) -> tuple[str, list[str], list[str], list[bool]]:
    if MATH500.exists():
        golds = [json.loads(line)["answer"] for line in MATH500.read_text().splitlines()][:limit]
        name = f"MATH-500 first {len(golds)} answers"
    else:
        golds = synthetic_golds(limit)
        name = f"synthetic {len(golds)} answers (MATH-500 absent)"
    g, p, labels = [], [], []
    for gold in golds:
        for pred, label in variants(gold):
            g.append(f"\\boxed{{{gold}}}")
            p.append(pred)
            labels.append(label)
    return name, g, p, labels


def generator(n: int) -> tuple[str, list[str], list[str], list[bool]]:
    import random

    from data.generate import canonical_latex, math_completion, math_row, random_math

    rng = random.Random("bench-math-verify")
    g, p, labels = [], [], []
    for i in range(n):
        problem = random_math(rng)
        gold = f"\\boxed{{{math_row(problem, f'b{i}', rng)['answer']}}}"  # math-verify needs delimiters
        g += [gold, gold]
        p += [math_completion(problem), f"<think>guess</think>The answer is \\boxed{{{canonical_latex(problem.value + 1)}}}."]
        labels += [True, False]
    return f"built-in generator {n} problems", g, p, labels


def _load(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def labelled() -> tuple[str, list[str], list[str], list[bool], dict[str, list[int]]]:
    tests = HERE.parent / "tests" / "rewards"
    table, basic = _load(tests / "test_math_table.py"), _load(tests / "test_math.py")
    g, p, labels, kinds = [], [], [], {}
    rows = [(kind, row) for kind, rows in table.TABLE.items() for row in rows]
    rows += [("equivalence table", (a, b, True)) for a, b in basic.EQUIVALENT]
    rows += [("equivalence table", (a, b, False)) for a, b in basic.NOT_EQUIVALENT]
    for kind, (gold, pred, label) in rows:
        kinds.setdefault(kind, []).append(len(g))
        g.append(gold)
        p.append(pred)
        labels.append(label)
    return f"labelled table of the tests ({len(kinds)} kinds)", g, p, labels, kinds


def _delimited(s: str) -> str:
    """What math-verify's parser needs: a bare LaTeX answer in ``$..$``; a text with delimiters as it is."""
    return s if re.search(r"(?<!\\)\$|\\\[|\\\(|\\boxed|[A-Za-z]{3,}\s+[A-Za-z]{3,}", s) else f"${s}$"


def anchor(golds: list[str], preds: list[str]) -> tuple[list[bool], float]:
    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    start = time.perf_counter()
    out = []
    for g, p in zip(golds, preds):
        try:
            out.append(bool(verify(parse(g), parse(p))))
        except Exception:  # math-verify raises on some inputs (e.g. its timeout in a busy process): a miss
            out.append(False)
    return out, time.perf_counter() - start


def ours(golds: list[str], preds: list[str], workers: int, timeout: float) -> tuple[list[bool], float, float]:
    pool = VerifierPool(size=workers)
    start = time.perf_counter()
    pool.run([("1", "x")] * workers, timeout=60)  # start and warm every worker: not part of the timing
    startup = time.perf_counter() - start
    start = time.perf_counter()
    out = verify_batch(golds, preds, timeout=timeout, cache=False, pool=pool)
    elapsed = time.perf_counter() - start
    pool.close()
    return out, elapsed, startup


def measure(name: str, golds: list[str], preds: list[str], labels: list[bool], args,
            kinds: dict[str, list[int]] | None = None) -> dict:
    n = len(golds)
    mine, t_mine, startup = ours(golds, preds, args.workers, args.timeout)
    if kinds is not None:
        theirs, t_theirs = anchor([_delimited(g) for g in golds], [_delimited(p) for p in preds])
    else:
        theirs, t_theirs = anchor(golds, preds)
    ours_rate, anchor_rate = n / t_mine, n / t_theirs
    agree = sum(a == b for a, b in zip(mine, theirs)) / n
    ours_label = sum(a == b for a, b in zip(mine, labels)) / n
    anchor_label = sum(a == b for a, b in zip(theirs, labels)) / n
    print(f"\n{name}: {n} checks ({sum(labels)} labelled equivalent)")
    print(f"  ours   (verify_batch, {args.workers} workers): {ours_rate:9.1f} checks/s  ({t_mine:.2f}s; pool start {startup:.2f}s not counted)")
    print(f"  anchor (math_verify verify(parse, parse), 1 process): {anchor_rate:9.1f} checks/s  ({t_theirs:.2f}s)")
    print(f"  ratio ours/anchor: {ours_rate / anchor_rate:.2f}x   agreement: {agree:.3f}   "
          f"label agreement: ours {ours_label:.3f}, anchor {anchor_label:.3f}")
    for kind, rows in (kinds or {}).items():
        print(f"    {kind:40s} {len(rows):4d} pairs: ours {sum(mine[i] == labels[i] for i in rows):4d} right, "
              f"math-verify {sum(theirs[i] == labels[i] for i in rows):4d}")
    for g, p, a, b, lab in zip(golds, preds, mine, theirs, labels):
        if a != lab or (a != b and args.show_differences):
            print(f"    {'WRONG' if a != lab else 'differ'}: gold={g!r} pred={p[-80:]!r} ours={a} anchor={b} label={lab}")
    return {"checks": n, "ours_checks_per_s": round(ours_rate, 1), "anchor_checks_per_s": round(anchor_rate, 1),
            "ratio": round(ours_rate / anchor_rate, 2), "agreement": round(agree, 4),
            "ours_label_agreement": round(ours_label, 4), "anchor_label_agreement": round(anchor_label, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=150, help="MATH-500 gold answers to use (each gives 3-5 checks)")
    ap.add_argument("--gen", type=int, default=500, help="built-in generator problems (2 checks each)")
    ap.add_argument("--workers", type=int, default=2, help="verifier worker processes")
    ap.add_argument("--timeout", type=float, default=3.0, help="per-check timeout of our pool (seconds)")
    ap.add_argument("--show-differences", action="store_true", help="also list pairs where only the two checkers differ")
    args = ap.parse_args()

    print(f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), load average "
          f"{os.getloadavg()[0]:.1f}; {date.today()}")
    summary = {"bench": "math_verify", "workers": args.workers, "date": str(date.today())}
    name, golds, preds, labels, kinds = labelled()
    summary["labelled"] = measure(name, golds, preds, labels, args, kinds)
    for key, (name, golds, preds, labels) in {"math500": math500(args.limit), "generator": generator(args.gen)}.items():
        summary[key] = measure(name, golds, preds, labels, args)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
