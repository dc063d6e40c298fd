"""Seccomp-BPF filters for the code sandbox, built by hand (no libseccomp), for x86_64 and aarch64.

A filter is a classic BPF program over `struct seccomp_data` (nr: u32 at 0, arch: u32 at 4, ip: u64 at 8,
args[6]: u64 from 16) whose return value decides each system call. Two filters are used (`sandbox.py`):

- `DANGEROUS` (loaded by bubblewrap with ``--seccomp FD`` before the interpreter starts): calls no test program needs
  and that widen the attack surface of the kernel: ptrace, mount and the new mount API, namespaces (unshare,
  setns), bpf, perf_event_open, keyrings, kernel modules, kexec, reboot, swap, cross-process memory access,
  userfaultfd, io_uring, file handles, sockets, syslog, personality, acct, quotactl, SysV shared memory, semaphores
  and message queues (memory no rlimit counts);
- `DANGEROUS + NO_PROCESSES` (loaded by the harness inside the sandbox, after start-up and before the untrusted code
  runs): also no new process (fork, vfork, clone without CLONE_THREAD, clone3), no exec, and no signals to other
  processes (kill, tkill, tgkill, pidfd_send_signal), no memfd (memory outside RLIMIT_AS and the tmpfs's size).
  Threads stay possible.

Refused calls fail with EPERM (clone3 with ENOSYS, so that glibc falls back to clone, which the filter can inspect);
a call from another architecture's ABI (x32 on x86_64, or a foreign `arch`) kills the process. Seccomp filters can
only be added, never removed, and survive exec: the code under test cannot undo them.
"""

from __future__ import annotations

import functools
import platform
import struct

# BPF opcodes (linux/filter.h)
_LD_W_ABS, _JEQ_K, _JGE_K, _JSET_K, _RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
# seccomp return actions (linux/seccomp.h)
_KILL_PROCESS, _ALLOW, _ERRNO = 0x80000000, 0x7FFF0000, 0x00050000
_EPERM, _ENOSYS = 1, 38
_CLONE_THREAD = 0x00010000
_X32_BIT = 0x40000000

_ARCHES = {
    # machine: (AUDIT_ARCH_*, syscall numbers)
    "x86_64": (0xC000003E, {
        "ptrace": 101, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "unshare": 272,
        "setns": 308, "bpf": 321, "perf_event_open": 298, "keyctl": 250, "add_key": 248, "request_key": 249,
        "kexec_load": 246, "kexec_file_load": 320, "init_module": 175, "finit_module": 313, "delete_module": 176,
        "reboot": 169, "swapon": 167, "swapoff": 168, "process_vm_readv": 310, "process_vm_writev": 311,
        "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "open_by_handle_at": 304, "name_to_handle_at": 303, "socket": 41, "socketpair": 53, "acct": 163,
        "quotactl": 179, "syslog": 103, "personality": 135, "open_tree": 428, "move_mount": 429, "fsopen": 430,
        "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
        "fork": 57, "vfork": 58, "clone": 56, "clone3": 435, "execve": 59, "execveat": 322,
        "kill": 62, "tkill": 200, "tgkill": 234, "pidfd_send_signal": 424, "pidfd_open": 434, "pidfd_getfd": 438,
        "shmget": 29, "shmat": 30, "shmctl": 31, "semget": 64, "msgget": 68, "memfd_create": 319,
    }),
    "aarch64": (0xC00000B7, {
        "ptrace": 117, "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51, "unshare": 97, "setns": 268,
        "bpf": 280, "perf_event_open": 241, "keyctl": 219, "add_key": 217, "request_key": 218, "kexec_load": 104,
        "kexec_file_load": 294, "init_module": 105, "finit_module": 273, "delete_module": 106, "reboot": 142,
        "swapon": 224, "swapoff": 225, "process_vm_readv": 270, "process_vm_writev": 271, "userfaultfd": 282,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "open_by_handle_at": 265,
        "name_to_handle_at": 264, "socket": 198, "socketpair": 199, "acct": 89, "quotactl": 60, "syslog": 116,
        "personality": 92, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
        "fspick": 433, "mount_setattr": 442,
        "clone": 220, "clone3": 435, "execve": 221, "execveat": 281,  # no fork/vfork on aarch64
        "kill": 129, "tkill": 130, "tgkill": 131, "pidfd_send_signal": 424, "pidfd_open": 434, "pidfd_getfd": 438,
        "shmget": 194, "shmat": 196, "shmctl": 195, "semget": 190, "msgget": 186, "memfd_create": 279,
    }),
}

DANGEROUS = (
    "ptrace", "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "bpf", "perf_event_open", "keyctl",
    "add_key", "request_key", "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "reboot", "swapon", "swapoff", "process_vm_readv", "process_vm_writev", "userfaultfd", "io_uring_setup",
    "io_uring_enter", "io_uring_register", "open_by_handle_at", "name_to_handle_at", "socket", "socketpair", "acct",
    "quotactl", "syslog", "personality", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick",
    "mount_setattr", "shmget", "shmat", "shmctl", "semget", "msgget",
)
# memfd_create too: memory outside RLIMIT_AS and the tmpfs's size (the parent passes its memfds before the filter)
NO_PROCESSES = ("fork", "vfork", "execve", "execveat", "kill", "tkill", "tgkill", "pidfd_send_signal",
                "pidfd_open", "pidfd_getfd", "memfd_create")


def supported() -> bool:
    """Whether filters can be built for this machine's architecture."""
    return platform.machine() in _ARCHES


@functools.lru_cache(maxsize=None)  # built once per process: every sandboxed run loads the same two programs
def build_filter(deny: tuple[str, ...], *, threads_only_clone: bool = False, machine: str | None = None) -> bytes:
    """The BPF program (packed `struct sock_filter` array) refusing `deny` with EPERM.

    threads_only_clone: clone is allowed only with CLONE_THREAD (a thread, not a process), and clone3 fails with
    ENOSYS (its flags sit behind a pointer the filter cannot read; glibc then falls back to clone).
    """
    machine = machine or platform.machine()
    if machine not in _ARCHES:
        raise RuntimeError(f"no seccomp filter for architecture {machine!r} (supported: {sorted(_ARCHES)})")
    audit_arch, numbers = _ARCHES[machine]
    prog: list[tuple[int, object, object, int]] = []  # (code, jt label or int, jf label or int, k)

    def add(code, k=0, jt=0, jf=0):
        prog.append((code, jt, jf, k))

    add(_LD_W_ABS, 4)  # arch
    add(_JEQ_K, audit_arch, jt=1)
    add(_RET_K, _KILL_PROCESS)
    add(_LD_W_ABS, 0)  # syscall number
    if machine == "x86_64":
        add(_JGE_K, _X32_BIT, jt="kill")
    if threads_only_clone:
        add(_JEQ_K, numbers["clone"], jt="clone")
        add(_JEQ_K, numbers["clone3"], jt="enosys")
    for name in deny:
        if name in numbers:
            add(_JEQ_K, numbers[name], jt="eperm")
    add(_RET_K, _ALLOW)
    labels = {"clone": len(prog)}  # every jump goes forward: the clone check before the shared returns
    add(_LD_W_ABS, 16)  # low 32 bits of args[0], the clone flags (little-endian on both architectures)
    add(_JSET_K, _CLONE_THREAD, jt=0, jf="eperm")
    add(_RET_K, _ALLOW)
    labels["eperm"] = len(prog)
    add(_RET_K, _ERRNO | _EPERM)
    labels["enosys"] = len(prog)
    add(_RET_K, _ERRNO | _ENOSYS)
    labels["kill"] = len(prog)
    add(_RET_K, _KILL_PROCESS)

    out = bytearray()
    for i, (code, jt, jf, k) in enumerate(prog):
        jt = labels[jt] - i - 1 if isinstance(jt, str) else jt
        jf = labels[jf] - i - 1 if isinstance(jf, str) else jf
        if not (0 <= jt < 256 and 0 <= jf < 256):
            raise AssertionError("seccomp filter jump out of range")
        out += struct.pack("=HBBI", code, jt, jf, k)
    return bytes(out)
