"""The sampling loop as one object: eager, compiled and (on CUDA) graph-replayed give samplers.sample's result."""
import pytest
import torch

from course_lib.checkpoints import load_pretrained
from course_lib.kernels.graphs import LoopSampler
from course_lib.samplers import get_sigmas, sample


@pytest.fixture(scope="module")
def ring8():
    p = load_pretrained("ring8")
    return p, get_sigmas(6, "karras", p.schedule, 0.04, 2.0)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "heun", "euler", "ddim"])
def test_eager_loop_is_samplers_sample(ring8, sampler):
    p, sig = ring8
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    want = sample(p.model, noise, p.schedule, sampler, sigmas=sig).x
    loop = LoopSampler(p.model, p.schedule, noise.shape, sig, sampler)
    assert torch.equal(loop(noise), want)
    assert loop.nfe == sample(p.model, noise, p.schedule, sampler, sigmas=sig).nfe


def test_compiled_loop_matches_eager(ring8):
    p, sig = ring8
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    eager = LoopSampler(p.model, p.schedule, noise.shape, sig)(noise)
    compiled = LoopSampler(p.model, p.schedule, noise.shape, sig, mode="compile")
    torch.testing.assert_close(compiled(noise), eager, rtol=1e-4, atol=1e-5)
    other = torch.randn(64, 2, generator=torch.Generator().manual_seed(2))  # no stale specialisation
    torch.testing.assert_close(compiled(other), LoopSampler(p.model, p.schedule, other.shape, sig)(other),
                               rtol=1e-4, atol=1e-5)


def test_loop_sampler_refuses_what_it_cannot_do(ring8):
    p, sig = ring8
    with pytest.raises(ValueError, match="fresh noise"):
        LoopSampler(p.model, p.schedule, (4, 2), sig, "ddpm")
    with pytest.raises(ValueError, match="mode must be"):
        LoopSampler(p.model, p.schedule, (4, 2), sig, mode="fast")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA device"):
            LoopSampler(p.model, p.schedule, (4, 2), sig, mode="graph")
    with pytest.raises(ValueError, match="shape"):
        LoopSampler(p.model, p.schedule, (4, 2), sig)(torch.randn(5, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_graph_replay_matches_eager_on_cuda(ring8):
    p, sig = ring8
    model = p.model.cuda()
    noise = torch.randn(256, 2, device="cuda")
    graphed = LoopSampler(model, p.schedule, noise.shape, sig, mode="graph", device="cuda")
    torch.testing.assert_close(graphed(noise), LoopSampler(model, p.schedule, noise.shape, sig, device="cuda")(noise))
    noise2 = torch.randn(256, 2, device="cuda")  # a replay with new noise is a new sample
    torch.testing.assert_close(graphed(noise2), LoopSampler(model, p.schedule, noise.shape, sig, device="cuda")(noise2))
