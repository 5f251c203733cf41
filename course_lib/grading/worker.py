"""The process that runs one untrusted submission for the grader (course_lib.grading.batch).

`python -m course_lib.grading.worker FD`: FD is one end of a socket pair to the grader. The worker hands it to the
audit hook (course_lib.grading.sandbox) before anything else, reads the job, loads everything a lesson imports,
confines itself, runs the notebook's code cells in an IPython shell with a time limit per cell, then calls the
learner's functions on the inputs the grader sends only after the notebook has run. For each call it returns the
raw outputs, the course_lib functions that ran during the call, the fingerprints of every code object the
function can reach and what else it found there (course_lib.grading.identity), and everything the sandbox
refused. It never decides a grade: the grader compares outputs and fingerprints in its own process.
"""
from __future__ import annotations

import os
import signal
import sys

import torch

from . import channel, identity, sandbox
from .calls import Raised, call_learner

_audit = sys.audit
MAX_OUTPUT = 2 << 20  # bytes per output: every exercise's answer is a few kB


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


def _send(kind: str, **fields) -> None:
    _audit(sandbox.SEND, channel.encode({"kind": kind, **fields}))


def _recv():
    box: list = []
    _audit(sandbox.RECV, box)
    return channel.decode_trusted(box[0])


def _refusals() -> list:
    box: list = []
    _audit(sandbox.REPORT, box)
    return [list(r) for r in box]


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

    # under diffusers (lesson 8), urllib3 opens a socket at import to test for IPv6 and trio runs ldconfig (through
    # ctypes.util.find_library): import both before confinement, where neither is allowed
    for optional in ("ipywidgets", "matplotlib_inline.backend_inline", "IPython.display", "urllib3", "trio"):
        try:
            __import__(optional)
        except ImportError:
            pass
    tqdm.tqdm.monitor_interval = 0  # no monitor thread
    torch.set_num_threads(threads)

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


def _confine(job: dict, fd: int) -> list[str]:
    """Landlock, seccomp, the hook's policy and no threads; returns a description of each layer applied."""
    layers = []
    scratch = job["scratch"]
    deny = [*job["deny_read"], *job["blocked_paths"]]
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
            layers.append("seccomp" if sandbox.seccomp_confine(fd) else "no seccomp (platform lacks it)")
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


def _describe(value) -> dict:
    return {"defined": True, "callable": callable(value), "type": type(value).__name__[:60]}


def _plain(got) -> torch.Tensor | None:
    """A plain CPU tensor holding `got`'s values (computed here, inside the traced window, for a lazy subclass)."""
    out = torch.empty(tuple(got.shape), dtype=got.dtype)
    with torch.no_grad():
        out.copy_(got.detach().to_dense() if got.layout != torch.strided else got.detach())
    return out if type(out) is torch.Tensor else None


def _call(fn, trials, library: dict, seconds: float, harness: str | None = None):
    """fn on each input dict under a time limit, with a profiler noting every library-equivalent code that runs.

    With `harness`, fn runs inside that procedure of course_lib.grading.harnesses, whose dict of tensors is sent."""
    used: set = set()
    memo: dict = {}
    seen: dict = {}

    def profiler(frame, event, arg):
        if event == "call":
            code = frame.f_code
            hit = seen.get(code)
            if hit is None:
                hit = seen[code] = library.get(identity.fingerprint(code, memo), "")
            if hit:
                used.add(hit)

    outputs, subclass = [], False
    for inputs in trials:
        try:
            with _Limit(seconds):
                sys.setprofile(profiler)
                try:
                    got = call_learner(fn, inputs, harness)
                    if isinstance(got, torch.Tensor):
                        subclass |= type(got) is not torch.Tensor
                        got = _plain(got)
                    elif isinstance(got, dict):  # a harness's tensors (made by the library, from the learner's)
                        got = {str(k): _plain(v) if isinstance(v, torch.Tensor) else None for k, v in got.items()}
                finally:
                    sys.setprofile(None)
        except GradingTimeout:
            got = Raised("GradingTimeout", "")
        except Exception as e:  # converting a hostile output
            got = Raised(type(e).__name__, str(e)[:200])
        if isinstance(got, Raised):
            if got.error == "GradingTimeout":
                outputs.append({"timeout": True})
                break  # one time-out is enough: do not spend the limit again on every trial
            outputs.append({"error": got.error[:100], "message": got.message[:300]})
        elif isinstance(got, dict):
            size = sum(v.numel() * v.element_size() for v in got.values() if v is not None)
            if any(v is None for v in got.values()) or size > MAX_OUTPUT:
                outputs.append({"error": "", "message": "a result the grader could not read or over its size limit"})
            else:
                outputs.append({"harness": got})
        elif got is None:
            outputs.append({"error": "", "message": "a tensor the grader could not read"})
        elif got.numel() * got.element_size() > MAX_OUTPUT:
            outputs.append({"error": "", "message": f"a tensor of {got.numel() * got.element_size() >> 20} MB, "
                                                    f"over the grader's {MAX_OUTPUT >> 20} MB limit"})
        else:
            outputs.append(got)
    return outputs, sorted(used), subclass


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


def _reach_report(fn) -> dict:
    try:
        codes, evidence = identity.reach(fn)
        memo: dict = {}
        return {"fingerprints": [identity.fingerprint(c, memo) for c in codes], "evidence": evidence}
    except Exception as e:
        return {"fingerprints": [], "evidence": [f"could not be inspected ({type(e).__name__})"]}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    fd = int(argv[0])
    sandbox.install_hook(fd, [f.__code__ for f in (main, _send, _recv, _refusals, _confine, _call)])
    job = _recv()
    unlimited = sandbox.limit_resources(job["memory_mb"], job["cpu_seconds"], job["file_mb"])
    shell = _prepare(job["threads"])
    library = {name: identity.library_fingerprints({d: identity.resolve(d) for d in dotted})
               for name, dotted in job["equivalents"].items()}
    _send("ready", layers=[*(f"no {name}" for name in unlimited), *_confine(job, fd)])
    for index, source in job["cells"]:
        _send("cell", index=index)
        status, message = _run_cell(shell, source, job["cell_timeout"])
        _send("cell_done", index=index, status=status, message=message, refused=_refusals())
    ns = shell.user_ns
    _send("defined", names={n: _describe(ns[n]) if n in ns else {"defined": False} for n in job["names"]})
    inputs = _recv()
    for name, trials in inputs.items():
        _send("call", name=name)
        fn = ns.get(name)
        outputs, used, subclass = _call(fn, trials, library.get(name, {}),
                                        job.get("call_seconds", {}).get(name, job["call_timeout"]),
                                        job.get("harness", {}).get(name))
        try:
            _send("result", name=name, outputs=outputs, library=used, subclass=subclass, **_reach_report(fn),
                  refused=_refusals())
        except (TypeError, ValueError) as e:  # an output the format cannot carry
            _send("result", name=name, outputs=[{"error": "", "message": f"an output the grader cannot read ({e})"}],
                  library=used, subclass=subclass, fingerprints=[], evidence=[], refused=_refusals())
    _send("done", refused=_refusals())
    os._exit(0)  # skip interpreter teardown: anything a submission left behind cannot delay us


if __name__ == "__main__":
    main()
