"""What each function and class of course_lib can compute: a static call graph of the library's own source.

The grader's source scan (course_lib.grading.scan) zeroes a graded function that names the course_lib function
computing its answer; this graph lets it also notice, for review, a function that reaches that answer through
another course_lib function or class (`NoiseSchedule(betas).alpha_bar` computes `alpha_bar_from_betas`). Nodes are
dotted names (module-level functions, classes, their methods, module-level values); an edge means "names in its
code" (through the module's imports, `self.method` inside a class, a class's methods when the class is used). It is
built from the source files in the grader's own process, once, and never imports or runs a submission's names.
Dispatch by a computed name inside the library is invisible to it: those entry points are listed as answers
themselves (course_lib.exercises.LIBRARY_EQUIVALENTS).
"""
from __future__ import annotations

import ast
import functools
from collections import deque
from pathlib import Path

from .names import attribute_chain, global_refs

PACKAGE = Path(__file__).resolve().parents[1]
SKIPPED = ("course_lib.grading", "course_lib.exercises")  # the tooling that judges, not code a submission could use


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


class LibraryGraph:
    def __init__(self):
        self.edges: dict[str, set[str]] = {}
        self.aliases: dict[str, str] = {}  # a re-export (course_lib.nets.CrossAttention) -> where it is defined
        self.modules: set[str] = set()
        files = sorted(p for p in PACKAGE.rglob("*.py"))
        parsed = []
        for path in files:
            module = _module_name(path)
            if any(module == s or module.startswith(s + ".") for s in SKIPPED):
                continue
            self.modules.add(module)
            try:
                parsed.append((module, path.name == "__init__.py", ast.parse(path.read_text(encoding="utf-8"))))
            except (SyntaxError, OSError):
                continue
        for module, is_package, tree in parsed:
            self._add_module(module, is_package, tree)

    def _add_module(self, module: str, is_package: bool, tree: ast.Module) -> None:
        package = module if is_package else module.rsplit(".", 1)[0]
        names: dict[str, str] = {}  # module-level name -> dotted
        for node in tree.body:
            if isinstance(node, ast.Import):
                for a in node.names:
                    names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                for a in node.names:
                    if a.name != "*":
                        names[a.asname or a.name] = f"{base}.{a.name}"
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names[node.name] = f"{module}.{node.name}"
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                    if isinstance(t, ast.Name):
                        names[t.id] = f"{module}.{t.id}"
        for name, dotted in names.items():
            if dotted.startswith("course_lib.") and dotted != f"{module}.{name}":
                self.aliases[f"{module}.{name}"] = dotted
        # imports inside functions bind names too: resolve them per module (a name imported anywhere in the module)
        local_imports = {}
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and id(node) not in top:
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                for a in node.names:
                    local_imports[a.asname or a.name] = f"{base}.{a.name}"
            elif isinstance(node, ast.Import) and id(node) not in top:
                for a in node.names:
                    local_imports[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]

        def resolve(root: str, attrs: tuple) -> str | None:
            dotted = names.get(root) or local_imports.get(root)
            return ".".join((dotted, *attrs)) if dotted and dotted.startswith("course_lib") else None

        def targets(node, owner_class: str | None = None) -> set[str]:
            refs, _ = global_refs(node)
            out = {d for r in refs if (d := resolve(r.root, r.attrs))}
            for n in ast.walk(node):  # names a function imports inside its body are local to it: followed too
                chain = attribute_chain(n) if isinstance(n, (ast.Name, ast.Attribute)) else None
                if chain and chain[0] in local_imports:
                    out.add(".".join((local_imports[chain[0]], *chain[1])))
            if owner_class:  # self.method / cls.method inside a class
                for n in ast.walk(node):
                    if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"):
                        out.add(f"{owner_class}.{n.attr}")
            return out

        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.edges.setdefault(f"{module}.{node.name}", set()).update(targets(node))
            elif isinstance(node, ast.ClassDef):
                cls = f"{module}.{node.name}"
                edges = self.edges.setdefault(cls, set())
                edges.update(d for b in node.bases if (d := resolve(*(attribute_chain(b) or ("", ())))))
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        method = f"{cls}.{item.name}"
                        self.edges.setdefault(method, set()).update(targets(item, cls))
                        edges.add(method)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                    if isinstance(t, ast.Name):
                        self.edges.setdefault(f"{module}.{t.id}", set()).update(targets(node.value))

    def canonical(self, dotted: str) -> str:
        """The node a dotted name stands for: re-exports followed (a few hops), else the name itself."""
        for _ in range(8):
            parts = dotted.split(".")
            for cut in range(len(parts), 1, -1):
                head = ".".join(parts[:cut])
                if head in self.aliases:
                    dotted = ".".join([self.aliases[head], *parts[cut:]])
                    break
            else:
                return dotted
        return dotted

    def node(self, dotted: str) -> str | None:
        """The graph node for a dotted name (a function, class, method or value), or None."""
        dotted = self.canonical(dotted)
        return dotted if dotted in self.edges else None

    def is_module(self, dotted: str) -> bool:
        return self.canonical(dotted) in self.modules

    @functools.lru_cache(maxsize=256)
    def reaching(self, answers: frozenset) -> dict[str, str]:
        """{node: the answer it reaches} for every node from which one of `answers` can be reached."""
        targets = {n for a in answers if (n := self.node(a))}
        reverse: dict[str, set[str]] = {}
        for u, vs in self.edges.items():
            for v in vs:
                reverse.setdefault(self.canonical(v), set()).add(u)
        found = {t: t for t in targets}
        todo = deque(targets)
        while todo:
            v = todo.popleft()
            for u in reverse.get(v, ()):
                if u not in found:
                    found[u] = found[v]
                    todo.append(u)
        return found


@functools.lru_cache(maxsize=1)
def graph() -> LibraryGraph:
    """The graph of the installed course_lib, built once per process."""
    return LibraryGraph()
