"""Intra-op threads for CPU work (the engine's decoding, ``grpo.trainer``'s updates): torch's count while the
process has its CPUs to itself, fewer when other processes keep some of them busy.

A parallel region whose threads are descheduled waits at its barrier: on a shared 2-core machine (load 2.6)
two threads made a rollout 20x and a GRPO update 12x slower than one thread; alone, one thread costs at most a
factor of the core count. What counts is the others' load, not this process's own: the 1-minute load average
(the rule before: one thread above a load of the core count) includes this process's threads, which in a long
run on two threads hold it near 2 by themselves, so on a 2-core machine any other small job tipped it.
"""
from __future__ import annotations

import contextlib
import math
import os
import time

import torch

_WINDOW_S = 0.1  # shortest measurement window
_last: list = []  # [monotonic s, busy s of this process's CPUs, this process's CPU s, cores busy elsewhere]


@contextlib.contextmanager
def cpu_threads(device: torch.device, fixed: int = 0):
    """On CPU, torch's intra-op threads inside the block: ``fixed``, or ``auto_cpu_threads`` when 0; restored
    afterwards. Yields the count used (None off the CPU)."""
    if device.type != "cpu":
        yield None
        return
    before = torch.get_num_threads()
    torch.set_num_threads(fixed or auto_cpu_threads(before))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def auto_cpu_threads(default: int) -> int:
    """``default`` (torch's count) capped at the cores that other processes leave free (``busy_elsewhere``,
    rounded half up), at least 1. An explicit ``OMP_NUM_THREADS`` is a fixed choice and is kept whatever the
    load: the thread count changes how reductions split, so a run that names it is reproducible
    (``stages.pipeline``'s ``threads`` sets it for every step). Without /proc/stat: ``default``."""
    others = None if os.environ.get("OMP_NUM_THREADS") else busy_elsewhere()
    if others is None:
        return default
    return max(1, min(default, math.floor(len(os.sched_getaffinity(0)) - others + 0.5)))


def busy_elsewhere() -> float | None:
    """Cores that other processes kept busy on this process's CPUs: the CPUs' busy time (/proc/stat: user,
    nice, system, irq, softirq, steal) minus this process's CPU time, per wall second, since the previous
    measurement (one every ``_WINDOW_S`` at most; the first call waits ``_WINDOW_S``). None without
    /proc/stat."""
    busy = _busy_seconds(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    if busy is None:
        return None
    now = [time.monotonic(), busy, time.process_time()]
    if not _last:
        _last[:] = [*now, None]
        time.sleep(_WINDOW_S)
        return busy_elsewhere()
    elapsed = now[0] - _last[0]
    if elapsed >= _WINDOW_S:
        _last[:] = [*now, max(0.0, (now[1] - _last[1] - (now[2] - _last[2])) / elapsed)]
    return _last[3]


def _busy_seconds(cpus: set[int]) -> float | None:
    """Busy seconds so far of ``cpus`` (/proc/stat's per-CPU lines), or None where it cannot be read."""
    try:
        with open("/proc/stat") as f:
            rows = [line.split() for line in f if line.startswith("cpu") and line[3].isdigit()]
    except OSError:
        return None
    ticks = sum(int(v) for r in rows if int(r[0][3:]) in cpus for v in (*r[1:4], *r[6:9]))
    return ticks / os.sysconf("SC_CLK_TCK")
