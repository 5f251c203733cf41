"""Student copies of source notebooks: solutions between nbgrader's markers become stubs."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from ..checkpoints import write_text_atomic
from ..colab import student_links

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
CODE_STUB = ["# YOUR CODE HERE", 'raise NotImplementedError("Exercise: replace this line with your solution")']
MARKDOWN_STUB = ["YOUR ANSWER HERE"]
HIDDEN_TAG = "hidden-tests"
CHECK_CALL = re.compile(r"""check\(\s*["'](\w+)["']""")


def strip_solutions(source: str, stub: list[str] = CODE_STUB) -> tuple[str, int]:
    """Replace each BEGIN/END SOLUTION region with `stub` at the marker's indentation; return (text, regions)."""
    out, regions, inside, indent = [], 0, False, ""
    for n, line in enumerate(source.splitlines(), 1):
        marker = line.strip()
        if marker.startswith(BEGIN):
            if inside:
                raise ValueError(f"line {n}: '{BEGIN}' inside another solution (missing '{END}'?)")
            inside, indent = True, line[: len(line) - len(line.lstrip())]
            out.extend(indent + s for s in stub)
            regions += 1
        elif marker.startswith(END):
            if not inside:
                raise ValueError(f"line {n}: '{END}' without a '{BEGIN}' before it")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"'{BEGIN}' is never closed by '{END}'")
    return "\n".join(out), regions


@dataclass
class ReleaseReport:
    notebook: str
    solutions: int = 0
    hidden_cells: int = 0
    outputs_cleared: int = 0
    problems: list = field(default_factory=list)
    lesson: int | None = None

    def __str__(self) -> str:
        where = f" (lesson {self.lesson})" if self.lesson is not None else " (no graded exercise found)"
        return (f"{self.notebook}{where}: {self.solutions} solution(s) stubbed, {self.hidden_cells} hidden-test cell(s) "
                f"removed, outputs of {self.outputs_cleared} cell(s) cleared")


def student_notebook(nb: nbformat.NotebookNode, name: str = "notebook"):
    """A student copy of a notebook (solutions stubbed, hidden tests and outputs removed) and a report."""
    report = ReleaseReport(name)
    cells = []
    for i, cell in enumerate(nb.cells):
        if HIDDEN_TAG in cell.get("metadata", {}).get("tags", []):
            report.hidden_cells += 1
            continue
        cell = nbformat.from_dict(dict(cell))
        try:
            cell.source, n = strip_solutions(cell.source, CODE_STUB if cell.cell_type == "code" else MARKDOWN_STUB)
        except ValueError as e:
            raise ValueError(f"{name}, cell {i + 1}: {e}") from None
        report.solutions += n
        if cell.cell_type == "markdown":  # its Colab badge opens this student copy, not the solved lesson
            cell.source = student_links(cell.source, name)
        if cell.cell_type == "code":
            report.outputs_cleared += bool(cell.outputs)
            cell.outputs, cell.execution_count = [], None
            cell.metadata.pop("execution", None)  # the solved run's timings: noise in every re-release
        cells.append(cell)
    out = nbformat.from_dict(dict(nb))
    out.cells = cells
    out.metadata.pop("widgets", None)  # widget state belongs to outputs that are gone
    lesson = report.lesson = _lesson(nb)
    if lesson is not None:  # the grader reads this to know which exercises a renamed submission holds
        out.metadata["course_lib"] = {"lesson": lesson}
    return out, report


def _lesson(nb) -> int | None:
    """The one lesson whose exercises this notebook checks (None if it checks none, or several lessons')."""
    from ..exercises import EXERCISES

    names = {m for c in nb.cells if c.cell_type == "code" for m in CHECK_CALL.findall(c.source)}
    lessons = {EXERCISES[n].lesson for n in names if n in EXERCISES}
    return lessons.pop() if len(lessons) == 1 else None


def release(src_dir: str | Path, out_dir: str | Path, force: bool = False) -> list[ReleaseReport]:
    """Write a student copy of every notebook directly in src_dir into out_dir; refuse a non-empty out_dir unless force."""
    src, out = Path(src_dir), Path(out_dir)
    if not src.is_dir():
        raise ValueError(f"source folder {src} does not exist or is not a folder")
    sources = sorted(src.glob("*.ipynb"))
    if not sources:
        raise ValueError(f"no notebooks (*.ipynb) directly inside {src}")
    if out.resolve() == src.resolve():
        raise ValueError("the output folder must differ from the source folder (it would overwrite the solutions)")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise ValueError(f"{out} is not empty; pass --force to overwrite the student notebooks in it")
    books = []
    for path in sources:
        try:
            nb = nbformat.read(path, as_version=4)
        except Exception as e:
            raise ValueError(f"{path} is not a readable notebook: {e}") from None
        books.append((path, *student_notebook(nb, path.name)))
    out.mkdir(parents=True, exist_ok=True)  # only after every source converted: no half release
    for path, nb, _ in books:
        text = nbformat.writes(nb)
        write_text_atomic(text if text.endswith("\n") else text + "\n", out / path.name)
    return [report for _, _, report in books]
