"""Lesson 11's latent zero-terminal-SNR benchmark: lesson 7's trainer takes a v-prediction, a tiny run scores both
starts, the verdict by hand, the shipped records' shape."""
import json
import math
from pathlib import Path

import pytest

from course_lib.bench import terminal as T

SHIPPED = Path(__file__).resolve().parents[1] / "data" / "bench_terminal.json"


def test_a_tiny_v_run_scores_both_starts():
    rec = T.run_one("v", 0, 10, quick=True)
    assert rec["steps"] == T.QUICK_STEPS and rec["sigma_top"] > 20_000
    for start in T.STARTS:
        assert 0 <= rec[f"all_{start}"] <= 1 and math.isfinite(rec[f"fd_{start}"])
    with pytest.raises(ValueError, match="prediction"):
        T.run_one("x0", 0, 10, quick=True)


def test_lesson7_trainer_trains_the_prediction_it_is_given():
    from course_lib.text2image import train_text_to_image

    model, card = train_text_to_image("latent", steps=2, n_train=64, progress=False, prediction="v")
    assert model.unet.prediction == "v" and math.isfinite(card["final_loss"])


def _rec(p, seed, a20, atop, f20, ftop):
    return {"kind": "run", "prediction": p, "seed": seed, "steps": 5, "all_sigma_20": a20, "all_top": atop,
            "fd_sigma_20": f20, "fd_top": ftop}


def test_verdict_by_hand():
    recs = [_rec("eps", 0, 0.9, 0.0, 10.0, 1e6), _rec("eps", 1, 0.8, 0.1, 12.0, 3e6),
            _rec("v", 0, 0.9, 0.85, 10.0, 11.0), _rec("v", 1, 0.7, 0.75, 14.0, 13.0)]
    v = T.verdict(recs)
    assert math.isclose(v["eps_fd_top_over_20"], 2e6 / 11.0) and math.isclose(v["v_fd_top_over_20"], 1.0)
    assert math.isclose(v["eps_all_top_minus_20"], 0.05 - 0.85) and math.isclose(v["v_all_top_minus_20"], 0.0,
                                                                                  abs_tol=1e-12)


@pytest.mark.skipif(not SHIPPED.exists(), reason="the full run's records are not shipped")
def test_shipped_records_cover_both_predictions_and_seeds():
    runs = [r for r in json.loads(SHIPPED.read_text()) if r.get("kind") == "run"]
    assert {(r["prediction"], r["seed"]) for r in runs} == {(p, s) for p in T.PREDICTIONS for s in T.SEEDS}
    assert all(r["steps"] == T.STEPS and r["prompts"] == T.PROMPTS for r in runs)
