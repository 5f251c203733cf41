"""The first stage of latent diffusion: train the KL autoencoder on shapes images, measure its reconstructions
(PSNR, the attribute classifier on them) and its latent scale factor (Rombach et al. 2022, sec. 3 and app. G)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import checkpoints as ckpt_io
from .attributes import dataset
from .nets import KLAutoencoder
from .nets.autoencoder import kl_to_standard_normal, psnr

AE_CONFIG = dict(base=32, mults=[1, 2, 2], z_channels=4, num_res=1)  # factor 4: 32x32x3 -> 8x8x4, 12x fewer numbers


def train_autoencoder(steps: int = 3000, n_train: int = 20_000, batch_size: int = 64, lr: float = 1e-3,
                      kl_weight: float = 1e-5, seed: int = 0, progress: bool = True, **config):
    """Minimise ||x - D(z)||^2 + kl_weight KL(q(z|x) || N(0, I)), z ~ q(z|x) (the LDM objective without its
    perceptual and adversarial terms, which 32x32 flat-colour shapes do not need); returns (model, card)."""
    from .fit import fit

    torch.manual_seed(seed)
    ae = KLAutoencoder(**{**AE_CONFIG, **config})
    images = dataset(n_train, "train", seed)[0]
    g = torch.Generator().manual_seed(seed)

    def loss_fn(step):
        x = images[torch.randint(len(images), (batch_size,), generator=g)]
        recon, mean, logvar = ae(x, generator=g)
        mse, kl = F.mse_loss(recon, x), kl_to_standard_normal(mean, logvar)
        return mse + kl_weight * kl, {"mse": mse, "kl": kl}

    ae, log = fit(ae, loss_fn, steps, lr=lr, ema=0.999, desc="autoencoder", progress=progress)
    card = {"steps": steps, "seed": seed, "train_images": n_train, "kl_weight": kl_weight,
            "train_seconds": round(log["seconds"], 1), "factor": ae.factor, "z_channels": ae.config["z_channels"],
            "final_mse": round(sum(log["losses"][-100:]) / len(log["losses"][-100:]), 6)}
    card.update(measure(ae, images[:5000]))
    return ae, card


@torch.no_grad()
def encode(ae: KLAutoencoder, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """The posterior means of a batch of images (the latents diffusion is trained on, before scaling)."""
    return torch.cat([ae.encode(images[i:i + batch])[0] for i in range(0, len(images), batch)])


@torch.no_grad()
def decode(ae: KLAutoencoder, latents: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([ae.decode(latents[i:i + batch]) for i in range(0, len(latents), batch)]).clamp(-1, 1)


@torch.no_grad()
def measure(ae: KLAutoencoder, train_images: torch.Tensor, n_test: int = 1000) -> dict:
    """Held-out PSNR (test split, and the held-out colour-shape pairs), the scale factor 1 / std of the training
    latents that makes them unit-variance (SD's 0.18215 is this number for its autoencoder), and the shipped
    attribute classifier's accuracy on real test images and on their reconstructions."""
    z = encode(ae, train_images)
    out = {"latent_std": round(z.std().item(), 4), "latent_mean": round(z.mean().item(), 4),
           "scale_factor": round(1.0 / z.std().item(), 5)}
    for split in ("test", "heldout"):
        x = dataset(n_test, split, 0)[0]
        out[f"psnr_{split}"] = round(psnr(decode(ae, encode(ae, x)), x).mean().item(), 2)
    try:  # what the attribute classifier reads on reconstructions vs the real test images
        from .attributes import accuracy, load_attribute_classifier
        clf = load_attribute_classifier()
    except FileNotFoundError:
        return out
    x, _, labels = dataset(n_test, "test", 0)
    out["classifier_real"] = accuracy(clf, x, labels)
    out["classifier_reconstructed"] = accuracy(clf, decode(ae, encode(ae, x)), labels)
    return out


def load_autoencoder(path=None) -> tuple[KLAutoencoder, float]:
    """The shipped autoencoder (data/shapes_ae.pt) in eval mode, and its latent scale factor."""
    loaded = ckpt_io.load_model(path or ckpt_io.shipped_dir() / "shapes_ae.pt")
    return loaded.model, float(loaded.card["scale_factor"])
