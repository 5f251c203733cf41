"""The repository keeps its promises: the README's commands are what CI runs, and the pieces stay in step."""
import json
import re
import subprocess
import sys
from pathlib import Path

from course_lib.runtime import COLAB_INSTALL_CELL, REPO_URL

ROOT = Path(__file__).resolve().parents[1]
LESSONS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    start = text.split("## Start here", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", start)


def test_readme_has_exactly_two_commands_and_ci_runs_them_verbatim():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    setup_and_start, test = commands
    setup = setup_and_start.split(" && jupyter lab")[0]
    assert setup != setup_and_start, "the first command must start JupyterLab after the setup"
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "python -m pip install --quiet torch==2.13.0" in ci
    assert setup in ci and test in ci
    assert ci.index("python -m pip install --quiet torch==2.13.0") < ci.index(setup) < ci.index(test)


def test_every_lesson_starts_with_the_colab_cell_and_has_a_colab_badge():
    readme = (ROOT / "README.md").read_text()
    assert LESSONS
    for p in LESSONS + sorted((ROOT / "notebooks" / "student").glob("*.ipynb")):
        cells = json.loads(p.read_text())["cells"]
        first_code = next(c for c in cells if c["cell_type"] == "code")
        assert "".join(first_code["source"]) == COLAB_INSTALL_CELL, f"{p.name}: first code cell is not the install cell"
    for p in LESSONS:
        badge = f"colab.research.google.com/github/{REPO_URL.split('github.com/')[1]}/blob/main/notebooks/{p.name}"
        assert badge in readme, f"README lacks the Colab link of {p.name}"
        assert badge in p.read_text(), f"{p.name} lacks its own Colab badge"


def test_committed_lessons_are_executed_in_full_mode():
    for p in LESSONS:
        text = p.read_text()
        cells = [c for c in json.loads(text)["cells"] if c["cell_type"] == "code"]
        assert all(c.get("execution_count") for c in cells[1:]), f"{p.name}: not every cell was executed"
        assert "Quick mode (COURSE_QUICK=1)" not in text, f"{p.name} was saved from a quick-mode run"
        assert not any(o.get("output_type") == "error" for c in cells for o in c.get("outputs", [])), p.name


def _requirement_names(specs):
    return {re.split(r"[<>=!~\[ ]", s.strip(), maxsplit=1)[0].lower() for s in specs}


def test_environment_yml_installs_what_pyproject_asks_for():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = _requirement_names(project["dependencies"] + project["optional-dependencies"]["test"])
    wanted = {"pytorch" if n == "torch" else n for n in wanted}
    env = (ROOT / "environment.yml").read_text()
    assert "conda-forge" in env and "  - pytorch\n" not in env.split("dependencies:")[0]  # no pytorch channel
    listed = _requirement_names(re.findall(r"^ +- ([A-Za-z][\w.-]*[^\n]*)$", env, re.M))  # conda and pip: lines
    assert wanted <= listed, f"missing from environment.yml: {sorted(wanted - listed)}"


def test_doctor_exits_zero_here_and_help_works():
    r = subprocess.run([sys.executable, "-m", "course_lib", "doctor"], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Device" in r.stdout and "Quick mode" in r.stdout  # conftest sets COURSE_QUICK=1
    for args in (["--help"], ["doctor", "--help"]):
        r = subprocess.run([sys.executable, "-m", "course_lib", *args], capture_output=True, text=True)
        assert r.returncode == 0 and "usage" in r.stdout


def test_doctor_fails_on_a_bad_quick_setting():
    import os

    env = dict(os.environ, COURSE_QUICK="maybe")
    r = subprocess.run([sys.executable, "-m", "course_lib", "doctor"], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "COURSE_QUICK must be" in r.stdout
