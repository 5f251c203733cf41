"""Lesson 10's two text models in use: masked diffusion's loss and likelihood bound (MDLM, Sahoo et al. 2024, eq. 10)
and its parallel unmasking sampler (their ancestral sampler, sec. 3.3; or MaskGIT's most-confident-first order, Chang
et al. 2022), beside the autoregressive baseline's exact likelihood and left-to-right sampler.

Both models read and write the caption token rows of course_lib.captions (length MAX_WORDS, padded); both give
[MASK] probability zero (discrete.subs_log_probs), so their likelihoods are over the same set of sequences.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from .captions import MASK_ID, VOCAB_SIZE
from .discrete import SCHEDULES, alpha, corpus_denoiser, mask_tokens, mdlm_loss, subs_log_probs

BOS_ID = MASK_ID       # the autoregressive model's start token: an id no caption holds
ORDERS = ("random", "confidence", "ancestral")
TEXT_FAMILIES = ("masked_diffusion", "autoregressive")


def _check_tokens(tokens: torch.Tensor, name: str = "tokens", masks: bool = False, top: int | None = None
                  ) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be integer token ids of shape (n, length), got "
                        f"{getattr(tokens, 'shape', type(tokens).__name__)}")
    top = top if top is not None else VOCAB_SIZE if masks else MASK_ID
    if ((tokens < 0) | (tokens >= top)).any():
        raise ValueError(f"{name} must hold ids in [0, {top})" + ("" if masks else " ([MASK] is not a caption token)"))
    return tokens.long()


def _generator(seed) -> torch.Generator:
    return seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))


def low_discrepancy_times(n: int, generator: torch.Generator | None = None, eps: float = 1e-3) -> torch.Tensor:
    """n times in [eps, 1] spread evenly with one random offset (MDLM's low-discrepancy sampler, Sahoo et al. 2024,
    sec. 3.5): the same expectation as uniform draws, much less variance from the 1/t weight."""
    u = torch.rand(1, generator=generator, dtype=torch.float64)
    t = (u + torch.arange(n, dtype=torch.float64) / n) % 1
    return eps + (1 - eps) * t


# ---- masked diffusion --------------------------------------------------------------------------------------------

def masked_diffusion_loss(model, x0: torch.Tensor, masking: str = "linear",
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """The training loss: MDLM's negative ELBO (discrete.mdlm_loss) at one t per caption, in nats per token."""
    x0 = _check_tokens(x0, "x0").to(_device(model))
    t = low_discrepancy_times(len(x0), generator)
    xt = mask_tokens(x0, t, MASK_ID, masking, generator)            # on x0's device
    logp = subs_log_probs(model(xt), MASK_ID)
    return mdlm_loss(logp, x0, xt, t, MASK_ID, masking).mean() / x0.shape[1]


@torch.no_grad()
def masked_bound(model, tokens: torch.Tensor, n_t: int = 64, masking: str = "linear", seed: int = 0,
                 batch: int = 4096, mask_id: int = MASK_ID) -> torch.Tensor:
    """The negative ELBO of each caption in nats, an upper bound on -log p(x): the time integral of eq. 10 estimated
    with n_t stratified times per caption (time j in [j/n_t, (j+1)/n_t)). Another vocabulary: tokens 0 .. mask_id - 1
    and [MASK] = mask_id."""
    tokens = _check_tokens(tokens, top=mask_id)
    if not isinstance(n_t, int) or n_t < 1:
        raise ValueError(f"n_t must be a positive int, got {n_t!r}")
    g = _generator(seed)
    rows = tokens.repeat_interleave(n_t, 0)
    strata = torch.arange(n_t, dtype=torch.float64).repeat(len(tokens))
    t = (1e-4 + (1 - 1e-4) * (strata + torch.rand(len(rows), generator=g, dtype=torch.float64)) / n_t)
    out = []
    for x0, tt in zip(rows.split(batch), t.split(batch)):
        xt = mask_tokens(x0, tt, mask_id, masking, g)
        logp = subs_log_probs(model(xt.to(_device(model))), mask_id).cpu()
        out.append(mdlm_loss(logp, x0, xt, tt, mask_id, masking).double())
    return torch.cat(out).reshape(len(tokens), n_t).mean(1)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _sample(logp: torch.Tensor, temperature: float, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per position from log-probabilities (..., K) at a temperature: (tokens, their probabilities)."""
    probs = torch.softmax(logp / temperature, dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    tok = torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
    return tok, probs.gather(-1, tok.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def sample_masked(model, n: int | None = None, steps: int | None = None, order: str = "random", masking: str = "linear",
                  temperature: float = 1.0, seed=0, prompt: torch.Tensor | None = None, length: int | None = None,
                  progress: bool = False, return_steps: bool = False):
    """Parallel unmasking: start from all [MASK] (or from `prompt`, whose [MASK] positions are filled and the rest kept)
    and reveal tokens over `steps` model calls from t = 1 to 0; each revealed token is drawn from the model.

    How many tokens a step reveals follows the masking schedule: after the step from t to s, a share 1 - alpha(s) of
    the tokens to fill is still masked. order="random": that many, rounded down, stay masked and the rest are revealed
    at uniformly random positions (steps = length reveals one token per step: exact sampling for an exact denoiser);
    order="confidence": the positions whose drawn token the model gives the highest probability are revealed first
    (MaskGIT, Chang et al. 2022); order="ancestral": MDLM's ancestral sampler (Sahoo et al. 2024, sec. 3.3), each
    masked token revealed independently with probability (alpha(s) - alpha(t)) / (1 - alpha(t)), so the count per step
    is random. The last step reveals everything: no [MASK] is ever returned. The default, steps=None, is one step per
    token to fill with the random order: lesson 10's recommendation (as valid as the AR model, the most diverse).
    return_steps=True returns (tokens, steps_at): the step (0-based) at which each position was drawn, -1 where the
    prompt gave it; positions that share a step were drawn independently of each other.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if masking not in SCHEDULES:
        raise ValueError(f"masking must be one of {SCHEDULES}, got {masking!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive int (or None: one step per token), got {steps!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if prompt is None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int (or give a prompt), got {n!r}")
        length = length or model.config["max_len"]
        x = torch.full((n, length), MASK_ID, dtype=torch.long)
    else:
        x = _check_tokens(prompt, "prompt", masks=True).clone()
    drawn_at = torch.full(x.shape, -1, dtype=torch.long)
    g = _generator(seed)
    device = _device(model)
    to_fill = (x == MASK_ID).sum(1)                          # per row: how many tokens this call generates
    steps = steps or max(int(to_fill.max()), 1)
    times = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    loop = range(steps)
    if progress:
        from tqdm.auto import tqdm
        loop = tqdm(loop, desc=f"unmask ({order})", unit="step")
    for k in loop:
        masked = x == MASK_ID
        if not masked.any():
            break
        t, s = times[k], times[k + 1]
        logp = subs_log_probs(model(x.to(device)), MASK_ID).cpu()
        tok, conf = _sample(logp, temperature, g)
        if order == "ancestral":
            p = 1.0 if k == steps - 1 else float((alpha(s, masking) - alpha(t, masking)) / (1 - alpha(t, masking)))
            reveal = masked & (torch.rand(x.shape, generator=g, dtype=torch.float64) < p)
        else:
            still = 0 if k == steps - 1 else float((1 - alpha(s, masking)) / (1 - alpha(1.0, masking)))
            keep = torch.floor(to_fill * still + 1e-9).long()          # masked tokens left after this step, per row
            count = (masked.sum(1) - keep).clamp(min=0)
            score = torch.rand(x.shape, generator=g) if order == "random" else conf.float()
            score = torch.where(masked, score, torch.full_like(score, -1.0))
            rank = score.argsort(1, descending=True).argsort(1)
            reveal = masked & (rank < count.unsqueeze(1))
        x = torch.where(reveal, tok, x)
        drawn_at[reveal] = k
    return (x, drawn_at) if return_steps else x


class ExactDenoiser(torch.nn.Module):
    """The exact denoiser of a corpus (discrete.corpus_denoiser) as a masked-diffusion 'network': token rows ->
    log-probabilities (n, L, K), so the samplers and the bound take it like a trained model."""

    def __init__(self, corpus: torch.Tensor):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # gives the samplers a device
        self.config = {"kind": "exact", "max_len": corpus.shape[1], "causal": False}
        self.denoise = corpus_denoiser(corpus, VOCAB_SIZE, MASK_ID)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.denoise(tokens.cpu()).clamp_min(1e-300).log().to(self.anchor.device)


# ---- the autoregressive baseline ----------------------------------------------------------------------------------

def shift_right(tokens: torch.Tensor) -> torch.Tensor:
    """The autoregressive model's input: [BOS] then every token but the last (logit i predicts token i)."""
    return torch.cat([torch.full_like(tokens[:, :1], BOS_ID), tokens[:, :-1]], 1)


def _autoregressive_nll(model, tokens: torch.Tensor) -> torch.Tensor:
    """Per caption, on the model's device (differentiable)."""
    tokens = _check_tokens(tokens).to(_device(model))
    logp = subs_log_probs(model(shift_right(tokens)), MASK_ID)
    return -logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).double().sum(1)


def autoregressive_nll(model, tokens: torch.Tensor) -> torch.Tensor:
    """-log p(x) = -sum_i log p(x_i | x_<i) of each caption in nats, exact (one causal pass); on the CPU."""
    return _autoregressive_nll(model, tokens).cpu()


def autoregressive_loss(model, x0: torch.Tensor) -> torch.Tensor:
    """The training loss: next-token cross-entropy in nats per token (on the model's device)."""
    return _autoregressive_nll(model, x0).mean() / x0.shape[1]


@torch.no_grad()
def sample_autoregressive(model, n: int | None = None, temperature: float = 1.0, seed=0,
                          prompt: torch.Tensor | None = None, length: int | None = None) -> torch.Tensor:
    """Left to right, one model call per token. With `prompt`, its non-[MASK] tokens are kept (forced) and only its
    [MASK] positions drawn: each from the tokens to its left only, the right context unseen (what 'an autoregressive
    model cannot infill directly' means)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if prompt is None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int (or give a prompt), got {n!r}")
        prompt = torch.full((n, length or model.config["max_len"]), MASK_ID, dtype=torch.long)
    x = _check_tokens(prompt, "prompt", masks=True).clone()
    g = _generator(seed)
    for i in range(x.shape[1]):
        todo = x[:, i] == MASK_ID
        if not todo.any():
            continue
        logp = subs_log_probs(model(shift_right(x)[:, :i + 1].to(_device(model)))[:, -1], MASK_ID).cpu()
        tok, _ = _sample(logp, temperature, g)
        x[:, i] = torch.where(todo, tok, x[:, i])
    return x


# ---- either model ------------------------------------------------------------------------------------------------

def bits_per_token(nats: torch.Tensor, length: int) -> float:
    """Nats per caption -> bits per token (caption positions, padding included, as both models predict them)."""
    return float(nats.mean()) / length / math.log(2)


def load_text_model(name_or_path: str | Path = "captions_mdlm", device=None):
    """A shipped text model ('captions_mdlm', 'captions_ar') or a checkpoint file: (model, config, card), eval mode."""
    from .checkpoints import SHIPPED, load_model, shipped_dir

    path = Path(name_or_path)
    if str(name_or_path) in SHIPPED:
        path = shipped_dir() / f"{name_or_path}.pt"
    elif not path.exists():
        raise ValueError(f"no shipped model or file called {str(name_or_path)!r}; the shipped text models are "
                         f"{[m for m in SHIPPED if m.startswith('captions')]}")
    loaded = load_model(path, device)
    if loaded.config.get("family") not in TEXT_FAMILIES:
        raise ValueError(f"{path} holds a {loaded.config.get('family', 'diffusion')!r} model, not a text model "
                         f"({' or '.join(TEXT_FAMILIES)})")
    return loaded


def generate(loaded, n: int, steps: int | None = None, order: str = "random", seed=0, temperature: float = 1.0,
             prompt: torch.Tensor | None = None) -> torch.Tensor:
    """Sample from a loaded text model of either family (steps and order apply to masked diffusion only)."""
    if loaded.config["family"] == "autoregressive":
        return sample_autoregressive(loaded.model, n, temperature, seed, prompt)
    return sample_masked(loaded.model, n, steps, order, loaded.config.get("masking", "linear"), temperature, seed,
                         prompt)


@torch.no_grad()
def nll_bits(loaded, tokens: torch.Tensor, n_t: int = 64, seed: int = 0) -> float:
    """Bits per token: the exact NLL of an autoregressive model, the bound of a masked-diffusion model."""
    if loaded.config["family"] == "autoregressive":
        return bits_per_token(autoregressive_nll(loaded.model, tokens), tokens.shape[1])
    return bits_per_token(masked_bound(loaded.model, tokens, n_t, loaded.config.get("masking", "linear"), seed),
                          tokens.shape[1])


def evaluate_text(loaded, n: int = 1000, steps: int = 10, seed: int = 0, n_t: int = 64) -> dict:
    """What a text model's card records: the quality of n samples (validity, distinct, unseen; masked diffusion with
    `steps` random-order steps) and bits per token on n test captions (exact for AR, the bound for diffusion)."""
    from .captions import caption_corpus, text_quality
    from .data import CAPTION_CORPUS, DataSource

    training = set(DataSource("captions").texts)
    quality = text_quality(generate(loaded, n, steps=steps, seed=seed), training)
    test, _ = caption_corpus(n, "test", seed=1)
    return {**quality, "steps": steps if loaded.config["family"] == "masked_diffusion" else test.shape[1],
            "bits_per_token": round(nll_bits(loaded, test, n_t, seed), 4), "corpus": CAPTION_CORPUS}
