"""Confining a submission's process: resource limits, Landlock, seccomp and an audit hook.

These layers protect the machine and the other submissions from the code a worker runs; they do not protect any
grade, because no grade is decided in the worker (course_lib.grading.batch trusts nothing it says). Each layer is
applied where the platform has it (`confine` reports which ran):
- rlimits: address space, CPU seconds, size of any file written, no core dumps;
- Landlock (Linux >= 5.13, https://docs.kernel.org/userspace-api/landlock.html): reads only from the Python
  installation, system libraries, course_lib (its exercise references excepted) and the shipped data; writes only
  in the scratch folder; no TCP (ABI 4+); no signals or abstract Unix sockets outside the sandbox (ABI 6+);
- seccomp (Linux x86-64 and arm64): no new processes and no new threads (clone of any kind), no sockets of any kind
  (so no UDP, no Unix sockets), no ptrace / io_uring / bpf / mounts, no signals to other processes;
- an audit hook (PEP 578) that refuses, at the Python level, process creation, sockets, ctypes and cffi, profilers
  and tracers, frame and garbage-collector introspection, code-object surgery, reading the grader's protected
  paths, writing outside scratch and importing the exercise references, and records every refusal (the record is
  evidence for the instructor, never a verdict: native code could get around the hook, not around the kernel).
"""
from __future__ import annotations

import ctypes
import errno
import os
import platform
import resource
import signal
import stat
import struct
import sys

CONFINE, REPORT = "course_lib.grader.confine", "course_lib.grader.report"
THREAD = "course_lib.sandbox.thread"


def limit_resources(memory_mb: int, cpu_seconds: int, file_mb: int) -> list[str]:
    """Hard rlimits on this process: address space, CPU time, largest file written, core dumps; returns the names
    of those the platform refused (macOS does not enforce an address-space limit)."""
    refused = []
    for name, value in (("RLIMIT_AS", memory_mb << 20), ("RLIMIT_CPU", cpu_seconds), ("RLIMIT_FSIZE", file_mb << 20),
                        ("RLIMIT_CORE", 0)):
        try:
            resource.setrlimit(getattr(resource, name), (value, value))
        except (ValueError, OSError, AttributeError):
            refused.append(name)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write raises OSError instead of killing us
    return refused


# ---- Landlock ------------------------------------------------------------------------------------

_LANDLOCK_CREATE, _LANDLOCK_ADD_RULE, _LANDLOCK_RESTRICT = 444, 445, 446  # the same on x86-64 and arm64
_EXECUTE, _WRITE_FILE, _READ_FILE, _READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_ABI1 = (1 << 13) - 1  # execute .. make_sym
_REFER, _TRUNCATE, _IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_NET_TCP = (1 << 0) | (1 << 1)  # bind, connect (ABI 4)
_SCOPE_ALL = (1 << 0) | (1 << 1)  # abstract unix sockets, signals (ABI 6)
_FILE_RIGHTS = _EXECUTE | _WRITE_FILE | _READ_FILE | _TRUNCATE | _IOCTL_DEV
_READ = _EXECUTE | _READ_FILE | _READ_DIR


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, or 0 where Landlock is missing or disabled."""
    if not sys.platform.startswith("linux"):
        return 0
    version = _libc().syscall(_LANDLOCK_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(int(version), 0)


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def read_grants(roots, denied) -> list[str]:
    """Paths to grant read access so that everything under `roots` is readable except what lies under `denied`.

    A root that contains a denied path is replaced by its entries (recursively, only along the way to the denied
    path), because Landlock can only allow, never carve an exception out of an allowed folder.
    """
    denied = [os.path.realpath(d) for d in denied]
    grants: list[str] = []

    def visit(path: str, depth: int) -> None:
        if any(_within(path, d) for d in denied):
            return
        if not any(_within(d, path) for d in denied):
            grants.append(path)
            return
        if depth > 12 or not os.path.isdir(path):
            return
        try:
            entries = sorted(os.listdir(path))
        except OSError:
            return
        for name in entries:
            visit(os.path.join(path, name), depth + 1)

    for root in dict.fromkeys(os.path.realpath(r) for r in roots if r and os.path.exists(r)):
        visit(root, 0)
    return list(dict.fromkeys(grants))


def landlock_confine(read: list[str], write: list[str]) -> int:
    """Let this process (and any child) read only under `read` and write only under `write`; the ABI used, or 0."""
    abi = landlock_abi()
    if abi < 1:
        return 0
    libc = _libc()
    fs = _FS_ABI1 | (_REFER if abi >= 2 else 0) | (_TRUNCATE if abi >= 3 else 0) | (_IOCTL_DEV if abi >= 5 else 0)
    attr = _RulesetAttr(fs, _NET_TCP if abi >= 4 else 0, _SCOPE_ALL if abi >= 6 else 0)
    ruleset = libc.syscall(_LANDLOCK_CREATE, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)),
                           ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset failed")
    try:
        rules = [(p, _READ) for p in read] + [(p, fs) for p in write]
        for path, rights in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # gone since it was listed
            try:
                rights &= fs if os.path.isdir(path) else (_FILE_RIGHTS & fs)
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


# ---- seccomp -------------------------------------------------------------------------------------

# Syscall numbers per architecture (x86-64: arch/x86/entry/syscalls/syscall_64.tbl; arm64: asm-generic/unistd.h).
_X86_64 = dict(socket=41, socketpair=53, clone=56, fork=57, vfork=58, execve=59, kill=62, ptrace=101, syslog=103,
               rt_sigqueueinfo=129, pivot_root=155, adjtimex=159, chroot=161, acct=163, settimeofday=164, mount=165,
               umount2=166, swapon=167, swapoff=168, reboot=169, sethostname=170, setdomainname=171, iopl=172,
               ioperm=173, init_module=175, delete_module=176, quotactl=179, tkill=200, clock_settime=227,
               tgkill=234, kexec_load=246, add_key=248, request_key=249, keyctl=250, unshare=272,
               rt_tgsigqueueinfo=297, perf_event_open=298, fanotify_init=300, name_to_handle_at=303,
               open_by_handle_at=304, setns=308, process_vm_readv=310, process_vm_writev=311, kcmp=312,
               finit_module=313, kexec_file_load=320, bpf=321, execveat=322, userfaultfd=323, pidfd_send_signal=424,
               io_uring_setup=425, io_uring_enter=426, io_uring_register=427, open_tree=428, move_mount=429,
               fsopen=430, fsconfig=431, fsmount=432, fspick=433, pidfd_open=434, clone3=435, pidfd_getfd=438)
_ARM64 = dict(umount2=39, mount=40, pivot_root=41, chroot=51, quotactl=60, acct=89, unshare=97, kexec_load=104,
              init_module=105, delete_module=106, clock_settime=112, syslog=116, ptrace=117, kill=129, tkill=130,
              tgkill=131, rt_sigqueueinfo=138, reboot=142, sethostname=161, setdomainname=162, settimeofday=170,
              adjtimex=171, socket=198, socketpair=199, add_key=217, request_key=218, keyctl=219, clone=220,
              execve=221, swapon=224, swapoff=225, rt_tgsigqueueinfo=240, perf_event_open=241, fanotify_init=262,
              name_to_handle_at=264, open_by_handle_at=265, setns=268, process_vm_readv=270, process_vm_writev=271,
              kcmp=272, finit_module=273, bpf=280, execveat=281, userfaultfd=282, kexec_file_load=294,
              pidfd_send_signal=424, io_uring_setup=425, io_uring_enter=426, io_uring_register=427, open_tree=428,
              move_mount=429, fsopen=430, fsconfig=431, fsmount=432, fspick=433, pidfd_open=434, clone3=435,
              pidfd_getfd=438)
_ARCH = {"x86_64": (0xC000003E, _X86_64), "amd64": (0xC000003E, _X86_64), "aarch64": (0xC00000B7, _ARM64),
         "arm64": (0xC00000B7, _ARM64)}
_DENIED = ("socket", "socketpair", "fork", "vfork", "execve", "execveat", "ptrace", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "process_vm_readv",
           "process_vm_writev", "kcmp", "pidfd_open", "pidfd_getfd", "pidfd_send_signal", "tkill", "io_uring_setup",
           "io_uring_enter", "io_uring_register", "bpf", "userfaultfd", "perf_event_open", "unshare", "setns",
           "mount", "umount2", "pivot_root", "chroot", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount",
           "fspick", "reboot", "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
           "swapon", "swapoff", "sethostname", "setdomainname", "settimeofday", "clock_settime", "adjtimex", "acct",
           "quotactl", "syslog", "iopl", "ioperm", "keyctl", "add_key", "request_key", "fanotify_init",
           "name_to_handle_at", "open_by_handle_at")


def _bpf(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k & 0xFFFFFFFF)


def seccomp_program(pid: int, machine: str | None = None) -> bytes:
    """The BPF filter described in the module docstring, for this machine's architecture: the denied calls fail
    with EPERM (clone3 with ENOSYS, so that glibc falls back to clone, which fails with EPERM whatever its flags:
    no process and no thread can start); kill and tgkill reach only this process."""
    ld, jeq, ret = 0x20, 0x15, 0x06
    allow, kill = 0x7FFF0000, 0x80000000
    eperm, enosys = 0x00050000 | errno.EPERM, 0x00050000 | errno.ENOSYS
    arch, nr = _ARCH[(machine or platform.machine()).lower()]
    prog = [_bpf(ld, 4), _bpf(jeq, arch, 1, 0), _bpf(ret, kill), _bpf(ld, 0)]
    if nr is _X86_64:
        prog += [_bpf(0x35, 0x40000000, 0, 1), _bpf(ret, eperm)]  # the x32 ABI
    blocks = []
    for name in _DENIED + ("clone",):
        if name in nr:
            blocks.append((nr[name], [_bpf(ret, eperm)]))
    blocks.append((nr["clone3"], [_bpf(ret, enosys)]))
    blocks.append((nr["kill"], [_bpf(ld, 16), _bpf(jeq, pid, 2, 0), _bpf(jeq, 0, 1, 0), _bpf(ret, eperm),
                                _bpf(ret, allow)]))
    blocks.append((nr["tgkill"], [_bpf(ld, 16), _bpf(jeq, pid, 0, 1), _bpf(ret, allow), _bpf(ret, eperm)]))
    for number, block in blocks:
        prog.append(_bpf(jeq, number, 0, len(block)))
        prog += block
    prog.append(_bpf(ret, allow))
    return b"".join(prog)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def seccomp_confine() -> bool:
    """Install the filter on this process; False where seccomp is unavailable."""
    if not sys.platform.startswith("linux") or platform.machine().lower() not in _ARCH:
        return False
    program = seccomp_program(os.getpid())
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.addressof(buf))
    libc = _libc()
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        return False
    return libc.prctl(22, 2, ctypes.byref(prog), 0, 0) == 0  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER


# ---- the audit hook ------------------------------------------------------------------------------

_PROCESS = {"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
            "pty.spawn", "os.startfile"}
_TAMPER = {"sys.addaudithook", "sys._current_frames", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
           "resource.setrlimit", "resource.prlimit", "sys.remote_exec", "cpython._PySys_ClearAuditHooks"}
_PATH_ARGS = {"os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.truncate": (0,), "os.chmod": (0,),
              "os.chown": (0,), "os.link": (0, 1), "os.symlink": (1,), "os.mkdir": (0,), "os.utime": (0,),
              "shutil.rmtree": (0,), "os.chflags": (0,), "os.setxattr": (0,), "os.removexattr": (0,),
              "os.mkfifo": (0,), "os.mknod": (0,)}
_FRAME_ATTRS = ("tb_frame", "gi_frame", "cr_frame", "ag_frame")  # not __code__: torch.compile reads it from C
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
MAX_REFUSALS = 50


def _submission_code(code) -> bool:
    """Code compiled from a notebook cell or from a string (not from a module file)."""
    name = code.co_filename
    return name.startswith("<ipython-input-") or not (os.path.isabs(name) or name.startswith("<frozen "))


def install_hook(trusted_code) -> None:
    """Install the audit hook (see the module docstring); it checks nothing until a CONFINE event sets its policy.

    `trusted_code` are the code objects allowed on the stack when the policy is set or the refusals are read (the
    worker's own functions); the frames on the stack now are added to them. The policy is set once.
    """
    getframe, get_ident, realpath = sys._getframe, __import__("_thread").get_ident, os.path.realpath
    coroutine_code = __import__("types").coroutine.__code__
    trusted = set(trusted_code)
    frame = getframe(1)
    while frame is not None:
        trusted.add(frame.f_code)
        frame = frame.f_back
    trusted = frozenset(trusted)
    policy: dict = {}
    refusals: list = []
    busy: set = set()  # threads inside the hook: the events its own frame access raises are not checked again

    def caller():
        """The innermost frame outside this hook, or None."""
        frame = getframe(0)
        while frame is not None and frame.f_code in own:
            frame = frame.f_back
        return frame

    def only_trusted_on_stack() -> bool:
        frame = caller()
        while frame is not None:
            if frame.f_code not in trusted:
                return False
            frame = frame.f_back
        return True

    def refuse(kind: str, what: str):
        if len(refusals) < MAX_REFUSALS:
            refusals.append((kind, what[:120]))
        raise PermissionError(f"the grader does not allow {what} in a submission")

    def from_submission() -> bool:
        frame = caller()
        return frame is not None and _submission_code(frame.f_code)

    def outside(path, roots) -> bool:
        real = realpath(os.fsdecode(path))
        return not any(real == r or real.startswith(r + os.sep) for r in roots)

    def denied_read(path) -> bool:
        real = realpath(os.fsdecode(path))
        if any(real == w or real.startswith(w + os.sep) for w in policy["write"]):
            return False  # its own scratch folder, inside the batch folder that is denied
        if any(real == d or real.startswith(d + os.sep) for d in policy["deny_read"]):
            return True
        parts = real.split(os.sep)  # /proc/<pid>/... of another process
        return len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() and parts[2] != policy["pid"]

    def grader(event, args):
        if not only_trusted_on_stack():
            refuse("tamper", "calling the grader's hook")
        if event == REPORT:
            args[0].extend(refusals)
            refusals.clear()
        elif event == CONFINE and not policy:
            policy.update(args[0], pid=str(os.getpid()))

    def check(event, args):
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE_FLAGS)
            if isinstance(path, int):
                if writing and not _regular_fd(path):
                    refuse("tamper", f"writing to file descriptor {path} (not a file)")
            elif path is not None:
                if writing and outside(path, policy["write"]):
                    refuse("file", f"writing to {os.fsdecode(path)}")
                if denied_read(path):
                    refuse("read", f"reading {os.fsdecode(path)}")
        elif event in ("os.listdir", "os.scandir"):
            if args and isinstance(args[0], (str, bytes, os.PathLike)) and denied_read(args[0]):
                refuse("read", f"listing {os.fsdecode(args[0])}")
        elif event == "import":
            name = args[0] if args and isinstance(args[0], str) else ""
            if any(name == b or name.startswith(b + ".") for b in policy["blocked_modules"]):
                refuse("tamper", f"importing {name}")
        elif event in _PROCESS:
            refuse("process", f"starting processes ({event})")
        elif event == THREAD:
            refuse("process", "starting threads")
        elif event == "socket.__new__":
            refuse("network", "network access (sockets)")
        elif event in _TAMPER:
            refuse("tamper", event)
        elif event.startswith("ctypes.") and event not in ("ctypes.create_string_buffer",
                                                           "ctypes.create_unicode_buffer"):
            refuse("tamper", f"calling native code ({event})")
        elif event in ("sys.setprofile", "sys.settrace"):
            if not only_trusted_on_stack():
                if from_submission():
                    refuse("tamper", event)
                elif len(refusals) < MAX_REFUSALS:  # a library (torch.compile) switching it: allowed, noted
                    refusals.append(("library", f"{event} by a library"))
        elif event in ("os.kill", "os.killpg"):
            if args[0] not in (os.getpid(), 0):
                refuse("signal", "signalling other processes")
        elif event == "object.__setattr__":
            if len(args) > 1 and args[1] in ("__code__", "__globals__"):
                frame = caller()
                # the one exception: the standard library's @types.coroutine sets a flag on the function's own code
                # (trio, under httpx under diffusers, does it at import); anything else is refused
                if not (args[1] == "__code__" and frame is not None and frame.f_code is coroutine_code):
                    refuse("tamper", f"replacing a function's {args[1]}")
        elif event == "object.__getattr__":
            if len(args) > 1 and args[1] in _FRAME_ATTRS and from_submission():
                refuse("tamper", f"reading {args[1]}")
        elif event in ("code.__new__", "function.__new__", "marshal.loads", "sys._getframe"):
            if from_submission():
                refuse("tamper", event)
        elif event == "compile":
            filename = args[1] if len(args) > 1 else None
            if isinstance(filename, (str, bytes)) and os.path.isabs(os.fsdecode(filename)) and from_submission():
                refuse("tamper", "compiling code under a module's file name")
        elif event in _PATH_ARGS:
            for i in _PATH_ARGS[event]:
                if i < len(args) and isinstance(args[i], (str, bytes, os.PathLike)) \
                        and outside(args[i], policy["write"]):
                    refuse("file", f"changing {os.fsdecode(args[i])}")

    def hook(event, args):
        tid = get_ident()
        if tid in busy:
            return
        busy.add(tid)
        try:
            if event.startswith("course_lib.grader."):
                grader(event, args)
            elif policy:
                check(event, args)
        finally:
            busy.discard(tid)

    own = frozenset(f.__code__ for f in (caller, only_trusted_on_stack, refuse, from_submission, outside,
                                         denied_read, grader, check, hook))
    sys.addaudithook(hook)


def _regular_fd(fd: int) -> bool:
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode) or os.path.realpath(f"/proc/self/fd/{fd}") == os.devnull
    except OSError:
        return False


def refuse_threads() -> None:
    """Make starting a Python thread raise (a submission runs on one Python thread; torch's own pool is native)."""
    import _thread

    originals = {id(_thread.start_new_thread), id(getattr(_thread, "start_new", None))}

    def no_threads(*args, **kwargs):
        sys.audit(THREAD)  # the hook records the refusal and raises
        raise PermissionError("the grader does not allow threads in a submission")

    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if isinstance(namespace, dict):
            for key, value in list(namespace.items()):
                if id(value) in originals and callable(value):
                    namespace[key] = no_threads
