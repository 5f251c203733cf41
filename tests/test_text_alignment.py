"""Lesson 14's alignment measures (course_lib.text_alignment): the AUC against scikit-learn's, the colour swap by
hand and through the grammar's parser."""
import pytest
import torch

from course_lib import text_alignment as TA


def test_auc_matches_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 8, (300,), generator=g).double()  # many ties
    labels = torch.rand(300, generator=g) < 0.3
    assert TA.auc(scores, labels) == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()), abs=1e-12)
    assert TA.auc(torch.arange(6.0), torch.tensor([0, 0, 0, 1, 1, 1])) == 1.0
    assert TA.auc(torch.arange(3.0), torch.ones(3)) != TA.auc(torch.arange(3.0), torch.ones(3))  # NaN: no negatives


def test_swap_colours_exchanges_the_binding_only():
    from course_lib.shapes import parse_caption

    cap = "a red circle left of a blue square"
    swapped = TA.swap_colours(cap)
    assert swapped == "a blue circle left of a red square"
    a, b = parse_caption(cap)["objects"], parse_caption(swapped)["objects"]
    assert [o["shape"] for o in a] == [o["shape"] for o in b] and [o["colour"] for o in a] == [o["colour"] for o in b][::-1]
    assert sorted(cap.split()) == sorted(swapped.split())  # the same bag of words
    with pytest.raises(ValueError, match="two different colours"):
        TA.swap_colours("a small red circle at the top left")
