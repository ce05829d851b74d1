"""The math checker's options (MathConfig / the accuracy reward's kwargs), bad input, and hardening: inputs that
would make extraction or sympy slow, hanging checks from threads."""
import threading
import time

import pytest

from rewards.math import MathConfig, accuracy, correctness, get_pool, is_equivalent, verify_batch
from rewards.math_extract import final_answers
from rewards.registry import RewardSet, RewardSpec


@pytest.mark.parametrize("gold,pred,option,default,changed", [
    ("1.0", "1.001", {"rel_tol": 1e-2}, False, True),
    (r"\sqrt{2}", "1.41", {"approx_min_digits": 4}, True, False),
    (r"\sqrt{2}", "1.41421", {"approx_min_digits": None}, True, True),
    (r"\sqrt{2}", "1.414", {"approx_min_digits": None}, True, False),
    ("3", "x = 3", {"assignment": False}, True, False),
    ("6, 2", "PQ = 6, RS = 2", {"assignment": False}, True, False),
    ("x < 3", r"(-\infty, 3)", {"sets": "strict"}, True, False),
    (r"t \in [1, 4]", r"1 \le t \le 4", {"sets": "strict"}, True, False),
    (r"(-\infty, 1) \cup (2, \infty)", r"x<1 \text{ or } x>2", {"sets": "strict"}, True, False),
    ("(1, 2]", "(1, 2]", {"sets": "strict"}, True, True),
    ("5", r"5\text{ cm}", {"units": False}, True, False),
    ("12", r"12 \text{ meters}", {"units": False}, True, False),
    ("4", r"\boxed{3} or \boxed{4}", {"multiple_answers": "last"}, False, True),
    ("3", r"\boxed{3} or \boxed{4}", {"multiple_answers": "last"}, False, False),
])
def test_each_option_changes_the_verdict_it_names(gold, pred, option, default, changed):
    assert is_equivalent(gold, pred) is default
    assert is_equivalent(gold, pred, **option) is changed
    assert correctness([pred], [gold], config=MathConfig(**option)) == [changed]


@pytest.mark.parametrize("options,message", [
    ({"sets": "loose"}, r"sets='loose': expected 'lenient' or 'strict'"),
    ({"multiple_answers": "first"}, r"multiple_answers='first': expected 'all' or 'last'"),
    ({"rel_tol": -1}, r"rel_tol=-1: expected a number > 0"),
    ({"rel_tol": 2.0}, r"rel_tol=2.0: expected a number in \(0, 1\)"),
    ({"approx_min_digits": 0}, r"approx_min_digits=0: expected an integer >= 1 or None"),
    ({"timeout": 0}, r"timeout=0: expected a number > 0"),
    ({"units": "yes"}, r"units='yes': expected true or false"),
    ({"precision": 6}, r"unknown math checker option\(s\) precision; known: .*approx_min_digits"),
])
def test_bad_options_are_named_with_what_is_allowed(options, message):
    with pytest.raises(ValueError, match=message):
        is_equivalent("1", "1", **options)


def test_accuracy_kwargs_from_a_recipe():
    rewards = RewardSet([RewardSpec(name="accuracy", kwargs={"multiple_answers": "last", "timeout": 5.0})])
    got = rewards(["p", "p"], [r"\boxed{3} or \boxed{4}", r"\boxed{4}"], answer=["4", "3"], source=["math", "math"])
    assert got.per_reward["accuracy"] == [1.0, 0.0]
    with pytest.raises(ValueError, match="accuracy: unknown option.* precision; options: .*rel_tol"):
        accuracy(["p"], ["1"], answer=["1"], precision=6)
    assert accuracy(["p"], ["1"], answer=["1"], completion_lengths=[3]) == [1.0]  # columns are not options


def test_both_entry_points_agree_on_texts_both_sides():
    gold = r"The solution gives $x = 11$, so the answer is $\boxed{11}$."
    for pred, want in [("So $x=11$.", True), ("11", True), (r"\boxed{12}", False), ("Hence x = 11.", True)]:
        assert is_equivalent(gold, pred) is want
        assert correctness([pred], [gold]) == [want]


@pytest.mark.parametrize("text", [
    "\\boxed{" * 5000, "answer is " * 10000, "\\[" * 20000, "\\(x" * 20000, "$$a" * 20000, "{" * 30000,
    "\\begin{align}" * 5000, "1 " * 50000, ". " * 50000, "$1$ and " * 5000, "(" * 50000 + "1",
])
def test_extraction_stays_fast_on_pathological_text(text):
    """Linear-time extraction: CPU time (not wall time, which a loaded machine stretches) stays well under a
    second; the quadratic scan this guards against took 4.4 s on the 5,000-deep box."""
    start = time.process_time()
    final_answers(text)
    assert time.process_time() - start < 1.0


def test_garbage_answers_are_refused_without_sympy():
    pool = get_pool()
    before = len(pool.workers), pool.timeouts
    start = time.perf_counter()
    huge = r"\boxed{" + "+".join(["1"] * 3000) + "}"
    assert verify_batch(["3000", "1", "3"], [huge, "$1$ and " * 5000, "x" * 100000]) == [False, False, False]
    assert time.perf_counter() - start < 3.0  # refused up front: no sympy, no worker timeout (3 s by default)
    assert (len(pool.workers), pool.timeouts) == before


HANGING = [("1", "9^{9^{9^{9}}}"), ("1", r"\prod_{k=1}^{10^{9}} k"), ("2", r"\sum_{n=1}^{10^{10}} \frac{1}{n^2}")]


def _warm(pool):
    while len(pool.workers) < pool.size or not all(w.ready for w in pool.workers):
        verify_batch(["x+1"] * pool.size, [f"1+x+{k}-{k}" for k in range(pool.size)], cache=False)


def test_latex_that_makes_sympy_hang_is_cut_at_the_timeout_from_a_thread():
    pool = get_pool()
    _warm(pool)
    before = pool.timeouts
    took, got = {}, {}

    def check(k):
        start = time.perf_counter()
        got[k] = verify_batch([HANGING[k][0]], [HANGING[k][1]], timeout=1.0, cache=False)[0]
        took[k] = time.perf_counter() - start

    t = threading.Thread(target=check, args=(0,))
    t.start()
    t.join(30)
    assert got == {0: False} and took[0] < 1.0 + 2.0  # the 1 s timeout, plus slack for a loaded machine
    assert pool.timeouts == before + 1
    _warm(pool)
    start = time.perf_counter()
    assert verify_batch(*map(list, zip(*HANGING[1:])), timeout=1.0, cache=False) == [False, False]
    assert time.perf_counter() - start < 1.9  # both hang in parallel on the two workers (one after the other: >= 2 s)
    assert pool.timeouts == before + 3
    assert is_equivalent(r"\sqrt{4}", "2", timeout=30)  # the replacements work


def test_concurrent_threads_get_their_own_verdicts():
    results, errors = {}, []
    golds = [rf"\frac{{{k}}}{{{k + 1}}}" for k in range(1, 7)]

    def check(k):
        try:
            mine = [f"{k}/{k + 1}", f"{k + 1}/{k}", rf"\boxed{{\dfrac{{{k}}}{{{k + 1}}}}}"]
            results[k] = verify_batch([golds[k - 1]] * 3, mine, cache=False)
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=check, args=(k,)) for k in range(1, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert results == {k: [True, False, True] for k in range(1, 7)}
