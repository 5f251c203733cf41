"""What a submission's source shows, read in the grader's own process, where the submission cannot change it.

The scan follows each graded function through the notebook: its own code, then every top-level definition,
assignment and import that its code names as a global (course_lib.grading.names, which tells a local variable or a
method from a global of the same name), transitively, through every cell. Each global it reaches is resolved to
what the notebook bound it to: a function or class of the notebook (followed in turn), an import (`course_lib.
samplers.sample_ddim`, also through aliases such as `S = course_lib.samplers`), or an object a library call made
(`unet = course_lib.pretrained.load(...)`). Findings per exercise, by how much they weigh:

- `copy` (the row scores 0): the graded function reaches, by name, the course_lib function that computes its answer
  (course_lib.exercises.LIBRARY_EQUIVALENTS), an object made by it, or the exercise references. Honest code does not.
- `refused` (the row fails with the exercise's rule): it reaches a library the exercise refuses (Exercise.refused),
  e.g. torch's scaled_dot_product_attention in an exercise that teaches attention.
- `review` (points kept, flagged): it reaches a course_lib function or object that can compute the answer through
  others (course_lib.grading.libgraph), uses a course_lib module as a value, looks names up dynamically (getattr with
  a computed name, eval, importlib, __dict__ ...), traces or compiles (torch.jit, torch.compile), or defines a
  tensor subclass: what the scan cannot follow.

Separately, the cells the learner wrote or changed (a cell identical to one of the released lesson's is the course's
own code) are read for `tamper` constructs, which reach into the interpreter or the process rather than compute
anything an exercise asks (raw file-descriptor I/O, frames, code objects, audit hooks and tracers, signal handlers,
patching modules, ctypes and cffi, code run from elsewhere): flagged for review. A construct the released lesson
itself uses is not reported. Every statement is read once: the cost is linear in the code.
"""
from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass

from .names import DYNAMIC_BUILTINS, GlobalBinding, Ref, attribute_chain, global_refs, top_level_bindings

ALLOWED_MAGICS = {"matplotlib", "time", "timeit", "capture", "load_ext", "autoreload", "config", "precision",
                  "pip", "conda", "cd", "pwd", "ls", "who", "whos", "env", "pinfo", "pdef", "pdoc", "psource",
                  "history", "lsmagic", "magic", "debug", "xmode", "alias_magic", "html", "markdown", "latex"}
CODE_FROM_ELSEWHERE = {"run", "prun", "store", "macro", "edit", "recall", "rerun", "paste", "cpaste", "reset",
                       "aimport", "autocall", "reload_ext", "python", "python3", "pypy", "load"}
# what a graded function cannot reach without hiding what it runs (review)
DYNAMIC_PREFIXES = ("importlib", "inspect", "gc", "sys.modules", "sys._getframe", "operator.attrgetter",
                    "operator.methodcaller", "types.FunctionType", "types.CodeType", "types.LambdaType",
                    "types.MethodType", "pickle", "_pickle", "marshal", "dill", "cloudpickle", "joblib", "shelve",
                    "copyreg", "torch.load", "torch.serialization", "torch.package", "numpy.load", "ctypes", "_ctypes",
                    "cffi", "builtins", "runpy", "pkgutil", "zipimport", "code", "codeop", "linecache", "__main__")
COMPILERS = ("torch.jit", "torch.fx", "torch.compile", "torch.export", "torch._dynamo", "torch.utils.cpp_extension")
INTERNAL_ATTRS = {"__globals__", "__code__", "__closure__", "__builtins__", "__subclasses__", "__dict__",
                  "__getattribute__", "__getattr__", "__import__", "__loader__", "__spec__", "__reduce__", "__reduce_ex__",
                  "__kwdefaults__", "__defaults__", "__wrapped__", "__self__", "__func__", "f_back", "f_globals",
                  "f_locals", "f_builtins", "f_code", "f_trace", "tb_frame", "tb_next", "gi_frame", "gi_code",
                  "cr_frame", "cr_code", "ag_frame", "co_code", "co_consts", "co_names", "cell_contents"}
# anywhere in a changed cell (review): modules and attributes that reach the interpreter or the process
TAMPER_MODULES = {"ctypes", "_ctypes", "cffi", "_cffi_backend", "marshal", "pickle", "_pickle", "dill", "cloudpickle",
                  "shelve", "copyreg", "_imp", "importlib", "runpy", "pkgutil",
                  "zipimport", "_frozen_importlib", "_frozen_importlib_external", "resource", "fcntl", "mmap", "posix",
                  "_posixsubprocess", "_thread", "__main__", "course_lib.grading", "course_lib.exercises"}
TAMPER_ATTRS = {
    "os": {"write", "writev", "pwrite", "pwritev", "sendfile", "splice", "copy_file_range", "dup", "dup2", "fdopen",
           "openpty", "memfd_create", "set_inheritable", "register_at_fork", "kill", "killpg"},
    "sys": {"setprofile", "settrace", "_getframe", "addaudithook", "_current_frames", "modules", "path", "meta_path",
            "path_hooks", "path_importer_cache", "displayhook", "excepthook", "unraisablehook", "audit"},
    "signal": {"signal", "setitimer", "alarm", "set_wakeup_fd", "siginterrupt", "pthread_kill", "pthread_sigmask"},
    "gc": {"get_objects", "get_referrers", "get_referents"},
    "types": {"CodeType", "FunctionType", "CellType", "FrameType"},
    "torch": {"_C"},
    "socket": {"fromfd", "socket"},
}
TAMPER_NAMES = {"exec", "eval", "compile", "__import__", "globals", "locals", "vars", "get_ipython"}
# names that exist without a cell binding them: Python's builtins and what IPython adds to a notebook's namespace
PROVIDED = set(dir(__import__("builtins"))) | {"get_ipython", "display", "In", "Out", "exit", "quit", "_", "__", "___",
                                               "_i", "_ii", "_iii", "_oh", "_dh", "_ih", "__IPYTHON__"}


@dataclass(frozen=True)
class Finding:
    kind: str  # copy / refused / review / tamper
    what: str  # a description in the grader's own words (identifiers from the notebook are capped)
    cell: int

    def __str__(self) -> str:
        return f"{self.what} ({f'cell {self.cell}' if self.cell else 'what the oracles saw'})"


@dataclass(frozen=True)
class Rule:
    """What the scan looks for in one exercise's function: the dotted names of the course_lib functions computing its
    answer, and the prefixes of the libraries it refuses."""

    answers: frozenset
    refused: tuple = ()


def normalize(source: str) -> str:
    return "\n".join(line.rstrip() for line in source.strip().splitlines())


def _short(text: str, n: int = 60) -> str:
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


def _parse(source: str):
    code, magics = as_python(source)
    try:
        return ast.parse(code), magics
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None, magics


def _under(dotted: str, prefixes) -> str | None:
    return next((p for p in prefixes if dotted == p or dotted.startswith(p + ".")), None)


class Notebook:
    """A notebook's code cells, parsed once: its top-level bindings in order, and what each global name stands for."""

    def __init__(self, cells, trusted: set[str] = frozenset()):
        self.cells = list(cells)
        self.parsed = {i: _parse(src) for i, src in self.cells}
        self.changed = {i for i, src in self.cells if normalize(src) not in trusted}
        self.bindings: dict[str, list] = {}  # name -> [(order, cell, statement, node)]
        self.stars: list[str] = []  # modules star-imported (from m import *)
        order = 0
        for i, _ in self.cells:
            tree = self.parsed[i][0]
            if tree is None:
                continue
            for name, stmt, node in top_level_bindings(tree):
                self.bindings.setdefault(name, []).append((order, i, stmt, node))
                order += 1
            self.stars += [n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module and not n.level
                           and any(a.name == "*" for a in n.names)]
        # a star import of a module outside course_lib binds names the scan cannot list
        self.unknown_stars = any(not (m == "course_lib" or m.startswith("course_lib.")) for m in self.stars)
        self._values: dict[str, set] = {}

    def final(self, name: str) -> list:
        """The bindings of `name` that hold when the notebook has run: those in the last top-level statement that
        binds it (an if / try statement may bind it in several branches)."""
        found = self.bindings.get(name)
        if not found:
            return []
        last = found[-1][2]
        # a `global` declaration binds the name whenever its function runs: those count wherever they are
        return [b for b in found if b[2] is last or isinstance(b[3], GlobalBinding)]

    def values(self, name: str, depth: int = 0) -> set:
        """What a global name stands for: {("lib", dotted)} for an import or an alias of one, {("made", dotted)} for an
        object a library call made, {("local", cell)} for the notebook's own code, or {("builtin", name)}."""
        if name in self._values:
            return self._values[name]
        self._values[name] = set()  # a cycle (x = y; y = x) resolves to nothing
        out = set()
        bound = self.final(name)
        if not bound:
            star = next((m for m in reversed(self.stars) if _star_has(m, name)), None)
            out.add(("lib", f"{star}.{name}") if star else ("builtin", name))
        for _, cell, _, node in bound:
            if isinstance(node, ast.Import):
                alias = next(a for a in node.names if (a.asname or a.name.split(".")[0]) == name)
                out.add(("lib", alias.name if alias.asname else alias.name.split(".")[0]))
            elif isinstance(node, ast.ImportFrom):
                alias = next(a for a in node.names if (a.asname or a.name) == name)
                out.add(("lib", f"{node.module}.{alias.name}") if node.module and not node.level else ("local", cell))
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.NamedExpr)) and node.value is not None \
                    and _single_target(node, name) and depth < 20:
                out |= self.expression(node.value, cell, depth + 1)
            else:
                out.add(("local", cell))
        self._values[name] = out
        return out

    def expression(self, node, cell: int, depth: int) -> set:
        """What an assigned expression stands for (see `values`)."""
        chain = attribute_chain(node)
        if chain:
            root, attrs = chain
            return {(kind, ".".join((dotted, *attrs))) if kind == "lib" else (kind, dotted)
                    for kind, dotted in self.values(root, depth)}
        if isinstance(node, ast.Call):
            return {("made", dotted) if kind in ("lib", "made") else (kind, dotted)
                    for kind, dotted in self.expression(node.func, cell, depth)}
        return {("local", cell)}


def _single_target(node, name: str) -> bool:
    if isinstance(node, ast.NamedExpr):
        return isinstance(node.target, ast.Name)
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    return any(isinstance(t, ast.Name) and t.id == name for t in targets)


@functools.lru_cache(maxsize=64)
def _star_has(module: str, name: str) -> bool:
    """Whether `from module import *` binds `name`: asked of course_lib's own modules only (nothing a submission
    names is ever imported here)."""
    if not module.startswith("course_lib.") and module != "course_lib":
        return False
    import importlib

    try:
        mod = importlib.import_module(module)
    except Exception:
        return False
    public = getattr(mod, "__all__", None) or [n for n in vars(mod) if not n.startswith("_")]
    return name in public


# ---- one graded function ------------------------------------------------------------------------------------------

def _classify(dotted: str, made: bool, rule: Rule, references: set[str]) -> tuple[str, str] | None:
    """(kind, description) of what reaching `dotted` (or an object made by calling it) says, or None."""
    from .libgraph import graph

    leaf = dotted.rsplit(".", 1)[-1]
    what = f"an object made by {_short(dotted)}" if made else _short(dotted)
    if dotted.startswith("course_lib.exercises") or (dotted.startswith("course_lib") and
                                                     (leaf.startswith("ref_") or leaf in references)):
        return "copy", f"uses the exercise references ({what})"
    lib = graph()
    canonical = lib.canonical(dotted) if dotted.startswith("course_lib") else dotted
    for answer in rule.answers:
        a = lib.canonical(answer)
        if canonical == a or canonical.startswith(a + ".") or (a.startswith(canonical + ".") and
                                                               not lib.is_module(canonical)):
            return "copy", f"uses {what}, which computes this answer"
    hit = _under(dotted, rule.refused) or _under(canonical, rule.refused)
    if hit:
        return "refused", f"uses {what}"
    if dotted.startswith("course_lib"):
        if lib.is_module(dotted):
            return "review", f"uses the module {_short(dotted)} as a value (what it calls cannot be read)"
        node = lib.node(dotted) or next((lib.node(dotted.rsplit(".", k)[0]) for k in (1, 2)
                                         if lib.node(dotted.rsplit(".", k)[0])), None)
        target = lib.reaching(rule.answers).get(node) if node else None
        if target:
            return "review", f"uses course_lib's {what}, which can compute this answer (it reaches {_short(target)})"
        return None
    hit = _under(dotted, COMPILERS)
    if hit:
        return "review", f"traces or compiles code ({hit})"
    hit = _under(dotted, DYNAMIC_PREFIXES)
    if hit:
        return "review", f"looks code up dynamically ({hit})"
    return None


def _reach(nb: Notebook, name: str, rule: Rule, references: set[str], limit: int = 5000) -> list[Finding]:
    """The findings for one graded function (see the module docstring)."""
    found: dict[str, tuple[str, int]] = {}

    def add(kind: str, what: str, cell: int) -> None:
        found.setdefault(what, (kind, cell))

    start = nb.final(name)
    todo = [(cell, stmt) for _, cell, stmt, _ in start]
    refs: list[tuple[Ref, int]] = [(Ref(name, (), None), start[-1][1] if start else 0)]
    seen_stmts, seen_names = set(), {name}
    while todo and len(seen_stmts) < limit:
        cell, stmt = todo.pop()
        if id(stmt) in seen_stmts:
            continue
        seen_stmts.add(id(stmt))
        stmt_refs, dynamic = global_refs(stmt)
        for what in dynamic:
            add("review", f"looks names up dynamically ({what})", cell)
        for node in ast.walk(stmt):
            if isinstance(node, ast.Attribute) and node.attr in INTERNAL_ATTRS:
                add("review", f"reads the interpreter internal {node.attr}", cell)
            elif isinstance(node, ast.ClassDef):
                if any(isinstance(i, (ast.FunctionDef, ast.AsyncFunctionDef)) and
                       i.name in ("__torch_function__", "__torch_dispatch__") for i in node.body):
                    add("review", "defines a tensor subclass (its values are computed where they are read)", cell)
        for ref in stmt_refs:
            refs.append((ref, cell))
            if ref.root not in seen_names:
                seen_names.add(ref.root)
                todo += [(c, s) for _, c, s, _ in nb.final(ref.root)]
    for ref, cell in refs:
        for kind, value in nb.values(ref.root):
            if kind == "builtin":
                if value in DYNAMIC_BUILTINS:
                    add("review", f"looks names up dynamically ({value}())", cell)
                elif value not in PROVIDED and not nb.unknown_stars:
                    add("review", f"uses {_short(value, 40)}, which no cell defines (put there at run time?)", cell)
                continue
            if kind == "local":
                continue
            dotted = ".".join((value, *ref.attrs)) if kind == "lib" else value
            verdict = _classify(dotted, kind == "made", rule, references)
            if verdict:
                add(verdict[0], verdict[1], cell)
    return [Finding(kind, what, cell) for what, (kind, cell) in found.items()]


# ---- the notebook's changed cells ----------------------------------------------------------------------------------

def _tamper_in(tree, nb: Notebook) -> set[str]:
    """Descriptions of every tamper construct in one cell's tree (names resolved through the notebook's imports)."""
    found = set()

    def resolve(root: str, attrs: tuple) -> set[str]:
        return {".".join((v, *attrs)) for kind, v in nb.values(root) if kind in ("lib", "builtin")}

    for stmt in tree.body:
        refs, dynamic = global_refs(stmt)
        found.update(f"looks names up dynamically ({what})" for what in dynamic)
        for ref in refs:
            for dotted in resolve(ref.root, ref.attrs):
                parts = dotted.split(".")
                hit = _under(dotted, TAMPER_MODULES)
                if hit:
                    found.add(f"uses {hit}")
                if len(parts) > 1 and parts[1] in TAMPER_ATTRS.get(parts[0], ()):
                    found.add(f"uses {parts[0]}.{parts[1]}")
                if parts[0] in TAMPER_NAMES and ref.node is not None and not ref.attrs:
                    found.add(f"calls {parts[0]}()")
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for name in ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [f"{node.module}.{a.name}" for a in node.names if node.module]):
                hit = _under(name, TAMPER_MODULES)
                if hit:
                    found.add(f"uses {hit}")
        elif isinstance(node, ast.Attribute) and node.attr in INTERNAL_ATTRS - {"__wrapped__"}:
            found.add(f"reads the interpreter internal {node.attr}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if "/dev/fd" in node.value or re.search(r"/proc/[^/]*/fd", node.value):
                found.add("names a file-descriptor folder (/proc/*/fd, /dev/fd) in a string")
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            for target in (node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]):
                chain = attribute_chain(target) if isinstance(target, ast.Attribute) else None
                if chain and any(kind == "lib" for kind, _ in nb.values(chain[0])):
                    found.add(f"changes an attribute of a module ({_short('.'.join((chain[0], *chain[1])), 40)})")
        elif isinstance(node, ast.Call) and any(
                (k.arg, getattr(k.value, "value", None)) in (("weights_only", False), ("allow_pickle", True))
                for k in node.keywords):
            found.add("loads a pickle, which can run any code (weights_only=False / allow_pickle=True)")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr"):
            chain = attribute_chain(node.args[0]) if node.args else None
            if chain and any(kind == "lib" for kind, _ in nb.values(chain[0])):
                found.add(f"calls {node.func.id}() on a module")
    return found


@functools.lru_cache(maxsize=32)
def _lesson_uses(trusted: frozenset) -> frozenset:
    """The tamper constructs the released lesson's own cells use (never reported)."""
    nb = Notebook([(i, src) for i, src in enumerate(sorted(trusted))])
    return frozenset(w for tree, _ in nb.parsed.values() if tree is not None for w in _tamper_in(tree, nb))


def scan(cells, trusted: set[str], rules: dict[str, Rule], references: set[str]) -> tuple[list[Finding],
                                                                                           dict[str, list[Finding]]]:
    """(tamper findings, {exercise: findings}) for a submission's code cells [(number, source)].

    `trusted`: normalized sources of the released lesson's code cells; `rules`: {exercise: Rule}; `references`: names
    of the exercise references."""
    nb = Notebook(cells, trusted)
    lesson_uses = _lesson_uses(frozenset(trusted))
    tamper = []
    for i in sorted(nb.changed):
        tree, magics = nb.parsed[i]
        for m in magics:
            if m in CODE_FROM_ELSEWHERE:
                tamper.append(Finding("tamper", f"uses the magic %{_short(m, 20)} (runs code from elsewhere)", i))
        if tree is not None:
            tamper += [Finding("tamper", w, i) for w in sorted(_tamper_in(tree, nb) - lesson_uses)]
    per_exercise = {}
    for name, rule in rules.items():
        last = nb.final(name)
        if not any(cell in nb.changed for _, cell, _, _ in last):
            per_exercise[name] = []  # the released stub, or not defined at all: nothing the learner wrote to read
            continue
        per_exercise[name] = _reach(nb, name, rule, references)
    return tamper, per_exercise
