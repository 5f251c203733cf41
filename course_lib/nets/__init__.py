"""The networks, and one registry that rebuilds any of them from its `.config` dict (the 'kind' key picks the class).

Denoisers are plain callables `model(x, t, y=None)`: x a batch, t integer (or fractional) timesteps of shape (B,) or a
scalar, y optional class labels; each carries `.config` (enough to rebuild it) and `.prediction`. The other families'
networks (lesson 4) take latents or samples. Checkpoints store the config, so a 'kind' is never renamed.
"""
from __future__ import annotations

from torch import nn

from .attribute_classifier import AttributeClassifier
from .autoencoder import KLAutoencoder
from .blocks import ConvDecoder, ConvEncoder, ResMLP, check_data_shape, timestep_embedding
from .consistency import ConsistencyNet
from .cross_attention import CrossAttention, TextUNet
from .dit import DiT, DiTBlock
from .edm_precond import EDMPrecond
from .gan import Discriminator, Generator
from .mlp import TimeMLP
from .noisy_classifier import NoisyClassifier
from .text_encoder import ImageEncoder, MiniCLIP, TextEncoder
from .token_transformer import TokenTransformer
from .unet import ResBlock, SelfAttention, UNet
from .unet1d import UNet1D
from .vae import VAE

# kind -> class. A new network registers here (and its module imports only torch, .blocks and the math it uses).
MODELS = {"mlp": TimeMLP, "unet": UNet, "generator": Generator, "discriminator": Discriminator, "vae": VAE,
          "noisy_classifier": NoisyClassifier, "kl_autoencoder": KLAutoencoder, "text_encoder": TextEncoder,
          "mini_clip": MiniCLIP, "text_unet": TextUNet, "attribute_classifier": AttributeClassifier, "dit": DiT,
          "token_transformer": TokenTransformer, "edm_precond": EDMPrecond,
          "consistency": ConsistencyNet, "unet1d": UNet1D}
DENOISERS = ("mlp", "unet", "dit", "text_unet", "unet1d")  # the kinds a diffusion model may use (text_unet: with context=)

__all__ = ["MODELS", "DENOISERS", "build_model", "count_parameters", "describe", "TimeMLP", "UNet", "ResBlock",
           "SelfAttention", "NoisyClassifier", "Generator", "Discriminator", "VAE", "ResMLP", "ConvEncoder", "ConvDecoder",
           "check_data_shape", "timestep_embedding", "KLAutoencoder", "TextEncoder", "ImageEncoder", "MiniCLIP",
           "CrossAttention", "TextUNet", "AttributeClassifier", "DiT", "DiTBlock", "TokenTransformer", "EDMPrecond",
           "ConsistencyNet", "UNet1D"]


def build_model(config: dict) -> nn.Module:
    """Rebuild a model from its `.config` dict (the 'kind' key picks the class)."""
    if not isinstance(config, dict) or config.get("kind") not in MODELS:
        raise ValueError(f"model config needs 'kind' in {sorted(MODELS)}, got {config!r}")
    kwargs = {k: v for k, v in config.items() if k != "kind"}
    try:
        return MODELS[config["kind"]](**kwargs)
    except TypeError as e:
        raise ValueError(f"bad model config {config!r}: {e}") from None


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def describe(model: nn.Module) -> str:
    """One line: the model's kind, its parameter count and its prediction type."""
    kind = model.config["kind"] if hasattr(model, "config") else type(model).__name__
    return f"{type(model).__name__} ({kind}): {count_parameters(model):,} parameters, predicts {getattr(model, 'prediction', '?')}"
