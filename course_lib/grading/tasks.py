"""The tasks of the exercises graded on behaviour: fresh random problems, their oracles, and what the verdict needs.

A task is drawn from a generator (a secret seed in the grader) out of families the course's own generators do not
produce: Gaussian mixtures with modes at random places (not the lessons' rings and grids), corpora of random token
rows (not the caption grammar), a text-conditioned network with random weights. A task is a list of calls of the
learner's function; each call has keyword inputs, in which `OracleRef(name)` stands for an oracle of that call, and
optionally a procedure (course_lib.grading.harnesses) that runs the learner's function, e.g. a training loop. What
the verdict needs (the mixture, the corpus, the reference output) is in `private`, which never leaves the process
that judges: the grading parent, or the notebook in `check`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .oracles import Oracle, OracleRef, as_float, as_points

SAMPLE_POINTS = 1000  # points per sampling call
TRAIN_STEPS, BATCH, POOL = 2000, 256, 65_536  # the training exercises: steps, batch size, points of data sent
T_TRAIN = 100  # the training-step exercise's cosine schedule
UNMASK_SAMPLES, UNMASK_CORPUS, UNMASK_LENGTH = 500, 300, 10
MASKED_POOL = 16_384  # rows of the Markov chain sent to the masked-diffusion training exercise
INPAINT_ROWS = 2000  # rows completed by the inpainting exercise, each with its own known coordinates


@dataclass
class Call:
    """One call of the learner's function: `fn(**inputs)` (or `procedure(fn, **inputs)`), with these oracles."""

    inputs: dict
    oracles: dict = field(default_factory=dict)
    procedure: str | None = None


@dataclass
class Task:
    calls: list
    private: dict = field(default_factory=dict)


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand(1, generator=gen, dtype=torch.float64))


def _randint(gen: torch.Generator, lo: int, hi: int) -> int:
    """An int in lo .. hi inclusive."""
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))


def scattered_modes(gen: torch.Generator, k: int, min_distance: float, radius: float) -> torch.Tensor:
    """k points uniformly in a disc of `radius`, placed one after another, each at least `min_distance` from those
    before it (random sequential placement: a candidate too close is drawn again; a placement that jams starts over,
    and after 100 such restarts the disc grows by 5%)."""
    for attempt in range(10_000):
        modes: list = []
        r_max = radius * 1.05 ** (attempt // 100)
        for _ in range(200 * k):
            r = r_max * float(torch.rand(1, generator=gen, dtype=torch.float64)) ** 0.5
            a = 2 * math.pi * float(torch.rand(1, generator=gen, dtype=torch.float64))
            p = torch.tensor([r * math.cos(a), r * math.sin(a)], dtype=torch.float64)
            if all(float((p - q).norm()) >= min_distance for q in modes):
                modes.append(p)
                if len(modes) == k:
                    return torch.stack(modes).float()
    raise RuntimeError(f"could not place {k} modes {min_distance} apart")


def separated_mixture(gen: torch.Generator):
    """4-7 equal Gaussians (std 0.06-0.09) at random places in a disc of radius 1.2, at least 9 std apart: every
    sample belongs to one mode."""
    from ..data import GaussianMixture2D

    k, std = _randint(gen, 4, 7), round(_uniform(gen, 0.06, 0.09), 4)
    return GaussianMixture2D(f"task{k}", scattered_modes(gen, k, 9 * std, 1.2), std)


def overlapping_mixture(gen: torch.Generator):
    """5-7 equal Gaussians (std 0.3-0.4) at random places in a disc of radius 1.1, 0.7-1.0 apart at least: they
    overlap, so the label (the mode a point came from) is uncertain and guidance changes it."""
    from ..data import GaussianMixture2D

    k, std = _randint(gen, 5, 7), round(_uniform(gen, 0.3, 0.4), 4)
    return GaussianMixture2D(f"overlap{k}", scattered_modes(gen, k, 2.4 * std, 1.1), std)


class MarkovChain:
    """Token rows from a first-order Markov chain over tokens 0 .. k-1 (initial distribution p0, transition matrix P):
    a data distribution whose exact entropy is known, for the masked-diffusion training exercise."""

    def __init__(self, p0: torch.Tensor, transition: torch.Tensor, length: int):
        self.p0, self.transition, self.length = p0.double(), transition.double(), length
        self.k = len(p0)

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor:
        x = torch.empty(n, self.length, dtype=torch.long)
        x[:, 0] = torch.multinomial(self.p0.float(), n, replacement=True, generator=gen)
        for i in range(1, self.length):
            x[:, i] = torch.multinomial(self.transition[x[:, i - 1]].float(), 1, generator=gen)[:, 0]
        return x

    def entropy(self) -> float:
        """The exact entropy of a row in nats: H(x_1) + sum over i of E[H(P[x_{i-1}])], with the marginals propagated."""
        def h(p):
            return -(p * p.clamp_min(1e-300).log()).sum(-1)
        marginal, total = self.p0, float(h(self.p0))
        rows = h(self.transition)
        for _ in range(1, self.length):
            total += float(marginal @ rows)
            marginal = marginal @ self.transition
        return total


def markov_chain(gen: torch.Generator) -> MarkovChain:
    """6-9 tokens, rows of 10-14: each transition row and the initial distribution a softmax of normal logits of scale
    2.5 (peaked, so the chain has structure for a network to learn)."""
    k, length = _randint(gen, 6, 9), _randint(gen, 10, 14)
    p0 = torch.softmax(2.5 * torch.randn(k, generator=gen, dtype=torch.float64), 0)
    transition = torch.softmax(2.5 * torch.randn(k, k, generator=gen, dtype=torch.float64), 1)
    return MarkovChain(p0, transition, length)


def random_corpus(gen: torch.Generator, n: int = UNMASK_CORPUS, length: int = UNMASK_LENGTH) -> torch.Tensor:
    """n rows of `length` tokens drawn uniformly from the caption vocabulary's words (not its grammar)."""
    from ..captions import MASK_ID

    return torch.randint(1, MASK_ID, (n, length), generator=gen)


# ---- the oracles' argument checks --------------------------------------------------------------------------------

def _points_and_level(n: int):
    def check(x, sigma):
        return as_points(x, n, "x"), as_float(sigma, "sigma")
    return check


def _labelled(k: int):
    def check(x, sigma, y=None):
        x, sigma = as_points(x, None, "x"), as_float(sigma, "sigma")
        y = torch.full((x.shape[0],), k) if y is None else torch.as_tensor(y)
        if y.shape != (x.shape[0],) or y.is_floating_point() or bool(((y < 0) | (y > k)).any()):
            raise ValueError(f"y must be None or {x.shape[0]} integer labels in 0 .. {k - 1}")
        return x, sigma, y.long()
    return check


# ---- the tasks -----------------------------------------------------------------------------------------------------

def sampling_task(gen: torch.Generator) -> Task:
    """Lesson 3: sample_loop(denoise, x, sigmas) on the exact denoiser of a fresh separated mixture, 8-10 Karras
    steps, one denoise call per step."""
    from ..analytic import mixture_denoiser
    from ..step_schedules import karras_sigmas

    mix = separated_mixture(gen)
    nfe = _randint(gen, 8, 10)
    sigmas = karras_sigmas(nfe, round(_uniform(gen, 0.01, 0.05), 4), round(_uniform(gen, 10, 30), 3), 7.0).float()
    x = torch.randn(SAMPLE_POINTS, 2, generator=gen) * sigmas[0]
    exact = mixture_denoiser(mix)
    denoise = Oracle("denoise", lambda x, sigma: exact(x, sigma).float(), _points_and_level(SAMPLE_POINTS), nfe,
                     budget_text=f"one call per step of the {nfe} steps", note=lambda a: a[1])
    return Task([Call({"denoise": OracleRef("denoise"), "x": x, "sigmas": sigmas}, {"denoise": denoise})],
                {"mixture": mix, "nfe": nfe, "sigmas": sigmas})


def guidance_task(gen: torch.Generator) -> Task:
    """Lesson 6: guided_sample_loop(denoise, x, sigmas, y, scale) on the exact class-conditional denoiser of a fresh
    overlapping mixture (the label is the mode), run at scale 1 and at a scale of 3-5 from the same noise, 15-25
    Karras steps, one conditional and one unconditional batch per step."""
    from ..analytic import mixture_conditional_denoiser
    from ..metrics import nearest_mode
    from ..step_schedules import karras_sigmas

    mix = overlapping_mixture(gen)
    k = len(mix.modes)
    nfe, scale = _randint(gen, 30, 40), round(_uniform(gen, 3, 5), 3)
    sigmas = karras_sigmas(nfe, round(_uniform(gen, 0.01, 0.03), 4), round(_uniform(gen, 10, 20), 3), 7.0).float()
    labels = torch.arange(SAMPLE_POINTS) % k
    noise = torch.randn(SAMPLE_POINTS, 2, generator=gen) * sigmas[0]
    exact = mixture_conditional_denoiser(mix)
    calls = []
    for w in (1.0, scale):
        oracle = Oracle("denoise", lambda x, sigma, y: exact(x, sigma, y=y).float(), _labelled(k),
                        2 * nfe * SAMPLE_POINTS, cost=lambda a: a[0].shape[0], note=lambda a: a[1],
                        budget_text=f"{2 * nfe} batches of {SAMPLE_POINTS} points: one conditional and one "
                                    f"unconditional evaluation per step of the {nfe} steps")
        calls.append(Call({"denoise": OracleRef("denoise"), "x": noise.clone(), "sigmas": sigmas.clone(),
                           "y": labels.clone(), "scale": w}, {"denoise": oracle}))
    # what sampling p(x | y) exactly gives: the share of each mode's own points that are nearest to it
    x, y = mix.sample(40_000, gen, return_labels=True)
    expected = float((nearest_mode(x, mix)[0] == y).float().mean())
    return Task(calls, {"mixture": mix, "labels": labels, "scale": scale, "nfe": nfe, "sigmas": sigmas,
                        "expected_accuracy": expected})


def inpainting_task(gen: torch.Generator) -> Task:
    """Lesson 6: repaint(denoise, known, mask, sigmas, resample) on the exact denoiser of a fresh Gaussian of correlated pairs (analytic.correlated_pairs_gaussian)
    (D(x, s) = m + S (S + s^2 I)^-1 (x - m)); INPAINT_ROWS rows, each with its own known half drawn from the Gaussian;
    40-50 Karras levels, 10-15 passes per level, one denoise call per level and pass. The oracle notes, per call, how
    far the known coordinates it sees lie from the known values, in units of the noise level."""
    from ..analytic import correlated_pairs_gaussian, gaussian_conditional, multivariate_gaussian_denoiser
    from ..step_schedules import karras_sigmas

    mean, cov, known = correlated_pairs_gaussian(gen)
    d = len(mean)
    n_steps, resample = _randint(gen, 40, 50), _randint(gen, 10, 15)
    sigmas = karras_sigmas(n_steps, round(_uniform(gen, 0.01, 0.02), 4), round(_uniform(gen, 10, 20), 3), 7.0).float()
    rows = mean + torch.randn(INPAINT_ROWS, d, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    mask = known.expand(INPAINT_ROWS, d).clone()
    values = torch.where(mask, rows, torch.zeros(())).float()  # the unknown coordinates are not sent

    gaussian = multivariate_gaussian_denoiser(mean, cov)

    def exact(x, sigma):
        return gaussian(x, sigma).float()

    def check(x, sigma):
        return as_points(x, INPAINT_ROWS, "x", dim=d), as_float(sigma, "sigma")

    def note(args):
        x, sigma = args
        gap = (x[:, known] - values[:, known].double()) / max(sigma, 1e-12)
        return sigma, float(gap.pow(2).mean().sqrt())

    denoise = Oracle("denoise", exact, check, n_steps * resample, note=note,
                     budget_text=f"one call per level and pass: {resample} passes of the {n_steps} levels")
    truth = gaussian_conditional(mean, cov, known, rows[:, known])
    return Task([Call({"denoise": OracleRef("denoise"), "known": values, "mask": mask, "sigmas": sigmas,
                       "resample": resample}, {"denoise": denoise})],
                {"mean": mean, "cov": cov, "known": known, "values": values, "truth": truth, "sigmas": sigmas,
                 "resample": resample})


def off_schedule(task: Task) -> list[str]:
    """What the denoiser oracle saw, as evidence for review: a sampler asked for noise levels that are not the task's
    schedule, or not in its order (every one-call-per-step sampler asks for the schedule's levels, largest first)."""
    levels = [float(s) for s in task.private["sigmas"][:-1]]
    out = []
    for call in task.calls:
        asked = call.oracles["denoise"].log
        if any(min(abs(a - s) for s in levels) > 1e-4 * max(a, 1e-3) for a in asked):
            out.append("asked the denoiser for noise levels that are not the schedule's (e.g. "
                       f"{next(a for a in asked if min(abs(a - s) for s in levels) > 1e-4 * max(a, 1e-3)):.4g})")
        elif any(b > a * (1 + 1e-6) for a, b in zip(asked, asked[1:])):
            out.append("asked the denoiser for the schedule's noise levels out of their order")
    return list(dict.fromkeys(out))


def unmasking_task(gen: torch.Generator) -> Task:
    """Lesson 10: unmask_sample(denoise, x, steps, mask_id) on the exact denoiser of a fresh corpus of random token
    rows, 10 steps, one denoise call per step."""
    from ..captions import MASK_ID, VOCAB_SIZE
    from ..discrete import corpus_denoiser

    corpus = random_corpus(gen)
    exact = corpus_denoiser(corpus, VOCAB_SIZE, MASK_ID)
    steps = UNMASK_LENGTH

    def check(x):
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != (UNMASK_SAMPLES, UNMASK_LENGTH) \
                or x.is_floating_point() or x.is_complex() or bool(((x < 0) | (x > MASK_ID)).any()):
            raise ValueError(f"denoise expects the whole batch of token rows: integer ids in 0 .. {MASK_ID}, shape "
                             f"({UNMASK_SAMPLES}, {UNMASK_LENGTH})")
        return (x.long(),)

    denoise = Oracle("denoise", lambda x: exact(x).float(), check, steps,
                     budget_text=f"one call per step of the {steps} steps")
    x = torch.full((UNMASK_SAMPLES, UNMASK_LENGTH), MASK_ID, dtype=torch.long)
    return Task([Call({"denoise": OracleRef("denoise"), "x": x, "steps": steps, "mask_id": MASK_ID},
                      {"denoise": denoise})], {"corpus": corpus, "steps": steps})


def conditional_training_task(gen: torch.Generator) -> Task:
    """Lesson 6: the conditional training procedure runs the learner's step TRAIN_STEPS times on labelled points of a
    fresh overlapping mixture (the label is the mode; label k, the number of modes, is 'no label'); the grader keeps
    the mixture, and what exact sampling of p(x | y) gives for the label accuracy."""
    from ..metrics import nearest_mode

    mix = overlapping_mixture(gen)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    x, y = mix.sample(POOL, gen, return_labels=True)
    check_x, check_y = mix.sample(40_000, gen, return_labels=True)
    expected = float((nearest_mode(check_x, mix)[0] == check_y).float().mean())
    inputs = {"seed": seed, "data": x, "labels": y, "null_label": len(mix.modes)}
    return Task([Call(inputs, procedure="train_conditional")],
                {"mixture": mix, "seed": seed, "expected_accuracy": expected})


def masked_training_task(gen: torch.Generator) -> Task:
    """Lesson 10: the masked-diffusion training procedure runs the learner's step TRAIN_STEPS times on rows of a fresh
    Markov chain (token k is [MASK]); the grader keeps the chain and scores the weights against its exact entropy."""
    chain = markov_chain(gen)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    inputs = {"seed": seed, "data": chain.sample(MASKED_POOL, gen), "mask_id": chain.k}
    return Task([Call(inputs, procedure="train_masked")], {"chain": chain, "seed": seed, "mask_id": chain.k})


def training_task(gen: torch.Generator, procedure: str) -> Task:
    """Lessons 2 and 4: a training procedure (course_lib.grading.harnesses) runs the learner's step TRAIN_STEPS times
    on batches of a fresh separated mixture's points; the grader keeps the mixture and scores the weights it returns."""
    mix = separated_mixture(gen)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    inputs = {"seed": seed, "data": mix.sample(POOL, gen)}
    return Task([Call(inputs, procedure=procedure)], {"mixture": mix, "seed": seed})
