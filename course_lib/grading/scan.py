"""What a submission's source shows, read in the grader's own process, where the submission cannot change it.

Only the cells the learner wrote or changed are read (a cell identical to one of the released lesson's is the
course's own code). Two kinds of finding:
- `tamper`, anywhere in those cells: constructs that can reach the grader's machinery or hide what runs, none of
  which an exercise needs: raw file-descriptor I/O, threads and processes, sockets, native code, profilers,
  tracers and audit hooks, frames and the garbage collector, code objects, pickles, dynamic code (exec, eval,
  compile, __import__, importlib, %run), attribute access by computed name or to interpreter internals, changing
  modules' attributes, sys.modules and sys.path. A construct the released lesson itself uses is not reported.
- `copy`, per exercise, in the code the graded function can reach (its definition, the top-level definitions it
  names, transitively): the course_lib functions that compute its answer, the exercise references, reading
  course_lib's source, tracing or compiling (torch.jit, torch.fx, torch.compile) and tensor subclasses.
"""
from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass

ALLOWED_MAGICS = {"matplotlib", "time", "timeit", "capture", "load_ext", "autoreload", "config", "precision",
                  "pip", "conda", "cd", "pwd", "ls", "who", "whos", "env", "pinfo", "pdef", "pdoc", "psource",
                  "history", "lsmagic", "magic", "debug", "xmode", "alias_magic", "html", "markdown", "latex"}
TAMPER_MODULES = {"ctypes", "_ctypes", "cffi", "gc", "inspect", "dis", "profile", "cProfile", "_lsprof", "pdb", "bdb",
                  "trace", "marshal", "pickle", "_pickle", "copyreg", "dill",
                  "cloudpickle", "joblib", "shelve", "importlib", "imp", "runpy", "pkgutil", "zipimport", "code",
                  "codeop", "atexit", "faulthandler", "resource", "fcntl", "mmap", "posix", "nt", "builtins",
                  "__builtin__", "_io", "linecache", "tokenize", "weakref", "tracemalloc", "sysconfig", "site", "_imp",
                  "_frozen_importlib", "_frozen_importlib_external", "__main__", "course_lib.grading"}
TAMPER_ATTRS = {  # threads, processes and sockets are not here: the sandbox refuses them and they cannot change a grade
    "os": {"write", "writev", "pwrite", "pwritev", "sendfile", "splice", "copy_file_range", "dup", "dup2", "fdopen",
           "open", "set_inheritable", "set_blocking", "memfd_create", "openpty", "register_at_fork"},
    "sys": {"setprofile", "settrace", "_getframe", "addaudithook", "_current_frames", "modules", "path", "meta_path",
            "path_hooks", "path_importer_cache", "displayhook", "excepthook", "unraisablehook", "breakpointhook",
            "audit", "_xoptions"},
    "signal": {"signal", "setitimer", "alarm", "set_wakeup_fd", "siginterrupt", "pthread_kill", "pthread_sigmask"},
    "types": {"FunctionType", "CodeType", "LambdaType", "MethodType", "ModuleType", "CellType", "FrameType"},
    "io": {"FileIO", "open", "open_code"},
    "torch": {"load", "_C", "ops", "library"},  # torch.load may unpickle code; the rest reach C directly
    "numpy": {"load", "ctypeslib"},
    "np": {"load", "ctypeslib"},
}
TAMPER_NAMES = {"exec", "eval", "compile", "__import__", "globals", "locals", "vars", "breakpoint", "get_ipython",
                "memoryview"}
INTERNAL_ATTRS = {"__globals__", "__code__", "__closure__", "__builtins__", "__subclasses__", "__bases__", "__base__",
                  "__mro__", "__class__", "__dict__", "__getattribute__", "__import__", "__loader__", "__spec__",
                  "__reduce__", "__reduce_ex__", "__setstate__", "__kwdefaults__", "__defaults__", "__func__",
                  "__self__", "__wrapped__", "__traceback__", "__module__", "__qualname__", "__main__",
                  "f_back", "f_globals", "f_locals", "f_builtins", "f_code", "f_trace", "tb_frame", "tb_next",
                  "gi_frame", "gi_code", "cr_frame", "cr_code", "ag_frame", "co_code", "co_consts", "co_names",
                  "cell_contents", "__torch_function__", "__torch_dispatch__"}
COPY_MODULES = {"torch.jit", "torch.fx", "torch.compile", "torch.export", "torch._dynamo", "functorch",
                "torch.func", "torch.utils.cpp_extension"}


@dataclass(frozen=True)
class Finding:
    kind: str  # tamper / copy
    what: str  # a description in the grader's own words (identifiers from the notebook are capped)
    cell: int

    def __str__(self) -> str:
        return f"{self.what} (cell {self.cell})"


def normalize(source: str) -> str:
    return "\n".join(line.rstrip() for line in source.strip().splitlines())


def _short(text: str, n: int = 40) -> str:
    text = "".join(c if c.isprintable() else "?" for c in str(text))
    return text if len(text) <= n else text[: n - 3] + "..."


def as_python(source: str) -> tuple[str, list[str]]:
    """(the cell with IPython magics and shell escapes replaced by `pass`, the magics used: 'run', '!' ...)."""
    lines, magics = [], []
    for line in source.splitlines():
        stripped = line.lstrip()
        if stripped[:1] in ("%", "!"):
            name = "!" if stripped[0] == "!" else stripped.lstrip("%").split(maxsplit=1)[0] if stripped.lstrip("%") else ""
            magics.append(name)
            lines.append(line[: len(line) - len(stripped)] + "pass")
        else:
            lines.append(line)
    return "\n".join(lines), magics


class _Aliases:
    """Which names the notebook binds to modules (import x as y, from a import b)."""

    def __init__(self, trees):
        self.modules: dict[str, str] = {}
        self.objects: dict[str, str] = {}
        for tree in trees:
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    for a in node.names:
                        if a.asname:
                            self.modules[a.asname] = a.name
                        else:
                            root = a.name.split(".")[0]
                            self.modules[root] = root
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    for a in node.names:
                        self.objects[a.asname or a.name] = f"{node.module}.{a.name}"

    def dotted(self, node) -> str | None:
        """The dotted name an expression stands for (`S.sample_ddim` -> course_lib.samplers.sample_ddim), if any."""
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name):
            return None
        root = self.modules.get(node.id) or self.objects.get(node.id) or node.id
        return ".".join([root, *reversed(parts)])


def _tamper_in(tree, aliases: _Aliases) -> set[str]:
    """Descriptions of every tamper construct in one cell's tree."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                hit = next((m for m in TAMPER_MODULES if name == m or name.startswith(m + ".")), None)
                if hit:
                    found.add(f"uses {hit}")
            if isinstance(node, ast.ImportFrom) and node.module:
                for a in node.names:
                    if a.name in TAMPER_ATTRS.get(node.module.split(".")[0], ()) or a.name == "*":
                        found.add(f"uses {node.module}.{a.name}")
        elif isinstance(node, (ast.Attribute, ast.Name)):
            dotted = aliases.dotted(node)
            if dotted:
                parts = dotted.split(".")
                hit = next((m for m in TAMPER_MODULES if dotted == m or dotted.startswith(m + ".")), None)
                if hit and (isinstance(node, ast.Attribute) or node.id in aliases.modules or node.id in aliases.objects):
                    found.add(f"uses {hit}")
                if len(parts) > 1 and parts[1] in TAMPER_ATTRS.get(parts[0], ()):
                    found.add(f"uses {parts[0]}.{parts[1]}")
                if any(dotted == m or dotted.startswith(m + ".") for m in ("torch.utils.cpp_extension",)):
                    found.add("compiles native code")
            if isinstance(node, ast.Attribute) and node.attr in INTERNAL_ATTRS:
                found.add(f"reads the interpreter internal {node.attr}")
            if isinstance(node, ast.Name) and node.id in TAMPER_NAMES and node.id not in aliases.objects:
                found.add(f"calls {node.id}()")
            if isinstance(node, ast.Name) and node.id in INTERNAL_ATTRS:
                found.add(f"uses {node.id}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            for name in INTERNAL_ATTRS:
                if name in node.value:
                    found.add(f"names the interpreter internal {name} in a string")
            if "/dev/fd" in node.value or re.search(r"/proc/[^/]*/fd", node.value):
                found.add("names a file-descriptor folder (/proc/*/fd, /dev/fd) in a string")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in (
                "getattr", "setattr", "delattr", "hasattr"):
            name = node.args[1] if len(node.args) > 1 else None
            if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
                found.add(f"calls {node.func.id}() with a computed attribute name")
            elif node.func.id in ("setattr", "delattr"):
                target = aliases.dotted(node.args[0]) if node.args else None
                if target and target.split(".")[0] in {**aliases.modules, **{v: v for v in aliases.modules.values()}}:
                    found.add(f"calls {node.func.id}() on a module")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                "attrgetter", "methodcaller"):
            found.add(f"uses operator.{node.func.attr}")
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for target in targets:
                for t in ast.walk(target):
                    if isinstance(t, ast.Attribute):
                        root = t
                        while isinstance(root, ast.Attribute):
                            root = root.value
                        if not isinstance(root, ast.Name) or root.id in aliases.modules:
                            found.add(f"changes an attribute of a module ({_short(aliases.dotted(t) or t.attr)})")
        if isinstance(node, ast.ClassDef):
            for base in node.bases:
                if (aliases.dotted(base) or "") in ("torch.Tensor", "torch._C.TensorBase", "torch._C._TensorBase"):
                    found.add("defines a torch.Tensor subclass")
    return found


def _copy_in(nodes, aliases: _Aliases, answers: set[str], references: set[str], own: str) -> set[str]:
    """Descriptions of every copy construct in the given subtrees (`own`: the graded function's own name)."""
    short = {a.rsplit(".", 1)[-1] for a in answers}
    found = set()

    def answer(what: str) -> None:
        found.add(f"uses course_lib's {_short(what)}, which computes this answer")

    def reference(what: str) -> None:
        found.add(f"uses the exercise references ({_short(what)})")

    for tree in nodes:
        for node in ast.walk(tree):
            if isinstance(node, (ast.Attribute, ast.Name)):
                dotted = aliases.dotted(node) or ""
                last = node.attr if isinstance(node, ast.Attribute) else node.id
                if dotted in answers or (isinstance(node, ast.Attribute) and last in short) or (
                        isinstance(node, ast.Name) and last in short and last != own
                        and aliases.objects.get(last, "").startswith("course_lib")):
                    answer(last)
                if last.startswith("ref_") or last in references or last == "EXERCISES" \
                        or dotted.startswith("course_lib.exercises"):
                    reference(last)
                if any(dotted == m or dotted.startswith(m + ".") for m in COPY_MODULES):
                    found.add("uses " + ".".join(dotted.split(".")[:2]))
                if dotted in ("inspect.getsource", "inspect.getsourcelines", "linecache.getline", "linecache.getlines"):
                    found.add(f"reads source code ({dotted})")
            elif isinstance(node, ast.ImportFrom) and node.module:
                for a in node.names:
                    if f"{node.module}.{a.name}" in answers:
                        answer(a.name)
                    if node.module.startswith("course_lib.exercises") or a.name.startswith("ref_"):
                        reference(a.name)
            elif isinstance(node, ast.Import):
                if any(a.name.startswith("course_lib.exercises") for a in node.names):
                    reference("course_lib.exercises")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                if node.value in short:
                    answer(node.value)
                if node.value.startswith("ref_") or node.value in references:
                    reference(node.value)
                if "course_lib" in node.value and ".py" in node.value:
                    found.add("names a course_lib source file")
            elif isinstance(node, ast.ClassDef):
                if any(isinstance(item, ast.FunctionDef) and item.name in ("__torch_function__", "__torch_dispatch__")
                       for item in node.body):
                    found.add("defines a tensor subclass")
    return found


def _bindings(tree) -> dict[str, list]:
    """Top-level (not inside a def or class body) statements that bind each name, with the node to read."""
    out: dict[str, list] = {}

    def add(name, node):
        out.setdefault(name, []).append(node)

    def visit(stmts):
        for node in stmts:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                add(node.name, node)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    for n in ast.walk(t):
                        if isinstance(n, ast.Name):
                            add(n.id, node)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                for a in node.names:
                    add((a.asname or a.name).split(".")[0], node)
            for field in ("body", "orelse", "finalbody", "handlers"):
                inner = getattr(node, field, None)
                if isinstance(inner, list) and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                      ast.ClassDef)):
                    visit([s for s in inner if isinstance(s, ast.stmt)] + [
                        s for h in inner if isinstance(h, ast.ExceptHandler) for s in h.body])
            if isinstance(node, (ast.For, ast.AsyncFor, ast.With, ast.AsyncWith)):
                for n in ast.walk(node.target if isinstance(node, (ast.For, ast.AsyncFor)) else node):
                    if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                        add(n.id, node)

    visit(tree.body)
    return out


def _parse(source: str):
    code, magics = as_python(source)
    try:
        return ast.parse(code), magics
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None, magics


@functools.lru_cache(maxsize=32)
def _trusted_trees(trusted: frozenset) -> tuple:
    """The parsed cells of a released lesson (the same for every submission of that lesson)."""
    return tuple(t for t in (_parse(src)[0] for src in sorted(trusted)) if t is not None)


def scan(cells, trusted: set[str], graded: dict[str, set[str]], references: set[str]) -> tuple[list[Finding],
                                                                                            dict[str, list[Finding]]]:
    """(tamper findings, {exercise: copy findings}) for a submission's code cells [(number, source)].

    `trusted`: normalized sources of the released lesson's code cells; `graded`: {exercise: dotted names of the
    course_lib functions that compute its answer}; `references`: names of the exercise references.
    """
    parsed = {i: _parse(src) for i, src in cells}
    changed = [i for i, src in cells if normalize(src) not in trusted]
    trusted_trees = _trusted_trees(frozenset(trusted))
    aliases = _Aliases([t for t, _ in parsed.values() if t is not None] + list(trusted_trees))
    lesson_uses = set()
    for tree in trusted_trees:
        lesson_uses |= _tamper_in(tree, aliases)
    tamper = []
    for i in changed:
        tree, magics = parsed[i]
        for m in magics:
            if m == "!" or m not in ALLOWED_MAGICS:
                what = "runs a shell command (!)" if m == "!" else f"uses the magic %{_short(m, 20)}"
                if m in ("run", "prun", "store", "macro", "edit", "recall", "rerun", "paste", "cpaste", "reset",
                         "aimport", "autocall", "reload_ext", "python", "python3", "pypy"):  # code from elsewhere
                    tamper.append(Finding("tamper", what, i))
        if tree is not None:
            tamper += [Finding("tamper", w, i) for w in sorted(_tamper_in(tree, aliases) - lesson_uses)]
    cell_binds = {i: _bindings(tree) for i, (tree, _) in parsed.items() if tree is not None}
    binds: dict[str, list] = {}
    for i in changed:
        for name, nodes in cell_binds.get(i, {}).items():
            binds.setdefault(name, []).extend((i, n) for n in nodes)
    copy = {}
    for name, answers in graded.items():
        last = [i for i, _ in cells if name in cell_binds.get(i, {})]
        if not last or last[-1] not in changed:
            copy[name] = []  # the released stub, or not defined at all: nothing the learner wrote to read
            continue
        frontier = [(last[-1], n) for n in cell_binds[last[-1]][name]]
        nodes, seen = [], set()
        while frontier and len(nodes) < 300:
            cell, node = frontier.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            nodes.append((cell, node))
            for n in ast.walk(node):
                if isinstance(n, ast.Name) and n.id != name and n.id in binds:
                    frontier += binds[n.id]
        found = {}
        for cell, node in nodes:
            for what in _copy_in([node], aliases, answers, references, name):
                found.setdefault(what, cell)
        copy[name] = [Finding("copy", w, c) for w, c in sorted(found.items())]
    return tamper, copy
