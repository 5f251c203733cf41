from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch

from course_lib import plotting, runtime


@pytest.mark.parametrize("value, quick", [("1", True), ("true", True), ("0", False), ("", False), ("off", False)])
def test_quick_mode_parsing(monkeypatch, value, quick):
    monkeypatch.setenv(runtime.QUICK_ENV, value)
    assert runtime.is_quick() is quick
    assert runtime.budget(full=1000, quick=10) == (10 if quick else 1000)


def test_quick_mode_labels_a_verdict_as_a_smoke_test(monkeypatch):
    monkeypatch.setenv(runtime.QUICK_ENV, "1")
    assert "smoke test" in runtime.smoke_note(40) and "40 samples" in runtime.smoke_note(40)
    monkeypatch.setenv(runtime.QUICK_ENV, "0")
    assert runtime.smoke_note(40) == ""


def test_quick_mode_rejects_garbage(monkeypatch):
    monkeypatch.setenv(runtime.QUICK_ENV, "maybe")
    with pytest.raises(ValueError, match="COURSE_QUICK"):
        runtime.is_quick()


def test_seeding_reproduces():
    g1 = runtime.seed_everything(123)
    a, b = torch.randn(3), torch.randn(3, generator=g1)
    g2 = runtime.seed_everything(123)
    assert torch.equal(a, torch.randn(3)) and torch.equal(b, torch.randn(3, generator=g2))
    assert np.random.rand() == pytest.approx(np.random.RandomState(123).rand())
    with pytest.raises(TypeError):
        runtime.seed_everything(-1)


def test_device_choice_on_this_machine():
    info = runtime.device_info()
    expected = "cuda" if torch.cuda.is_available() else ("mps" if runtime._mps_available() else "cpu")
    assert info.device.type == expected and str(info)
    assert runtime.device_info("cpu").device.type == "cpu"
    with pytest.raises(ValueError, match="prefer"):
        runtime.device_info("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            runtime.device_info("cuda")


def test_colab_cell_installs_only_on_colab():
    cell = runtime.COLAB_INSTALL_CELL
    assert '"google.colab" in sys.modules' in cell and "colab_setup.py" in cell and runtime.REPO_URL in cell
    from course_lib import colab_setup  # the script the cell runs is what installs, with pip
    assert '"pip", "install"' in Path(colab_setup.__file__).read_text()
    assert runtime.in_colab() is False


def test_make_grid_places_images():
    imgs = -torch.ones(5, 1, 2, 3)
    imgs[4] = 1.0
    grid = plotting.make_grid(imgs, nrow=3, pad=1)
    assert grid.shape == (2 * 3 + 1, 3 * 4 + 1)
    assert grid[1:3, 1:4].max() == 0.0  # image 0 is black ([-1] -> 0)
    assert (grid[4:6, 5:8] == 1.0).all()  # image 4 (row 1, col 1) is white
    assert (grid[0] == 1.0).all()  # padding is white
    with pytest.raises(ValueError, match="batch"):
        plotting.make_grid(torch.zeros(2, 8, 8))


def test_image_grid_maps_its_value_range_and_keeps_a_row_label():
    field = torch.linspace(-0.2, 0.2, 4).reshape(1, 1, 2, 2)
    ax = plotting.image_grid(field, value_range=(-0.2, 0.2), cmap="RdBu_r", colorbar=True, label="as eps")
    shown = ax.images[0].get_array()
    assert shown[1, 1] == pytest.approx(0.0) and shown[2, 2] == pytest.approx(1.0)  # -0.2 -> 0, 0.2 -> 1
    assert ax.get_ylabel() == "as eps" and len(ax.figure.axes) == 2  # the colour bar is a second axes
    clamped = plotting.image_grid(field).images[0].get_array()  # default [-1, 1]: a weak field is mid-grey
    assert 0.35 < clamped[1, 1] < clamped[2, 2] < 0.65
    with pytest.raises(ValueError, match="value_range"):
        plotting.image_grid(field, value_range=(1, 1))
    matplotlib.pyplot.close("all")


def test_image_rows_names_every_row_and_shows_its_own_images():
    rows = [torch.full((3, 1, 2, 2), v) for v in (-1.0, 1.0)]
    fig = plotting.image_rows(rows, ["y = 0", "y = 1"], title="two rows")
    assert [ax.get_ylabel() for ax in fig.axes] == ["y = 0", "y = 1"] and fig._suptitle.get_text() == "two rows"
    first, second = (ax.images[0].get_array() for ax in fig.axes)
    assert first[1, 1] == 0.0 and second[1, 1] == 1.0  # black row, then white row
    with pytest.raises(ValueError, match="one label per row"):
        plotting.image_rows(rows, ["only one"])
    matplotlib.pyplot.close("all")


def test_scatter_has_labelled_axes():
    ax = plotting.scatter_2d(torch.randn(100, 2), modes=torch.zeros(1, 2), title="t")
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title() == "t"
    with pytest.raises(ValueError):
        plotting.scatter_2d(torch.zeros(4, 3))
    matplotlib.pyplot.close("all")


def test_animation_renders_to_html_with_every_frame():
    frames = [torch.randn(50, 2) for _ in range(3)]
    anim = plotting.animate(frames, lambda ax, f: plotting.scatter_2d(f, ax=ax, density=False))
    html = plotting.as_html(anim).data
    assert "<script" in html and html.count("data:image/png;base64") == 3
    with pytest.raises(ValueError):
        plotting.animate([], lambda ax, f: None)


def test_the_loss_plot_names_the_window_it_really_averaged():
    import matplotlib.pyplot as plt

    from course_lib.train import plot_losses

    for n, want in ((40, "mean of 40"), (500, "mean of 100")):  # a quick run shorter than the window says so
        ax = plot_losses([1.0 / (i + 1) for i in range(n)])
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["per step", want]
        plt.close(ax.figure)


@pytest.fixture
def threads(monkeypatch):
    """configure_threads decides afresh, on a pretend 2-core machine, and only records what it would set."""
    monkeypatch.setattr(runtime, "_THREADS_NOTE", [])
    monkeypatch.setattr(runtime, "_THREADS_REDUCED", [])
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 2)
    state = {"n": 2}
    monkeypatch.setattr(torch, "get_num_threads", lambda: state["n"])
    monkeypatch.setattr(torch, "set_num_threads", lambda n: state.update(n=n))
    monkeypatch.delenv(runtime.THREADS_ENV, raising=False)
    return state


@pytest.mark.parametrize("busy, env, want, reduced", [
    (0.1, None, 2, False),      # quiet: torch's default, the fastest there
    (None, None, 2, False),     # no /proc/stat: nothing to go on, torch's default
    (1.0, None, 1, True),       # one core taken by another process: only the free one
    (1.9, "auto", 1, True),     # never fewer than one
    (1.0, "all", 2, False),     # the learner keeps torch's default
    (0.0, "3", 3, False),       # or names a number
])
def test_threads_follow_the_free_cores(threads, monkeypatch, busy, env, want, reduced):
    monkeypatch.setattr(runtime, "busy_elsewhere", lambda interval=0.3: busy)
    if env is not None:
        monkeypatch.setenv(runtime.THREADS_ENV, env)
    note = runtime.configure_threads()
    assert threads["n"] == want and note.startswith(str(want))
    assert ("Using 1 CPU thread" in runtime.describe_mode()) == reduced
    assert runtime.configure_threads() == note  # decided once per process


def test_threads_refuse_a_bad_setting(threads, monkeypatch):
    monkeypatch.setenv(runtime.THREADS_ENV, "lots")
    with pytest.raises(ValueError, match="COURSE_THREADS must be auto, all or a number"):
        runtime.configure_threads()


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads /proc/stat (Linux)")
def test_a_busy_process_is_seen_as_a_busy_core():
    import subprocess
    import sys

    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.5)
        assert runtime.busy_elsewhere(interval=1.0) >= 0.5  # one spinning process: about one core (more if others run)
    finally:
        spin.kill()
        spin.wait()


def test_the_threads_benchmark_picks_by_its_stated_rule():
    from course_lib.bench import threads as T

    def rec(workload, condition, setting, ms):
        return {"workload": workload, "condition": condition, "setting": setting, "wall_ms": ms, "round": 0}

    ms = {"quiet": {"torch default": 10, "passive waiting": 10.5, "cores - 1": 16, "passive, cores - 1": 16,
                    "1 thread": 16},
          "another training": {"torch default": 300, "passive waiting": 20, "cores - 1": 17, "passive, cores - 1": 17,
                               "1 thread": 16}}
    records = [rec("ring8", c, s, v) for c, row in ms.items() for s, v in row.items()]
    rows = T.summarize(records)
    assert {r["setting"]: r["vs_best"] for r in rows if r["condition"] == "another training"}["torch default"] == 18.75
    pick, why = T.choose(rows)
    assert pick == "passive waiting" and "1.05x" in why  # within 10% quiet, and the least slowdown beside a job
    ms["quiet"]["passive waiting"] = 12  # now 20% slower quiet: only torch's default qualifies
    assert T.choose(T.summarize([rec("ring8", c, s, v) for c, row in ms.items() for s, v in row.items()]))[0] == \
        "torch default"
    one = T.time_setting("ring8", "1 thread", steps=2)  # the timing process itself runs and reports its threads
    assert one["threads"] == 1 and one["wall_ms"] > 0
