"""Lesson 15's sound: synthetic notes with a known pitch, generated offline, and how to judge a generated one.

A note is one of the eight pitches of the C major scale from C4 to C5, a fundamental and two weaker harmonics with
random phases, a short attack and an exponential decay, LENGTH samples at SAMPLE_RATE. A signal is judged by its
pitch (the peak of its magnitude spectrum in the fundamentals' band, Hann window, zero-padded) and by how much of its
energy lies at that pitch and its harmonics (a clean note holds nearly all of it; noise with the same spectrum
spreads it over every note at once)."""
from __future__ import annotations

import math

import torch

SAMPLE_RATE = 2000  # samples per second: every fundamental (262-523 Hz) and its 2nd harmonic lie below 1,000 Hz
LENGTH = 256  # samples per note: 0.128 s, 33 to 67 periods
NOTES = {"C4": 261.63, "D4": 293.66, "E4": 329.63, "F4": 349.23, "G4": 392.00, "A4": 440.00, "B4": 493.88,
         "C5": 523.25}
BAND = (230.0, 560.0)  # where the pitch estimate looks for the fundamental
IN_TUNE_CENTS = 30.0  # a pitch within this many cents (1/100 of a semitone) of a scale note is that note
PAD = 8192  # FFT length: a spectral grid of 0.24 Hz, fine enough to read 30 cents (4.6 Hz at C4) apart


def make_notes(n: int, generator: torch.Generator | None = None, return_notes: bool = False):
    """n notes (n, 1, LENGTH) in [-1, 1], pitches drawn uniformly from NOTES; with return_notes also each note's index."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"number of notes must be a positive int, got {n!r}")
    g = generator
    freqs = torch.tensor(list(NOTES.values()), dtype=torch.float64)
    which = torch.randint(len(NOTES), (n,), generator=g)
    f0 = freqs[which][:, None]
    t = torch.arange(LENGTH, dtype=torch.float64)[None] / SAMPLE_RATE
    amps = torch.stack([torch.ones(n, dtype=torch.float64), 0.2 + 0.3 * torch.rand(n, generator=g, dtype=torch.float64),
                        0.3 * torch.rand(n, generator=g, dtype=torch.float64)], 1)
    phases = 2 * math.pi * torch.rand(n, 3, generator=g, dtype=torch.float64)
    wave = torch.zeros(n, LENGTH, dtype=torch.float64)
    for k in range(3):
        harmonic = (k + 1) * f0
        wave += torch.where(harmonic < SAMPLE_RATE / 2, amps[:, k:k + 1], torch.zeros(())) * \
            torch.sin(2 * math.pi * harmonic * t + phases[:, k:k + 1])
    decay = 0.05 + 0.15 * torch.rand(n, 1, generator=g, dtype=torch.float64)  # seconds
    envelope = torch.clamp(t / 0.01, max=1.0) * torch.exp(-t / decay)
    wave = wave * envelope
    peak = 0.5 + 0.4 * torch.rand(n, 1, generator=g, dtype=torch.float64)
    x = (wave / wave.abs().amax(1, keepdim=True) * peak).float()[:, None]
    return (x, which) if return_notes else x


def spectrum(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(frequencies in Hz, magnitude spectra (n, PAD // 2 + 1)) of signals (n, 1, L) or (n, L): Hann window, zero-padded."""
    x = _signals(x)
    window = torch.hann_window(x.shape[1], periodic=False, dtype=torch.float64)
    mags = torch.fft.rfft(x.double() * window, n=PAD).abs()
    return torch.fft.rfftfreq(PAD, 1 / SAMPLE_RATE).double(), mags


def pitch(x: torch.Tensor) -> torch.Tensor:
    """Each signal's pitch in Hz: the peak of its magnitude spectrum within BAND."""
    freqs, mags = spectrum(x)
    band = (freqs >= BAND[0]) & (freqs <= BAND[1])
    return freqs[band][mags[:, band].argmax(1)]


def nearest_note(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the index of the nearest scale note, the distance to it in cents) for pitches f (Hz)."""
    notes = torch.tensor(list(NOTES.values()), dtype=torch.float64)
    cents = 1200 * torch.log2(f.double()[:, None] / notes[None])
    idx = cents.abs().argmin(1)
    return idx, cents[torch.arange(len(f)), idx]


def purity(x: torch.Tensor) -> torch.Tensor:
    """The share of each signal's spectral energy within half a semitone of its pitch and of that pitch's harmonics."""
    freqs, mags = spectrum(x)
    f0 = pitch(x)
    power = mags ** 2
    near = torch.zeros_like(power, dtype=torch.bool)
    for k in (1, 2, 3):
        ratio = freqs[None] / (k * f0[:, None])
        near |= (ratio > 2 ** (-1 / 24)) & (ratio < 2 ** (1 / 24))
    return (power * near).sum(1) / power.sum(1).clamp_min(1e-12)


PURITY_FLOOR = 0.5  # a clean note: at least half its energy at its pitch and harmonics (real notes: 0.9 and more)


def judge(x: torch.Tensor) -> dict:
    """What the lesson reports about a set of signals: the share in tune with a scale note, the share that are clean
    notes (in tune and PURITY_FLOOR pure), each scale note's share of the clean ones, and the mean purity."""
    x = _signals(x)
    idx, cents = nearest_note(pitch(x))
    pure = purity(x)
    tuned = cents.abs() <= IN_TUNE_CENTS
    clean = tuned & (pure >= PURITY_FLOOR)
    counts = torch.bincount(idx[clean], minlength=len(NOTES)).double()
    return {"in_tune": float(tuned.double().mean()), "clean": float(clean.double().mean()),
            "purity": float(pure.mean()), "notes": (counts / counts.sum().clamp_min(1)).tolist(),
            "notes_present": int((counts > 0).sum()), "n": len(x)}


def fit_gaussian(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline: a Gaussian with the training signals' mean and covariance; returns (mean, Cholesky factor)."""
    x = _signals(x).double()
    mean = x.mean(0)
    cov = torch.cov(x.T) + 1e-6 * torch.eye(x.shape[1], dtype=torch.float64)
    return mean, torch.linalg.cholesky(cov)


def sample_gaussian(mean: torch.Tensor, chol: torch.Tensor, n: int, generator=None) -> torch.Tensor:
    """n signals (n, 1, L) from the fitted Gaussian."""
    z = torch.randn(n, len(mean), generator=generator, dtype=torch.float64)
    return (mean + z @ chol.T).float()[:, None]


def playable(x: torch.Tensor, rate: int = 8000) -> tuple:
    """One signal (1, L) or (L,) resampled to `rate` Hz for IPython.display.Audio (browsers refuse 2 kHz): (samples, rate)."""
    x = torch.as_tensor(x, dtype=torch.float32).reshape(1, 1, -1)
    up = torch.nn.functional.interpolate(x, scale_factor=rate / SAMPLE_RATE, mode="linear", align_corners=False)
    return up.reshape(-1).numpy(), rate


def _signals(x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[1] != 1):
        raise ValueError(f"signals must be a tensor of shape (n, L) or (n, 1, L), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not torch.isfinite(x).all():
        raise ValueError("signals hold NaN or infinity")
    return x.reshape(len(x), -1)
