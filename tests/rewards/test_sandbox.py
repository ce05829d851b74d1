"""The sandbox against attacks: every attack scores 0 and leaves the host as it was.

Most attack programs return the right answer only when their attack worked, so a score of 0 means the attack
failed, not merely that the program crashed.
"""
import os
import random
import socket
import subprocess
import sys
import time
import uuid

import pytest

from grpo.config import ConfigError
from rewards import sandbox as sandbox_module
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


def sandbox_processes(cfg=SandboxConfig()) -> list[tuple[int, str]]:
    """(pid, cmdline) of every host process running as a sandbox uid."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                uid = int(next(line for line in f if line.startswith("Uid:")).split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, StopIteration):
            continue
        if cfg.base_uid <= uid < cfg.base_uid + 10_000:
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
    while not any(marker in cmdline for _, cmdline in sandbox_processes()):
        assert time.monotonic() < deadline and proc.poll() is None, "the sandboxed sleep never started"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 5
    while any(marker in cmdline for _, cmdline in sandbox_processes()):
        assert time.monotonic() < deadline, sandbox_processes()
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
