"""The sandbox against attacks: every attack scores 0 and leaves the host as it was.

Most attack programs return the right answer only when their attack worked, so a score of 0 means the attack
failed, not merely that the program crashed.
"""
import ctypes.util as ctypes_util
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import uuid

import pytest

from grpo.config import ConfigError
from rewards import sandbox as sandbox_module
from rewards import sandbox_cgroup, sandbox_seccomp
from rewards.sandbox import Sandbox, SandboxConfig, SandboxUnavailable, isolation_problem, plan_tests
from rewards.sandbox_child import decode, encode

TIMEOUT = 1.5
TESTS = ["assert add(1, 2) == 3", "assert add(5, 7) == 12"]
CORRECT = "def add(a, b):\n    return a + b\n"

strong = pytest.mark.skipif(isolation_problem() is not None, reason=f"strong isolation unavailable: {isolation_problem()}")


@pytest.fixture(scope="module")
def box():
    sb = Sandbox(SandboxConfig(timeout=TIMEOUT, workers=2))
    yield sb
    sb.close()


def score(box, program: str, tests=TESTS) -> float:
    return box.run_tests(program, plan_tests(tests)).pass_rate


def sandbox_processes(cfg=SandboxConfig(), everyone: bool = False) -> list[tuple[int, str]]:
    """(pid, cmdline) of every host process running as one of this process's sandbox uids (``everyone``: as any
    sandbox uid, those of other trainer processes included)."""
    ranges = sandbox_module._uids_for(cfg.base_uid).ranges
    span = range(cfg.base_uid, cfg.base_uid + sandbox_module.UID_RANGES * sandbox_module.UID_RANGE)
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                uid = int(next(line for line in f if line.startswith("Uid:")).split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, StopIteration):
            continue
        if uid in span if everyone else any(uid in r for r in ranges):
            found.append((int(pid), cmdline))
    return found


def no_sandbox_processes_left(within: float = 3.0) -> bool:
    """True once no process runs as a sandbox uid; killed processes may take a moment to be reaped."""
    deadline = time.monotonic() + within
    while sandbox_processes():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# ------------------------------------------------------------------------------------------ the protocol
def test_plan_splits_units_and_finds_candidate_names():
    plan = plan_tests("import math\nX = [1, 2]\nf(X)\nassert f(X) == 3\nfor i in range(3):\n    assert g(i) >= 0\n"
                      "assert math.isclose(h(1), 2.0)\nif f(X) != 4:\n    raise ValueError\nassert collections.Counter(f(X))\n")
    assert [unit for _, unit in plan.statements] == [False, False, False, True, True, True, True, True]
    assert plan.n_units == 5
    assert plan.candidate_names == ["f", "g", "h"]  # math is imported, X and i are bound, range is a builtin
    assert plan.modules == ["collections"]  # used as module.attr without an import: taken from the stdlib


def test_plan_calls_humaneval_check_with_entry_point():
    plan = plan_tests("METADATA = {}\n\ndef check(candidate):\n    assert candidate(1) == 2\n", entry_point="inc")
    assert plan.statements[-1] == ("check(inc)", True)
    assert plan.n_units == 1 and plan.candidate_names == ["inc"]
    with pytest.raises(ValueError, match="entry_point"):
        plan_tests("def check(candidate):\n    assert candidate(1) == 2\n")


@pytest.mark.parametrize("tests, message", [("assert (", "do not parse"), ("import os\nx = f(1)\nprint(f(2))\n", "no test statement"),
                                            (42, "must be a string")])
def test_plan_rejects_bad_tests(tests, message):
    with pytest.raises(ValueError, match=message):
        plan_tests(tests)


def test_codec_round_trips_plain_values_as_exact_builtins():
    from collections import Counter, namedtuple

    values = [None, True, False, 0, -1, 2**200, -(2**70), 1.5, float("inf"), -0.0, 1 + 2j, "", "héllo\0",
              b"\x00\xff", [1, [2, (3,)]], (), {1: "a", (2, 3): [None]}, {1, 2}, frozenset({"x"})]
    for value in values:
        assert decode(encode(value)) == value and type(decode(encode(value))) is type(value)
    point = namedtuple("Point", "x y")(1, 2)
    assert type(decode(encode(point))) is tuple and decode(encode(Counter("aab"))) == {"a": 2, "b": 1}

    class AlwaysEqual(int):
        def __eq__(self, other):
            return True

    assert type(decode(encode(AlwaysEqual(7)))) is int and decode(encode(AlwaysEqual(7))) != 8
    for bad in (object(), lambda: 0, iter([1]), type("AlwaysEqual", (), {"__eq__": lambda s, o: True})()):
        with pytest.raises(TypeError, match="cannot cross the sandbox boundary"):
            encode(bad)


def test_codec_decode_only_raises_value_error_on_garbage():
    rng = random.Random(0)
    valid = encode([{"k": (1, 2.5, "s", b"b")}, {3}, frozenset(), None, True, 1j])
    for _ in range(3000):
        if rng.random() < 0.5:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
        else:
            data = bytearray(valid)
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            data = bytes(data[: rng.randrange(1, len(data) + 1)])
        try:
            decode(data)
        except ValueError:
            pass
    with pytest.raises(ValueError):
        decode(b"L\xff\xff\xff\xff")  # a count of 4 billion items: refused, not allocated
    with pytest.raises(ValueError):
        decode(b"L\x00\x00\x00\x01" * 200 + b"N")  # nested 200 deep


# ------------------------------------------------------------------------------------------ behaviour
@strong
def test_correct_partial_and_exceptions(box):
    assert score(box, CORRECT) == 1.0
    assert score(box, "def add(a, b):\n    return 3\n") == 0.5
    # A test expecting an exception gets the candidate's exception as the same builtin type.
    tests = ["try:\n    add(None, 1)\nexcept TypeError:\n    pass\nelse:\n    assert False", "assert add(1, 1) == 2"]
    assert score(box, CORRECT, tests) == 1.0
    assert score(box, "def add(a, b):\n    raise KeyError(a)\n", tests) == 0.0


@strong
def test_in_place_changes_to_arguments_are_mirrored(box):
    tests = ["xs = [3, 1, 2]\nsort_in_place(xs)\nassert xs == [1, 2, 3]"]
    assert score(box, "def sort_in_place(xs):\n    xs.sort()\n", tests) == 1.0
    assert score(box, "def sort_in_place(xs):\n    return sorted(xs)\n", tests) == 0.0


@strong
def test_script_mode_and_sandbox_view(box):
    result = box.run_script("import sys\nprint(sum(map(int, sys.stdin.read().split())))", "1 2 3\n")
    assert result.ok and result.stdout == b"6\n"
    view = box.run_script("import os\nprint(os.getuid(), os.getpid(), os.getcwd(), sorted(os.listdir('/')))")
    uid, pid, cwd, listing = view.stdout.decode().split(" ", 3)
    assert int(uid) >= SandboxConfig().base_uid and pid == "2" and cwd == "/tmp"
    assert "work" not in listing and "home" not in listing, listing
    crash = box.run_script("raise ValueError('boom')")
    assert crash.returncode == 1 and b"ValueError: boom" in crash.stderr


# --------------------------------------------------------------------------------- attacks: resources
@strong
@pytest.mark.parametrize("program", [
    "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
    "import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(100,)).start()\n",
], ids=["fork_bomb", "thread_bomb"])
def test_fork_bomb_is_contained(box, program):
    start = time.monotonic()
    assert score(box, program + CORRECT) == 0.0
    assert time.monotonic() - start < TIMEOUT + 5
    assert no_sandbox_processes_left(), sandbox_processes()
    assert score(box, CORRECT) == 1.0  # the slot's uid is not left exhausted


@strong
@pytest.mark.parametrize("program", [
    "x = bytearray(8 << 30)\n" + CORRECT,
    "chunks = []\nwhile True:\n    chunks.append(bytearray(50 << 20))\n" + CORRECT,
    "def add(a, b):\n    return len([0] * (10 ** 10))\n",
], ids=["one_huge_allocation", "growing", "in_the_call"])
def test_memory_bomb_fails(box, program):
    assert score(box, program) == 0.0
    assert no_sandbox_processes_left(), sandbox_processes()


@strong
def test_address_space_limit_raises_memory_error(box):
    result = box.run_script("x = bytearray(8 << 30)\n")
    assert not result.timed_out and result.returncode == 1 and result.stderr.endswith(b"MemoryError\n")


@strong
@pytest.mark.parametrize("program", [
    "while True:\n    pass\n" + CORRECT,
    "def add(a, b):\n    while True:\n        pass\n",
    "import time\ndef add(a, b):\n    time.sleep(100)\n    return a + b\n",
], ids=["loop_at_import", "loop_in_call", "sleep_past_timeout"])
def test_timeouts_kill_and_fail(box, program):
    start = time.monotonic()
    result = box.run_tests(program, plan_tests(TESTS))
    elapsed = time.monotonic() - start
    assert result.pass_rate == 0.0 and result.timed_out
    assert TIMEOUT <= elapsed < TIMEOUT + 5
    assert no_sandbox_processes_left(), sandbox_processes()


@strong
def test_timeout_keeps_units_passed_before_it(box):
    program = "import time\ndef add(a, b):\n    if a == 5:\n        time.sleep(100)\n    return a + b\n"
    result = box.run_tests(program, plan_tests(TESTS))
    assert result.passed == [True, False] and result.timed_out


@strong
@pytest.mark.parametrize("program", [
    "print('x' * 10**7)\n" + CORRECT,
    "import sys\nsys.stderr.write('y' * 10**7)\n" + CORRECT,
    "import os\ndef add(a, b):\n    os.write(1, b'z' * (1 << 22))\n    return a + b\n",
], ids=["stdout_at_import", "stderr", "stdout_in_call"])
def test_huge_output_is_capped_and_fails(box, program):
    result = box.run_tests(program, plan_tests(TESTS))
    assert result.pass_rate == 0.0 and result.output_exceeded
    script = box.run_script(program + "add(1, 2)\n")
    assert script.output_exceeded and not script.ok and len(script.stdout) <= box.cfg.max_output_bytes


# --------------------------------------------------------------------------------- attacks: the host
@strong
def test_writing_outside_its_directory_fails(box, tmp_path):
    marker = uuid.uuid4().hex
    targets = [str(tmp_path / "pwned"), f"/tmp/pwned-{marker}", f"/root/pwned-{marker}",
               os.path.join(os.path.dirname(sandbox_module.__file__), f"pwned-{marker}"),
               f"/usr/pwned-{marker}", f"/pwned-{marker}"]
    program = f"""
written = 0
for path in {targets!r}:
    try:
        with open(path, "w") as f:
            f.write("owned")
        written += 1
    except OSError:
        pass
with open("/tmp/pwned-{marker}", "w") as f:  # its own private /tmp: allowed, and gone afterwards
    f.write("scratch")
def add(a, b):
    return a + b if written > 1 else -1
"""
    assert score(box, program) == 0.0
    for path in targets:
        assert not os.path.exists(path), path


@strong
def test_network_is_unreachable(box):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]
    program = f"""
import socket
reached = False
for address in [("127.0.0.1", {port}), ("1.1.1.1", 53), ("8.8.8.8", 443)]:
    try:
        socket.create_connection(address, timeout=0.3).close()
        reached = True
    except OSError:
        pass
def add(a, b):
    return a + b if reached else -1
"""
    try:
        assert score(box, program) == 0.0
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()


@strong
def test_cannot_read_the_tests(box, tmp_path):
    """Neither the test file on the host nor the checker's process (memory, argv, fds) is visible to the program."""
    tests_file = tmp_path / "tests.py"
    tests_file.write_text("\n".join(TESTS))
    program = f"""
import os, re
found = {{}}
def look(path):
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 22)
    except OSError:
        return
    for a, b, expected in re.findall(rb"add\\((\\d+), (\\d+)\\) == (\\d+)", data):
        found[(int(a), int(b))] = int(expected)
look({str(tests_file)!r})
for pid in os.listdir("/proc"):
    if pid.isdigit():
        for name in ("cmdline", "environ", "mem"):
            look(f"/proc/{{pid}}/{{name}}")
        for fd in os.listdir(f"/proc/{{pid}}/fd") if os.access(f"/proc/{{pid}}/fd", os.R_OK) else []:
            look(f"/proc/{{pid}}/fd/{{fd}}")
for root, dirs, files in os.walk("/"):
    if root.startswith(("/proc", "/usr", "/dev")):
        continue
    for name in files:
        look(os.path.join(root, name))
def add(a, b):
    return found.get((a, b), -1)
"""
    assert score(box, program) == 0.0


@strong
def test_killing_the_parent_or_everything_does_not_reach_the_host(box):
    me = os.getpid()
    attacks = [
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
        f"import os, signal\nos.kill({me}, signal.SIGKILL)\n",
        "import os, signal\nos.killpg(os.getpgid(0), signal.SIGKILL)\n",
        "import os, signal\nos.kill(-1, signal.SIGKILL)\n",
        "import subprocess\nsubprocess.run(['kill', '-9', '-1'])\n",
        "import os, signal\nfor pid in range(1, 4096):\n    try:\n        os.kill(pid, signal.SIGKILL)\n"
        "    except OSError:\n        pass\n",
    ]
    wrong = "def add(a, b):\n    return -1\n"
    calls = [lambda a=a: score(box, a + wrong) for a in attacks] + [lambda: score(box, CORRECT)] * 4
    scores = box.map(calls, "attack programs")
    assert scores == [0.0] * len(attacks) + [1.0] * 4  # the honest runs next to them were not disturbed
    assert os.getpid() == me and score(box, CORRECT) == 1.0


@strong
def test_daemon_does_not_outlive_the_run(box, tmp_path):
    marker = f"{random.randrange(10**6)}.{random.randrange(10**6)}"
    program = f"""
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        if os.fork() == 0:
            os.execv("/usr/bin/sleep", ["sleep", "{marker}"])
        time.sleep(0.8)
        for path in ("/tmp/daemon-was-here", {str(tmp_path / "daemon-was-here")!r}):
            try:
                open(path, "w").write("late")
            except OSError:
                pass
        os._exit(0)
    os._exit(0)
def add(a, b):
    return -1
"""
    assert score(box, program) == 0.0
    time.sleep(1.2)
    assert not any(marker in cmdline for _, cmdline in sandbox_processes()), sandbox_processes()
    assert not any(marker in open(f"/proc/{p}/cmdline", "rb").read().decode(errors="replace")
                   for p in filter(str.isdigit, os.listdir("/proc")) if os.path.exists(f"/proc/{p}/cmdline"))
    assert not (tmp_path / "daemon-was-here").exists() and not os.path.exists("/tmp/daemon-was-here")


@strong
def test_nothing_outlives_a_parent_that_dies_mid_run(tmp_path):
    marker = f"{random.randrange(10**6)}.{random.randrange(10**6)}"
    parent = f"""
import sys
sys.path.insert(0, {os.getcwd()!r})
from rewards.sandbox import Sandbox, SandboxConfig, plan_tests
program = "import os\\nos.execv('/usr/bin/sleep', ['sleep', '{marker}'])\\n"
Sandbox(SandboxConfig(timeout=60, workers=1)).run_tests(program, plan_tests(["assert add(1, 2) == 3"]))
"""
    proc = subprocess.Popen([sys.executable, "-c", parent])
    deadline = time.monotonic() + 20
    while not any(marker in cmdline for _, cmdline in sandbox_processes(everyone=True)):
        assert time.monotonic() < deadline and proc.poll() is None, "the sandboxed sleep never started"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 5
    while any(marker in cmdline for _, cmdline in sandbox_processes(everyone=True)):
        assert time.monotonic() < deadline, sandbox_processes(everyone=True)
        time.sleep(0.05)


# ---------------------------------------------------------------------------------- attacks: the verdict
@strong
@pytest.mark.parametrize("program", [
    "import sys\nsys.exit(0)\n",
    "import os\nos._exit(0)\n",
    "raise SystemExit(0)\n",
    "raise KeyboardInterrupt\n",
    "def add(a, b):\n    raise SystemExit(0)\n",
    "def add(a, b):\n    import os\n    os._exit(0)\n",
    "def add(a, b):\n    raise KeyboardInterrupt\n",
    "import atexit, os\natexit.register(lambda: os._exit(0))\ndef add(a, b):\n    exit(0)\n",
], ids=["sys_exit", "os_exit", "SystemExit", "KeyboardInterrupt", "SystemExit_in_call", "os_exit_in_call",
        "KeyboardInterrupt_in_call", "atexit"])
def test_exiting_early_fails(box, program):
    assert score(box, program) == 0.0


ALWAYS_EQUAL = """
class AlwaysEqual:
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    def __bool__(self): return True
    def __lt__(self, other): return True
    def __gt__(self, other): return True
    def __hash__(self): return 0
"""


@strong
@pytest.mark.parametrize("program, tests", [
    (ALWAYS_EQUAL + "def add(a, b):\n    return AlwaysEqual()\n", TESTS),
    ("class E(int):\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return E(0)\n", TESTS),
    ("class E(str):\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return E('')\n", TESTS),
    (ALWAYS_EQUAL + "def is_prime(n):\n    return AlwaysEqual()\n", ["assert is_prime(7)", "assert not is_prime(8) == True"]),
    (ALWAYS_EQUAL + "def add(a, b):\n    return [AlwaysEqual()]\n", ["assert add(1, 2) == [3]"]),
], ids=["AlwaysEqual", "int_subclass", "str_subclass", "truthy_object", "nested"])
def test_objects_claiming_equality_fail(box, program, tests):
    assert score(box, program, tests) == 0.0


@strong
@pytest.mark.parametrize("program", [
    "import builtins\nclass Nope(Exception): pass\nbuiltins.AssertionError = Nope\n",
    "b = __builtins__ if isinstance(__builtins__, dict) else __builtins__.__dict__\n"
    "b['AssertionError'] = type('Nope', (Exception,), {})\nb['abs'] = b['len'] = lambda *a: 0\n",
    "import builtins\nbuiltins.__import__ = lambda *a, **k: (_ for _ in ()).throw(SystemExit(0))\n",
    "import sys\nmain = sys.modules['__main__']\nmain.run_checker = lambda spec: None\nmain.CandidateError = Exception\n"
    "main.rebuild_exception = lambda *a: None\nsys.settrace(lambda *a: None)\n",
    "import os\nfor fd in range(3, 256):\n    try:\n        os.write(fd, b'0 1 \\n1 1 \\n')\n    except OSError:\n        pass\n",
    # Its reply channel is in its own argv: push extra frames (a claimed 'ready' and a True value) down it.
    "import marshal, os, struct, sys\nfds = marshal.loads(bytes.fromhex(sys.argv[1]))['fds']\n"
    "main = sys.modules['__main__']\n"
    "for message in [('ready',), ('value', True, []), ('value', 3, [1, 2])]:\n"
    "    main.send(fds['replies'], message)\n",
], ids=["AssertionError", "builtins_dict", "import_hook", "patch_harness", "forge_result_lines", "forge_reply"])
def test_patching_builtins_or_the_harness_does_not_help(box, program):
    assert score(box, program + "def add(a, b):\n    return -1\n") == 0.0


# ------------------------------------------------------------------------------------------ configuration
def test_missing_isolation_refuses_unless_weak_allowed(monkeypatch, caplog):
    monkeypatch.setattr(sandbox_module, "isolation_problem", lambda: "no namespaces here (test)")
    with pytest.raises(SandboxUnavailable, match="no namespaces here.*allow_weak_isolation=True"):
        Sandbox(SandboxConfig(timeout=TIMEOUT))
    with caplog.at_level("WARNING", logger="rewards.sandbox"):
        weak = Sandbox(SandboxConfig(timeout=TIMEOUT, workers=1, allow_weak_isolation=True))
    assert "WEAK ISOLATION" in caplog.text and not weak.isolated
    try:
        assert score(weak, CORRECT) == 1.0 and score(weak, ALWAYS_EQUAL + "def add(a, b):\n    return AlwaysEqual()\n") == 0.0
        looped = weak.run_tests("while True:\n    pass\n", plan_tests(TESTS))
        assert looped.timed_out and looped.pass_rate == 0.0
    finally:
        weak.close()


@pytest.mark.parametrize("field, value", [("timeout", 0), ("memory_mb", 8), ("workers", -1), ("base_uid", 0),
                                          ("max_open_files", 2)])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        SandboxConfig(**{field: value})


# ----------------------------------------------------------------- attacks: kernel state shared per uid or inherited
KEYS_AVAILABLE = os.path.exists("/proc/keys")
keyrings = pytest.mark.skipif(not KEYS_AVAILABLE, reason="this kernel has no key management (/proc/keys is missing)")
SYSCALLS = sandbox_seccomp.SYSCALLS.get(sandbox_seccomp.machine(), {})
KEYRING_ATTACK = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
NR = {nr!r}
KEYRINGS = (-3, -4, -5)  # session, user, user-session
def store(description, payload):
    for ring in KEYRINGS:
        libc.syscall(NR["add_key"], b"user", description, payload, len(payload), ring)
def fetch(description):
    for ring in KEYRINGS:
        key = libc.syscall(NR["keyctl"], 10, ring, b"user", description, 0)  # KEYCTL_SEARCH
        if key > 0:
            buf = ctypes.create_string_buffer(64)
            n = libc.syscall(NR["keyctl"], 11, key, buf, 64)  # KEYCTL_READ
            if n > 0:
                return buf.raw[:n]
    try:
        with open("/proc/keys") as f:
            if description.decode() in f.read():
                return b"seen"
    except OSError:
        pass
    return None
"""


@strong
@keyrings
def test_keyring_carries_nothing_from_one_run_to_the_next(box):
    """A program that stores its guesses in the uid's keyrings and reads them back in the next run (the learning
    hack: a failing assert stops check(), so being called again says the guess was right) learns nothing."""
    tag = uuid.uuid4().hex[:12].encode()
    attack = KEYRING_ATTACK.format(nr=SYSCALLS)
    writer = attack + f"store(b'guess-{tag.decode()}', b'3')\ndef add(a, b):\n    return -1\n"
    reader = attack + (f"found = fetch(b'guess-{tag.decode()}')\n"
                       "def add(a, b):\n    return int(found) if found and found.isdigit() else -1\n")
    for _ in range(2):  # both slots of the pool, so the reader meets the writer's uid at least once
        assert score(box, writer, TESTS[:1]) == 0.0
    assert box.map([lambda: score(box, reader, TESTS[:1])] * 2) == [0.0, 0.0]


@strong
@keyrings
def test_parent_session_keyring_is_not_inherited(tmp_path):
    """A trainer started with a session keyring (ssh login, systemd service, `keyctl session`): the sandboxed
    program neither reads its keys nor sees them in /proc/keys."""
    tag = uuid.uuid4().hex[:12]
    attack = KEYRING_ATTACK.format(nr=SYSCALLS) + (
        f"found = fetch(b'secret-{tag}')\ndef add(a, b):\n    return int(found) if found and found.isdigit() else -1\n")
    parent = f"""
import ctypes, sys
sys.path.insert(0, {os.getcwd()!r})
libc = ctypes.CDLL(None, use_errno=True)
NR = {SYSCALLS!r}
key = -1
if libc.syscall(NR["keyctl"], 1, None) > 0:  # KEYCTL_JOIN_SESSION_KEYRING: a session keyring of our own
    key = libc.syscall(NR["add_key"], b"user", b"secret-{tag}", b"3", 1, -3)
buf = ctypes.create_string_buffer(8)
if not (key > 0 and libc.syscall(NR["keyctl"], 11, key, buf, 8) == 1 and buf.raw[:1] == b"3"):
    print("NOKEYS")  # this host refuses keyrings to us (a container's seccomp profile): nothing to test
    sys.exit(0)
from rewards.sandbox import Sandbox, SandboxConfig, plan_tests
box = Sandbox(SandboxConfig(timeout=5, workers=1))
print(box.run_tests({attack!r}, plan_tests(["assert add(1, 2) == 3"])).pass_rate)
"""
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    if out.stdout.strip() == "NOKEYS":
        pytest.skip("this host does not let the test process make a session keyring")
    assert out.stdout.strip().splitlines()[-1] == "0.0"


@strong
@pytest.mark.skipif(sandbox_seccomp.filter_problem() is not None, reason=f"no seccomp filter here: {sandbox_seccomp.filter_problem()}")
def test_seccomp_refuses_what_test_code_never_needs(box):
    """Each call is tried for real; the program answers right only if one of them got through."""
    program = f"""
import ctypes, os, socket
libc = ctypes.CDLL(None, use_errno=True)
NR = {SYSCALLS!r}
got_through = []
def attempt(name, *args):
    if libc.syscall(NR[name], *args) >= 0 or ctypes.get_errno() not in (1, 38):
        got_through.append(name)
attempt("keyctl", 0, -4, 0)                    # KEYCTL_GET_KEYRING_ID of the user keyring
attempt("add_key", b"user", b"k", b"v", 1, -4)
attempt("request_key", b"user", b"k", None, -4)
attempt("ptrace", 0, 0, 0, 0)                  # PTRACE_TRACEME
attempt("unshare", 0x10000000)                 # CLONE_NEWUSER
attempt("unshare", 0x00020000)                 # CLONE_NEWNS
attempt("clone", 0x10000000 | 17, 0, 0, 0, 0)  # a child in a new user namespace
attempt("setns", 0, 0)
attempt("mount", b"none", b"/tmp", b"tmpfs", 0, None)
attempt("bpf", 0, 0, 0)
attempt("perf_event_open", 0, 0, -1, -1, 0)
attempt("userfaultfd", 0)
attempt("memfd_create", b"x", 0)
attempt("shmget", 0, 1 << 20, 0o1600)
attempt("io_uring_setup", 8, None)
attempt("kexec_load", 0, 0, 0, 0)
attempt("init_module", None, 0, b"")
attempt("sched_setaffinity", 0, 8, None)
for family, kind in ((40, socket.SOCK_STREAM), (17, socket.SOCK_RAW), (socket.AF_INET, socket.SOCK_RAW),
                     (socket.AF_INET6, socket.SOCK_RAW), (38, socket.SOCK_SEQPACKET), (socket.AF_INET, 10)):
    try:
        socket.socket(family, kind).close()
        got_through.append(f"socket({{family}}, {{kind}})")
    except OSError:
        pass
import threading, subprocess  # and ordinary work still runs: threads, fork, exec, AF_UNIX, netlink
t = threading.Thread(target=lambda: None); t.start(); t.join()
assert subprocess.run(["true"]).returncode == 0
socket.socketpair()[0].close(); socket.if_nameindex()
def add(a, b):
    return a + b if got_through else -1 - len(got_through)
"""
    result = box.run_tests(program, plan_tests(TESTS))
    assert result.pass_rate == 0.0 and result.errors == ["AssertionError"] * 2, (result, result.stderr)


@pytest.mark.skipif(not ctypes_util.find_library("seccomp"), reason="libseccomp is not installed to check the numbers against")
def test_seccomp_numbers_match_libseccomp():
    import ctypes

    lib = ctypes.CDLL(ctypes_util.find_library("seccomp"))
    lib.seccomp_syscall_resolve_name_arch.argtypes = [ctypes.c_uint32, ctypes.c_char_p]
    for arch, numbers in sandbox_seccomp.SYSCALLS.items():
        for name, number in numbers.items():
            assert lib.seccomp_syscall_resolve_name_arch(sandbox_seccomp.AUDIT_ARCH[arch], name.encode()) == number, (arch, name)
        program = sandbox_seccomp.build_filter(arch)
        assert program[0] == (sandbox_seccomp.LD_ABS_W, 0, 0, sandbox_seccomp.ARCH)  # the ABI is checked first
        assert program[-1] == (sandbox_seccomp.RET, 0, 0, sandbox_seccomp.RET_KILL_PROCESS)


# ------------------------------------------------------------------------------- attacks: memory and CPU
def _cgroups_have(controller: str) -> bool:
    return os.geteuid() == 0 and controller in sandbox_module._cgroups().has


memory_cgroup = pytest.mark.skipif(not _cgroups_have("memory"), reason="no memory cgroup here (root and a writable "
                                   "cgroup v1 memory hierarchy or v2 memory controller needed)")
cpu_cgroup = pytest.mark.skipif(not _cgroups_have("cpu"), reason="no CPU cgroup here")


@pytest.fixture(scope="module")
def small_box():
    sb = Sandbox(SandboxConfig(timeout=5, workers=2, memory_mb=64, tmpfs_mb=16))
    yield sb
    sb.close()


@strong
@pytest.mark.parametrize("program", [
    # pages of a memfd are not in the address space once unmapped: 600 MiB under a 64 MiB RLIMIT_AS
    "import os\nfd = os.memfd_create('x')\nfor _ in range(600):\n    os.write(fd, b'x' * (1 << 20))\n",
    # SysV shared memory: a detached segment keeps its pages
    "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nfor _ in range(20):\n"
    "    sid = libc.shmget(0, 32 << 20, 0o1600)\n    assert sid >= 0\n    addr = libc.shmat(sid, None, 0)\n"
    "    ctypes.memset(addr, 1, 32 << 20)\n    libc.shmdt(ctypes.c_void_p(addr))\n",
], ids=["memfd", "sysv_shm"])
def test_memory_outside_the_address_space_is_refused(small_box, program):
    assert score(small_box, program + CORRECT) == 0.0
    assert no_sandbox_processes_left(), sandbox_processes()


@strong
@memory_cgroup
def test_memory_cgroup_caps_the_whole_run(small_box):
    """Four processes of 40 MiB each fit their 64 MiB address spaces but not the run's 80 MiB: the kernel's
    OOM killer stops the run, and its cgroup is gone afterwards."""
    program = """
import os, time
children = []
for _ in range(4):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        block = bytearray(40 << 20)
        for i in range(0, len(block), 4096):
            block[i] = 1
        os.write(w, b"k")
        time.sleep(30)
    os.close(w)
    if os.read(r, 1) == b"k":
        children.append(pid)
time.sleep(0.3)  # a child the OOM killer picked after it reported is gone by now
held = sum(os.waitpid(pid, os.WNOHANG) == (0, 0) for pid in children)
def add(a, b):
    return a + b if held == 4 else -1
"""
    result = small_box.run_tests(program, plan_tests(TESTS))
    assert result.pass_rate == 0.0, result
    assert score(small_box, CORRECT) == 1.0
    parent = sandbox_module._cgroups().parents["memory"]
    assert not [d for d in os.listdir(parent) if d.startswith("run-")]


@strong
@cpu_cgroup
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to tell a one-CPU quota from none")
def test_cpu_quota_bounds_a_run_with_spinning_children():
    """Seven spinning children for ~1 s use one CPU's worth at most (the run's quota), not the machine. The
    parent shares that quota with its seven spinners: on a loaded machine it needs more than TIMEOUT to print."""
    box = Sandbox(SandboxConfig(timeout=10.0, workers=2))
    try:
        assert box.cpus_per_run == pytest.approx(max(1.0, len(os.sched_getaffinity(0)) / box.workers))
        hog = "import os, time\nfor _ in range(7):\n    if os.fork() == 0:\n        while True:\n            pass\ntime.sleep(1.0)\nprint(3)\n"
        before = os.times()
        start = time.monotonic()
        result = box.run_script(hog)
        wall = time.monotonic() - start
        after = os.times()
    finally:
        box.close()
    used = (after.children_user + after.children_system) - (before.children_user + before.children_system)
    assert result.ok, result
    assert used <= wall * box.cpus_per_run * 1.15 + 0.3, (used, wall)


@strong
def test_spinning_children_do_not_starve_a_neighbour(box):
    """A correct program leaving spinning children behind, next to an honest CPU-bound one: the honest one passes."""
    hog = ("import os\nfor _ in range(7):\n    if os.fork() == 0:\n        while True:\n            pass\n"
           "def add(a, b):\n    return a + b\n")
    honest = "def add(a, b):\n    total = 0\n    for i in range(300000):\n        total += i % 7\n    return a + b\n"
    scores = box.map([lambda: score(box, hog), lambda: score(box, honest)], "hog and neighbour")
    assert scores[1] == 1.0


def test_without_cpu_cgroups_runs_are_pinned_one_per_cpu(monkeypatch, caplog):
    class NoCgroups:
        has, parents, problems = set(), {}, {c: "absent (test)" for c in sandbox_cgroup.CONTROLLERS}

    monkeypatch.setattr(sandbox_module, "_cgroups", lambda: NoCgroups())
    cpus = sorted(os.sched_getaffinity(0))
    with caplog.at_level("WARNING", logger="rewards.sandbox"):
        sb = Sandbox(SandboxConfig(timeout=TIMEOUT, workers=len(cpus) + 3, allow_weak_isolation=True))
    try:
        assert "WITHOUT CPU" in caplog.text and sb.workers == len(cpus)
        assert sb.cpus == [[c] for c in cpus]
        if isolation_problem() is None and sandbox_seccomp.filter_problem() is None:
            program = ("import os\ntry:\n    os.sched_setaffinity(0, range(os.cpu_count()))\nexcept OSError:\n    pass\n"
                       "print(sorted(os.sched_getaffinity(0)))")
            out = sb.run_script(program)
            assert out.ok and eval(out.stdout) in [[c] for c in cpus], out
    finally:
        sb.close()


# ------------------------------------------------------------------------------ uids of concurrent trainers
def test_uid_ranges_are_locked_per_process_and_skip_live_users(tmp_path, monkeypatch):
    monkeypatch.setattr(sandbox_module, "LOCK_DIR", str(tmp_path))
    base = 3_000_000
    locks = []
    try:
        first = sandbox_module._lock_uid_range(base, locks)
        assert first == base
        # another process cannot take a range this one holds: it gets the next one
        other = subprocess.run([sys.executable, "-c", f"""
import sys
sys.path.insert(0, {os.getcwd()!r})
from rewards import sandbox
sandbox.LOCK_DIR = {str(tmp_path)!r}
print(sandbox._lock_uid_range({base}, []))
"""], capture_output=True, text=True, timeout=60)
        assert other.stdout.split() == [str(base + sandbox_module.UID_RANGE)], other.stderr[-2000:]
        # a range some live process runs in (a sandbox that takes no lock) is skipped, with the reason logged
        if os.geteuid() == 0 and shutil.which("setpriv"):
            squatter = subprocess.Popen(["setpriv", f"--reuid={base + sandbox_module.UID_RANGE + 5}",
                                         f"--regid={base}", "--clear-groups", "sleep", "30"])
            try:  # range 1 is free again (the other process exited), but a live process runs in it
                deadline = time.monotonic() + 5
                while not sandbox_module._processes_of_uids(base + 256, base + 512):
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
                assert sandbox_module._lock_uid_range(base, locks) == base + 2 * sandbox_module.UID_RANGE
            finally:
                squatter.kill()
                squatter.wait()
    finally:
        for fd in locks:
            os.close(fd)


@strong
def test_concurrent_trainer_processes_use_disjoint_uids(box):
    other = subprocess.run([sys.executable, "-c", f"""
import sys
sys.path.insert(0, {os.getcwd()!r})
from rewards.sandbox import Sandbox, SandboxConfig
print(*Sandbox(SandboxConfig(workers=2)).uids)
"""], capture_output=True, text=True, timeout=60)
    assert other.returncode == 0, other.stderr[-2000:]
    theirs = {int(u) for u in other.stdout.split()}
    assert len(theirs) == 4 and not theirs & set(box.uids)  # two per slot: the program's and the checker's


def test_missing_setpriv_is_refused_naming_the_package(monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(sandbox_module.shutil, "which", lambda name: None if name == "setpriv" else real_which(name))
    problem = sandbox_module.isolation_problem.__wrapped__()
    if os.geteuid() == 0 and sys.platform.startswith("linux") and real_which("unshare"):
        assert "setpriv" in problem and "util-linux" in problem
        monkeypatch.setattr(sandbox_module, "isolation_problem", sandbox_module.isolation_problem.__wrapped__)
        with pytest.raises(SandboxUnavailable, match="setpriv"):
            Sandbox(SandboxConfig(timeout=TIMEOUT))


# -------------------------------------------------------------------------- attacks: what the program sees
@strong
def test_no_host_paths_or_host_identity_inside(box):
    """The project path, the interpreter's host prefix, the host's kernel command line, hostname and cgroup path
    appear nowhere a program can look."""
    with open("/proc/cmdline") as f:
        host_cmdline = f.read().strip()
    with open("/proc/self/cgroup") as f:
        host_cgroups = [line.split(":", 2)[2].strip() for line in f if line.split(":", 2)[2].strip() not in ("/", "")]
    secrets = [os.path.dirname(os.path.dirname(os.path.abspath(sandbox_module.__file__))),
               os.path.realpath(sys.base_prefix)] + host_cgroups + ([host_cmdline] if host_cmdline else [])
    secrets = [s for s in secrets if s not in ("/usr", "/", "")]
    program = f"""
import os, sys, socket, traceback
seen = []
def look(text):
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    seen.extend(s for s in {secrets!r} if s and s in text)
look(repr(sys.path)); look(sys.executable); look(sys.prefix); look(sys.base_prefix); look(repr(sys.argv))
look(repr(sys.orig_argv)); look(repr(dict(os.environ)))
if {socket.gethostname()!r} in (socket.gethostname(), os.uname().nodename, open("/proc/sys/kernel/hostname").read().strip()):
    seen.append("hostname")
look(repr([getattr(m, "__file__", "") for m in list(sys.modules.values())]))
for path in ("/proc/cmdline", "/proc/self/cgroup", "/proc/self/mountinfo", "/proc/self/cmdline", "/proc/1/cmdline",
             "/proc/self/environ", "/proc/self/maps", "/proc/sys/kernel/hostname", "/etc/hostname"):
    try:
        with open(path, "rb") as f:
            look(f.read())
    except OSError:
        pass
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            look(open(f"/proc/{{pid}}/cmdline", "rb").read())
        except OSError:
            pass
try:
    os.makedirs("/usr/x")
except OSError:
    look(traceback.format_exc())
look(repr(os.listdir("/")))
def add(a, b):
    return a + b if seen else -1
"""
    result = box.run_tests(program, plan_tests(TESTS))
    assert result.pass_rate == 0.0 and result.errors == ["AssertionError"] * 2, result
    assert score(box, "import sys\nassert not sys.path[0].endswith('rewards')\n" + CORRECT) == 1.0


# ------------------------------------------------------------------------------ attacks: trusting the program
FIND_ZERO_PROMPT = '''import math


def poly(xs: list, x: float):
    """Evaluates polynomial with coefficients xs at point x."""
    return sum([coeff * math.pow(x, i) for i, coeff in enumerate(xs)])


def find_zero(xs: list):
    """xs are coefficients of a polynomial of even degree; returns a zero point of poly(xs, x)."""
'''
FIND_ZERO_TESTS = '''
METADATA = {}


def check(candidate):
    import math
    import random
    rng = random.Random(42)
    import copy
    for _ in range(20):
        ncoeff = 2 * rng.randint(1, 4)
        coeffs = []
        for _ in range(ncoeff):
            coeff = rng.randint(-10, 10)
            if coeff == 0:
                coeff = 1
            coeffs.append(coeff)
        solution = candidate(copy.deepcopy(coeffs))
        assert math.fabs(poly(coeffs, solution)) < 1e-4
'''
FIND_ZERO = '''def find_zero(xs):
    lo, hi = -1.0, 1.0
    while poly(xs, lo) * poly(xs, hi) > 0:
        lo, hi = lo * 2.0, hi * 2.0
    while hi - lo > 1e-10:
        mid = (lo + hi) / 2.0
        if poly(xs, mid) * poly(xs, lo) > 0:
            lo = mid
        else:
            hi = mid
    return lo
'''
CYCLIC_PROMPT = '''def encode_cyclic(s: str):
    """Returns the string encoded by cycling groups of three characters."""
    groups = [s[(3 * i):min((3 * i + 3), len(s))] for i in range((len(s) + 2) // 3)]
    groups = [(group[1:] + group[0]) if len(group) == 3 else group for group in groups]
    return "".join(groups)


def decode_cyclic(s: str):
    """Takes a string encoded with encode_cyclic and returns the decoded string."""
'''
CYCLIC_TESTS = '''
def check(candidate):
    from random import randint, choice, seed
    import string
    seed(0)
    letters = string.ascii_lowercase
    for _ in range(30):
        str = ''.join(choice(letters) for i in range(randint(10, 20)))
        encoded_str = encode_cyclic(str)
        assert candidate(encoded_str) == str
'''


@strong
@pytest.mark.parametrize("prompt, tests, entry, honest, hack", [
    (FIND_ZERO_PROMPT, FIND_ZERO_TESTS, "find_zero", FIND_ZERO,
     "def poly(xs, x):\n    return 0.0\ndef find_zero(xs):\n    return 0.0\n"),
    (CYCLIC_PROMPT, CYCLIC_TESTS, "decode_cyclic", "def decode_cyclic(s):\n    return encode_cyclic(encode_cyclic(s))\n",
     "def encode_cyclic(s):\n    return s\ndef decode_cyclic(s):\n    return s\n"),
], ids=["poly_oracle", "encode_cyclic_oracle"])
def test_prompt_helpers_come_from_the_prompt(box, prompt, tests, entry, honest, hack):
    """The tests' oracle is the prompt's helper: a program that redefines it gains nothing, and an honest program
    may rely on the prompt's definitions (as HumanEval's prompt + completion does)."""
    plan = plan_tests(tests, entry, prompt)
    assert plan.candidate_names == [entry]
    assert box.run_tests(hack, plan).pass_rate == 0.0
    assert box.run_tests(honest, plan).pass_rate == 1.0
    assert box.run_tests(prompt.split("\n\n\n")[-2] + "\n" + honest, plan).pass_rate == 1.0  # its own copy: fine


def test_plan_takes_only_the_entry_point_from_the_program():
    with pytest.raises(ValueError, match=r"tests use poly.*entry point 'find_zero'"):
        plan_tests(FIND_ZERO_TESTS, "find_zero")  # the prompt that defines poly is missing
    plan = plan_tests(FIND_ZERO_TESTS, "find_zero", "Solve this:\n```python\n" + FIND_ZERO_PROMPT + "```\n")
    assert plan.candidate_names == ["find_zero"] and "poly" in "".join(plan.prelude)
    # a function the prompt only declares is the program's to write; without an entry point nothing changes
    two = "def encode(s):\n    '''encode it'''\n\n\ndef decode(s):\n    ...\n"
    assert plan_tests(["assert decode(encode('ab')) == 'ab'"], "decode", two).candidate_names == ["decode", "encode"]
    assert plan_tests(["assert f(1) == g(1)"]).candidate_names == ["f", "g"]
    with pytest.raises(ValueError, match="prompt must be a string"):
        plan_tests(["assert f(1) == 1"], "f", 42)


@strong
@pytest.mark.parametrize("tests", [
    ["assert all(map(lambda x: is_even(x) == (x % 2 == 0), [1, 2, 3, 4]))"],
    ["assert not any(filter(lambda x: is_even(x) != (x % 2 == 0), [1, 2, 3, 4]))"],
    ["for got, want in zip(map(is_even, [1, 2, 3]), [False, True, False]):\n    assert got == want"],
    ["assert list(map(is_even, [2, 4])) == [True, True][:len(list(map(is_even, [2, 4])))]"],
    ["def check(candidate):\n    assert all(map(lambda x: candidate(x) == (x % 2 == 0), range(5)))\ncheck(is_even)"],
], ids=["all_map", "any_filter", "zip_map", "list_map", "check_all_map"])
def test_stop_iteration_from_the_program_is_an_error(box, tests):
    assert box.run_tests("def is_even(x):\n    raise StopIteration\n", plan_tests(tests)).pass_rate == 0.0
    assert box.run_tests("def is_even(x):\n    return x % 2 == 0\n", plan_tests(tests)).pass_rate == 1.0


@strong
@pytest.mark.parametrize("tests", [
    ["xs = [3, 1, 2]\nassert sort_copy(xs) == sorted(xs)"],
    ["xs = [3, 1, 2]\nout = sort_copy(xs)\nassert out == sorted(xs)"],
    ["xs = [3, 1, 2]", "assert sort_copy(xs) == sorted(xs)", "assert len(sort_copy(xs)) == len(xs)"],
    ["def check(candidate):\n    for xs in ([5, 3, 4], [2, 1]):\n        got = candidate(xs)\n        assert got == sorted(xs)\n"
     "check(sort_copy)"],
    ["xs = [3, 1, 2]\nassert unsort(sort_copy(xs)) == xs"],
    ["d = {'b': 1, 'a': 2}\nassert sort_copy(d) == sorted(d)"],
], ids=["same_assert", "later_statement", "later_unit", "check_loop", "round_trip", "dict"])
def test_mutating_arguments_does_not_change_the_expected_side(box, tests):
    hack = ("def sort_copy(xs):\n    xs.clear()\n    return []\n"
            "def unsort(ys):\n    return []\n")
    honest = "def sort_copy(xs):\n    return sorted(xs)\ndef unsort(ys):\n    return [3, 1, 2]\n"
    assert box.run_tests(hack, plan_tests(tests)).pass_rate == 0.0
    assert box.run_tests(honest, plan_tests(tests)).pass_rate == 1.0


@strong
def test_the_checker_is_out_of_the_programs_reach(box):
    """The checker runs beside the program (same namespaces, another uid): the program sees no process but its
    own, cannot signal, trace or read the checker, nor enter its directory; the checker still reports every unit."""
    program = """
import ctypes, os, signal
seen = [p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]
reached = []
for pid in range(1, 512):
    if pid == os.getpid():
        continue
    for attempt in (lambda: os.kill(pid, signal.SIGKILL), lambda: open(f"/proc/{pid}/mem", "rb").read(1)):
        try:
            attempt()
            reached.append(pid)
        except OSError:
            pass
    if ctypes.CDLL(None).ptrace(16, pid, 0, 0) == 0:  # PTRACE_ATTACH
        reached.append(pid)
for path in ("/var/tmp/x", "/var/tmp"):
    try:
        open(path, "w") if path.endswith("x") else os.listdir(path)
        reached.append(path)
    except OSError:
        pass
def add(a, b):
    return a + b if not reached else -1
def visible():
    return seen
"""
    result = box.run_tests(program, plan_tests(TESTS + ["assert visible() == []"]))
    assert result.passed == [True, True, True], result


@strong
def test_a_run_whose_cgroups_cannot_be_made_runs_without_them_loudly(box, monkeypatch, caplog):
    if box.cgroups is None or not box.cgroups.has:
        pytest.skip("no cgroups here to fail")

    def refuse(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(box.cgroups, "create", refuse)
    with caplog.at_level("ERROR", logger="rewards.sandbox"):
        assert score(box, CORRECT) == 1.0
    assert "cannot create the cgroups" in caplog.text
