"""Every number a lesson's prose quotes is printed by the code that measured it (the course's rule).

A number in a markdown cell must appear in an output of the same notebook, or as a literal in its code (a constant
the lesson sets, such as a sample count), or be a constant or target on the allow-list below, each with its reason. Numbers inside LaTeX, inline code, links and
citations (years) are definitions or references, not measurements, and are skipped; so are single digits.
"""
import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))
NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+\.\d+|\d+%|\d+x\b|\d+)(?!\w)")

# Constants and targets the lessons set (not measurements): the number -> why it may be typed.
ALLOWED = {
    "1,000": "T, the number of diffusion steps of every shipped schedule",
    "500": "the '500 to 1,000 steps' advice the course tests",
    "0.05": "a stated tolerance or target (hq within 0.05; confidence within 0.05)",
    "0.03": "a stated target (every class within 0.03 of 1/10)",
    "90%": "a stated target (90% high-quality samples)",
    "80%": "a stated target (80% of copy bandwidth)",
    "10%": "a stated target (FD within 10%)",
    "70%": "lesson 3's sampling-loop exercise threshold (exercises.SAMPLE_HQ_FLOOR, asserted below)",
    "2x": "a stated target (twice the eager chain)",
    "0.999": "the cosine schedule's beta clip (Nichol & Dhariwal 2021)",
    "0.3": "arithmetic intensity of an elementwise step, derived in the text (1 FLOP per 16 bytes, times 5)",
    "2,000": "a configuration size (batches or points) set by the code",
    "4,000": "a configuration size (training steps) set by the code",
    "5,000": "a configuration size (points per benchmark batch) set by the code",
    "297": "the size of the held-out digits test set",
    "17": "the number of grey levels of the 8x8 digits",
    "64": "the number of pixels of an 8x8 digit",
    "25": "the number of modes of the grid dataset",
    "157": "sigma_max of the linear schedule, printed in the schedule description",
    "14": "floats moved per element by the unfused step chain, counted in lesson 5's text",
    "100": "the loss-curve resolution the comparison benchmark stores (compare.curve)",
}


def test_allowed_thresholds_match_the_code():
    from course_lib.exercises import SAMPLE_HQ_FLOOR
    assert f"{SAMPLE_HQ_FLOOR:.0%}" == "70%"


def _text(cells, kind):
    out = []
    for c in cells:
        if kind == "markdown" and c["cell_type"] == "markdown":
            out.append("".join(c["source"]))
        if kind == "outputs":
            for o in c.get("outputs", []):
                out.append("".join(o.get("text", "")))
                out += ["".join(v) for k, v in o.get("data", {}).items() if k.startswith("text/")]
        if kind == "code" and c["cell_type"] == "code":
            out.append("".join(c["source"]))
    return "\n".join(out)


def prose_numbers(markdown: str) -> list[str]:
    """The numbers a markdown text quotes outside math, code, links and citations."""
    md = re.sub(r"\$\$.*?\$\$", " ", markdown, flags=re.S)
    md = re.sub(r"\$[^$]*\$", " ", md)
    md = re.sub(r"`[^`]*`", " ", md)
    md = re.sub(r"\]\([^)]*\)", "]", md)
    md = re.sub(r"\b(?:19|20)\d\d[a-z]?\b", " ", md)  # years of citations
    md = re.sub(r"(?:[Ll]esson|[Ss]ection|[Ee]xercise|[Ee]q\.|Alg\.|Algorithm|sec\.|app\.|issue)s? [\d.]+", " ", md)
    return [n for n in NUMBER.findall(md) if not re.fullmatch(r"\d", n)]


def unbacked(nb: dict) -> list[str]:
    """Numbers in the prose that no output of the notebook prints and that are not allowed constants."""
    outputs = _text(nb["cells"], "outputs")
    flat = outputs.replace(",", "")
    code = _text(nb["cells"], "code")
    printed = lambda n, text: re.search(rf"(?<![\d.]){re.escape(n)}(?![\d])", text) is not None
    missing = []
    for n in prose_numbers(_text(nb["cells"], "markdown")):
        if n in ALLOWED or printed(n, outputs) or printed(n.replace(",", ""), flat + "\n" + code):
            continue
        missing.append(n)
    return sorted(set(missing))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_every_number_in_the_prose_is_printed_by_the_notebook(path):
    nb = json.loads(path.read_text())
    assert unbacked(nb) == [], (f"{path.name}: these numbers in markdown appear in no output; print them from the "
                                "code that measured them, or add a constant to ALLOWED with its reason")


def test_the_check_catches_a_typed_number_and_skips_math_code_and_citations():
    md = {"cell_type": "markdown", "source": ["DDPM needs 0.731 hq at $x_{0.5}$, `steps=37`, Ho et al. 2020, lesson 3.2"]}
    out = {"cell_type": "code", "source": ["n = 37"], "outputs": [{"output_type": "stream", "text": ["hq 0.9\n"]}]}
    assert unbacked({"cells": [md, out]}) == ["0.731"]
    out["outputs"][0]["text"] = ["hq 0.7312\n"]  # a hand-rounded number is still typed by hand
    assert unbacked({"cells": [md, out]}) == ["0.731"]
    out["outputs"][0]["text"] = ["hq 0.731\n"]
    assert unbacked({"cells": [md, out]}) == []
    assert prose_numbers("1,234 samples and 12% and 3x faster") == ["1,234", "12%", "3x"]
