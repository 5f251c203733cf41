"""Lesson 15's sound: the synthetic notes, the pitch judge (against numpy's FFT and hand-computed cents), the Gaussian
baseline and the 1D UNet."""
import math

import numpy as np
import pytest
import torch

from course_lib import audio
from course_lib.nets import UNet1D, build_model


def _sine(f, n=4, phase=0.3):
    t = torch.arange(audio.LENGTH, dtype=torch.float64) / audio.SAMPLE_RATE
    return (0.8 * torch.sin(2 * math.pi * f * t + phase)).float().repeat(n, 1, 1)


@pytest.mark.parametrize("f", [265.0, 330.0, 441.5, 520.0])
def test_pitch_of_a_pure_tone_agrees_with_numpy(f):
    x = _sine(f)
    got = audio.pitch(x)
    # an independent estimate: numpy's real FFT of the same windowed, zero-padded signal, peak in the band
    w = np.hanning(audio.LENGTH)
    spec = np.abs(np.fft.rfft(x[0, 0].double().numpy() * w, n=audio.PAD))
    freqs = np.fft.rfftfreq(audio.PAD, 1 / audio.SAMPLE_RATE)
    band = (freqs >= audio.BAND[0]) & (freqs <= audio.BAND[1])
    assert float(got[0]) == pytest.approx(freqs[band][spec[band].argmax()], abs=1e-9)
    assert abs(float(got[0]) - f) < 1.0  # the grid is 0.24 Hz; the window's leakage moves the peak little


def test_cents_to_the_nearest_note_by_hand():
    idx, cents = audio.nearest_note(torch.tensor([440.0, 445.0, 261.63, 500.0]))
    names = list(audio.NOTES)
    assert [names[i] for i in idx] == ["A4", "A4", "C4", "B4"]
    assert cents[0] == pytest.approx(0, abs=1e-9)
    assert cents[1] == pytest.approx(1200 * math.log2(445 / 440), abs=1e-9)
    assert cents[3] == pytest.approx(1200 * math.log2(500 / 493.88), abs=1e-9)


def test_every_generated_note_is_judged_the_note_it_is():
    x, which = audio.make_notes(600, torch.Generator().manual_seed(0), return_notes=True)
    assert x.shape == (600, 1, audio.LENGTH) and float(x.abs().max()) <= 0.9 + 1e-6
    idx, cents = audio.nearest_note(audio.pitch(x))
    assert torch.equal(idx, which) and float(cents.abs().max()) < audio.IN_TUNE_CENTS
    j = audio.judge(x)
    assert j["clean"] == 1.0 and j["notes_present"] == 8 and j["purity"] > 0.9
    # the notes are drawn uniformly: each share within 4 binomial standard deviations of 1/8 (600 notes)
    sd = math.sqrt(1 / 8 * 7 / 8 / 600)
    assert all(abs(s - 1 / 8) < 4 * sd for s in j["notes"])


def test_purity_separates_a_tone_from_noise():
    assert float(audio.purity(_sine(330.0)).min()) > 0.95
    noise = 0.3 * torch.randn(200, 1, audio.LENGTH, generator=torch.Generator().manual_seed(1))
    assert float(audio.purity(noise).mean()) < 0.3
    assert audio.judge(noise)["clean"] == 0.0


def test_the_gaussian_baseline_has_the_data_s_moments_but_few_clean_notes():
    g = torch.Generator().manual_seed(2)
    x = audio.make_notes(3000, g)
    mean, chol = audio.fit_gaussian(x)
    y = audio.sample_gaussian(mean, chol, 3000, g)
    # its covariance is the data's: compare the per-sample variance profile (3,000 draws: a few per cent)
    vx, vy = x.double().var(0).squeeze(), y.double().var(0).squeeze()
    assert float(((vy - vx).abs() / vx.clamp_min(1e-3)).median()) < 0.1
    assert audio.judge(y)["clean"] < 0.2


def test_playable_resamples_to_a_browser_rate():
    samples, rate = audio.playable(audio.make_notes(1)[0])
    assert rate == 8000 and samples.shape == (audio.LENGTH * 4,)


def test_bad_signals_are_refused():
    with pytest.raises(ValueError, match="shape"):
        audio.pitch(torch.zeros(3, 2, 5))
    with pytest.raises(ValueError, match="NaN"):
        audio.judge(torch.full((2, 1, 8), float("nan")))
    with pytest.raises(ValueError, match="positive int"):
        audio.make_notes(0)


def test_unet1d_keeps_the_shape_and_refuses_what_it_cannot_take():
    net = UNet1D(base=8, mults=(1, 2))
    x = torch.randn(3, 1, 64)
    assert net(x, torch.tensor([0, 5, 9])).shape == x.shape
    assert build_model(net.config).config == net.config
    with pytest.raises(ValueError, match="divisible"):
        net(torch.randn(3, 1, 63), 0)
    with pytest.raises(ValueError, match="unconditional"):
        net(x, 0, y=torch.zeros(3))
    with pytest.raises(ValueError, match="num_classes"):
        UNet1D(num_classes=10)
