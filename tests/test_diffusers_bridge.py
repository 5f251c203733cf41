"""Our samplers on diffusers networks (course_lib.diffusers_bridge): tiny randomly initialised diffusers models,
sampled by our DPM-Solver++(2M) and by diffusers' own DPMSolverMultistepScheduler on the same timesteps."""
import pytest
import torch

from course_lib import samplers as S
from course_lib.diffusers_bridge import from_diffusers, schedule_from_scheduler

diffusers = pytest.importorskip("diffusers")  # a test-only dependency, in the [test] extra


def _theirs(scheduler, net, z, n, **kwargs):
    scheduler.set_timesteps(n)
    x = z * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = net(scheduler.scale_model_input(x, t), t.expand(len(x)), **kwargs, return_dict=False)[0]
            x = scheduler.step(out, t, x).prev_sample
    return x, scheduler.timesteps


def _tiny_unet(**extra):
    torch.manual_seed(0)
    net = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                                layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "UpBlock2D"), **extra)
    with torch.no_grad():  # diffusers zero-initialises nothing we rely on, but make every weight matter
        for p in net.parameters():
            p.add_(0.02 * torch.randn(p.shape))
    return net.eval()


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_our_dpmpp_2m_on_a_diffusers_unet_matches_diffusers_scheduler(prediction):
    net = _tiny_unet()
    sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                                  prediction_type=prediction, timestep_spacing="linspace")
    model, schedule = from_diffusers(net, sched)
    assert model.prediction == {"epsilon": "eps", "v_prediction": "v"}[prediction]
    torch.testing.assert_close(schedule.alpha_bar.float(), sched.alphas_cumprod.float())
    # in float64 on both sides, so that what is compared is the algorithm (diffusers' float32 coefficients round
    # at 1e-7; a float32 run differs by up to 4e-4 from rounding alone)
    net.double()
    z = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    theirs, ts = _theirs(sched, net, z, 10)
    with torch.no_grad():
        ours = S.sample(model, z, schedule, "dpmpp_2m", timesteps=ts.long().tolist(), stable=False).x
    assert ours.abs().max() > 0.5  # the samples are not trivially zero
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-4, atol=1e-4)


def test_class_labels_and_text_states_reach_diffusers_networks():
    net = _tiny_unet(num_class_embeds=4)
    model, schedule = from_diffusers(net, diffusers.DDPMScheduler(num_train_timesteps=1000))
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        a, b = model(x, 10, y=torch.tensor([0, 1])), model(x, 10, y=torch.tensor([2, 3]))
        assert a.shape == x.shape and not torch.allclose(a, b)
        torch.testing.assert_close(a, net(x, torch.tensor([10, 10]), class_labels=torch.tensor([0, 1])).sample)
    torch.manual_seed(0)
    cond = diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                          layers_per_block=1, norm_num_groups=8, cross_attention_dim=12,
                                          attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
    model, _ = from_diffusers(cond, diffusers.DDIMScheduler(num_train_timesteps=1000))
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 12)
    with torch.no_grad():
        out = model(x, torch.tensor([3, 900]), context=ctx, mask=torch.ones(2, 5, dtype=torch.bool))
        torch.testing.assert_close(out, cond(x, torch.tensor([3, 900]), encoder_hidden_states=ctx).sample)
    with pytest.raises(ValueError, match="needs context"):
        model(x, 3)


def test_a_diffusers_dit_with_a_learned_variance_gives_its_eps_half():
    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                          num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=1000).eval()
    model, _ = from_diffusers(dit, diffusers.DDPMScheduler(num_train_timesteps=1000))
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        out = model(x, torch.tensor([5, 50]), y=torch.tensor([0, 1]))
        full = dit(x, timestep=torch.tensor([5, 50]), class_labels=torch.tensor([0, 1])).sample
    assert out.shape == x.shape and torch.equal(out, full[:, :4])


def test_a_scheduler_without_betas_is_refused():
    with pytest.raises(TypeError, match="discrete-time"):
        schedule_from_scheduler(object())


def test_a_course_dit_exported_to_diffusers_predicts_and_samples_the_same(tmp_path):
    from course_lib.diffusers_bridge import dit_to_diffusers
    from course_lib.nets import DiT

    torch.manual_seed(0)
    ours = DiT(in_channels=1, image_size=8, patch=2, hidden=32, depth=2, heads=4, num_classes=10).eval()
    with torch.no_grad():
        for p in ours.parameters():  # adaLN-Zero starts at zero: give every weight a value
            p.add_(0.1 * torch.randn(p.shape))
    exported = dit_to_diffusers(ours)
    exported.save_pretrained(tmp_path / "dit")
    theirs = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "dit").eval()
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 400, 999]), torch.tensor([1, 5, 10])  # 10: no label
    with torch.no_grad():
        want = ours(x, t, y=y)
        torch.testing.assert_close(theirs(x, timestep=t, class_labels=y).sample, want, rtol=1e-4, atol=1e-5)
    # sampled by diffusers' own scheduler vs our DPM-Solver++(2M), same noise and timesteps, float64
    sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    theirs.double()
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    labels = torch.tensor([0, 3, 7, 9])
    x_theirs, ts = _theirs(sched, theirs, z, 8, class_labels=labels)
    model, schedule = from_diffusers(theirs, sched)
    ours.double()
    with torch.no_grad():
        x_ours = S.sample(ours, z, schedule, "dpmpp_2m", timesteps=ts.long().tolist(), stable=False,
                          model_kwargs={"y": labels}).x
    torch.testing.assert_close(x_ours, x_theirs.to(x_ours.dtype), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="class-conditional"):
        dit_to_diffusers(DiT(num_classes=None))


@pytest.mark.parametrize("steps", [6, 20])
def test_guided_sampling_of_a_text_unet_matches_the_pipelines_loop(steps):
    # course_lib.pretrained.guided_sample against the loop StableDiffusionPipeline runs (cat [uncond, cond], one call,
    # noise_uncond + w (noise_text - noise_uncond), scheduler.step), on a tiny random UNet2DConditionModel, float64
    from course_lib.pretrained import guided_sample

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                          layers_per_block=1, norm_num_groups=8, cross_attention_dim=12,
                                          attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).double().eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02 * torch.randn(p.shape, dtype=p.dtype))
    # SD 1.5's scheduler settings: scaled-linear betas, leading spacing with an offset of 1
    sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                                  beta_schedule="scaled_linear", timestep_spacing="leading",
                                                  steps_offset=1, algorithm_type="dpmsolver++", solver_order=2)
    g = torch.Generator().manual_seed(4)
    cond, uncond = torch.randn(2, 5, 12, generator=g, dtype=torch.float64), torch.randn(1, 5, 12, generator=g,
                                                                                       dtype=torch.float64)
    z, scale = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64), 6.0
    sched.set_timesteps(steps)
    x = z * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            both = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond.expand(2, -1, -1), cond])).sample
            noise_uncond, noise_text = both.chunk(2)
            x = sched.step(noise_uncond + scale * (noise_text - noise_uncond), t, x).prev_sample
    ours = guided_sample(unet, sched, z.clone(), cond, uncond, steps, scale)
    assert (ours - z).abs().max() > 0.1  # sampling moved the latents
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)
    unguided = guided_sample(unet, sched, z.clone(), cond, uncond, steps, 1.0)
    assert (unguided - ours).abs().max() > 1e-3  # the scale reaches the result


def test_hub_reachable_is_a_quick_false_offline():
    from course_lib.pretrained import hub_reachable

    assert hub_reachable("127.0.0.1", port=9, timeout=1.0) is False  # the discard port: nothing listens there


@pytest.mark.parametrize("kw", [dict(base=16, mults=[1, 2], num_res=1),
                                dict(base=16, mults=[1, 2, 2], num_res=2, in_channels=3, num_classes=4)])
def test_a_course_unet_exported_to_diffusers_predicts_the_same(kw):
    from course_lib.diffusers_bridge import unet_to_diffusers
    from course_lib.nets import UNet

    torch.manual_seed(0)
    ours = UNet(**kw).eval()
    with torch.no_grad():  # the last conv of every block starts at zero: give every weight a value
        for p in ours.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    theirs = unet_to_diffusers(ours)
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in ours.parameters())
    x, t = torch.randn(3, kw.get("in_channels", 1), 8, 8), torch.tensor([0, 300, 999])
    y = torch.tensor([1, 3, 4]) if kw.get("num_classes") else None  # 4: the 'no label' index
    with torch.no_grad():
        want = ours(x, t, y=y)
        torch.testing.assert_close(theirs(x, t, class_labels=y).sample, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="course_lib UNet"):
        unet_to_diffusers(torch.nn.Linear(2, 2))


def _random_unet_and_schedule():
    """A small UNet with perturbed weights (its x0 predictions leave [-1, 1]) and a cosine schedule."""
    from course_lib.nets import UNet
    from course_lib.schedules import NoiseSchedule

    torch.manual_seed(1)
    ours = UNet(base=16, mults=[1, 2], num_res=1).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    return ours, NoiseSchedule.named("cosine", 1000)


def test_an_exported_pipeline_loads_in_diffusers_and_samples_like_our_solver(tmp_path):
    from course_lib.diffusers_bridge import export_pipeline

    ours, schedule = _random_unet_and_schedule()
    export_pipeline(ours, schedule, tmp_path / "pipe", image_size=8, clip=False)
    with pytest.raises(FileExistsError):
        export_pipeline(ours, schedule, tmp_path / "pipe", image_size=8)
    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path / "pipe")
    torch.testing.assert_close(pipe.scheduler.alphas_cumprod.double(), schedule.alpha_bar.double(), rtol=1e-5,
                               atol=1e-7)
    # diffusers' own loop on the loaded pipeline's parts vs our DPM-Solver++(2M), float64, same noise and timesteps
    unet, sched = pipe.unet.double(), pipe.scheduler
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    theirs, ts = _theirs(sched, unet, z, 12)
    ours.double()
    with torch.no_grad():
        x = S.sample(ours, z, schedule, "dpmpp_2m", timesteps=ts.long().tolist(), stable=False).x
    assert x.abs().max() > 0.5
    torch.testing.assert_close(x, theirs, rtol=1e-4, atol=1e-4)
    # and the pipeline's __call__ itself (float32, its noise from the same generator), in its [0, 1] output
    pipe.unet.float()
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=3, generator=torch.Generator().manual_seed(5), num_inference_steps=12,
                  output_type="np").images
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        mine = S.sample(ours.float(), z, schedule, "dpmpp_2m", timesteps=ts.long().tolist(), stable=False).x
    mine = (mine / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(mine - images).max() < 2e-3


def test_an_exported_pipeline_clips_like_our_sampler_by_default(tmp_path):
    """Without clipping a small model's few-step samples saturate: the export clips x0 to [-1, 1] as `clip=1.0` does."""
    from course_lib.diffusers_bridge import export_pipeline, to_diffusers_scheduler

    ours, schedule = _random_unet_and_schedule()
    export_pipeline(ours, schedule, tmp_path / "pipe", image_size=8)
    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path / "pipe")
    assert pipe.scheduler.config.thresholding and pipe.scheduler.config.sample_max_value == 1.0
    unet, sched = pipe.unet.double(), pipe.scheduler
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    theirs, ts = _theirs(sched, unet, z, 12)
    ours.double()
    with torch.no_grad():
        clipped = S.sample(ours, z, schedule, "dpmpp_2m", timesteps=ts.long().tolist(), stable=False, clip=1.0).x
        free = S.sample(ours, z, schedule, "dpmpp_2m", timesteps=ts.long().tolist(), stable=False).x
    assert (free - clipped).abs().max() > 0.1  # this model's x0 predictions leave [-1, 1], so clipping is visible
    torch.testing.assert_close(clipped, theirs, rtol=1e-4, atol=1e-4)
    assert pipe.scheduler.config.timestep_spacing == "leading" and pipe.scheduler.config.prediction_type == "epsilon"
    assert not to_diffusers_scheduler(schedule).config.thresholding
    with pytest.raises(TypeError, match="clip must be True or False"):
        to_diffusers_scheduler(schedule, clip=1.0)


def test_the_pretrained_section_says_why_it_cannot_run_here(monkeypatch):
    from course_lib import pretrained

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "GPU" in pretrained.unavailable_reason()
    monkeypatch.setattr(pretrained, "hub_reachable", lambda: False)
    reason = pretrained.unavailable_reason(need_gpu=False)
    assert reason is not None and ("transformers" in reason or "offline" in reason)


def test_the_whole_stable_diffusion_pipeline_and_our_sampler_agree_on_a_tiny_one():
    # the SD section's code path end to end (prompt encoding, the pipeline's own call, VAE decoding), offline
    pytest.importorskip("transformers")
    from course_lib import pretrained

    pipe = pretrained.tiny_pipeline(seed=0)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    out = pretrained.side_by_side(pipe, prompt="a lighthouse", steps=8, scale=7.5, seed=0)
    assert out["theirs"].shape == out["ours"].shape == (1, 3, 32, 32)
    assert out["max_abs_diff"] < 1e-4 and out["theirs"].std() > 1e-3  # the same image, and not a blank one
    other = pretrained.side_by_side(pipe, prompt="a lighthouse", steps=8, scale=7.5, seed=1)
    assert (other["ours"] - out["ours"]).abs().max() > 1e-3  # another noise seed gives another image


def _flow_levels(n: int):
    """n + 1 levels uniform in a flow's time t, from t = 1 - 1e-5 (sigma = 1e5) down to 0, as t and as sigma."""
    ts = torch.linspace(1 - 1e-5, 0, n + 1, dtype=torch.float64)
    return ts, torch.cat([ts[:-1] / (1 - ts[:-1]), torch.zeros(1, dtype=torch.float64)])


@pytest.mark.parametrize("name, shape", [("ring8_flow", (500, 2)), ("digits_flow", (32, 1, 8, 8))])
def test_flow_sampling_in_float32_matches_diffusers_flow_schedulers(name, shape):
    """The shipped flow models sampled in float32 by our Euler and Heun and by diffusers' FlowMatchEulerDiscrete /
    FlowMatchHeunDiscrete schedulers on the same levels and noise: within 1e-4 (from sigma = 1e5 an update written as
    x + (sigma_next - sigma)(x - D) / sigma lost float32's digits to cancellation: 4e-3 apart)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

    from course_lib.checkpoints import load_pretrained

    model = load_pretrained(name).model
    n = 12
    ts, sigmas = _flow_levels(n)
    noise = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    velocity = lambda x, t: model(x, torch.full((x.shape[0],), float(t), dtype=torch.float32))  # noqa: E731
    euler = FlowMatchEulerDiscreteScheduler()
    euler.set_timesteps(sigmas=ts[:-1].tolist())
    heun = FlowMatchHeunDiscreteScheduler()
    heun.set_timesteps(n)
    t32 = ts.float()  # its levels set by hand, in its interleaved form (one entry per model evaluation)
    heun.timesteps = torch.cat([t32[:1], t32[1:-1].repeat_interleave(2)]) * 1000
    heun.sigmas = torch.cat([t32[:1], t32[1:-1].repeat_interleave(2), t32[-1:]])
    for ours, theirs in (("euler", euler), ("heun", heun)):
        x = noise.clone()
        for t in theirs.timesteps:
            x = theirs.step(velocity(x, t), t, x).prev_sample
        got = S.sample(model, noise, sampler=ours, sigmas=sigmas.float()).x
        assert got.dtype == torch.float32 and float((got - x).abs().max()) < 1e-4, (name, ours)


def test_the_euler_update_keeps_float32_digits_from_a_flow_s_first_level():
    from course_lib import kernels

    g = torch.Generator().manual_seed(0)
    x, d = torch.randn(1000, 2, generator=g) * 1e5, torch.randn(1000, 2, generator=g)
    exact = kernels.euler_step(x.double(), d.double(), 99999.0, 19.0)
    assert float((kernels.euler_step(x, d, 99999.0, 19.0).double() - exact).abs().max()) < 1e-5


def test_the_export_benchmark_compares_like_with_like_and_reports_the_karras_crash():
    from course_lib.bench import export as E

    records = E.pipeline_records(n=60, nfes=(5,))
    assert [r["what"] for r in records] == ["exported pipeline, clipped", "exported pipeline, not clipped",
                                            "course default call"]
    assert all(r["nfe"] == 5 and r["samples"] == 60 and r["fd"] > 0 for r in records)  # same NFE, same n
    crash = E.karras_crash(nfe=10)
    assert crash["diffusers"] == diffusers.__version__ and crash["with set_begin_index(0)"] == "ran"
    assert crash["as a pipeline runs it"] == "ran" or crash["as a pipeline runs it"].startswith("IndexError")
