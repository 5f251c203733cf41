"""Lesson 14's concept erasure (course_lib.erasure, ESD): the target against its definition, the red-pixel measure on
rendered shapes whose colours are known, the prompts, and a short erasure run that changes only the cross-attention."""
import pytest
import torch

from course_lib import erasure as Er


def test_the_esd_target_is_negative_guidance_and_eta_zero_is_the_empty_caption():
    e0, ec = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), torch.randn(4, 3)
    # classifier-free guidance at scale w is e0 + w (ec - e0); ESD's target is that at w = -eta
    assert torch.allclose(Er.esd_target(e0, ec, 2.0), e0 + (-2.0) * (ec - e0))
    assert torch.equal(Er.esd_target(e0, ec, 0.0), e0)
    assert torch.allclose(Er.esd_target(e0, e0, 1.5), e0)  # nothing to move away from


def test_red_share_reads_the_shapes_colours():
    from course_lib.shapes import render

    def image(colour, size="large"):
        obj = {"shape": "square", "colour": colour, "size": size, "position": "center", "centre": (16.0, 16.0)}
        scene = {"objects": [obj], "relation": None}
        return render(scene)[None]

    red, magenta, yellow = (float(Er.red_share(image(c))) for c in ("red", "magenta", "yellow"))
    assert red > 0.05 and magenta == 0.0 and yellow == 0.0
    assert float(Er.red_share(image("red", "small"))) < red  # a smaller red square: fewer red pixels
    assert float(Er.red_share(-torch.ones(1, 3, 8, 8))) == 0.0  # the black background
    with pytest.raises(ValueError, match="n, 3, H, W"):
        Er.red_share(torch.zeros(3, 8, 8))


def test_prompts_with_and_without_the_concept():
    red = Er.prompts_with(30, "red")
    other = Er.prompts_with(30, "red", has=False)
    assert len(red) == 30 and all(" red " in p for p in red)
    assert len(other) == 30 and not any("red" in p.split() for p in other)
    assert Er.prompts_with(30, "red") == red  # fixed draws
    with pytest.raises(ValueError, match="colours"):
        Er.prompts_with(3, "purple")


def test_a_short_erasure_changes_only_the_cross_attention_and_lowers_the_loss_target_gap():
    from course_lib.text2image import load_text_to_image

    base = load_text_to_image("shapes_ldm")
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    model, card = Er.erase(base, steps=3, images=4, batch_size=2, progress=False)
    assert all(torch.equal(v, base.unet.state_dict()[k]) for k, v in before.items())  # the base is untouched
    cross = {id(p) for m in Er.cross_attention(model.unet) for p in m.parameters()}
    changed = [n for n, p in model.unet.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all(id(dict(model.unet.named_parameters())[n]) in cross for n in changed)
    assert card["trainable_parameters"] == sum(p.numel() for m in Er.cross_attention(model.unet) for p in m.parameters())
    assert 0 < card["trainable_parameters"] < sum(p.numel() for p in model.unet.parameters())
    with pytest.raises(ValueError, match="eta"):
        Er.EraseConfig(eta=0)
