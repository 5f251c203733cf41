"""Honest solutions in other styles than the references, for the exercises graded on a training run or a loop: what
`python -m course_lib bench exercises` runs beside each reference (HONEST), to show that the judge's thresholds pass
ordinary code, not only the course's own."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _flow_lerp(model, optimizer, x0):
    """Honest: torch.lerp, one time per row of shape (B,), F.mse_loss, the loss tensor returned."""
    t = torch.rand(len(x0))
    noise = torch.randn_like(x0)
    loss = torch.nn.functional.mse_loss(model(torch.lerp(x0, noise, t[:, None]), t), noise - x0)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def _flow_logit_normal(model, optimizer, x0):
    """Honest: logit-normal times (SD3's choice), the squared error summed over the two dimensions."""
    t, noise = torch.sigmoid(torch.randn(x0.shape[0], 1)), torch.randn(*x0.shape)
    velocity = noise - x0
    loss = (model(x0 + t * velocity, t) - velocity).pow(2).sum(dim=1).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss)


def _masked_low_discrepancy(model, optimizer, x0, mask_id):
    """Honest: MDLM's low-discrepancy times, targets ignored where nothing was masked."""
    n, length = x0.shape
    t = (torch.rand(1) + torch.arange(n) / n) % 1 * 0.999 + 1e-3
    hide = torch.rand(n, length) < t[:, None]
    ce = torch.nn.functional.cross_entropy(model(x0.masked_fill(hide, mask_id)).permute(0, 2, 1),
                                           x0.masked_fill(~hide, -100), ignore_index=-100, reduction="none")
    loss = (ce / t[:, None]).sum() / (n * length)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def _masked_subs(model, optimizer, x0, mask_id):
    """Honest: MDLM's SUBS parameterisation ([MASK] given probability zero), log-probabilities gathered."""
    t = torch.rand(x0.shape[0], 1).clamp(min=1e-3)
    masked = torch.rand(x0.shape) < t
    logits = model(torch.where(masked, mask_id, x0)).clone()
    logits[..., mask_id] = -float("inf")
    logp = logits.log_softmax(-1).gather(-1, x0[..., None]).squeeze(-1)
    loss = -(logp * masked / t).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


def _cond_bernoulli(model, optimizer, x0, y, alpha_bar, null_label):
    """Honest: a 10% dropout drawn with torch.bernoulli and masked_fill, F.mse_loss, the loss as a float."""
    y = y.masked_fill(torch.bernoulli(torch.full(y.shape, 0.1)).bool(), null_label)
    t = torch.randint(len(alpha_bar), x0.shape[:1])
    noise = torch.randn_like(x0)
    a = alpha_bar[t].unsqueeze(1)
    loss = torch.nn.functional.mse_loss(model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, y), noise)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


class _CondStep:
    """Honest: a callable instance with its own dropout rate, the labels dropped by a random permutation."""

    def __init__(self, p_uncond=0.25):
        self.p_uncond = p_uncond

    def __call__(self, model, optimizer, x0, y, alpha_bar, null_label):
        y = y.clone()
        y[torch.randperm(len(y))[: int(self.p_uncond * len(y))]] = null_label
        t = torch.randint(0, alpha_bar.numel(), (len(x0),))
        eps = torch.randn(x0.shape)
        x_t = alpha_bar[t].sqrt()[:, None] * x0 + (1 - alpha_bar[t]).sqrt()[:, None] * eps
        loss = (model(x_t, t, y=y) - eps).square().sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss


def _repaint_ddim(denoise, known, mask, sigmas, resample):
    """Honest: DDIM (deterministic) steps down, the mask as a float, levels as a Python list."""
    keep = mask.float()
    levels = sigmas.tolist()
    x = torch.randn(known.shape) * levels[0]
    for i in range(len(levels) - 1):
        hi, lo = levels[i], levels[i + 1]
        for rep in range(resample if lo > 0 else 1):
            x = keep * (known + hi * torch.randn(known.shape)) + (1 - keep) * x
            x0 = denoise(x, hi)
            x = x0 + (lo / hi) * (x - x0)
            if lo > 0 and rep + 1 < resample:
                x = x + (hi**2 - lo**2) ** 0.5 * torch.randn(x.shape)
    return keep * known + (1 - keep) * x


def _repaint_blocks(denoise, known, mask, sigmas, resample, jump=3):
    """Honest: RePaint's jumps (blocks of 3 levels walked `resample` times, alg. 1 with j = 3), as a list of moves."""
    n = len(sigmas) - 1
    moves = []
    for start in range(0, n, jump):
        end = min(start + jump, n)
        for r in range(resample if end < n else 1):
            moves += [(i, i + 1) for i in range(start, end)]
            if r < resample - 1 and end < n:
                moves += [(i, i - 1) for i in range(end, start, -1)]
    x = torch.randn_like(known) * sigmas[0]
    for a, b in moves:
        s, t = float(sigmas[a]), float(sigmas[b])
        if b > a:
            x[mask] = (known + s * torch.randn_like(known))[mask]
            d = denoise(x, s)
            x = d if t == 0 else d + (t / s) ** 2 * (x - d) + t * (1 - (t / s) ** 2) ** 0.5 * torch.randn_like(x)
        else:
            x = x + (t * t - s * s) ** 0.5 * torch.randn_like(x)
    x[mask] = known[mask]
    return x


def _ae_distributions(ae, optimizer, x, kl_weight):
    """Honest: the network's own forward (which samples z), the KL from torch.distributions, the loss as a float."""
    recon, mean, logvar = ae(x)
    posterior = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    prior = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    loss = torch.nn.functional.mse_loss(recon, x) + kl_weight * torch.distributions.kl_divergence(posterior, prior).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


class _AEStep:
    """Honest: a callable instance, rsample of a Normal, the squared error written out."""

    def __call__(self, ae, optimizer, x, kl_weight):
        mean, logvar = ae.encode(x)
        std = logvar.mul(0.5).exp()
        z = torch.distributions.Normal(mean, std).rsample()
        mse = (ae.decode(z) - x).square().mean()
        kl = (mean.square() + std.square() - 1 - logvar).mean() / 2
        total = mse + kl_weight * kl
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        return total


def _clip_einsum(image_features, text_features, scale):
    """Honest: einsum over features divided by their norms, log_softmax along each axis."""
    img = image_features / image_features.norm(dim=1, keepdim=True)
    txt = text_features / text_features.norm(dim=1, keepdim=True)
    logits = scale * torch.einsum("id,jd->ij", img, txt)
    return -(logits.log_softmax(1).diagonal().mean() + logits.log_softmax(0).diagonal().mean()) / 2


def _clip_soft_targets(image_features, text_features, scale):
    """Honest: cosine similarities by broadcasting, the identity matrix as soft targets."""
    sim = torch.nn.functional.cosine_similarity(image_features[:, None, :], text_features[None, :, :], dim=-1)
    logits = sim * scale
    eye = torch.eye(len(logits))
    return 0.5 * torch.nn.functional.cross_entropy(logits, eye) + 0.5 * torch.nn.functional.cross_entropy(logits.t(), eye)


def _einsum_attention(x, context, mask, w_q, w_k, w_v, heads):
    """Honest: einsum per head, the mask as -inf added to the scores."""
    b, n, c = x.shape
    d = c // heads
    q = torch.einsum("bnc,oc->bno", x, w_q).reshape(b, n, heads, d)
    k = torch.einsum("blc,oc->blo", context, w_k).reshape(b, -1, heads, d)
    v = torch.einsum("blc,oc->blo", context, w_v).reshape(b, -1, heads, d)
    scores = torch.einsum("bnhd,blhd->bhnl", q, k) / d**0.5
    scores = scores + torch.where(mask.bool(), 0.0, float("-inf"))[:, None, None, :]
    return torch.einsum("bhnl,blhd->bnhd", scores.softmax(-1), v).reshape(b, n, c)


def _bernoulli_caption_step(model, optimizer, z0, context, mask, null_context, null_mask, alpha_bar):
    """Honest: 15% dropout by torch.bernoulli, index assignment, F.mse_loss, the loss as a float."""
    drop = torch.bernoulli(torch.full((len(z0),), 0.15)).bool()
    context, mask = context.clone(), mask.clone()
    context[drop], mask[drop] = null_context[0], null_mask[0]
    t = torch.randint(0, alpha_bar.numel(), (z0.shape[0],))
    eps = torch.randn(z0.shape)
    a = alpha_bar[t][:, None, None, None]
    loss = torch.nn.functional.mse_loss(model(a.sqrt() * z0 + (1 - a).sqrt() * eps, t, context=context, mask=mask), eps)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def _dpm_guided_loop(denoise, x, sigmas, y, scale):
    """Honest: DPM-Solver++(2M) on the guided denoiser (first order on the first and last steps)."""
    import math

    prev = None
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        u = denoise(x, s)
        d = u + scale * (denoise(x, s, y) - u)
        if s_next == 0:
            return d
        h = math.log(s / s_next)
        if prev is None:
            dd = d
        else:
            r = math.log(float(sigmas[i - 1]) / s) / h
            dd = (1 + 1 / (2 * r)) * d - prev / (2 * r)
        x, prev = (s_next / s) * x - math.expm1(-h) * dd, d
    return x


def _edm_column_sigma(model, optimizer, x0, p_mean, p_std):
    """An honest EDM step: sigma as a column from torch.normal, the weight written as SNR + 1 / sigma_data^2."""
    sigma = torch.normal(p_mean, p_std, size=(x0.shape[0], 1)).exp()
    lam = 1 / sigma**2 + 1 / model.sigma_data**2
    loss = (lam * (model(x0 + sigma * torch.randn_like(x0), sigma) - x0) ** 2).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def _edm_mse_rows(model, optimizer, x0, p_mean, p_std):
    """An honest EDM step: F.mse_loss per row (reduction='none'), weighted, averaged."""
    sigma = torch.exp(torch.randn(len(x0)) * p_std + p_mean)
    sd = model.sigma_data
    x = torch.addcmul(x0, sigma[:, None], torch.randn(x0.shape))
    per_row = F.mse_loss(model(x, sigma), x0, reduction="none").mean(dim=1)
    loss = ((sigma**2 + sd**2) / (sigma * sd) ** 2 * per_row).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


def _consistency_numpy_noise(f, noise, sigmas, sigma_min):
    """Honest: the levels as floats, numpy's generator for z."""
    import numpy as np

    levels = [float(v) for v in sigmas]
    out = f(levels[0] * noise, levels[0])
    for tau in levels[1:]:
        z = torch.from_numpy(np.random.standard_normal(tuple(out.shape))).to(out.dtype)
        out = f(out + np.sqrt(tau**2 - sigma_min**2) * z, tau)
    return out


def _consistency_recursive(f, noise, sigmas, sigma_min, x=None):
    """Honest: recursion over the levels, torch.normal for z."""
    if x is None:
        return _consistency_recursive(f, noise, sigmas[1:], sigma_min, f(noise * sigmas[0].item(), sigmas[0].item()))
    if len(sigmas) == 0:
        return x
    tau = sigmas[0].item()
    z = torch.normal(0.0, 1.0, size=x.shape)
    return _consistency_recursive(f, noise, sigmas[1:], sigma_min, f(x + (tau * tau - sigma_min**2) ** 0.5 * z, tau))


@torch.no_grad()
def _invert_eps_while(denoise, x0, sigmas):
    """Honest: the noise direction eps kept, a while loop over the sorted levels."""
    levels = sorted(s for s in sigmas.tolist() if s > 0)
    x, i = x0.clone(), 0
    while i + 1 < len(levels):
        d = denoise(x, levels[i])
        x = d + levels[i + 1] * (x - d) / levels[i]
        i += 1
    return x


def _invert_lerp(denoise, x0, sigmas):
    """Honest: torch.lerp past 1 (d + ratio (x - d)), the levels from numpy."""
    import numpy as np

    up = np.sort(np.array([float(s) for s in sigmas if float(s) > 0]))
    x = x0
    for s, ratio in zip(up[:-1], up[1:] / up[:-1]):
        x = torch.lerp(denoise(x, float(s)), x, float(ratio))
    return x


def _capstone_other_styles():
    """Honest capstone parts: einsum attention, a bernoulli caption step, a DPM-Solver++(2M) guided loop."""
    return {"cross_attention": _einsum_attention, "train_step": _bernoulli_caption_step,
            "sample_loop": _dpm_guided_loop}


HONEST = {"text_to_shapes": {"einsum, bernoulli, DPM-Solver++(2M)": _capstone_other_styles},
          "ae_step": {"torch.distributions": _ae_distributions, "callable rsample": _AEStep()},
          "contrastive_loss": {"einsum log_softmax": _clip_einsum, "soft targets": _clip_soft_targets},
          "repaint": {"DDIM steps": _repaint_ddim, "jumps of 3": _repaint_blocks},
          "cond_train_step": {"bernoulli 10%": _cond_bernoulli, "permutation 25%": _CondStep()},
          "flow_step": {"lerp": _flow_lerp, "logit-normal times": _flow_logit_normal},
          "edm_step": {"torch.normal column": _edm_column_sigma, "F.mse_loss per row": _edm_mse_rows},
          "masked_step": {"low-discrepancy times": _masked_low_discrepancy, "SUBS": _masked_subs},
          "consistency_sample": {"numpy z": _consistency_numpy_noise, "recursion": _consistency_recursive},
          "ddim_invert": {"eps, while": _invert_eps_while, "lerp, numpy levels": _invert_lerp}}
