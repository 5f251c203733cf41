"""Lesson 13's benchmark (course_lib.bench.adapt): the summary and verdict by hand on made-up records, resuming by
run, and one quick run of each kind end to end (with an untrained judge head: the plumbing, not the numbers)."""
import pytest
import torch

from course_lib.bench import adapt as B


def _records():
    recs = [{"section": "reference", "seed": s, "fidelity": 0.0, "concept_all": 0.0, "old_all": 0.9 + 0.02 * s,
             "old_binding": 0.4, "autoencoder_fidelity": 0.9, "autoencoder_all": 0.88} for s in (0, 1)]
    for s in (0, 1):
        for rank, steps, fid in ((1, 200, 0.3), (1, 400, 0.5), (4, 200, 0.6), (4, 400, 0.92 + 0.02 * s)):
            recs.append({"section": "lora", "seed": s, "rank": rank, "steps": steps, "fidelity": fid,
                         "concept_all": fid, "old_all": 0.89 if (rank, steps) == (4, 400) else 0.9,
                         "old_binding": 0.4, "trainable_share": 0.01 * rank, "train_minutes": 1.0})
        recs.append({"section": "recipe", "seed": s, "recipe": "attention, lr 1e-3, no prior", "fidelity": 0.5,
                     "concept_all": 0.5, "old_all": 0.7 - 0.1 * s, "old_binding": 0.3, "trainable_share": 0.02})
        for way, old in (("lora", 0.8), ("lora_prior", 0.89 + 0.02 * s)):
            recs.append({"section": "five", "seed": s, "way": way, "fidelity": 0.7, "concept_all": 0.6,
                         "old_all": old, "old_binding": 0.4})
        recs.append({"section": "controlnet", "seed": s, "iou": 0.6 + 0.2 * s, "plain_iou": 0.08, "iou_over_half": 0.7,
                     "plain_iou_over_half": 0.05})
        recs.append({"section": "inversion", "seed": s, "steps": 50, "scale": 1.0, "psnr": 30.0 + s,
                     "psnr_autoencoder": 32.0, "edit_colour": 1.0, "edit_kept": 1.0, "edit_all": 1.0})
    return recs


def test_summary_and_verdict_by_hand():
    recs = _records()
    rows = {(r["rank"], r["steps"]): r for r in B.summarize(recs, "lora", ("rank", "steps"))}
    assert rows[(4, 400)]["fidelity"] == pytest.approx(0.93) and rows[(4, 400)]["seeds"] == 2
    assert rows[(4, 400)]["fidelity_std"] == pytest.approx(0.02 / 2 ** 0.5)
    v = B.verdict(recs)
    assert v["best_lora_rank"] == 4 and v["best_lora_steps"] == 400 and v["fidelity_target_met"]
    # the drift target is read on the recommended run (the lora section's rank 4 at its last step: prior on)
    assert v["recommended_fidelity"] == pytest.approx(0.93) and v["drift_target_met"]
    assert v["recommended_old_all_drop"] == pytest.approx(0.91 - 0.89)
    assert v["five_prior_old_all_drop"] == pytest.approx(0.91 - 0.90)
    assert v["five_no_prior_old_all_drop"] == pytest.approx(0.91 - 0.80)
    assert v["iou"] == pytest.approx(0.7) and v["iou_target_met"] and v["plain_iou"] == pytest.approx(0.08)
    assert v["psnr_50"] == pytest.approx(30.5) and v["psnr_target_met"]
    text = B.table(recs)
    assert "rank  4   400 steps" in text and "attention, lr 1e-3, no prior" in text and "recommended" in text
    five = B.table(recs, "five")  # one section: its lines and the model before adapting, nothing else
    assert "lora_prior" in five and "before adapting" in five and "rank" not in five and "Inversion" not in five
    assert "lr 0.003" in five and B.table(recs, "inversion", "controlnet").count("\n") == 1
    recs[2]["train_minutes"] = 5.0  # seed 0's run took longer: its minutes are shown, not a mean over machines
    assert B.summarize(recs, "lora", ("rank", "steps"))[0]["train_minutes"] == 5.0
    assert "the training run of seed 0" in B.table(recs, "lora")
    recipe = B.summarize(recs, "recipe", ("recipe",))[0]
    assert recipe["old_all"] == pytest.approx(0.65) and recipe["seeds"] == 2


def test_runs_regroup_for_resuming():
    recs = _records()
    runs = B._group(recs)
    assert sum(len(r) for r in runs) == len(recs)
    lora_seed0_rank4 = [r for r in runs if B._key(r) == ("lora", 0, 4, None, None)]
    assert len(lora_seed0_rank4) == 1 and len(lora_seed0_rank4[0]) == 2  # both points of its curve: one run
    keys = {B._key(t) for t in B.tasks_for((0, 1), 16, True)}
    assert ("five", 1, None, "lora_prior", None) in keys and ("lora", 0, 8, None, None) in keys
    assert ("recipe", 1, None, None, "attention, lr 3e-3, no prior") in keys
    assert len(keys) == 2 * (1 + len(B.RANKS) + len(B.RECIPES) + len(B.FIVE) + 2)


@pytest.fixture
def quick_judges(monkeypatch):
    from course_lib import concepts
    from course_lib.attributes import load_attribute_classifier

    torch.manual_seed(0)
    judge = concepts.ConceptJudge(load_attribute_classifier()).eval()
    monkeypatch.setattr(B, "_judges", lambda: (judge, load_attribute_classifier()))


def test_a_quick_five_image_run_with_the_prior_and_the_reference(quick_judges):
    recs = B.run_five(0, "full_prior", 8, quick=True)
    assert len(recs) == 1 and recs[0]["prior_weight"] == 1.0 and recs[0]["steps"] == B.QUICK["five_steps"]
    assert 0 <= recs[0]["fidelity"] <= 1 and recs[0]["trainable"] > 1_000_000  # every UNet weight
    ref = B.run_reference(0, 8, quick=True)[0]
    assert 0 <= ref["autoencoder_fidelity"] <= 1 and ref["old_prompts"] == 8


def test_a_quick_inversion_run():
    recs = B.run_inversion(0, 6, quick=True)
    assert [(r["steps"], r["scale"]) for r in recs] == [(5, s) for s in B.INVERSION_SCALES]
    assert all(10 < r["psnr"] < r["psnr_autoencoder"] + 1 for r in recs)


def test_a_quick_recipe_run_undoes_its_choice(quick_judges):
    """A recipe run is the recommended run with one choice undone: attention only means fewer trainable weights than
    the recommended run's (which adapts the convs too), and no prior."""
    from course_lib.adapt import AdaptConfig

    rec = B.run_recipe(0, "attention, lr 3e-3, no prior", 8, quick=True)
    assert len(rec) == 1 and rec[0]["recipe"] == "attention, lr 3e-3, no prior" and rec[0]["steps"] == B.QUICK["curve"][-1]
    assert 0 < rec[0]["trainable_share"] < 0.03 and 0 <= rec[0]["fidelity"] <= 1
    assert AdaptConfig().targets == "attention_conv" and AdaptConfig().prior_weight > 0  # what the recipes undo
