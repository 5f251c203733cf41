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


def _conv_or_linear(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], -1) if weight.ndim == 4 else weight  # a 1x1 conv is a Linear


def unet_to_diffusers(model: nn.Module, sample_size: int | None = None):
    """A course UNet (course_lib.nets.UNet) as a diffusers `UNet2DModel` with the same weights. The two are the same
    DDPM architecture (Ho et al. 2020, app. B), block for block: [cos, sin] time features with no frequency shift,
    a two-layer time MLP, GroupNorm-SiLU-conv residual blocks with the time embedding added after the first conv,
    attention (one fused 1x1 q/k/v conv here, three Linear layers there) at the lowest resolution and in the middle,
    strided-conv downsampling, nearest-neighbour upsampling and a conv. The label table ('no label' included)
    becomes `class_embedding`: call the export with class_labels = num_classes for the unconditional prediction.
    `sample_size` (the image side) is what diffusers' pipelines draw noise for; the network itself takes any size."""
    import diffusers

    cfg = getattr(model, "config", {})
    if cfg.get("kind") != "unet":
        raise TypeError(f"expected a course_lib UNet, got {cfg.get('kind') or type(model).__name__}")
    from .nets.unet import _groups

    base, mults, num_res, heads, groups = cfg["base"], cfg["mults"], cfg["num_res"], cfg["heads"], cfg["groups"]
    channels = [base * m for m in mults]
    if any(_groups(c, groups) != groups for c in channels + [base]) or any(
            _groups(c + s, groups) != groups for c in channels for s in channels + [base]):
        raise ValueError(f"diffusers uses {groups} GroupNorm groups everywhere; this UNet's channel counts "
                         f"({channels}) are not all divisible by {groups}")
    last = len(mults) - 1
    out = diffusers.UNet2DModel(
        in_channels=cfg["in_channels"], out_channels=cfg["in_channels"], block_out_channels=tuple(channels),
        layers_per_block=num_res, norm_num_groups=groups, attention_head_dim=channels[-1] // heads,
        down_block_types=tuple("AttnDownBlock2D" if i == last else "DownBlock2D" for i in range(len(mults))),
        up_block_types=tuple("AttnUpBlock2D" if i == 0 else "UpBlock2D" for i in range(len(mults))),
        num_class_embeds=cfg["num_classes"] + 1 if cfg["num_classes"] else None, time_embedding_type="positional",
        flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5, act_fn="silu", downsample_padding=1,
        sample_size=sample_size)
    src = {k: v.detach() for k, v in model.state_dict().items()}
    sd = {"time_embedding.linear_1.weight": src["time.0.weight"], "time_embedding.linear_1.bias": src["time.0.bias"],
          "time_embedding.linear_2.weight": src["time.2.weight"], "time_embedding.linear_2.bias": src["time.2.bias"],
          "conv_in.weight": src["stem.weight"], "conv_in.bias": src["stem.bias"],
          "conv_norm_out.weight": src["out.0.weight"], "conv_norm_out.bias": src["out.0.bias"],
          "conv_out.weight": src["out.2.weight"], "conv_out.bias": src["out.2.bias"]}
    if cfg["num_classes"]:
        sd["class_embedding.weight"] = src["labels.embed.weight"]

    def resnet(ours: str, theirs: str):
        names = {"norm1": "norm1", "conv1": "conv1", "emb": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
                 "skip": "conv_shortcut"}
        for a, b in names.items():
            for p in ("weight", "bias"):
                if f"{ours}.{a}.{p}" in src:
                    sd[f"{theirs}.{b}.{p}"] = src[f"{ours}.{a}.{p}"]

    def attention(ours: str, theirs: str):
        sd[f"{theirs}.group_norm.weight"], sd[f"{theirs}.group_norm.bias"] = src[f"{ours}.norm.weight"], \
            src[f"{ours}.norm.bias"]
        for name, w, b in zip(("to_q", "to_k", "to_v"), _conv_or_linear(src[f"{ours}.qkv.weight"]).chunk(3),
                              src[f"{ours}.qkv.bias"].chunk(3)):
            sd[f"{theirs}.{name}.weight"], sd[f"{theirs}.{name}.bias"] = w, b
        sd[f"{theirs}.to_out.0.weight"] = _conv_or_linear(src[f"{ours}.proj.weight"])
        sd[f"{theirs}.to_out.0.bias"] = src[f"{ours}.proj.bias"]

    i = 0  # walk our down path: per level num_res blocks [ResBlock, (attention)], then a strided conv
    for level in range(len(mults)):
        for r in range(num_res):
            resnet(f"down.{i}.0", f"down_blocks.{level}.resnets.{r}")
            if level == last:
                attention(f"down.{i}.1", f"down_blocks.{level}.attentions.{r}")
            i += 1
        if level != last:
            sd[f"down_blocks.{level}.downsamplers.0.conv.weight"] = src[f"down.{i}.weight"]
            sd[f"down_blocks.{level}.downsamplers.0.conv.bias"] = src[f"down.{i}.bias"]
            i += 1
    resnet("mid.0", "mid_block.resnets.0")
    attention("mid.1", "mid_block.attentions.0")
    resnet("mid.2", "mid_block.resnets.1")
    i = 0
    for k, level in enumerate(reversed(range(len(mults)))):
        for r in range(num_res + 1):
            resnet(f"up.{i}.0", f"up_blocks.{k}.resnets.{r}")
            if level == last:
                attention(f"up.{i}.1", f"up_blocks.{k}.attentions.{r}")
            i += 1
        if level != 0:
            sd[f"up_blocks.{k}.upsamplers.0.conv.weight"] = src[f"up.{i}.1.weight"]
            sd[f"up_blocks.{k}.upsamplers.0.conv.bias"] = src[f"up.{i}.1.bias"]
            i += 1
    missing, unexpected = out.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weight mapping incomplete: missing {missing}, unexpected {unexpected}")
    return out.eval()


def to_diffusers_scheduler(schedule: NoiseSchedule, prediction: str = "eps", clip: bool = False, **kwargs):
    """diffusers' DPMSolverMultistepScheduler (DPM-Solver++(2M), Lu et al. 2022) on exactly this schedule's betas
    (`trained_betas`), so that diffusers samples a course model on the noise levels it was trained with. clip=True
    clips each x0 prediction to [-1, 1] like the course's `clip=1.0` (diffusers' thresholding, Saharia et al. 2022,
    with sample_max_value=1 is exactly that clipping): for pixel models of data in [-1, 1]."""
    import diffusers

    theirs = {v: k for k, v in PREDICTIONS.items()}
    if prediction not in theirs:
        raise ValueError(f"prediction must be one of {sorted(theirs)}, got {prediction!r}")
    if not isinstance(clip, bool):
        raise TypeError(f"clip must be True or False (clipping to [-1, 1]), got {clip!r}")
    if clip:
        kwargs = {"thresholding": True, "sample_max_value": 1.0, **kwargs}
    return diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=schedule.T, trained_betas=schedule.betas.double().cpu().numpy(),
        prediction_type=theirs[prediction], **{"algorithm_type": "dpmsolver++", "solver_order": 2, **kwargs})


def export_pipeline(model: nn.Module, schedule: NoiseSchedule, folder, image_size: int, force: bool = False,
                    clip: bool = True):
    """Write an unconditional course UNet and its schedule as a diffusers `DDPMPipeline` folder (model_index.json,
    unet/, scheduler/ with DPM-Solver++(2M) on the model's betas) that `DDPMPipeline.from_pretrained(folder)` loads
    and samples; an existing folder is replaced only with force=True. clip (default, as the course's own sampling of
    image models) clips each x0 prediction to [-1, 1]: without it few-step samples of a small model saturate.
    Returns the pipeline."""
    import shutil
    from pathlib import Path

    import diffusers

    folder = Path(folder)
    if getattr(model, "config", {}).get("num_classes"):
        raise ValueError("a DDPMPipeline is unconditional; for a class-conditional UNet save "
                         "unet_to_diffusers(model) with save_pretrained and pass class_labels when calling it")
    if folder.exists():
        if not force:
            raise FileExistsError(f"{folder} exists; pass force=True to replace it")
        shutil.rmtree(folder)
    # "leading" spacing: the best of diffusers' spacings for the shipped digits UNet at 10 and 20 steps (bench export)
    scheduler = to_diffusers_scheduler(schedule, getattr(model, "prediction", "eps"), clip=clip,
                                       timestep_spacing="leading")
    pipe = diffusers.DDPMPipeline(unet=unet_to_diffusers(model, image_size), scheduler=scheduler)
    pipe.save_pretrained(folder)
    return pipe
