"""Fixed procedures that run a learner's function for the exercises graded on behaviour, not on equality.

A harness runs where the learner's code runs (the notebook, or the grader's confined worker) and returns only plain
tensors: the losses and the trained weights, or the samples. The verdict is computed from those tensors by
`course_lib.exercises` (in the grader: in the parent process, with its own copy of the library), so the learner's
code never gets to touch the code that samples or scores. Every procedure is small enough for a laptop CPU: a few
seconds each.
"""
from __future__ import annotations

import math

import torch

# The tasks: a random 2D Gaussian mixture (a ring of K modes, randomly rotated) and a short training budget.
TRAIN_STEPS = 2000
BATCH = 256
T_TRAIN = 100
SAMPLE_POINTS = 1000


def task_mixture(k: int, angle: float, radius: float = 1.0, std: float = 0.08):
    """The exercise's data: k equal Gaussians on a ring of `radius`, rotated by `angle` radians."""
    from ..data import GaussianMixture2D, ring_of_gaussians

    ring = ring_of_gaussians(k, radius, std)
    c, s = math.cos(angle), math.sin(angle)
    return GaussianMixture2D(ring.name, ring.modes @ torch.tensor([[c, s], [-s, c]]), std)


def denoiser_net(seed: int):
    """The small noise-prediction network the training-step exercise trains (the same one each time for a seed)."""
    from ..nets import TimeMLP

    torch.manual_seed(seed)
    return TimeMLP(dim=2, hidden=128, depth=3, temb_dim=32)


def vae_net(seed: int):
    """The small VAE the VAE-step exercise trains."""
    from ..nets import VAE

    torch.manual_seed(seed)
    return VAE(net="mlp", latent=2, dim=2, hidden=64, depth=2)


def _as_loss(value, step: int) -> float:
    """The loss the learner's step returned, as a float, or a clear error."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"your step returned a tensor of shape {tuple(value.shape)} at step {step}; return the "
                            "batch's loss, a single number (a 0-d tensor or loss.item())")
        return float(value.detach())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"your step returned {type(value).__name__} at step {step}; return the batch's loss (a number)")


def _train(fn, model, data, seed: int, steps: int, extra: tuple) -> dict:
    """Call fn(model, optimizer, x0, *extra) for `steps` batches of `data`; the losses and the final weights."""
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed + 1)
    losses = []
    torch.manual_seed(seed + 2)  # the learner's own torch.randn / randint calls are reproducible too
    model.train()
    for step in range(steps):
        losses.append(_as_loss(fn(model, optimizer, data.sample(BATCH, gen), *extra), step))
    out = {"losses": torch.tensor(losses, dtype=torch.float64)}
    out.update({f"param.{k}": v.detach().clone() for k, v in model.state_dict().items()})
    return out


def train_diffusion(fn, seed: int, k: int, angle: float, steps: int = TRAIN_STEPS) -> dict:
    """Lesson 2: train the small denoiser on the task's mixture with the learner's train_step(model, optimizer, x0,
    alpha_bar) for `steps` batches of BATCH points, on a linear schedule of T_TRAIN steps."""
    from ..schedules import NoiseSchedule

    schedule = NoiseSchedule.named("cosine", T_TRAIN)
    alpha_bar = schedule.alpha_bar.float().clone()
    return _train(fn, denoiser_net(seed), task_mixture(k, angle), seed, steps, (alpha_bar,))


def train_vae(fn, seed: int, k: int, angle: float, steps: int = TRAIN_STEPS) -> dict:
    """Lesson 4: train the small VAE on the task's mixture with the learner's vae_step(vae, optimizer, x)."""
    return _train(fn, vae_net(seed), task_mixture(k, angle), seed, steps, ())


class BudgetExceeded(RuntimeError):
    """The learner's sampler asked the denoiser for more evaluations than the budget allows."""


def sample_with_loop(fn, seed: int, k: int, angle: float, sigma_max: float, sigma_min: float, rho: float,
                     nfe: int) -> dict:
    """Lesson 3: the learner's sample_loop(denoise, x, sigmas) on the exact denoiser of the task's mixture, from
    x = sigma_max * noise over `nfe` Karras steps, allowed at most `nfe` calls of denoise."""
    from ..analytic import mixture_denoiser
    from ..step_schedules import karras_sigmas

    exact = mixture_denoiser(task_mixture(k, angle))
    calls = [0]

    def denoise(x, sigma):
        """D(x, sigma): the best estimate of the clean points x0 given noisy points x at noise level sigma."""
        calls[0] += 1
        if calls[0] > nfe:
            raise BudgetExceeded(f"denoise was called more than {nfe} times (the budget is {nfe} evaluations, "
                                 f"one per step of the {nfe} steps)")
        if not isinstance(x, torch.Tensor) or x.shape != (SAMPLE_POINTS, 2):
            raise ValueError(f"denoise expects the whole batch of points, shape ({SAMPLE_POINTS}, 2)")
        return exact(x, float(sigma)).float()

    sigmas = karras_sigmas(nfe, sigma_min, sigma_max, rho).float()
    x = torch.randn(SAMPLE_POINTS, 2, generator=torch.Generator().manual_seed(seed)) * sigmas[0]
    torch.manual_seed(seed + 1)  # a stochastic sampler's noise is reproducible
    out = fn(denoise, x.clone(), sigmas.clone())
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"sample_loop returned {type(out).__name__}; return the final points, a tensor")
    return {"samples": out.detach().float().clone(), "calls": torch.tensor(calls[0])}


GUIDE_K, GUIDE_STD = 6, 0.4  # lesson 6's task: six overlapping modes, so that guidance visibly changes the labels


def guided_sampling(fn, seed: int, angle: float, scale: float, nfe: int, sigma_max: float, sigma_min: float) -> dict:
    """Lesson 6: the learner's guided_sample_loop(denoise, x, sigmas, y, scale), run twice from the same noise, at
    scale 1 and at `scale`, on the exact class-conditional denoiser of a ring of GUIDE_K overlapping modes (the label
    is the mode), from x = sigma_max * noise over `nfe` Karras steps; in each run denoise may see at most 2 * nfe
    batches of points (a conditional and an unconditional one per step)."""
    from ..analytic import mixture_conditional_denoiser
    from ..step_schedules import karras_sigmas

    exact = mixture_conditional_denoiser(task_mixture(GUIDE_K, angle, std=GUIDE_STD))
    labels = torch.arange(SAMPLE_POINTS) % GUIDE_K
    sigmas = karras_sigmas(nfe, sigma_min, sigma_max, 7.0).float()
    noise = torch.randn(SAMPLE_POINTS, 2, generator=torch.Generator().manual_seed(seed)) * sigmas[0]
    out = {"labels": labels}
    for name, w in (("samples_1", 1.0), ("samples_w", float(scale))):
        seen = [0]

        def denoise(x, sigma, y=None):
            """D(x, sigma, y): the best estimate of the clean points given noisy x, for labels y (a tensor of ints
            in 0 .. K-1); y=None gives the unconditional estimate (the 'no label' prediction)."""
            if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != 2:
                raise ValueError(f"denoise expects points of shape (N, 2), got {getattr(x, 'shape', type(x).__name__)}")
            seen[0] += x.shape[0]
            if seen[0] > 2 * nfe * SAMPLE_POINTS:
                raise BudgetExceeded(f"denoise saw more than {2 * nfe} batches of {SAMPLE_POINTS} points (the budget: "
                                     f"one conditional and one unconditional evaluation per step of the {nfe} steps)")
            y = torch.full((x.shape[0],), GUIDE_K) if y is None else torch.as_tensor(y)
            if y.shape != (x.shape[0],) or y.is_floating_point() or bool(((y < 0) | (y > GUIDE_K)).any()):
                raise ValueError(f"y must be None or {x.shape[0]} integer labels in 0 .. {GUIDE_K} ({GUIDE_K}: no label)")
            return exact(x.double(), float(sigma), y=y).float()

        torch.manual_seed(seed + 1)  # a stochastic sampler's noise is reproducible
        got = fn(denoise, noise.clone(), sigmas.clone(), labels.clone(), w)
        if not isinstance(got, torch.Tensor):
            raise TypeError(f"guided_sample_loop returned {type(got).__name__}; return the final points, a tensor")
        out[name] = got.detach().float().clone()
    return out


TEXT_GUIDE_BATCH = 6


def text_guidance_task(seed: int):
    """Lesson 7's task: a small text-conditioned UNet and text encoder with random weights, six captions, noisy
    latents and timesteps (the same for a seed, in the worker and in the grader)."""
    from ..nets import TextEncoder, TextUNet
    from ..shapes import COLOURS, SHAPES, VOCAB, tokenize

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    unet = TextUNet(in_channels=4, base=16, mults=[1, 2], heads=2, groups=4, context_dim=16).eval()
    text = TextEncoder(len(VOCAB), dim=16, depth=1, heads=2).eval()
    with torch.no_grad():
        for p in unet.parameters():  # no zero-initialised layers: every input matters
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
        colours = list(COLOURS)
        prompts = [f"a {colours[int(torch.randint(6, (1,), generator=g))]} {SHAPES[int(torch.randint(4, (1,), generator=g))]}"
                   for _ in range(TEXT_GUIDE_BATCH)]
        context, mask = text(tokenize(prompts))
        null_context, null_mask = text(torch.zeros(1, tokenize(prompts).shape[1], dtype=torch.long))
    x = torch.randn(TEXT_GUIDE_BATCH, 4, 8, 8, generator=g)
    t = torch.randint(1, 1000, (TEXT_GUIDE_BATCH,), generator=g)
    return unet, {"x": x, "t": t, "context": context, "mask": mask, "null_context": null_context,
                  "null_mask": null_mask}


def text_guidance(fn, seed: int, scale: float) -> dict:
    """Lesson 7: the learner's text_guided_eps(model, x, t, context, mask, null_context, null_mask, scale) on the task
    of `seed`; the model may see at most 2B rows in all (one conditional and one empty-caption prediction each)."""
    unet, task = text_guidance_task(seed)
    seen = [0]

    def model(x, t, context=None, mask=None):
        """The noise prediction eps(x, t, context, mask) of the text-conditioned UNet."""
        if context is None or mask is None:
            raise ValueError("call model(x, t, context=..., mask=...): the UNet needs the caption's states and mask")
        seen[0] += x.shape[0]
        if seen[0] > 2 * TEXT_GUIDE_BATCH:
            raise BudgetExceeded(f"model saw more than {2 * TEXT_GUIDE_BATCH} rows: one conditional and one "
                                 "empty-caption prediction per image is all guidance needs")
        with torch.no_grad():
            return unet(x, t, context=context, mask=mask)

    got = fn(model, *(task[k].clone() for k in ("x", "t", "context", "mask", "null_context", "null_mask")), scale)
    if not isinstance(got, torch.Tensor):
        raise TypeError(f"text_guided_eps returned {type(got).__name__}; return the guided noise prediction, a tensor")
    return {"eps": got.detach().float().clone()}


UNMASK_SAMPLES, UNMASK_CORPUS = 500, 300  # lesson 10's task: 500 captions from the exact denoiser of 300 captions


def unmask_task(seed: int):
    """Lesson 10's task: a corpus of captions (lesson 7's grammar, a fresh draw per seed) and its exact masked-diffusion
    denoiser (course_lib.discrete.corpus_denoiser)."""
    from ..captions import MASK_ID, VOCAB_SIZE, caption_corpus
    from ..discrete import corpus_denoiser

    corpus, _ = caption_corpus(UNMASK_CORPUS, "train", seed=seed)
    return corpus, corpus_denoiser(corpus, VOCAB_SIZE, MASK_ID)


def sample_with_unmasking(fn, seed: int, steps: int) -> dict:
    """Lesson 10: the learner's unmask_sample(denoise, x, steps, mask_id) on the exact denoiser of the task's corpus,
    from UNMASK_SAMPLES rows of [MASK] only, allowed at most `steps` calls of denoise."""
    from ..captions import MASK_ID

    corpus, exact = unmask_task(seed)
    calls = [0]

    def denoise(x):
        """p(x0 | x): probabilities (n, L, K) of each position's clean token given partly masked token rows x (n, L);
        [MASK] has probability 0 everywhere, and a visible position's own token probability 1."""
        calls[0] += 1
        if calls[0] > steps:
            raise BudgetExceeded(f"denoise was called more than {steps} times (the budget: one call per step)")
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != (UNMASK_SAMPLES, corpus.shape[1]) \
                or x.is_floating_point() or bool(((x < 0) | (x > MASK_ID)).any()):
            raise ValueError(f"denoise expects the whole batch of token rows: integer ids in 0 .. {MASK_ID}, shape "
                             f"({UNMASK_SAMPLES}, {corpus.shape[1]})")
        return exact(x.long()).float()

    x = torch.full((UNMASK_SAMPLES, corpus.shape[1]), MASK_ID, dtype=torch.long)
    torch.manual_seed(seed + 1)  # the draws are reproducible
    out = fn(denoise, x.clone(), steps, MASK_ID)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"unmask_sample returned {type(out).__name__}; return the token rows, a tensor")
    return {"samples": out.detach().clone(), "calls": torch.tensor(calls[0])}
