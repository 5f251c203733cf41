"""Graded exercises: each runs the learner's function against a reference on fresh random inputs.

This file is the machinery (the registry, `check`, `progress`, the judge); each lesson's exercises, with their
references, input makers and the hints for known mistakes, are in their own file here (lesson01.py ... lesson15.py,
on_behaviour.py for the ones graded on what a training run or a sampling loop produced). A new lesson adds a file and
a line at the bottom of this one. The grader's workers may neither import nor read anything in this folder.

`check(name, fn)` never raises (except on Ctrl-C): it prints passed / failed (with a hint) / not
attempted and returns a bool. Results are remembered for this kernel; `progress()` shows them with their points.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from ..grading.calls import Raised, call_learner, with_oracles
from ..grading.calls import clone_inputs as _clone
from .time_limit import TimeUp, time_limit

PASSED, FAILED, NOT_ATTEMPTED = "passed", "failed", "not_attempted"
_SYMBOL = {PASSED: "✅", FAILED: "❌", NOT_ATTEMPTED: "⬜"}  # after the words, which carry the meaning without an emoji font



@dataclass(frozen=True)
class Exercise:
    """One exercise: the reference, a generator of fresh inputs (or of tasks, for one graded on behaviour), the known
    mistakes with their hints, the shortcuts that skip the algorithm, and the exercise's rule on other libraries."""

    name: str
    lesson: int
    reference: Callable
    make_inputs: Callable[[torch.Generator], dict] | None
    hint: str
    mistakes: tuple = ()  # (wrong implementation, hint shown when the learner's output matches it)
    trials: int = 5
    rtol: float = 1e-5
    atol: float = 1e-6
    points: int = 1
    # graded on behaviour: `task(generator)` draws a course_lib.grading.tasks.Task (calls of the learner's function with
    # oracles the judge holds) and `assess(task, outputs)` gives the verdict on what the calls returned (None: passed)
    task: Callable | None = None
    assess: Callable | None = None
    # ways to get an output without the algorithm (never calling the oracle, returning the course's own data, modes or
    # means, exceeding the budget), each (function, a fragment of the verdict it must get): tests/test_exercises.py
    shortcuts: tuple = ()
    # the exercise's rule on libraries that perform the operation it teaches: dotted prefixes it refuses (the grader
    # reads the source in its own process; `check` warns from the function's source), and the sentence that says so
    refused: tuple = ()
    rule: str = "Any library may be used: the function is graded on what it returns."
    # what the oracles saw, as evidence for review (the grader flags it, points kept): task -> reasons
    evidence: Callable | None = None
    passed_message: str = ""
    seconds: float | None = None  # the grader's time limit per call when it must exceed --call-timeout

    @property
    def on_behaviour(self) -> bool:
        return self.task is not None


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: str
    message: str
    hint: str = ""

    @property
    def passed(self) -> bool:
        return self.status == PASSED

    def __str__(self) -> str:
        text = f"{self.name}: {_word(self.status)} {_SYMBOL[self.status]} — {self.message}"
        return text + (f"\n   Hint: {self.hint}" if self.hint else "")


EXERCISES: dict[str, Exercise] = {}
# course_lib functions that compute an exercise's answer: the grader flags a graded function that calls one.
LIBRARY_EQUIVALENTS = {
    "alpha_bar_from_betas": ("course_lib.schedules.alpha_bar_from_betas",),
    "q_sample": ("course_lib.forward.q_sample", "course_lib.forward.q_mean_std", "course_lib.kernels.q_sample",
                 "course_lib.kernels.q_sample_reference"),
    "log_snr": ("course_lib.schedules.log_snr_from_alpha_bar", "course_lib.schedules.snr_from_alpha_bar"),
    "simple_loss": ("course_lib.losses.diffusion_loss",),
    "posterior_mean": ("course_lib.losses.posterior_coefficients", "course_lib.losses.q_posterior"),
    "eps_to_x0": ("course_lib.losses.from_eps", "course_lib.losses.to_eps", "course_lib.losses.convert"),
    "ddim_step": ("course_lib.samplers.sample_ddim", "course_lib.kernels.ddim_step", "course_lib.kernels.euler_step"),
    "heun_step": ("course_lib.samplers.sample_heun", "course_lib.kernels.heun_correct"),
    "karras_sigmas": ("course_lib.samplers.karras_sigmas", "course_lib.samplers.get_sigmas"),
    "reparameterize": ("course_lib.vae.reparameterize",),
    "gaussian_elbo": ("course_lib.vae.gaussian_log_likelihood", "course_lib.vae.kl_to_standard_normal",
                      "course_lib.vae.elbo"),
    "discriminator_loss": ("course_lib.gan.discriminator_loss",),
    "dpmpp_2m_coefficients": ("course_lib.kernels.dpmpp_2m_step", "course_lib.samplers.sample_dpmpp_2m"),
}
_RESULTS: dict[str, CheckResult] = {}
_LAST_LESSON: list[int] = []  # the lesson of the latest check in this kernel: progress() shows it by default


def _word(status: str) -> str:
    return status.replace("_", " ")


def register(exercise: Exercise) -> Exercise:
    """Add an exercise to the registry (names are unique)."""
    if exercise.name in EXERCISES:
        raise ValueError(f"exercise {exercise.name!r} is already registered")
    EXERCISES[exercise.name] = exercise
    return exercise


def _close(got: torch.Tensor, want: torch.Tensor, ex: Exercise) -> bool:
    return got.shape == want.shape and torch.allclose(got.double(), want.double(), rtol=ex.rtol, atol=ex.atol)


def _matching_mistake(ex: Exercise, inputs: dict, got: torch.Tensor) -> str | None:
    for wrong, hint in ex.mistakes:
        try:
            if _close(got, torch.as_tensor(wrong(**_clone(inputs))), ex):
                return hint
        except Exception:  # a mistake that cannot even run on these inputs is simply not this one
            continue
    return None


def _describe(inputs: dict) -> str:
    parts = []
    for k, v in inputs.items():
        parts.append(f"{k}: {tuple(v.shape)} {str(v.dtype).replace('torch.', '')}" if isinstance(v, torch.Tensor)
                     else f"{k}={v!r}")
    return ", ".join(parts)


def _raised(ex: Exercise, got: Raised, about: str) -> CheckResult:
    """The verdict on a call that raised (or returned something that is not a tensor); `about` describes the call."""
    name = ex.name
    if got.error == "NotImplementedError":
        return CheckResult(name, NOT_ATTEMPTED, "Your function still raises NotImplementedError.",
                           "Replace the `raise NotImplementedError` line with your code, then run the cell again.")
    if got.error == "BudgetExceeded":
        return CheckResult(name, FAILED, f"{got.message}.", ex.hint)
    if got.error:
        return CheckResult(name, FAILED, f"Your function raised {got.error}: {got.message}", f"{about}{ex.hint}")
    return CheckResult(name, FAILED, f"expected a torch.Tensor, got {got.message}.",
                       "Did you forget a `return` statement?" if got.message == "None" else ex.hint)


def judge(ex: Exercise, inputs: dict, want: torch.Tensor | None, got, trial: int = 0) -> CheckResult | None:
    """The verdict on one output of a value-graded exercise (a tensor or a Raised); None when it matches the
    reference."""
    name = ex.name
    if isinstance(got, Raised):
        return _raised(ex, got, f"It was called with {_describe(inputs)}. ")
    if not isinstance(got, torch.Tensor):
        return CheckResult(name, FAILED, "the grading procedure returned no tensor.", ex.hint)
    if got.shape != want.shape:
        return CheckResult(name, FAILED, f"wrong shape: expected {tuple(want.shape)}, got {tuple(got.shape)}.",
                           f"Inputs were {_describe(inputs)}. {ex.hint}")
    if not (got.is_floating_point() or got.is_complex()):
        got = got.double()
    if not torch.isfinite(got).all():
        return CheckResult(name, FAILED, f"your output contains {int((~torch.isfinite(got)).sum())} NaN/inf values.",
                           f"Inputs were {_describe(inputs)}. {ex.hint}")
    if not _close(got, want, ex):
        err = float((got.double() - want.double()).abs().max())
        specific = _matching_mistake(ex, inputs, got)
        return CheckResult(name, FAILED, f"values differ from the reference (max abs error {err:.3g}) "
                           f"on random test {trial + 1} of {ex.trials}.", specific or ex.hint)
    return None


def judge_task(ex: Exercise, task, outputs: list) -> CheckResult | None:
    """The verdict on a task of an exercise graded on behaviour, from what each call returned (a tensor, a
    procedure's dict of tensors, or a Raised) and from its oracles' logs; None when the behaviour is right."""
    for call, got in zip(task.calls, outputs):
        over = [o for o in call.oracles.values() if o.refused]
        if over:  # the oracle's own count, even if the function caught the error and returned something
            return CheckResult(ex.name, FAILED, f"your function asked {over[0].name} for more than the budget "
                               f"({over[0].budget_text}).", ex.hint)
        if isinstance(got, Raised):
            return _raised(ex, got, "")
    if len(outputs) != len(task.calls):
        return CheckResult(ex.name, FAILED, "the grader received no result for some calls of your function.", ex.hint)
    return ex.assess(task, outputs)


def passed(ex: Exercise) -> CheckResult:
    return CheckResult(ex.name, PASSED, ex.passed_message or f"matches the reference on {ex.trials} fresh random inputs.")


def reference_output(ex: Exercise, inputs: dict):
    """What the learner's output is compared with: the reference's output on these inputs."""
    return ex.reference(**_clone(inputs))


def _generator(seed: int | None) -> torch.Generator:
    return torch.Generator().manual_seed(secrets.randbits(62) if seed is None else seed)


def fresh_inputs(ex: Exercise, seed: int | None = None) -> list[dict]:
    """ex.trials input dicts from a generator seeded with `seed` (a secret random seed when None)."""
    gen = _generator(seed)
    return [ex.make_inputs(gen) for _ in range(ex.trials)]


def fresh_tasks(ex: Exercise, seed: int | None = None) -> list:
    """ex.trials tasks of an exercise graded on behaviour, drawn from `seed` (a secret random seed when None)."""
    gen = _generator(seed)
    return [ex.task(gen) for _ in range(ex.trials)]


def run_task(fn, task) -> list:
    """What the learner's function returns on each call of a task, with the task's own oracles (in this process)."""
    return [call_learner(fn, with_oracles(call.inputs, call.oracles), call.procedure) for call in task.calls]


def _names_used(fn, depth: int = 0, seen: set | None = None) -> set[str]:
    """The dotted names of the library objects `fn`'s code names, resolved in its globals at run time, following the
    notebook's own helper functions a few levels (what `check` can see quickly; the batch grader reads the whole
    notebook's source instead)."""
    import types

    seen = set() if seen is None else seen
    code, ns = getattr(fn, "__code__", None), getattr(fn, "__globals__", None)
    if code is None and callable(fn) and not isinstance(fn, types.BuiltinFunctionType):
        call = getattr(type(fn), "__call__", None)  # an instance of a class defined in the notebook
        code, ns = getattr(call, "__code__", None), getattr(call, "__globals__", None)
    if code is None or not isinstance(ns, dict) or id(code) in seen or depth > 3:
        return set()
    seen.add(id(code))
    cells = getattr(fn, "__closure__", None) or ()
    ns = {**ns, **{n: c.cell_contents for n, c in zip(code.co_freevars, cells) if _filled(c)}}
    names, todo = [], [code]
    while todo:
        c = todo.pop()
        names += list(c.co_names) + list(c.co_freevars)
        todo += [k for k in c.co_consts if isinstance(k, types.CodeType)]
    out = set()
    for n in names:
        obj = ns.get(n)
        if isinstance(obj, types.ModuleType):
            out |= {f"{obj.__name__}.{m}" for m in names if m != n and hasattr(obj, m)}
        elif getattr(obj, "__module__", None) == ns.get("__name__"):  # the notebook's own helper
            out |= _names_used(obj, depth + 1, seen)
        elif callable(obj) and isinstance(getattr(obj, "__module__", None), str):
            out.add(f"{obj.__module__}.{getattr(obj, '__qualname__', n)}")
    return out


def _filled(cell) -> bool:
    try:
        cell.cell_contents
        return True
    except ValueError:
        return False


def rule_verdict(ex: Exercise, fn) -> CheckResult | None:
    """`check`'s reading of the exercise's rules: a function that uses the course_lib function computing its answer,
    or a library the exercise refuses, fails with a message saying so (None when neither shows)."""
    module = getattr(fn, "__module__", None) or ""
    if module.startswith("course_lib.exercises"):
        return None  # the course's own references and known mistakes (the tests check them)
    try:
        used = _names_used(fn)
        if module.startswith("course_lib"):  # a library function handed over as it is
            used.add(f"{module}.{getattr(fn, '__qualname__', '')}")
    except Exception:  # a hostile object's attributes: nothing to say here
        return None
    answers = LIBRARY_EQUIVALENTS.get(ex.name, ())
    copied = sorted(u for u in used if u.startswith("course_lib.exercises")
                    or any(u == a or u.startswith(a + ".") for a in answers))
    if copied:
        return CheckResult(ex.name, FAILED, f"your function uses {copied[0]}, which computes this answer: the grader "
                           "gives 0 points for that.", "Write the computation yourself: that is the exercise.")
    refused = sorted(u for u in used if any(u == r or u.startswith(r + ".") for r in ex.refused))
    if refused:
        return CheckResult(ex.name, FAILED, f"your function uses {refused[0]}, which this exercise does not allow.",
                           ex.rule)
    return None


def run_check(name: str, fn, seed: int | None = None) -> CheckResult:
    """Grade fn against exercise `name` on fresh random inputs or tasks; returns a CheckResult and never raises."""
    ex = EXERCISES.get(name)
    if ex is None:
        return CheckResult(name, FAILED, f"there is no exercise called {name!r}.",
                           f"Known exercises: {', '.join(sorted(EXERCISES))}.")
    if not callable(fn):
        return CheckResult(name, FAILED, f"expected your function, got {type(fn).__name__}.",
                           f"Pass the function itself, without calling it: check({name!r}, {name}).")
    verdict = rule_verdict(ex, fn)
    if verdict is not None:
        return verdict
    if ex.on_behaviour:
        for task in fresh_tasks(ex, seed):
            verdict = judge_task(ex, task, run_task(fn, task))
            if verdict is not None:
                return verdict
        return passed(ex)
    for trial, inputs in enumerate(fresh_inputs(ex, seed)):
        verdict = judge(ex, inputs, reference_output(ex, inputs), call_learner(fn, inputs), trial)
        if verdict is not None:
            return verdict
    return passed(ex)


class Verdict:
    """What `check` returns: true when the exercise passed (`if check(...)`, `== True` work). It displays nothing in
    a notebook, because check has already printed the verdict (a bare True / False under it was noise)."""

    __slots__ = ("name", "passed")

    def __init__(self, name: str, passed: bool):
        self.name, self.passed = name, bool(passed)

    def __bool__(self) -> bool:
        return self.passed

    def __eq__(self, other):
        if isinstance(other, (bool, Verdict)):
            return self.passed == bool(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.passed)

    def __repr__(self) -> str:
        return f"Verdict({self.name!r}, passed={self.passed})"

    def _ipython_display_(self) -> None:  # IPython shows no Out[n] for an object that displays itself as nothing
        return None


class Score(NamedTuple):
    """What `progress` returns: (points, total), a plain tuple that displays nothing in a notebook (it printed)."""

    points: int
    total: int

    def _ipython_display_(self) -> None:
        return None


def check_seconds(name: str) -> float | None:
    """How long `check` lets an exercise's calls run in all: three times the grader's limit per call."""
    ex = EXERCISES.get(name)
    return None if ex is None else 3.0 * (ex.seconds or 20.0)


def check(name: str, fn) -> Verdict:
    """Check your function for exercise `name`: prints passed / failed with a hint / not attempted; returns a Verdict,
    true when it passed. A function still running after `check_seconds(name)` is stopped and fails."""
    limit = check_seconds(name)
    try:
        with time_limit(limit):
            result = run_check(name, fn)
    except TimeUp:
        result = CheckResult(str(name), FAILED, f"your function was still running after {limit:g} s, so the check "
                             "stopped it.", "Look for a loop whose condition never becomes false (a `while` whose "
                             "variable is never updated) or a loop over far more steps than the inputs have; a "
                             "correct solution finishes in seconds here.")
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # a bug in a reference must still not raise in a learner's face
        result = CheckResult(str(name), FAILED, f"the checker itself failed ({type(e).__name__}: {e}).",
                             "This is a bug in the course, not your code: please report it.")
    _RESULTS[result.name] = result
    if result.name in EXERCISES:
        _LAST_LESSON[:] = [EXERCISES[result.name].lesson]
    print(result)
    return Verdict(result.name, result.passed)


def progress(lesson: int | str | None = None) -> Score:
    """Print the exercises of one lesson with their status and points, as checked in this kernel (default: the lesson
    of the latest check; "all": one line per lesson), and where the whole course's standing is kept."""
    from .standing import show

    return show(lesson)


# ---- the exercises, one file per lesson (each registers its own; imported last, as they use the names above) ------

from . import lesson01, lesson2, lesson3, lesson4, lesson5, lesson6, lesson7, lesson8, lesson9, lesson10  # noqa: E402, F401, I001  (registration order)
from . import on_behaviour, on_training  # noqa: E402, F401, I001  (graded on training runs and loops)
from . import lesson11  # noqa: E402, F401, I001  (after the training exercises it builds on)
from . import lesson12  # noqa: E402, F401, I001
from . import lesson13, lesson13_inversion  # noqa: E402, F401, I001  (inversion is lesson 13's last exercise)
from . import lesson14  # noqa: E402, F401, I001
from . import lesson15  # noqa: E402, F401, I001
from .lesson01 import ref_alpha_bar_from_betas, ref_log_snr, ref_noise_images, ref_q_sample  # noqa: E402, F401
from .lesson2 import ref_eps_to_x0, ref_posterior_mean, ref_simple_loss  # noqa: E402, F401
from .lesson3 import ref_ddim_step, ref_heun_step, ref_karras_sigmas  # noqa: E402, F401
from .lesson4 import ref_discriminator_loss, ref_gaussian_elbo, ref_reparameterize  # noqa: E402, F401
from .lesson5 import ref_dpmpp_2m_coefficients  # noqa: E402, F401
from .lesson6 import ref_cfg_denoiser, ref_classifier_guided_score, ref_guided_sample_loop  # noqa: E402, F401
from .lesson7 import ref_cross_attention, ref_scale_latents, ref_text_guided_eps  # noqa: E402, F401
from .lesson8 import ref_adaln, ref_dit_block, ref_patchify, ref_unpatchify  # noqa: E402, F401
from .lesson9 import ref_dsm_loss, ref_flow_matching_loss, ref_ode_log_likelihood, ref_reverse_sde_step  # noqa: E402, F401
from .lesson10 import ref_absorbing_forward, ref_mdlm_weight, ref_unmask_sample  # noqa: E402, F401
from .lesson11 import ref_edm_coefficients, ref_edm_step, ref_posthoc_ema_weights  # noqa: E402, F401
from .lesson12 import ref_consistency_distillation_loss, ref_consistency_sample, ref_guided_teacher_step, ref_progressive_target  # noqa: E402, F401
from .lesson13 import ref_control_join, ref_lora_linear, ref_prior_preservation_loss, ref_textual_inversion_step  # noqa: E402, F401
from .lesson13_inversion import ref_ddim_invert  # noqa: E402, F401
from .lesson14 import ref_clip_score, ref_detect_copies, ref_esd_target, ref_kid  # noqa: E402, F401
from .lesson15 import ref_chunk_loss, ref_receding_horizon  # noqa: E402, F401
from . import on_images  # noqa: E402, F401, I001  (lesson 7's exercises graded on training runs)
from . import capstone  # noqa: E402, F401, I001  (the capstone, after every lesson)
from .on_behaviour import ELBO_GAP, MODE_SHARE, SAMPLE_HQ_FLOOR, TRAIN_HQ_FLOOR, assess_sample_loop, assess_train_step  # noqa: E402, F401, I001
from .on_behaviour import assess_vae_step, ref_sample_loop, ref_train_step, ref_vae_step  # noqa: E402, F401, I001
