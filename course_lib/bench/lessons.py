"""How long each lesson takes: every source lesson executed start to finish in a fresh kernel, in full mode (or quick),
one after the other on this machine, timed (`python -m course_lib bench lessons`); prints the README's time column."""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path


def lesson_files(root: Path, only=None) -> list[Path]:
    """The source lessons (notebooks/NN_*.ipynb), or those whose number is in `only`."""
    files = sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if only:
        wanted = {int(n) for n in only}
        files = [f for f in files if int(f.name[:2]) in wanted]
        missing = wanted - {int(f.name[:2]) for f in files}
        if missing:
            raise ValueError(f"no lesson numbered {sorted(missing)} in {root / 'notebooks'}")
    return files


def time_lesson(path: Path, quick: bool) -> dict:
    """Execute one lesson in memory, in its own folder as JupyterLab would (the file is never written), and time it."""
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    env_before = os.environ.get("COURSE_QUICK")
    os.environ["COURSE_QUICK"] = "1" if quick else "0"  # the kernel inherits this process's environment
    start = time.perf_counter()
    error = None
    try:
        nbclient.NotebookClient(nb, timeout=None, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}}).execute()
    except Exception as e:  # a failing lesson is reported with its time, not hidden
        error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    finally:
        seconds = time.perf_counter() - start
        if env_before is None:
            os.environ.pop("COURSE_QUICK", None)
        else:
            os.environ["COURSE_QUICK"] = env_before
    return {"lesson": path.name, "mode": "quick" if quick else "full", "seconds": round(seconds, 1), "error": error}


def human(seconds: float) -> str:
    """The README's style: seconds under a minute, else minutes to the half."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = int(seconds / 30 + 0.5) / 2  # half-minutes, halves rounded up
    return f"{minutes:g} min"


def main_lessons(quick: bool, json_path, force: bool, only=None, root=None) -> int:
    from ..checkpoints import write_json_atomic
    from . import refuse_to_overwrite

    refuse_to_overwrite(json_path, force)
    root = Path(root) if root else Path(__file__).resolve().parents[2]
    records = []
    for path in lesson_files(root, only):
        rec = time_lesson(path, quick)
        records.append(rec)
        print(f"{rec['lesson']:<42} {rec['mode']} mode: {human(rec['seconds']):>8}"
              + (f"  FAILED {rec['error']}" if rec["error"] else ""), flush=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    print(f"\nOn {machine}, one lesson at a time (the README's column):")
    for rec in records:
        print(f"| {rec['lesson'][:2].lstrip('0') or '0'} | {human(rec['seconds'])} |")
    if json_path:
        write_json_atomic({"records": records, "machine": machine,
                           "command": "python -m course_lib bench lessons" + (" --quick" if quick else "")}, json_path,
                          replace=force)
        print(f"Wrote {json_path}")
    return 1 if any(r["error"] for r in records) else 0
