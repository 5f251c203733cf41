"""The repository keeps its promises: the README's commands are what CI runs, and the pieces stay in step."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from course_lib import colab
from course_lib.runtime import COLAB_INSTALL_CELL

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


def test_every_lesson_starts_with_the_colab_cell_and_its_badges_open_the_right_copy():
    readme = (ROOT / "README.md").read_text()
    students = sorted((ROOT / "notebooks" / "student").glob("*.ipynb"))
    assert LESSONS and [p.name for p in students] == [p.name for p in LESSONS]
    for p in LESSONS + students:
        cells = json.loads(p.read_text())["cells"]
        first_code = next(c for c in cells if c["cell_type"] == "code")
        assert "".join(first_code["source"]) == COLAB_INSTALL_CELL, f"{p.name}: first code cell is not the install cell"
        where = p.relative_to(ROOT).as_posix()
        links = re.findall(r"https://colab\.research\.google\.com/github/[^)\s]+", p.read_text())
        assert links and set(links) == {colab.badge_url(where)}, f"{where}: its badge must open {where}, got {links}"
    for p in students:  # the README sends learners to the copies with blank exercises
        assert colab.badge_url(f"notebooks/student/{p.name}") in readme, f"README lacks the Colab link of {p.name}"
        assert colab.badge_url(f"notebooks/{p.name}") not in readme, f"a README badge opens the solved {p.name}"
    assert colab.sync(ROOT, write=False) == [], "run `python -m course_lib colab`: links or install cells are stale"
    assert COLAB_INSTALL_CELL in readme


def test_committed_lessons_are_executed_in_full_mode():
    for p in LESSONS:
        text = p.read_text()
        cells = [c for c in json.loads(text)["cells"] if c["cell_type"] == "code"]
        assert all(c.get("execution_count") for c in cells[1:]), f"{p.name}: not every cell was executed"
        assert "Quick mode (COURSE_QUICK=1)" not in text, f"{p.name} was saved from a quick-mode run"
        assert not any(o.get("output_type") == "error" for c in cells for o in c.get("outputs", [])), p.name


def _requirement_names(specs):
    return {re.split(r"[<>=!~\[ ]", s.strip(), maxsplit=1)[0].lower() for s in specs}


def test_environment_yml_is_valid_for_conda_and_installs_what_the_lessons_need():
    """Parsed as conda does: a YAML mapping whose pip: list pip reads as a requirements file, line by line."""
    import tomllib
    from packaging.requirements import InvalidRequirement, Requirement

    yaml = pytest.importorskip("yaml")
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["channels"] == ["conda-forge"]  # the `pytorch` channel is no longer updated
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "pip" in conda
    for line in pip:  # every pip line: a requirement, or an editable install of this folder
        if line.startswith(("-e ", "--editable ")):
            assert line.split(None, 1)[1].split("#")[0].strip() == ".", line
            continue
        assert not line.startswith("-"), f"pip rejects the option {line!r} as a requirement line"
        try:
            Requirement(line)
        except InvalidRequirement as e:
            raise AssertionError(f"environment.yml pip line {line!r} is not a requirement: {e}") from None
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {"pytorch" if n == "torch" else n for n in _requirement_names(project["dependencies"])}
    listed = _requirement_names(conda + [p for p in pip if not p.startswith("-")])
    assert wanted <= listed, f"missing from environment.yml: {sorted(wanted - listed)}"


def test_doctor_exits_zero_here_and_help_works():
    r = subprocess.run([sys.executable, "-m", "course_lib", "doctor"], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Device" in r.stdout and "Quick mode" in r.stdout  # conftest sets COURSE_QUICK=1
    for args in (["--help"], ["doctor", "--help"]):
        r = subprocess.run([sys.executable, "-m", "course_lib", *args], capture_output=True, text=True)
        assert r.returncode == 0 and "usage" in r.stdout


def test_doctor_checks_every_declared_requirement_and_its_range():
    import tomllib

    from course_lib import doctor

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert {n.lower() for n in doctor.REQUIRED} == _requirement_names(project["dependencies"])
    assert doctor.requirement_status("no-such-distribution-xyz", "") == (False, "MISSING")
    good, text = doctor.requirement_status("numpy", ">=999")
    assert not good and "outside the required >=999" in text
    assert doctor.requirement_status("numpy", ">=1.0")[0]


def test_the_command_line_answers_help_without_importing_torch():
    code = ("import sys; from course_lib import cli; cli.build_parser().format_help(); "
            "assert 'torch' not in sys.modules, 'torch imported'; import course_lib; course_lib.budget(full=2, quick=1)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_a_regular_install_ships_every_subpackage(tmp_path):
    """Colab installs the course with a plain `pip install` (not editable): the wheel must hold all of course_lib."""
    import shutil
    import zipfile

    src = tmp_path / "src"  # a copy: the build writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT / "course_lib", src / "course_lib", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path / "wheel"), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    names = set(zipfile.ZipFile(next((tmp_path / "wheel").glob("*.whl"))).namelist())
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "course_lib").rglob("*.py")}
    assert sources <= names, sorted(sources - names)


def test_doctor_fails_on_a_bad_quick_setting():
    import os

    env = dict(os.environ, COURSE_QUICK="maybe")
    r = subprocess.run([sys.executable, "-m", "course_lib", "doctor"], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "COURSE_QUICK must be" in r.stdout


# ---- the package's shape (issue 15) ----------------------------------------------------------------------------------

PACKAGE = ROOT / "course_lib"
TOOLING = ("course_lib.grading", "course_lib.bench", "course_lib.cli", "course_lib.doctor", "course_lib.workspace",
           "course_lib.exercises", "course_lib.__main__")


def _is_tooling(module: str) -> bool:
    """A tooling module or one inside a tooling package (course_lib.clip is not course_lib.cli)."""
    return any(module == t or module.startswith(t + ".") for t in TOOLING)
# one idea each, however long: the batch grader; the sandbox's layers; every sampler; the sampler benchmark
LONG_BUT_ONE_IDEA = {"course_lib.grading.batch", "course_lib.grading.sandbox", "course_lib.samplers",
                     "course_lib.bench.samplers"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """module -> the course_lib modules it imports, anywhere in its body (imports inside functions included).

    `from pkg import sub` counts as importing pkg.sub when sub is a module; a package's own ancestors are not counted
    (Python has imported them already)."""
    import ast

    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
                found.update(subs + ([target] if len(subs) < len(node.names) and target in modules else []))
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name in modules)
        graph[name] = {m for m in found if m != name and not name.startswith(m + ".")}
    return graph


def test_the_package_has_no_import_cycle_even_counting_imports_inside_functions():
    graph, state, cycles = _import_graph(), {}, []

    def visit(u, stack):
        state[u] = "open"
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                cycles.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v, stack + [v])
        state[u] = "done"

    for u in sorted(graph):
        if u not in state:
            visit(u, [u])
    assert len(graph) > 40 and not cycles, cycles


def test_the_lessons_modules_never_reach_the_tooling():
    graph = _import_graph()

    def reach(u, seen):
        for v in graph[u] - seen:
            seen.add(v)
            reach(v, seen)
        return seen

    learner = [m for m in graph if not _is_tooling(m) and m != "course_lib"]
    assert {"course_lib.nets.unet", "course_lib.families.gan", "course_lib.train", "course_lib.samplers"} <= set(learner)
    bad = {m: sorted(v for v in reach(m, set()) if _is_tooling(v)) for m in learner}
    assert not {m: v for m, v in bad.items() if v}


def test_modules_stay_short_unless_they_are_one_idea():
    long = {_module_name(p): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    long = {m: n for m, n in long.items() if n > 420}
    assert set(long) <= LONG_BUT_ONE_IDEA, long


# every `course_lib` import line of the student lessons as released before the package layout (commit ce8a723), and
# the attributes those lessons read from the two modules that became packages: a learner's saved copy still runs
OLD_IMPORTS = """
from course_lib import bench, check, progress, runtime
from course_lib import check, compare, metrics, progress, runtime
from course_lib import kernels as K
from course_lib import triton_kernels
from course_lib.bench import Judge
from course_lib.bench_kernels import copy_bandwidth, load_json, summary_lines, time_ms
from course_lib.bench_kernels import main_kernels
from course_lib.graphs import LoopSampler
from course_lib.models import TimeMLP, UNet, describe
from course_lib.profiling import profile_ops
from course_lib.train import Trainer, plot_losses, preset, sample_quality
from course_lib.gan import Generator, Discriminator
from course_lib.vae import VAE
from course_lib.release import release
[bench.SEEDS_FULL, bench.aggregate, bench.bench_samplers, bench.fewest_table, bench.pivot, bench.plot_frontier,
 bench.reference, bench.targets]
[compare.BUDGET, compare.COMPARE_DATASETS, compare.FAMILY_NAMES, compare.claims, compare.compare_config,
 compare.format_summary, compare.generate, compare.load_compared, compare.shipped_records, compare.summarize]
import course_lib.nets, course_lib.evaluate, course_lib.bench.samplers
assert TimeMLP is course_lib.nets.TimeMLP and sample_quality is course_lib.evaluate.sample_quality
assert Judge is course_lib.bench.samplers.Judge
"""


def test_the_module_names_of_the_previous_release_still_import_and_say_where_they_moved():
    code = ("import warnings\nwarnings.simplefilter('always')\nwith warnings.catch_warnings(record=True) as w:\n"
            + "".join(f"    {line}\n" for line in OLD_IMPORTS.strip().splitlines())
            + "print('\\n'.join(str(x.message) for x in w if x.category is FutureWarning))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    for old, new in [("course_lib.models", "course_lib.nets"), ("course_lib.graphs", "course_lib.kernels.graphs"),
                     ("course_lib.train.sample_quality", "course_lib.evaluate.sample_quality"),
                     ("course_lib.bench.Judge", "course_lib.bench.samplers.Judge"),
                     ("course_lib.gan.Generator", "course_lib.nets.gan.Generator")]:
        assert f"{old} is now {new}" in out.stdout, (old, out.stdout)
    with pytest.raises(ImportError):
        __import__("course_lib.no_such_module")
    import course_lib.bench

    with pytest.raises(AttributeError):  # a module the sampler benchmark imports is not one of its old names
        course_lib.bench.torch
