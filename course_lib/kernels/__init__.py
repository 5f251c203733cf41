"""Fused kernels for diffusion: a Triton kernel on CUDA tensors, the pure-torch reference everywhere else.

Each op has a `*_reference` written with ordinary torch ops (the definition, and what CPUs run) and a public
function that dispatches: impl="auto" launches the Triton kernel (course_lib.kernels.triton_kernels) when every tensor
is on a CUDA device, Triton imports and no gradient is needed; impl="triton" forces it (with TRITON_INTERPRET=1
set before the first launch it runs on CPU tensors in Triton's interpreter, which is how the tests check it);
impl="torch" forces the reference. Non-contiguous inputs are copied to contiguous ones first.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IMPLS = ("auto", "torch", "triton")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TARGETS = (None, "eps", "x0", "v")
MAX_GROUP = 1 << 16  # elements of one (sample, group) the GroupNorm kernel holds in one block


def _compiling() -> bool:
    """True while torch.compile traces (torch.compiler.is_compiling, torch >= 2.3; False before)."""
    f = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(f()) if f else False


def triton_available() -> bool:
    """True when the triton package imports."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernel_source(name: str) -> str:
    """The source of a Triton kernel in triton_kernels.py, read from the file: works without Triton installed (the
    same text as inspect.getsource of the kernel's Python function, decorator excluded)."""
    import ast
    from pathlib import Path

    path = Path(__file__).with_name("triton_kernels.py")
    text = path.read_text()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            lines = text.splitlines(keepends=True)
            return "".join(lines[node.lineno - 1:node.end_lineno])
    kernels = sorted(n.name for n in ast.walk(ast.parse(text)) if isinstance(n, ast.FunctionDef) and n.decorator_list)
    raise ValueError(f"no kernel named {name!r} in {path.name}; the kernels are {', '.join(kernels)}")


def _tk():
    from . import triton_kernels

    return triton_kernels


def use_triton(impl: str, *tensors: torch.Tensor) -> bool:
    """Whether `impl` means the Triton kernel for these tensors (see the module docstring)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return False
    kernel_dtypes = all(t.dtype in DTYPES for t in tensors)
    if impl == "triton":
        if not triton_available():
            raise ValueError("impl='triton' needs the triton package (pip install triton)")
        if not kernel_dtypes:
            raise TypeError(f"the Triton kernels take float32, bfloat16 or float16 tensors, got "
                            f"{sorted({str(t.dtype) for t in tensors})}")
        return True
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return all(t.is_cuda for t in tensors) and kernel_dtypes and not needs_grad and triton_available()


def _check(name: str, like: torch.Tensor, *others: torch.Tensor) -> None:
    if not isinstance(like, torch.Tensor):
        raise TypeError(f"{name}: expected tensors, got {type(like).__name__}")
    if not like.is_floating_point():
        raise TypeError(f"{name}: expected floating-point tensors, got {like.dtype}")
    for o in others:
        if not isinstance(o, torch.Tensor):
            raise TypeError(f"{name}: expected tensors, got {type(o).__name__}")
        if o.shape != like.shape or o.dtype != like.dtype or o.device != like.device:
            raise ValueError(f"{name}: every tensor must match the first one's shape {tuple(like.shape)}, dtype "
                             f"{like.dtype} and device {like.device}; got {tuple(o.shape)}, {o.dtype}, {o.device}")


def _grid(n: int, block: int):
    return (max(1, -(-n // block)),)


# ---- forward noising -------------------------------------------------------------------------------


def q_sample_reference(x0, eps, t, sqrt_ab, sqrt_1m_ab, target=None):
    """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps per sample (Ho et al. 2020, eq. 4), and the training target."""
    shape = (-1,) + (1,) * (x0.ndim - 1)
    a, s = (table.to(x0.device)[t].view(shape).float() for table in (sqrt_ab, sqrt_1m_ab))
    x0f, epsf = x0.float(), eps.float()
    x_t = (a * x0f + s * epsf).to(x0.dtype)
    if target == "v":  # Salimans & Ho 2022, eq. 5
        return x_t, (a * epsf - s * x0f).to(x0.dtype)
    return x_t, _input_target(target, x0, eps)


def _input_target(target, x0, eps):
    """The target when it is one of the inputs (or none): returned as is, nothing computed or written."""
    return {None: None, "eps": eps, "x0": x0}[target]


def q_sample(x0, eps, t, sqrt_ab, sqrt_1m_ab, target: str | None = None, impl: str = "auto"):
    """Fused forward noising: (x_t, target) with t gathered from the schedule's tables inside the kernel.

    target None, "eps" or "x0" returns that input itself (no bytes written); "v" is computed in the same pass.
    """
    _check("q_sample", x0, eps)
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    t = torch.as_tensor(t, device=x0.device)
    if t.ndim != 1 or len(t) != len(x0) or t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"t must hold one integer step per sample, shape ({len(x0)},); got {tuple(t.shape)} {t.dtype}")
    # checked eagerly (a GPU sync); skipped while torch.compile traces, where it would break the graph
    if len(t) and not _compiling() and (int(t.min()) < 0 or int(t.max()) >= len(sqrt_ab)):
        raise ValueError(f"t must be in [0, {len(sqrt_ab) - 1}], got values in [{int(t.min())}, {int(t.max())}]")
    if not use_triton(impl, x0, eps):
        return q_sample_reference(x0, eps, t, sqrt_ab, sqrt_1m_ab, target)
    tk = _tk()
    x0c, epsc = x0.contiguous(), eps.contiguous()
    x_t = torch.empty_like(x0c)
    v = torch.empty_like(x0c) if target == "v" else x_t
    n = x0c.numel()
    tk.q_sample_kernel[_grid(n, tk.BLOCK)](
        x0c, epsc, t.contiguous(), sqrt_ab.to(x0.device, torch.float32).contiguous(),
        sqrt_1m_ab.to(x0.device, torch.float32).contiguous(), x_t, v, n, max(1, n // max(1, len(x0))),
        WRITE_V=target == "v", BLOCK=tk.BLOCK)
    return x_t, (v if target == "v" else _input_target(target, x0, eps))


# ---- sampler updates: every one is a linear combination, done in one pass --------------------------


def lincomb_reference(coefs, tensors):
    """sum_i coefs[i] * tensors[i], accumulated in float32."""
    acc = sum(float(c) * t.float() for c, t in zip(coefs, tensors))
    return acc.to(tensors[0].dtype)


def lincomb(coefs, tensors, impl: str = "auto"):
    """sum_i coefs[i] * tensors[i] for 2 to 4 same-shaped tensors: one read of each, one write."""
    if not 2 <= len(tensors) <= 4 or len(coefs) != len(tensors):
        raise ValueError(f"lincomb takes 2 to 4 tensors and as many coefficients; got {len(tensors)} and {len(coefs)}")
    _check("lincomb", *tensors)
    if not use_triton(impl, *tensors):
        return lincomb_reference(coefs, tensors)
    tk = _tk()
    ts = [t.contiguous() for t in tensors]
    ts += [ts[0]] * (4 - len(ts))
    cs = [float(c) for c in coefs] + [0.0] * (4 - len(coefs))
    out = torch.empty_like(ts[0])
    n = out.numel()
    tk.lincomb_kernel[_grid(n, tk.BLOCK)](out, *ts, *cs, n, TERMS=len(tensors), BLOCK=tk.BLOCK)
    return out


def euler_step(x, denoised, sigma: float, sigma_next: float, impl: str = "auto"):
    """x + (sigma_next - sigma) (x - D) / sigma: Euler on the PF-ODE (Karras et al. 2022, eq. 4); DDIM when eta = 0.

    Computed as (sigma_next / sigma) x + (1 - sigma_next / sigma) D, the same number without cancellation: from a flow's
    first level (sigma = 1e5, x about 1e5 times the noise) x + (...)(x - D) loses float32's digits to the difference
    of two numbers of size 1e5, about 5e-3 on the samples (lesson 9)."""
    if not use_triton(impl, x, denoised):
        _check("euler_step", x, denoised)
        r = sigma_next / sigma
        return r * x + (1 - r) * denoised
    r = (sigma_next - sigma) / sigma
    return lincomb((1 + r, -r), (x, denoised), impl)


def ddim_step(x, denoised, sigma: float, sigma_next: float, impl: str = "auto"):
    """Deterministic DDIM (Song et al. 2021, eq. 12, eta = 0) in the x = x0 + sigma eps form: D + (sigma_next / sigma)(x - D)."""
    if not use_triton(impl, x, denoised):
        _check("ddim_step", x, denoised)
        ab_t, ab_s = 1 / (1 + sigma * sigma), 1 / (1 + sigma_next * sigma_next)
        x_t = x * math.sqrt(ab_t)
        eps = (x_t - math.sqrt(ab_t) * denoised) / math.sqrt(1 - ab_t)
        return (math.sqrt(ab_s) * denoised + math.sqrt(max(1 - ab_s, 0.0)) * eps) / math.sqrt(ab_s)
    r = sigma_next / sigma
    return lincomb((r, 1 - r), (x, denoised), impl)


def heun_correct(x, denoised, x_euler, denoised_next, sigma: float, sigma_next: float, impl: str = "auto"):
    """Heun's correction x + (sigma_next - sigma)(d + d') / 2, d = (x - D) / sigma, d' at the Euler guess (Karras et al. 2022, Alg. 1)."""
    if not use_triton(impl, x, denoised, x_euler, denoised_next):
        _check("heun_correct", x, denoised, x_euler, denoised_next)
        d, d_next = (x - denoised) / sigma, (x_euler - denoised_next) / sigma_next
        return x + (sigma_next - sigma) * (d + d_next) / 2
    h = sigma_next - sigma
    return lincomb((1 + h / (2 * sigma), -h / (2 * sigma), h / (2 * sigma_next), -h / (2 * sigma_next)),
                   (x, denoised, x_euler, denoised_next), impl)


def heun_correct_linear(x, denoised, x_euler, denoised_next, sigma: float, sigma_next: float, impl: str = "auto"):
    """Heun's correction in a flow's own time t = sigma / (1 + sigma) (the linear path, course_lib.flow; as diffusers'
    FlowMatchHeunDiscreteScheduler): the slopes v = (x_t - D) / t of x_t = x / (1 + sigma) averaged, mapped back to x.
    In sigma (heun_correct) the second slope's change is weighed by (sigma - sigma_next) / (2 sigma_next): from a flow's
    first level, t = 1 - 1e-5 or sigma = 1e5, that multiplies D's change by thousands."""
    t, t_next = sigma / (1 + sigma), sigma_next / (1 + sigma_next)
    h = t_next - t
    if not use_triton(impl, x, denoised, x_euler, denoised_next):
        _check("heun_correct_linear", x, denoised, x_euler, denoised_next)
        x_t, x_t_euler = x / (1 + sigma), x_euler / (1 + sigma_next)
        v, v_next = (x_t - denoised) / t, (x_t_euler - denoised_next) / t_next
        return (1 + sigma_next) * (x_t + h * (v + v_next) / 2)
    return lincomb(((1 + sigma_next) / (1 + sigma) * (1 + h / (2 * t)), -(1 + sigma_next) * h / (2 * t),
                    h / (2 * t_next), -(1 + sigma_next) * h / (2 * t_next)), (x, denoised, x_euler, denoised_next), impl)


def dpmpp_2m_step(x, denoised, old_denoised, sigma: float, sigma_next: float, sigma_prev: float | None,
                  impl: str = "auto"):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) for sigma_next > 0; first order when old_denoised is None."""
    if not sigma > 0 or not sigma_next > 0:
        raise ValueError(f"sigma and sigma_next must be > 0 (the step to 0 returns D itself); got {sigma}, {sigma_next}")
    h = math.log(sigma) - math.log(sigma_next)
    if old_denoised is None:
        c_new, c_old = 1.0, 0.0
    else:
        r = (math.log(sigma_prev) - math.log(sigma)) / h
        c_new, c_old = 1 + 1 / (2 * r), -1 / (2 * r)
    tensors = (x, denoised) if old_denoised is None else (x, denoised, old_denoised)
    if not use_triton(impl, *tensors):
        _check("dpmpp_2m_step", *tensors)
        d = denoised if old_denoised is None else c_new * denoised + c_old * old_denoised
        return (sigma_next / sigma) * x - math.expm1(-h) * d
    k = -math.expm1(-h)
    return lincomb((sigma_next / sigma, k * c_new, k * c_old)[: len(tensors)], tensors, impl)


# ---- GroupNorm + SiLU ------------------------------------------------------------------------------


def group_norm_silu_reference(x, norm: torch.nn.GroupNorm):
    """silu(GroupNorm(x)) (Wu & He 2018; Elfwing et al. 2018), as the UNet's blocks apply them."""
    return F.silu(norm(x))


def group_norm_silu(x, norm: torch.nn.GroupNorm, impl: str = "auto"):
    """silu(GroupNorm(x)) in one kernel: one program per (sample, group) computes the statistics and writes the result."""
    if not isinstance(norm, torch.nn.GroupNorm):
        raise TypeError(f"norm must be a torch.nn.GroupNorm, got {type(norm).__name__}")
    _check("group_norm_silu", x)
    if x.ndim < 2 or x.shape[1] != norm.num_channels:
        raise ValueError(f"x must be (N, {norm.num_channels}, ...), got {tuple(x.shape)}")
    params = [p for p in (norm.weight, norm.bias) if p is not None]
    size = (x.shape[1] // norm.num_groups) * (x[0, 0].numel() if x.ndim > 2 else 1)
    if not use_triton(impl, x, *params) or size > MAX_GROUP:
        return group_norm_silu_reference(x, norm)
    tk = _tk()
    import triton

    xc = x.contiguous()
    out = torch.empty_like(xc)
    weight = norm.weight if norm.weight is not None else torch.ones(x.shape[1], device=x.device)
    bias = norm.bias if norm.bias is not None else torch.zeros(x.shape[1], device=x.device)
    spatial = x[0, 0].numel() if x.ndim > 2 else 1
    tk.group_norm_silu_kernel[(x.shape[0] * norm.num_groups,)](
        xc, weight.detach().contiguous(), bias.detach().contiguous(), out, x.shape[1] // norm.num_groups, spatial,
        norm.num_groups, norm.eps, BLOCK=triton.next_power_of_2(size))
    return out
