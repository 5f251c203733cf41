"""Lesson 7's exercises graded on a training run: the KL autoencoder's training step (graded on the PSNR, the posterior
and the KL of what it trains on the grader's images) and CLIP's contrastive loss (graded on its value and on the
retrieval accuracy of two small encoders fitted with it).

Both run in the fixed procedures of course_lib.grading.harnesses on fresh tasks (course_lib.grading.image_tasks): the
weights come back here, are loaded into networks of the judge's own and scored on data the learner's code never saw.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..grading import harnesses as _H
from ..grading import image_tasks as _I
from . import FAILED, LIBRARY_EQUIVALENTS, CheckResult, Exercise, register
from .on_behaviour import _fake_loss_step, _trained_or_verdict

# Calibrated with `python -m course_lib bench exercises` (data/bench_exercises.json: the reference on 20 tasks, two
# honest variants on 10 each, each mistake on 5, each shortcut on 3; one thread, about 10 s per autoencoder check)
PSNR_FLOOR = 19.5  # held-out PSNR (dB) of decode(posterior mean): the reference 20.6-21.0; training on one image of
# each batch 17.4-18.3
SAMPLE_DROP = 2.0  # decoding a draw of q(z | x) may lose at most this many dB against the mean: the reference 0.1 at
# most; decoding the mean in training (no sampling) 9.5 or more
KL_CEILING = 7.0  # the KL to N(0, I) per latent element on held-out images: the reference 2.8-4.1; no KL term 11.4+
LOSS_RATIO = (0.8, 1.25)  # the mean of the last 200 reported losses over the loss the judge computes on held-out
# images: the reference 0.91-0.98; sums instead of means 157+
RETRIEVAL_FLOOR = 0.5  # top-1 retrieval among all the task's captions (36-64), each way, after the fit: the reference
# 0.69 at worst (image to caption) and 0.89 (caption to image); a detached or constant loss fits nothing


# ---- the KL autoencoder's training step ---------------------------------------------------------------------------

def ref_ae_step(ae, optimizer, x, kl_weight):
    """One step on the first stage of latent diffusion (Rombach et al. 2022, sec. 3 and app. G, without the perceptual
    and adversarial terms): z = mean + std * noise from q(z | x), the mean squared error of decode(z) against x plus
    kl_weight times KL(q(z | x) || N(0, I)) (Kingma & Welling 2014, app. B), both averaged over their elements."""
    mean, logvar = ae.encode(x)
    z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean()
    loss = F.mse_loss(ae.decode(z), x) + kl_weight * kl
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


def _ae_step_with(mistake: str):
    """The reference step with one usual mistake."""
    def step(ae, optimizer, x, kl_weight):
        mean, logvar = ae.encode(x)
        z = mean if mistake == "no sampling" else mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar)
        recon = ae.decode(z)
        if mistake == "sums":
            loss = ((recon - x) ** 2).flatten(1).sum(1).mean() + kl_weight * kl.flatten(1).sum(1).mean()
        else:
            sign = {"no KL": 0.0, "KL sign": -1.0}.get(mistake, 1.0)
            loss = F.mse_loss(recon, x) + sign * kl_weight * kl.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.detach()
    return step


def ae_measure(task, outputs: list) -> tuple[CheckResult | None, dict]:
    """(the verdict on a broken run, else None; what the judge measures on the held-out images): `psnr` of decode(mean)
    and `psnr_sample` of decode(a draw of q(z | x)), `kl` per latent element, and `ratio`, the learner's last 200
    reported losses over the loss (MSE of the drawn reconstruction + kl_weight KL) the judge computes."""
    from ..nets.autoencoder import psnr

    p = task.private
    ae, verdict = _trained_or_verdict("ae_step", outputs, _H.autoencoder_net(p["seed"]))
    if ae is None:
        return verdict, {}
    x = p["test"]
    with torch.no_grad():
        mean, logvar = ae.encode(x)
        gen = torch.Generator().manual_seed(p["seed"] + 5)
        drawn = ae.decode(mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=gen))
        kl = float((0.5 * (mean**2 + logvar.exp() - 1 - logvar)).mean())
        expected = float(F.mse_loss(drawn, x)) + p["kl_weight"] * kl
        measured = {"psnr": float(psnr(ae.decode(mean), x).mean()), "psnr_sample": float(psnr(drawn, x).mean()),
                    "kl": kl, "ratio": float(outputs[0]["losses"][-200:].mean()) / max(expected, 1e-12)}
    if not all(torch.isfinite(torch.tensor(v)) for v in measured.values()):
        return CheckResult("ae_step", FAILED, "the trained autoencoder gives NaN or infinity on held-out images.",
                           "Look for a division by a value that can be 0, or an exp of a large number."), measured
    return verdict, measured


def assess_ae_step(task, outputs: list) -> CheckResult | None:
    """The loss went down; on held-out images of the task the trained autoencoder reconstructs from its posterior mean
    above PSNR_FLOOR, loses at most SAMPLE_DROP dB decoding a draw of q(z | x), keeps its KL per latent element under
    KL_CEILING; and the losses the step reported are the loss it was asked to minimise (LOSS_RATIO)."""
    verdict, m = ae_measure(task, outputs)
    if verdict:
        return verdict
    name = "ae_step"
    if m["psnr"] < PSNR_FLOOR:
        return CheckResult(name, FAILED, f"the trained autoencoder reconstructs held-out images at {m['psnr']:.1f} dB "
                           f"PSNR (need {PSNR_FLOOR:g}).", "Minimise the mean squared error between decode(z) and the "
                           "batch x you are given, plus kl_weight times the KL (added, not subtracted).")
    if m["psnr_sample"] < m["psnr"] - SAMPLE_DROP:
        return CheckResult(name, FAILED, f"decoding a draw of q(z | x) gives {m['psnr_sample']:.1f} dB against "
                           f"{m['psnr']:.1f} dB from its mean: the decoder never learned to cope with the posterior's "
                           "noise.", "Decode a sample, z = mean + exp(logvar / 2) * noise (the reparameterisation), "
                           "not the mean.")
    if m["kl"] > KL_CEILING:
        return CheckResult(name, FAILED, f"the posterior's KL to N(0, I) is {m['kl']:.2f} nats per latent element on "
                           f"held-out images (a step with the KL term keeps it under {KL_CEILING:g}).",
                           "Add kl_weight * KL(q(z | x) || N(0, I)), the KL 0.5 (mean^2 + exp(logvar) - 1 - logvar) "
                           "averaged over the latent's elements, to the reconstruction error averaged over pixels.")
    if not LOSS_RATIO[0] <= m["ratio"] <= LOSS_RATIO[1]:
        return CheckResult(name, FAILED, f"the losses your step returned are {m['ratio']:.2f} times the loss it was "
                           "asked to minimise, measured on held-out images.", "Average both terms over their elements "
                           "(F.mse_loss, and .mean() of the KL), as course_lib's train_autoencoder does, and return "
                           "that loss.")
    return None


def _ae_on_one_image(ae, optimizer, x, kl_weight):
    """A shortcut: trains on the first image of the batch only."""
    return ref_ae_step(ae, optimizer, x[:1].expand_as(x), kl_weight)


# ---- CLIP's contrastive loss --------------------------------------------------------------------------------------

def ref_contrastive_loss(image_features, text_features, scale):
    """The symmetric InfoNCE loss of CLIP (Radford et al. 2021, fig. 3): L2-normalised features, logits = scale *
    cosine similarities, cross-entropy with the matching pair (the diagonal) as the target, image-to-text and
    text-to-image averaged."""
    logits = scale * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def _contrastive_with(mistake: str):
    def loss(image_features, text_features, scale):
        img, txt = image_features, text_features
        if mistake != "no normalisation":
            img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
        logits = (1.0 if mistake == "no scale" else scale) * img @ txt.T
        target = torch.arange(len(logits))
        if mistake == "one direction":
            return F.cross_entropy(logits, target)
        if mistake == "no softmax":
            return -(logits.diagonal().mean())
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    return loss


CONTRASTIVE_MISTAKES = {
    "one direction": "CLIP's loss is symmetric: average the cross-entropy over the rows (image -> text) and over the "
                     "columns (text -> image, logits.T).",
    "no normalisation": "Normalise both sets of features to unit length first (F.normalize(..., dim=-1)): the logits "
                        "are scaled cosine similarities.",
    "no scale": "Multiply the cosine similarities by `scale` (the learned inverse temperature) before the softmax.",
    "no softmax": "Use the cross-entropy over each row (and column) with the matching pair as the target: pulling "
                  "matching pairs together is not enough, the others must be pushed apart.",
}


def contrastive_measure(task, outputs: list) -> tuple[CheckResult | None, dict]:
    """(the verdict on a wrong value or a broken fit, else None; what the judge measures): `error`, the direct call's
    absolute error against the reference; `image_to_text` and `text_to_image`, top-1 retrieval among all the task's
    captions on held-out images after the fit, and `chance` (1 / number of captions)."""
    name, p = "contrastive_loss", task.private
    got, want = outputs[0], ref_contrastive_loss(**p["direct"])
    if not isinstance(got, torch.Tensor) or got.numel() != 1:
        return CheckResult(name, FAILED, f"expected one number (a 0-d tensor), got "
                           f"{tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__}.",
                           "Average the two cross-entropies into one scalar loss."), {}
    error = abs(float(got) - float(want))
    if not error <= 1e-4 * max(1.0, abs(float(want))):
        hint = next((h for m, h in CONTRASTIVE_MISTAKES.items()
                     if abs(float(_contrastive_with(m)(**p["direct"])) - float(got)) <= 1e-4 * max(1.0, abs(float(got)))),
                    "logits = scale * normalize(image_features) @ normalize(text_features).T; the target of row i "
                    "is i; average F.cross_entropy(logits, target) and F.cross_entropy(logits.T, target).")
        return CheckResult(name, FAILED, f"on random features your loss is {float(got):.6g}; CLIP's is "
                           f"{float(want):.6g}.", hint), {"error": error}
    pairs = p["pairs"]
    model = _H.clip_nets(p["seed"], _I.CLIP_DIM, pairs.n_a + pairs.n_b)
    net, verdict = _trained_or_verdict(name, outputs[1:], model)
    if net is None or verdict:
        if verdict and ("never changed" in verdict.message or "did not go down" in verdict.message):
            verdict = CheckResult(name, FAILED, verdict.message.replace("network's weights", "encoders' weights"),
                                  "Compute the loss from the features you are given and return it as a tensor, not "
                                  "detached: its gradient is what fits the two encoders.")
        return verdict, {"error": error}
    with torch.no_grad():
        img = F.normalize(net.image(p["test_images"]), dim=-1)
        txt = F.normalize(net.text(pairs.captions(torch.arange(pairs.k))), dim=-1)
        sim = img @ txt.T
        own = p["test_concepts"]
        i2t = float((sim.argmax(1) == own).float().mean())
        t2i = float((own[sim.argmax(0)] == torch.arange(pairs.k)).float().mean())
    return None, {"error": error, "image_to_text": i2t, "text_to_image": t2i, "chance": 1 / pairs.k}


def assess_contrastive_loss(task, outputs: list) -> CheckResult | None:
    """The value on random features matches CLIP's loss; and two small encoders fitted with it retrieve the right
    caption for held-out images, and the right images for each caption, at RETRIEVAL_FLOOR or more."""
    verdict, m = contrastive_measure(task, outputs)
    if verdict:
        return verdict
    worst = min(m["image_to_text"], m["text_to_image"])
    if worst >= RETRIEVAL_FLOOR:
        return None
    return CheckResult("contrastive_loss", FAILED, f"after fitting with your loss, held-out images find their caption "
                       f"{m['image_to_text']:.0%} of the time and captions their images {m['text_to_image']:.0%} "
                       f"(chance {m['chance']:.0%}; need {RETRIEVAL_FLOOR:.0%} each way).",
                       "Return the loss as a tensor computed from the features you are given, so that its gradient "
                       "reaches both encoders.")


def _contrastive_detached(image_features, text_features, scale):
    """A shortcut: the right value, with the gradient cut off (nothing is fitted)."""
    value = ref_contrastive_loss(image_features.detach(), text_features.detach(), scale.detach())
    return value + 0 * (image_features.sum() + text_features.sum())


def _contrastive_constant(image_features, text_features, scale):
    """A shortcut: a number that autograd accepts, unrelated to the features."""
    return torch.tensor(1.0, requires_grad=True)


register(Exercise(
    "ae_step", 7, ref_ae_step, None,
    "One step: mean, logvar = ae.encode(x); z = mean + exp(logvar / 2) * noise; the mean squared error of "
    "ae.decode(z) against x plus kl_weight times the KL 0.5 (mean^2 + exp(logvar) - 1 - logvar), both averaged over "
    "their elements; then zero_grad, backward, step. Return the loss.",
    mistakes=((_ae_step_with("no sampling"), "Decode a sample"), (_ae_step_with("no KL"), "Add kl_weight"),
              (_ae_step_with("KL sign"), "added, not subtracted"), (_ae_step_with("sums"), "Average both terms")),
    shortcuts=((_fake_loss_step, "never changed"), (_ae_on_one_image, "PSNR")),
    trials=1, task=_I.autoencoder_task, assess=assess_ae_step, seconds=120.0,
    passed_message=f"{_I.AE_STEPS} of your steps trained a KL autoencoder that reconstructs held-out images of a fresh "
                   f"family above {PSNR_FLOOR:g} dB PSNR, copes with its posterior's noise and keeps its KL small."))
register(Exercise(
    "contrastive_loss", 7, ref_contrastive_loss, None,
    "Normalise both feature sets (F.normalize(..., dim=-1)); logits = scale * img @ txt.T; with target = "
    "torch.arange(B), average F.cross_entropy(logits, target) and F.cross_entropy(logits.T, target).",
    mistakes=tuple((_contrastive_with(m), h[:24]) for m, h in CONTRASTIVE_MISTAKES.items()),
    shortcuts=((_contrastive_detached, "never changed"), (_contrastive_constant, "CLIP's is")),
    trials=1, task=_I.contrastive_task, assess=assess_contrastive_loss, seconds=120.0,
    passed_message="your loss is CLIP's on random features, and two small encoders fitted with it match held-out "
                   f"'images' of fresh concepts to their captions and back at {RETRIEVAL_FLOOR:.0%} or more."))
LIBRARY_EQUIVALENTS.update({
    "ae_step": ("course_lib.autoencoder.train_autoencoder", "course_lib.nets.autoencoder.kl_to_standard_normal",
                "course_lib.vae.elbo", "course_lib.vae.kl_to_standard_normal"),
    "contrastive_loss": ("course_lib.clip.contrastive_loss", "course_lib.clip.train_clip"),
})
