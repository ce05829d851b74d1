"""grpo.engine.threads: the CPU thread count follows the load of other processes, not this one's."""
import pytest

from grpo.engine import threads


@pytest.fixture
def two_cpus(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


@pytest.mark.parametrize("others, expected", [(0.0, 2), (0.5, 2), (0.6, 1), (1.3, 1), (64.0, 1)])
def test_threads_are_the_cores_others_leave_free(monkeypatch, two_cpus, others, expected):
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: others)
    assert threads.auto_cpu_threads(2) == expected


def test_a_named_count_or_no_measurement_keeps_the_default(monkeypatch, two_cpus):
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: 64.0)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # a named count is kept: the run stays reproducible
    assert threads.auto_cpu_threads(2) == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: None)  # no /proc/stat
    assert threads.auto_cpu_threads(2) == 2


def test_busy_elsewhere_subtracts_this_process_and_keeps_short_windows(monkeypatch):
    # (wall s, busy s of the CPUs, own CPU s) at each reading
    readings = iter([(0.0, 10.0, 5.0), (0.1, 10.2, 5.15), (1.1, 12.0, 6.9), (1.15, 12.1, 6.95), (3.15, 15.0, 9.0)])
    now = {}

    def advance():
        now["t"], now["busy"], now["own"] = next(readings)

    monkeypatch.setattr(threads, "_last", [])
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    monkeypatch.setattr(threads.time, "monotonic", lambda: now["t"])
    monkeypatch.setattr(threads.time, "process_time", lambda: now["own"])
    monkeypatch.setattr(threads, "_busy_seconds", lambda cpus: (advance(), now["busy"])[1])
    # first call: a reading, the wait, a second reading; 0.2 busy s of which 0.15 own over 0.1 s -> 0.5 cores
    assert threads.busy_elsewhere() == pytest.approx(0.5)
    assert threads.busy_elsewhere() == pytest.approx((1.8 - 1.75) / 1.0)  # this process alone: ~0 elsewhere
    assert threads.busy_elsewhere() == pytest.approx(0.05)  # 0.05 s after: the last estimate
    assert threads.busy_elsewhere() == pytest.approx((3.0 - 2.1) / 2.05)  # measured from the last window's start


def test_busy_seconds_reads_this_machine():
    import os
    busy = threads._busy_seconds(os.sched_getaffinity(0))
    assert busy is None or busy > 0
