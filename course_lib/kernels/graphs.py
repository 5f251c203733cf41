"""A whole sampling loop run three ways: eager, captured once as a CUDA graph and replayed, or torch.compile'd.

At small batches a sampler step is a handful of tiny kernels whose launch cost from Python exceeds their run time;
a CUDA graph records every launch of the loop once and replays them all with one call (PyTorch docs, "CUDA
Graphs"); torch.compile fuses the elementwise chains itself (Ansel et al. 2024). All three share one interface:
`sampler(noise) -> samples`, with the model, the noise levels and the shape fixed when it is built.
"""
from __future__ import annotations

import math

import torch

from ..samplers import SAMPLERS, as_denoiser, check_sigmas, nfe_for_steps

DETERMINISTIC = ("ddim", "euler", "heun", "dpmpp_2m")  # no fresh noise inside the loop: replayable as is
MODES = ("eager", "graph", "compile")


class LoopSampler:
    """`sampler(noise)` = samplers.sample(model, noise, schedule, sampler, sigmas=...) with everything but the noise
    fixed; mode 'eager', 'graph' (the whole loop as one CUDA graph; CUDA only) or 'compile' (the network compiled)."""

    def __init__(self, model, schedule, shape, sigmas, sampler: str = "dpmpp_2m", mode: str = "eager",
                 device="cpu", clip: float | None = None, warmup: int = 2, **model_kwargs):
        if sampler not in DETERMINISTIC:
            raise ValueError(f"sampler must be one of {DETERMINISTIC} (a replayed loop cannot draw fresh noise), "
                             f"got {sampler!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.device, self.shape, self.mode = torch.device(device), tuple(shape), mode
        if mode == "graph" and (self.device.type != "cuda" or not torch.cuda.is_available()):
            raise ValueError("a CUDA graph needs a CUDA device; use mode='eager' or 'compile' here")
        self.sigmas = check_sigmas(sigmas)
        self.nfe = nfe_for_steps(sampler, len(self.sigmas) - 1)
        # 'compile' compiles the network (tensor inputs only); compiling the Python loop itself would specialise
        # on every float sigma, and recompiling with those as symbolic floats gave wrong samples in torch 2.13
        net = torch.compile(model, dynamic=False) if mode == "compile" else model
        denoiser = as_denoiser(net, schedule, getattr(model, "prediction", None), clip)
        step = SAMPLERS[sampler]
        scale = math.sqrt(1 + float(self.sigmas[0]) ** 2)  # as samplers.sample: x_T = noise in the alpha-bar view

        def loop(noise):
            with torch.no_grad():
                return step(denoiser, noise * scale, self.sigmas, **model_kwargs)

        self._run = loop
        if mode == "graph":
            self._static_in = torch.zeros(self.shape, device=self.device)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up off the default stream, as the PyTorch docs require
                for _ in range(warmup):
                    loop(self._static_in.clone())
            torch.cuda.current_stream(self.device).wait_stream(side)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._static_out = loop(self._static_in)
            self._run = self._replay

    def _replay(self, x):
        self._static_in.copy_(x)
        self._graph.replay()
        return self._static_out.clone()

    def __call__(self, noise: torch.Tensor) -> torch.Tensor:
        if tuple(noise.shape) != self.shape:
            raise ValueError(f"this sampler was built for noise of shape {self.shape}, got {tuple(noise.shape)}")
        return self._run(noise.to(self.device))
