"""The checkpoints shipped in data/: present, small, documented, reproducible by one command, and good.

The sampling runs here are short (fewer samples, and fewer steps for digits), so the floors sit below the issue's
targets; the full measurement is made by `python -m course_lib train --preset NAME` and recorded on the card.
"""
import json
from pathlib import Path

import pytest
import torch

from course_lib.checkpoints import (
    SHIPPED,
    load_checkpoint,
    load_pretrained,
    shipped_dir,
)
from course_lib.classifier import accuracy, judge, load_classifier
from course_lib.data import MIXTURES, digits_split
from course_lib.evaluate import sample_quality

DATA = Path(__file__).resolve().parents[1] / "data"


def card(name: str) -> dict:
    return json.loads((DATA / f"{name}.json").read_text())


@pytest.mark.parametrize("name", SHIPPED)
def test_each_checkpoint_is_small_loads_and_has_a_card_with_its_command(name):
    path = DATA / f"{name}.pt"
    assert path.is_file() and path.stat().st_size < 6e6  # a few MB (the largest, shapes_pixel, 5.6 MB in fp16)
    c = card(name)
    assert c["command"].startswith(f"python -m course_lib train --preset {name} ")
    assert {"preset", "steps", "train_seconds", "machine"} <= set(c)
    assert load_checkpoint(path)["card"] == c
    assert shipped_dir() == DATA


def test_benchmark_records_are_written_one_per_line(tmp_path):
    """A benchmark's flat records (a list, or a "records" list beside other keys) take a line each; other JSON is
    indented; every form reads back as written."""
    import json

    from course_lib.checkpoints import write_json_atomic

    for data, lines in (([{"b": 1, "a": 2}, {"a": 3}], 4), ({"command": "x", "records": [{"a": 1}, {"a": 2}]}, 7),
                        ({"a": [1, 2]}, 6)):
        path = write_json_atomic(data, tmp_path / "bench.json")
        text = path.read_text()
        assert json.loads(text) == data and len(text.splitlines()) == lines, text
    assert '{"a": 2, "b": 1}' in write_json_atomic([{"b": 1, "a": 2}], tmp_path / "b.json").read_text()


def test_data_folder_stays_lean():
    # the guide's cap for data/ is 60 MB (lesson 12 added its teacher and four students, fp16, 1.4 MB each)
    assert sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file()) < 60e6


@pytest.mark.parametrize("name", ["ring8", "grid25", "ring8_cond"])
def test_2d_checkpoints_cover_every_mode_with_high_quality(name):
    pre = load_pretrained(name)
    q = sample_quality(pre.model, pre.schedule, pre.config, n=1000, seed=1)  # DDPM, all 1,000 steps
    assert q["modes_covered"] == len(MIXTURES[pre.config["data"]]().modes)
    assert q["hq_fraction"] >= 0.85  # the 0.90 is measured on 2,000 samples by the train command
    if pre.config.get("conditional"):  # asked for mode y, it lands there; without a label it still covers the ring
        assert q["label_accuracy"] >= 0.97 and q["no_label"]["modes_covered"] == 8
        assert q["no_label"]["hq_fraction"] >= 0.85  # the card's 0.95 on 2,000; standard error here 0.007


def test_the_classifier_is_accurate_as_its_card_says():
    clf = load_classifier()
    x, y = digits_split("test")
    acc = accuracy(clf, x, y)
    assert acc == pytest.approx(card("digits_classifier")["test_accuracy"], abs=1e-6) and acc >= 0.95


@pytest.mark.parametrize("name", ["digits", "digits_cond"])
def test_digit_samples_are_recognised_like_real_digits(name):
    pre = load_pretrained(name)
    real = judge(load_classifier(), digits_split("test")[0])["confidence"]
    q = sample_quality(pre.model, pre.schedule, pre.config, n=200, steps=50, seed=1)
    # floors for 200 samples of a 50-step run; a class share's standard error is 0.021 at n = 200
    assert q["confidence"] >= real - 0.08 and q["max_class_gap"] <= 0.08
    if pre.config["conditional"]:
        assert q["label_accuracy"] >= 0.9


def test_a_model_that_ignores_its_input_fails_the_digits_floor():
    pre = load_pretrained("digits")
    def zero(x, t):  # predicts no noise at all: the samples stay noise
        return torch.zeros_like(x)
    zero.prediction = "eps"
    q = sample_quality(zero, pre.schedule, {"data": "digits"}, n=300, steps=20, seed=1)
    assert q["confidence"] < judge(load_classifier(), digits_split("test")[0])["confidence"] - 0.08


def test_the_noise_aware_classifier_reads_clean_digits_and_steers_the_unconditional_model():
    from course_lib.evaluate import noisy_accuracy
    from course_lib.guidance import classifier_guidance, load_noisy_classifier
    from course_lib.samplers import sample
    from course_lib.schedules import NoiseSchedule

    log_prob = load_noisy_classifier()
    # measured again here, not read from the card: the card must say what the shipped weights do
    acc = noisy_accuracy(log_prob.model, NoiseSchedule.named("cosine", 1000))["accuracy_by_step"]
    assert acc == card("digits_noisy_classifier")["quality"]["accuracy_by_step"] == log_prob.card["quality"][
        "accuracy_by_step"]
    # 297 held-out digits: at t = 0 the 95% floor is far below the 99.7% measured (standard error 0.003); at t = 999
    # nothing of the image is left, and no classifier beats the largest class share (0.11) by more than chance
    assert acc["0"] >= 0.95 and acc["999"] < 0.2
    # guided towards labels 0..9 at scale 4, judged by the other shipped classifier. Measured: 0.996 with 500 samples
    # at 20 steps; with n = 200 (standard error 0.021 at 0.9) a drop to 0.9 is far outside chance
    pre, clf = load_pretrained("digits"), load_classifier()
    y = torch.arange(200) % 10
    guided = classifier_guidance(pre.model, log_prob, 4.0, schedule=pre.schedule)
    x = sample(guided, torch.randn(200, 1, 8, 8, generator=torch.Generator().manual_seed(0)), steps=10,
               model_kwargs={"y": y}).x.clamp(-1, 1)
    assert (clf(x).argmax(1) == y).float().mean() >= 0.9
    with pytest.raises(ValueError, match="no noise-aware classifier"):
        load_noisy_classifier(DATA / "digits.pt")


FEW_STEP = ("digits_cd", "digits_ct", "digits_pd", "digits_add")


@pytest.mark.parametrize("name", FEW_STEP)
def test_few_step_students_beat_their_teacher_at_one_call_from_the_weights(name):
    """At one network call a student must do far better than its teacher does with its best-tuned sampler (the
    teacher's card: FD near 290 at 1 NFE on its tuning draws): at most half the teacher's FD measured here on the same
    noise, and the card's own quality reproduced from the weights (sampling is deterministic at one call)."""
    from course_lib.bench.samplers import Judge
    from course_lib.families.fewstep import halving_grid
    from course_lib.samplers import sample

    student, teacher = load_pretrained(name), load_pretrained("digits_edm")
    noise = torch.randn(500, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    judge_ = Judge("digits", 500)
    if name == "digits_pd":
        x = sample(student.model, noise, sampler="euler", sigmas=halving_grid(1), clip=1.0).x
    else:  # the card's default: the consistency sampler on its tuned one-call level
        x = sample(student.model, noise, steps=1, clip=1.0).x
    t = sample(teacher.model, noise, steps=1, clip=1.0).x  # the teacher's tuned one-call levels
    fd_student, fd_teacher = judge_(x.clamp(-1, 1))["fd"], judge_(t.clamp(-1, 1))["fd"]
    assert fd_student < 0.5 * fd_teacher, (fd_student, fd_teacher)
    q = sample_quality(student.model, None, student.config, n=1000)
    assert q["fd"] == pytest.approx(card(name)["quality"]["fd"], rel=1e-3)


@pytest.mark.parametrize("name", ["digits_cd", "digits_ct", "digits_add"])
def test_shipped_consistency_students_keep_the_boundary_condition(name):
    """f(x, sigma_min) = x whatever the weights (c_skip = 1, c_out = 0 there), and near it f barely moves x."""
    from course_lib.consistency import SIGMA_MIN

    f = load_pretrained(name).model
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(f(x, torch.full((16,), SIGMA_MIN)), x)
        assert float((f(x, torch.full((16,), 2 * SIGMA_MIN)) - x).abs().max()) < 0.05  # c_out there: 0.004


def test_the_latent_consistency_student_follows_prompts_in_four_calls_from_the_weights():
    """The shipped latent consistency model, guidance folded in: at 4 calls (no guidance pass) most one-object prompts
    get every attribute right and it beats its guided teacher given the same 4 steps (8 network calls) on the same
    prompts and noise (the teacher's DPM-Solver++(2M) at 4 steps gets about half right: data/bench_t2i.json's 5-NFE row
    is 0.49); the card's 1-call adherence reproduced from the weights (one call: no sampler noise)."""
    from course_lib.lcm import load_lcm, prompt_adherence
    from course_lib.text2image import load_text_to_image

    student = load_lcm("shapes_lcm")
    r = prompt_adherence(student, 4, n=100, seed=11)
    t = prompt_adherence(load_text_to_image("shapes_ldm"), 4, n=100, seed=11)
    # 100 prompts: the standard error of a share near 0.95 is 0.022; the floor sits 4 of them below
    assert r["all"] >= 0.85 and r["all"] > t["all"] + 0.2, (r["all"], t["all"])
    q = card("shapes_lcm")["quality"]["nfe_1"]
    again = prompt_adherence(student, 1, n=500, seed=0)  # as the card was measured
    assert again["all"] == pytest.approx(q["all"], abs=0.01) and again["two_binding"] == pytest.approx(
        q["two_binding"], abs=0.01)
