"""Lesson 15's policy pieces: the observation-conditioned MLP, the reaching data, the regression family, the policies
and the benchmark's verdict."""
import pytest
import torch

from course_lib import reaching
from course_lib.bench import beyond
from course_lib.data import DataSource
from course_lib.families.regression import regress
from course_lib.nets import TimeMLP, build_model
from course_lib.policy import DiffusionPolicy, RegressionPolicy, policy_from
from course_lib.train import TrainConfig, Trainer, preset


def test_the_observation_changes_the_output_and_a_wrong_one_is_refused():
    torch.manual_seed(0)
    net = TimeMLP(dim=16, hidden=32, cond_dim=2)
    x, t = torch.randn(5, 16), torch.full((5,), 10)
    a, b = net(x, t, y=torch.zeros(5, 2)), net(x, t, y=torch.ones(5, 2))
    assert not torch.allclose(a, b)
    # the condition enters only through a linear map added to the first hidden layer: zero it and y does nothing
    torch.nn.init.zeros_(net.cond.weight)
    torch.nn.init.zeros_(net.cond.bias)
    assert torch.allclose(net(x, t, y=torch.zeros(5, 2)), net(x, t, y=torch.ones(5, 2)))
    for bad in (None, torch.zeros(5, 3), torch.zeros(5, 2, dtype=torch.long)):
        with pytest.raises(ValueError, match="vector"):
            net(x, t, y=bad)
    with pytest.raises(ValueError, match="not both"):
        TimeMLP(num_classes=3, cond_dim=2)
    with pytest.raises(ValueError, match="cond_dim"):
        TimeMLP(cond_dim=0)


def test_models_without_a_condition_keep_their_config():
    """The configs of the checkpoints shipped before lesson 15 have no cond_dim: a model built from one must have the
    same config (load_weights compares them)."""
    config = {"kind": "mlp", "dim": 2, "hidden": 64, "depth": 2, "temb_dim": 64, "num_classes": None,
              "prediction": "eps"}
    assert build_model(config).config == config
    assert build_model({**config, "cond_dim": 2}).config["cond_dim"] == 2


def test_reaching_data_are_normalised_chunks_paired_with_positions():
    source = DataSource("reaching")
    assert source.shape == (2 * reaching.CHUNK,) and source.cond_dim == 2 and source.num_classes is None
    x, y = source.sample(500, torch.Generator().manual_seed(0))
    assert x.shape == (500, 16) and y.shape == (500, 2)
    assert float(x.abs().max()) <= 1 + 1e-6  # moves of at most MAX_STEP, divided by it
    demos = reaching.demonstrations(4, seed=0)
    assert torch.allclose(reaching.chunks_from(reaching.normalise_chunks(demos["chunks"])), demos["chunks"], atol=1e-7)
    # flat order: x, y of the first move, then of the second, ...
    flat = reaching.normalise_chunks(demos["chunks"][:1])
    assert torch.allclose(flat[0, :2], demos["chunks"][0, 0] / reaching.MAX_STEP)


def test_configs_refuse_what_cannot_train():
    with pytest.raises(ValueError, match="conditional=True"):
        TrainConfig(data="reaching")
    with pytest.raises(ValueError, match="label_dropout"):
        TrainConfig(data="reaching", conditional=True)
    with pytest.raises(ValueError, match="observation"):
        TrainConfig(data="digits", family="regression")
    with pytest.raises(ValueError, match="mlp"):
        TrainConfig(data="reaching", family="regression", model={"kind": "unet"})


def test_the_two_presets_share_network_data_and_budget():
    d, r = preset("reaching_diffusion"), preset("reaching_regression")
    for field in ("data", "model", "batch_size", "lr", "steps", "warmup", "ema_decay"):
        assert getattr(d, field) == getattr(r, field), field
    td, tr = Trainer(preset("reaching_diffusion", steps=1)), Trainer(preset("reaching_regression", steps=1))
    count = [sum(p.numel() for p in t.model.parameters()) for t in (td, tr)]
    assert count[0] == count[1]


def test_regression_fits_the_mean_chunk_of_each_observation():
    """On data where one observation is followed by two chunks equally often, regression learns their mean: the
    averaging that makes it fail between the two ways round (Chi et al. 2023, sec. 1). A fresh network on a fixed
    two-point problem, trained by the family's own step."""
    trainer = Trainer(preset("reaching_regression", steps=600, warmup=10, model={"kind": "mlp", "hidden": 64,
                                                                                 "depth": 2}))
    y = torch.zeros(256, 2)
    x = torch.where(torch.arange(256)[:, None] % 2 == 0, torch.full((1, 16), 0.8), torch.full((1, 16), -0.4))
    trainer.source.sample = lambda n, generator: (x, y)
    trainer.train(progress=False)
    out = regress(trainer.ema, torch.zeros(1, 2))
    assert torch.allclose(out, torch.full((1, 16), 0.2), atol=0.05)


def test_policies_return_chunks_in_the_task_s_units():
    torch.manual_seed(0)
    t = Trainer(preset("reaching_diffusion", steps=2, warmup=1))
    pol = policy_from(t)
    assert isinstance(pol, DiffusionPolicy)
    chunk = pol(torch.zeros(7, 2))
    assert chunk.shape == (7, reaching.CHUNK, 2)
    assert float(chunk.abs().max()) <= reaching.MAX_STEP + 1e-6  # the denoised chunk is clipped to [-1, 1]
    assert pol.calls == 10
    g = policy_from(Trainer(preset("reaching_regression", steps=1)))
    assert isinstance(g, RegressionPolicy) and g(torch.zeros(3, 2)).shape == (3, reaching.CHUNK, 2)
    with pytest.raises(ValueError, match="positions"):
        pol(torch.zeros(3))
    with pytest.raises(ValueError, match="cond_dim"):
        DiffusionPolicy(TimeMLP(), None)


def test_start_noise_zero_starts_every_episode_at_start():
    r = reaching.rollout(reaching.expert_policy(), episodes=6, seed=0, start_noise=0.0)
    assert torch.equal(r["paths"][:, 0], torch.tensor(reaching.START).expand(6, 2))
    with pytest.raises(ValueError, match="noise"):
        reaching.starts(3, torch.Generator(), noise=-0.1)


def _rec(policy, setting, seed, success, **kw):
    return {"section": "policy", "policy": policy, "setting": setting, "seed": seed, "success": success,
            "collided": 1 - success, "right": 0.5, "train_minutes": 1.0, **kw}


def test_the_verdict_compares_the_two_policies_seed_by_seed():
    records = [_rec("diffusion", "default", s, v) for s, v in enumerate((0.95, 0.93, 0.97))]
    records += [_rec("regression", "default", s, v) for s, v in enumerate((0.80, 0.90, 0.70))]
    records += [_rec("regression", "from START exactly", s, 0.0) for s in range(3)]
    records += [_rec("diffusion", "horizon", s, 0.90, execute=1) for s in range(3)]
    records += [_rec("regression", "horizon", s, 0.97, execute=1) for s in range(3)]
    for r in records:
        r.setdefault("execute", 4 if r["setting"] == "default" else None)
    v = beyond.verdict(records)
    assert v["better_at_execute_1"] == "regression" and v["better_at_execute_4"] == "diffusion"
    assert v["regression_execute_1"] == pytest.approx(0.97) and v["diffusion_execute_4"] == pytest.approx(0.95)
    assert v["diffusion_success"] == pytest.approx(0.95) and v["diffusion_target_met"]
    assert v["regression_success"] == pytest.approx(0.80)
    assert v["gap"] == pytest.approx(0.15) and v["gap_min_over_seeds"] == pytest.approx(0.03)
    assert v["regression_exact_start_success"] == 0.0
    assert not beyond.verdict([_rec("diffusion", "default", 0, 0.85)])["diffusion_target_met"]
    notes = [{"section": "notes", "seed": s, "model": m, "sampler_steps": k, "clean": c, "train_minutes": 1.0}
             for s in range(2) for m, k, c in (("diffusion", 20, 0.4 + 0.1 * s), ("gaussian", None, 0.05))]
    v = beyond.verdict(notes)
    assert v["notes_diffusion_20_clean"] == pytest.approx(0.45) and v["notes_gaussian_clean"] == pytest.approx(0.05)
    assert "success" in beyond.table(records)
