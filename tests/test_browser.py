"""A learner's view, in a real browser: JupyterLab on a free local port, a student lesson opened in headless Chromium
(Debian's `chromium`, driven by Python `playwright`; `.ci/run` installs both), every cell run. Then: no error
output, every figure rendered, the slider moves and its figure changes, and `check` prints its verdict.

Skipped, with the reason, where Chromium or playwright is missing (never silently: `pytest -rs` lists it)."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LESSON = "01_forward_process.ipynb"  # the lesson with a slider, an animation, figures and three checks
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, proc: subprocess.Popen, log: Path, limit: float = 300) -> None:
    start = time.monotonic()
    while time.monotonic() - start < limit:  # generous: a busy machine starts JupyterLab slowly
        if proc.poll() is not None:
            raise AssertionError(f"JupyterLab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"JupyterLab did not answer within {limit} s:\n{log.read_text()[-3000:]}")


# What the page reports, read from the notebook's model (JupyterLab renders an error output as stderr text, so the
# page's HTML cannot tell an error from a warning): per code cell its execution count and the errors among its outputs;
# from the page, the rendered images and the outputs' text.
CELLS = """() => {
  const nb = window.jupyterapp.shell.currentWidget.content;
  return nb.widgets.filter(c => c.model.type === 'code').map(c => ({
    count: c.model.executionCount,
    errors: c.model.outputs.toJSON().filter(o => o.output_type === 'error').map(o => `${o.ename}: ${o.evalue}`)}));
}"""
STATE = """() => {
  const cells = (%s)();
  const images = [...document.querySelectorAll('.jp-Notebook .jp-OutputArea-output img')];
  return {counts: cells.map(c => c.count), errors: cells.flatMap(c => c.errors),
          images: images.length, broken: images.filter(i => !(i.complete && i.naturalWidth > 0)).length,
          text: [...document.querySelectorAll('.jp-Notebook .jp-OutputArea-output')].map(o => o.textContent).join('\\n')};
}""" % CELLS
# Done when every code cell has run, or as soon as one shows an error: JupyterLab stops a run-all there and leaves the
# cells after it unrun, so waiting for them would never end.
DONE = """() => { const cells = (%s)();
  return cells.some(c => c.errors.length) || (cells.length > 0 && cells.every(c => c.count !== null)); }""" % CELLS


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium): browser test skipped")
def test_a_student_lesson_runs_in_jupyterlab_in_a_real_browser(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: browser test skipped")
    work = tmp_path / "my-work"
    work.mkdir()
    shutil.copy(ROOT / "notebooks" / "student" / LESSON, work / LESSON)
    settings = tmp_path / "settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)  # render every cell (no virtual scrolling), so the page holds all the outputs
    (settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    port, token = _free_port(), "course-browser-test"
    env = dict(os.environ, COURSE_QUICK="1", JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
               JUPYTER_CONFIG_DIR=str(tmp_path / "config"), MPLBACKEND="module://matplotlib_inline.backend_inline")
    log = tmp_path / "jupyter.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
             f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}", "--LabApp.expose_app_in_browser=True",
             f"--LabApp.user_settings_dir={tmp_path / 'settings'}", f"--LabApp.workspaces_dir={tmp_path / 'ws'}",
             *(["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else [])],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=work)
    try:
        _wait_for_server(f"http://127.0.0.1:{port}/api/status?token={token}", server, log)
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(300_000)
            page.goto(f"http://127.0.0.1:{port}/lab/tree/{LESSON}?token={token}")
            page.wait_for_function("() => window.jupyterapp && document.querySelector('.jp-Notebook .jp-CodeCell')")
            page.wait_for_function("() => { const s = window.jupyterapp.shell.currentWidget;"
                                   " return s && s.sessionContext && s.sessionContext.session &&"
                                   " s.sessionContext.session.kernel && s.sessionContext.session.kernel.status === 'idle'; }")
            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
            page.wait_for_function(DONE, timeout=900_000)
            page.wait_for_timeout(2000)  # let the last images decode
            state = page.evaluate(STATE)
            assert state["errors"] == [], state["errors"]
            assert all(isinstance(c, int) for c in state["counts"]), state["counts"]  # every cell ran
            assert state["images"] >= 5 and state["broken"] == 0, (state["images"], state["broken"])
            assert "not attempted" in state["text"] and "Total for lesson" in state["text"]  # check's and progress's verdicts
            # the slider: move it, and the figure beside it must change
            slider = page.locator(".jp-OutputArea-output .widget-slider").first
            box = slider.locator("xpath=ancestor::div[contains(@class, 'jp-OutputArea-output')][1]")
            before = box.locator("img").first.get_attribute("src")
            handle = slider.locator(".noUi-handle, .ui-slider-handle").first  # ipywidgets 8, 7
            handle.focus()
            for _ in range(5):
                page.keyboard.press("PageUp")
            page.wait_for_function("([el, src]) => { const i = el.querySelector('img'); return i && i.src !== src; }",
                                   arg=[box.element_handle(), before], timeout=120_000)
            after = box.locator("img").first.get_attribute("src")
            assert after and after != before
            browser.close()
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
