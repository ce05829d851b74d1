import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rewards.math import (
    REL_TOL,
    VerifierPool,
    accuracy,
    correctness,
    extract_answer,
    extract_answers,
    get_pool,
    is_equivalent,
    normalize,
    verify_batch,
)

DATA = Path("/work/shared/data")
ROOT = Path(__file__).resolve().parents[2]

EQUIVALENT = [
    # integers, decimals, fractions, mixed numbers
    ("1/2", r"\frac{1}{2}"), (r"\dfrac{1}{2}", "0.5"), (r"\tfrac12", "1/2"), (r"\frac{3}{4}", "0.75"),
    (r"-\frac{1}{2}", r"\frac{-1}{2}"), (r"\frac{1}{3}", "0.333333"), (r"2\frac{1}{2}", r"\frac{5}{2}"),
    (r"2\frac{1}{2}", "2.5"), (r"-1\frac{1}{4}", "-1.25"), ("3", "3.0"), ("3", "03"), (r"\frac{6}{8}", r"\frac{3}{4}"),
    (r"\frac{10}{4}", "2.5"), ("0.5", ".5"), ("1e3", "1000"), (r"1.5\times10^{3}", "1500"), ("10", "10."),
    ("0", "-0"), (r"\frac{0}{5}", "0"), ("-3", "\u22123"), (r"\cfrac{1}{4}", "0.25"), ("2/4", "0.5"),
    # thousands separators, money, units, percent, degrees
    ("1000", "1,000"), ("1000000", "1{,}000{,}000"), ("1000", r"1\,000"), ("1000", r"1\!000"), (r"\$1,000", "1000"),
    (r"\$18.90", "18.9"), ("18", r"\$18"), ("18", "18 dollars"), ("5", r"5\text{ cm}"), ("5", r"5 \mathrm{cm}"),
    ("12", r"12\text{ inches}^2"), (r"50\%", "50"), ("50%", r"50\%"), (r"30^\circ", "30"), ("30", r"30^{\circ}"),
    ("45\u00b0", "45"), ("7", "7."), ("7", r"\boxed{7}"), ("7", "$7$"), (r"\frac{1}{2}\text{ hours}", "0.5"),
    (r"\$ 2,125", "2125"), ("2125", "2,125.00"), (r"10\%", "10"),
    # evaluation
    ("100", "10^2"), ("2^{10}", "1024"), (r"\sqrt{4}", "2"), (r"\binom{5}{2}", "10"), ("5!", "120"),
    (r"\sqrt[3]{8}", "2"), (r"\log_2 8", "3"), (r"\ln(e^3)", "3"), (r"\sin(\pi/6)", r"\frac{1}{2}"), (r"\cos(0)", "1"),
    (r"\tan(\pi/4)", "1"), (r"\left(\frac{1}{2}\right)", r"\frac{1}{2}"), (r"\displaystyle\frac{1}{2}", "1/2"),
    (r"2 \cdot 3", "6"), ("0.1 + 0.2", "0.3"), (r"\frac{2}{3}", r"0.666667"),
    # radicals and constants
    (r"\sqrt{18}", r"3\sqrt{2}"), (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}"), (r"\sqrt{2}/2", r"\frac{\sqrt2}{2}"),
    (r"2\sqrt{3}", r"\sqrt{12}"), (r"\frac{\pi}{2}", r"\pi/2"), (r"2\pi", r"\pi \cdot 2"), (r"\frac{\pi}{2}", "1.570796"),
    ("e^{2}", r"\exp(2)"), (r"\frac{1+\sqrt{5}}{2}", r"\frac{\sqrt{5}+1}{2}"), (r"4+2\sqrt{3}", r"(1+\sqrt{3})^2"),
    (r"\frac{1}{\sqrt{3}}", r"\frac{\sqrt{3}}{3}"), (r"\frac{\sqrt3}{2}", r"\sin(\pi/3)"), (r"\sqrt{2}", "1.414214"),
    ("\u03c0", r"\pi"), (r"\sqrt{8}", r"2\sqrt2"),
    # algebraic expressions
    ("x^2+2x+1", "(x+1)^2"), ("2x+2", "2(x+1)"), (r"\frac{x}{2}", "0.5x"), ("a^2-b^2", "(a-b)(a+b)"),
    (r"\frac{x^2-1}{x-1}", "x+1"), ("x(x+1)", "x^2+x"), (r"\sin^2 x + \cos^2 x", "1"),
    (r"\frac{1}{x}+\frac{1}{y}", r"\frac{x+y}{xy}"), ("3x-6", "3(x-2)"), ("n(n+1)/2", r"\frac{n^2+n}{2}"),
    ("e^{x}e^{y}", "e^{x+y}"), ("2^{n+1}", r"2\cdot 2^n"), ("(x-1)(x-2)", "x^2-3x+2"), (r"\frac{a+b}{2}", r"\frac{b+a}{2}"),
    ("X+1", "x+1"),
    # equations and assignments
    ("x=3", "3"), ("3", "x = 3"), ("y=2x+1", "y = 1+2x"), ("y=2x+1", "2x-y+1=0"), ("y = 2x + 1", "2y = 4x + 2"),
    ("x+y=1", "y=1-x"), ("k=5", "k = 5"), (r"x = \frac{1}{2}", "0.5"), (r"\theta = \frac{\pi}{4}", r"\frac{\pi}{4}"),
    ("x=1, y=2", "y=2, x=1"), ("f(x)=2x+1", "2x+1"), ("x = 2", r"x=\sqrt{4}"),
    # inequalities and intervals (bracket types respected)
    ("x<3", "3>x"), (r"x \le 5", r"5 \ge x"), (r"(-\infty, 3)", "x<3"), (r"[2, \infty)", r"x \ge 2"),
    ("(1,2]", "(1, 2]"), (r"\left[1,2\right)", "[1,2)"), (r"(-\infty,0)\cup(1,\infty)", r"(-\infty, 0) \cup (1, \infty)"),
    (r"(1,3) \cup (4,5)", r"(4,5) \cup (1,3)"), ("1 < x < 2", "(1,2)"), ("[-2, 5]", "[-2,5]"),
    (r"(0, \frac{1}{2})", "(0, 0.5)"), (r"x \in [1,2]", "[1,2]"), (r"[0, \infty)", r"[0,\infty)"),
    # tuples, sets
    (r"(3, \frac{\pi}{2})", r"\left( 3, \frac{\pi}{2} \right)"), ("(1,2)", "(1, 2)"), ("(1, -2, 3)", "(1,-2,3)"),
    (r"\{1,2,3\}", r"\{3,2,1\}"), ("1, 2", "2, 1"), ("1, 2", r"\{1,2\}"), ("-2, 2", r"\pm 2"),
    (r"2 \pm \sqrt{3}", r"2+\sqrt{3}, 2-\sqrt{3}"), (r"(\frac{1}{2}, 0.25)", r"(0.5, \frac14)"), ("3, 4", r"3 \text{ or } 4"),
    (r"\emptyset", r"\varnothing"), ("(3,1)", "(3, 1)"), (r"\{5\}", "5"), ("(2, 4)", r"(2, \sqrt{16})"),
    # matrices and vectors
    (r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", r"\begin{bmatrix}1&2\\3&4\end{bmatrix}"),
    (r"\begin{pmatrix}1\\2\end{pmatrix}", "(1,2)"), (r"\begin{pmatrix} \frac12 \\ 0.5 \end{pmatrix}", r"\begin{pmatrix}0.5\\1/2\end{pmatrix}"),
    (r"\begin{pmatrix}2&0\\0&2\end{pmatrix}", r"\begin{pmatrix}1+1&0\\0&\sqrt{4}\end{pmatrix}"),
    # text and multiple choice
    (r"\text{(C)}", "C"), ("(C)", "C"), (r"\textbf{(B)}", "B"), (r"\text{Monday}", "Monday"), (r"\text{Evelyn}", "Evelyn"),
    ("A", "a"), (r"\mathrm{B}", "B"),
    # complex numbers
    ("2+3i", "3i+2"), ("i", r"\frac{-1}{i}"), ("-1", "i^2"), ("1+i", r"\frac{2}{1-i}"),
]

NOT_EQUIVALENT = [
    ("1/2", "0.51"), ("1/3", "0.33"), ("1/3", "0.3334"), (r"\frac{1}{3}", "333333/1000000"), ("3", "4"), ("3", "-3"),
    ("1000", "100"), ("1,000", "1"), (r"\sqrt{2}", "1.4"), (r"\pi", "3.15"), (r"2\sqrt{3}", r"3\sqrt{2}"),
    ("x^2+1", "(x+1)^2"), ("2x", "x^2"), ("x+1", "x-1"), (r"\frac{x}{2}", "2x"), ("e^{x}", "x^{e}"),
    ("y=2x+1", "y=2x-1"), ("y=2x+1", "x=2y+1"), ("x=3", "y=3"), ("x=3", "4"), ("x<3", r"x \le 3"), ("x<3", "x>3"),
    ("(1,2]", "(1,2)"), ("[1,2]", "(1,2)"), ("[1,2)", "(1,2]"), ("(1,2)", "(2,1)"), ("(1,2,3)", "(1,3,2)"),
    (r"\{1,2\}", r"\{1,2,3\}"), ("1,2", "1,3"), (r"(0,\infty)", r"[0,\infty)"),
    (r"(-\infty,0)\cup(1,\infty)", r"(-\infty,0]\cup(1,\infty)"),
    (r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", r"\begin{pmatrix}1&3\\2&4\end{pmatrix}"),
    (r"\begin{pmatrix}1\\2\end{pmatrix}", r"\begin{pmatrix}1&2\end{pmatrix}"), (r"\begin{pmatrix}1\\2\end{pmatrix}", "(2,1)"),
    ("A", "B"), (r"\text{(C)}", "D"), ("Monday", "Tuesday"), ("2+3i", "3+2i"), ("i", "-i"), (r"\pm 2", "2"),
    ("3", r"3 \text{ or } 4"), ("5", "50"), (r"50\%", "5"), ("10", "10^{2}"), ("0", r"\emptyset"),
    (r"\frac{\pi}{2}", r"\frac{\pi}{3}"), (r"\sin x", r"\cos x"), ("", "3"), ("3", ""), ("3", "x"),
    (r"\frac{1}{2}", r"\frac{1}{2}x"), ("2", r"\sqrt{2}"), ("1.5", "1.6"), ("(1,2)", "(1,2,3)"), ("12", "21"),
    (r"x \in [1,2]", "(1,2)"), ("a+b", "a-b"), ("100", "1000000"), (r"10^{10}", r"10^{10}+1"),
    ("52_8", "52_9"), ("1011_2", "11"), ("42", "52_8"), ("2^{300}", "2^{300}+1"), ("x^{100}", "x^{100}+1"),
    (r"\frac{1}{2}\pi", r"\frac{\pi}{3}"),
]


@pytest.fixture(scope="module", autouse=True)
def pool_warm():
    is_equivalent("x+1", "1+x")  # start the worker pool once for the module
    yield


@pytest.mark.parametrize("gold,pred", EQUIVALENT)
def test_equivalent(gold, pred):
    assert is_equivalent(gold, pred), (gold, pred)


@pytest.mark.parametrize("gold,pred", NOT_EQUIVALENT)
def test_not_equivalent(gold, pred):
    assert not is_equivalent(gold, pred), (gold, pred)


def test_table_size_and_batch_agrees_with_single_checks():
    assert len(EQUIVALENT) + len(NOT_EQUIVALENT) >= 150
    golds, preds = zip(*(EQUIVALENT + NOT_EQUIVALENT))
    got = verify_batch(list(golds), list(preds), cache=False)
    assert got == [True] * len(EQUIVALENT) + [False] * len(NOT_EQUIVALENT)


def test_number_precision():
    assert REL_TOL == 5e-6
    # two decimals: relative tolerance
    assert is_equivalent("1000000.0", "1000004.5") and not is_equivalent("1000000.0", "1000006")
    assert not is_equivalent("0.000001", "0.0000011")
    # a decimal against an exact value: the correct rounding at the precision written, >= 3 significant digits
    assert is_equivalent(r"\sqrt{2}", "1.41421") and is_equivalent(r"\sqrt{2}", "1.4142") and is_equivalent(r"\sqrt{2}", "1.41")
    assert not is_equivalent(r"\sqrt{2}", "1.4143") and not is_equivalent(r"\sqrt{7}", "2.6456")  # wrong rounding
    assert not is_equivalent("1", "1.00001") and not is_equivalent("1000000", "1000004.5")
    assert is_equivalent("1/3", "0.333") and not is_equivalent("1/3", "0.33")
    assert not is_equivalent(r"\sqrt{2}", "1.41", approx_min_digits=4)
    assert is_equivalent(r"\sqrt{2}", "1.414214", approx_min_digits=None)
    assert not is_equivalent(r"\sqrt{2}", "1.4142", approx_min_digits=None)  # 5 significant digits: beyond rel_tol


@pytest.mark.parametrize("text,expected", [
    (r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"first \boxed{1} then \boxed{{2}^{3}}", "{2}^{3}"),
    (r"\fbox{42}", "42"),
    (r"\boxed 7 done", "7"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),
    ("<answer> 12 </answer>", "12"),
    ("<answer>$x=2$</answer>", "x=2"),
    ("Thus the answer is $\\frac{3}{4}$.", r"\frac{3}{4}"),
    ("The final answer is: 3.5\nok", "3.5"),
    ("**Final Answer:** 12", "12"),
    ("Final answer: 12", "12"),
    ("She makes 9 * 2 = $<<9*2=18>>18.\n#### 18", "18"),
    ("#### 2,125\n", "2,125"),
    ("no answer here", None),
    (r"\boxed{}", None),
    (r"unbalanced \boxed{1", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_all_boxed_and_region():
    assert extract_answers(r"\boxed{3} or \boxed{4}") == ["3", "4"]
    completion = r"<think>maybe \boxed{5}</think> The answer is \boxed{6}."
    assert accuracy([""], [completion], answer=["6"]) == [1.0]
    assert accuracy([""], [completion], answer=["5"]) == [0.0]


@pytest.mark.parametrize("answer,expected", [
    (r"$\dfrac{1}{2}$", r"\frac{1}{2}"), (r"\left( 1, 2 \right)", "(1, 2)"), (r"5\text{ cm}", "5"),
    (r"30^{\circ}", "30"), (r"50\%", "50"), ("1,234,567", "1234567"), (r"1{,}000", "1000"), ("1, 234", "1, 234"),
    (r"\text{(C)}", "C"), (r"\frac12", r"\frac{1}{2}"), (r"\sqrt3", r"\sqrt{3}"), ("7.", "7"),
    (r"3 \text{ or } 4", "3, 4"), (r"\!\$\,18", "18"),
])
def test_normalize(answer, expected):
    assert normalize(answer) == expected


def test_hedging_is_wrong():
    golds = ["3"] * 4
    completions = [r"\boxed{3} or \boxed{4}", r"\boxed{3}", r"\boxed{3} so \boxed{3.0}", r"\boxed{4} or \boxed{3}"]
    assert accuracy([""] * 4, completions, answer=golds) == [0.0, 1.0, 1.0, 0.0]


def test_accuracy_rows():
    prompts = ["p"] * 5
    completions = [r"<think>x</think>\boxed{\frac{1}{2}}", "I think it is 0.6", r"\boxed{0.5}", "#### 72", "code"]
    golds = ["0.5", "0.5", r"\boxed{\dfrac12}", "72", None]
    assert accuracy(prompts, completions, answer=golds, source=["math"] * 5) == [1.0, 0.0, 1.0, 1.0, None]
    with pytest.raises(ValueError, match="answer"):
        accuracy(prompts, completions, answer=golds[:2])
    with pytest.raises(ValueError, match="column 'answer'"):
        accuracy(prompts, completions, source=["math"] * 5)


def test_timeout_kills_worker_and_pool_recovers():
    pool = get_pool()
    while len(pool.workers) < pool.size or not all(w.ready for w in pool.workers):
        verify_batch(["x+1"] * 4, [f"1+x+{k}-{k}" for k in range(4)], cache=False)
    before = pool.timeouts
    start = time.monotonic()
    assert not is_equivalent("1", "9^{9^{9^{9}}}", timeout=1.0)
    assert time.monotonic() - start < 1.0 + 3.0  # the 1 s timeout plus slack for a loaded machine (the tower never ends)
    assert pool.timeouts == before + 1
    assert is_equivalent(r"\sqrt{4}", "2")
    assert not is_equivalent("9^{9^{9^{9}}}", "9^{9^{9^{9}}}+1", timeout=1.0)


def test_works_from_threads():
    results = {}

    def check(k):
        results[k] = is_equivalent(f"x+{k}", f"{k}+x") and not is_equivalent(f"x+{k}", f"{k}-x")

    threads = [threading.Thread(target=check, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {k: True for k in range(4)}


def test_separate_pool_and_bad_timeout():
    pool = VerifierPool(size=1)
    try:
        assert pool.run([("x^2-1", "(x-1)(x+1)"), ("x^2", "x^3")], timeout=10) == [True, False]
        with pytest.raises(ValueError, match="timeout"):
            pool.run([("1", "2")], timeout=0)
    finally:
        pool.close()
    assert pool.workers == []


def _rows(name):
    path = DATA / name
    if not path.exists():
        pytest.skip(f"{path} absent")
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_math500_answer_matches_solution_boxed():
    rows = _rows("math500_test.jsonl")
    golds = [r["answer"] for r in rows]
    boxed = [extract_answer(r["solution"]) for r in rows]
    agree = verify_batch(golds, [b or "" for b in boxed], timeout=5.0)
    rate = sum(agree) / len(rows)
    print(f"MATH-500 answer vs solution boxed agreement: {sum(agree)}/{len(rows)} = {rate:.3f}")
    assert rate >= 0.98


def test_math500_answer_in_other_forms():
    rows = _rows("math500_test.jsonl")
    golds = [r["answer"] for r in rows]
    forms = [rf"<think>work</think> The result is $\boxed{{{g}}}$." for g in golds]
    assert accuracy([""] * len(rows), forms, answer=golds) == [1.0] * len(rows)
    wrong = [rf"\boxed{{{g}}} or \boxed{{{g}+1}}" for g in golds[:50]]
    assert sum(accuracy([""] * 50, wrong, answer=golds[:50])) <= 2


RUNNING_TEXT_FORMS = ["So we get ${g}$.", "**Answer:** ${g}$", "Thus the value is \\({g}\\).",
                      "<think>hmm 12</think>\nTherefore the result is\n\\[{g}\\]", "Hence ${g}$ is the answer.",
                      "After simplification, we find that the required quantity equals ${g}$.", "<answer>{g}</answer>"]


def _wrong(gold):
    digits = list(re.finditer(r"\d", gold))
    if not digits:
        return gold + "+1"
    m = digits[-1]
    return gold[: m.start()] + str((int(m.group()) + 1) % 10) + gold[m.end():]


@pytest.mark.parametrize("form", RUNNING_TEXT_FORMS)
def test_math500_answers_in_running_text(form):
    rows = _rows("math500_test.jsonl")
    golds = [r["answer"] for r in rows]
    assert correctness([form.format(g=g) for g in golds], golds) == [True] * len(rows)
    golds = golds[:200]  # the wrong answers mostly need sympy: a sample keeps the test fast
    accepted = [g for g, ok in zip(golds, correctness([form.format(g=_wrong(g)) for g in golds], golds)) if ok]
    assert set(accepted) <= {r"864 \mbox{ inches}^2", r"15\mbox{ cm}^2"}  # only a unit's exponent changed


def _unboxed(text):
    while (i := text.rfind("\\boxed{")) >= 0:
        depth, j = 0, i + 6
        for j in range(i + 6, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                break
        text = text[:i] + text[i + 7:j] + text[j + 1:]
    return text


def test_running_text_rules_on_solutions_without_their_markers():
    rows = _rows("math500_test.jsonl")
    got = correctness([_unboxed(r["solution"]) for r in rows], [r["answer"] for r in rows])
    print(f"MATH-500 solutions with the boxes removed: {sum(got)}/{len(rows)}")
    assert sum(got) >= 0.92 * len(rows)
    rows = _rows("gsm8k_test.jsonl")
    got = correctness([r["answer"].split("####")[0] for r in rows], [r["answer"] for r in rows])
    print(f"GSM8K solutions without ####: {sum(got)}/{len(rows)}")
    assert sum(got) >= 0.97 * len(rows)


def test_gsm8k_final_answers():
    rows = _rows("gsm8k_test.jsonl")
    golds = [r["answer"] for r in rows]
    finals = [extract_answer(g) for g in golds]
    assert all(f is not None for f in finals)
    numbers = [f.replace(",", "") for f in finals]
    assert verify_batch(golds, numbers) == [True] * len(rows)
    assert verify_batch(golds, [str(int(n) + 1) for n in numbers]) == [False] * len(rows)


def test_forked_child_gets_its_own_pool(monkeypatch):
    pool = get_pool()
    monkeypatch.setattr(pool, "pid", -1)  # as if this process were a fork of the pool's owner
    workers = list(pool.workers)
    pool.close()  # a foreign pool is never closed from here
    assert pool.workers == workers
    fresh = get_pool()
    assert fresh is not pool and fresh.pid == os.getpid()
    assert is_equivalent(r"\frac{x}{2}", "0.5x")
    fresh.close()


def test_workers_exit_with_their_parent():
    script = (
        "import os, sys; sys.path.insert(0, os.getcwd()); from rewards.math import VerifierPool\n"
        "pool = VerifierPool(size=1); pool.run([('x', 'y')], timeout=60); w = pool.workers[0]\n"
        "w.send(0, '9^{9^{9^{9}}}', '9^{9^{9^{9}}}+1', 60); print(w.proc.pid, flush=True); os._exit(0)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.2)
    assert not _alive(pid)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_worker_that_cannot_start_is_a_clear_error(monkeypatch):
    import rewards.math as rmath

    monkeypatch.setattr(rmath, "_BOOT", "import sys; sys.stderr.write('No module named sympy'); sys.exit(3)")
    pool = VerifierPool(size=1)
    with pytest.raises(RuntimeError, match="exited during start-up(.|\n)*No module named sympy"):
        pool.run([("x", "y")])
    assert pool.workers == []
