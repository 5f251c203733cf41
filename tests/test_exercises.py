import sys

import pytest
import torch

from course_lib import exercises as E


@pytest.mark.parametrize("name", sorted(E.EXERCISES))
def test_reference_passes_its_own_check(name, capsys):
    assert E.check(name, E.EXERCISES[name].reference)
    assert "passed" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(E.EXERCISES))
def test_every_known_mistake_fails_with_its_own_hint(name):
    ex = E.EXERCISES[name]
    assert ex.mistakes, "each exercise should diagnose at least one common mistake"
    for wrong, hint in ex.mistakes:
        r = E.run_check(name, wrong, seed=0)
        assert r.status == E.FAILED, (name, hint)
        if ex.assess is not None:  # graded on behaviour: the verdict names what went wrong
            assert hint in r.message + " " + r.hint, (name, hint, str(r))
        elif "values differ" in r.message:  # mistakes that run produce the targeted hint
            assert r.hint == hint


def test_inputs_are_fresh_each_time():
    ex = E.EXERCISES["q_sample"]
    a = ex.make_inputs(torch.Generator().manual_seed(1))
    b = ex.make_inputs(torch.Generator().manual_seed(2))
    assert not torch.equal(a["noise"].flatten()[:4], b["noise"].flatten()[:4])
    # a learner who memorised one answer fails on the next random draw
    memo = E.ref_q_sample(**a)
    assert E.run_check("q_sample", lambda **kw: memo).status == E.FAILED


def _stub(**kwargs):
    raise NotImplementedError("Exercise: replace this line with your solution")


def test_not_attempted(capsys):
    assert not E.check("alpha_bar_from_betas", _stub)
    out = capsys.readouterr().out
    assert "not attempted" in out and "NotImplementedError" in out


@pytest.mark.parametrize("fn, fragment", [
    (lambda betas: 1 / 0, "ZeroDivisionError"),
    (lambda betas: sys.exit(3), "SystemExit"),
    (lambda betas: None, "forget a `return`"),
    (lambda betas: "text", "torch.Tensor"),
    (lambda betas: torch.cumprod(1 - betas, 0)[:-1], "wrong shape"),
    (lambda betas: torch.full_like(betas, float("nan")), "NaN"),
    (lambda betas: torch.cumprod(1 - betas, 0) + 1e-3, "values differ"),
    (42, "expected your function"),
])
def test_bad_submissions_fail_without_raising(fn, fragment, capsys):
    assert not E.check("alpha_bar_from_betas", fn)
    assert fragment in capsys.readouterr().out


def test_in_place_modification_cannot_fool_the_reference():
    def sneaky(betas):
        out = torch.cumprod(1 - betas, 0)
        betas.zero_()  # mutating the input must not change what the reference saw
        return out
    assert E.run_check("alpha_bar_from_betas", sneaky).status == E.PASSED


def test_numpy_outputs_are_accepted_when_right():
    assert E.check("alpha_bar_from_betas", lambda betas: torch.cumprod(1 - betas, 0).numpy())


def test_unknown_exercise_and_broken_checker_never_raise(capsys, monkeypatch):
    assert not E.check("no_such_exercise", lambda: 0)
    assert "Known exercises" in capsys.readouterr().out
    monkeypatch.setattr(E, "run_check", lambda *a, **k: 1 / 0)
    assert not E.check("q_sample", E.ref_q_sample)
    assert "bug in the course" in capsys.readouterr().out


def test_progress_counts_points(capsys, monkeypatch):
    monkeypatch.setattr(E, "_RESULTS", {})
    E.check("alpha_bar_from_betas", E.ref_alpha_bar_from_betas)
    E.check("q_sample", _stub)
    got, total = E.progress(lesson=1)
    lesson1 = [n for n, ex in E.EXERCISES.items() if ex.lesson == 1]
    assert (got, total) == (1, len(lesson1))
    out = capsys.readouterr().out
    assert f"Total: 1 / {len(lesson1)} points" in out


def test_check_and_progress_show_nothing_more_in_a_notebook(monkeypatch):
    """Their verdict is printed; the value they return must not add a stray Out[n]: True (issue 23)."""
    from IPython.core.formatters import DisplayFormatter

    monkeypatch.setattr(E, "_RESULTS", {})
    fmt = DisplayFormatter()
    ok, bad = E.check("alpha_bar_from_betas", E.ref_alpha_bar_from_betas), E.check("q_sample", _stub)
    score = E.progress(lesson=1)
    assert ok and not bad and ok == True and bad == False and ok != bad  # noqa: E712 (the comparison is the point)
    assert isinstance(score, tuple) and score[0] == 1
    for value in (ok, bad, score):
        assert fmt.format(value) == ({}, {}), value
    assert fmt.format(True)[0] == {"text/plain": "True"}  # what a plain bool would have shown


def test_registry_refuses_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        E.register(E.EXERCISES["q_sample"])


def test_a_plain_euler_loop_passes_sample_loop_on_every_task():
    """The lesson promises that a plain Euler loop passes: 40 random tasks (budgets 8-10, sigma_max 10-30)."""
    def euler(denoise, x, sigmas):
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            d = denoise(x, s)
            x = d if s_next == 0 else x + (s_next - s) * (x - d) / s
        return x
    for seed in range(40):
        assert E.run_check("sample_loop", euler, seed=seed).passed, seed


def test_behaviour_exercises_grade_the_trained_weights_not_the_reported_loss():
    """A step that reports a falling loss but never trains fails on its weights; one that replaces the network fails."""
    fake = iter(torch.linspace(1, 0.1, 10_000).tolist())
    r = E.run_check("train_step", lambda model, optimizer, x0, alpha_bar: next(fake), seed=3)
    assert r.status == E.FAILED and "never changed" in r.message

    def swap(model, optimizer, x0, alpha_bar):
        model.out = torch.nn.Linear(5, 2)  # a different network than the one handed over
        return 1.0
    r = E.run_check("train_step", swap, seed=3)
    assert r.status == E.FAILED and "different weights or shapes" in r.message
