"""Lesson 12's students through the one training loop: consistency distillation / training and progressive
distillation start from their teacher, keep their target or round's teacher as the algorithms say, resume exactly, and
learn what they are trained for (a progressive student's one step lands where its teacher's two steps do)."""
import copy
import math

import pytest
import torch

from course_lib import consistency as C
from course_lib.families.fewstep import halving_grid, load_teacher
from course_lib.train import TrainConfig, Trainer

CD = dict(data="ring8", family="consistency", teacher="ring8", steps=30, batch_size=64, lr=1e-4, warmup=5)
PD = dict(data="ring8", family="progressive", teacher="ring8", start_steps=8, steps=30, batch_size=64, lr=1e-4,
          warmup=5)


def _equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_distillation_starts_from_the_teacher_and_its_target_is_an_ema():
    tr = Trainer(TrainConfig(**CD, target_decay=0.9))
    teacher, _ = load_teacher("ring8")
    x = torch.randn(16, 2) * 4
    s = torch.full((16,), 4.0)
    c_skip, c_out = C.boundary_coefficients(s, C.SIGMA_DATA)
    with torch.no_grad():
        want = c_skip[:, None].float() * x + c_out[:, None].float() * teacher(x, s)
        torch.testing.assert_close(tr.model(x, s), want, atol=1e-5, rtol=1e-5)
    before = copy.deepcopy(tr.nets["target"])
    tr.train(steps=1, progress=False)
    for t, b, m in zip(tr.nets["target"].parameters(), before.parameters(), tr.model.parameters()):
        torch.testing.assert_close(t, b + 0.1 * (m - b))
    assert not _equal(tr.model, before)


@pytest.mark.parametrize("config", [CD, dict(data="ring8", family="consistency", steps=30, batch_size=64, warmup=5,
                                             model={"kind": "mlp", "hidden": 32, "depth": 2}, intervals=4,
                                             max_intervals=16, distance="pseudo_huber"), PD],
                         ids=["distillation", "training", "progressive"])
def test_exact_resume(config, tmp_path):
    straight = Trainer(TrainConfig(**config)).train(progress=False)
    first = Trainer(TrainConfig(**config)).train(steps=13, progress=False)  # PD: inside round 1 of 3
    first.save(tmp_path / "s.pt")
    resumed = Trainer.resume(tmp_path / "s.pt").train(progress=False)
    assert resumed.losses == straight.losses
    assert _equal(resumed.ema, straight.ema)


def test_consistency_training_grid_doubles():
    assert [C.improved_ct_steps(k, 30, 4, 16) for k in (0, 9, 10, 20, 29)] == [4, 4, 8, 16, 16]


def test_progressive_rounds_hand_the_student_over():
    tr = Trainer(TrainConfig(**PD))  # 8 -> 4 -> 2 -> 1: three rounds of 10 steps
    assert tr.config.options.rounds == 3
    assert [tr.spec.round_of(tr.config, k) for k in (0, 9, 10, 19, 20, 29)] == [0, 0, 1, 1, 2, 2]
    tr.train(steps=10, progress=False)
    student = copy.deepcopy(tr.model)
    assert not _equal(tr.nets["teacher"], student)
    tr.train(steps=1, progress=False)  # the first step of round 2 makes the student the teacher
    assert _equal(tr.nets["teacher"], student)


def test_halving_grid_nests():
    torch.testing.assert_close(halving_grid(8)[::2], halving_grid(4))
    assert float(halving_grid(4)[0]) == pytest.approx(C.SIGMA_MAX) and float(halving_grid(4)[-1]) == 0.0


def test_a_progressive_student_takes_in_one_step_what_its_teacher_takes_in_two():
    tr = Trainer(TrainConfig(data="ring8", family="progressive", teacher="ring8", start_steps=2, steps=600,
                             batch_size=256, lr=1e-4, warmup=20, ema_decay=0.99, sigma_max=10.0))
    teacher, _ = load_teacher("ring8")
    tr.train(progress=False)
    x = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0)) * 10
    with torch.no_grad():
        two = C.ode_step(teacher, C.ode_step(teacher, x, 10.0, float(halving_grid(2, 10.0)[1]), "euler"),
                         float(halving_grid(2, 10.0)[1]), 0.0, "euler")
        gap_student = float(((tr.ema(x, 10.0) - two) ** 2).mean())
        gap_teacher = float(((teacher(x, torch.full((4000,), 10.0)) - two) ** 2).mean())
    assert gap_student < 0.25 * gap_teacher, (gap_student, gap_teacher)


def test_options_are_checked():
    with pytest.raises(ValueError, match="teacher"):
        TrainConfig(data="ring8", family="progressive")
    with pytest.raises(ValueError, match="power of two"):
        TrainConfig(**{**PD, "start_steps": 6})
    with pytest.raises(ValueError, match="twice"):
        TrainConfig(**{**PD, "start_steps": 2, "final_steps": 2})
    with pytest.raises(ValueError, match="distance"):
        TrainConfig(**{**CD, "distance": "lpips"})
    with pytest.raises(ValueError, match="same data"):
        Trainer(TrainConfig(**{**CD, "data": "grid25"}))
    with pytest.raises(ValueError, match="same data"):
        Trainer(TrainConfig(**{**PD, "data": "grid25"}))
    with pytest.raises(ValueError, match="init 'ring8' was trained on 'ring8'"):
        Trainer(TrainConfig(data="grid25", family="consistency", init="ring8", steps=5))
    with pytest.raises(ValueError, match="not both"):
        TrainConfig(**CD, init="ring8")
    with pytest.raises(ValueError, match="flow model"):
        load_teacher("ring8_flow")


def test_consistency_training_can_start_from_a_model_without_calling_it():
    tr = Trainer(TrainConfig(data="ring8", family="consistency", init="ring8", steps=5, batch_size=32, warmup=1))
    start, _ = load_teacher("ring8")
    assert tr.teacher is None  # no teacher calls: consistency training
    assert _equal(tr.model.denoiser, start) and _equal(tr.nets["target"], tr.model)
    tr.train(progress=False)
    assert not _equal(tr.model.denoiser, start)


ADD = dict(data="digits", family="adversarial", teacher="digits_edm", steps=6, batch_size=8, lr=1e-4, warmup=1,
           adv_weight=0.1, amp=False)


def test_adversarial_distillation_trains_a_discriminator_beside_the_student(tmp_path):
    tr = Trainer(TrainConfig(**ADD))
    assert tr.net_configs["disc"]["kind"] == "discriminator" and tr.spec.loss_names == ("loss", "d_loss")
    disc, student = copy.deepcopy(tr.nets["disc"]), copy.deepcopy(tr.model)
    tr.train(steps=3, progress=False)
    assert not _equal(tr.nets["disc"], disc) and not _equal(tr.model, student)
    assert len(tr.history["d_loss"]) == 3 and all(math.isfinite(v) for v in tr.history["d_loss"])
    tr.save(tmp_path / "s.pt")
    straight = Trainer(TrainConfig(**ADD)).train(progress=False)
    resumed = Trainer.resume(tmp_path / "s.pt").train(progress=False)
    assert resumed.losses == straight.losses and _equal(resumed.ema, straight.ema)


def test_adversarial_distillation_with_no_weight_is_consistency_distillation():
    """adv_weight 0: the student's loss is the distillation loss alone, so its updates match the consistency family's
    (the discriminator draws its noise after the student's, from the same generator; with weight 0 it changes nothing
    the student sees but the generator's state, so the comparison is of the first step)."""
    a = Trainer(TrainConfig(**{**ADD, "adv_weight": 0.0}))
    b = Trainer(TrainConfig(**{k: v for k, v in ADD.items() if k != "adv_weight"} | {"family": "consistency"}))
    a.train(steps=1, progress=False)
    b.train(steps=1, progress=False)
    assert a.losses == b.losses
    assert _equal(a.model, b.model)


def test_adversarial_distillation_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="needs a teacher"):
        TrainConfig(data="digits", family="adversarial")
    with pytest.raises(ValueError, match="adv_weight"):
        TrainConfig(**{**ADD, "adv_weight": -1.0})
    with pytest.raises(ValueError, match="for images"):
        Trainer(TrainConfig(data="ring8", family="adversarial", teacher="ring8", steps=2))
