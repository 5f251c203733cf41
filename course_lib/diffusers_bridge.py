"""Hugging Face Diffusers models through the course's sampler interface: a diffusers `UNet2DModel`,
`UNet2DConditionModel` (Stable Diffusion's) or `DiTTransformer2DModel` with its scheduler becomes a course model
`model(x_t, t, y=None, context=None, mask=None)` and a NoiseSchedule, so lesson 3's samplers and lesson 6's guidance
run on it unchanged. diffusers is imported only by the caller: this module needs nothing but the objects it is given."""
from __future__ import annotations

import torch
from torch import nn

from .schedules import NoiseSchedule

PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}  # diffusers' prediction_type -> ours


def schedule_from_scheduler(scheduler) -> NoiseSchedule:
    """The discrete schedule a diffusers scheduler was configured with (its `betas`), as a NoiseSchedule."""
    betas = getattr(scheduler, "betas", None)
    if betas is None:
        raise TypeError(f"{type(scheduler).__name__} has no `betas`: pass a discrete-time diffusers scheduler "
                        "(DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler, ...)")
    return NoiseSchedule(torch.as_tensor(betas, dtype=torch.float64), name=f"diffusers {type(scheduler).__name__}")


class DiffusersModel(nn.Module):
    """A diffusers network seen as a course denoiser network: model(x_t, t, y=None, context=None, mask=None).

    y goes to `class_labels`, context / mask to `encoder_hidden_states` / `encoder_attention_mask` (SD's UNet); an
    output with twice the input's channels (a learned variance, as DiT-XL/2 has) is cut to its first half."""

    def __init__(self, net: nn.Module, prediction: str):
        super().__init__()
        if prediction not in PREDICTIONS.values():
            raise ValueError(f"prediction must be one of {sorted(PREDICTIONS.values())}, got {prediction!r}")
        self.net, self.prediction = net, prediction
        self.config = {"kind": "diffusers", "class": type(net).__name__, "prediction": prediction}

    def forward(self, x: torch.Tensor, t, y=None, context=None, mask=None) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        kwargs = {}
        if y is not None:
            kwargs["class_labels"] = torch.as_tensor(y, device=x.device).long()
        if context is not None:
            kwargs["encoder_hidden_states"] = context
            if mask is not None:
                kwargs["encoder_attention_mask"] = mask.to(x.dtype)
        name = type(self.net).__name__
        if name == "UNet2DConditionModel" and context is None:
            raise ValueError("a UNet2DConditionModel needs context= (the text encoder's states; the empty prompt's "
                             "for the unconditional prediction)")
        out = self.net(x, t, **kwargs, return_dict=False)[0]
        if out.shape[1] == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]
        if out.shape != x.shape:
            raise ValueError(f"{name} returned shape {tuple(out.shape)} for an input of shape {tuple(x.shape)}")
        return out


def from_diffusers(net: nn.Module, scheduler) -> tuple[DiffusersModel, NoiseSchedule]:
    """(model, schedule) for `samplers.sample(model, noise, schedule, ...)` from a diffusers network and scheduler;
    the prediction type is the scheduler's `prediction_type` (epsilon, v_prediction or sample)."""
    kind = getattr(getattr(scheduler, "config", None), "prediction_type", "epsilon")
    if kind not in PREDICTIONS:
        raise ValueError(f"unsupported prediction_type {kind!r}; the course knows {sorted(PREDICTIONS)}")
    return DiffusersModel(net, PREDICTIONS[kind]).eval(), schedule_from_scheduler(scheduler)


def dit_to_diffusers(model: nn.Module):
    """A course DiT (class-conditional, MLP ratio 4, no cross-attention) as a diffusers `DiTTransformer2DModel` with
    the same weights: the patch embedding's Linear becomes diffusers' strided conv, the shared time and label
    embedding is copied into every block (diffusers gives each its own), q / k / v are split out of PyTorch's
    attention. `save_pretrained(folder)` on the result writes a model `DiTTransformer2DModel.from_pretrained` loads."""
    import diffusers

    cfg = getattr(model, "config", {})
    if cfg.get("kind") != "dit":
        raise TypeError(f"expected a course_lib DiT, got {cfg.get('kind') or type(model).__name__}")
    if not cfg["num_classes"] or cfg["context_dim"] or cfg["mlp_ratio"] != 4:
        raise ValueError("diffusers' DiTTransformer2DModel is class-conditional with an MLP ratio of 4 and no "
                         f"cross-attention; this DiT has num_classes={cfg['num_classes']}, context_dim="
                         f"{cfg['context_dim']}, mlp_ratio={cfg['mlp_ratio']}")
    d, p, c = cfg["hidden"], cfg["patch"], cfg["in_channels"]
    out = diffusers.DiTTransformer2DModel(
        num_attention_heads=cfg["heads"], attention_head_dim=d // cfg["heads"], in_channels=c, out_channels=c,
        num_layers=cfg["depth"], sample_size=cfg["image_size"], patch_size=p, num_embeds_ada_norm=cfg["num_classes"],
        norm_eps=1e-6)
    src = {k: v.detach() for k, v in model.state_dict().items()}
    sd = {"pos_embed.proj.weight": src["embed.weight"].reshape(d, p, p, c).permute(0, 3, 1, 2),
          "pos_embed.proj.bias": src["embed.bias"],
          "proj_out_1.weight": src["ada.1.weight"], "proj_out_1.bias": src["ada.1.bias"],
          "proj_out_2.weight": src["out.weight"], "proj_out_2.bias": src["out.bias"]}
    for i in range(cfg["depth"]):
        b, o = f"blocks.{i}.", f"transformer_blocks.{i}."
        q, k, v = src[b + "attn.in_proj_weight"].chunk(3)
        qb, kb, vb = src[b + "attn.in_proj_bias"].chunk(3)
        sd.update({
            o + "norm1.emb.timestep_embedder.linear_1.weight": src["time.0.weight"],
            o + "norm1.emb.timestep_embedder.linear_1.bias": src["time.0.bias"],
            o + "norm1.emb.timestep_embedder.linear_2.weight": src["time.2.weight"],
            o + "norm1.emb.timestep_embedder.linear_2.bias": src["time.2.bias"],
            o + "norm1.emb.class_embedder.embedding_table.weight": src["labels.embed.weight"],
            o + "norm1.linear.weight": src[b + "ada.1.weight"], o + "norm1.linear.bias": src[b + "ada.1.bias"],
            o + "attn1.to_q.weight": q, o + "attn1.to_k.weight": k, o + "attn1.to_v.weight": v,
            o + "attn1.to_q.bias": qb, o + "attn1.to_k.bias": kb, o + "attn1.to_v.bias": vb,
            o + "attn1.to_out.0.weight": src[b + "attn.out_proj.weight"],
            o + "attn1.to_out.0.bias": src[b + "attn.out_proj.bias"],
            o + "ff.net.0.proj.weight": src[b + "mlp.0.weight"], o + "ff.net.0.proj.bias": src[b + "mlp.0.bias"],
            o + "ff.net.2.weight": src[b + "mlp.2.weight"], o + "ff.net.2.bias": src[b + "mlp.2.bias"]})
    missing, unexpected = out.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not m.startswith("pos_embed.pos_embed")]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping incomplete: missing {missing}, unexpected {unexpected}")
    return out.eval()
