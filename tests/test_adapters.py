"""Lesson 13's shipped adapters (course_lib.adapters): `train --preset` writes a whole folder in its ecosystem's format
and never replaces one without --force; each folder loads back to the model that was saved; the shipped ones are
small, carry the command that made them, and do what their cards say."""
import copy
import json

import pytest
import torch

from course_lib import SHIPPED_ADAPTERS, adapt, adapters, concepts
from course_lib.checkpoints import shipped_dir
from course_lib.cli import main


@pytest.fixture(scope="module")
def base():
    from course_lib.text2image import load_text_to_image

    return load_text_to_image("shapes_ldm")


def test_train_writes_a_textual_inversion_folder_and_keeps_what_exists(tmp_path, capsys):
    out = tmp_path / "ti"
    assert main(["train", "--preset", "shapes_star_ti", "--out", str(out), "--steps", "2", "--no-eval"]) == 0
    assert sorted(f.name for f in out.iterdir()) == ["course_card.json", "learned_embeds.safetensors"]
    card = json.loads((out / "course_card.json").read_text())
    assert card["command"].startswith(f"python -m course_lib train --preset shapes_star_ti --out {out} ")
    assert card["steps"] == 2 and card["method"] == "textual_inversion" and {"machine", "train_seconds"} <= set(card)
    before = (out / "learned_embeds.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["train", "--preset", "shapes_star_ti", "--out", str(out), "--steps", "1", "--no-eval"]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "learned_embeds.safetensors").read_bytes() == before  # nothing of the user's replaced
    assert main(["train", "--preset", "shapes_star_ti", "--out", str(tmp_path / "ti.pt"), "--steps", "1"]) == 2
    assert "names a folder" in capsys.readouterr().err and not (tmp_path / "ti.pt").exists()
    assert main(["train", "--preset", "shapes_star_ti", "--out", str(out), "--steps", "1", "--no-eval", "--force"]) == 0
    assert json.loads((out / "course_card.json").read_text())["steps"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind

    from safetensors.torch import load_file

    model = adapters.load_adapted(out)
    row = load_file(str(out / "learned_embeds.safetensors"))[concepts.WORD]
    torch.testing.assert_close(model.text_encoder.tokens.weight[concepts.WORD_INDEX], row, rtol=0, atol=0)
    assert model.card["adapter"]["steps"] == 1


def test_a_lora_folder_loads_back_to_the_same_predictions(tmp_path, base):
    model, card = adapt.adapt(base, images=5, steps=3, batch_size=4, prior_weight=0.0, progress=False)
    with torch.no_grad():  # B is still near zero after 3 steps: make the adapter's effect large enough to see
        for name, p in model.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    from course_lib.lora import save_lora

    save_lora(model.unet, tmp_path / "lora", card={**card, "preset": "test"})
    loaded = adapters.load_adapted(tmp_path / "lora", base)
    x, t = torch.randn(3, *base.shape), torch.tensor([10, 300, 900])
    ctx, mask = loaded.condition(["a small red star at the top left"] * 3)
    with torch.no_grad():
        want, got = model.unet(x, t, context=ctx, mask=mask), loaded.unet(x, t, context=ctx, mask=mask)
        plain = base.unet(x, t, context=ctx[:, :, :], mask=mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # the adapter is applied, not skipped


def test_a_controlnet_folder_round_trips_in_half_precision(tmp_path, base):
    from course_lib.controlnet import ControlNet

    net = ControlNet(copy.deepcopy(base.unet), latent_size=8)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02)
    adapters._write(tmp_path / "cn", {"preset": "test"}, {adapters.CONTROLNET_NAME: {
        k: v.half() for k, v in net.state_dict().items()}})
    loaded = adapters.load_adapted(tmp_path / "cn", base)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(loaded.unet.controlnet.state_dict()[k], v.half().float(), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="no adapter"):
        adapters.load_adapted(tmp_path)


def test_publishing_a_folder_that_fails_leaves_the_old_one():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "a"
        folder.mkdir()
        (folder / "x").write_text("mine")

        def broken(tmp):
            (tmp / "half").write_text("...")
            raise RuntimeError("disk full")
        with pytest.raises(RuntimeError):
            adapters.publish_folder(broken, folder, replace=True)
        assert (folder / "x").read_text() == "mine" and [p.name for p in Path(d).iterdir()] == ["a"]


@pytest.mark.parametrize("name", SHIPPED_ADAPTERS)
def test_each_shipped_adapter_is_small_and_says_how_it_was_made(name):
    folder = shipped_dir() / name
    size = sum(f.stat().st_size for f in folder.iterdir())
    # LoRA and the learned word are adapters proper: well under 1 MB; the ControlNet is a trainable copy of the
    # encoder (839,552 weights in fp16)
    assert size < (2e6 if name == "shapes_layout_controlnet" else 0.5e6), size
    card = adapters.adapter_card(name)
    assert card["command"].startswith(f"python -m course_lib train --preset {name} --out data/{name} ")
    assert {"preset", "steps", "train_seconds", "machine", "quality"} <= set(card)


def test_the_shipped_lora_is_the_recommended_run_in_peft_files():
    from dataclasses import asdict

    from peft import LoraConfig

    card = adapters.adapter_card("shapes_star_lora")
    assert {k: card[k] for k in asdict(adapt.AdaptConfig())} == asdict(adapt.AdaptConfig())
    cfg = json.loads((shipped_dir() / "shapes_star_lora" / "adapter_config.json").read_text())
    assert cfg["r"] == card["rank"] and LoraConfig(**{k: v for k, v in cfg.items()
                                                       if k in ("r", "lora_alpha", "target_modules")})


def test_the_shipped_lora_draws_stars_and_keeps_lesson_7s_prompts(base):
    """From the weights, on 32 fresh prompts of each kind at 10 steps (fewer than the card's 200 at 20): the star is
    read far above the unadapted model's 0, and lesson 7's prompts are followed (the card's measures at 200 each)."""
    from course_lib.attributes import load_attribute_classifier

    model = adapters.load_adapted("shapes_star_lora", base)
    res = adapt.evaluate(model, concepts.load_concept_judge(), load_attribute_classifier(), 32, 32, seed=7, nfe=10)
    card = model.card["adapter"]["quality"]
    assert res["fidelity"] >= card["fidelity"] - 0.25 and res["fidelity"] > 0.4
    assert res["old_all"] >= card["old_all"] - 0.15
