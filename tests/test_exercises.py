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
    monkeypatch.setattr(E, "_LAST_LESSON", [])
    lessons = sorted({ex.lesson for ex in E.EXERCISES.values()})
    points = {k: sum(ex.points for ex in E.EXERCISES.values() if ex.lesson == k) for k in lessons}
    # before any check: one line per lesson, every lesson with exercises in order, then the course total
    assert tuple(E.progress()) == (0, sum(points.values()))
    out = capsys.readouterr().out
    from course_lib.exercises.ideas import CAPSTONE

    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("lesson", "capstone"))]
    assert [CAPSTONE if r[0] == "capstone" else int(r[1]) for r in rows] == lessons and lessons[-2] >= 10
    assert lessons[-1] == CAPSTONE  # the capstone comes after every lesson
    assert "python -m course_lib grade my-work" in out and "this kernel" in out  # where the whole standing is
    E.check("alpha_bar_from_betas", E.ref_alpha_bar_from_betas)
    E.check("q_sample", _stub)
    capsys.readouterr()
    lesson1 = [n for n, ex in E.EXERCISES.items() if ex.lesson == 1]
    # without a lesson: the lesson of the latest check, one row per exercise with its points, words before symbols
    assert tuple(E.progress()) == (1, points[1]) == tuple(E.progress(lesson=1))
    out = capsys.readouterr().out.split("Lesson 1")[1]
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert set(rows) == set(lesson1)
    assert rows["alpha_bar_from_betas"].split()[1:5] == ["1", "/", "1", "point"]
    assert rows["alpha_bar_from_betas"].rstrip().endswith("passed ✅")
    assert rows["q_sample"].split()[1] == "0" and rows["q_sample"].rstrip().endswith("not attempted ⬜")
    assert f"Total for lesson 1: 1 / {points[1]} points" in out
    got, total = E.progress("all")
    rows = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("lesson")]
    assert rows[lessons.index(1)].split()[2:4] == ["1", "/"] and rows[lessons.index(1)].endswith("not all passed ❌")
    assert rows[lessons.index(2)].endswith("not attempted ⬜") and (got, total) == (1, sum(points.values()))
    E.check("noise_images", E.EXERCISES["noise_images"].reference)  # the default follows the latest check
    assert tuple(E.progress()) == (1, points[0]) and "Lesson 0," in capsys.readouterr().out
    for bad in (98, "3", True, 2.0):
        with pytest.raises(ValueError, match="no exercises in lesson"):
            E.progress(bad)


def test_a_verdict_starts_with_words():
    """Without an emoji font the symbols show as boxes: the line must read correctly from its words alone."""
    assert str(E.CheckResult("q_sample", E.PASSED, "fine.")).startswith("q_sample: passed ")
    failed = str(E.CheckResult("q_sample", E.FAILED, "values differ.", "Use cumprod."))
    assert failed.splitlines()[0].startswith("q_sample: failed ") and "Hint: Use cumprod." in failed
    assert str(E.CheckResult("q_sample", E.NOT_ATTEMPTED, "stub.")).startswith("q_sample: not attempted ")


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


@pytest.mark.parametrize("name", sorted(n for n, ex in E.EXERCISES.items() if ex.shortcuts))
def test_every_shortcut_around_the_algorithm_fails(name):
    """Never calling the oracle, returning the course's own data, modes or means, exceeding the budget: each shortcut
    written beside the exercise fails, with the verdict it names (three task seeds; one for the capstone)."""
    ex = E.EXERCISES[name]
    seeds = 1 if (ex.seconds or 0) >= 300 else 3  # the capstone's check trains for about a minute: one task
    for fn, fragment in ex.shortcuts:
        for seed in range(seeds):
            r = E.run_check(name, fn, seed=seed)
            assert r.status == E.FAILED and fragment in r.message + " " + r.hint, (name, fn.__name__, seed, str(r))


def test_every_behaviour_exercise_writes_down_its_shortcuts():
    for name, ex in E.EXERCISES.items():
        if ex.on_behaviour:
            assert ex.shortcuts, f"{name} is graded on behaviour but lists no shortcut it is calibrated against"


def _dpm_guided(denoise, x, sigmas, y, scale):
    import math

    prev = None
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        u = denoise(x, s)
        d = u + scale * (denoise(x, s, y) - u)
        if s_next == 0:
            return d
        h = math.log(s / s_next)
        r = None if prev is None else math.log(float(sigmas[i - 1]) / s) / h
        dd = d if prev is None else (1 + 1 / (2 * r)) * d - prev / (2 * r)
        x, prev = (s_next / s) * x - math.expm1(-h) * dd, d
    return x


def _ancestral_guided(denoise, x, sigmas, y, scale):
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        d = torch.lerp(denoise(x, s), denoise(x, s, y), scale)
        if s_next == 0:
            return d
        up = min(s_next, (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5)
        down = (s_next**2 - up**2) ** 0.5
        x = x + (down - s) * (x - d) / s + up * torch.randn_like(x)
    return x


@pytest.mark.parametrize("loop", [_dpm_guided, _ancestral_guided], ids=["dpmpp_2m", "euler_ancestral"])
def test_the_guided_check_accepts_other_honest_samplers(loop):
    """Not only the lesson's Euler loop: DPM-Solver++(2M) and the stochastic Euler ancestral loop pass (ten tasks)."""
    for seed in range(10):
        assert E.run_check("guided_sample_loop", loop, seed=seed).passed, seed


def test_behaviour_exercises_grade_the_trained_weights_not_the_reported_loss():
    """A step that reports a falling loss but never trains fails on its weights; one that replaces the network fails."""
    calls = iter(range(1, 10**6))
    r = E.run_check("train_step", lambda model, optimizer, x0, alpha_bar: 1.0 / next(calls), seed=3)
    assert r.status == E.FAILED and "never changed" in r.message

    def swap(model, optimizer, x0, alpha_bar):
        model.out = torch.nn.Linear(5, 2)  # a different network than the one handed over
        return 1.0
    r = E.run_check("train_step", swap, seed=3)
    assert r.status == E.FAILED and "different weights or shapes" in r.message


def test_a_task_keeps_its_answer_out_of_the_calls():
    """What a call of the learner's function receives holds no mixture, corpus or network: only the judge's private
    part does, and the oracles that use it are replaced by placeholders until the call runs."""
    from course_lib.grading.oracles import Oracle, OracleRef

    for name, ex in E.EXERCISES.items():
        if not ex.on_behaviour:
            continue
        task = ex.task(torch.Generator().manual_seed(0))
        for call in task.calls:
            for key, value in call.inputs.items():
                assert isinstance(value, (torch.Tensor, int, float, OracleRef)), (name, key, type(value))
            assert all(isinstance(o, Oracle) for o in call.oracles.values())
            assert {v.name for v in call.inputs.values() if isinstance(v, OracleRef)} == set(call.oracles), name


def test_tasks_are_fresh_and_not_the_course_s_own_data():
    """Two seeds give different problems, and none is a ring or grid the lessons use."""
    from course_lib.data import grid_of_gaussians, ring_of_gaussians
    from course_lib.grading import tasks as T

    lessons = [ring_of_gaussians(k, 1.0).modes for k in range(3, 10)] + [grid_of_gaussians().modes]
    a, b = (T.separated_mixture(torch.Generator().manual_seed(s)) for s in (1, 2))
    assert a.modes.shape != b.modes.shape or not torch.allclose(a.modes, b.modes)
    for seed in range(20):
        mix = T.separated_mixture(torch.Generator().manual_seed(seed))
        d = torch.cdist(mix.modes, mix.modes) + torch.eye(len(mix.modes)) * 1e9
        assert float(d.min()) >= 9 * mix.std - 1e-6  # every sample belongs to one mode
        for modes in lessons:
            if len(modes) == len(mix.modes):
                assert torch.cdist(mix.modes, modes).min(1).values.max() > 0.1, seed
    corpus = T.random_corpus(torch.Generator().manual_seed(0))
    from course_lib.captions import decode, is_valid

    assert sum(is_valid(t) for t in decode(corpus)) == 0  # not the caption grammar


def test_an_oracle_counts_validates_and_logs():
    from course_lib.grading import tasks as T
    from course_lib.grading.oracles import BudgetExceeded

    task = T.sampling_task(torch.Generator().manual_seed(0))
    call = task.calls[0]
    denoise, x, sigmas = call.oracles["denoise"], call.inputs["x"], call.inputs["sigmas"]
    with pytest.raises(ValueError, match="shape"):
        denoise(x[:10], 1.0)
    with pytest.raises(ValueError, match="number"):
        denoise(x, "one")
    for s in sigmas[:-1]:
        out = denoise(x, s)
    assert out.shape == x.shape and denoise.log == [float(s) for s in sigmas[:-1]]
    with pytest.raises(BudgetExceeded, match="budget"):
        denoise(x, 1.0)
    assert denoise.refused == 1 and len(denoise.log) == task.private["nfe"]
    guided = T.guidance_task(torch.Generator().manual_seed(0)).calls[0].oracles["denoise"]
    with pytest.raises(ValueError, match="integer labels"):
        guided(x, 1.0, torch.zeros(len(x)))


@pytest.mark.parametrize("name", sorted(n for n, ex in E.EXERCISES.items() if ex.refused))
def test_an_exercise_that_refuses_a_library_says_so_where_the_learner_reads_it(name):
    """Its rule is in the exercise's text in the lesson (the markdown just before the function), word for word, and
    check() fails a function that uses the refused library with that rule as its hint."""
    import json
    import re
    from pathlib import Path

    ex = E.EXERCISES[name]
    lesson = next(Path(__file__).resolve().parents[1].glob(f"notebooks/{ex.lesson:02d}_*.ipynb"))
    cells = json.loads(lesson.read_text())["cells"]
    k = next(i for i, c in enumerate(cells) if c["cell_type"] == "code" and re.search(rf"^def {name}\(",
                                                                                     "".join(c["source"]), re.M))
    text = " ".join("".join(cells[max(i for i in range(k) if cells[i]["cell_type"] == "markdown")]["source"]).split())
    assert ex.rule in text, (name, text[-300:])


def test_check_applies_the_rule_on_libraries_and_on_copying():
    import torch.nn.functional as F

    from course_lib import schedules

    def cross_attention(x, context, mask, w_q, w_k, w_v, heads):
        return F.scaled_dot_product_attention(x, x, x)

    r = E.run_check("cross_attention", cross_attention)
    assert r.status == E.FAILED and "scaled_dot_product_attention" in r.message and r.hint == E.EXERCISES[
        "cross_attention"].rule

    def alpha_bar_from_betas(betas):
        return schedules.alpha_bar_from_betas(betas)

    r = E.run_check("alpha_bar_from_betas", alpha_bar_from_betas)
    assert r.status == E.FAILED and "computes this answer" in r.message

    def discriminator_loss(real_logits, fake_logits):  # a library that computes the formula, where it is allowed
        return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
                + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))

    assert E.run_check("discriminator_loss", discriminator_loss).passed


def test_what_the_oracle_saw_is_evidence_only_when_a_loop_leaves_the_schedule():
    from course_lib.grading import tasks as T

    def probing(denoise, x, sigmas):
        denoise(x, 1e-3)  # asks where the modes are, at a level the schedule does not have
        return x

    for seed in range(3):
        for loop, expected in ((E.ref_sample_loop, []), (_dpm_guided, None), (probing, "not the schedule's")):
            task = (T.guidance_task if loop is _dpm_guided else T.sampling_task)(torch.Generator().manual_seed(seed))
            E.run_task(loop, task)
            found = T.off_schedule(task)
            assert (found == [] if expected in ([], None) else expected in found[0]), (loop.__name__, found)


def test_check_stops_an_endless_loop_politely(capsys, monkeypatch):
    import time as _time

    assert E.check_seconds("q_sample") >= 60 and E.check_seconds("train_step") >= 3 * 120  # generous for a laptop
    monkeypatch.setattr(E, "_RESULTS", {})
    monkeypatch.setattr(E, "check_seconds", lambda name: 1.5)

    def q_sample(x0, t, alpha_bar, noise):
        try:
            while True:
                pass
        except Exception:  # a learner's broad except must not swallow the check's stop
            return x0

    start = _time.monotonic()
    assert not E.check("q_sample", q_sample)
    assert _time.monotonic() - start < 60
    out = capsys.readouterr().out
    assert "q_sample: failed" in out and "still running after 1.5 s" in out and "Hint:" in out
    assert E.check("q_sample", E.ref_q_sample)  # the alarm is gone: the next check runs normally


def test_the_check_limit_leaves_an_earlier_alarm_alone_and_rearms_a_later_one():
    import signal

    from course_lib.exercises.time_limit import TimeUp, time_limit

    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *a: fired.append("grader"))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)  # the grader's own cell alarm, later than the check's
        with pytest.raises(TimeUp):
            with time_limit(0.2):
                while True:
                    pass
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 25 < remaining <= 30 and signal.getsignal(signal.SIGALRM) is not None and not fired
        signal.setitimer(signal.ITIMER_REAL, 0.3)  # an earlier alarm than the check's: left to fire as set
        with time_limit(30):
            while not fired:
                pass
        assert fired == ["grader"]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_the_inpainting_task_s_truth_matches_the_precision_form():
    """The Gaussian's conditional (mean and covariance of the unknown half given the known half) and its exact
    denoiser, against their forms through the precision matrix (an independent derivation)."""
    from course_lib.analytic import correlated_pairs_gaussian, gaussian_conditional
    from course_lib.grading import tasks as T

    for seed in range(5):
        mean, cov, known = correlated_pairs_gaussian(torch.Generator().manual_seed(seed))
        assert torch.linalg.eigvalsh(cov).min() > 0 and known.sum() * 2 == len(mean)
        x = mean + torch.randn(7, len(mean), dtype=torch.float64) @ torch.linalg.cholesky(cov).T
        cond_mean, cond_cov = gaussian_conditional(mean, cov, known, x[:, known])
        prec = torch.linalg.inv(cov)
        p_uu, p_uk = prec[~known][:, ~known], prec[~known][:, known]
        assert torch.allclose(cond_cov, torch.linalg.inv(p_uu), atol=1e-8)
        want = mean[~known] - (x[:, known] - mean[known]) @ (torch.linalg.inv(p_uu) @ p_uk).T
        assert torch.allclose(cond_mean, want, atol=1e-8)
    task = T.inpainting_task(torch.Generator().manual_seed(3))
    denoise, p = task.calls[0].oracles["denoise"], task.private
    x, s = torch.randn(T.INPAINT_ROWS, len(p["mean"]), dtype=torch.float64), 0.7
    eye = torch.eye(len(p["mean"]), dtype=torch.float64)
    post = torch.linalg.inv(torch.linalg.inv(p["cov"]) + eye / s**2)  # x0 | x_s: precision Sigma^-1 + I / s^2
    want = (torch.linalg.inv(p["cov"]) @ p["mean"] + x / s**2) @ post.T
    assert torch.allclose(denoise(x, s).double(), want, atol=1e-4)
    assert torch.equal(task.calls[0].inputs["known"][:, ~p["known"]], torch.zeros(T.INPAINT_ROWS, int((~p["known"]).sum())))


def test_repaint_is_graded_on_the_conditional_it_samples():
    """RePaint's passes are what bring the completions to the conditional: the reference passes on ten tasks, the same
    loop with one pass per level (replacement) fails on each, with the hint to resample."""
    from course_lib.exercises import lesson6

    for seed in range(10):
        assert E.run_check("repaint", lesson6.ref_repaint, seed=seed).passed, seed
        r = E.run_check("repaint", lesson6._repaint_with("no resampling"), seed=seed)
        assert r.status == E.FAILED and "Walk every level" in r.hint, (seed, str(r))
