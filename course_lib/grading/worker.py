"""The process that runs one untrusted submission for the grader (course_lib.grading.batch): it only runs code.

`python -m course_lib.grading.worker FD`: FD is one end of a socket pair to the grader. The worker reads the job,
loads everything a lesson imports, confines itself (course_lib.grading.sandbox), runs the notebook's code cells in an
IPython shell with a time limit per cell, then calls the learner's functions on the calls the grader sends after the
notebook has run, and returns what each call returned. An exercise graded on behaviour hands the learner's function
proxies of its oracles (a denoiser, a model): each call of a proxy is a request to the grader, which holds the oracle,
counts the calls and answers. Nothing here judges, counts or inspects: the grader trusts no message from this process
(a submission can write to the socket as well as this code can), and decides everything in its own.
"""
from __future__ import annotations

import os
import signal
import socket
import struct
import sys

import torch

from . import channel, sandbox
from .calls import Raised, call_learner, with_oracles
from .oracles import BudgetExceeded

_audit = sys.audit
MAX_OUTPUT = 2 << 20  # bytes of tensors per result: every exercise's answer is a few kB, a trained network 300 kB
MAX_TRUSTED = 256 << 20  # the grader's own messages (the job, the calls)
_ORACLE_ERRORS = {"BudgetExceeded": BudgetExceeded, "ValueError": ValueError, "TypeError": TypeError}


class GradingTimeout(BaseException):
    """Raised by the alarm when a cell or a call runs past its limit (BaseException: `except Exception` misses it)."""


def _alarm(signum, frame):
    raise GradingTimeout()


class _Limit:
    """Raise GradingTimeout in the main thread after `seconds`."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __enter__(self):
        signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc):
        signal.setitimer(signal.ITIMER_REAL, 0)


class _Channel:
    """The socket to the grader: framed messages out (course_lib.grading.channel), the grader's trusted ones in."""

    def __init__(self, fd: int):
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(True)

    def send(self, kind: str, **fields) -> None:
        self.sock.sendall(channel.encode({"kind": kind, **fields}))

    def recv(self):
        (size,) = struct.unpack("<Q", self._exactly(8))
        if size > MAX_TRUSTED:
            raise OSError("the grader sent an oversized message")
        return channel.decode_trusted(self._exactly(size))

    def _exactly(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise EOFError("the grader closed the channel")
            buf += chunk
        return bytes(buf)


def _argument(value):
    """An oracle argument as the channel carries it: tensors, numbers, None (a numpy array becomes a tensor)."""
    if value is None or isinstance(value, (bool, int, float, torch.Tensor)):
        return value.detach() if isinstance(value, torch.Tensor) else value
    try:
        return torch.as_tensor(value)
    except Exception:
        raise TypeError(f"the oracle takes tensors and numbers, not {type(value).__name__}") from None


class _Proxy:
    """An oracle of the grader's, called from here: each call is one request, answered by the grader."""

    def __init__(self, chan: _Channel, name: str, text: str):
        self._chan, self._name, self._text = chan, name, text

    def __call__(self, *args, **kwargs):
        request = {"oracle": self._name, "args": [_argument(a) for a in args],
                   "kwargs": {str(k): _argument(v) for k, v in kwargs.items()}}
        # no time-out alarm in the middle of a message: the call's limit is checked once the grader has answered
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        try:
            self._chan.send("oracle", **request)
            reply = self._chan.recv()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        if "error" in reply:
            raise _ORACLE_ERRORS.get(reply["error"], RuntimeError)(reply["message"])
        return reply["value"]

    def __repr__(self) -> str:
        return self._text


def _prepare(threads: int):
    """Import what every lesson uses (the rest imports lazily after confinement), and an IPython shell."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  (loads the font cache now)
    import numpy  # noqa: F401
    import tqdm
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    import course_lib

    # under diffusers (lesson 8), urllib3 opens a socket at import to test for IPv6, trio runs ldconfig (through
    # ctypes.util.find_library), and fsspec (under huggingface_hub, which diffusers imports through peft when peft is
    # installed) looks up a libc symbol through ctypes: import them before confinement, where none of it is allowed
    for optional in ("ipywidgets", "matplotlib_inline.backend_inline", "IPython.display", "urllib3", "trio", "fsspec"):
        try:
            __import__(optional)
        except ImportError:
            pass
    tqdm.tqdm.monitor_interval = 0  # no monitor thread
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    torch.ones(1 << 16).sum()  # torch's threads start now: after confinement no thread can be created
    try:  # so does the profiler's, at its first session (lesson 5 profiles its sampler)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
            torch.ones(4).sum()
    except Exception:
        pass

    def not_while_grading(name, fn=None):
        """check() does nothing while grading: the grader calls your function itself, on inputs of its own."""
        print(f"(check({name!r}, ...) is skipped while grading: the grader tests the function itself)")

    def no_progress(lesson=None):
        print("(progress() is skipped while grading)")

    course_lib.check, course_lib.progress = not_while_grading, no_progress

    class Shell(InteractiveShell):
        def enable_gui(self, gui=None):  # `%matplotlib inline` asks for no GUI event loop: nothing to do
            pass

    config = Config()
    config.HistoryManager.enabled = False
    shell = Shell.instance(config=config)
    sys.path[:] = [p for p in sys.path if p not in ("", ".", os.getcwd())]  # no module a cell writes is importable
    return shell


def _read_roots(job: dict) -> list[str]:
    """What the submission may read: Python, system libraries, loaded libraries' folders, course_lib, the data
    (the job's `read`), never a whole course checkout."""
    import site
    import sysconfig

    import course_lib

    package = os.path.dirname(os.path.realpath(course_lib.__file__))
    course = os.path.dirname(package)  # a checkout: never granted whole (its notebooks/ and .git hold solutions)
    paths = [p for p in sys.path if p and os.path.realpath(p) != course]
    roots = [sys.prefix, sys.base_prefix, sys.exec_prefix, *sysconfig.get_paths().values(), package,
             *site.getsitepackages(), site.getusersitepackages(), *paths, *job["read"],
             "/usr", "/lib", "/lib32", "/lib64", "/libx32", "/bin", "/sbin", "/sys", "/dev/null", "/dev/zero",
             "/dev/urandom", "/dev/random", "/proc/self", "/proc/cpuinfo", "/proc/meminfo", "/proc/stat",
             "/proc/sys", "/etc/ld.so.cache", "/etc/localtime", "/etc/passwd", "/etc/group", "/etc/nsswitch.conf"]
    try:
        import matplotlib

        roots += [matplotlib.get_configdir(), matplotlib.get_cachedir(), matplotlib.get_data_path()]
    except Exception:
        pass
    try:  # the folders of every shared library loaded now (a conda or venv layout, torch's own libraries)
        with open("/proc/self/maps") as f:
            roots += sorted({os.path.dirname(line.split()[-1]) for line in f if line.rstrip().endswith(".so")
                             or ".so." in line.split()[-1]})
    except OSError:
        pass
    return [r for r in roots if r and os.path.isabs(r)]


def _foreign_function_files() -> list[str]:
    """The native modules of foreign-function interfaces not loaded yet (cffi's backend): Landlock keeps them
    unreadable, so they cannot be loaded after confinement. (ctypes is loaded by torch already: the audit hook refuses
    every use of it.)"""
    import importlib.util

    found = []
    for name in ("_cffi_backend", "cffi"):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.origin and name not in sys.modules:
            found.append(os.path.dirname(spec.origin) if spec.submodule_search_locations else spec.origin)
    return found


def _confine(job: dict) -> list[str]:
    """Landlock, seccomp, the hook's policy and no threads; returns a description of each layer applied."""
    layers = []
    scratch = job["scratch"]
    deny = [*job["deny_read"], *_foreign_function_files()]
    if job["layers"].get("landlock", True):
        try:
            abi = sandbox.landlock_confine(sandbox.read_grants(_read_roots(job), deny), [scratch, os.devnull])
            layers.append(f"landlock ABI {abi}" if abi else "no landlock (kernel lacks it)")
        except OSError as e:
            layers.append(f"no landlock ({e})")
    else:
        layers.append("no landlock (switched off)")
    if job["layers"].get("seccomp", True):
        try:
            layers.append("seccomp" if sandbox.seccomp_confine() else "no seccomp (platform lacks it)")
        except OSError as e:
            layers.append(f"no seccomp ({e})")
    else:
        layers.append("no seccomp (switched off)")
    _audit(sandbox.CONFINE, {"write": [os.path.realpath(scratch), os.devnull],
                             "deny_read": [os.path.realpath(p) for p in deny],
                             "blocked_modules": list(job["blocked_modules"])})
    sandbox.refuse_threads()
    layers.append("audit hook")
    return layers


def _refusals() -> list:
    box: list = []
    _audit(sandbox.REPORT, box)
    return [list(r) for r in box]


def _describe(value) -> dict:
    return {"defined": True, "callable": callable(value), "type": type(value).__name__[:60]}


def _plain(got: torch.Tensor) -> torch.Tensor | None:
    """A plain CPU tensor holding `got`'s values (a tensor subclass computes them here, not in the grader)."""
    out = torch.empty(tuple(got.shape), dtype=got.dtype)
    with torch.no_grad():
        out.copy_(got.detach().to_dense() if got.layout != torch.strided else got.detach())
    return out if type(out) is torch.Tensor else None


def _output(got):
    """What one call returned, as the channel carries it: a tensor, a procedure's dict of tensors, or an error."""
    if isinstance(got, Raised):
        return {"error": got.error[:100], "message": got.message[:300]}
    if isinstance(got, dict):
        got = {str(k)[:80]: _plain(v) if isinstance(v, torch.Tensor) else None for k, v in list(got.items())[:256]}
        if any(v is None for v in got.values()):
            return {"error": "", "message": "a result the grader could not read"}
        size = sum(v.numel() * v.element_size() for v in got.values())
    else:
        got = _plain(got)
        if got is None:
            return {"error": "", "message": "a tensor the grader could not read"}
        size = got.numel() * got.element_size()
    if size > MAX_OUTPUT:
        return {"error": "", "message": f"{size >> 20} MB of tensors, over the grader's {MAX_OUTPUT >> 20} MB limit"}
    return {"tensors": got} if isinstance(got, dict) else got


def _call(chan: _Channel, fn, call: dict, seconds: float):
    """One call of the learner's function under a time limit, its oracles proxied to the grader."""
    proxies = {name: _Proxy(chan, name, text) for name, text in call["oracles"].items()}
    try:
        with _Limit(seconds):
            got = call_learner(fn, with_oracles(call["inputs"], proxies), call["procedure"])
            if isinstance(got, Raised) and got.error == GradingTimeout.__name__:
                raise GradingTimeout()
            return _output(got)
    except GradingTimeout:
        return {"timeout": True}
    except Exception as e:  # converting a hostile output
        return {"error": type(e).__name__[:100], "message": str(e)[:200]}


def _run_cell(shell, source: str, seconds: float) -> tuple[str, str]:
    """Run one cell; return (status, message) with status ok / error / timeout."""
    try:
        with _Limit(seconds):
            result = shell.run_cell(source, store_history=False, silent=False)
    except GradingTimeout:
        return "timeout", f"stopped after {seconds:g} s"
    except BaseException as e:  # an exception escaping IPython itself (e.g. in a post-execute hook)
        return "error", _exception_text(e)
    err = result.error_before_exec or result.error_in_exec
    if err is None:
        return "ok", ""
    if isinstance(err, GradingTimeout):
        return "timeout", f"stopped after {seconds:g} s"
    return "error", _exception_text(err)


def _exception_text(e: BaseException) -> str:
    name = type(e).__name__[:60]
    try:
        text = str(e).splitlines()[0][:200] if str(e) else ""
    except Exception:
        text = "(its message could not be read)"
    return f"{name}: {text}" if text else name


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    sandbox.install_hook([f.__code__ for f in (main, _confine, _refusals)])
    chan = _Channel(int(argv[0]))
    job = chan.recv()
    unlimited = sandbox.limit_resources(job["memory_mb"], job["cpu_seconds"], job["file_mb"])
    shell = _prepare(job["threads"])
    chan.send("ready", layers=[*(f"no {name}" for name in unlimited), *_confine(job)])
    for index, source in job["cells"]:
        chan.send("cell", index=index)
        status, message = _run_cell(shell, source, job["cell_timeout"])
        chan.send("cell_done", index=index, status=status, message=message, refused=_refusals())
    ns = shell.user_ns
    chan.send("defined", names={n: _describe(ns[n]) if n in ns else {"defined": False} for n in job["names"]})
    calls = chan.recv()
    for name, todo in calls.items():
        fn = ns.get(name)
        for index, call in enumerate(todo):
            chan.send("call", name=name, index=index)
            output = _call(chan, fn, call, call["seconds"])
            try:
                chan.send("result", name=name, index=index, output=output, refused=_refusals())
            except (TypeError, ValueError) as e:  # an output the format cannot carry
                chan.send("result", name=name, index=index, refused=_refusals(),
                          output={"error": "", "message": f"an output the grader cannot read ({e})"})
            if isinstance(output, dict) and output.get("timeout"):
                break  # one time-out is enough: do not spend the limit again on every call
    chan.send("done", refused=_refusals())
    os._exit(0)  # skip interpreter teardown: anything a submission left behind cannot delay us


if __name__ == "__main__":
    main()
