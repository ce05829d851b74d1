"""The verifier pool from several threads at once: a thread whose batch hangs until the timeout does not hold up
another thread's checks; each call returns within (its checks x timeout + slack); verdicts never cross callers."""
import threading
import time

from rewards.math import VerifierPool

HANG = ("1", "9^{9^{9^{9}}}")  # sympy computes this tower until the worker is killed


def _ready(pool):
    while len(pool.workers) < pool.size or not all(w.ready for w in pool.workers):
        assert pool.run([("x+1", "1+x")] * pool.size, timeout=120) == [True] * pool.size


def _startup_seconds():
    """How long one worker takes to start on this machine now (a loaded 2-core box: seconds)."""
    pool = VerifierPool(size=1)
    try:
        start = time.monotonic()
        _ready(pool)
        return time.monotonic() - start
    finally:
        pool.close()


def test_a_hanging_batch_does_not_hold_up_another_threads_checks():
    timeout, hangs = 2.5, 6
    startup = _startup_seconds()
    slack = 3.0 + 3 * startup  # restarting a killed worker costs a start-up (seconds on a loaded 2-core box)
    pool = VerifierPool(size=2)
    try:
        _ready(pool)
        took, ended, got, errors = {}, {}, {}, []

        def call(name, pairs):
            start = time.monotonic()
            try:
                got[name] = pool.run(pairs, timeout=timeout)
            except Exception as e:  # noqa: BLE001  (reported below)
                errors.append(e)
            ended[name] = time.monotonic()
            took[name] = ended[name] - start

        quick = [("x^2-1", "(x-1)(x+1)"), ("2x", "x+x"), ("x^2", "x^3")]
        mixed = [HANG] * hangs + quick * 2
        a = threading.Thread(target=call, args=("hanging", mixed))
        a.start()
        deadline = time.monotonic() + 30
        while not all(w.task is not None for w in list(pool.workers)) and time.monotonic() < deadline:
            time.sleep(0.01)  # both workers are busy with the hanging batch
        b = threading.Thread(target=call, args=("quick", quick))
        b.start()
        for t in (a, b):
            t.join(len(mixed) * timeout + slack + 60)
        assert not errors
        assert got == {"hanging": [False] * hangs + [True, True, False] * 2, "quick": [True, True, False]}
        # The quick batch waits for one hanging check to be cut and its worker replaced, not for the whole
        # hanging batch (three rounds of two hanging checks, each round a timeout and a restart).
        assert ended["quick"] + timeout < ended["hanging"], (took, startup)
        assert took["quick"] < len(quick) * timeout + slack, (took, startup)
        assert took["hanging"] < len(mixed) * timeout + slack, (took, startup)
        assert pool.timeouts == hangs
        _ready(pool)
        assert pool.run(quick, timeout=30) == [True, True, False]  # the replacements work
    finally:
        pool.close()


def test_many_threads_interleave_and_keep_their_own_verdicts():
    pool = VerifierPool(size=2)
    try:
        _ready(pool)
        got, errors = {}, []

        def call(k):
            pairs = [(f"x+{k}", f"{k}+x"), (f"x+{k}", f"{k}-x"), (f"{k}", f"{k + 1}-1"), (f"{k}", f"{k}+1")]
            try:
                got[k] = pool.run(pairs, timeout=60)
            except Exception as e:  # noqa: BLE001  (reported below)
                errors.append(e)

        threads = [threading.Thread(target=call, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors
        assert got == {k: [True, False, True, False] for k in range(6)}
    finally:
        pool.close()
