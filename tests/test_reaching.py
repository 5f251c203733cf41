"""Lesson 15's control task: the geometry against an independent dense check, the expert's two modes and chunks, and the
receding-horizon rollout on policies whose outcome is known (the expert succeeds, the mean of its two modes hits the
obstacle, a policy that never moves runs out of time)."""
import pytest
import torch

from course_lib import reaching as R


def test_clip_shortens_long_moves_and_keeps_directions_and_short_moves():
    a = torch.tensor([[0.3, 0.4], [0.01, -0.02], [0.0, 0.0]])
    c = R.clip_actions(a)
    assert torch.allclose(c[0], a[0] / 0.5 * R.MAX_STEP) and torch.equal(c[1], a[1]) and torch.equal(c[2], a[2])


def test_the_obstacle_test_agrees_with_a_dense_walk_along_each_segment():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2000, 2, generator=g) * 2 - 1, torch.rand(2000, 2, generator=g) * 2 - 1
    t = torch.linspace(0, 1, 2001)
    dense = (a[:, None] + t[None, :, None] * (b - a)[:, None]).norm(dim=-1).min(1).values
    clear = (dense - R.RADIUS).abs() > 1e-3  # the walk's own resolution decides nothing at the edge
    assert int(clear.sum()) > 1900
    assert torch.equal(R.hits_obstacle(a, b)[clear], (dense < R.RADIUS)[clear])


def test_the_expert_goes_round_both_sides_reaches_the_goal_and_its_chunks_are_its_next_moves():
    d = R.demonstrations(40, seed=3)
    assert int((d["sides"] == -1).sum()) == 20 and int((d["sides"] == 1).sum()) == 20
    assert torch.equal(R.side_taken(d["paths"]), d["sides"])
    paths = d["paths"]
    assert not R.hits_obstacle(paths[:, :-1], paths[:, 1:]).any()
    assert ((paths[:, -1] - torch.tensor(R.GOAL)).norm(dim=-1) < R.GOAL_RADIUS).all()
    moves = paths[:, 1:] - paths[:, :-1]
    chunks = d["chunks"].reshape(40, R.MAX_STEPS, R.CHUNK, 2)
    assert torch.allclose(chunks[:, :, 0], moves, atol=1e-5)
    assert torch.allclose(chunks[:, :-1, 1], moves[:, 1:], atol=1e-5)
    assert torch.equal(chunks[:, -1, 1:], torch.zeros(40, R.CHUNK - 1, 2))  # past the end: zero moves
    assert torch.allclose(d["observations"].reshape(40, R.MAX_STEPS, 2), paths[:, :-1])


def test_the_expert_as_a_policy_succeeds_and_the_mean_of_its_two_modes_hits_the_obstacle():
    ok = R.rollout(R.expert_policy(), 40, seed=1)
    assert R.success_rate(ok) == 1.0 and not ok["collided"].any()
    left, right = R.expert_policy(-1), R.expert_policy(1)
    mean = R.rollout(lambda p: (left(p) + right(p)) / 2, 40, seed=1)
    assert R.success_rate(mean) == 0.0 and mean["collided"].all()


def test_a_policy_that_never_moves_runs_out_of_time_and_bad_chunks_are_refused():
    still = R.rollout(lambda p: torch.zeros(len(p), R.CHUNK, 2), 10, seed=0)
    assert not still["success"].any() and not still["collided"].any() and (still["steps"] == R.MAX_STEPS).all()
    with pytest.raises(ValueError, match="chunks of shape"):
        R.rollout(lambda p: torch.zeros(len(p), 2), 10)
    with pytest.raises(ValueError, match="non-finite"):
        R.rollout(lambda p: torch.full((len(p), R.CHUNK, 2), float("nan")), 10)
    with pytest.raises(ValueError, match="execute"):
        R.rollout(lambda p: torch.zeros(len(p), R.CHUNK, 2), 10, execute=0)


def test_side_taken_by_hand():
    paths = torch.tensor([[[0.0, -1.0], [-0.5, -0.1], [-0.5, 0.2]],
                          [[0.0, -1.0], [0.4, -0.2], [0.5, 0.3]],
                          [[0.0, -1.0], [0.0, -0.9], [0.0, -0.8]]])
    assert R.side_taken(paths).tolist() == [-1, 1, 0]
