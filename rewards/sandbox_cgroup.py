"""Per-run cgroups for the code sandbox: memory, CPU and process count bounded by the kernel, cgroup v1 and v2.

rlimits bound one process's address space, not what a run holds in total: pages of a ``memfd`` or of SysV shared
memory that no process maps, its private /tmp, the page cache, or the sum over its processes. A memory cgroup
charges all of them to the run. Likewise RLIMIT_CPU bounds each process's CPU seconds, not how many cores a run
keeps busy: with a CPU quota (and the fair share CFS gives each cgroup, however many threads it has) a run that
leaves spinning children behind slows only itself, not the honest run next to it.

Layout: under the cgroup this process already belongs to (``/proc/self/cgroup``), in every hierarchy that holds
one of the controllers (v1: one mount per controller or group of them; v2: the unified tree), a directory
``r1-sandbox.<pid>`` holds one child cgroup per run, created just before the run starts and removed once it is
over. On cgroup v2 a cgroup with processes cannot enable controllers for its children; when that is the case
for this process's own cgroup, the directory is created next to it instead (its parent has the controllers
enabled, since this cgroup has them available). Directories left by a process that died are removed when the
next pool starts. The sandboxed process moves itself into its run's cgroups (``sandbox_child``), as root, before
any untrusted byte is read, then enters a new cgroup namespace, so it sees its cgroup as ``/``.

Needs root (or a delegated subtree) and writable cgroup filesystems; ``Cgroups().problems`` says what is missing,
and ``rewards.sandbox`` then says so loudly and falls back (CPU: one pinned CPU per concurrent run; memory:
rlimits only).
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import time

log = logging.getLogger("rewards.sandbox")

CONTROLLERS = ("memory", "cpu", "pids")
PREFIX = "r1-sandbox."
CPU_PERIOD_US = 100_000
# Scheduling weights, in units of one ordinary process: a cgroup competes with the host's processes as one entity,
# so the runs' parent weighs as much as the processes it may hold (two per run, one run per CPU at most), and each
# run as its two processes (candidate and checker), as they did before they were grouped.
RUN_WEIGHT = 2
PARENT_WEIGHT = RUN_WEIGHT * (os.cpu_count() or 1)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """(fstype, mount point, root inside the hierarchy, super options) of every cgroup mount."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rest = left.split(), right.split()
            if len(fields) >= 5 and rest and rest[0] in ("cgroup", "cgroup2"):
                options = set(rest[2].split(",")) if len(rest) > 2 else set()
                found.append((rest[0], fields[4].replace("\\040", " "), fields[3], options))
    return found


def _own_paths() -> dict[str, str]:
    """This process's cgroup path per v1 controller, and under '' its v2 path."""
    paths = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                paths[controller] = path
    return paths


def _join(mount: str, root: str, path: str) -> str:
    """The directory of cgroup ``path`` (as /proc/self/cgroup names it) under a mount of the hierarchy at ``root``."""
    if root not in ("/", "") and (path == root or path.startswith(root.rstrip("/") + "/")):
        path = path[len(root.rstrip("/")):]
    return os.path.join(mount, path.lstrip("/"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _rmdir(path: str, wait: float = 1.0) -> bool:
    """Remove an empty cgroup, waiting for exiting tasks to leave it; True when it is gone."""
    end = time.monotonic() + wait
    while True:
        try:
            for child in os.scandir(path):
                if child.is_dir(follow_symlinks=False):
                    _rmdir(child.path, max(0.0, end - time.monotonic()))
            os.rmdir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > end:
                return False
            with contextlib.suppress(OSError):  # v2: kill what is left (only sandboxed processes live here)
                _write(os.path.join(path, "cgroup.kill"), "1")
            time.sleep(0.01)


class Cgroups:
    """Where this process makes its per-run cgroups, found once; ``problems`` names each controller it lacks."""

    def __init__(self):
        self.parents: dict[str, str] = {}  # controller -> the r1-sandbox.<pid> directory holding its runs
        self.versions: dict[str, int] = {}
        self.problems: dict[str, str] = {}
        self.quota_warned = False
        try:
            self._find()
        except OSError as e:
            for controller in CONTROLLERS:
                self.problems.setdefault(controller, f"cgroups unreadable: {e}")
        for controller in CONTROLLERS:
            if controller not in self.parents:
                self.problems.setdefault(controller, "no cgroup hierarchy offers it")

    @property
    def has(self) -> set[str]:
        return set(self.parents)

    def _find(self) -> None:
        if os.geteuid() != 0:
            for controller in CONTROLLERS:
                self.problems[controller] = "not running as root"
            return
        own = _own_paths()
        name = f"{PREFIX}{os.getpid()}"
        unified = None
        for fstype, mount, root, options in _mounts():
            if fstype == "cgroup2":
                unified = unified or (mount, root)
                continue
            for controller in CONTROLLERS:
                if controller in options and controller in own and controller not in self.parents:
                    base = _join(mount, root, own[controller])
                    try:
                        _clean_stale(base)
                        parent = os.path.join(base, name)
                        os.makedirs(parent, exist_ok=True)
                    except OSError as e:
                        self.problems[controller] = f"cannot create a cgroup under {base}: {e}"
                        continue
                    self.parents[controller], self.versions[controller] = parent, 1
                    if controller == "cpu":
                        _optional(os.path.join(parent, "cpu.shares"), str(PARENT_WEIGHT * 1024))
        wanted = [c for c in CONTROLLERS if c not in self.parents and c not in self.problems]
        if unified and "" in own and wanted:
            self._find_v2(_join(unified[0], unified[1], own[""]), unified[0], name, wanted)

    def _find_v2(self, base: str, mount: str, name: str, wanted: list[str]) -> None:
        try:
            available = set(_read(os.path.join(base, "cgroup.controllers")).split())
        except OSError as e:
            for c in wanted:
                self.problems[c] = f"cgroup v2 at {base} unreadable: {e}"
            return
        wanted_here = [c for c in wanted if c in available]
        for c in wanted:
            if c not in available:
                self.problems[c] = f"cgroup v2: {c} is not enabled for {base} (cgroup.controllers: {' '.join(sorted(available)) or 'none'})"
        if not wanted_here:
            return
        candidates = [base]  # this process's own cgroup, if it can hand the controllers down ...
        if os.path.dirname(base.rstrip("/")).startswith(mount.rstrip("/")) and base.rstrip("/") != mount.rstrip("/"):
            candidates.append(os.path.dirname(base.rstrip("/")))  # ... else next to it: its parent already does
        errors = []
        for where in candidates:
            try:
                _enable(where, wanted_here)
                _clean_stale(where)
                parent = os.path.join(where, name)
                os.makedirs(parent, exist_ok=True)
                _enable(parent, wanted_here)
            except OSError as e:
                errors.append(f"{where}: {e}")
                continue
            for c in wanted_here:
                self.parents[c], self.versions[c] = parent, 2
            if "cpu" in wanted_here:
                _optional(os.path.join(parent, "cpu.weight"), str(min(10_000, PARENT_WEIGHT * 100)))
            return
        for c in wanted_here:
            self.problems[c] = "cgroup v2: cannot create a cgroup with it enabled (" + "; ".join(errors) + ")"

    def create(self, run: str, memory_bytes: int, cpus: float, pids: int) -> list[str]:
        """Make the run's cgroups with their limits; returns the ``cgroup.procs`` files to join (one per hierarchy)."""
        made: dict[str, str] = {}  # parent directory -> run directory
        try:
            for controller, parent in self.parents.items():
                if parent not in made:
                    path = os.path.join(parent, run)
                    os.mkdir(path)
                    made[parent] = path
                path, v2 = made[parent], self.versions[controller] == 2
                if controller == "memory":
                    if v2:
                        _write(f"{path}/memory.max", str(memory_bytes))
                        _optional(f"{path}/memory.swap.max", "0")
                        _optional(f"{path}/memory.oom.group", "1")
                    else:
                        _write(f"{path}/memory.limit_in_bytes", str(memory_bytes))
                        _optional(f"{path}/memory.memsw.limit_in_bytes", str(memory_bytes))
                        _optional(f"{path}/memory.swappiness", "0")
                elif controller == "cpu":
                    quota = max(1000, int(cpus * CPU_PERIOD_US))
                    try:
                        if v2:
                            _write(f"{path}/cpu.max", f"{quota} {CPU_PERIOD_US}")
                        else:
                            _write(f"{path}/cpu.cfs_period_us", str(CPU_PERIOD_US))
                            _write(f"{path}/cpu.cfs_quota_us", str(quota))
                    except OSError as e:  # v1 refuses a quota above an enclosing cgroup's: that one bounds the run
                        if not self.quota_warned:
                            self.quota_warned = True
                            log.warning("code sandbox: a CPU quota of %.2f CPUs per run is refused (%s); runs keep "
                                        "their fair share and the enclosing cgroup's quota", cpus, e)
                    _optional(f"{path}/cpu.weight" if v2 else f"{path}/cpu.shares",
                              str(RUN_WEIGHT * (100 if v2 else 1024)))
                elif controller == "pids":
                    _write(f"{path}/pids.max", str(pids))
        except OSError:
            for path in made.values():
                _rmdir(path, 0.0)
            raise
        return [os.path.join(path, "cgroup.procs") for path in made.values()]

    def remove(self, run: str) -> bool:
        ok = True
        for parent in set(self.parents.values()):
            ok = _rmdir(os.path.join(parent, run)) and ok
        return ok

    def close(self) -> None:
        for parent in set(self.parents.values()):
            _rmdir(parent, 0.5)


def _optional(path: str, value: str) -> None:
    """Write a limit the kernel may not offer (no swap accounting, older kernels)."""
    with contextlib.suppress(FileNotFoundError, PermissionError, OSError):
        _write(path, value)


def _enable(path: str, controllers: list[str]) -> None:
    """Enable ``controllers`` for the children of a v2 cgroup (EBUSY when it holds processes itself)."""
    enabled = set(_read(os.path.join(path, "cgroup.subtree_control")).split())
    missing = [c for c in controllers if c not in enabled]
    if missing:
        _write(os.path.join(path, "cgroup.subtree_control"), " ".join(f"+{c}" for c in missing))


def _clean_stale(base: str) -> None:
    """Remove the run directories of sandbox pools whose process is gone."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(base):
            if entry.name.startswith(PREFIX) and entry.name[len(PREFIX):].isdigit():
                pid = int(entry.name[len(PREFIX):])
                if pid != os.getpid() and not _alive(pid):
                    _rmdir(entry.path, 0.2)
