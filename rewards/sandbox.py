"""A local sandbox for untrusted Python: namespaces, unprivileged uids, seccomp, cgroups, and a verdict the program cannot forge.

Threat model
------------
The program is arbitrary, possibly adversarial Python written by the policy under RL, which is rewarded for
passing tests and will exploit any shortcut, including lowering the rewards of its group-mates. It must not be
able to (a) harm or read the host (files, processes, network, kernel state, the trainer's keys; memory or CPU
beyond its share), (b) outlive its run, (c) pass anything to another run (a later sample, or a concurrent one),
or (d) make failing code score as passing. We trust the kernel, util-linux ``unshare``/``setpriv``, the Python
interpreter, the dataset's tests and the row's prompt (tests still run sandboxed, so a broken or hostile test
can only fail). Kernel exploits are out of scope; the seccomp filter only narrows the kernel surface.

Isolation (strong mode, the default; needs root on Linux and util-linux ``unshare`` and ``setpriv``)
  * ``unshare --pid --fork --kill-child --net --mount --ipc --uts``: own pid space (it cannot see or signal any
    host process; ``kill -9 -1`` only reaches its own processes), no network (a fresh net namespace with only a
    downed loopback), private mounts, SysV IPC and hostname (``sandbox``), and a cgroup namespace rooted at the
    run's cgroup;
  * ``rewards/sandbox_child.py`` (trusted, runs before any untrusted byte is read) builds a new root holding
    only read-only, nosuid mounts of /usr and the interpreter (an interpreter installed outside /usr appears at
    ``/opt/python`` through an overlay whose options name no host path), four /dev nodes, a /proc mounted with
    ``hidepid`` (other uids' processes are invisible) where host-wide files are masked (/proc/cmdline, keys,
    kallsyms, ...), and a private size-capped /tmp (the working directory), and chroots into it. The process
    that runs the program then executes a fresh interpreter from that neutral path, so its argv, ``sys.path``,
    ``sys.executable`` and module file names hold no host path. The project tree, /root, /home, the host's /tmp
    and the datasets do not exist in there;
  * uids: each trainer process locks a range of ``UID_RANGE`` uids for itself (``flock`` on a file under
    ``LOCK_DIR``, released by the kernel when the process dies; a range some live process runs in is skipped),
    so concurrent trainers (ranks, an evaluation) never share a uid and its per-uid limits; each pool slot gets
    two uids, the program's and the checker's. No groups, no capabilities, no_new_privs, a fresh empty session
    keyring (the trainer's is not inherited), a minimal environment (no host variables, so no tokens leak);
  * seccomp (``rewards/sandbox_seccomp.py``): keyrings, ptrace, mount and namespace calls, bpf,
    perf_event_open, userfaultfd, io_uring, kexec and modules, memfd_create and SysV shared memory, CPU
    affinity, sockets other than unix/IP/netlink, raw sockets and other ABIs are refused;
  * cgroups (``rewards/sandbox_cgroup.py``, v1 and v2): each run gets its own under this process's cgroup, with
    a memory limit covering all its pages (``memory_mb + tmpfs_mb``: processes, memfd, tmpfs, page cache; no
    swap), a CPU quota of ``max(1, CPUs / workers)`` CPUs and the weight of its two processes, and a process
    cap; removed when the run ends. Without them (no root over a writable hierarchy) the pool says so loudly and
    runs at most one run per CPU, each pinned to its own CPU (seccomp keeps it there); memory is then bounded
    per process only (RLIMIT_AS; what it does not count is refused by seccomp);
  * rlimits: CPU seconds, address space, file size, open files, processes/threads (per uid), no core dumps;
  * wall clock: the parent kills the namespace's init on timeout; the kernel then kills every process of the
    namespace, double-forked daemons included, before the run is reported done. Any run (timeout or not) ends
    with the namespace torn down: nothing it started survives it, not even a crash of the parent (``setpriv
    --pdeathsig KILL`` on unshare, whose ``--kill-child`` then takes the namespace down; ``isolation_problem``
    refuses to run without ``setpriv``);
  * stdout/stderr are read up to ``max_output_bytes`` each; a run that writes more is killed and fails.
Weak mode (``allow_weak_isolation=True``, used only when strong isolation is unavailable, with a loud warning
every time a pool starts): a separate process in its own session with the same rlimits, seccomp filter, fresh
keyring, timeout and output caps, and the uid drop when running as root (the interpreter's files must then be
readable by other users, or the program cannot import modules); no namespaces, so it sees the host filesystem
and network, and only its session is killed at the end. It is NOT secure against hostile code; use it only to
develop on machines without root.

Verdict (``run_tests``): the tests never enter the program's process
  * the program is loaded in a *candidate* process; the tests run in a *checker* process beside it (same
    namespaces, another uid, its own /var/tmp) where every name the tests take from the program
    (``plan_tests``) is a stub. A call ``f(x)`` sends ``("f", x)`` over a pipe; the candidate runs ``f(x)`` and
    sends back the result. Only plain values cross, in a tagged binary encoding (``sandbox_child.encode``) that
    the checker decodes into exact builtin types (None, bool, int, float, complex, str, bytes, list, tuple, dict,
    set, frozenset); anything else is an error in that test;
  * so the candidate cannot read or change the tests or the checker (another process under another uid: hidden
    by ``hidepid``, out of reach of its signals, ``/proc/<pid>/mem`` and ptrace; no test file exists in its
    filesystem); an object whose ``__eq__`` always returns True never reaches the comparison (it cannot be
    encoded; a builtin subclass arrives as its plain base value); patching builtins, ``AssertionError``,
    ``__import__`` or the harness only changes the candidate's own process; exiting early (``sys.exit``,
    ``os._exit``, ``SystemExit``, ``KeyboardInterrupt``) just leaves calls unanswered, i.e. failed; the pass/fail
    lines come from the checker only, and units without one failed;
  * the tests trust nothing the program supplies beyond its answers: names the prompt defines (helpers such as
    HumanEval's ``poly``, the oracle of its test) are the prompt's, run in the checker, and with an
    ``entry_point`` the program supplies only that function (and functions the prompt declares without a body);
    a ``StopIteration`` the program raises is an error (it would end a ``map`` inside ``all(...)`` early); the
    arguments it receives are copies, and its in-place changes are mirrored back only for a call made as a
    statement of its own (``sort_in_place(xs)``), never for a call whose value the tests use, so it cannot change
    the expected side of ``assert f(xs) == g(xs)`` or of a later ``assert out == ref(xs)``;
  * test units are the top-level test statements that check something: those holding an ``assert`` or a
    ``raise`` (an assert, a loop of asserts, ``if f(x) != y: raise ...``) and calls of functions the tests define
    (HumanEval's ``check(candidate)``, one unit). Everything else (imports, definitions, assignments, bare calls)
    is setup: it runs in order, and a failure there shows in the units that depend on it.
Limits of this protocol: arguments and results must be plain values (tests passing lambdas or test-defined
objects, or expecting program-defined class instances back, fail); in-place changes to list/dict/set arguments are
mirrored back only from statement calls and only one level deep; a program's module-level names that shadow
builtins are not seen by the tests (unlike plain ``exec``, where a program could redefine ``sorted`` for the
tests); the program runs as module ``candidate``, so its ``if __name__ == "__main__":`` block does not run; a
prompt that carries a full solution of a function the tests use (other than the entry point) supplies it.

stdin/stdout (``run_script``): one sandboxed run per case; the parent feeds the input and reads the output, so
there is nothing to forge; comparison is the caller's (``rewards.code``).
Not covered: a concurrent run can still observe timing (load) of its neighbours; host pids of other containers
sharing this kernel are not seen when ranges are chosen (the uid lock is per machine's /run).
"""
from __future__ import annotations

import ast
import atexit
import builtins
import contextlib
import fcntl
import functools
import itertools
import logging
import marshal
import math
import os
import py_compile
import queue
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, TypeVar

from grpo.config import ConfigError
from rewards import sandbox_cgroup, sandbox_child, sandbox_seccomp

log = logging.getLogger(__name__)
T = TypeVar("T")

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
# Imported as a module (not run as a script) so that its cached bytecode is used: compiling it costs more than
# starting the interpreter. It is loaded before the chroot, and before the uid drop in weak mode.
BOOT = f"import sys; sys.path[:] = [{os.path.dirname(CHILD)!r}] + sys.path; import sandbox_child; sandbox_child.main()"
NEW_ROOT = "/tmp"  # where sandbox_child.py mounts the new root inside its private mount namespace
EXIT_GRACE = 0.2  # weak mode: seconds the candidate gets to exit on its own after the checker is done
STATEMENT_CALL = sandbox_child.STATEMENT_CALL
NAMESPACES = ["--pid", "--fork", "--kill-child", "--net", "--mount", "--ipc", "--uts", "--propagation", "private"]


@dataclass(kw_only=True, frozen=True)
class SandboxConfig:
    """Limits of one sandboxed run and the size of the pool that runs them."""

    timeout: float = 5.0  # wall-clock seconds per run (for run_tests: the program plus all of its tests)
    memory_mb: int = 512  # RLIMIT_AS per process
    max_processes: int = 8  # RLIMIT_NPROC for the slot's uid (processes + threads, checker included)
    max_open_files: int = 64  # RLIMIT_NOFILE
    max_file_mb: int = 16  # RLIMIT_FSIZE
    tmpfs_mb: int = 64  # size of the private writable /tmp
    max_output_bytes: int = 1 << 20  # per stream; a run writing more is killed
    workers: int = 0  # concurrent runs; 0 = os.cpu_count()
    base_uid: int = 60000  # slot i runs as uid base_uid + i
    allow_weak_isolation: bool = False  # fall back to rlimits + timeout only when namespaces are unavailable

    def __post_init__(self):
        if not self.timeout > 0:
            raise ConfigError("timeout", f"must be > 0 seconds, got {self.timeout}")
        for name in ("memory_mb", "max_processes", "max_open_files", "max_file_mb", "tmpfs_mb", "max_output_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.max_open_files < 8:
            raise ConfigError("max_open_files", f"must be >= 8 (the interpreter needs a few), got {self.max_open_files}")
        if self.memory_mb < 64:
            raise ConfigError("memory_mb", f"must be >= 64 (the interpreter alone needs ~20 MB), got {self.memory_mb}")
        if self.workers < 0:
            raise ConfigError("workers", f"must be >= 0 (0 = one per CPU), got {self.workers}")
        if not 1000 <= self.base_uid <= 2**31 - 100000:
            raise ConfigError("base_uid", f"must be an unprivileged uid in [1000, 2**31 - 100000], got {self.base_uid}")


class SandboxUnavailable(RuntimeError):
    """Strong isolation is not possible on this machine and weak isolation was not allowed."""


@dataclass
class RunResult:
    """One ``run_script``: exit status (``-signal`` or ``128+signal`` when killed), captured output, what went wrong."""

    returncode: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    output_exceeded: bool = False
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.output_exceeded


@dataclass
class TestPlan:
    """Tests split into top-level statements; ``n_units`` of them are scored.

    statements: [(source, is_unit)], the prompt's definitions first (setup); candidate_names: names the tests take
    from the program (stubbed); modules: stdlib modules the tests use without importing them (MBPP tests lean on
    the program's imports); prelude: the prompt's imports and helper definitions, also run before the program.
    """

    statements: list[tuple[str, bool]]
    candidate_names: list[str]
    modules: list[str]
    prelude: list[str] = field(default_factory=list)

    @property
    def n_units(self) -> int:
        return sum(is_unit for _, is_unit in self.statements)

    @functools.cached_property
    def checker_statements(self) -> list[tuple[str, bool]]:
        """The statements as the checker runs them: every call made as a statement of its own goes through
        ``sandbox_child.statement_call``, the only place where the program's in-place changes to its arguments
        are mirrored back (see ``sandbox_child``)."""
        return [(ast.unparse(_StatementCalls().visit(ast.parse(source))), unit) for source, unit in self.statements]


class _StatementCalls(ast.NodeTransformer):
    def visit_Expr(self, node: ast.Expr):
        self.generic_visit(node)
        if isinstance(node.value, ast.Call):
            call = node.value
            node.value = ast.Call(func=ast.Name(STATEMENT_CALL, ast.Load()), args=[call.func, *call.args],
                                  keywords=call.keywords)
            ast.copy_location(node.value, call)
        return node


@dataclass
class TestResult:
    """One ``run_tests``: per-unit pass/fail [n_units], the error type of failed units ('not run' when the checker
    never reported them), and the tails of both processes' stderr for diagnosis."""

    passed: list[bool]
    errors: list[str]
    timed_out: bool = False
    output_exceeded: bool = False
    wall_s: float = 0.0
    stderr: bytes = b""
    checker_stderr: bytes = b""

    @property
    def pass_rate(self) -> float:
        return sum(self.passed) / len(self.passed)


# --------------------------------------------------------------------------------------------- test plans
NOT_UNITS = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign,
             ast.AnnAssign, ast.AugAssign, ast.Pass)


def plan_tests(tests: str | list[str], entry_point: str | None = None, prompt: str | None = None) -> TestPlan:
    """Split assert-style tests (a source string, or MBPP-style list of assert lines) into scored units.

    A HumanEval-style ``def check(candidate)`` that the tests never call is called as ``check(<entry_point>)``.
    Names the tests use come from, in order: the tests themselves, the prompt's own definitions (helpers with a
    body, such as HumanEval's ``poly`` or ``encode_cyclic``, imports and constants: the checker runs them, so
    the program can never supply a test's oracle), the standard library (``module.attr``), and the program.
    With an ``entry_point``, the program supplies only that function and the functions the prompt declares
    without a body; a test that uses any other undefined name is refused. Raises ValueError on tests that do not
    parse, contain nothing to score, or use names nobody defines.
    """
    if isinstance(tests, (list, tuple)) and all(isinstance(t, str) for t in tests):
        tests = "\n".join(tests)
    if not isinstance(tests, str):
        raise ValueError(f"tests must be a string of Python test code or a list of such lines, got {type(tests).__name__}")
    if entry_point is not None and not (isinstance(entry_point, str) and entry_point.isidentifier()):
        raise ValueError(f"entry_point must be a Python identifier, got {entry_point!r}")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string (the row's prompt text), got {type(prompt).__name__}")
    try:
        tree = ast.parse(tests)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise ValueError(f"tests do not parse: {type(e).__name__}: {e}") from None
    body = list(tree.body)
    defines_check = any(isinstance(n, ast.FunctionDef) and n.name == "check" and n.args.args for n in body)
    calls_check = any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "check"
                      for n in ast.walk(tree))
    if defines_check and not calls_check:
        if entry_point is None:
            raise ValueError("tests define check(candidate) but never call it, and no entry_point names the function")
        body.append(ast.parse(f"check({entry_point})").body[0])
    test_functions = {n.name for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    statements = [(ast.unparse(node), _is_unit(node, test_functions)) for node in body]
    if not any(is_unit for _, is_unit in statements):
        raise ValueError("tests contain no test statement (an assert or raise, or a call of a function the tests define)")
    free, attribute_bases = _free_names(body)
    modules = {n for n in free & attribute_bases if n in sys.stdlib_module_names}
    prelude, helpers, stubs = prompt_definitions(prompt or "", entry_point)
    wanted = free - modules - helpers
    if entry_point is not None:
        unknown = wanted - stubs - {entry_point}
        if unknown:
            raise ValueError(
                f"tests use {', '.join(sorted(unknown))}, which neither the tests, the prompt nor the standard library "
                f"define, and the program may only supply the entry point {entry_point!r}"
                + (f" and the functions the prompt declares ({', '.join(sorted(stubs))})" if stubs else "")
                + "; give the prompt that defines them, or no entry_point to let the program supply every free name")
        wanted |= {entry_point}
    setup = [(source, False) for source in prelude]
    return TestPlan(setup + statements, sorted(wanted), sorted(modules), prelude)


def _free_names(body: list[ast.stmt]) -> tuple[set[str], set[str]]:
    """Names the statements load but never bind (builtins excluded), and the names used as ``name.attr``."""
    loads, bound, attribute_bases = set(), set(), set()
    for node in itertools.chain.from_iterable(ast.walk(n) for n in body):
        if isinstance(node, ast.Name):
            (loads if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and node.name:
            bound.add(node.name)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            bound.add(node.rest)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            attribute_bases.add(node.value.id)
    return loads - bound - set(dir(builtins)), attribute_bases


PROMPT_FENCE = re.compile(r"^[ \t]*```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)^[ \t]*```", re.M | re.S | re.I)
CODE_START = re.compile(r"^(?:import |from \S+ import |def |async def |class |@)", re.M)


def prompt_definitions(prompt: str, entry_point: str | None = None) -> tuple[list[str], set[str], set[str]]:
    """What a prompt's code defines: (prelude statements, helper names, declared-only function names).

    The code is the prompt's fenced Python blocks, else the whole prompt if it parses, else the prompt from its
    first line that starts a definition or import. Helpers are functions and classes with a real body (not the
    entry point); a function whose body is only a docstring, ``pass``, ``...`` or ``raise NotImplementedError``
    is the program's to write. The prelude keeps the imports, the helpers and top-level assignments of values
    that call nothing (constants; ``result = f(3)`` in an example is left out).
    """
    prelude, helpers, stubs = [], set(), set()
    for module in _prompt_code(prompt):
        for node in module.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                prelude.append(ast.unparse(node))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if node.name == entry_point or _declared_only(node):
                    stubs.add(node.name)
                else:
                    prelude.append(ast.unparse(node))
                    helpers.add(node.name)
                    stubs.discard(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None and all(
                    isinstance(t, ast.Name) for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
            ) and not any(isinstance(n, ast.Call) for n in ast.walk(node.value)):  # constants, not example calls
                prelude.append(ast.unparse(node))
                helpers.update(t.id for t in (node.targets if isinstance(node, ast.Assign) else [node.target]))
    helpers -= stubs | ({entry_point} if entry_point else set())
    return prelude, helpers, stubs


def _prompt_code(prompt: str) -> list[ast.Module]:
    blocks = [m.group(1) for m in PROMPT_FENCE.finditer(prompt)]
    candidates = [textwrap.dedent(b) for b in blocks] or [prompt]
    if not blocks and (start := CODE_START.search(prompt)):
        candidates.append(prompt[start.start():])
    modules = []
    for source in candidates:
        try:
            modules.append(ast.parse(source))
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue
        if not blocks:
            break
    return modules


def _declared_only(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> bool:
    """A function whose body only declares it (a docstring, pass, ``...`` or ``raise NotImplementedError``), or a
    class holding only such methods."""
    for statement in node.body:
        if isinstance(statement, ast.Pass):
            continue
        if isinstance(node, ast.ClassDef) and isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if _declared_only(statement):
                continue
            return False
        if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
            continue  # a docstring or ``...``
        if isinstance(statement, ast.Raise) and statement.exc is not None and "NotImplementedError" in ast.unparse(statement.exc):
            continue
        return False
    return True


def _is_unit(node: ast.stmt, test_functions: set[str]) -> bool:
    """A statement that checks something: it holds an assert or a raise, or calls a function the tests define."""
    if isinstance(node, NOT_UNITS):
        return False
    return any(isinstance(n, (ast.Assert, ast.Raise)) or (
        isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in test_functions) for n in ast.walk(node))


# ------------------------------------------------------------------------------------------- one process
class _Capture:
    """Bytes read from a pipe: the first ``cap`` are kept, the rest read and dropped (``over`` set)."""

    def __init__(self, fd: int, cap: int):
        self.fd, self.cap, self.data, self.over = fd, cap, bytearray(), False
        os.set_blocking(fd, False)

    def read(self) -> bool | None:
        """Read what is there: True if something came, None if nothing yet, False at end of stream."""
        try:
            chunk = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return None
        room = self.cap - len(self.data)
        self.data += chunk[:room]
        self.over = self.over or len(chunk) > room
        return bool(chunk)

    def drain(self) -> None:
        """What is left in the pipe once its writers are dead."""
        while self.read():
            pass

    def close(self) -> None:
        os.close(self.fd)


class _Launcher:
    """Builds the command line and environment of one sandboxed process; probes nothing."""

    def __init__(self, cfg: SandboxConfig, isolated: bool, seccomp: bool = True):
        self.cfg, self.isolated = cfg, isolated
        self.seccomp = seccomp
        self.keyctl = sandbox_seccomp.SYSCALLS.get(sandbox_seccomp.machine(), {}).get("keyctl")
        self.python = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
        self.unshare = shutil.which("unshare") or "unshare"
        # If this process dies mid-run, SIGKILL reaches the run's top process (unshare, which then kills its
        # namespace through --kill-child), so nothing outlives the trainer. isolation_problem() requires setpriv.
        setpriv = shutil.which("setpriv")
        self.prefix = [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []
        self.view = _root_view(self.python)
        self.boot = _boot_bytecode()
        with contextlib.suppress(OSError):  # the first interpreter imports them: a read-only checkout starts slower
            py_compile.compile(CHILD, doraise=True)
        self.rlimits = {
            "RLIMIT_AS": cfg.memory_mb << 20,
            "RLIMIT_CPU": math.ceil(cfg.timeout) + 1,
            "RLIMIT_FSIZE": cfg.max_file_mb << 20,
            "RLIMIT_NOFILE": cfg.max_open_files,
            "RLIMIT_NPROC": cfg.max_processes,
            "RLIMIT_CORE": 0,
        }
        if not isolated and os.geteuid() != 0:
            # Without the uid drop, RLIMIT_NPROC counts every process this user already has.
            self.rlimits["RLIMIT_NPROC"] = _tasks_of_uid(os.getuid()) + cfg.max_processes

    @property
    def seccomp(self) -> bool:
        return self.seccomp_blob is not None

    @seccomp.setter
    def seccomp(self, on: bool) -> None:
        self.seccomp_blob = sandbox_seccomp.filter_blob() if on else None

    @property
    def ro_binds(self) -> list[tuple[str, str]]:
        return self.view.binds

    def start(self, role: str, uid: int, stdin: bytes, fds: dict[str, int], cgroups: list[str] = (),
              cpus: list[int] | None = None, checker_uid: int | None = None) -> _Process:
        spec = {"role": role, "isolate": self.isolated, "uid": uid, "rlimits": self.rlimits, "fds": fds,
                "ro_binds": self.view.binds, "symlinks": self.view.symlinks, "tmpfs_mb": self.cfg.tmpfs_mb,
                "python": self.view.python, "library_path": self.view.library_path, "boot": self.boot,
                "cgroups": list(cgroups), "cpus": cpus, "seccomp": self.seccomp_blob, "keyctl": self.keyctl,
                "checker_uid": checker_uid}
        argv = [self.python, "-I", "-S", "-B", "-X", "utf8", "-c", BOOT, marshal.dumps(spec).hex()]
        workdir = None
        if self.isolated:
            argv = [*self.prefix, self.unshare, *NAMESPACES, "--", *argv]
        else:
            argv = [*self.prefix, *argv]
            workdir = tempfile.mkdtemp(prefix="sandbox-")
            if os.geteuid() == 0:
                os.chown(workdir, uid, uid)
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir or "/tmp", "TMPDIR": workdir or "/tmp", "LANG": "C.UTF-8"}
        return _Process(argv, env, workdir, stdin, fds, self.cfg.max_output_bytes, uid, self.isolated)


@functools.lru_cache(maxsize=1)
def _boot_bytecode() -> str:
    """``sandbox_child`` compiled for the fresh interpreter inside the root (``/boot.pyc``), its code objects named
    ``/boot.py`` (a traceback must not show the project's path), in a private directory removed at exit."""
    private = tempfile.mkdtemp(prefix="sandbox-boot-")
    atexit.register(shutil.rmtree, private, True)
    return py_compile.compile(CHILD, cfile=os.path.join(private, "boot.pyc"), dfile="/boot.py", doraise=True)


class _Process:
    """A started sandboxed process: its stdin feed, capped stdout/stderr, and how to kill its whole tree."""

    def __init__(self, argv, env, workdir, stdin: bytes, fds: dict[str, int], cap: int, uid: int, isolated: bool):
        self.workdir, self.uid, self.isolated = workdir, uid, isolated
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            self.popen = subprocess.Popen(argv, stdin=in_r, stdout=out_w, stderr=err_w, pass_fds=tuple(fds.values()),
                                          env=env, cwd=workdir or "/", start_new_session=True)
        except BaseException:
            for fd in (in_w, out_r, err_r):
                os.close(fd)
            raise
        finally:
            for fd in (in_r, out_w, err_w):
                os.close(fd)
        os.set_blocking(in_w, False)
        self.stdin_fd, self.stdin_left = in_w, memoryview(stdin)
        self.stdout, self.stderr = _Capture(out_r, cap), _Capture(err_r, cap)

    def feed(self) -> bool:
        """Write what the pipe takes; False once everything is written or the reader is gone."""
        try:
            self.stdin_left = self.stdin_left[os.write(self.stdin_fd, self.stdin_left[: 1 << 16]):]
        except BlockingIOError:
            return True
        except BrokenPipeError:
            self.stdin_left = self.stdin_left[:0]
        return bool(self.stdin_left)

    def close_stdin(self) -> None:
        if self.stdin_fd is not None:
            os.close(self.stdin_fd)
            self.stdin_fd = None

    def signal_kill(self) -> None:
        """SIGKILL the tree: the namespace's init (the kernel then kills the whole namespace), or the session."""
        if self.popen.poll() is not None:
            return
        if self.isolated:
            with contextlib.suppress(OSError):
                with open(f"/proc/{self.popen.pid}/task/{self.popen.pid}/children") as f:
                    for pid in f.read().split():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(pid), signal.SIGKILL)
        else:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)

    def reap(self) -> None:
        """Wait until nothing of the tree is left (unshare returns only once its namespace is empty)."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()
        if not self.isolated and os.geteuid() == 0:
            _kill_uid(self.uid)

    def close(self) -> None:
        self.close_stdin()
        self.stdout.close()
        self.stderr.close()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _pump(procs: list[_Process], captures: list[_Capture], until: _Process, deadline: float) -> str:
    """Feed stdins and drain outputs until ``until`` exits ('exit'), the deadline ('timeout'), or a cap ('output')."""
    with selectors.DefaultSelector() as sel:
        pidfd = os.pidfd_open(until.popen.pid)
        try:
            sel.register(pidfd, selectors.EVENT_READ, None)
            for c in captures:
                sel.register(c.fd, selectors.EVENT_READ, c)
            for p in procs:
                sel.register(p.stdin_fd, selectors.EVENT_WRITE, p)
            while (left := deadline - time.monotonic()) > 0:
                for key, _ in sel.select(left):
                    if key.data is None:
                        return "exit"
                    if isinstance(key.data, _Capture):
                        if key.data.read() is False:
                            sel.unregister(key.fd)
                        elif key.data.over:
                            return "output"
                    elif not key.data.feed():
                        sel.unregister(key.fd)
                        key.data.close_stdin()
            return "timeout"
        finally:
            os.close(pidfd)


def _finish(procs: list[_Process], captures: list[_Capture], grace: float = 5.0) -> None:
    """Kill every tree and keep draining its pipes until it is gone (a writer blocked on a full pipe never exits)."""
    for p in procs:
        p.signal_kill()
    end = time.monotonic() + grace
    with selectors.DefaultSelector() as sel:
        for c in captures:
            sel.register(c.fd, selectors.EVENT_READ, c)
        while any(p.popen.poll() is None for p in procs) and time.monotonic() < end:
            for key, _ in sel.select(0.01):
                if key.data.read() is False:
                    sel.unregister(key.fd)
    for p in procs:
        p.reap()
    for c in captures:
        c.drain()


# ------------------------------------------------------------------------------------------------ sandbox uids
UID_RANGE = 256  # uids one trainer process may hand to its pools' slots
UID_RANGES = 64  # ranges tried from base_uid on: uids base_uid .. base_uid + UID_RANGES * UID_RANGE
LOCK_DIR = "/run/r1-grpo-sandbox"  # one lock file per range, flock()ed by the process that holds it
RESERVED_UIDS = (65534, 65535)  # nobody, and (uid_t)-1 of 16-bit uids: a range holding one is skipped


class _Uids:
    """Sandbox uids of this process: whole ranges of UID_RANGE uids, each locked for as long as the process lives.

    Every trainer process on a node (each rank, an evaluation next to training) gets its own range, so no two
    processes run programs under the same uid and share its per-uid limits (RLIMIT_NPROC) or kernel state. A range
    is taken only when its lock file can be flock()ed (the kernel drops the lock when its holder dies, however it
    dies) and no live process runs under one of its uids (one from a sandbox that does not take these locks).
    """

    def __init__(self, base: int):
        self.base, self.free, self.locks, self.ranges, self.lock = base, [], [], [], threading.Lock()

    def take(self, n: int) -> list[int]:
        with self.lock:
            while len(self.free) < n:
                start = _lock_uid_range(self.base, self.locks)
                self.ranges.append(range(start, start + UID_RANGE))
                self.free.extend(range(start, start + UID_RANGE))
            taken, self.free = self.free[:n], self.free[n:]
            return taken

    def give(self, uids: list[int]) -> None:
        with self.lock:
            self.free = sorted(set(self.free) | set(uids))


_uid_pools: dict[int, _Uids] = {}
_uid_pools_lock = threading.Lock()


def _uids_for(base: int) -> _Uids:
    with _uid_pools_lock:
        return _uid_pools.setdefault(base, _Uids(base))


def _lock_uid_range(base: int, locks: list[int]) -> int:
    """Lock the first free range from ``base``; its fd joins ``locks`` (held until exit). SandboxUnavailable when
    every range is held."""
    try:
        os.makedirs(LOCK_DIR, mode=0o700, exist_ok=True)
    except OSError as e:
        raise SandboxUnavailable(f"cannot create the sandbox uid lock directory {LOCK_DIR}: {e}") from None
    taken = []
    for k in range(UID_RANGES):
        start = base + k * UID_RANGE
        if any(start <= uid < start + UID_RANGE for uid in RESERVED_UIDS):
            continue
        path = os.path.join(LOCK_DIR, f"uids-{start}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            taken.append(f"{start}-{start + UID_RANGE - 1} locked by pid {holder}")
            continue
        users = _processes_of_uids(start, start + UID_RANGE)
        if users:
            os.close(fd)
            pid, uid = users[0]
            taken.append(f"{start}-{start + UID_RANGE - 1} in use by pid {pid} (uid {uid}), which holds no lock")
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        locks.append(fd)
        if taken:
            log.info("code sandbox: uids %d-%d (skipped: %s)", start, start + UID_RANGE - 1, "; ".join(taken))
        return start
    raise SandboxUnavailable(f"no free sandbox uid range from base_uid {base} ({UID_RANGES} ranges of {UID_RANGE}): "
                             + "; ".join(taken))


def _processes_of_uids(first: int, end: int) -> list[tuple[int, int]]:
    """(pid, uid) of live processes whose real, effective or saved uid is in [first, end)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, ValueError, StopIteration):
            with open(f"/proc/{pid}/status") as f:
                uids = [int(u) for u in next(line for line in f if line.startswith("Uid:")).split()[1:4]]
            hit = next((u for u in uids if first <= u < end), None)
            if hit is not None:
                found.append((int(pid), hit))
    return found


# ---------------------------------------------------------------------------------------------------- cgroups
@functools.lru_cache(maxsize=1)
def _cgroups() -> sandbox_cgroup.Cgroups:
    """This process's per-run cgroup parents, found once; removed at exit."""
    groups = sandbox_cgroup.Cgroups()
    atexit.register(groups.close)
    return groups


_run_ids = itertools.count()


# ----------------------------------------------------------------------------------------------- the pool
class Sandbox:
    """A pool running sandboxed programs concurrently, ``workers`` at a time, one uid per slot.

    ``run_script`` and ``run_tests`` block until their run is over; ``map`` runs many of them on the pool and logs
    throughput. Construction probes the isolation once per process and raises SandboxUnavailable when it is
    missing, unless ``allow_weak_isolation``. Each run gets its own memory/CPU/pids cgroup when the host offers
    them; without a CPU cgroup the pool runs at most one run per CPU, each pinned to its own CPU (logged loudly).
    """

    def __init__(self, cfg: SandboxConfig | None = None):
        self.cfg = cfg = cfg or SandboxConfig()
        self.workers = cfg.workers or os.cpu_count() or 1
        problem = isolation_problem()
        if problem and not cfg.allow_weak_isolation:
            raise SandboxUnavailable(
                f"the code sandbox needs strong isolation and it is unavailable: {problem}. Strong isolation needs "
                "root on Linux with util-linux `unshare` and `setpriv` (pid/net/mount/ipc/uts namespaces, parent-death "
                "kill). To run untrusted code with rlimits and a timeout only (NOT safe against hostile code), set "
                "allow_weak_isolation=True."
            )
        self.isolated = problem is None
        if problem:
            log.warning("!!! CODE SANDBOX IN WEAK ISOLATION MODE: %s. Programs run with rlimits and a timeout only; "
                        "they can read the host filesystem and use the network. NOT safe for untrusted code. !!!",
                        problem)
        seccomp_problem = sandbox_seccomp.filter_problem()
        if seccomp_problem:
            log.warning("!!! CODE SANDBOX WITHOUT SECCOMP: %s. Keyrings, ptrace, mount, bpf, perf_event_open, "
                        "userfaultfd, memfd_create and the other refused calls stay open to programs. !!!", seccomp_problem)
        self.cgroups = _cgroups() if os.geteuid() == 0 else None
        missing = sorted(set(sandbox_cgroup.CONTROLLERS) - (self.cgroups.has if self.cgroups else set()))
        self.cpus: list[int | None] = [None] * self.workers
        if missing:
            why = "; ".join(f"{c}: {self.cgroups.problems.get(c, '?')}" for c in missing) if self.cgroups else "not root"
            log.warning("!!! CODE SANDBOX WITHOUT %s CGROUP(S) (%s). %s !!!", "/".join(missing).upper(), why,
                        " ".join(text for c, text in (
                            ("memory", "Memory is bounded per process only (RLIMIT_AS; memfd and SysV shared "
                                       "memory are refused by seccomp)."),
                            ("cpu", "CPU: at most one run per CPU, each pinned to its own CPU."),
                            ("pids", "Processes are bounded per uid only (RLIMIT_NPROC).")) if c in missing))
        if self.cgroups is None or "cpu" not in self.cgroups.has:
            available = sorted(os.sched_getaffinity(0))
            self.workers = min(self.workers, len(available))
            self.cpus = [[available[i]] for i in range(self.workers)]
        self.cpus_per_run = max(1.0, len(os.sched_getaffinity(0)) / self.workers)
        self.launcher = _Launcher(cfg, self.isolated, seccomp=seccomp_problem is None)
        if os.geteuid() == 0:  # two per slot: the program's and the checker's
            self._uid_list = _uids_for(cfg.base_uid).take(2 * self.workers)
        else:  # no uid switch without root: the slots run as this user
            self._uid_list = [os.getuid()] * (2 * self.workers)
        self._slots: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(self.workers):
            self._slots.put(i)
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="sandbox")
        self._closed = False

    @property
    def uids(self) -> list[int]:
        return list(self._uid_list)

    @contextlib.contextmanager
    def _slot(self):
        """(uid, checker uid, this run's cgroup.procs files, CPUs to pin to); the run's cgroups are removed afterwards."""
        index = self._slots.get()
        uid, checker_uid, run, procs = self._uid_list[2 * index], self._uid_list[2 * index + 1], None, []
        try:
            if self.cgroups is not None and self.cgroups.has:
                run = f"run-{uid}-{next(_run_ids)}"
                try:
                    procs = self.cgroups.create(run, (self.cfg.memory_mb + self.cfg.tmpfs_mb) << 20,
                                                self.cpus_per_run, 2 * self.cfg.max_processes + 2)
                except OSError as e:
                    log.error("!!! CODE SANDBOX: cannot create the cgroups of run %s (%s); it runs without them "
                              "(rlimits only) !!!", run, e)
                    run = None
            yield uid, checker_uid, procs, self.cpus[index]
        finally:
            if run is not None and not self.cgroups.remove(run):
                log.warning("code sandbox: cgroup %s could not be removed", run)
            self._slots.put(index)

    def run_script(self, program: str, stdin: str = "") -> RunResult:
        """Run ``program`` as ``__main__`` with ``stdin``; stdout/stderr captured."""
        with self._slot() as slot:
            return _run_script(self.launcher, slot, program, stdin)

    def run_tests(self, program: str, plan: TestPlan) -> TestResult:
        """Load ``program`` in one sandbox and run ``plan`` against it from another (see the module docstring)."""
        with self._slot() as slot:
            return _run_tests(self.launcher, slot, program, plan)

    def map(self, calls: list[Callable[[], T]], label: str = "runs") -> list[T]:
        """Run the calls on the pool, in order; logs programs/s."""
        start = time.perf_counter()
        results = list(self._executor.map(lambda call: call(), calls))
        elapsed = time.perf_counter() - start
        log.info("code sandbox: %d %s in %.2fs (%.1f/s, %d workers, isolation=%s)", len(calls), label, elapsed,
                 len(calls) / max(elapsed, 1e-9), self.workers, "strong" if self.isolated else "WEAK")
        return results

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        if not self._closed and os.geteuid() == 0:
            self._closed = True
            _uids_for(self.cfg.base_uid).give(self._uid_list)


def _payload(program: str) -> bytes:
    data = program.encode("utf-8", "surrogatepass")
    return b"%d\n" % len(data) + data


def _run_script(launcher: _Launcher, slot: tuple, program: str, stdin: str) -> RunResult:
    start = time.monotonic()
    uid, _, cgroups, cpus = slot
    proc = launcher.start("script", uid, _payload(program) + stdin.encode("utf-8", "surrogatepass"), {}, cgroups, cpus)
    captures = [proc.stdout, proc.stderr]
    try:
        reason = _pump([proc], captures, proc, start + launcher.cfg.timeout)
    finally:
        _finish([proc], captures)
        proc.close()
    timed_out = reason == "timeout"
    exceeded = reason == "output" or any(c.over for c in captures)
    return RunResult(proc.popen.returncode, bytes(proc.stdout.data), bytes(proc.stderr.data), timed_out, exceeded,
                     time.monotonic() - start)


def _run_tests(launcher: _Launcher, slot: tuple, program: str, plan: TestPlan) -> TestResult:
    start = time.monotonic()
    uid, checker_uid, cgroups, cpus = slot
    candidate_input = sandbox_child.encode([plan.prelude, program])
    candidate_input = len(candidate_input).to_bytes(4, "big") + candidate_input
    plan_data = marshal.dumps({"statements": plan.checker_statements, "candidate_names": plan.candidate_names,
                               "modules": plan.modules})
    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    res_r, res_w = os.pipe()
    child_ends = [req_r, req_w, rep_r, rep_w, res_w]
    extra: list[_Capture | _Feed] = []
    procs = []
    try:
        if launcher.isolated:  # one set of namespaces, the candidate and the checker as two uids inside it
            in_r, in_w = os.pipe()
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            child_ends += [in_r, out_w, err_w]
            extra = [_Feed(in_w, plan_data), _Capture(out_r, launcher.cfg.max_output_bytes),
                     _Capture(err_r, launcher.cfg.max_output_bytes)]
            fds = {"requests_r": req_r, "replies_w": rep_w, "requests_w": req_w, "replies_r": rep_r,
                   "results": res_w, "checker_in": in_r, "checker_out": out_w, "checker_err": err_w}
            procs.append(launcher.start("tests", uid, candidate_input, fds, cgroups, cpus, checker_uid=checker_uid))
        else:  # weak mode: two separate processes
            procs.append(launcher.start("candidate", uid, candidate_input, {"requests": req_r, "replies": rep_w},
                                        cgroups, cpus))
            procs.append(launcher.start("checker", uid, plan_data,
                                        {"requests": req_w, "replies": rep_r, "results": res_w}, cgroups, cpus))
    except BaseException:
        for p in procs:
            p.signal_kill()
            p.reap()
            p.close()
        for c in extra:
            c.close()
        os.close(res_r)
        raise
    finally:
        for fd in child_ends:
            os.close(fd)
    candidate = procs[0]
    results = _Capture(res_r, 1 << 20)
    if launcher.isolated:
        feed, checker_out, checker_err = extra
        feeds, checker_proc = [candidate, feed], candidate
    else:
        feeds, checker_proc = procs, procs[1]
        checker_out, checker_err = procs[1].stdout, procs[1].stderr
    captures = [results, candidate.stdout, candidate.stderr, checker_out, checker_err]
    try:
        deadline = start + launcher.cfg.timeout
        reason = _pump(feeds, captures, checker_proc, deadline)
        if reason == "exit" and not launcher.isolated:  # the candidate leaves by itself once its requests end
            _pump([], captures, candidate, min(deadline, time.monotonic() + EXIT_GRACE))
    finally:
        _finish(procs, captures)
        for p in procs:
            p.close()
        if launcher.isolated:
            feed.close_stdin()
            checker_out.close()
            checker_err.close()
        results.close()
    exceeded = reason == "output" or any(c.over for c in captures[1:])
    units = [i for i, (_, is_unit) in enumerate(plan.statements) if is_unit]
    reported: dict[int, tuple[bool, str]] = {}
    if not exceeded:
        for line in results.data.decode(errors="replace").splitlines():
            index, ok, *error = line.split(" ", 2) + ["", ""]
            if index.isdigit():
                reported.setdefault(int(index), (ok == "1", error[0]))
    passed = [reported.get(i, (False, ""))[0] for i in units]
    errors = ["" if ok else (reported[i][1] if i in reported else "not run") for i, ok in zip(units, passed)]
    return TestResult(passed, errors, reason == "timeout", exceeded, time.monotonic() - start,
                      bytes(candidate.stderr.data[-4096:]), bytes(checker_err.data[-4096:]))


class _Feed:
    """A pipe the parent writes ``data`` into, fed by ``_pump`` like a process's stdin."""

    def __init__(self, fd: int, data: bytes):
        os.set_blocking(fd, False)
        self.stdin_fd, self.stdin_left = fd, memoryview(data)

    feed = _Process.feed
    close_stdin = _Process.close_stdin

    def close(self) -> None:
        self.close_stdin()


# ------------------------------------------------------------------------------------------- host checks
NEUTRAL_PREFIX = "/opt/python"  # where an interpreter installed outside /usr appears inside the sandbox


@dataclass
class _RootView:
    """What the sandbox's root holds: read-only binds (host path, path inside), the merged-/usr symlinks, the
    interpreter's path inside, the library path it needs there, and why this layout cannot work (or None)."""

    binds: list[tuple[str, str]]
    symlinks: dict[str, str]
    python: str
    library_path: str
    problem: str | None


def _root_view(python: str) -> _RootView:
    """/usr and the merged-/usr links as they are; an interpreter prefix outside /usr at ``NEUTRAL_PREFIX``."""
    prefix = os.path.realpath(sys.base_prefix)
    binds, problem = ["/usr"], None
    inside_python, library_path = python, ""
    if not _under(prefix, "/usr"):
        if not _under(python, prefix):
            problem = f"the interpreter {python} is not under its prefix {prefix}, so it cannot move to {NEUTRAL_PREFIX}"
        inside_python = NEUTRAL_PREFIX + python[len(prefix):]
        library_path = NEUTRAL_PREFIX + "/lib"  # a shared libpython found through an absolute RUNPATH/RPATH
    symlinks = {}
    for name in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(name):
            symlinks[name] = os.readlink(name)
        elif os.path.isdir(name):
            binds.append(name)
    if os.path.exists("/etc/ld.so.cache"):
        binds.append("/etc/ld.so.cache")
    kept = []
    for path in sorted(set(binds), key=len):
        if not any(_under(path, k) for k in kept):
            kept.append(path)
    pairs = [(path, path) for path in kept]
    if not _under(prefix, "/usr"):
        pairs.append((prefix, NEUTRAL_PREFIX))
    return _RootView(pairs, symlinks, inside_python, library_path, problem)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _tasks_of_uid(uid: int) -> int:
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
            if int(status["Uid"].split()[0]) == uid:
                count += int(status.get("Threads", "1"))
    return count


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of ``uid`` until none is left (weak mode as root: catches escaped daemons)."""
    for _ in range(20):
        found = False
        for pid in filter(str.isdigit, os.listdir("/proc")):
            with contextlib.suppress(OSError, ValueError):
                with open(f"/proc/{pid}/status") as f:
                    uid_line = next(line for line in f if line.startswith("Uid:"))
                if int(uid_line.split()[1]) == uid:
                    found = True
                    os.kill(int(pid), signal.SIGKILL)
        if not found:
            return
        time.sleep(0.01)


@functools.lru_cache(maxsize=1)
def isolation_problem() -> str | None:
    """Why strong isolation cannot run here (None when it can); probed once per process with a real run."""
    if not sys.platform.startswith("linux"):
        return f"platform {sys.platform} is not Linux"
    if os.geteuid() != 0:
        return f"not running as root (euid {os.geteuid()}); namespaces and the uid switch need root"
    if not shutil.which("unshare"):
        return "util-linux `unshare` is not on PATH (Debian: apt-get install util-linux)"
    if not shutil.which("setpriv"):
        return ("util-linux `setpriv` is not on PATH (Debian: apt-get install util-linux); without it a sandboxed "
                "program would outlive a killed trainer (it sets the parent-death signal)")
    if not hasattr(os, "pidfd_open"):
        return "os.pidfd_open is missing (needs Linux >= 5.3)"
    launcher = _Launcher(SandboxConfig(timeout=20), isolated=True, seccomp=sandbox_seccomp.filter_problem() is None)
    if launcher.view.problem:
        return launcher.view.problem
    clash = [p for p, _ in launcher.ro_binds if _under(p, NEW_ROOT)]
    if clash:
        return f"the interpreter lives under {NEW_ROOT} ({clash[0]}), which the sandbox mounts over"
    uids = _uids_for(SandboxConfig().base_uid)
    try:
        [uid] = uids.take(1)
    except SandboxUnavailable as e:
        return str(e)
    probe = f"import os, socket, sys\nprint(os.getuid(), os.getpid(), os.path.exists({CHILD!r}), socket.if_nameindex(), sys.prefix)"
    try:
        result = _run_script(launcher, (uid, None, [], None), probe, "")
    except OSError as e:
        return f"cannot start an isolated process: {e}"
    finally:
        uids.give([uid])
    prefix = NEUTRAL_PREFIX if launcher.view.library_path else os.path.realpath(sys.base_prefix)
    expected = f"{uid} 2 False [(1, 'lo')] {prefix}"
    if not result.ok or result.stdout.decode(errors="replace").strip() != expected:
        detail = (result.stderr or result.stdout).decode(errors="replace").strip().splitlines()[-3:]
        return f"an isolated probe run failed (exit {result.returncode}, expected output {expected!r}): {' | '.join(detail)}"
    return None
