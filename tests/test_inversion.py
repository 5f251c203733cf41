"""DDIM inversion (course_lib.inversion) against closed forms: on Gaussian data the probability-flow ODE is a known
linear map, so the inverted noise must converge to it at first order; on a mixture (a curved flow) reconstruction
must improve with steps."""
import math

import pytest
import torch

from course_lib.analytic import gaussian_denoiser, gaussian_ode_solution, mixture_denoiser
from course_lib.data import ring_of_gaussians
from course_lib.inversion import ddim_invert, psnr, reconstruct
from course_lib.samplers import sample_ddim
from course_lib.step_schedules import karras_sigmas


def _error_vs_flow(n: int, std=0.5, mean=0.3):
    x0 = mean + std * torch.randn(2000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = karras_sigmas(n, 0.01, 20.0)
    noise = ddim_invert(gaussian_denoiser(std, mean), x0, sigmas)
    exact = gaussian_ode_solution(x0, float(sigmas[-2]), float(sigmas[0]), std, mean)
    return (noise - exact).abs().max().item() / exact.abs().max().item()


def test_inversion_follows_the_gaussian_flow_at_first_order():
    # DDIM is Euler on the ODE in the sigma view, up or down: its global error halves when the steps double
    errors = [_error_vs_flow(n) for n in (50, 100, 200, 400)]
    assert errors[-1] < 0.01
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(1.7 < r < 2.3 for r in ratios), (errors, ratios)


def test_inversion_starts_from_the_image_and_ends_at_the_top_level():
    den = gaussian_denoiser(0.5)
    x0 = torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.5
    sigmas = karras_sigmas(10, 0.02, 10.0)
    noise, traj = ddim_invert(den, x0, sigmas, return_trajectory=True)
    assert traj.shape == (10, 4, 2)  # x0 at sigmas[-2], then one state per level up to sigmas[0]
    torch.testing.assert_close(traj[0], x0)
    torch.testing.assert_close(traj[-1], noise)
    # the noise has the spread of the top level: std about sqrt(0.5^2 + 10^2) times x0's relative position
    assert noise.abs().mean() > 5 * x0.abs().mean()


def test_reconstruction_on_a_curved_flow_improves_with_steps():
    ring = ring_of_gaussians()
    den = mixture_denoiser(ring)
    x0 = ring.sample(500, generator=torch.Generator().manual_seed(2)).double()
    errs = []
    for n in (10, 40, 160):
        rec, _ = reconstruct(den, x0, karras_sigmas(n, 0.002, 80.0))
        errs.append((rec - x0).pow(2).sum(1).sqrt().mean().item())
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 0.05 * ring.std * 10, errs  # well inside a mode's spread (std 0.05) at 160 steps


def test_reconstruct_with_other_sampling_kwargs_edits():
    # a 'conditional' denoiser whose mean is the kwarg: inverting with one mean and sampling with another moves the
    # samples by the difference of the means (a Gaussian of std s shifted is the same flow shifted)
    from course_lib.samplers import Denoiser

    s = 0.5
    den = Denoiser(lambda x, sigma, mean=0.0: mean + s**2 / (s**2 + sigma**2) * (x - mean))
    x0 = torch.randn(100, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * s
    sigmas = karras_sigmas(200, 0.002, 80.0)
    same, _ = reconstruct(den, x0, sigmas, mean=0.0)
    moved, noise = reconstruct(den, x0, sigmas, sample_kwargs={"mean": 2.0}, mean=0.0)
    assert (same - x0).abs().max() < 0.1  # Euler up then Euler down: a first-order round-trip error
    torch.testing.assert_close(moved, sample_ddim(den, noise, sigmas, mean=2.0))
    assert abs((moved - x0).mean().item() - 2.0) < 0.05


def test_psnr_is_the_closed_form():
    a = torch.zeros(2, 3, 4, 4)
    b = a.clone()
    b[0] += 0.1
    b[1, :, :2] += 0.2  # half the pixels off by 0.2: MSE 0.02
    got = psnr(b, a)
    torch.testing.assert_close(got, torch.tensor([10 * math.log10(4 / 0.01), 10 * math.log10(4 / 0.02)]))


@pytest.mark.parametrize("bad", [[5.0, 0.0], [0.5, 0.0]])
def test_inversion_needs_two_positive_levels(bad):
    with pytest.raises(ValueError, match="two positive"):
        ddim_invert(gaussian_denoiser(1.0), torch.zeros(1, 2), torch.tensor(bad))


def test_inversion_refuses_integer_images():
    with pytest.raises(TypeError, match="float tensor"):
        ddim_invert(gaussian_denoiser(1.0), torch.zeros(1, 2, dtype=torch.long), karras_sigmas(5, 0.1, 5.0))


def test_editing_a_real_image_changes_the_named_colour_and_keeps_the_rest():
    """On lesson 7's model: inverting under the caption and sampling under the same caption gives the image back;
    under a caption with another colour, the judge reads the new colour and the old shape, size and place."""
    from course_lib.attributes import adherence, load_attribute_classifier
    from course_lib.inversion import edit
    from course_lib.shapes import make_shapes
    from course_lib.text2image import load_text_to_image

    model = load_text_to_image("shapes_ldm")
    images, captions, scenes = make_shapes(40, "test", 4)
    one = [i for i, s in enumerate(scenes) if s["relation"] is None][:12]
    images, captions = images[one], [captions[i] for i in one]
    swap = {"red": "blue", "blue": "red", "green": "magenta", "magenta": "green", "yellow": "cyan", "cyan": "yellow"}
    targets = [" ".join(swap.get(w, w) for w in c.split()) for c in captions]
    same = edit(model, images, captions, captions, steps=20)
    assert psnr(same, images).mean() > 25  # the autoencoder alone reaches about 32 dB
    edited = edit(model, images, captions, targets, steps=20)
    judged = adherence(load_attribute_classifier(), edited, targets)
    assert judged["colour"] >= 10 / 12 and min(judged[k] for k in ("shape", "size", "position")) >= 10 / 12, judged
    with pytest.raises(ValueError, match="captions"):
        edit(model, images, captions[:3], targets)
