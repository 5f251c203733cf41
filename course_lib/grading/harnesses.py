"""Procedures that run a learner's function where the learner's code runs (the notebook, or the grader's worker).

The training exercises need a loop around the learner's step: a fresh small network, an optimizer, batches of the
task's data. That loop is all that runs here; it returns plain tensors (the losses and the trained weights), and the
verdict is made from them elsewhere (course_lib.exercises, in the grading parent), which loads the weights into a
network of its own and scores them on data the worker never saw. Each procedure is a few seconds on a laptop CPU.
"""
from __future__ import annotations

import math

import torch

from .tasks import BATCH, T_TRAIN, TRAIN_STEPS


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


class UnitTimeVelocity(torch.nn.Module):
    """The flow-matching exercise's network: model(x_t, t) with t in [0, 1], one per row (B,) or (B, 1), or one number
    for the batch; inside, a flow-prediction TimeMLP that takes t * FLOW_TIME_SCALE like the course's flow models."""

    def __init__(self, net):
        from ..samplers import FLOW_TIME_SCALE

        super().__init__()
        self.net, self.scale = net, FLOW_TIME_SCALE

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.ndim == 2 and t.shape[1] == 1:
            t = t[:, 0]
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must be one time per row, shape ({x.shape[0]},) or ({x.shape[0]}, 1), or one number; "
                             f"got shape {tuple(t.shape)}")
        if bool(((t < 0) | (t > 1)).any()):
            raise ValueError(f"this network takes times t in [0, 1] (t = 0 the data, t = 1 the noise); got values from "
                             f"{float(t.min()):.3g} to {float(t.max()):.3g}")
        return self.net(x, t * self.scale)


def flow_net(seed: int) -> UnitTimeVelocity:
    """The small velocity network the flow-matching-step exercise trains."""
    from ..nets import TimeMLP

    torch.manual_seed(seed)
    return UnitTimeVelocity(TimeMLP(dim=2, hidden=128, depth=3, temb_dim=32, prediction="flow"))


def edm_net(seed: int, sigma_data: float):
    """The EDM-step exercise's denoiser: model(x, sigma) = D(x, sigma), EDM's preconditioning (nets.EDMPrecond) around
    a small TimeMLP; model.sigma_data is the data's std it assumes."""
    from ..nets import EDMPrecond

    torch.manual_seed(seed)
    return EDMPrecond({"kind": "mlp", "dim": 2, "hidden": 128, "depth": 3, "temb_dim": 32}, sigma_data=sigma_data)


def train_edm(fn, seed: int, data: torch.Tensor, sigma_data: float, p_mean: float, p_std: float,
              steps: int = TRAIN_STEPS) -> dict:
    """Lesson 11: train the small EDM denoiser with the learner's edm_step(model, optimizer, x0, p_mean, p_std)."""
    return _train(fn, edm_net(seed, sigma_data), data, seed, steps, (p_mean, p_std))


class TokenMLP(torch.nn.Module):
    """The masked-diffusion exercise's network: rows of token ids (B, L) with [MASK] = mask_id -> logits (B, L,
    mask_id + 1) over every token, [MASK] included; an MLP on the one-hot row."""

    def __init__(self, length: int, mask_id: int, hidden: int = 256):
        super().__init__()
        self.length, self.tokens = length, mask_id + 1
        self.net = torch.nn.Sequential(torch.nn.Linear(length * self.tokens, hidden), torch.nn.SiLU(),
                                       torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
                                       torch.nn.Linear(hidden, length * self.tokens))

    def forward(self, x):
        x = torch.as_tensor(x)
        if x.ndim != 2 or x.shape[1] != self.length or x.is_floating_point():
            raise ValueError(f"the network takes rows of token ids, an integer tensor of shape (B, {self.length}); got "
                             f"{x.dtype} of shape {tuple(x.shape)}")
        if bool(((x < 0) | (x >= self.tokens)).any()):
            raise ValueError(f"token ids must lie in 0 .. {self.tokens - 1} (the last is [MASK])")
        one_hot = torch.nn.functional.one_hot(x.long(), self.tokens).float().flatten(1)
        return self.net(one_hot).view(x.shape[0], self.length, self.tokens)


def token_net(seed: int, length: int, mask_id: int) -> TokenMLP:
    """The small network the masked-diffusion-step exercise trains."""
    torch.manual_seed(seed)
    return TokenMLP(length, mask_id)


def train_alpha_bar() -> torch.Tensor:
    """The training-step exercise's alpha-bar: a cosine schedule of T_TRAIN steps, float32."""
    from ..schedules import NoiseSchedule

    return NoiseSchedule.named("cosine", T_TRAIN).alpha_bar.float().clone()


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


def _train(fn, model, data: torch.Tensor, seed: int, steps: int, extra: tuple, labels: torch.Tensor | None = None,
           batch: int = BATCH) -> dict:
    """Call fn(model, optimizer, x0, *extra) (with labels: fn(model, optimizer, x0, y, *extra)) on `steps` batches
    drawn from `data`; the losses and the final weights."""
    if not isinstance(data, torch.Tensor) or data.ndim < 2:
        raise TypeError("the training data must be a tensor of points, token rows or images")
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != data.shape[:1]):
        raise TypeError("the labels must be a tensor with one label per row of the data")
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed + 1)
    losses = []
    torch.manual_seed(seed + 2)  # the learner's own torch.randn / randint calls are reproducible too
    model.train()
    for step in range(steps):
        idx = torch.randint(len(data), (batch,), generator=gen)
        given = (data[idx],) if labels is None else (data[idx], labels[idx])
        losses.append(_as_loss(fn(model, optimizer, *given, *extra), step))
    out = {"losses": torch.tensor(losses, dtype=torch.float64)}
    out.update({f"param.{k}": v.detach().clone() for k, v in model.state_dict().items()})
    return out


def train_diffusion(fn, seed: int, data: torch.Tensor, steps: int = TRAIN_STEPS) -> dict:
    """Lesson 2: train the small denoiser with the learner's train_step(model, optimizer, x0, alpha_bar)."""
    return _train(fn, denoiser_net(seed), data, seed, steps, (train_alpha_bar(),))


def conditional_net(seed: int, num_classes: int):
    """The small class-conditional noise-prediction network of the label-dropout exercise (label num_classes = none)."""
    from ..nets import TimeMLP

    torch.manual_seed(seed)
    return TimeMLP(dim=2, hidden=128, depth=3, temb_dim=32, num_classes=num_classes)


def train_conditional(fn, seed: int, data: torch.Tensor, labels: torch.Tensor, null_label: int,
                      steps: int = TRAIN_STEPS) -> dict:
    """Lesson 6: train the conditional denoiser with cond_train_step(model, optimizer, x0, y, alpha_bar, null_label)."""
    return _train(fn, conditional_net(seed, null_label), data, seed, steps, (train_alpha_bar(), null_label), labels)


def train_vae(fn, seed: int, data: torch.Tensor, steps: int = TRAIN_STEPS) -> dict:
    """Lesson 4: train the small VAE with the learner's vae_step(vae, optimizer, x)."""
    return _train(fn, vae_net(seed), data, seed, steps, ())


def train_flow(fn, seed: int, data: torch.Tensor, steps: int = TRAIN_STEPS) -> dict:
    """Lesson 9: train the small velocity network with the learner's flow_step(model, optimizer, x0)."""
    return _train(fn, flow_net(seed), data, seed, steps, ())


def train_masked(fn, seed: int, data: torch.Tensor, mask_id: int, steps: int = TRAIN_STEPS) -> dict:
    """Lesson 10: train the small token network with the learner's masked_step(model, optimizer, x0, mask_id)."""
    return _train(fn, token_net(seed, data.shape[1], mask_id), data, seed, steps, (mask_id,))


class SmallKLAutoencoder(torch.nn.Module):
    """The autoencoder exercise's network, with the API of course_lib.nets.KLAutoencoder: encode(x) -> (mean, logvar)
    of q(z | x) over (B, 2, H/2, W/2), logvar clamped to [-30, 20]; decode(z) -> images; forward(x, sample=True) ->
    (reconstruction, mean, logvar). Two convolutions each way, so that 2,000 steps take seconds."""

    def __init__(self, channels: int = 32, z_channels: int = 2):
        super().__init__()
        nn = torch.nn
        self.z_channels = z_channels
        self.encoder = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.SiLU(),
                                     nn.Conv2d(channels, channels, 4, stride=2, padding=1), nn.SiLU(),
                                     nn.Conv2d(channels, 2 * z_channels, 3, padding=1))
        self.decoder = nn.Sequential(nn.Conv2d(z_channels, channels, 3, padding=1), nn.SiLU(),
                                     nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1), nn.SiLU(),
                                     nn.Conv2d(channels, 3, 3, padding=1))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3 or x.shape[2] % 2 or x.shape[3] % 2:
            raise ValueError(f"encode takes images of shape (B, 3, H, W), H and W even; got {getattr(x, 'shape', x)}")
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if not isinstance(z, torch.Tensor) or z.ndim != 4 or z.shape[1] != self.z_channels:
            raise ValueError(f"decode takes latents of shape (B, {self.z_channels}, h, w); got {getattr(z, 'shape', z)}")
        return self.decoder(z)

    def forward(self, x: torch.Tensor, sample: bool = True):
        mean, logvar = self.encode(x)
        z = mean + (0.5 * logvar).exp() * torch.randn_like(mean) if sample else mean
        return self.decode(z), mean, logvar


def autoencoder_net(seed: int) -> SmallKLAutoencoder:
    torch.manual_seed(seed)
    return SmallKLAutoencoder()


def train_autoencoder(fn, seed: int, data: torch.Tensor, kl_weight: float, steps: int | None = None) -> dict:
    """Lesson 7: train the small KL autoencoder with the learner's ae_step(ae, optimizer, x, kl_weight)."""
    from .image_tasks import AE_BATCH, AE_STEPS

    return _train(fn, autoencoder_net(seed), data, seed, steps or AE_STEPS, (kl_weight,), batch=AE_BATCH)


class SmallCLIP(torch.nn.Module):
    """The contrastive exercise's two encoders: image(x) maps vectors (B, dim) to features (B, 16), text(tokens) maps
    two-token captions (B, 2) to features (B, 16); scale() is the learned logit scale exp(log_scale), at most 100."""

    def __init__(self, dim: int, tokens: int, width: int = 64, out: int = 16):
        super().__init__()
        nn = torch.nn
        self.image = nn.Sequential(nn.Linear(dim, width), nn.SiLU(), nn.Linear(width, out))
        self.embed = nn.Embedding(tokens, width)
        self.text_head = nn.Sequential(nn.SiLU(), nn.Linear(width, out))
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text_head(self.embed(tokens).sum(1))

    def scale(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=100.0)


def clip_nets(seed: int, dim: int, tokens: int) -> SmallCLIP:
    torch.manual_seed(seed)
    return SmallCLIP(dim, tokens)


def fit_contrastive(fn, seed: int, images: torch.Tensor, captions: torch.Tensor, concepts: torch.Tensor,
                    steps: int | None = None) -> dict:
    """Lesson 7: fit the two small encoders for `steps` batches of distinct concepts (one image each) by minimising
    the learner's contrastive_loss(image_features, text_features, scale); the losses and the final weights."""
    from .image_tasks import CLIP_BATCH, CLIP_STEPS

    model = clip_nets(seed, images.shape[1], int(captions.max()) + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    by_concept = [torch.nonzero(concepts == c).flatten() for c in range(int(concepts.max()) + 1)]
    gen = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed + 2)
    losses = []
    for step in range(steps or CLIP_STEPS):
        chosen = torch.randperm(len(by_concept), generator=gen)[:CLIP_BATCH].tolist()
        idx = torch.stack([by_concept[c][torch.randint(len(by_concept[c]), (1,), generator=gen)][0] for c in chosen])
        loss = fn(model.image(images[idx]), model.text(captions[idx]), model.scale())
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
            raise TypeError(f"contrastive_loss returned {type(loss).__name__} at step {step}; return the loss as a "
                            "single-number tensor that autograd can differentiate (not .item(), not detached)")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    out = {"losses": torch.tensor(losses, dtype=torch.float64)}
    out.update({f"param.{k}": v.detach().clone() for k, v in model.state_dict().items()})
    return out


def capstone_attention(fn, **inputs) -> dict:
    """The capstone: the learner's cross_attention (from the parts their function returns) on random inputs."""
    from ..capstone import as_parts

    out = as_parts(fn).cross_attention(**inputs)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"cross_attention returned {type(out).__name__}; return a tensor of shape (B, N, C)")
    return {"out": out}


def train_capstone(fn, seed: int, steps: int, n_train: int, prompt_seed: int, n_prompts: int) -> dict:
    """The capstone: train the small text-to-shapes network with the learner's attention and step (course_lib.capstone
    .train), then sample the prompts with the learner's guided loop; the losses, the latents and the EMA weights."""
    from .. import capstone as C

    parts = C.as_parts(fn)
    kit = C.Kit()
    net, losses = C.train(parts, steps, kit, n_train=n_train, seed=seed, progress=False)
    latents = C.generate(net, parts.sample_loop, C.prompts(n_prompts, prompt_seed), kit, seed=seed)
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"sample_loop returned {type(latents).__name__}; return the latents x after the last step")
    out = {"losses": torch.tensor(losses, dtype=torch.float64), "latents": latents.detach().float()}
    out.update({f"param.{k}": v.detach().clone() for k, v in net.state_dict().items()})
    return out


PROCEDURES = {"train_edm": train_edm, "capstone_attention": capstone_attention, "train_capstone": train_capstone, "train_autoencoder": train_autoencoder, "fit_contrastive": fit_contrastive, "train_diffusion": train_diffusion, "train_vae": train_vae, "train_flow": train_flow,
              "train_masked": train_masked, "train_conditional": train_conditional}
