"""Trusted bootstrap of one sandboxed process; the threat model is in ``rewards/sandbox.py``.

``rewards/sandbox.py`` starts ``python -I -S -B -X utf8 -c "<import this module; main()>" SPEC`` (SPEC: a
marshalled dict, in hex). Standard library only: after the chroot nothing but /usr and the interpreter's own
prefix (at a neutral path) is visible. Steps:

1. Isolated runs start as root, as pid 1 of fresh pid/mount/net/ipc/uts namespaces. Join the run's cgroups (memory,
   CPU, pids; ``rewards/sandbox_cgroup.py``) and enter a new cgroup namespace; name the host ``sandbox``. Build a
   minimal root: a tmpfs holding read-only, nosuid mounts of /usr and of the interpreter's prefix (at
   ``/opt/python`` through an overlay when it lives outside /usr), /dev/{null,zero,random,urandom}, a fresh /proc
   for this pid namespace where other users' processes are invisible (``hidepid``: the root init below, whose
   command line names host paths, and the checker) and host-wide files are masked (``/proc/cmdline``,
   ``/proc/keys``, ...), a private, size-capped, writable /tmp (for role "tests": the candidate's, and /var/tmp
   the checker's, each mode 0700 for its own uid), and this module's bytecode as ``/boot.pyc``. chroot into it,
   then fork the worker(s): one for "script", the candidate and the checker for "tests". The parent stays the
   namespace's init (root, holding no fds, doing nothing but reaping). It exits with the (checker's) worker's
   status, and the kernel then kills everything left in the namespace, daemons included.
2. The child sets its rlimits, joins a fresh, empty session keyring (the parent's is not inherited), pins its CPU
   when asked, drops every group, switches to the unprivileged uid (all capabilities go with uid 0), sets
   no_new_privs and installs the seccomp filter (``rewards/sandbox_seccomp.py``). Isolated, a process that runs
   the program then executes a fresh interpreter from the neutral path (``/opt/python/bin/python3.X /boot.pyc
   stage2 ROLE FDS``), so no host path is left in its argv, ``sys.path``, ``sys.prefix`` or module file names;
   the checker, which runs only the tests, keeps its interpreter with ``sys.path`` moved to the binds.
3. Then it plays its role:
   * ``script`` runs the program as ``__main__`` on the rest of stdin (stdin/stdout test cases);
   * ``candidate`` (for "tests") runs the prompt's definitions (the prelude: imports and helpers the prompt
     gives), loads the program as a module and answers calls (function name, arguments) sent by the checker;
   * ``checker`` (for "tests", under its own uid) runs the test statements in a namespace where every name the
     tests take from the program is a stub that forwards the call to the candidate process. It reports ``<unit> <0|1> <error>`` lines on the
     results fd. Only plain values cross the boundary (``encode``/``decode``), so the candidate's objects,
     code and patches never reach the process that evaluates the asserts. A ``StopIteration`` raised by the
     program reaches the tests as an error (it would otherwise end a ``map`` or ``filter`` early inside
     ``all(...)``), and the program's in-place changes to its arguments are mirrored back only for a call made
     as a statement of its own (``sort_in_place(xs)``), never for a call whose value the tests use, so a
     program cannot change the other side of ``assert f(xs) == g(xs)`` or of a later ``== ref(xs)``.
"""
import builtins
import marshal
import os
import resource
import struct
import sys

NEW_ROOT = "/tmp"  # mount point of the new root inside the private mount namespace; the host's /tmp is untouched
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
PR_SET_NO_NEW_PRIVS = 38
CLONE_NEWCGROUP = 0x02000000
KEYCTL_JOIN_SESSION_KEYRING = 1
MAX_MESSAGE = 64 << 20
DEVICES = ("null", "zero", "random", "urandom")
# Host-wide /proc files that say something about the host (kernel command line, keys and key quotas of every
# uid, kernel symbols and modules, scheduler and timer state), masked by /dev/null.
MASKED_PROC = ("cmdline", "keys", "key-users", "kallsyms", "modules", "sched_debug", "timer_list", "kcore",
               "sysrq-trigger", "config.gz", "partitions", "swaps", "vmallocinfo")
BOOT_PYC = "/boot.pyc"  # this module's bytecode inside the new root: what the fresh interpreter runs
STAGE2 = "stage2"
CHECKER_TMP = "/var/tmp"  # the checker's writable directory (role "tests"); the candidate's is /tmp
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2


# ----------------------------------------------------------------------------------------------- isolation
def _libc():
    import ctypes

    return ctypes, ctypes.CDLL(None, use_errno=True)


def join_cgroups(procs_files: list) -> None:
    """Move this process into the run's cgroups (one ``cgroup.procs`` per hierarchy) before anything else runs."""
    for path in procs_files:
        with open(path, "w") as f:
            f.write("0")


def enter_cgroup_namespace() -> None:
    """A new cgroup namespace rooted at the run's cgroup: /proc/self/cgroup shows ``/``, not the host's path."""
    ctypes, libc = _libc()
    if libc.unshare(CLONE_NEWCGROUP) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWCGROUP): {os.strerror(err)}")


def build_root(spec: dict) -> None:
    ctypes, libc = _libc()

    def mount(source, target, fstype, flags, data=None):
        enc = lambda s: None if s is None else s.encode()  # noqa: E731
        if libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")

    with open(spec["boot"], "rb") as f:  # read before /tmp is covered: it may live anywhere on the host
        boot = f.read()
    libc.sethostname(b"sandbox", 7)
    libc.setdomainname(b"sandbox", 7)
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", NEW_ROOT, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for path, inside in spec["ro_binds"]:
        target = NEW_ROOT + inside
        if os.path.isdir(path):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "w").close()
        if path != inside and os.path.isdir(path) and overlay_neutral(mount, path, target):
            continue
        mount(path, target, None, MS_BIND)  # not recursive: a submount would stay writable
        mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    for name, link in spec["symlinks"].items():
        os.symlink(link, NEW_ROOT + name)
    os.mkdir(NEW_ROOT + "/dev")
    for dev in DEVICES:
        open(f"{NEW_ROOT}/dev/{dev}", "w").close()
        mount(f"/dev/{dev}", f"{NEW_ROOT}/dev/{dev}", None, MS_BIND)
        mount(None, f"{NEW_ROOT}/dev/{dev}", None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NOEXEC)
    os.mkdir(NEW_ROOT + "/proc")
    for option in ("hidepid=invisible", "hidepid=2"):  # invisible: Linux >= 5.8; 2: the older spelling
        try:
            mount("proc", NEW_ROOT + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, option)
            break
        except OSError:
            if option == "hidepid=2":
                raise
    for name in MASKED_PROC:
        target = f"{NEW_ROOT}/proc/{name}"
        if os.path.exists(target):
            mount("/dev/null", target, None, MS_BIND)
            mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NOEXEC)
    os.mkdir(NEW_ROOT + "/tmp")
    if spec["role"] == "tests":  # the candidate's /tmp and the checker's /var/tmp, each closed to the other's uid
        mount("tmpfs", NEW_ROOT + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
              f"size={spec['tmpfs_mb']}m,nr_inodes=4096,mode=0700,uid={spec['uid']},gid={spec['uid']}")
        os.makedirs(NEW_ROOT + CHECKER_TMP)
        mount("tmpfs", NEW_ROOT + CHECKER_TMP, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
              f"size={spec['tmpfs_mb']}m,nr_inodes=4096,mode=0700,uid={spec['checker_uid']},gid={spec['checker_uid']}")
    else:
        mount("tmpfs", NEW_ROOT + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
              f"size={spec['tmpfs_mb']}m,nr_inodes=4096,mode=1777")
    with open(NEW_ROOT + BOOT_PYC, "wb") as f:
        f.write(boot)
    mount(None, NEW_ROOT, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chroot(NEW_ROOT)
    os.chdir("/tmp")


def overlay_neutral(mount, path: str, target: str) -> bool:
    """Show ``path`` at ``target`` through a read-only overlay whose layers are named relative to ``path`` itself
    ("." and the empty mount point): a bind mount would print the host path in /proc/self/mountinfo (the root of
    the bind inside its filesystem); an overlay prints only its options. False when overlayfs is unavailable."""
    here = os.getcwd()
    try:
        os.chdir(path)
        mount("overlay", target, "overlay", MS_RDONLY | MS_NOSUID | MS_NODEV, f"lowerdir=.:{target}")
        return True
    except OSError:
        return False
    finally:
        os.chdir(here)


def become_init(child: int) -> None:
    """The namespace's init: hold nothing, reap everything, and once ``child`` is done kill and reap what is left
    (so the CPU time of every process of the run is accounted to it), then leave with the child's exit status."""
    os.closerange(0, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(0)
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            try:
                os.kill(-1, 9)  # SIGKILL to every other process of this pid namespace
            except ProcessLookupError:
                pass
            while True:
                try:
                    os.wait()
                except ChildProcessError:
                    break
            os._exit(code if code >= 0 else 128 - code)


def join_fresh_session_keyring(keyctl: int | None) -> None:
    """An anonymous, empty session keyring: the keys of the parent's session keyring are no longer possessed.
    ``keyctl``: the system call's number here (None: an architecture the sandbox has no table for)."""
    ctypes, libc = _libc()
    if keyctl is not None and libc.syscall(keyctl, KEYCTL_JOIN_SESSION_KEYRING, None) < 0:
        err = ctypes.get_errno()
        if err != 38:  # ENOSYS: a kernel without keyrings has nothing to isolate
            raise OSError(err, f"keyctl(JOIN_SESSION_KEYRING): {os.strerror(err)}")


def confine(spec: dict, uid: int | None = None) -> None:
    """rlimits, a fresh keyring, (when started as root) the uid drop for good (to ``uid``, by default the spec's),
    no_new_privs, the seccomp filter."""
    ctypes, libc = _libc()  # before the uid drop: in weak mode the interpreter's files may be unreadable to the sandbox uid
    for name, value in spec["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    join_fresh_session_keyring(spec["keyctl"])
    if spec.get("cpus"):
        os.sched_setaffinity(0, spec["cpus"])
    if os.geteuid() == 0:
        uid = spec["uid"] if uid is None else uid
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            os._exit(125)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        os._exit(125)
    if spec["seccomp"]:
        install_seccomp(spec["seccomp"])
    os.umask(0o077)


def install_seccomp(blob: bytes) -> None:
    """Install the filter ``sandbox_seccomp.filter_blob`` built (this process is single-threaded and has set
    no_new_privs)."""
    ctypes, libc = _libc()

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    buffer = ctypes.create_string_buffer(blob, len(blob))
    prog = SockFprog(len(blob) // 8, ctypes.addressof(buffer))
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"installing the seccomp filter failed: {os.strerror(err)}")


def exec_stage2(spec: dict, role: str | None = None, fds: dict | None = None) -> None:
    """Replace this interpreter (started from the host's path) by a fresh one from the neutral path in the root."""
    fds = spec["fds"] if fds is None else fds
    role = role or spec["role"]
    for fd in fds.values():
        os.set_inheritable(fd, True)
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8"}
    if spec["library_path"]:
        env["LD_LIBRARY_PATH"] = spec["library_path"]
    argv = [spec["python"], "-I", "-S", "-B", "-X", "utf8", BOOT_PYC, STAGE2, role,
            ",".join(f"{name}={fd}" for name, fd in fds.items())]
    os.execve(spec["python"], argv, env)


# -------------------------------------------------------------------------------------------- plain values
# Wire format of a value: one tag byte, then for N/T/F nothing, i/s/b a 4-byte length and the bytes (an int in
# signed big-endian two's complement), d an 8-byte double, c two doubles, L/U/S/Z/D a 4-byte count and the items
# (list, tuple, set, frozenset; a dict as alternating keys and values).
CONTAINERS = {list: b"L", tuple: b"U", set: b"S", frozenset: b"Z"}
BUILDERS = {ord("L"): list, ord("U"): tuple, ord("S"): set, ord("Z"): frozenset}


def encode(value) -> bytes:
    """The wire form of a plain value; any other type raises TypeError.

    Subclasses of the plain types are sent as their base type (a namedtuple as a tuple, a Counter as a dict), so
    whatever methods a subclass overrides, the receiver only ever gets a genuine builtin value.
    """
    out = bytearray()
    _encode(value, out, 0)
    return bytes(out)


def _encode(value, out: bytearray, depth: int) -> None:
    if depth > 100:
        raise TypeError("value nested more than 100 levels deep")
    if value is None or value is True or value is False:
        out += b"N" if value is None else b"T" if value else b"F"
    elif isinstance(value, int):
        n = int.__index__(value)
        _chunk(out, b"i", n.to_bytes((n.bit_length() + 8) // 8, "big", signed=True))
    elif isinstance(value, float):
        out += b"d" + struct.pack(">d", value)
    elif isinstance(value, complex):
        out += b"c" + struct.pack(">dd", value.real, value.imag)
    elif isinstance(value, str):
        _chunk(out, b"s", str.encode(value, "utf-8", "surrogatepass"))
    elif isinstance(value, (bytes, bytearray)):
        _chunk(out, b"b", bytes(value))
    elif isinstance(value, dict):
        out += b"D" + struct.pack(">I", len(value))
        for k, v in dict.items(value):
            _encode(k, out, depth + 1)
            _encode(v, out, depth + 1)
    else:
        for kind, tag in CONTAINERS.items():
            if isinstance(value, kind):
                items = list(kind.__iter__(value))
                out += tag + struct.pack(">I", len(items))
                for item in items:
                    _encode(item, out, depth + 1)
                return
        raise TypeError(
            f"a {type(value).__name__} cannot cross the sandbox boundary (allowed: None, bool, int, float, complex, "
            "str, bytes, list, tuple, dict, set, frozenset)"
        )


def _chunk(out: bytearray, tag: bytes, data: bytes) -> None:
    out += tag + struct.pack(">I", len(data)) + data


def decode(data: bytes):
    """The value ``encode`` wrote, built from exact builtin types only; malformed input raises ValueError."""
    try:
        value, end = _decode(data, 0, 0)
    except (IndexError, TypeError, OverflowError, RecursionError, struct.error) as e:
        raise ValueError(f"malformed value: {type(e).__name__}") from None
    if end != len(data):
        raise ValueError("malformed value: trailing bytes")
    return value


def _decode(data: bytes, pos: int, depth: int):
    if depth > 100:
        raise ValueError("malformed value: nested more than 100 levels deep")
    tag, pos = data[pos], pos + 1
    if tag in b"NTF":
        return {78: None, 84: True, 70: False}[tag], pos
    if tag in b"isb":
        (n,), pos = struct.unpack_from(">I", data, pos), pos + 4
        chunk, pos = data[pos : pos + n], pos + n
        if len(chunk) != n:
            raise ValueError("malformed value: truncated")
        if tag == ord("i"):
            return int.from_bytes(chunk, "big", signed=True), pos
        return (chunk.decode("utf-8", "surrogatepass") if tag == ord("s") else chunk), pos
    if tag == ord("d"):
        return struct.unpack_from(">d", data, pos)[0], pos + 8
    if tag == ord("c"):
        return complex(*struct.unpack_from(">dd", data, pos)), pos + 16
    if tag in b"LUSZD":
        (n,), pos = struct.unpack_from(">I", data, pos), pos + 4
        if n > len(data) - pos:
            raise ValueError("malformed value: count exceeds the data")
        items = []
        for _ in range(2 * n if tag == ord("D") else n):
            item, pos = _decode(data, pos, depth + 1)
            items.append(item)
        if tag == ord("D"):
            return dict(zip(items[::2], items[1::2])), pos
        return BUILDERS[tag](items), pos
    raise ValueError(f"malformed value: unknown tag {tag}")


def send(fd: int, message) -> None:
    send_raw(fd, encode(message))


def send_raw(fd: int, data: bytes) -> None:
    view = memoryview(struct.pack(">I", len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def read_exact(fd: int, n: int) -> bytes | None:
    chunks = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv(fd: int):
    """The next message, or None at end of stream; ValueError when it is malformed or too large."""
    header = read_exact(fd, 4)
    if header is None:
        return None
    (n,) = struct.unpack(">I", header)
    if n > MAX_MESSAGE:
        raise ValueError(f"message of {n} bytes exceeds {MAX_MESSAGE}")
    body = read_exact(fd, n)
    return None if body is None else decode(body)


def read_program() -> str:
    """The program, sent on stdin after its byte length and a newline; what follows stays on stdin for it."""
    header = b""
    while not header.endswith(b"\n"):
        byte = os.read(0, 1)
        if not byte:
            raise EOFError("stdin closed before the program header")
        header += byte
    return (read_exact(0, int(header)) or b"").decode()


# ----------------------------------------------------------------------------------------------- the roles
def run_script(spec: dict) -> None:
    source = read_program()
    exec(compile(source, "<program>", "exec"), {"__name__": "__main__", "__builtins__": builtins})


def run_candidate(spec: dict) -> None:
    """Run the prompt's prelude, load the program, then answer ``(name, args, kwargs)`` calls until the checker
    hangs up. The prelude's statements run one by one and may fail (an import the sandbox lacks): the program
    may not need them."""
    requests, replies = spec["fds"]["requests"], spec["fds"]["replies"]
    prelude, source = recv(0)
    namespace = {"__name__": "candidate", "__builtins__": builtins}
    for statement in prelude:
        try:
            exec(compile(statement, "<prompt>", "exec"), namespace)
        except Exception:  # noqa: BLE001 - a prelude statement the program does not need
            pass
    try:
        exec(compile(source, "<completion>", "exec"), namespace)
    except BaseException as e:  # noqa: BLE001 - the checker must learn why loading failed, whatever it was
        send(replies, ("load_error", f"{type(e).__name__}: {e}"[:500]))
        return
    send(replies, ("ready",))
    while (request := recv(requests)) is not None:
        name, args, kwargs = request
        try:
            value = namespace[name](*args, **kwargs)
            reply = encode(("value", value, args))
        except BaseException as e:  # noqa: BLE001 - any failure, even SystemExit, is this call's answer
            reply = encode(("raise", type(e).__name__, str(e)[:500]))
        send_raw(replies, reply)


class CandidateError(Exception):
    """The candidate process failed to answer a call: it crashed, exited, failed to load, or broke the protocol."""


class Bridge:
    """The checker's end of the call channel to the candidate process."""

    def __init__(self, requests: int, replies: int):
        self.requests, self.replies = requests, replies
        self.broken: str | None = None
        self.loaded = False

    def _receive(self) -> tuple:
        try:
            message = recv(self.replies)
        except (ValueError, OSError) as e:
            message, self.broken = None, f"unreadable reply: {e}"
        if type(message) is not tuple or not message or type(message[0]) is not str:
            self.broken = self.broken or ("candidate process exited" if message is None else "malformed reply")
            raise CandidateError(self.broken)
        return message

    def call(self, name: str, args: tuple, kwargs: dict, write_back_args: bool = False):
        if self.broken:
            raise CandidateError(self.broken)
        if not self.loaded:
            message = self._receive()
            if message[0] != "ready":
                self.broken = f"program failed to load: {message[1:]}"
                raise CandidateError(self.broken)
            self.loaded = True
        send(self.requests, (name, list(args), kwargs))
        message = self._receive()
        if message[0] == "raise" and len(message) == 3:
            raise rebuild_exception(*message[1:])
        if message[0] != "value" or len(message) != 3:
            self.broken = "malformed reply"
            raise CandidateError(self.broken)
        if write_back_args:
            write_back(args, message[2])
        return message[1]


# Exceptions that steer the checker's own control flow rather than report an error: a StopIteration from a call
# inside ``map``/``filter`` ends the iteration early, so ``all(map(check, cases))`` would pass on the cases
# before it. They reach the tests as a CandidateError.
CONTROL_FLOW = ("StopIteration", "StopAsyncIteration", "GeneratorExit")


def rebuild_exception(name, message) -> Exception:
    """The candidate's exception as the same builtin type, so tests expecting ``ValueError`` etc. behave (except
    the iteration-protocol exceptions of ``CONTROL_FLOW``, which become a CandidateError)."""
    kind = getattr(builtins, name, None) if isinstance(name, str) and name not in CONTROL_FLOW else None
    text = message if isinstance(message, str) else ""
    if isinstance(kind, type) and issubclass(kind, Exception):
        try:
            return kind(text)
        except TypeError:
            pass
    return CandidateError(f"{name}: {text}")


def write_back(args: tuple, new_args) -> None:
    """In-place changes the candidate made to list/dict/set arguments, mirrored onto the caller's objects."""
    if type(new_args) is not list or len(new_args) != len(args):
        return
    for old, new in zip(args, new_args):
        if type(old) is list and type(new) is list:
            old[:] = new
        elif type(old) in (dict, set) and type(new) is type(old):
            old.clear()
            old.update(new)


STATEMENT_CALL = "__sandbox_statement_call__"  # what a call made as a statement becomes (``rewards.sandbox``)


def run_checker(spec: dict) -> None:
    plan = marshal.loads(sys.stdin.buffer.read())
    bridge = Bridge(spec["fds"]["requests"], spec["fds"]["replies"])
    results = spec["fds"]["results"]
    namespace = {"__name__": "__main__", "__builtins__": builtins, STATEMENT_CALL: statement_call}
    for name in plan["modules"]:
        try:
            namespace[name] = __import__(name)
        except ImportError:
            pass
    for name in plan["candidate_names"]:
        namespace[name] = make_stub(bridge, name)
    for index, (source, is_unit) in enumerate(plan["statements"]):
        try:
            exec(compile(source, f"<test statement {index}>", "exec"), namespace)
            ok, error = True, ""
        except BaseException as e:  # noqa: BLE001 - a failing unit, whatever the failure
            ok, error = False, type(e).__name__
        if is_unit:
            os.write(results, f"{index} {int(ok)} {error}\n".encode())


def statement_call(function, *args, **kwargs):
    """A call made as a statement: the only kind whose in-place changes to the arguments are mirrored back."""
    call = getattr(function, "sandbox_call", None)
    if call is not None:
        return call(args, kwargs)
    return function(*args, **kwargs)


def make_stub(bridge: Bridge, name: str):
    def stub(*args, **kwargs):
        return bridge.call(name, args, kwargs)

    stub.__name__ = stub.__qualname__ = name
    stub.sandbox_call = lambda args, kwargs: bridge.call(name, args, kwargs, write_back_args=True)
    return stub


ROLES = {"script": run_script, "candidate": run_candidate, "checker": run_checker}


def main() -> None:
    if sys.argv[1] == STAGE2:  # the fresh interpreter inside the root: everything above is done
        fds = {name: int(fd) for name, fd in (item.split("=") for item in sys.argv[3].split(",") if item)}
        ROLES[sys.argv[2]]({"fds": fds})
        return
    spec = marshal.loads(bytes.fromhex(sys.argv[1]))
    _libc()  # ctypes, imported before the chroot
    join_cgroups(spec["cgroups"])
    if spec["isolate"]:
        if spec["cgroups"]:
            enter_cgroup_namespace()
        build_root(spec)
        if spec["role"] == "tests":
            start_tests(spec)
        child = os.fork()
        if child:
            become_init(child)
    confine(spec)
    if spec["isolate"]:
        exec_stage2(spec)
    ROLES[spec["role"]](spec)


def start_tests(spec: dict) -> None:
    """Role "tests" (isolated): the candidate and the checker as two children of this init, in one set of
    namespaces, under two uids. The candidate (stdin/stdout/stderr: the process's) cannot see the checker's
    process (``hidepid``: another uid), signal it (another uid), trace it (seccomp) or enter its /var/tmp (mode
    0700, another uid); each holds only its own ends of the pipes. The init leaves when the checker is done,
    which ends the candidate too."""
    fds = spec["fds"]
    candidate_fds = {"requests": fds["requests_r"], "replies": fds["replies_w"]}
    checker_fds = {"requests": fds["requests_w"], "replies": fds["replies_r"], "results": fds["results"]}
    if os.fork() == 0:
        _keep_only([0, 1, 2, *candidate_fds.values()])
        confine(spec, spec["uid"])
        exec_stage2(spec, "candidate", candidate_fds)
    checker = os.fork()
    if checker == 0:
        for target, name in enumerate(("checker_in", "checker_out", "checker_err")):
            os.dup2(fds[name], target)
        _keep_only([0, 1, 2, *checker_fds.values()])
        os.chdir(CHECKER_TMP)
        os.environ.update(HOME=CHECKER_TMP, TMPDIR=CHECKER_TMP)
        confine(spec, spec["checker_uid"])
        rebase_sys_path(spec)
        run_checker({"fds": checker_fds})
        sys.stdout.flush()
        os._exit(0)
    become_init(checker)


def _keep_only(keep: list[int]) -> None:
    """Close every descriptor but ``keep`` (the other role's pipe ends above all)."""
    last = -1
    for fd in sorted(set(keep)) + [max(resource.getrlimit(resource.RLIMIT_NOFILE)[0], max(keep) + 1)]:
        if fd > last + 1:  # os.closerange(n, n) is not empty on every Python: it may close from n on
            os.closerange(last + 1, fd)
        last = fd


def rebase_sys_path(spec: dict) -> None:
    """The checker keeps this interpreter (it runs only the trusted tests, in a pid namespace the program cannot
    see, so host paths in its argv are nobody's business); its imports now look where the binds put them."""
    rebased = []
    for entry in sys.path:
        for host, inside in spec["ro_binds"]:
            if entry == host or entry.startswith(host.rstrip("/") + "/"):
                rebased.append(inside + entry[len(host):])
                break
    sys.path[:] = rebased
    sys.path_importer_cache.clear()


if __name__ == "__main__":
    main()
