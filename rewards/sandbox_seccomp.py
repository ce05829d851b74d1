"""The seccomp filter every sandboxed process runs under: system calls untrusted test code never needs, refused.

Built on the host (``filter_blob``); ``rewards/sandbox_child.py`` installs it before any untrusted byte runs, after the
uid drop and ``no_new_privs``; it is inherited by every child and kept across ``execve``. A classic-BPF deny-list built
here and installed with ``prctl(PR_SET_SECCOMP)``: everything not listed is allowed, so ordinary Python (files in
its private /tmp, threads, subprocesses, pipes, AF_UNIX/INET sockets in its empty network namespace) works
unchanged. What is refused and why:

* other ABIs: a system call made through another architecture's entry (i386 ``int 0x80`` on x86-64, or x32
  numbers) kills the process, so none of the rules below can be bypassed by renumbering;
* kernel keyrings (``keyctl``, ``add_key``, ``request_key``): the uid's user keyring outlives the run (a channel
  from one sample to the next, and a way to learn from earlier verdicts) and the parent's session keyring is
  inherited; the sandbox also joins a fresh session keyring before dropping root;
* other processes' memory and descriptors (``ptrace``, ``process_vm_readv/writev``, ``kcmp``, ``pidfd_getfd``,
  ``process_madvise``);
* mounts and namespaces (``mount``, ``umount2``, ``pivot_root``, ``chroot``, the new mount API, ``unshare``,
  ``setns``, ``clone`` with any ``CLONE_NEW*`` flag; ``clone3`` answers ENOSYS, whose flags seccomp cannot read,
  so the C library falls back to ``clone``): a user namespace would hand the program capabilities over new
  namespaces, the root of most container escapes;
* memory the address-space limit does not count: ``memfd_create``, ``memfd_secret`` and SysV shared memory
  (``shmget``/``shmat``/``shmctl``/``shmdt``; a detached segment keeps its pages);
* CPU placement: ``sched_setaffinity`` (a run pinned to a CPU stays there) and NUMA policy calls;
* large kernel attack surface untrusted code has no use for: ``bpf``, ``perf_event_open``, ``userfaultfd``,
  ``io_uring_*``, ``kexec_*``, module loading, ``open_by_handle_at``/``name_to_handle_at``, ``fanotify_init``,
  ``personality``, ``iopl``/``ioperm``/``modify_ldt``, ``syslog``, ``lookup_dcookie``, and host-wide settings
  (``reboot``, swap, ``acct``, quotas, host and domain names, clocks, ``vhangup``);
* sockets other than AF_UNIX, AF_INET, AF_INET6 and AF_NETLINK (AF_VSOCK reaches the hypervisor and is not
  confined by the network namespace; AF_PACKET, AF_ALG, Bluetooth, ...), and raw or packet IP sockets.

Refused calls fail with EPERM (ENOSYS for ``clone3``), so a program that tries one gets an ordinary ``OSError``.
Only x86-64 and aarch64 are described; elsewhere ``filter_problem()`` says so and the sandbox runs without it
(logged loudly).
"""
import os
import struct

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
# Numbers of the refused calls, per architecture (checked against libseccomp's tables by the tests).
SYSCALLS = {
    "x86_64": {
        "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312, "pidfd_getfd": 438,
        "process_madvise": 440, "keyctl": 250, "add_key": 248, "request_key": 249, "mount": 165, "umount2": 166,
        "pivot_root": 155, "chroot": 161, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
        "fsmount": 432, "fspick": 433, "mount_setattr": 442, "unshare": 272, "setns": 308, "bpf": 321,
        "perf_event_open": 298, "userfaultfd": 323, "kexec_load": 246, "kexec_file_load": 320, "init_module": 175,
        "finit_module": 313, "delete_module": 176, "memfd_create": 319, "memfd_secret": 447, "shmget": 29,
        "shmat": 30, "shmctl": 31, "shmdt": 67, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "sched_setaffinity": 203, "reboot": 169, "swapon": 167, "swapoff": 168,
        "acct": 163, "quotactl": 179, "quotactl_fd": 443, "sethostname": 170, "setdomainname": 171,
        "settimeofday": 164, "clock_settime": 227, "clock_adjtime": 305, "adjtimex": 159, "syslog": 103,
        "name_to_handle_at": 303, "open_by_handle_at": 304, "fanotify_init": 300, "lookup_dcookie": 212,
        "personality": 135, "iopl": 172, "ioperm": 173, "modify_ldt": 154, "uselib": 134, "ustat": 136,
        "sysfs": 139, "_sysctl": 156, "vhangup": 153, "mbind": 237, "set_mempolicy": 238, "migrate_pages": 256,
        "move_pages": 279,
        "clone": 56, "clone3": 435, "socket": 41, "socketpair": 53,
    },
    "aarch64": {
        "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "kcmp": 272, "pidfd_getfd": 438,
        "process_madvise": 440, "keyctl": 219, "add_key": 217, "request_key": 218, "mount": 40, "umount2": 39,
        "pivot_root": 41, "chroot": 51, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
        "fsmount": 432, "fspick": 433, "mount_setattr": 442, "unshare": 97, "setns": 268, "bpf": 280,
        "perf_event_open": 241, "userfaultfd": 282, "kexec_load": 104, "kexec_file_load": 294, "init_module": 105,
        "finit_module": 273, "delete_module": 106, "memfd_create": 279, "memfd_secret": 447, "shmget": 194,
        "shmat": 196, "shmctl": 195, "shmdt": 197, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "sched_setaffinity": 122, "reboot": 142, "swapon": 224, "swapoff": 225,
        "acct": 89, "quotactl": 60, "quotactl_fd": 443, "sethostname": 161, "setdomainname": 162,
        "settimeofday": 170, "clock_settime": 112, "clock_adjtime": 266, "adjtimex": 171, "syslog": 116,
        "name_to_handle_at": 264, "open_by_handle_at": 265, "fanotify_init": 262, "lookup_dcookie": 18,
        "personality": 92, "vhangup": 58, "mbind": 235, "set_mempolicy": 237, "migrate_pages": 238,
        "move_pages": 239,
        "clone": 220, "clone3": 435, "socket": 198, "socketpair": 199,
    },
}
SPECIAL = ("clone", "clone3", "socket", "socketpair")  # not refused outright: see build_filter
CLONE_NEW_ANY = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
AF_LOCAL = (1, 16)  # AF_UNIX, AF_NETLINK (its sockets are SOCK_RAW or SOCK_DGRAM by design; confined to the netns)
AF_IP = (2, 10)  # AF_INET, AF_INET6: any type but raw and packet
SOCK_RAW, SOCK_PACKET, SOCK_TYPE_MASK = 3, 10, 0xF
X32_SYSCALL_BIT = 0x40000000
EPERM, ENOSYS = 1, 38

# Classic BPF opcodes and seccomp return values.
LD_ABS_W, JEQ, JGE, JSET, JA, AND, RET = 0x20, 0x15, 0x35, 0x45, 0x05, 0x54, 0x06
RET_KILL_PROCESS, RET_ERRNO, RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
NR, ARCH = 0, 4  # offsets in struct seccomp_data; args[i] at 16 + 8 i (low 32 bits first: little-endian only)


def machine() -> str:
    name = os.uname().machine.lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(name, name)


def filter_problem() -> str | None:
    """Why the filter cannot be installed here (None when it can)."""
    if os.uname().sysname != "Linux":
        return f"seccomp needs Linux, not {os.uname().sysname}"
    if machine() not in SYSCALLS:
        return f"no seccomp filter is described for {machine()} (only {', '.join(SYSCALLS)})"
    return None


def refused(arch: str | None = None) -> list[str]:
    """Names of the calls refused outright on ``arch`` (EPERM)."""
    return [name for name in SYSCALLS[arch or machine()] if name not in SPECIAL]


def build_filter(arch: str | None = None) -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k) instructions; jumps are resolved from labels and checked to fit 8 bits."""
    arch = arch or machine()
    numbers = SYSCALLS[arch]
    program: list[tuple] = []  # (code, jt label or offset, jf label or offset, k) or ("label", name)

    def emit(code, k=0, jt=0, jf=0):
        program.append((code, jt, jf, k))

    def label(name):
        program.append(("label", name))

    arg_low = lambda i: 16 + 8 * i  # noqa: E731
    emit(LD_ABS_W, ARCH)
    emit(JEQ, AUDIT_ARCH[arch], 0, "kill")
    emit(LD_ABS_W, NR)
    if arch == "x86_64":
        emit(JGE, X32_SYSCALL_BIT, "kill", 0)
    for name in refused(arch):
        emit(JEQ, numbers[name], "eperm", 0)
    emit(JEQ, numbers["clone3"], "enosys", 0)
    emit(JEQ, numbers["clone"], "clone", 0)
    emit(JEQ, numbers["socket"], "socket", 0)
    emit(JEQ, numbers["socketpair"], "socket", 0)
    emit(RET, RET_ALLOW)
    label("clone")
    emit(LD_ABS_W, arg_low(0))
    emit(JSET, CLONE_NEW_ANY, "eperm", 0)
    emit(RET, RET_ALLOW)
    label("socket")
    emit(LD_ABS_W, arg_low(0))
    for family in AF_LOCAL:
        emit(JEQ, family, "allow", 0)
    for family in AF_IP:
        emit(JEQ, family, "socket_type", 0)
    emit(JA, "eperm")
    label("socket_type")
    emit(LD_ABS_W, arg_low(1))
    emit(AND, SOCK_TYPE_MASK)
    emit(JEQ, SOCK_RAW, "eperm", 0)
    emit(JEQ, SOCK_PACKET, "eperm", 0)
    label("allow")
    emit(RET, RET_ALLOW)
    label("eperm")
    emit(RET, RET_ERRNO | EPERM)
    label("enosys")
    emit(RET, RET_ERRNO | ENOSYS)
    label("kill")
    emit(RET, RET_KILL_PROCESS)

    labels, index = {}, 0
    for item in program:
        if item[0] == "label":
            labels[item[1]] = index
        else:
            index += 1
    out = []
    for item in program:
        if item[0] == "label":
            continue
        code, jt, jf, k = item
        here = len(out)
        if code == JA:  # unconditional: the offset goes in k
            k = labels[k] - here - 1
        jt = labels[jt] - here - 1 if isinstance(jt, str) else jt
        jf = labels[jf] - here - 1 if isinstance(jf, str) else jf
        if not (0 <= jt <= 255 and 0 <= jf <= 255 and k >= 0):
            raise AssertionError(f"seccomp filter jump out of range at instruction {here}")
        out.append((code, jt, jf, k))
    return out


def filter_blob(arch: str | None = None) -> bytes:
    """The filter as the kernel takes it (an array of ``struct sock_filter``), for ``sandbox_child.install_seccomp``
    (built here, on the host, once: the sandboxed process only hands it to ``prctl``)."""
    return b"".join(struct.pack("=HBBI", *ins) for ins in build_filter(arch))
