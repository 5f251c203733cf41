"""Colab's install step, run by every lesson's first cell as a script: `python colab_setup.py CLONE`.

Standard library only (pip's own `packaging` for version ranges), so it works in a runtime that lacks the course's
dependencies, numpy included. It installs the course from CLONE without its dependencies (Colab's torch, Jupyter and
widgets are kept), then only the declared requirements that are missing or out of range, quietly; run again, it
finishes an interrupted install and otherwise does nothing. It says when the runtime must be restarted: only when a
package this kernel has already imported (COURSE_LOADED, from the cell) was replaced.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
from pathlib import Path

SKIP = {"jupyterlab"}  # Colab runs its own notebook server
IMPORT_NAMES = {"scikit-learn": "sklearn", "pillow": "PIL", "pot": "ot", "ipython": "IPython"}


def requirements(clone: Path) -> list[str]:
    """The course's declared dependencies, from its pyproject.toml."""
    text = (clone / "pyproject.toml").read_text()
    try:
        import tomllib
    except ImportError:  # Python < 3.11: pip's vendored parser
        from pip._vendor import tomli as tomllib
    return list(tomllib.loads(text)["project"]["dependencies"])


def missing(reqs: list[str]) -> list[tuple[str, str, str | None]]:
    """(requirement, name, installed version or None) for each requirement that is absent or out of range."""
    from pip._vendor.packaging.requirements import Requirement

    out = []
    for line in reqs:
        req = Requirement(line)
        if req.name.lower() in SKIP:
            continue
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            version = None
        if version is None or (req.specifier and not req.specifier.contains(version, prereleases=True)):
            out.append((str(req), req.name, version))
    return out


def course_installed_from(clone: Path) -> bool:
    """Whether course_lib is installed, and from this clone."""
    try:
        direct = md.distribution("course_lib").read_text("direct_url.json")
    except md.PackageNotFoundError:
        return False
    url = json.loads(direct or "{}").get("url", "")
    return url.rstrip("/").endswith(str(clone.resolve()).rstrip("/"))


def pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", *args],
                          capture_output=True, text=True)


def fail(what: str, r: subprocess.CompletedProcess) -> int:
    tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-12:])
    print(f"{what} failed:\n{tail}\nRun this cell again: it resumes where it stopped. If it fails the same way, restart "
          "the runtime (Runtime > Restart session) and run it again.")
    return 1


def main(clone: str) -> int:
    clone = Path(clone)
    loaded = set(filter(None, os.environ.get("COURSE_LOADED", "").split(",")))
    did = []
    if not course_installed_from(clone):
        r = pip("--no-deps", str(clone))
        if r.returncode:
            return fail("Installing the course", r)
        did.append("the course")
    todo = missing(requirements(clone))
    if todo:
        r = pip(*(req for req, _, _ in todo))
        if r.returncode:
            return fail("Installing " + ", ".join(name for _, name, _ in todo), r)
        did += [name + (f" (replacing {v})" if v else "") for _, name, v in todo]
    replaced = [name for _, name, v in todo if v is not None
                and IMPORT_NAMES.get(name.lower(), re.sub(r"[-.]", "_", name.lower())) in loaded]
    if replaced:
        print(f"Installed {', '.join(did)}. This runtime had already imported {', '.join(replaced)}: restart it "
              "(Runtime > Restart session), then run this cell again; it will have nothing left to do.")
        return 3
    print(f"Course ready: installed {', '.join(did)}; no restart needed." if did else
          "Course ready: nothing to install.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
