"""Reading a submitted notebook in a small process of its own, under a memory limit the kernel enforces.

JSON can cost far more memory than its bytes (a 32 MB file of `{}` is ten million dictionaries), and the grader
itself must stay small while it grades many submissions at once. So the grader never parses a submission: it runs
`python -I -S reader.py` (this file: the standard library only, no course_lib, no torch), passes the file as its
standard input, and reads back at most the code cells (MAX_CODE_BYTES) and the lesson number `release` stamped in the
metadata, as one line of JSON. The reader's address space is limited (`MEMORY_MB`); a file it cannot read within it
is refused with a reason. `read_cells` is the same parsing, for bytes already in hand (tests, small files).
"""
from __future__ import annotations

import json
import os
import sys

MAX_NOTEBOOK_BYTES = 32 << 20  # an executed lesson with its plots is 1-3 MB
MAX_CODE_BYTES = 256 << 10  # all code cells together (the longest lesson has 17 kB)
MAX_CELLS = 2000
MEMORY_MB = 512  # the reader's address space: a 3 MB lesson needs about 60 MB


def read_cells(data: bytes) -> tuple[list[tuple[int, str]], dict]:
    """The (1-based cell number, source) of every code cell, and {"course_lib": {"lesson": N}} from the notebook's
    metadata when `release` stamped one; ValueError (with the reason) if the notebook cannot be read."""
    if len(data) > MAX_NOTEBOOK_BYTES:
        raise ValueError(f"the file is {len(data) >> 20} MB, over the {MAX_NOTEBOOK_BYTES >> 20} MB limit")
    try:
        nb = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise ValueError(f"not a readable notebook ({type(e).__name__})") from None
    except MemoryError:
        raise ValueError("not a readable notebook (it needs more memory to read than a notebook can)") from None
    if not isinstance(nb, dict):
        raise ValueError("not a readable notebook (not a JSON object)")
    raw = nb.get("cells")
    if raw is None and isinstance(nb.get("worksheets"), list) and nb["worksheets"]:  # nbformat 3
        raw = nb["worksheets"][0].get("cells") if isinstance(nb["worksheets"][0], dict) else None
    if not isinstance(raw, list):
        raise ValueError("not a readable notebook (no list of cells)")
    if len(raw) > MAX_CELLS:
        raise ValueError(f"the notebook has {len(raw)} cells, over the limit of {MAX_CELLS}")
    cells, code_bytes = [], 0
    for i, cell in enumerate(raw, 1):
        if not (isinstance(cell, dict) and cell.get("cell_type") == "code"):
            continue
        src = cell.get("source", cell.get("input", ""))
        if isinstance(src, list) and all(isinstance(s, str) for s in src):
            src = "".join(src)
        if not isinstance(src, str):
            continue
        code_bytes += len(src)
        if code_bytes > MAX_CODE_BYTES:
            raise ValueError(f"the code cells hold over {MAX_CODE_BYTES >> 10} kB of code, over the limit")
        cells.append((i, src))
    stamp = nb.get("metadata", {}).get("course_lib") if isinstance(nb.get("metadata"), dict) else None
    lesson = stamp.get("lesson") if isinstance(stamp, dict) else None
    return cells, ({"course_lib": {"lesson": lesson}} if type(lesson) is int else {})


def main() -> None:
    """Read a notebook from standard input, write {"cells": ..., "metadata": ...} or {"error": ...} to standard
    output."""
    try:
        import resource

        limit = MEMORY_MB << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        resource.setrlimit(resource.RLIMIT_CPU, (60, 60))
    except (ImportError, ValueError, OSError):
        pass  # no such limit on this platform: the size limits still hold
    try:
        data = sys.stdin.buffer.read(MAX_NOTEBOOK_BYTES + 1)
        cells, metadata = read_cells(data)
        del data
        out = {"cells": cells, "metadata": metadata}
    except ValueError as e:
        out = {"error": str(e)[:200]}
    except MemoryError:
        out = {"error": "not a readable notebook (it needs more memory to read than a notebook can)"}
    sys.stdout.write(json.dumps(out))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
