"""Confining a submission's process: resource limits, Landlock (Linux >= 5.13) and Python audit hooks.

Layers, each optional where the platform lacks it (`confine` reports which were applied):
- rlimits: address space, CPU seconds, size of any file written, no core dumps;
- Landlock (kernel-enforced, unprivileged): writes only under the scratch folder, no TCP, no signals to
  processes outside the sandbox (https://docs.kernel.org/userspace-api/landlock.html);
- an audit hook (PEP 578): refuses process creation, signals to other processes, sockets, ctypes, raising
  rlimits, and writes outside the scratch folder. A hook cannot be removed from Python, but code that
  reaches C directly can get around it: it is a second line, not a sandbox (see the README's trust model).
"""
from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys

# Landlock: syscall numbers are the same on x86_64 and arm64 (new syscalls share one table).
_LANDLOCK_CREATE, _LANDLOCK_ADD_RULE, _LANDLOCK_RESTRICT = 444, 445, 446
_FS_WRITE_FILE, _FS_REMOVE_DIR, _FS_REMOVE_FILE = 1 << 1, 1 << 4, 1 << 5
_FS_MAKE = sum(1 << b for b in range(6, 13))  # char, dir, reg, sock, fifo, block, sym
_FS_REFER, _FS_TRUNCATE = 1 << 13, 1 << 14  # ABI 2, ABI 3
_NET_TCP = (1 << 0) | (1 << 1)  # bind, connect: ABI 4
_SCOPE_ALL = (1 << 0) | (1 << 1)  # abstract unix sockets, signals: ABI 6


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def limit_resources(memory_mb: int, cpu_seconds: int, file_mb: int) -> None:
    """Hard rlimits on this process: address space, CPU time, largest file written, core dumps."""
    for res, value in ((resource.RLIMIT_AS, memory_mb << 20), (resource.RLIMIT_CPU, cpu_seconds),
                       (resource.RLIMIT_FSIZE, file_mb << 20), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(res, (value, value))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write raises OSError instead of killing us


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, or 0 where Landlock is missing or disabled."""
    if not sys.platform.startswith("linux"):
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    version = libc.syscall(_LANDLOCK_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(int(version), 0)


def landlock_confine(writable: list[str]) -> int:
    """Let this process (and its future children) write only under `writable`; return the ABI used, 0 if none."""
    abi = landlock_abi()
    if abi < 1:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    fs = _FS_WRITE_FILE | _FS_REMOVE_DIR | _FS_REMOVE_FILE | _FS_MAKE
    fs |= (_FS_REFER if abi >= 2 else 0) | (_FS_TRUNCATE if abi >= 3 else 0)
    attr = _RulesetAttr(fs, _NET_TCP if abi >= 4 else 0, _SCOPE_ALL if abi >= 6 else 0)
    ruleset = libc.syscall(_LANDLOCK_CREATE, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)),
                           ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset failed")
    try:
        for path in writable:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                # a file (e.g. /dev/null) may only be given file rights; a folder gets every handled right
                rights = fs if os.path.isdir(path) else fs & (_FS_WRITE_FILE | _FS_TRUNCATE)
                rule = _PathBeneath(rights, fd)
                if libc.syscall(_LANDLOCK_ADD_RULE, ruleset, 1, ctypes.byref(rule), ctypes.c_uint32(0)) != 0:
                    raise OSError(ctypes.get_errno(), f"landlock_add_rule failed for {path}")
            finally:
                os.close(fd)
        if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS, required before restrict_self
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        if libc.syscall(_LANDLOCK_RESTRICT, ruleset, ctypes.c_uint32(0)) != 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    finally:
        os.close(ruleset)
    return abi


_BLOCKED = {
    "os.fork": "starting processes", "os.forkpty": "starting processes", "os.system": "running shell commands",
    "os.exec": "running programs", "os.posix_spawn": "starting processes", "os.spawn": "starting processes",
    "subprocess.Popen": "starting processes", "pty.spawn": "starting processes",
    "socket.connect": "network access", "socket.bind": "network access", "socket.sendto": "network access",
    "socket.sendmsg": "network access", "socket.getaddrinfo": "network access",
    "resource.setrlimit": "changing resource limits", "resource.prlimit": "changing resource limits",
    "ctypes.dlopen": "loading C libraries with ctypes", "ctypes.dlsym": "loading C functions with ctypes",
    "ctypes.dlsym/handle": "loading C functions with ctypes", "ctypes.call_function": "calling C through ctypes",
    "sys.remote_exec": "attaching to other processes",
}
# events whose listed positional arguments are paths that get written, removed or changed
_PATH_ARGS = {"os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.truncate": (0,), "os.chmod": (0,),
              "os.chown": (0,), "os.link": (0, 1), "os.symlink": (1,), "os.mkdir": (0,), "os.utime": (0,),
              "shutil.rmtree": (0,), "os.chflags": (0,), "os.setxattr": (0,), "os.removexattr": (0,),
              "os.mkfifo": (0,), "os.mknod": (0,)}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _resolve(path, dir_fd=None) -> str | None:
    """The absolute real path an event names (None for a file descriptor)."""
    if isinstance(path, int):
        return None
    path = os.fsdecode(path)
    if dir_fd is not None and not os.path.isabs(path):
        path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
    return os.path.realpath(path)


def install_audit_hook(scratch: str, allowed_files=(os.devnull,)) -> None:
    """Refuse, from now on, process creation, sockets, ctypes, foreign signals and writes outside `scratch`."""
    root = os.path.realpath(scratch)
    allowed = {os.path.realpath(f) for f in allowed_files}
    me = os.getpid()

    def outside(path, dir_fd=None) -> bool:
        real = _resolve(path, dir_fd)
        return real is not None and real not in allowed and real != root and not real.startswith(root + os.sep)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & _WRITE_FLAGS)
            if writing and path is not None and outside(path):
                raise PermissionError(f"the grader only allows writing inside the scratch folder, not to {path}")
        elif event in _BLOCKED:
            raise PermissionError(f"the grader does not allow {_BLOCKED[event]} in a submission ({event})")
        elif event in ("os.kill", "os.killpg", "signal.pthread_kill"):
            if event != "signal.pthread_kill" and args[0] not in (me, 0):
                raise PermissionError("the grader does not allow signalling other processes")
        elif event in _PATH_ARGS:
            dir_fd = args[-1] if event in ("os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree") else None
            dir_fd = dir_fd if isinstance(dir_fd, int) and dir_fd >= 0 else None
            for i in _PATH_ARGS[event]:
                if i < len(args) and outside(args[i], dir_fd):
                    raise PermissionError(f"the grader only allows changing files inside the scratch folder, "
                                          f"not {args[i]}")

    sys.addaudithook(hook)


def confine(scratch: str) -> list[str]:
    """Apply Landlock (where the kernel has it) and the audit hook; return a description of each layer applied."""
    layers = []
    try:
        abi = landlock_confine([scratch, os.devnull])
        layers.append(f"landlock ABI {abi}" if abi else "no landlock (kernel lacks it)")
    except OSError as e:
        layers.append(f"no landlock ({e})")
    install_audit_hook(scratch)
    layers.append("audit hook")
    return layers
