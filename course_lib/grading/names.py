"""Which global names a piece of Python code uses: a scope-aware reading of its syntax tree, in one pass.

`global_refs(node)` lists every reference to a module-level (global or builtin) name in a statement, with the
attribute chain that follows it (`S.sample_ddim(x)` -> ("S", ("sample_ddim",))), skipping names that are local to a
function, lambda, comprehension or class body on the way (parameters, assignments, loop targets, imports inside the
function, `except ... as`, `with ... as`, match captures; `global` declarations respected). A local variable that
happens to share a library function's name is therefore never mistaken for it. `getattr(X, "name")` with a constant
name counts as `X.name`; the same call with a computed name, and the builtins that look code up by name (`eval`,
`vars`, `__import__` ...), are reported as dynamic lookups. Used by the grader's source scan (on submissions) and by
course_lib.grading.libgraph (on the library itself). Every node is visited once: the cost is linear in the code.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass

DYNAMIC_BUILTINS = {"eval", "exec", "compile", "__import__", "globals", "locals", "vars", "breakpoint"}
_ATTR_BUILTINS = {"getattr", "setattr", "delattr", "hasattr"}
_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
_CAPTURES = tuple(getattr(ast, n) for n in ("MatchAs", "MatchStar") if hasattr(ast, n))  # Python 3.10+
_MAPPING = getattr(ast, "MatchMapping", ())


@dataclass(frozen=True)
class Ref:
    """A use of the global `root`, followed by `attrs` (`root.a.b`); `node` is the expression in the tree."""

    root: str
    attrs: tuple
    node: ast.AST


def _targets(node, out: set) -> None:
    """The names an assignment target binds."""
    if isinstance(node, ast.Name):
        out.add(node.id)
    elif isinstance(node, (ast.Tuple, ast.List)):
        for e in node.elts:
            _targets(e, out)
    elif isinstance(node, ast.Starred):
        _targets(node.value, out)


def _bound_in(body, params: set) -> set:
    """Names local to a function scope: its parameters and what its body binds, nested scopes excluded (their own
    names, walrus targets of its comprehensions included), minus `global` and `nonlocal` names."""
    local, declared = set(params), set()
    todo = list(body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            local.add(node.name)
            todo += node.decorator_list
            if not isinstance(node, ast.ClassDef):
                todo += node.args.defaults + [d for d in node.args.kw_defaults if d is not None]
            continue
        if isinstance(node, ast.Lambda):
            todo += node.args.defaults + [d for d in node.args.kw_defaults if d is not None]
            continue
        if isinstance(node, (ast.Global, ast.Nonlocal)):
            declared.update(node.names)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            local.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            local.update((a.asname or a.name).split(".")[0] for a in node.names if a.name != "*")
        elif isinstance(node, ast.ExceptHandler) and node.name:
            local.add(node.name)
        elif isinstance(node, _CAPTURES) and node.name:
            local.add(node.name)
        elif isinstance(node, _MAPPING) and node.rest:
            local.add(node.rest)
        elif isinstance(node, ast.NamedExpr):
            _targets(node.target, local)
        if isinstance(node, _COMPREHENSIONS):  # its own scope, but a walrus inside binds here
            todo += [n for n in ast.walk(node) if isinstance(n, ast.NamedExpr)]
            continue
        todo += list(ast.iter_child_nodes(node))
    return local - declared


def _params(args: ast.arguments) -> set:
    names = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs}
    return names | {a.arg for a in (args.vararg, args.kwarg) if a is not None}


class _Walker:
    def __init__(self):
        self.refs: list[Ref] = []
        self.dynamic: list[str] = []  # descriptions of dynamic lookups

    def is_global(self, name: str, scopes: list) -> bool:
        for i, (kind, names) in enumerate(reversed(scopes)):
            if kind == "class" and i > 0:
                continue  # a class body's names are not visible inside its methods
            if name in names:
                return False
        return True

    def chain(self, node) -> tuple[str, tuple] | None:
        """(root name, attributes) of `a.b.c` or `getattr(a.b, "c")`, else None."""
        attrs = []
        while True:
            if isinstance(node, ast.Attribute):
                attrs.append(node.attr)
                node = node.value
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                  and len(node.args) in (2, 3) and isinstance(node.args[1], ast.Constant)
                  and isinstance(node.args[1].value, str) and not node.keywords):
                attrs.append(node.args[1].value)
                node = node.args[0]
            else:
                break
        return (node.id, tuple(reversed(attrs))) if isinstance(node, ast.Name) else None

    def visit(self, node, scopes: list) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for n in node.decorator_list + node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
                self.visit(n, scopes)
            for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs:
                if a.annotation is not None:
                    self.visit(a.annotation, scopes)
            inner = scopes + [("function", _bound_in(node.body, _params(node.args)))]
            for stmt in node.body:
                self.visit(stmt, inner)
            return
        if isinstance(node, ast.Lambda):
            for n in node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
                self.visit(n, scopes)
            self.visit(node.body, scopes + [("function", _bound_in([node.body], _params(node.args)))])
            return
        if isinstance(node, ast.ClassDef):
            for n in node.decorator_list + node.bases + [k.value for k in node.keywords]:
                self.visit(n, scopes)
            inner = scopes + [("class", _bound_in(node.body, set()))]
            for stmt in node.body:
                self.visit(stmt, inner)
            return
        if isinstance(node, _COMPREHENSIONS):
            gens = node.generators
            self.visit(gens[0].iter, scopes)
            names: set = set()
            for g in gens:
                _targets(g.target, names)
            inner = scopes + [("function", names)]
            for i, g in enumerate(gens):
                if i:
                    self.visit(g.iter, inner)
                for cond in g.ifs:
                    self.visit(cond, inner)
            for part in ((node.key, node.value) if isinstance(node, ast.DictComp) else (node.elt,)):
                self.visit(part, inner)
            return
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _ATTR_BUILTINS \
                and self.is_global(node.func.id, scopes):
            name = node.args[1] if len(node.args) > 1 else None
            if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
                self.dynamic.append(f"{node.func.id}() with a computed attribute name")
        if isinstance(node, (ast.Attribute, ast.Call)):
            found = self.chain(node)
            if found and found[1] and self.is_global(found[0], scopes):
                self.refs.append(Ref(found[0], found[1], node))
                if isinstance(node, ast.Call):  # getattr(x, "name", default): the default is still read
                    for extra in node.args[2:]:
                        self.visit(extra, scopes)
                return
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _ATTR_BUILTINS:
            self.refs.append(Ref(node.func.id, (), node.func)) if self.is_global(node.func.id, scopes) else None
            for child in node.args + [k.value for k in node.keywords]:
                self.visit(child, scopes)
            return
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            if self.is_global(node.id, scopes):
                self.refs.append(Ref(node.id, (), node))
                if node.id in DYNAMIC_BUILTINS:
                    self.dynamic.append(f"{node.id}()")
                elif node.id in _ATTR_BUILTINS:  # passed around as a value: its names are anyone's guess
                    self.dynamic.append(f"{node.id} used as a value")
            return
        for child in ast.iter_child_nodes(node):
            self.visit(child, scopes)


def attribute_chain(node) -> tuple[str, tuple] | None:
    """(root name, attributes) of an expression `a.b.c`, else None."""
    attrs = []
    while isinstance(node, ast.Attribute):
        attrs.append(node.attr)
        node = node.value
    return (node.id, tuple(reversed(attrs))) if isinstance(node, ast.Name) else None


def global_refs(node) -> tuple[list[Ref], list[str]]:
    """(the references to global names in `node`, a module-level statement; descriptions of dynamic lookups)."""
    walker = _Walker()
    walker.visit(node, [])
    return walker.refs, walker.dynamic


class GlobalBinding:
    """A module-level name bound from inside a function or class through a `global` declaration."""

    def __init__(self, owner):
        self.owner = owner


def _declared_global(node) -> set:
    """The names a def or class (or anything nested in it) declares `global` and binds."""
    declared = {n for sub in ast.walk(node) if isinstance(sub, ast.Global) for n in sub.names}
    if not declared:
        return set()
    bound: set = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and isinstance(sub.ctx, (ast.Store, ast.Del)):
            bound.add(sub.id)
        elif isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and sub is not node:
            bound.add(sub.name)
        elif isinstance(sub, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in sub.names)
    return declared & bound


def top_level_bindings(tree: ast.Module) -> list[tuple[str, ast.stmt, ast.AST]]:
    """(name, the top-level statement, the node that binds it) for every module-level binding, in source order;
    statements nested in if / for / while / with / try at module level count, bodies of defs and classes do not."""
    out = []

    def visit(stmts, top):
        for node in stmts:
            here = top or node
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                out.append((node.name, here, node))
                for name in _declared_global(node):  # `global x` in its body binds x when it runs
                    out.append((name, here, GlobalBinding(node)))
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for a in node.names:
                    if a.name != "*":
                        out.append(((a.asname or a.name).split(".")[0] if isinstance(node, ast.Import)
                                    else a.asname or a.name, here, node))
                continue
            if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                names: set = set()
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                    _targets(t, names)
                out.extend((n, here, node) for n in sorted(names))
            for n in ast.walk(node):
                if isinstance(n, ast.NamedExpr):
                    names = set()
                    _targets(n.target, names)
                    out.extend((m, here, n) for m in names)
            if isinstance(node, (ast.For, ast.AsyncFor, ast.With, ast.AsyncWith)):
                names = set()
                for t in ([node.target] if isinstance(node, (ast.For, ast.AsyncFor))
                          else [i.optional_vars for i in node.items if i.optional_vars is not None]):
                    _targets(t, names)
                out.extend((n, here, node) for n in sorted(names))
            for field in ("body", "orelse", "finalbody"):
                inner = getattr(node, field, None)
                if isinstance(inner, list) and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                      ast.ClassDef)):
                    visit([s for s in inner if isinstance(s, ast.stmt)], here)
            for handler in getattr(node, "handlers", None) or []:
                if handler.name:
                    out.append((handler.name, here, handler))
                visit(handler.body, here)

    visit(tree.body, None)
    return out
