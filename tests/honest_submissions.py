"""Honest submissions in the styles learners write, two or more per lesson: every one must get full marks with no
flag from the batch grader (tests/test_grading_honest.py), and `python -m course_lib bench grader` reports the copy
detector's false-positive rate on them. Each is {file name: [code cells]}; the lesson comes from the NN_ prefix.

The styles, on purpose: decorators on the learner's own function (@torch.no_grad(), @torch.inference_mode(), a
decorator of their own), classes and callable instances, lambdas, helper cells and helper functions, local variables
and methods named like the library's functions (sample, classifier_free, CrossAttention, .patchify, .generate), the
library imported for a comparison in an earlier cell, numpy, einsum, torch.func, torch.distributions,
F.binary_cross_entropy_with_logits and F.layer_norm (allowed), list comprehensions, walrus, match, recursion.
"""

HEAD = "import math\nimport torch\nimport torch.nn.functional as F\nfrom course_lib import check, progress"

SUBMISSIONS = {
    "00_plain.ipynb": [HEAD, """\
def noise_images(x, sigma, noise):
    shape = (-1,) + (1,) * (x.ndim - 1)
    return x + sigma.reshape(shape) * noise""", 'check("noise_images", noise_images)'],

    "01_decorators_and_shadowing.ipynb": [HEAD + "\nimport functools\nfrom course_lib import schedules, forward\n"
                                          "from course_lib.samplers import sample", """\
def broadcast(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)
    return wrapper""", """\
@torch.no_grad()
def alpha_bar_from_betas(betas):
    sample = 1 - betas          # a local called like the lesson's sampler
    return torch.cumprod(sample, dim=0)""", """\
@torch.inference_mode()
@broadcast
def q_sample(x0, t, alpha_bar, noise):
    ab = alpha_bar[t].to(x0.dtype)
    ab = ab.view(-1, *[1] * (x0.ndim - 1))
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise""", """\
log_snr = lambda alpha_bar: torch.log(alpha_bar) - torch.log1p(-alpha_bar)
print("sample", "q_sample", "forward.q_sample")  # strings naming the library are fine""", """\
# comparing with the library in a cell of its own is fine: the graded functions do not use it
b = torch.linspace(1e-4, 0.02, 50, dtype=torch.float64)
print(torch.allclose(alpha_bar_from_betas(b), schedules.alpha_bar_from_betas(b)))"""],

    "01_numpy_and_classes.ipynb": [HEAD + "\nimport numpy as np", """\
def alpha_bar_from_betas(betas):
    out, running = [], 1.0
    for b in betas.tolist():
        running *= 1.0 - b
        out.append(running)
    return torch.tensor(out, dtype=betas.dtype)""", """\
class QSampler:
    '''The closed form q(x_t | x_0), as a callable object.'''
    def __call__(self, x0, t, alpha_bar, noise):
        a = np.sqrt(alpha_bar.numpy()[t.numpy()])
        s = np.sqrt(1 - alpha_bar.numpy()[t.numpy()])
        expand = lambda v: v.reshape(v.shape + (1,) * (x0.ndim - 1))
        return torch.from_numpy(expand(a) * x0.numpy() + expand(s) * noise.numpy()).to(x0.dtype)

q_sample = QSampler()""", """\
def log_snr(alpha_bar):
    return torch.logit(alpha_bar)"""],

    "02_helpers_and_mse.ipynb": [HEAD + "\nfrom course_lib.forward import q_sample  # to compare, earlier on", """\
def q_sample(x0, t, alpha_bar, noise):   # my own, from lesson 1 (it replaces the import above)
    ab = alpha_bar[t].reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise""", """\
def simple_loss(model, x0, t, noise, alpha_bar):
    return F.mse_loss(model(q_sample(x0, t, alpha_bar, noise), t), noise)""", """\
def posterior_mean(x0, x_t, t, alpha_bar):
    ab = alpha_bar.double()
    ab_prev = torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])
    beta = 1 - ab / ab_prev
    shape = (-1,) + (1,) * (x0.ndim - 1)
    c0 = (ab_prev.sqrt() * beta / (1 - ab))[t].reshape(shape)
    ct = ((1 - beta).sqrt() * (1 - ab_prev) / (1 - ab))[t].reshape(shape)
    return (c0 * x0 + ct * x_t).to(x0.dtype)""", """\
def eps_to_x0(eps, x_t, t, alpha_bar):
    ab = alpha_bar[t].to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
    return (x_t - torch.sqrt(1 - ab) * eps) / torch.sqrt(ab)""", """\
def train_step(model, optimizer, x0, alpha_bar):
    t = torch.randint(0, len(alpha_bar), (len(x0),))
    noise = torch.randn_like(x0)
    loss = simple_loss(model, x0, t, noise, alpha_bar)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()"""],

    "02_einsum_and_classes.ipynb": [HEAD + "\nfrom course_lib import losses", """\
class Loss:
    def __init__(self):
        self.calls = 0
    def __call__(self, model, x0, t, noise, alpha_bar):
        self.calls += 1
        a = alpha_bar[t].to(x0.dtype)
        x_t = torch.einsum("b,b...->b...", a.sqrt(), x0) + torch.einsum("b,b...->b...", (1 - a).sqrt(), noise)
        err = model(x_t, t) - noise
        return (err * err).sum() / err.numel()

simple_loss = Loss()""", """\
def posterior_mean(x0, x_t, t, alpha_bar):
    ab = alpha_bar.double()
    prev = F.pad(ab[:-1], (1, 0), value=1.0)
    alpha = ab / prev
    coef = {"x0": prev.sqrt() * (1 - alpha) / (1 - ab), "xt": alpha.sqrt() * (1 - prev) / (1 - ab)}
    pick = lambda c: torch.einsum("b,b...->b...", c[t].to(x0.dtype), torch.ones_like(x0))
    return pick(coef["x0"]) * x0 + pick(coef["xt"]) * x_t""", """\
@torch.no_grad()
def eps_to_x0(eps, x_t, t, alpha_bar):
    ab = alpha_bar[t].to(x_t.dtype)
    return torch.einsum("b,b...->b...", 1 / ab.sqrt(), x_t - torch.einsum("b,b...->b...", (1 - ab).sqrt(), eps))""", """\
def train_step(model, optimizer, x0, alpha_bar):
    n, T = x0.shape[0], alpha_bar.shape[0]
    t = torch.randint(T, (n,))
    eps = torch.randn(x0.shape)
    a = alpha_bar[t][:, None]
    prediction = model(a.sqrt() * x0 + (1 - a).sqrt() * eps, t)
    loss = ((prediction - eps) ** 2).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()"""],

    "03_dpm_solver_class.ipynb": [HEAD + "\nfrom course_lib.samplers import sample, sample_ddim\nfrom course_lib import samplers",
                                  """\
def ddim_step(x_t, x0_pred, ab_t, ab_s):
    eps = (x_t - math.sqrt(ab_t) * x0_pred) / math.sqrt(1 - ab_t)
    return math.sqrt(ab_s) * x0_pred + math.sqrt(1 - ab_s) * eps""", """\
def heun_step(denoise, x, sigma, sigma_next):
    slope = lambda y, s: (y - denoise(y, s)) / s
    d = slope(x, sigma)
    guess = x + (sigma_next - sigma) * d
    return x + (sigma_next - sigma) * 0.5 * (d + slope(guess, sigma_next))""", """\
def karras_sigmas(n, sigma_min, sigma_max, rho):
    import numpy as np
    ramp = np.linspace(0, 1, n)
    levels = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.from_numpy(np.append(levels, 0.0))""", """\
class DPMSolver2M:
    '''DPM-Solver++(2M): one denoiser call per step.'''
    def __init__(self, denoise):
        self.denoise, self.previous = denoise, None

    def step(self, x, s, s_next, h_prev):
        d = self.denoise(x, s)
        if s_next == 0:
            return d, None
        h = math.log(s / s_next)
        if self.previous is None:
            dd = d
        else:
            r = h_prev / h
            dd = (1 + 1 / (2 * r)) * d - self.previous / (2 * r)
        self.previous = d
        return (s_next / s) * x - math.expm1(-h) * dd, h

def sample_loop(denoise, x, sigmas):
    solver, h = DPMSolver2M(denoise), None
    sample = x                                   # named like the library's sampler
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        sample, h = solver.step(sample, s, s_next, h)
    return sample"""],

    "03_euler_walrus.ipynb": [HEAD, """\
@torch.no_grad()
def ddim_step(x_t, x0_pred, ab_t, ab_s):
    a_t, a_s = torch.tensor(ab_t), torch.tensor(ab_s)
    noise = (x_t - a_t.sqrt() * x0_pred) / (1 - a_t).sqrt()
    return a_s.sqrt() * x0_pred + (1 - a_s).sqrt() * noise""", """\
def heun_step(denoise, x, sigma, sigma_next):
    h = sigma_next - sigma
    k1 = (x - denoise(x, sigma)) / sigma
    k2 = ((y := x + h * k1) - denoise(y, sigma_next)) / sigma_next
    return x + h * (k1 + k2) / 2""", """\
def karras_sigmas(n, sigma_min, sigma_max, rho):
    inv = 1 / rho
    levels = [(sigma_max ** inv + i / (n - 1) * (sigma_min ** inv - sigma_max ** inv)) ** rho for i in range(n)]
    return torch.tensor(levels + [0.0], dtype=torch.float64)""", """\
def euler_update(x, d, s, s_next):
    return d if s_next == 0 else x + (s_next - s) * (x - d) / s

def sample_loop(denoise, x, sigmas):
    for i, s in enumerate(sigmas[:-1]):
        x = euler_update(x, denoise(x, s), float(s), float(sigmas[i + 1]))
    return x"""],

    "04_distributions.ipynb": [HEAD + "\nfrom torch.distributions import Normal, kl_divergence", """\
def reparameterize(mu, logvar, noise):
    std = torch.exp(logvar / 2)
    return torch.addcmul(mu, std, noise)""", """\
def gaussian_elbo(x, mean, log_scale, mu, logvar):
    likelihood = Normal(mean, log_scale.exp()).log_prob(x).sum(dim=1)
    kl = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(torch.zeros_like(mu), torch.ones_like(mu))).sum(1)
    return likelihood - kl""", """\
def discriminator_loss(real_logits, fake_logits):
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return real + fake""", """\
def vae_step(vae, optimizer, x):
    mu, logvar = vae.encode(x)
    z = reparameterize(mu, logvar, torch.randn_like(mu))
    mean, log_scale = vae.decode(z)
    loss = -gaussian_elbo(x, mean, log_scale, mu, logvar).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()"""],

    "04_formulas.ipynb": [HEAD + "\nfrom course_lib import vae, gan", """\
reparameterize = lambda mu, logvar, noise: mu + noise * (0.5 * logvar).exp()""", """\
LOG_2PI = math.log(2 * math.pi)

def gaussian_elbo(x, mean, log_scale, mu, logvar):
    z = (x - mean) / torch.exp(log_scale)
    rec = -(0.5 * z ** 2 + log_scale + 0.5 * LOG_2PI).sum(-1)
    kl = 0.5 * torch.sum(mu ** 2 + torch.exp(logvar) - 1 - logvar, dim=-1)
    return rec - kl""", """\
def discriminator_loss(real_logits, fake_logits):
    # -log sigmoid(a) = softplus(-a): the stable form
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()""", """\
class Step:
    def __call__(self, vae, optimizer, x):
        mu, logvar = vae.encode(x)
        z = reparameterize(mu, logvar, torch.randn_like(logvar))
        mean, log_scale = vae.decode(z)
        loss = -gaussian_elbo(x, mean, log_scale, mu, logvar).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.detach()

vae_step = Step()"""],

    "05_math.ipynb": [HEAD, """\
def dpmpp_2m_coefficients(sigma, sigma_next, sigma_prev):
    h = math.log(sigma / sigma_next)
    r = math.log(sigma_prev / sigma) / h
    k = 1 - sigma_next / sigma     # = -expm1(-h)
    return torch.tensor([sigma_next / sigma, k * (1 + 1 / (2 * r)), -k / (2 * r)], dtype=torch.float64)"""],

    "05_torch_tensors.ipynb": [HEAD + "\nfrom course_lib import kernels", """\
@torch.no_grad()
def dpmpp_2m_coefficients(sigma, sigma_next, sigma_prev):
    s, s1, s0 = (torch.tensor(v, dtype=torch.float64) for v in (sigma, sigma_next, sigma_prev))
    h, h_prev = torch.log(s / s1), torch.log(s0 / s)
    r = h_prev / h
    k = -torch.expm1(-h)
    return torch.stack([s1 / s, k * (1 + 0.5 / r), -0.5 * k / r])"""],

    "06_func_and_dpm.ipynb": [HEAD + "\nfrom course_lib.guidance import classifier_free  # to compare", """\
def cfg_denoiser(d_cond, d_uncond, scale):
    return torch.lerp(d_uncond, d_cond, scale)""", """\
def classifier_guided_score(score, x, y, weight, bias, scale):
    def log_p(z):
        return torch.log_softmax(z.flatten(1) @ weight.T + bias, dim=1).gather(1, y[:, None]).sum()
    return score + scale * torch.func.grad(log_p)(x)""", """\
def guided_sample_loop(denoise, x, sigmas, y, scale):
    previous = None
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        classifier_free = cfg_denoiser(denoise(x, s, y), denoise(x, s), scale)  # a local, named like the library's
        if s_next == 0:
            return classifier_free
        h = math.log(s / s_next)
        if previous is None:
            dd = classifier_free
        else:
            r = math.log(float(sigmas[i - 1]) / s) / h
            dd = (1 + 1 / (2 * r)) * classifier_free - previous / (2 * r)
        x, previous = (s_next / s) * x - math.expm1(-h) * dd, classifier_free
    return x""", """\
def cond_train_step(model, optimizer, x0, y, alpha_bar, null_label):
    y = y.masked_fill(torch.bernoulli(torch.full(y.shape, 0.1)).bool(), null_label)   # 10% dropped
    t = torch.randint(len(alpha_bar), x0.shape[:1])
    noise = torch.randn_like(x0)
    a = alpha_bar[t].unsqueeze(1)
    loss = F.mse_loss(model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, y), noise)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()""", """\
def repaint(denoise, known, mask, sigmas, resample):
    keep = mask.float()                                # DDIM steps down, the mask as a float
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
    return keep * known + (1 - keep) * x"""],

    "06_autograd_ancestral.ipynb": [HEAD, """\
cfg_denoiser = lambda d_cond, d_uncond, scale: (1 - scale) * d_uncond + scale * d_cond""", """\
@torch.enable_grad()
def classifier_guided_score(score, x, y, weight, bias, scale):
    x = x.detach().requires_grad_()
    logits = x.reshape(len(x), -1) @ weight.t() + bias
    chosen = logits[torch.arange(len(y)), y] - torch.logsumexp(logits, dim=1)
    (grad,) = torch.autograd.grad(chosen.sum(), x)
    return score + scale * grad""", """\
def guided_sample_loop(denoise, x, sigmas, y, scale):
    levels = sigmas.tolist()
    for s, s_next in zip(levels, levels[1:]):
        d = cfg_denoiser(denoise(x, s, y), denoise(x, s, None), scale)
        if s_next == 0:
            x = d
            break
        up = min(s_next, (s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2) ** 0.5)
        down = (s_next ** 2 - up ** 2) ** 0.5
        x = x + (down - s) * (x - d) / s + up * torch.randn_like(x)   # Euler ancestral
    return x""", """\
class CondStep:
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

cond_train_step = CondStep()""", """\
def moves(n, resample, jump=3):                        # RePaint's jumps: blocks of 3 levels walked `resample` times
    for start in range(0, n, jump):
        end = min(start + jump, n)
        for r in range(resample if end < n else 1):
            yield from ((i, i + 1) for i in range(start, end))
            if r < resample - 1 and end < n:
                yield from ((i, i - 1) for i in range(end, start, -1))

@torch.no_grad()
def repaint(denoise, known, mask, sigmas, resample):
    x = torch.randn_like(known) * sigmas[0]
    for a, b in moves(len(sigmas) - 1, resample):
        s, t = float(sigmas[a]), float(sigmas[b])
        if b < a:                                      # back up a level
            x = x + math.sqrt(t * t - s * s) * torch.randn_like(x)
            continue
        x[mask] = (known + s * torch.randn_like(known))[mask]
        d = denoise(x, s)
        x = d if t == 0 else d + (t / s) ** 2 * (x - d) + t * math.sqrt(1 - (t / s) ** 2) * torch.randn_like(x)
    x[mask] = known[mask]
    return x"""],

    "07_einsum_own_class.ipynb": [HEAD + "\nfrom course_lib.nets import CrossAttention as LibraryCrossAttention  # to read",
                                  """\
class CrossAttention:
    '''My own, named like the library's class.'''
    def __init__(self, heads):
        self.heads = heads

    def split(self, t):
        b, n, c = t.shape
        return t.reshape(b, n, self.heads, c // self.heads)

    def __call__(self, x, context, mask, w_q, w_k, w_v):
        q, k, v = self.split(x @ w_q.T), self.split(context @ w_k.T), self.split(context @ w_v.T)
        scores = torch.einsum("bnhd,blhd->bhnl", q, k) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
        out = torch.einsum("bhnl,blhd->bnhd", scores.softmax(-1), v)
        return out.reshape(x.shape)

def cross_attention(x, context, mask, w_q, w_k, w_v, heads):
    return CrossAttention(heads)(x, context, mask, w_q, w_k, w_v)""", """\
def scale_latents(latents):
    factor = 1.0 / latents.flatten().std()
    return latents * factor""", """\
def text_guided_eps(model, x, t, context, mask, null_context, null_mask, scale):
    b = len(x)
    eps_c = model(x, t, context=context, mask=mask)
    eps_u = model(x, t, context=null_context.repeat(b, 1, 1), mask=null_mask.repeat(b, 1))
    return eps_u + scale * (eps_c - eps_u)""", """\
def ae_step(ae, optimizer, x, kl_weight):
    recon, mean, logvar = ae(x)                        # the network's own forward samples z
    posterior = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    prior = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    loss = F.mse_loss(recon, x) + kl_weight * torch.distributions.kl_divergence(posterior, prior).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()""", """\
def contrastive_loss(image_features, text_features, scale):
    img = image_features / image_features.norm(dim=1, keepdim=True)
    txt = text_features / text_features.norm(dim=1, keepdim=True)
    logits = scale * torch.einsum("id,jd->ij", img, txt)
    return -(logits.log_softmax(1).diagonal().mean() + logits.log_softmax(0).diagonal().mean()) / 2"""],

    "07_permute_batched.ipynb": [HEAD, """\
def heads_first(t, heads):
    b, n, c = t.shape
    return t.view(b, n, heads, c // heads).permute(0, 2, 1, 3)

def cross_attention(x, context, mask, w_q, w_k, w_v, heads):
    q = heads_first(F.linear(x, w_q), heads)
    k = heads_first(F.linear(context, w_k), heads)
    v = heads_first(F.linear(context, w_v), heads)
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    scores = torch.where(mask[:, None, None, :].bool(), scores, torch.full_like(scores, -math.inf))
    weights = torch.softmax(scores, dim=-1)
    return (weights @ v).permute(0, 2, 1, 3).flatten(2)""", """\
scale_latents = lambda latents: latents / torch.std(latents)""", """\
def text_guided_eps(model, x, t, context, mask, null_context, null_mask, scale):
    match x.shape:
        case (b, *_):
            pass
    both = model(torch.cat([x, x]), torch.cat([t, t]),
                 context=torch.cat([context, null_context.expand(b, -1, -1)]),
                 mask=torch.cat([mask, null_mask.expand(b, -1)]))
    cond, uncond = both.chunk(2)
    return uncond + scale * (cond - uncond)""", """\
class AEStep:
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

ae_step = AEStep()""", """\
def contrastive_loss(image_features, text_features, scale):
    sim = F.cosine_similarity(image_features[:, None, :], text_features[None, :, :], dim=-1)
    logits = sim * scale
    eye = torch.eye(len(logits))
    return 0.5 * F.cross_entropy(logits, eye) + 0.5 * F.cross_entropy(logits.t(), eye)"""],

    "08_layer_norm_fold.ipynb": [HEAD + "\nfrom course_lib.nets import dit  # the lesson's DiT, to compare", """\
def adaln(x, shift, scale):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]""", """\
class Patches:
    def __init__(self, p):
        self.p = p

    def patchify(self, x):            # a method named like the library's function
        b, c, h, w = x.shape
        cols = F.unfold(x, kernel_size=self.p, stride=self.p)          # (B, C p p, L), channel slowest
        return cols.view(b, c, self.p * self.p, -1).permute(0, 3, 2, 1).reshape(b, -1, self.p * self.p * c)

def patchify(x, p):
    return Patches(p).patchify(x)""", """\
def unpatchify(tokens, p, channels, h, w):
    b, n, _ = tokens.shape
    cols = tokens.view(b, n, p * p, channels).permute(0, 3, 2, 1).reshape(b, channels * p * p, n)
    return F.fold(cols, output_size=(h, w), kernel_size=p, stride=p)""", """\
def attention(h, qkv_w, qkv_b, heads):
    b, n, d = h.shape
    q, k, v = F.linear(h, qkv_w, qkv_b).view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    w = (q @ k.transpose(-1, -2) / math.sqrt(d // heads)).softmax(dim=-1)
    return (w @ v).transpose(1, 2).reshape(b, n, d)

def dit_block(x, c, ada_w, ada_b, qkv_w, qkv_b, proj_w, proj_b, fc1_w, fc1_b, fc2_w, fc2_b, heads):
    shift1, scale1, gate1, shift2, scale2, gate2 = F.linear(F.silu(c), ada_w, ada_b).chunk(6, dim=-1)
    x = x + gate1[:, None] * F.linear(attention(adaln(x, shift1, scale1), qkv_w, qkv_b, heads), proj_w, proj_b)
    hidden = F.gelu(F.linear(adaln(x, shift2, scale2), fc1_w, fc1_b), approximate="tanh")
    return x + gate2[:, None] * F.linear(hidden, fc2_w, fc2_b)"""],

    "08_reshape_einsum.ipynb": [HEAD, """\
def adaln(x, shift, scale):
    mu = x.mean(dim=-1, keepdim=True)
    var = ((x - mu) ** 2).mean(dim=-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-6) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)""", """\
def patchify(x, p):
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("bcipjq->bijpqc", x).reshape(b, (h // p) * (w // p), p * p * c)

def unpatchify(tokens, p, channels, h, w):
    b = tokens.shape[0]
    x = tokens.reshape(b, h // p, w // p, p, p, channels)
    return torch.einsum("bijpqc->bcipjq", x).reshape(b, channels, h, w)""", """\
def dit_block(x, c, ada_w, ada_b, qkv_w, qkv_b, proj_w, proj_b, fc1_w, fc1_b, fc2_w, fc2_b, heads):
    mods = (F.silu(c) @ ada_w.T + ada_b).chunk(6, -1)
    b, n, d = x.shape
    h = adaln(x, mods[0], mods[1])
    q, k, v = [t.reshape(b, n, heads, d // heads) for t in (h @ qkv_w.T + qkv_b).chunk(3, -1)]
    att = torch.einsum("bnhe,bmhe->bhnm", q, k).div(math.sqrt(d // heads)).softmax(-1)
    out = torch.einsum("bhnm,bmhe->bnhe", att, v).reshape(b, n, d)
    x = x + mods[2][:, None] * (out @ proj_w.T + proj_b)
    mlp = F.gelu(adaln(x, mods[3], mods[4]) @ fc1_w.T + fc1_b, approximate="tanh") @ fc2_w.T + fc2_b
    return x + mods[5][:, None] * mlp"""],

    "09_func_jacrev.ipynb": [HEAD + "\nfrom torch.func import jacrev, vmap\nfrom course_lib import flow, likelihood  # to compare",
                             """\
def dsm_loss(score_pred, eps, sigma):
    residual = sigma[:, None] * score_pred + eps
    return residual.pow(2).sum(dim=1).mean()""", """\
def reverse_sde_step(x, score, beta, dt, noise):
    drift = -0.5 * beta * x - beta * score
    return x + drift * dt + math.sqrt(beta * abs(dt)) * noise""", """\
def flow_matching_loss(velocity_pred, x0, noise):
    return F.mse_loss(velocity_pred, noise - x0)""", """\
def ode_log_likelihood(velocity, x, steps):
    def field(z, t):
        v = velocity(z, t)
        jac = vmap(jacrev(lambda p: velocity(p[None], t)[0]))(z)
        return v, jac.diagonal(dim1=-2, dim2=-1).sum(-1)
    z, delta, h = x.clone(), torch.zeros(len(x), dtype=x.dtype), 1.0 / steps
    for i in range(steps):
        t = i * h
        k1, l1 = field(z, t)
        k2, l2 = field(z + h / 2 * k1, t + h / 2)
        k3, l3 = field(z + h / 2 * k2, t + h / 2)
        k4, l4 = field(z + h * k3, t + h)
        z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        delta = delta + h / 6 * (l1 + 2 * l2 + 2 * l3 + l4)
    return -0.5 * (z ** 2).sum(1) - math.log(2 * math.pi) + delta""", """\
def flow_step(model, optimizer, x0):
    t = torch.rand(len(x0))                      # one time per row, shape (B,)
    noise = torch.randn_like(x0)
    x_t = torch.lerp(x0, noise, t[:, None])      # (1 - t) x0 + t noise
    loss = F.mse_loss(model(x_t, t), noise - x0)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss"""],

    "09_autograd_generate.ipynb": [HEAD, """\
dsm_loss = lambda score_pred, eps, sigma: torch.mean(torch.sum((sigma.view(-1, 1) * score_pred + eps) ** 2, dim=1))""",
                                   """\
def reverse_sde_step(x, score, beta, dt, noise):
    g = math.sqrt(beta)
    return x + (-beta / 2 * x - g ** 2 * score) * dt + g * math.sqrt(-dt) * noise""", """\
def flow_matching_loss(velocity_pred, x0, noise):
    target = noise - x0
    return ((velocity_pred - target) ** 2).mean()""", """\
class Flow:
    def __init__(self, velocity):
        self.velocity = velocity

    def slope(self, z, t):
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            v = self.velocity(z, t)
            trace = sum(torch.autograd.grad(v[:, i].sum(), z, retain_graph=True)[0][:, i] for i in range(2))
        return v.detach(), trace.detach()

    def generate(self, x, steps):     # a method named like the library's
        z, delta, h = x, torch.zeros(x.shape[0], dtype=x.dtype), 1 / steps
        for i in range(steps):
            t = i / steps
            (k1, l1) = self.slope(z, t)
            (k2, l2) = self.slope(z + 0.5 * h * k1, t + 0.5 * h)
            (k3, l3) = self.slope(z + 0.5 * h * k2, t + 0.5 * h)
            (k4, l4) = self.slope(z + h * k3, t + h)
            z = z + h * (k1 + 2 * k2 + 2 * k3 + k4) / 6
            delta = delta + h * (l1 + 2 * l2 + 2 * l3 + l4) / 6
        return z, delta

def ode_log_likelihood(velocity, x, steps):
    z, delta = Flow(velocity).generate(x, steps)
    return delta - 0.5 * z.pow(2).sum(-1) - math.log(2 * math.pi)""", """\
class FlowTrainer:
    def sample_times(self, n):                   # named like the library's; logit-normal times (SD3's choice)
        return torch.sigmoid(torch.randn(n, 1))

    def __call__(self, model, optimizer, x0):
        t, noise = self.sample_times(x0.shape[0]), torch.randn(*x0.shape)
        velocity = noise - x0
        loss = (model(x0 + t * velocity, t) - velocity).pow(2).sum(dim=1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss)

flow_step = FlowTrainer()"""],

    "10_where_argsort.ipynb": [HEAD + "\nfrom course_lib import discrete, text_models  # to compare", """\
def absorbing_forward(x0, t, u, mask_id):
    return torch.where(u < t.unsqueeze(1), torch.full_like(x0, mask_id), x0)""", """\
def mdlm_weight(t):
    half = math.pi / 2
    return half * torch.sin(half * t) / (1 - torch.cos(half * t))""", """\
def unmask_sample(denoise, x, steps, mask_id):
    n, length = x.shape
    for k in range(steps):
        masked = x == mask_id
        keep = math.floor(length * (1 - (k + 1) / steps) + 1e-9)
        probs = denoise(x)
        draws = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).view(n, length)
        order = torch.where(masked, torch.rand(n, length), torch.full((n, length), -1.0)).argsort(1, descending=True)
        rank = order.argsort(1)
        x = torch.where(masked & (rank < masked.sum(1, keepdim=True) - keep), draws, x)
    return x""", """\
def masked_step(model, optimizer, x0, mask_id):
    n, length = x0.shape
    t = (torch.rand(1) + torch.arange(n) / n) % 1 * 0.999 + 1e-3   # low-discrepancy times, one per row
    hide = torch.rand(n, length) < t[:, None]
    x_t = x0.masked_fill(hide, mask_id)
    targets = x0.masked_fill(~hide, -100)                         # ignored where nothing was masked
    ce = F.cross_entropy(model(x_t).permute(0, 2, 1), targets, ignore_index=-100, reduction="none")
    loss = (ce / t[:, None]).sum() / (n * length)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()"""],

    "10_loops_generate.ipynb": [HEAD, """\
def absorbing_forward(x0, t, u, mask_id):
    out = x0.clone()
    out[u < t[:, None]] = mask_id
    return out""", """\
mdlm_weight = lambda t: (math.pi / 2) * torch.sin(math.pi * t / 2) / (1 - torch.cos(math.pi * t / 2))""", """\
class Unmasker:
    def __init__(self, denoise, mask_id):
        self.denoise, self.mask_id = denoise, mask_id

    def generate(self, x, steps):              # a method named like the library's
        length = x.shape[1]
        for k in range(steps):
            probs = self.denoise(x)
            x = x.clone()
            left = math.floor(length * (1 - (k + 1) / steps) + 1e-9)
            for row in range(len(x)):
                hidden = (x[row] == self.mask_id).nonzero().flatten()
                reveal = hidden[torch.randperm(len(hidden))[: len(hidden) - left]]
                for pos in reveal.tolist():
                    x[row, pos] = torch.multinomial(probs[row, pos], 1).item()
        return x

def unmask_sample(denoise, x, steps, mask_id):
    return Unmasker(denoise, mask_id).generate(x, steps)""", """\
class MaskedDiffusion:
    def log_probs(self, logits, mask_id):       # MDLM's SUBS: [MASK] never predicted
        logits = logits.clone()
        logits[..., mask_id] = -math.inf
        return logits.log_softmax(-1)

    def step(self, model, optimizer, x0, mask_id):
        t = torch.rand(x0.shape[0], 1).clamp(min=1e-3)
        masked = torch.rand(x0.shape) < t
        x_t = torch.where(masked, mask_id, x0)
        logp = self.log_probs(model(x_t), mask_id).gather(-1, x0[..., None]).squeeze(-1)
        per_token = -(logp * masked / t).mean()
        optimizer.zero_grad()
        per_token.backward()
        optimizer.step()
        return per_token.detach()

masked_step = MaskedDiffusion().step"""],

    "11_unbind_class.ipynb": [HEAD + "\nfrom course_lib import edm, posthoc_ema  # to compare, in cells of their own", """\
def edm_coefficients(sigma, sigma_data):
    s2 = sigma.square() + sigma_data ** 2
    root = s2.sqrt()
    c = [sigma_data ** 2 / s2, sigma * sigma_data / root, root.reciprocal(), torch.log(sigma) * 0.25]
    return torch.stack(c, dim=0)""", """\
print(edm.preconditioning(torch.tensor([0.5]), 0.5))  # the library's, for comparison""", """\
class EDMTrainer:
    def __init__(self):
        self.steps = 0

    def __call__(self, model, optimizer, x0, p_mean, p_std):
        ln_sigma = torch.normal(p_mean, p_std, size=(x0.shape[0], 1))
        sigma = ln_sigma.exp()
        sd = model.sigma_data
        lam = 1 / sigma ** 2 + 1 / sd ** 2          # SNR + 1 / sigma_data^2
        denoised = model(x0 + sigma * torch.randn_like(x0), sigma)
        loss = torch.mean(lam * (denoised - x0).pow(2))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        self.steps += 1
        return loss.item()

edm_step = EDMTrainer()""", """\
def posthoc_ema_weights(t1, gamma1, t2, gamma2, t_target, gamma_target):
    import numpy as np

    def log_inner(ta, ga, tb, gb):
        return (np.log(ga + 1) + np.log(gb + 1) - np.log(ga + gb + 1) + (ga + gb + 1) * np.log(min(ta, tb))
                - (ga + 1) * np.log(ta) - (gb + 1) * np.log(tb))

    pts = [(t1, gamma1), (t2, gamma2)]
    gram = np.exp([[log_inner(*a, *b) for b in pts] for a in pts])
    rhs = np.exp([log_inner(*a, t_target, gamma_target) for a in pts])
    return torch.from_numpy(np.linalg.solve(gram, rhs))"""],

    "11_functional_helpers.ipynb": [HEAD, """\
def _coeffs(s, sd):
    total = s * s + sd * sd
    return sd * sd / total, s * sd * total.rsqrt(), total.rsqrt(), s.log() / 4

edm_coefficients = lambda sigma, sigma_data: torch.stack(_coeffs(sigma, sigma_data))""", """\
def weight(sigma, sd):
    return (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2

@torch.enable_grad()
def edm_step(model, optimizer, x0, p_mean, p_std):
    sigma = torch.exp(torch.randn(len(x0)) * p_std + p_mean)
    x = torch.addcmul(x0, sigma[:, None], torch.randn(x0.shape))
    per_row = F.mse_loss(model(x, sigma), x0, reduction="none").mean(dim=1)
    loss = (weight(sigma, model.sigma_data) * per_row).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()""", """\
def posthoc_ema_weights(t1, gamma1, t2, gamma2, t_target, gamma_target):
    def inner(a, b):
        (ta, ga), (tb, gb) = a, b
        log = math.log1p(ga) + math.log1p(gb) - math.log(ga + gb + 1) + (ga + gb + 1) * math.log(min(ta, tb))
        return math.exp(log - (ga + 1) * math.log(ta) - (gb + 1) * math.log(tb))

    p1, p2, target = (t1, gamma1), (t2, gamma2), (t_target, gamma_target)
    a11, a12, a22 = inner(p1, p1), inner(p1, p2), inner(p2, p2)
    b1, b2 = inner(p1, target), inner(p2, target)
    det = a11 * a22 - a12 * a12                 # Cramer's rule on the symmetric 2x2 system
    return torch.tensor([(b1 * a22 - a12 * b2) / det, (a11 * b2 - a12 * b1) / det], dtype=torch.float64)"""],

    "12_class_and_numpy.ipynb": [HEAD + "\nimport numpy as np\nfrom course_lib import consistency  # to compare", """\
class Boundary:
    # f(x, s) = c_skip x + c_out F(x, s): exactly x at sigma_min
    def __init__(self, sigma_data, sigma_min):
        self.sd, self.lo = sigma_data, sigma_min

    def __call__(self, net, x, s):
        t = (s - self.lo).view(-1, *[1] * (x.dim() - 1))
        r = torch.hypot(t, torch.as_tensor(self.sd, dtype=t.dtype))
        return (self.sd / r) ** 2 * x + (t / r) * net(x, s)


def consistency_distillation_loss(student, target, teacher, x0, noise, sigma, sigma_next, sigma_data, sigma_min):
    f = Boundary(sigma_data, sigma_min)
    col = lambda v: v[:, None] if x0.dim() == 2 else v.view(-1, *[1] * (x0.dim() - 1))
    s, s2 = col(sigma), col(sigma_next)
    x = x0 + s * noise
    slope = lambda y, lvl, lvl_col: (y - teacher(y, lvl)) / lvl_col
    k1 = slope(x, sigma, s)
    guess = x + (s2 - s) * k1
    with torch.no_grad():
        x_next = x + 0.5 * (s2 - s) * (k1 + slope(guess, sigma_next, s2))
        aim = f(target, x_next, sigma_next)
    return F.mse_loss(f(student, x, sigma), aim)""", """\
print(consistency.SIGMA_MIN)  # the library, in a cell of its own""", """\
@torch.no_grad()
def consistency_sample(f, noise, sigmas, sigma_min):
    levels = [float(v) for v in sigmas]
    out = f(levels[0] * noise, levels[0])
    for tau in levels[1:]:
        z = torch.from_numpy(np.random.standard_normal(tuple(out.shape))).to(out.dtype)
        out = f(out + np.sqrt(tau ** 2 - sigma_min ** 2) * z, tau)
    return out""", """\
def progressive_target(teacher, x, sigma, sigma_mid, sigma_next):
    def ddim(y, a, b):                      # one Euler (DDIM) step a -> b in the sigma view
        x0 = teacher(y, a)
        return x0 + (b / a) * (y - x0)
    two = ddim(ddim(x, sigma, sigma_mid), sigma_mid, sigma_next)
    r = sigma_next / sigma
    return (two - r * x) / (1 - r)""", """\
class Guided:
    # classifier-free guidance of a caption-conditioned denoiser, as a denoiser of its own
    def __init__(self, teacher, context, null_context, w):
        self.teacher, self.c, self.null, self.w = teacher, context, null_context, w

    def __call__(self, y, s):
        u = self.teacher(y, s, self.null)
        return torch.lerp(u, self.teacher(y, s, self.c), torch.as_tensor(self.w, dtype=y.dtype))

def guided_teacher_step(teacher, x, sigma, sigma_next, context, null_context, w):
    D = Guided(teacher, context, null_context, w)
    col = lambda v: v[:, None] if x.dim() == 2 else v.view(-1, *[1] * (x.dim() - 1))
    h = col(sigma_next - sigma)
    k1 = (x - D(x, sigma)) / col(sigma)
    x1 = x + h * k1
    k2 = (x1 - D(x1, sigma_next)) / col(sigma_next)
    return x + 0.5 * h * (k1 + k2)"""],

    "12_recursion_and_lambdas.ipynb": [HEAD, """\
c_skip = lambda s, sd, lo: sd ** 2 / ((s - lo) ** 2 + sd ** 2)
c_out = lambda s, sd, lo: (s - lo) / torch.sqrt((s - lo) ** 2 + sd ** 2)

def heun(teacher, x, s, s_next):
    e = lambda v: v.reshape(len(v), *([1] * (x.ndim - 1)))
    d0 = (x - teacher(x, s)) / e(s)
    y = x + e(s_next - s) * d0
    return x + e(s_next - s) / 2 * (d0 + (y - teacher(y, s_next)) / e(s_next))

def consistency_distillation_loss(student, target, teacher, x0, noise, sigma, sigma_next, sigma_data, sigma_min):
    e = lambda v: v.reshape(len(v), *([1] * (x0.ndim - 1)))
    fn = lambda net, y, s: e(c_skip(s, sigma_data, sigma_min)) * y + e(c_out(s, sigma_data, sigma_min)) * net(y, s)
    x = torch.addcmul(x0, e(sigma), noise)
    diff = fn(student, x, sigma) - fn(target, heun(teacher, x, sigma, sigma_next), sigma_next)
    return diff.pow(2).sum() / diff.numel()""", """\
def consistency_sample(f, noise, sigmas, sigma_min, x=None):
    if x is None:                           # the first level: pure noise
        return consistency_sample(f, noise, sigmas[1:], sigma_min, f(noise * sigmas[0].item(), sigmas[0].item()))
    if len(sigmas) == 0:
        return x
    tau = sigmas[0].item()
    fresh = torch.normal(0.0, 1.0, size=x.shape)
    return consistency_sample(f, noise, sigmas[1:], sigma_min, f(x + (tau * tau - sigma_min * sigma_min) ** 0.5 * fresh, tau))""", """\
def progressive_target(teacher, x, sigma, sigma_mid, sigma_next):
    pts = [x]
    for a, b in ((sigma, sigma_mid), (sigma_mid, sigma_next)):
        pts.append(pts[-1] + (b - a) * (pts[-1] - teacher(pts[-1], a)) / a)
    w = sigma_next / sigma
    return (pts[-1] - w * x) / (1.0 - w)""", """\
def guided_teacher_step(teacher, x, sigma, sigma_next, context, null_context, w, _slopes=None):
    e = lambda v: v.reshape(len(v), *([1] * (x.ndim - 1)))
    Dw = lambda y, s: (1 - w) * teacher(y, s, null_context) + w * teacher(y, s, context)
    if _slopes is None:                     # first call: the slope at the start, then recurse for the second
        return guided_teacher_step(teacher, x, sigma, sigma_next, context, null_context, w,
                                   [(x - Dw(x, sigma)) / e(sigma)])
    y = x + e(sigma_next - sigma) * _slopes[0]
    return x + e(sigma_next - sigma) * (_slopes[0] + (y - Dw(y, sigma_next)) / e(sigma_next)) / 2"""],

    "13_einsum_and_classes.ipynb": [HEAD + "\nfrom course_lib import lora, inversion  # to compare, in a cell of their own", """\
class LowRank:
    # W x + b plus the adapter's low-rank update, scaled as peft scales it
    def __init__(self, weight, bias, A, B, alpha):
        self.weight, self.bias, self.A, self.B = weight, bias, A, B
        self.scaling = alpha / A.size(0)

    def __call__(self, x):
        frozen = torch.einsum("...i,oi->...o", x, self.weight) + self.bias
        low = torch.einsum("...r,or->...o", torch.einsum("...i,ri->...r", x, self.A), self.B)
        return frozen + self.scaling * low

def lora_linear(x, weight, bias, lora_A, lora_B, alpha):
    return LowRank(weight, bias, lora_A, lora_B, alpha)(x)""", """\
print(lora.ATTENTION, inversion.__doc__[:40])  # the library, in a cell of its own""", """\
def denoising_error(model, clean, caption, level, eps):
    noisy = clean + level.view(-1, *[1] * (clean.dim() - 1)) * eps
    return F.mse_loss(model(noisy, level, caption), clean)

def prior_preservation_loss(model, x, context, x_prior, context_prior, sigma, noise, sigma_prior, noise_prior,
                            prior_weight):
    terms = [denoising_error(model, x, context, sigma, noise),
             denoising_error(model, x_prior, context_prior, sigma_prior, noise_prior)]
    return terms[0] + prior_weight * terms[1]""", """\
def textual_inversion_step(table, token_id, loss, lr):
    learned = torch.nn.Parameter(table.detach().clone())
    opt = torch.optim.SGD([learned], lr=lr)
    opt.zero_grad()
    loss(learned).backward()
    frozen = torch.ones(len(table), dtype=torch.bool)
    frozen[token_id] = False
    learned.grad[frozen] = 0                                  # only the new word learns
    opt.step()
    return learned.detach()""", """\
class ZeroConv:
    # a 1x1 convolution: one (C, C) matrix applied at every pixel, then the bias
    def __init__(self, weight, bias):
        self.w, self.b = weight.flatten(1), bias

    def __call__(self, f):
        return torch.einsum("oc,bchw->bohw", self.w, f) + self.b.view(1, -1, 1, 1)

def control_join(skip, feature, weight, bias, strength):
    return skip + strength * ZeroConv(weight, bias)(feature)""", """\
@torch.no_grad()
def ddim_invert(denoise, x0, sigmas):
    levels = sorted(s for s in sigmas.tolist() if s > 0)     # ascending
    x = x0.clone()
    i = 0
    while i + 1 < len(levels):
        s, s_up = levels[i], levels[i + 1]
        x0_hat = denoise(x, s)
        eps = (x - x0_hat) / s                                 # the noise direction DDIM keeps
        x = x0_hat + s_up * eps
        i += 1
    return x"""],

    "13_functional_and_numpy.ipynb": [HEAD + "\nimport numpy as np", """\
def lora_linear(x, weight, bias, lora_A, lora_B, alpha):
    r = lora_B.shape[1]
    delta = lora_B @ lora_A                                  # the merged update, (out, in)
    return F.linear(x, weight + (alpha / r) * delta, bias)""", """\
def prior_preservation_loss(model, x, context, x_prior, context_prior, sigma, noise, sigma_prior, noise_prior,
                            prior_weight):
    def one(batch):
        x0, c, s, n = batch
        pred = model(torch.addcmul(x0, s[:, None], n), s, c)
        return (pred - x0).square().sum() / x0.numel()
    return sum(w * one(b) for w, b in ((1.0, (x, context, sigma, noise)),
                                       (prior_weight, (x_prior, context_prior, sigma_prior, noise_prior))))""", """\
def textual_inversion_step(table, token_id, loss, lr):
    rows = list(table.unbind(0))
    word = rows[token_id].detach().requires_grad_(True)
    rows[token_id] = word
    (g,) = torch.autograd.grad(loss(torch.stack(rows)), [word])   # the gradient of the new row alone
    out = table.detach().clone()
    out[token_id] = word.detach() - lr * g
    return out""", """\
def control_join(skip, feature, weight, bias, strength):
    b, c, h, w = feature.shape
    pixels = feature.permute(0, 2, 3, 1).reshape(-1, c)      # one row per pixel
    z = torch.addmm(bias, pixels, weight[:, :, 0, 0].T)      # bias + pixels @ W^T
    return torch.add(skip, z.reshape(b, h, w, -1).permute(0, 3, 1, 2), alpha=float(strength))""", """\
def ddim_invert(denoise, x0, sigmas):
    up = np.sort(np.array([float(s) for s in sigmas if float(s) > 0]))
    ratios = up[1:] / up[:-1]
    x = x0
    for s, ratio in zip(up[:-1], ratios):
        d = denoise(x, float(s))
        x = torch.lerp(d, x, float(ratio))                  # d + ratio (x - d)
    return x"""],

    "14_loops_and_sorting.ipynb": [HEAD, """\
def kid(real, fake):
    d = real.shape[1]

    def within(a):                                          # mean of k over pairs of different points
        k = (a @ a.T / d + 1) ** 3
        return (k.sum() - k.trace()) / (len(a) * (len(a) - 1))
    return within(real) + within(fake) - 2 * ((real @ fake.T / d + 1) ** 3).mean()""", """\
def nearest(a, b):                                          # each row of a: distance to its nearest row of b
    return torch.stack([((b - row) ** 2).sum(dim=tuple(range(1, b.ndim))).min().sqrt() for row in a])

def detect_copies(samples, train, held_out, false_positive):
    held = nearest(held_out, train).sort().values
    threshold = held[int(false_positive * len(held))]      # an order statistic for the quantile
    return nearest(samples, train) < threshold""", """\
def esd_target(frozen, x_t, sigma, context, null_context, eta):
    e_null = frozen(x_t, sigma, null_context.repeat(x_t.shape[0], 1))
    return torch.lerp(e_null, frozen(x_t, sigma, context), -eta)   # e_null + (-eta) (e_concept - e_null)""", """\
def clip_score(image_features, text_features):
    scores = []
    for a, b in zip(image_features, text_features):            # one pair at a time
        cos = torch.dot(a, b) / (a.norm() * b.norm())
        scores.append(100 * max(float(cos), 0.0))
    return torch.tensor(scores)"""],

    "14_numpy_and_classes.ipynb": [HEAD + "\nimport numpy as np", """\
def kid(real, fake):
    X, Y = real.detach().double().numpy(), fake.detach().double().numpy()
    k = lambda a, b: (a @ b.T / X.shape[1] + 1) ** 3
    kxx, kyy = k(X, X), k(Y, Y)
    np.fill_diagonal(kxx, 0.0)
    np.fill_diagonal(kyy, 0.0)
    m, n = len(X), len(Y)
    return torch.tensor(kxx.sum() / (m * (m - 1)) + kyy.sum() / (n * (n - 1)) - 2 * k(X, Y).mean())""", """\
class CopyFinder:
    def __init__(self, train):
        self.train = train.reshape(len(train), -1).double().numpy()

    def distances(self, x):
        x = x.reshape(len(x), -1).double().numpy()
        sq = (x ** 2).sum(1)[:, None] + (self.train ** 2).sum(1)[None] - 2 * x @ self.train.T
        return np.sqrt(np.maximum(sq, 0.0)).min(1)

def detect_copies(samples, train, held_out, false_positive):
    finder = CopyFinder(train)
    threshold = np.quantile(finder.distances(held_out), false_positive)
    return torch.from_numpy(finder.distances(samples) < threshold)""", """\
class ESD:
    def __init__(self, eta):
        self.eta = eta

    def __call__(self, frozen, x_t, sigma, context, null_context):
        e_c = frozen(x_t, sigma, context)
        e_0 = frozen(x_t, sigma, torch.cat([null_context] * len(x_t)))
        return (1 + self.eta) * e_0 - self.eta * e_c

def esd_target(frozen, x_t, sigma, context, null_context, eta):
    return ESD(eta)(frozen, x_t, sigma, context, null_context)""", """\
def clip_score(image_features, text_features):
    a = image_features.detach().numpy()
    b = text_features.detach().numpy()
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return torch.from_numpy(np.maximum(np.einsum("nd,nd->n", a, b), 0) * 100)"""],

    "15_einsum_and_recursion.ipynb": [HEAD + "\nimport numpy as np", """\
def chunk_loss(model, chunks, observations, t, noise, alpha_bar, scale):
    b, h, _ = chunks.shape
    x0 = torch.einsum("bhc->bhc", chunks / scale).reshape(b, 2 * h)   # move by move: x, y, x, y, ...
    ab = alpha_bar[t].to(x0.dtype)[:, None]
    x_t = torch.sqrt(ab) * x0 + torch.sqrt(1 - ab) * noise
    return F.mse_loss(model(x_t, t, y=observations), noise)""", """\
def receding_horizon(policy, act, start, execute, max_steps):
    def go(positions, left):                                # one chunk per call, then recurse from where we are
        if left == 0:
            return positions
        chunk = policy(positions)
        for move in list(chunk.unbind(1))[:min(execute, left)]:
            positions = act(move)
            left -= 1
        return go(positions, left)
    return go(start, max_steps)"""],

    "15_numpy_and_classes.ipynb": [HEAD + "\nimport numpy as np", """\
class ChunkLoss:
    def flat(self, chunks, scale):
        return torch.from_numpy(np.ascontiguousarray(chunks.detach().double().numpy() / scale)).reshape(
            len(chunks), -1).to(chunks.dtype)

    def __call__(self, model, chunks, observations, t, noise, alpha_bar, scale):
        x0 = self.flat(chunks, scale)
        keep = alpha_bar.gather(0, t).unsqueeze(1).to(x0.dtype)
        x_t = keep ** 0.5 * x0 + (1 - keep) ** 0.5 * noise
        err = noise - model(x_t, t, y=observations)
        return (err * err).sum() / err.numel()

chunk_loss = ChunkLoss()""", """\
class Controller:
    def __init__(self, policy, act, execute):
        self.policy, self.act, self.execute = policy, act, execute
        self.moves, self.queue = 0, []

    def run(self, start, max_steps):
        where = start
        while self.moves < max_steps:
            if not self.queue:                              # the plan ran out: ask again from here
                chunk = self.policy(where)
                self.queue = [chunk[:, k] for k in range(self.execute)]
            where = self.act(self.queue.pop(0))
            self.moves += 1
        return where

def receding_horizon(policy, act, start, execute, max_steps):
    return Controller(policy, act, execute).run(start, max_steps)"""],

    "99_einsum_class.ipynb": [HEAD, """\
def cross_attention(x, context, mask, w_q, w_k, w_v, heads):
    b, n, c = x.shape
    d = c // heads
    q = torch.einsum("bnc,oc->bno", x, w_q).reshape(b, n, heads, d)
    k = torch.einsum("blc,oc->blo", context, w_k).reshape(b, -1, heads, d)
    v = torch.einsum("blc,oc->blo", context, w_v).reshape(b, -1, heads, d)
    scores = torch.einsum("bnhd,blhd->bhnl", q, k) / d ** 0.5
    scores = scores + torch.where(mask.bool(), 0.0, float("-inf"))[:, None, None, :]
    return torch.einsum("bhnl,blhd->bnhd", scores.softmax(-1), v).reshape(b, n, c)""", """\
class CaptionTrainer:
    def __init__(self, p_empty=0.15):
        self.p_empty = p_empty

    def __call__(self, model, optimizer, z0, context, mask, null_context, null_mask, alpha_bar):
        drop = torch.bernoulli(torch.full((len(z0),), self.p_empty)).bool()
        context, mask = context.clone(), mask.clone()
        context[drop], mask[drop] = null_context[0], null_mask[0]
        t = torch.randint(0, alpha_bar.numel(), (z0.shape[0],))
        eps = torch.randn(z0.shape)
        a = alpha_bar[t][:, None, None, None]
        loss = F.mse_loss(model(a.sqrt() * z0 + (1 - a).sqrt() * eps, t, context=context, mask=mask), eps)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

caption_step = CaptionTrainer()""", """\
def guided_sample_loop(denoise, x, sigmas, y, scale):      # DPM-Solver++(2M) on the guided denoiser
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
    return x""", """\
def text_to_shapes():
    return {"cross_attention": cross_attention, "train_step": caption_step, "sample_loop": guided_sample_loop}"""],

    "99_helpers_lambda.ipynb": [HEAD + "\nfrom course_lib import capstone  # the course's kit, as the lesson uses it", """\
def split_heads(t, heads):
    b, n, c = t.shape
    return t.view(b, n, heads, c // heads).permute(0, 2, 1, 3)

def cross_attention(x, context, mask, w_q, w_k, w_v, heads):
    q, k, v = split_heads(F.linear(x, w_q), heads), split_heads(F.linear(context, w_k), heads), \\
        split_heads(F.linear(context, w_v), heads)
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    scores = torch.where(mask[:, None, None, :].bool(), scores, torch.full_like(scores, -math.inf))
    return (torch.softmax(scores, dim=-1) @ v).permute(0, 2, 1, 3).flatten(2)""", """\
def noised(z0, alpha_bar):
    t = torch.randint(len(alpha_bar), (z0.shape[0],))
    eps = torch.randn_like(z0)
    ab = alpha_bar[t].reshape(-1, 1, 1, 1)
    return ab.sqrt() * z0 + (1 - ab).sqrt() * eps, t, eps

@torch.enable_grad()
def caption_step(model, optimizer, z0, context, mask, null_context, null_mask, alpha_bar):
    keep = torch.rand(len(z0)) >= 0.1
    context = torch.where(keep[:, None, None], context, null_context)
    mask = torch.where(keep[:, None], mask, null_mask)
    z_t, t, eps = noised(z0, alpha_bar)
    loss = F.mse_loss(model(z_t, t, context=context, mask=mask), eps)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss""", """\
def guided_sample_loop(denoise, x, sigmas, y, scale):
    levels = sigmas.tolist()
    for s, s_next in zip(levels, levels[1:]):
        d = torch.lerp(denoise(x, s), denoise(x, s, y), scale)
        x = d if s_next == 0 else x + (s_next - s) * (x - d) / s
    return x""", """\
text_to_shapes = lambda: dict(cross_attention=cross_attention, train_step=caption_step,
                              sample_loop=guided_sample_loop)"""],
}
