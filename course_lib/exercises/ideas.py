"""Each lesson's central ideas and the graded exercises in which a learner implements them: what
`python -m course_lib exercises --summary` prints (the count of graded functions, and per lesson the share of its
central ideas a learner builds). An idea with no exercise is listed with () so that the gap shows."""
from __future__ import annotations

# lesson -> [(central idea, the exercises that implement it)]
IDEAS = {
    0: [("noise an image to a given level", ("noise_images",))],
    1: [("a noise schedule: alpha-bar from the betas", ("alpha_bar_from_betas",)),
        ("the closed-form forward sample q(x_t | x_0)", ("q_sample",)),
        ("the signal-to-noise ratio", ("log_snr",))],
    2: [("the simple (noise-prediction) loss", ("simple_loss",)),
        ("the forward posterior q(x_{t-1} | x_t, x_0) from the ELBO", ("posterior_mean",)),
        ("converting between eps, x0, v and score", ("eps_to_x0",)),
        ("the training step, graded on what it trains", ("train_step",)),
        ("loss weighting across noise levels", ())],
    3: [("a deterministic step: DDIM", ("ddim_step",)),
        ("a second-order step: Heun", ("heun_step",)),
        ("step spacing: Karras noise levels", ("karras_sigmas",)),
        ("a whole sampling loop within a budget of network calls", ("sample_loop",)),
        ("the ancestral (stochastic) DDPM sampler", ())],
    4: [("the VAE's reparameterisation", ("reparameterize",)),
        ("the VAE's evidence lower bound", ("gaussian_elbo", "vae_step")),
        ("the GAN's discriminator loss", ("discriminator_loss",)),
        ("a like-for-like comparison: same data, budget and seeds", ())],
    5: [("DPM-Solver++(2M)'s update as a fused kernel's arithmetic", ("dpmpp_2m_coefficients",)),
        ("a fused GPU kernel in Triton", ()),
        ("profiling where the time goes", ())],
    6: [("classifier-free guidance", ("cfg_denoiser",)),
        ("classifier guidance", ("classifier_guided_score",)),
        ("a guided sampling loop", ("guided_sample_loop",)),
        ("conditional training with label dropout", ("cond_train_step",)),
        ("inpainting with RePaint's resampling", ("repaint",)),
        ("SDEdit: noise part of the way, denoise back", ())],
    7: [("cross-attention from image to text", ("cross_attention",)),
        ("scaling latents to unit variance", ("scale_latents",)),
        ("text guidance with an empty caption", ("text_guided_eps",)),
        ("the KL autoencoder's training step", ("ae_step",)),
        ("the contrastive text-image loss", ("contrastive_loss",))],
    8: [("adaptive layer norm (adaLN-Zero)", ("adaln",)),
        ("patches in and out", ("patchify", "unpatchify")),
        ("a DiT block", ("dit_block",)),
        ("data-parallel training", ())],
    9: [("denoising score matching", ("dsm_loss",)),
        ("a step of the reverse SDE", ("reverse_sde_step",)),
        ("the flow-matching loss and training step", ("flow_matching_loss", "flow_step")),
        ("exact likelihood by the probability-flow ODE", ("ode_log_likelihood",)),
        ("reflow: straightening paths with coupled pairs", ())],
    10: [("the absorbing (masking) forward process", ("absorbing_forward",)),
         ("MDLM's loss weight and training step", ("mdlm_weight", "masked_step")),
         ("sampling by parallel unmasking", ("unmask_sample",))],
    11: [("EDM's preconditioning: unit variance in and out", ("edm_coefficients",)),
         ("the training noise distribution and the loss weighting, in one training step", ("edm_step",)),
         ("post-hoc EMA: any average rebuilt from saved ones", ("posthoc_ema_weights",)),
         ("zero terminal SNR: sampling from pure noise", ())],
    12: [("consistency distillation: a teacher's ODE step, an EMA target, the boundary condition",
          ("consistency_distillation_loss",)),
         ("multistep consistency sampling", ("consistency_sample",)),
         ("progressive distillation: one student step where the teacher takes two", ("progressive_target",)),
         ("adversarial distillation: a discriminator on one-step samples", ()),
         ("a latent consistency model with guidance folded in: the teacher's guided step", ("guided_teacher_step",))],
    13: [("a LoRA layer: the frozen weight plus a scaled low-rank update", ("lora_linear",)),
         ("DreamBooth's prior preservation: a concept from a few images without forgetting the old prompts",
          ("prior_preservation_loss",)),
         ("DDIM inversion: from an image to the noise that draws it", ("ddim_invert",)),
         ("textual inversion: learning one new word's embedding", ("textual_inversion_step",)),
         ("ControlNet: a trainable copy of the encoder joined by zero-initialised layers", ("control_join",))],
    14: [("KID: an unbiased estimate of the kernel distance between real and generated features", ("kid",)),
         ("memorisation: flagging copies of training images at a rate calibrated on held-out images",
          ("detect_copies",)),
         ("erasing a concept (ESD): fine-tuning towards guidance away from it", ("esd_target",)),
         ("text-image alignment: a CLIP score and where it disagrees with a judge", ("clip_score",))],
    15: [("a diffusion policy's loss: denoising a chunk of actions given the observation", ("chunk_loss",)),
         ("receding-horizon control: execute the first moves of each chunk, then ask again", ("receding_horizon",))],
    99: [("a text-to-shapes generator assembled from your own attention, training step and guided sampler",
          ("text_to_shapes",))],
}
CAPSTONE = 99  # shown as "capstone"


def lesson_name(lesson: int) -> str:
    """'capstone' for the capstone's number, else the lesson's number."""
    return "capstone" if lesson == CAPSTONE else str(lesson)


def summary_rows() -> list[dict]:
    """One row per lesson: its exercises, points, central ideas, and those a learner implements."""
    from . import EXERCISES

    rows = []
    for lesson in sorted({ex.lesson for ex in EXERCISES.values()} | set(IDEAS)):
        ideas = IDEAS.get(lesson, [])
        names = [n for n, ex in EXERCISES.items() if ex.lesson == lesson]
        built = [idea for idea, exercises in ideas if any(e in EXERCISES for e in exercises)]
        rows.append({"lesson": lesson, "exercises": len(names), "points": sum(EXERCISES[n].points for n in names),
                     "on_behaviour": sum(EXERCISES[n].on_behaviour for n in names), "ideas": len(ideas),
                     "built": len(built), "missing": [idea for idea, _ in ideas if idea not in built]})
    return rows


def summary_text(verbose: bool = False) -> str:
    rows = summary_rows()
    lines = [f"{'lesson':>8} {'graded functions':>16} {'on behaviour':>13} {'points':>7} {'central ideas built':>20}"]
    for r in rows:
        share = f"{r['built']} / {r['ideas']} ({r['built'] / r['ideas']:.0%})" if r["ideas"] else "-"
        lines.append(f"{lesson_name(r['lesson']):>8} {r['exercises']:>16} {r['on_behaviour']:>13} {r['points']:>7} {share:>20}")
        if verbose and r["missing"]:
            lines.append(f"{'':>8}not yet an exercise: {'; '.join(r['missing'])}")
    total_ideas, built = sum(r["ideas"] for r in rows), sum(r["built"] for r in rows)
    lines.append(f"{'all':>8} {sum(r['exercises'] for r in rows):>16} {sum(r['on_behaviour'] for r in rows):>13} "
                 f"{sum(r['points'] for r in rows):>7} {f'{built} / {total_ideas} ({built / total_ideas:.0%})':>20}")
    return "\n".join(lines)
