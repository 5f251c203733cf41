"""The training loop and checkpoints: exact resume, refusal of foreign or corrupt files, atomic saves, the CLI."""
import json

import pytest
import torch

from course_lib import checkpoints as C
from course_lib.cli import main
from course_lib.train import TrainConfig, Trainer, plot_losses, preset, smoothed

TINY_MLP = dict(data="ring8", model={"kind": "mlp", "hidden": 32, "depth": 2}, batch_size=64, steps=40, warmup=5)
TINY_UNET = dict(data="digits", conditional=True, batch_size=8, steps=10, warmup=2, schedule="cosine",
                 model={"kind": "unet", "base": 8, "mults": [1, 2], "num_res": 1, "heads": 2})


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


TINY_CLASSIFIER = dict(data="digits", family="classifier", batch_size=8, steps=10, warmup=2,
                       model={"kind": "noisy_classifier", "base": 8})


@pytest.mark.parametrize("cfg", [TINY_MLP, TINY_UNET, TINY_CLASSIFIER],
                         ids=["mlp-ring8", "unet-digits-conditional", "noisy-classifier-digits"])
def test_resumed_training_is_bit_for_bit_the_uninterrupted_run(tmp_path, cfg):
    config = TrainConfig(**cfg)
    straight = Trainer(config).train(progress=False)
    first = Trainer(config).train(steps=config.steps // 2 - 1, progress=False)
    first.save(tmp_path / "state.pt")
    torch.manual_seed(1234)  # whatever the user's code does to the global RNG in between
    resumed = Trainer.resume(tmp_path / "state.pt").train(progress=False)
    assert resumed.step == straight.step == config.steps
    assert _same(resumed.model, straight.model) and _same(resumed.ema, straight.ema)
    assert resumed.losses == straight.losses
    # and the check itself can fail: another seed gives other weights
    assert not _same(Trainer(TrainConfig(**{**cfg, "seed": 1})).train(progress=False).model, straight.model)


def test_training_lowers_the_loss_and_the_ema_lags_the_weights():
    tr = Trainer(TrainConfig(**{**TINY_MLP, "steps": 300, "lr": 3e-3})).train(progress=False)
    assert sum(tr.losses[-50:]) / 50 < 0.6 * sum(tr.losses[:50]) / 50
    assert not _same(tr.ema, tr.model)


def test_budgets_in_steps_and_seconds():
    tr = Trainer(TrainConfig(**TINY_MLP))
    assert tr.train(steps=7, progress=False).step == 7 and len(tr.losses) == 7
    assert tr.train(steps=100, seconds=0.0, progress=False).step == 7  # no time: no step
    calls = []
    tr.train(steps=10, progress=False, callback=lambda t: calls.append(t.step), every=5)
    assert calls == [10, 15] and tr.step == 17
    with pytest.raises(ValueError, match="non-negative"):
        tr.train(steps=-1)


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    tr = Trainer(TrainConfig(**{**TINY_MLP, "warmup": 10, "lr": 1.0, "steps": 100}))
    assert tr.lr_at(0) == pytest.approx(0.1) and tr.lr_at(50) == pytest.approx(0.55)
    assert tr.lr_at(100) == pytest.approx(0.1)
    flat = Trainer(TrainConfig(**{**TINY_MLP, "warmup": 10, "lr": 1.0, "lr_decay": "constant"}))
    assert [flat.lr_at(s) for s in (0, 4, 9, 500)] == pytest.approx([0.1, 0.5, 1.0, 1.0])
    low = Trainer(TrainConfig(**{**TINY_MLP, "warmup": 10, "lr": 1.0, "steps": 100, "lr_floor": 0.01}))
    assert low.lr_at(50) == pytest.approx(0.505) and low.lr_at(100) == pytest.approx(0.01)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="lr_floor"):
            TrainConfig(**{**TINY_MLP, "lr_floor": bad})


def test_a_nan_loss_stops_training_with_a_clear_message(monkeypatch):
    tr = Trainer(TrainConfig(**TINY_MLP))
    monkeypatch.setattr(tr.model, "forward", lambda x, t, **kw: torch.full_like(x, float("nan")))
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        tr.train(steps=1, progress=False)


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    Trainer(TrainConfig(**TINY_MLP)).save(tmp_path / "mlp.pt")
    other = Trainer(TrainConfig(**{**TINY_MLP, "model": {"kind": "mlp", "hidden": 48, "depth": 2}}))
    with pytest.raises(ValueError, match=r"different model \(hidden: 32 in the checkpoint, 48 here\)"):
        other.load_state_dict(C.load_checkpoint(tmp_path / "mlp.pt"))
    from course_lib.nets import UNet

    with pytest.raises(ValueError, match="different model.*kind: 'mlp'"):
        C.load_weights(UNet(base=8, mults=(1, 2), num_res=1, heads=2), tmp_path / "mlp.pt")


class _Pickled:
    """An object a weights-only load must refuse."""


def test_corrupt_truncated_and_foreign_files_are_refused(tmp_path):
    tr = Trainer(TrainConfig(**TINY_MLP))
    good = tr.save(tmp_path / "good.pt")
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "noise.pt").write_bytes(bytes(range(256)) * 8)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    for name in ("cut.pt", "noise.pt"):
        with pytest.raises(ValueError, match="not a readable checkpoint") as err:
            C.load_checkpoint(tmp_path / name)
        assert "False" not in str(err.value)  # no advice to retry with weights_only=False
    with pytest.raises(ValueError, match="not a course_lib checkpoint"):
        C.load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(FileNotFoundError):
        C.load_checkpoint(tmp_path / "missing.pt")
    torch.save({"format": C.FORMAT, "hook": _Pickled()}, tmp_path / "code.pt")  # a pickle of arbitrary objects
    with pytest.raises(ValueError, match="refuses to unpickle") as err:
        C.load_checkpoint(tmp_path / "code.pt")
    assert "weights_only=False will" not in str(err.value)  # never PyTorch's advice to load it unsafely
    with pytest.raises(ValueError, match=r"no shipped model called 'rin8'.*'ring8', 'ring8_cond', 'grid25'"):
        C.load_pretrained("rin8")
    tr.export(tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="cannot be resumed"):
        Trainer.resume(tmp_path / "weights.pt")


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    tr = Trainer(TrainConfig(**TINY_MLP))
    path = tr.save(tmp_path / "state.pt")
    before = path.read_bytes()
    tr.train(steps=3, progress=False)

    def crash(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        tr.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temporary file left behind


def test_saved_files_get_ordinary_permissions_not_private_temp_file_ones(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        path = Trainer(TrainConfig(**TINY_MLP)).save(tmp_path / "state.pt")
        card = C.write_json_atomic({"a": 1}, tmp_path / "card.json")
        assert path.stat().st_mode & 0o777 == card.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(mask)


def test_exported_weights_load_as_a_pretrained_model(tmp_path):
    tr = Trainer(TrainConfig(**TINY_MLP)).train(steps=5, progress=False)
    tr.export(tmp_path / "m.pt", card={"note": "tiny"})
    loaded = C.load_pretrained(tmp_path / "m.pt")
    assert _same(loaded.model, tr.ema) and loaded.card == {"note": "tiny"}
    assert loaded.schedule.T == 1000 and loaded.config["data"] == "ring8" and not loaded.model.training


def test_config_and_preset_errors():
    with pytest.raises(ValueError, match="data must be one of"):
        TrainConfig(data="cifar")
    with pytest.raises(ValueError, match="labelled data"):
        TrainConfig(data="two_moons", conditional=True)  # a mixture's mode is its label; two moons has none
    with pytest.raises(ValueError, match="unknown preset"):
        preset("imagenet")
    assert preset("digits_cond").conditional and not preset("digits").conditional


def test_each_family_owns_its_fields_given_and_read_flat():
    from dataclasses import replace

    from course_lib.families import DiffusionOptions, GANOptions

    c = TrainConfig(data="digits", prediction="v", schedule="cosine", model={"kind": "unet", "base": 8})
    assert type(c.options) is DiffusionOptions and c.prediction == "v" and c.options.schedule == "cosine"
    assert c.to_dict()["prediction"] == "v" and "gan_reg" not in c.to_dict()
    assert TrainConfig.from_dict(c.to_dict()) == c
    g = replace(c, family="gan", model={"net": "conv", "base": 4}, gan_reg="r1")  # diffusion's fields do not follow
    assert type(g.options) is GANOptions and g.gan_reg == "r1" and "prediction" not in g.to_dict()
    with pytest.raises(ValueError, match="'prediction' is a field of the diffusion family, not of 'gan'"):
        TrainConfig(family="gan", prediction="v")  # a field of another family: refused, not silently ignored
    with pytest.raises(TypeError, match="not a field of the training loop"):
        preset("ring8", learning_rate=1e-3)
    with pytest.raises(AttributeError, match="no field 'beta'"):
        TrainConfig().beta
    with pytest.raises(ValueError, match="family must be one of"):
        TrainConfig(family="score_sde")
    with pytest.raises(ValueError, match="weighting must be one of"):
        TrainConfig(weighting="snr")  # caught when the config is made, not at the first training step
    with pytest.raises(TypeError, match="needs a TrainConfig"):
        Trainer(TINY_MLP)


@pytest.mark.parametrize("family", ["diffusion", "gan", "vae"])
def test_checkpoints_written_before_the_families_were_split_resume_to_the_same_place(family, monkeypatch):
    """tests/fixtures: a half-trained state per family written by the old flat-config loop (commit ce8a723), and the
    losses and EMA that loop reached when it went on; the new loop must continue to exactly the same place (in fp32,
    as the fixtures were written: a CPU with native bf16 would otherwise train under bf16 autocast)."""
    from pathlib import Path

    monkeypatch.setenv("COURSE_PRECISION", "fp32")
    fixtures = Path(__file__).parent / "fixtures"
    want = json.loads((fixtures / "train_state_v0.json").read_text())["continued_to"][family]
    old = C.load_checkpoint(fixtures / f"train_state_{family}_v0.pt")
    assert {"latent", "gan_reg", "beta", "prediction"} <= set(old["config"])  # every family's fields, flat
    tr = Trainer.resume(fixtures / f"train_state_{family}_v0.pt")
    assert tr.family == family and tr.step == 4
    tr.train(progress=False)
    # the fixture was continued on another machine: float32 kernels (oneDNN / MKL) may pick another summation order
    # on another CPU, so the numbers agree to float32 rounding (a wrong RNG state, step or config moves them by far
    # more: the losses of one step differ by 10-50% between batches), not bit for bit; bit-exact resume on one machine
    # is test_resumed_training_is_bit_for_bit_the_uninterrupted_run, which writes and reads its own state
    assert tr.step == want["step"] and tr.losses == pytest.approx(want["losses"], rel=1e-5)
    ema_sum = sum(p.double().sum() for p in tr.ema.state_dict().values()).item()
    assert ema_sum == pytest.approx(want["ema_sum"], rel=1e-6)


def test_loss_plot_and_smoothing():
    assert smoothed([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]
    ax = plot_losses([1.0, 0.5, 0.25] * 10, window=3)
    assert ax.get_xlabel() == "optimizer step" and ax.get_ylabel() == "training loss"


def test_cli_train_writes_a_checkpoint_and_card_and_never_overwrites_silently(tmp_path, capsys):
    out = tmp_path / "ring8.pt"
    assert main(["train", "--preset", "ring8", "--steps", "5", "--out", str(out), "--no-eval"]) == 0
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["preset"] == "ring8" and card["steps"] == 5 and card["parameters"] > 0
    assert C.load_pretrained(out).config["steps"] == 5
    before = out.read_bytes()
    assert main(["train", "--preset", "ring8", "--steps", "5", "--out", str(out)]) == 2
    assert "exists (it would be the checkpoint); pass --force" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["train", "--preset", "nope"]) == 2
    assert "unknown preset" in capsys.readouterr().err


def test_cli_train_resumes_from_its_state_file(tmp_path):
    state = tmp_path / "state.pt"
    args = ["train", "--preset", "ring8", "--no-eval", "--state", str(state), "--force"]
    assert main(args + ["--steps", "4", "--out", str(tmp_path / "a.pt")]) == 0
    assert main(args + ["--steps", "4", "--out", str(tmp_path / "b.pt")]) == 0  # already at step 4: nothing to do
    assert C.load_checkpoint(state)["step"] == 4
    a, b = C.load_checkpoint(tmp_path / "a.pt"), C.load_checkpoint(tmp_path / "b.pt")
    assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
