"""What a graded function *is*: fingerprints of its code and of everything it can reach.

A fingerprint hashes a code object's bytecode, constants (docstring included), names, argument layout and nested
code, but not its name, file or line numbers, so a library function copied under another name (its code object
reused, `code.replace(co_name=...)`, its source re-executed) has the library function's fingerprint. `reach`
walks a function's closures, defaults, wrapped and partial functions, the globals and module attributes its code
names, and the methods and attributes of objects defined in the notebook, and returns every code object found and
what else it found (TorchScript, torch.fx graphs, torch.compile wrappers, tensor subclasses). The grader compares
the fingerprints with the library's and the references' in its own process (course_lib.grading.batch).
"""
from __future__ import annotations

import builtins
import dis
import hashlib
import sys
import types

import torch

MAX_OBJECTS = 3000
MAX_CODES = 800


def _const(value, memo) -> bytes:
    if isinstance(value, types.CodeType):
        return b"code:" + fingerprint(value, memo).encode()
    if isinstance(value, (tuple, frozenset)):
        items = sorted(_const(v, memo) for v in value) if isinstance(value, frozenset) else [_const(v, memo) for v in value]
        return type(value).__name__.encode() + b"(" + b",".join(items) + b")"
    if value is None or value is Ellipsis or isinstance(value, (bool, int, float, complex, str, bytes)):
        return type(value).__name__.encode() + b":" + repr(value).encode("utf-8", "backslashreplace")
    return b"other:" + type(value).__name__.encode()


_SKIP = {"CACHE", "RESUME", "PRECALL", "PUSH_NULL", "NOP", "EXTENDED_ARG", "COPY_FREE_VARS", "MAKE_CELL",
         "KW_NAMES"}
_ALIAS = {"LOAD_METHOD": "LOAD_ATTR"}  # the compiler picks either for `a.b(...)` depending on context


def _instructions(code: types.CodeType) -> bytes:
    """The instruction stream with names and constants resolved; jump targets and call bookkeeping dropped."""
    out = []
    for ins in dis.get_instructions(code):
        if ins.opname in _SKIP:
            continue
        op = _ALIAS.get(ins.opname, ins.opname)
        if "JUMP" in op or op in ("FOR_ITER", "SEND"):
            arg = ""
        elif isinstance(ins.argval, types.CodeType):
            arg = "<code>"
        else:
            arg = repr(ins.argval)
        out.append(f"{op} {arg}")
    return "\n".join(out).encode("utf-8", "backslashreplace")


def fingerprint(code: types.CodeType, memo: dict | None = None) -> str:
    """A hex digest of what a code object computes, independent of its name, file, line numbers and of the
    compiler's choice between equivalent instructions."""
    memo = {} if memo is None else memo
    if code in memo:
        return memo[code]
    h = hashlib.sha256()
    for part in (_instructions(code), repr((code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount,
                                           code.co_varnames[:code.co_argcount + code.co_kwonlyargcount])).encode()):
        h.update(len(part).to_bytes(8, "little") + part)
    for c in code.co_consts:
        part = _const(c, memo)
        h.update(len(part).to_bytes(8, "little") + part)
    memo[code] = h.hexdigest()
    return memo[code]


def codes_of(code: types.CodeType):
    """A code object and every code object nested in its constants."""
    yield code
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            yield from codes_of(c)


def _names(code: types.CodeType) -> set:
    return {n for c in codes_of(code) for n in c.co_names}


def _library_object(obj) -> bool:
    module = getattr(obj, "__module__", None) or getattr(type(obj), "__module__", "") or ""
    return not isinstance(module, str) or module.split(".")[0] not in ("__main__", "builtins")


def reach(root) -> tuple[list, list[str]]:
    """(code objects reachable from `root`, evidence strings) within MAX_OBJECTS objects and MAX_CODES codes."""
    codes: dict = {}
    evidence: list[str] = []
    seen: set = set()
    todo = [root]

    def note(text: str) -> None:
        if text not in evidence and len(evidence) < 50:
            evidence.append(text[:200])

    while todo and len(seen) < MAX_OBJECTS and len(codes) < MAX_CODES:
        obj = todo.pop()
        if id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, bool, torch.Tensor)):
            continue
        seen.add(id(obj))
        try:
            _expand(obj, todo, codes, note)
        except Exception as e:  # a hostile object's attribute raising: note it and go on
            note(f"an object that raised {type(e).__name__} when inspected")
    return list(codes), evidence


def _expand(obj, todo: list, codes: dict, note) -> None:
    if isinstance(obj, types.CodeType):
        for c in codes_of(obj):
            codes[c] = None
        return
    if isinstance(obj, types.FunctionType):
        for c in codes_of(obj.__code__):
            codes[c] = None
        todo += [cell.cell_contents for cell in (obj.__closure__ or ()) if _cell_full(cell)]
        todo += list(obj.__defaults__ or ()) + list((obj.__kwdefaults__ or {}).values())
        wrapped = obj.__dict__.get("__wrapped__")
        if wrapped is not None:
            todo.append(wrapped)
        if obj.__dict__.get("_torchdynamo_orig_callable") is not None:
            note("a function wrapped by torch.compile")
            todo.append(obj.__dict__["_torchdynamo_orig_callable"])
        if _library_object(obj):
            return  # the library's own function: its code is recorded; the library is not walked
        namespace, names = obj.__globals__, _names(obj.__code__)
        modules = []
        for name in names:
            value = namespace.get(name, getattr(builtins, name, None)) if isinstance(namespace, dict) else None
            (modules if isinstance(value, types.ModuleType) else todo).append(value)
        seen_modules = set()
        while modules and len(seen_modules) < 50:  # attribute chains: course_lib.schedules.alpha_bar_from_betas
            module = modules.pop()
            if id(module) in seen_modules:
                continue
            seen_modules.add(id(module))
            for n in names:
                value = getattr(module, n, None)
                if isinstance(value, types.ModuleType):
                    modules.append(value)
                elif isinstance(value, _WALKED) or callable(value):
                    todo.append(value)
        return
    if isinstance(obj, types.ModuleType):
        return
    if isinstance(obj, types.MethodType):
        todo += [obj.__func__, obj.__self__]
        return
    if isinstance(obj, (types.BuiltinFunctionType, types.BuiltinMethodType)):
        return
    if isinstance(obj, (staticmethod, classmethod)):
        todo.append(obj.__func__)
        return
    if isinstance(obj, property):
        todo += [obj.fget, obj.fset, obj.fdel]
        return
    if type(obj).__name__ in ("partial", "partialmethod"):
        todo += [obj.func, *obj.args, *obj.keywords.values()]
        return
    script = getattr(torch.jit, "ScriptFunction", ())
    if isinstance(obj, script) or isinstance(obj, getattr(torch.jit, "ScriptModule", ())):
        note(f"TorchScript ({getattr(obj, 'qualified_name', type(obj).__name__)})")
        if "course_lib" in str(getattr(obj, "graph", "")):
            note("TorchScript traced from course_lib")
        return
    if type(obj).__name__ == "GraphModule" or hasattr(obj, "_torchdynamo_orig_callable"):
        note(f"a traced or compiled graph ({type(obj).__name__})")
        if "course_lib" in str(getattr(obj, "code", "")):
            note("a graph traced from course_lib")
        todo.append(getattr(obj, "_torchdynamo_orig_callable", None) or getattr(obj, "forward", None))
    if isinstance(obj, type):
        if issubclass(obj, torch.Tensor) and obj is not torch.Tensor and not _library_object(obj):
            note(f"a torch.Tensor subclass ({obj.__name__})")
        if not _library_object(obj):
            todo += [v for v in vars(obj).values()]
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        todo += list(obj)[:200]
        return
    if isinstance(obj, dict):
        todo += list(obj.values())[:200]
        return
    kind = type(obj)
    if not _library_object(kind):  # an instance of a class defined in the notebook
        todo.append(kind)
        try:
            todo += list(object.__getattribute__(obj, "__dict__").values())[:200]
        except (AttributeError, TypeError):
            pass
    elif isinstance(obj, torch.nn.Module):
        todo += [type(obj), *obj._modules.values()]


_WALKED = (types.FunctionType, types.MethodType, type, types.CodeType)


def _cell_full(cell) -> bool:
    try:
        cell.cell_contents
        return True
    except ValueError:
        return False


def library_fingerprints(functions: dict) -> dict[str, str]:
    """{fingerprint: dotted name} of each function's own code."""
    out = {}
    for dotted, fn in functions.items():
        code = getattr(fn, "__code__", None)
        if code is not None:  # the function's own code only: a nested one-line lambda could match honest code
            out.setdefault(fingerprint(code), dotted)
    return out


def resolve(dotted: str):
    """The object a dotted name ('course_lib.schedules.alpha_bar_from_betas', 'course_lib.train.Trainer.train_step')
    names, importing the longest module prefix it starts with."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:cut])
        try:
            obj = sys.modules.get(module) or importlib.import_module(module)
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"no module in {dotted!r}")
