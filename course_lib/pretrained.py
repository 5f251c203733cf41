"""A real pretrained text-to-image model (Stable Diffusion 1.5, Rombach et al. 2022, from the Hugging Face Hub)
sampled by the course's DPM-Solver++(2M) (Lu et al. 2022) and classifier-free guidance (Ho & Salimans 2022, eq. 6),
next to the pipeline's own scheduler with the same noise, timesteps and guidance scale.

Downloading needs internet and `transformers` (Colab has both); a GPU makes it take seconds, not minutes. Offline,
`tiny_pipeline` builds the same diffusers StableDiffusionPipeline class from a tiny configuration with random weights
(no download), so that `side_by_side` runs, and is tested, anywhere: its images are noise, but the agreement between
the two samplers is measured the same way."""
from __future__ import annotations

import socket
import time

import torch

SD_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # the Hub's copy of runwayml's SD 1.5 (about 2 GB in fp16)
DEFAULT_PROMPT = "a watercolor painting of a lighthouse on a cliff at sunset"


def hub_reachable(host: str = "huggingface.co", port: int = 443, timeout: float = 3.0) -> bool:
    """True when a TCP connection to the Hub opens within `timeout` seconds (offline: False, never an exception)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def unavailable_reason(need_gpu: bool = True) -> str | None:
    """Why the pretrained section cannot run here (no GPU, no transformers, no route to the Hub), or None."""
    import importlib.util

    if need_gpu and not torch.cuda.is_available():
        return ("no CUDA GPU (SD 1.5 takes minutes per image on a CPU); on Colab: Runtime > Change runtime type > "
                "GPU, then run this cell again")
    if importlib.util.find_spec("transformers") is None:
        return "the `transformers` package is missing (pip install transformers); Colab has it"
    if not hub_reachable():
        return "huggingface.co cannot be reached (offline); the weights (about 2 GB) download from there"
    return None


def tiny_pipeline(seed: int = 0, device=None):
    """A diffusers StableDiffusionPipeline with SD 1.5's structure and scheduler settings at a tiny size and random
    weights (seeded): a 2-level UNet2DConditionModel with cross-attention on 16x16x4 latents, an AutoencoderKL from
    and to 32x32 images, a 2-layer CLIP text encoder and a character-level CLIP tokenizer written to a temporary
    folder. Nothing is downloaded; it needs diffusers and transformers."""
    import json
    import tempfile

    try:
        import diffusers
        import transformers
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    except ImportError as e:
        raise ImportError(f"the tiny pipeline needs diffusers and transformers ({e}): pip install diffusers "
                          "transformers") from None
    transformers.utils.logging.set_verbosity_error()  # its notices about image processors SD does not use here
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  norm_num_groups=8, sample_size=32)
    folder = tempfile.mkdtemp(prefix="tiny_sd_tokenizer_")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    with open(f"{folder}/vocab.json", "w") as f:
        json.dump(vocab, f)
    with open(f"{folder}/merges.txt", "w") as f:
        f.write("#version: 0.2\n")  # no merges: one token per character, as a tiny BPE vocabulary allows
    tokenizer = CLIPTokenizer(f"{folder}/vocab.json", f"{folder}/merges.txt", model_max_length=77,
                              pad_token="<|endoftext|>")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    scheduler = diffusers.DPMSolverMultistepScheduler(  # SD 1.5's noise schedule, DPM-Solver++(2M)
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        algorithm_type="dpmsolver++", solver_order=2)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch.device(device or "cpu"))


def load_pipeline(model_id: str = SD_MODEL, device=None):
    """The diffusers StableDiffusionPipeline for `model_id` (fp16 on a GPU), its scheduler replaced by diffusers'
    DPMSolverMultistepScheduler (DPM-Solver++(2M)) configured from the model's own scheduler config."""
    try:
        import diffusers
        import transformers  # noqa: F401  (the CLIP text encoder and tokenizer)
    except ImportError as e:
        raise ImportError(f"the pretrained section needs diffusers and transformers ({e}); on Colab both are "
                          "installed; elsewhere: pip install diffusers transformers") from None
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(model_id, torch_dtype=dtype, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config,
                                                                       algorithm_type="dpmsolver++", solver_order=2)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def guided_sample(unet, scheduler, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, steps: int,
                  scale: float) -> torch.Tensor:
    """Latents sampled by the course's DPM-Solver++(2M) on a diffusers UNet2DConditionModel, with classifier-free
    guidance at `scale`, on the timesteps `scheduler.set_timesteps(steps)` picks (so that diffusers' own loop on
    the same scheduler is the like-for-like comparison). cond / uncond: the prompt's and the empty prompt's text
    states, (B, L, D) and (1 or B, L, D)."""
    from .diffusers_bridge import from_diffusers
    from .samplers import as_denoiser, sample
    from .text2image import caption_guidance

    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    model, schedule = from_diffusers(unet, scheduler)
    scheduler.set_timesteps(steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    b, length = latents.shape[0], cond.shape[1]
    mask = torch.ones(b, length, dtype=torch.bool, device=latents.device)  # CLIP's padded states are all used, as SD
    denoiser = caption_guidance(as_denoiser(model, schedule), scale, uncond[:1], mask[:1])
    return sample(denoiser, latents, schedule, "dpmpp_2m", timesteps=timesteps, stable=False,
                  model_kwargs={"context": cond, "mask": mask}).x


def _to_images(pipe, latents: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        images = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
    return ((images.float() + 1) / 2).clamp(0, 1).cpu()


def side_by_side(pipe, prompt: str = DEFAULT_PROMPT, steps: int = 20, scale: float = 7.5, seed: int = 0,
                 images: int = 1) -> dict:
    """The same prompt, noise, timesteps and guidance scale through the pipeline's own call and through the course's
    sampler: {'theirs', 'ours': (N, 3, H, W) images in [0, 1], 'max_abs_diff' between them (pixels), 'seconds_theirs',
    'seconds_ours'}."""
    device = pipe.unet.device
    side = pipe.unet.config.sample_size
    shape = (images, pipe.unet.config.in_channels, side, side)
    g = torch.Generator("cpu").manual_seed(seed)
    latents = (torch.randn(shape, generator=g) * pipe.scheduler.init_noise_sigma).to(device, pipe.unet.dtype)
    cond, uncond = pipe.encode_prompt([prompt] * images, device, 1, True, [""] * images)
    start = time.perf_counter()
    theirs = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=latents.clone(), num_inference_steps=steps,
                  guidance_scale=scale, output_type="latent").images
    seconds_theirs = time.perf_counter() - start
    start = time.perf_counter()
    ours = guided_sample(pipe.unet, pipe.scheduler, latents.clone(), cond, uncond, steps, scale)
    seconds_ours = time.perf_counter() - start
    a, b = _to_images(pipe, theirs), _to_images(pipe, ours)
    return {"theirs": a, "ours": b, "max_abs_diff": float((a - b).abs().max()), "seconds_theirs": seconds_theirs,
            "seconds_ours": seconds_ours, "prompt": prompt, "steps": steps, "scale": scale}
