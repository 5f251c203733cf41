"""The Triton kernels behind course_lib.kernels (imported only when a kernel is launched).

Each program handles BLOCK consecutive elements of flat, contiguous tensors; arithmetic is in float32 and the
result is cast to the output's dtype on store, so float32 and bfloat16 tensors share one kernel. With
TRITON_INTERPRET=1 set before this module is imported, the same kernels run on CPU tensors in Triton's interpreter.
"""
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def q_sample_kernel(x0_ptr, eps_ptr, t_ptr, sqrt_ab_ptr, sqrt_1m_ab_ptr, xt_ptr, v_ptr, n, per_sample,
                    WRITE_V: tl.constexpr, BLOCK: tl.constexpr):
    """x_t = sqrt(ab[t_i]) x0 + sqrt(1 - ab[t_i]) eps, t_i gathered per sample; v = sqrt(ab) eps - sqrt(1 - ab) x0."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    t = tl.load(t_ptr + offs // per_sample, mask=mask, other=0)
    a = tl.load(sqrt_ab_ptr + t, mask=mask, other=0.0)
    s = tl.load(sqrt_1m_ab_ptr + t, mask=mask, other=0.0)
    x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    eps = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(xt_ptr + offs, (a * x0 + s * eps).to(xt_ptr.dtype.element_ty), mask=mask)
    if WRITE_V:
        tl.store(v_ptr + offs, (a * eps - s * x0).to(v_ptr.dtype.element_ty), mask=mask)


@triton.jit
def lincomb_kernel(out_ptr, a_ptr, b_ptr, c_ptr, d_ptr, ca, cb, cc, cd, n,
                   TERMS: tl.constexpr, BLOCK: tl.constexpr):
    """out = ca a + cb b (+ cc c (+ cd d)): a whole sampler update in one read of each input and one write."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = ca * tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    acc += cb * tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if TERMS >= 3:
        acc += cc * tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if TERMS >= 4:
        acc += cd * tl.load(d_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def group_norm_silu_kernel(x_ptr, w_ptr, b_ptr, out_ptr, channels_per_group, spatial, groups, eps,
                           BLOCK: tl.constexpr):
    """One program per (sample, group): mean and variance in float32, normalise, per-channel affine, then SiLU."""
    pid = tl.program_id(0)
    g = pid % groups
    size = channels_per_group * spatial
    offs = tl.arange(0, BLOCK)
    mask = offs < size
    base = pid * size  # a (sample, group) block is contiguous in NCHW
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / size
    diff = tl.where(mask, x - mean, 0.0)
    var = tl.sum(diff * diff, axis=0) / size
    c = g * channels_per_group + offs // spatial
    w = tl.load(w_ptr + c, mask=mask, other=1.0).to(tl.float32)
    b = tl.load(b_ptr + c, mask=mask, other=0.0).to(tl.float32)
    y = diff * tl.rsqrt(var + eps) * w + b
    y = y * tl.sigmoid(y)
    tl.store(out_ptr + base + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
