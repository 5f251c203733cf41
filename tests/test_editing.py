"""Inpainting and SDEdit (course_lib.editing) with exact Gaussian denoisers, where the right answer is known."""
import math

import pytest
import torch

from course_lib.editing import inpaint, repaint_path, sdedit
from course_lib.samplers import Denoiser, karras_sigmas, sample_ancestral

# 2D Gaussian data, std 0.5 per coordinate, correlation 0.8: given x1 = a, x2 ~ N(0.8 a, (1 - 0.64) 0.25)
COV = torch.tensor([[1.0, 0.8], [0.8, 1.0]], dtype=torch.float64) * 0.25


def _gaussian_denoiser():
    """The exact D(x, sigma) = Sigma (Sigma + sigma^2 I)^-1 x for data ~ N(0, Sigma)."""
    return Denoiser(lambda x, sigma: x @ (COV @ torch.linalg.inv(COV + sigma**2 * torch.eye(2, dtype=x.dtype))).T)


def test_an_empty_mask_is_plain_ddpm_and_known_pixels_are_kept_exactly():
    sig = karras_sigmas(20, 0.002, 20.0)
    noise = torch.randn(50, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    known = torch.randn(50, 2, dtype=torch.float64)
    got = inpaint(_gaussian_denoiser(), known, torch.zeros(2), sig, noise=noise,
                  generator=torch.Generator().manual_seed(2))
    want = sample_ancestral(_gaussian_denoiser(), noise * math.sqrt(1 + 20.0**2), sig, variance="posterior",
                            generator=torch.Generator().manual_seed(2))
    assert torch.allclose(got, want, atol=1e-12)
    mask = (torch.rand(50, 2, generator=torch.Generator().manual_seed(3)) < 0.5).double()
    for r in (1, 3):
        out = inpaint(_gaussian_denoiser(), known, mask, sig, resample=r, generator=torch.Generator().manual_seed(4))
        assert torch.equal(out[mask.bool()], known[mask.bool()]) and torch.isfinite(out).all()


def test_repaint_samples_the_true_conditional_where_replacement_does_not():
    # n = 4,000: the standard error of a mean is 0.3 / sqrt(4000) = 0.005, so a gap above 0.1 is 20 standard errors
    n, a = 4000, 0.6
    known = torch.zeros(n, 2, dtype=torch.float64)
    known[:, 0] = a
    mask, sig = torch.tensor([1.0, 0.0], dtype=torch.float64), karras_sigmas(100, 0.002, 20.0)
    want_mean, want_std = 0.8 * a, math.sqrt(1 - 0.64) * 0.5
    gap = {}
    for r in (1, 10):
        x2 = inpaint(_gaussian_denoiser(), known, mask, sig, resample=r, generator=torch.Generator().manual_seed(0))[:, 1]
        gap[r] = abs(x2.mean().item() - want_mean)
        if r == 10:  # the spread too (its standard error is 0.3 / sqrt(8000) = 0.003)
            assert abs(x2.std().item() - want_std) < 0.1 * want_std
    assert gap[1] > 0.1  # the replacement method does not condition the generated part enough
    assert gap[10] < 0.25 * gap[1] and gap[10] < 0.03  # RePaint's resampling closes most of the gap


@pytest.mark.parametrize("n, r, jump", [(1, 1, 1), (7, 1, 3), (7, 3, 1), (10, 4, 3), (9, 2, 9), (6, 5, 2)])
def test_repaint_visits_each_block_resample_times_one_level_at_a_time(n, r, jump):
    path = repaint_path(n, r, jump)
    assert path[0] == 0 and path[-1] == n and all(abs(b - a) == 1 for a, b in zip(path, path[1:]))
    downs = [(a, b) for a, b in zip(path, path[1:]) if b > a]
    last = n - (n - 1) // jump * jump  # the size of the last block, which is walked once (nothing left to harmonise)
    assert len(downs) == r * (n - last) + last
    for i in range(n):  # step i -> i + 1 is taken r times, once if it is in the last block
        assert downs.count((i, i + 1)) == (1 if i >= n - last else r)
    ups = [(a, b) for a, b in zip(path, path[1:]) if b < a]
    assert all(max(a, b) <= n - last for a, b in ups)  # never re-noised from the last block


def test_repaint_with_jumps_also_conditions_the_generated_part():
    # the same statistics as above (n = 4,000; standard error 0.005): jumps of 5 levels, 10 passes each
    n, a = 4000, 0.6
    known = torch.zeros(n, 2, dtype=torch.float64)
    known[:, 0] = a
    mask, sig = torch.tensor([1.0, 0.0], dtype=torch.float64), karras_sigmas(100, 0.002, 20.0)
    x = inpaint(_gaussian_denoiser(), known, mask, sig, resample=10, jump=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x[:, 0], known[:, 0])
    assert abs(x[:, 1].mean().item() - 0.8 * a) < 0.03


def test_sdedit_trades_faithfulness_for_realism_as_sigma_start_grows():
    far = torch.full((2000, 2), 3.0, dtype=torch.float64)  # an input far from the data (12 standard deviations out)
    sig = karras_sigmas(30, 0.002, 20.0)
    dist = {}
    for s0 in (0.01, 0.5, 20.0):
        out = sdedit(_gaussian_denoiser(), far, s0, sig, sampler="ddim", generator=torch.Generator().manual_seed(0))
        dist[s0] = (out - far).norm(dim=1).mean().item()
        if s0 == 20.0:  # from the top of the noise range the input is forgotten: the data's mean and spread
            assert out.mean(0).abs().max() < 0.1 and abs(out.std(0).mean().item() - 0.5) < 0.05
    assert dist[0.01] < 0.05 < dist[0.5] < dist[20.0]


def test_bad_inputs_are_refused():
    den, sig, known = _gaussian_denoiser(), karras_sigmas(5, 0.002, 20.0), torch.zeros(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="0 \\(to generate\\) and 1"):
        inpaint(den, known, torch.full((2,), 0.5), sig)
    with pytest.raises(ValueError, match="does not broadcast"):
        inpaint(den, known, torch.zeros(3), sig)
    with pytest.raises(ValueError, match="resample"):
        inpaint(den, known, torch.zeros(2), sig, resample=0)
    with pytest.raises(ValueError, match="jump"):
        inpaint(den, known, torch.zeros(2), sig, jump=0)
    with pytest.raises(ValueError, match="sigma_start"):
        sdedit(den, known, 0.0001, sig)
    with pytest.raises(ValueError, match="sampler must be one of"):
        sdedit(den, known, 1.0, sig, sampler="plms")
