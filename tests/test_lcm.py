"""Lesson 12's latent consistency model: the guided teacher against lesson 7's guidance, the family's loss against a
hand-made distillation step, the boundary condition with a caption, sampling and the export round trip."""
import copy
import math

import pytest
import torch

import course_lib.data as data_mod
from course_lib.consistency import consistency_distillation_loss, few_step_levels, karras_grid, ode_step
from course_lib.families.lcm import guided, load_text_teacher
from course_lib.text2image import load_text_to_image
from course_lib.train import TrainConfig, Trainer, preset

SMALL = 256  # training pairs for these tests (the preset's source encodes 20,000)


@pytest.fixture
def small_latents(monkeypatch):
    full = data_mod.shapes_latents
    monkeypatch.setattr(data_mod, "shapes_latents", lambda n=SMALL: full(SMALL))


def test_the_guided_teacher_is_lesson_7s_caption_guidance():
    """The family's guided teacher (EDM-preconditioned network, one batch of 2B) against TextToImage.denoiser(w)
    (samplers.as_denoiser and text2image.caption_guidance): the same function by two routes."""
    model, net = load_text_teacher("shapes_ldm")
    ctx, mask = model.condition(["a small red circle at the top left", "a large blue square at the bottom right"])
    null_c, null_m = model.condition("")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g) * 3.0
    for w in (1.0, 3.0, 0.0):
        fn = guided(net, w, null_c, null_m)
        ref = model.denoiser(w)
        for sigma in (0.05, 1.0, 15.0):
            got = fn(x, torch.full((2,), sigma), ctx, mask)
            want = ref(x, sigma, context=ctx, mask=mask)
            assert torch.allclose(got, want, atol=1e-4 * max(1.0, sigma)), (w, sigma)


def test_the_config_is_checked():
    with pytest.raises(ValueError, match="shapes_latents"):
        TrainConfig(data="digits", family="latent_consistency")
    with pytest.raises(ValueError, match="teacher"):
        TrainConfig(data="shapes_latents", family="latent_consistency", teacher=None)
    with pytest.raises(ValueError, match="guidance"):
        TrainConfig(data="shapes_latents", family="latent_consistency", guidance=-1.0)
    with pytest.raises(ValueError, match="latent"):
        load_text_teacher("shapes_pixel")


def test_a_training_step_is_guided_consistency_distillation_by_hand(small_latents):
    """One step of the family against the loss rebuilt by hand from the same draws: x = x0 + sigma n, the guided
    teacher's Heun step to the next level down, the EMA target there, the caption given to all three."""
    trainer = Trainer(preset("shapes_lcm", steps=3, warmup=1, batch_size=8))
    # at the start the student is the teacher's (unguided) denoiser behind the consistency parameterisation
    assert all(torch.equal(a, b) for a, b in zip(trainer.model.denoiser.state_dict().values(),
                                                 trainer.teacher.state_dict().values()))
    o = trainer.config.options
    student, target = copy.deepcopy(trainer.model), copy.deepcopy(trainer.nets["target"])
    g = copy.deepcopy(trainer.generator)
    x0, tokens = trainer.source.sample(8, g)
    context, mask = trainer.text_encoder(tokens)
    noise = torch.randn(x0.shape, generator=g)
    i = torch.randint(o.intervals, (8,), generator=g)
    grid = karras_grid(o.intervals, o.sigma_min, o.sigma_max)
    hi, lo = grid[i + 1].float(), grid[i].float()
    model, _ = load_text_teacher("shapes_ldm")
    null_c, null_m = model.condition("")
    ref = model.denoiser(3.0)  # lesson 7's guided denoiser, per row through a loop of scalar sigmas
    x = x0 + hi.reshape(-1, 1, 1, 1) * noise
    rows = []
    for r in range(8):
        kw = dict(context=context[r:r + 1], mask=mask[r:r + 1])
        rows.append(ode_step(ref, x[r:r + 1], float(hi[r]), float(lo[r]), "heun", **kw))
    x_next = torch.cat(rows)
    with torch.no_grad():
        aim = target(x_next, lo, context=context, mask=mask)
        want = ((student(x, hi, context=context, mask=mask) - aim) ** 2).flatten(1).mean(1).mean()
    loss = trainer.train_step()[0]
    assert math.isclose(float(loss), float(want), rel_tol=1e-3), (float(loss), float(want))
    # and the library's loss with the family's guided teacher gives the same number
    lib = consistency_distillation_loss(student, target, guided(trainer.teacher, 3.0, null_c, null_m), x0, noise, hi,
                                        lo, context=context, mask=mask)
    assert math.isclose(float(lib.detach()), float(want), rel_tol=1e-3)


def test_few_step_levels_by_hand():
    assert torch.allclose(few_step_levels(1, 0.002, 20.0), torch.tensor([20.0, 0.0], dtype=torch.float64))
    mid = ((0.002 ** (1 / 7) + 20 ** (1 / 7)) / 2) ** 7
    assert torch.allclose(few_step_levels(2, 0.002, 20.0), torch.tensor([20.0, mid, 0.0], dtype=torch.float64))
    four = few_step_levels(4, 0.002, 20.0)
    assert len(four) == 5 and float(four[0]) == pytest.approx(20.0) and four[-1] == 0.0 and bool((four[:-1].diff() < 0).all())
    assert float(four[-2]) > 0.002  # never a call at sigma_min, where f is the identity


def test_boundary_condition_export_round_trip_and_sampling_rules(small_latents, tmp_path):
    from course_lib.lcm import from_trainer, load_lcm

    trainer = Trainer(preset("shapes_lcm", steps=2, warmup=1, batch_size=4))
    trainer.train(progress=False)
    x, tokens = trainer.source.sample(4, torch.Generator().manual_seed(1))
    ctx, mask = trainer.text_encoder(tokens)  # the boundary condition holds whatever the caption
    out = trainer.ema(x + 0.3, torch.full((4,), trainer.config.sigma_min), context=ctx, mask=mask)
    assert torch.allclose(out, x + 0.3, atol=1e-6)
    live = from_trainer(trainer)
    trainer.export(tmp_path / "lcm.pt", {"preset": "shapes_lcm", **live.card}, half=False)
    loaded = load_lcm(tmp_path / "lcm.pt")
    assert loaded.few_step and loaded.schedule is None and loaded.card["guidance"] == 3.0
    prompts = ["a small red circle at the top left", "a large green triangle at the center"]
    for nfe in (1, 2, 4):
        a, b = live.generate(prompts, nfe=nfe, seed=3), loaded.generate(prompts, nfe=nfe, seed=3)
        assert a.shape == (2, 3, 32, 32) and torch.allclose(a, b, atol=1e-5)
    one = live.generate(prompts, nfe=1, seed=3, return_latents=True)
    ctx, mask = live.condition(prompts)
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    start = noise * math.sqrt(1 + 20.0 ** 2)  # the samplers' prior at sigma 20: pure noise x_T / sqrt(alpha-bar)
    assert torch.allclose(one, trainer.ema(start, torch.full((2,), 20.0), context=ctx, mask=mask), atol=1e-5)
    with pytest.raises(ValueError, match="folded in"):
        loaded.generate(prompts, scale=3.0)
    with pytest.raises(ValueError, match="not a latent consistency"):
        load_lcm("shapes_ldm")
    with pytest.raises(ValueError, match="consistency model"):
        load_text_to_image("shapes_ldm").generate(prompts, nfe=2, sampler="consistency")


def test_the_train_command_writes_a_student_with_its_adherence_card(small_latents, tmp_path, capsys):
    from course_lib.checkpoints import load_checkpoint
    from course_lib.cli import main
    from course_lib.lcm import load_lcm

    out = tmp_path / "lcm.pt"
    assert main(["train", "--preset", "shapes_lcm", "--steps", "2", "--out", str(out), "--eval-samples", "10",
                 "--half"]) == 0
    card = load_checkpoint(out)["card"]
    assert card["guidance"] == 3.0 and card["teacher"] == "shapes_ldm" and card["scale_factor"] > 0
    assert sorted(card["quality"]) == ["nfe_1", "nfe_2", "nfe_4"]
    assert all(0 <= card["quality"][k]["all"] <= 1 for k in card["quality"])
    assert load_lcm(out).generate("a red circle at the center", nfe=2).shape == (1, 3, 32, 32)
