"""ControlNet in miniature (course_lib.controlnet): a fresh one leaves the model exactly as it was (zero convs), its
copy starts as the UNet's encoder, gradients still reach the zero convs, guidance batches get the maps twice, and
placement is measured exactly on rendered images."""
import pytest
import torch

from course_lib import controlnet as C
from course_lib.nets import TextUNet
from course_lib.shapes import make_shapes


def _unet():
    torch.manual_seed(0)
    u = TextUNet(in_channels=4, base=16, mults=(1, 2), context_dim=8, heads=2, groups=4)
    with torch.no_grad():
        for p in u.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return u.eval()


def _inputs(b=3):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(b, 4, 8, 8, generator=g), torch.tensor([10, 400, 900][:b]),
            torch.randn(b, 5, 8, generator=g), torch.ones(b, 5, dtype=torch.bool),
            torch.rand(b, 1, 32, 32, generator=g))


def test_a_fresh_controlnet_changes_nothing_and_copies_the_encoder():
    u = _unet()
    cn = C.ControlNet(u)
    for name in ("time", "stem", "down", "mid"):
        ours, theirs = getattr(cn, name).state_dict(), getattr(u, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    x, t, ctx, mask, hint = _inputs()
    with torch.no_grad():
        plain = u(x, t, context=ctx, mask=mask)
        res = cn(x, t, ctx, mask, hint)
        assert len(res) == len(u.down) + 2 and all((r == 0).all() for r in res)
        got = C.Controlled(u, cn).set_hint(hint)(x, t, context=ctx, mask=mask)
    torch.testing.assert_close(got, plain, rtol=0, atol=0)


def test_gradients_reach_the_zero_convs_and_leave_the_unet_frozen():
    u = _unet()
    model = C.Controlled(u, C.ControlNet(u))
    x, t, ctx, mask, hint = _inputs()
    model.set_hint(hint)(x, t, context=ctx, mask=mask).pow(2).mean().backward()
    assert all(p.grad is None for p in u.parameters())
    zero_grads = [m.weight.grad for m in model.controlnet.zero] + [model.controlnet.zero_mid.weight.grad]
    assert all(g is not None and g.abs().max() > 0 for g in zero_grads)
    # after one step on the zero convs the hint matters: two different maps give two different predictions
    with torch.no_grad():
        for m in [*model.controlnet.zero, model.controlnet.zero_mid, model.controlnet.hint[-1]]:
            m.weight.add_(0.05 * torch.randn_like(m.weight))
        a = model.set_hint(hint)(x, t, context=ctx, mask=mask)
        b = model.set_hint(torch.zeros_like(hint))(x, t, context=ctx, mask=mask)
    assert (a - b).abs().max() > 1e-4


def test_guided_batches_get_the_maps_twice():
    u = _unet()
    cn = C.ControlNet(u)
    with torch.no_grad():
        for m in [*cn.zero, cn.zero_mid, cn.hint[-1]]:
            m.weight.normal_(0, 0.05)
    x, t, ctx, mask, hint = _inputs()
    model = C.Controlled(u, cn).set_hint(hint)
    with torch.no_grad():
        one = model(x, t, context=ctx, mask=mask)
        two = model(torch.cat([x, x]), torch.cat([t, t]), context=torch.cat([ctx, ctx]), mask=torch.cat([mask, mask]))
    torch.testing.assert_close(two, torch.cat([one, one]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="layout maps"):
        model(x[:2], t[:2], context=ctx[:2], mask=mask[:2])
    with pytest.raises(ValueError, match="hint must have shape"):
        cn(x, t, ctx, mask, hint[:, :, :16, :16])
    with pytest.raises(ValueError, match="residuals"):
        u(x, t, context=ctx, mask=mask, control=[torch.zeros(1)])
    with pytest.raises(TypeError):
        C.ControlNet(torch.nn.Linear(2, 2))


def test_placement_is_exact_on_rendered_images():
    images, captions, scenes = make_shapes(300, "test", 0)
    maps = C.layout_maps(scenes)
    assert maps.shape == (300, 1, 32, 32) and 0 <= maps.min() and maps.max() <= 1
    torch.testing.assert_close(C.iou(C.object_mask(images), maps), torch.ones(300))
    # moving every object map by 8 pixels leaves little overlap: IoU is a placement measure
    moved = torch.roll(maps, shifts=8, dims=3)
    assert C.iou(C.object_mask(images), moved).mean() < 0.2


def test_iou_by_hand():
    a = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    b = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    a[0, 0, :2] = True      # 8 pixels
    b[0, 0, 1:3] = True     # 8 pixels, 4 shared: 4 / 12
    torch.testing.assert_close(C.iou(a, b), torch.tensor([1 / 3, 1.0]))  # both empty: 1


def test_captions_lose_only_their_position():
    assert C._without_position("a small red circle at the top left") == "a small red circle"
    assert C._without_position("a red circle left of a blue square") == "a red circle left of a blue square"


def test_the_caption_rival_says_where_in_words_and_places_better_than_nothing():
    """The plain model given lesson 7's full captions (position in words) against the same model without them, on the
    same 24 scenes and noise: the prompts differ only by their position, and words place the object better (lesson 7's
    model puts objects where captions say: its judge reads position right in nearly every image)."""
    from course_lib.text2image import load_text_to_image

    base = load_text_to_image("shapes_ldm")
    words = C.placement(base, None, 24, seed=1, nfe=8, position_in_caption=True)
    none = C.placement(base, None, 24, seed=1, nfe=8)
    assert all(" at the " in p and p.startswith(q) for p, q in zip(words["prompt_list"], none["prompt_list"]))
    torch.testing.assert_close(words["maps"], none["maps"])
    assert words["iou"] > none["iou"] + 0.2
    with pytest.raises(ValueError, match="plain model"):
        C.placement(base, C.Controlled(base.unet, C.ControlNet(base.unet)), 2, position_in_caption=True)
