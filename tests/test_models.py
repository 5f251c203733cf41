"""Networks: shapes at every supported size, label handling, clear errors, and that one step of training helps."""
import pytest
import torch

from course_lib.losses import diffusion_loss
from course_lib.nets import (
    TimeMLP,
    UNet,
    build_model,
    count_parameters,
    timestep_embedding,
)
from course_lib.schedules import NoiseSchedule

SMALL_UNET = dict(base=16, mults=(1, 2, 2), num_res=1, heads=2)


def test_timestep_embedding_is_sinusoidal():
    e = timestep_embedding(torch.tensor([0, 7]), 9)
    assert e.shape == (2, 9)
    torch.testing.assert_close(e[0, :4], torch.ones(4))  # cos(0)
    torch.testing.assert_close(e[0, 4:8], torch.zeros(4))  # sin(0)
    assert torch.allclose(e[1, 0], torch.cos(torch.tensor(7.0)))  # the fastest frequency is 1
    assert e[:, 8].abs().sum() == 0  # odd dims are zero-padded


@pytest.mark.parametrize("size", [8, 28, 32])
def test_unet_keeps_the_image_shape(size):
    model = UNet(**SMALL_UNET)
    x = torch.randn(3, 1, size, size)
    assert model(x, torch.tensor([0, 500, 999])).shape == x.shape


def test_unet_attends_at_the_lowest_resolution_only():
    from course_lib.nets import SelfAttention

    model = UNet(**SMALL_UNET)
    seen = []
    for m in model.modules():
        if isinstance(m, SelfAttention):
            m.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[-1]))
    model(torch.randn(2, 1, 32, 32), 3)
    assert seen and set(seen) == {8}  # 32 -> 16 -> 8


def test_scalar_t_equals_a_batch_of_the_same_t():
    torch.manual_seed(0)
    for model, x in [(TimeMLP(hidden=32), torch.randn(5, 2)), (UNet(**SMALL_UNET), torch.randn(5, 1, 8, 8))]:
        torch.testing.assert_close(model(x, 17), model(x, torch.full((5,), 17)))


def test_labels_change_the_output_and_none_means_no_label():
    torch.manual_seed(0)
    model = UNet(**SMALL_UNET, num_classes=10)
    for p in model.parameters():  # zero-initialised output layers would hide the label's effect
        p.data.normal_(0, 0.05)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([10, 10, 10, 10])
    a, b = model(x, t, y=torch.tensor([0, 1, 2, 3])), model(x, t, y=torch.tensor([3, 1, 2, 0]))
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1:3], b[1:3])
    torch.testing.assert_close(model(x, t), model(x, t, y=torch.full((4,), 10)))


def test_bad_inputs_give_clear_errors():
    mlp, unet = TimeMLP(hidden=16), UNet(**SMALL_UNET)
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        mlp(torch.randn(4, 3), 0)
    with pytest.raises(ValueError, match="divisible by 4"):
        unet(torch.randn(1, 1, 10, 10), 0)
    with pytest.raises(ValueError, match="unconditional"):
        unet(torch.randn(1, 1, 8, 8), 0, y=torch.tensor([1]))
    with pytest.raises(ValueError, match="t must be a scalar"):
        mlp(torch.randn(4, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="labels"):
        UNet(**SMALL_UNET, num_classes=10)(torch.randn(1, 1, 8, 8), 0, y=torch.tensor([11]))
    with pytest.raises(ValueError, match="kind"):
        build_model({"kind": "transformer"})
    with pytest.raises(ValueError, match="bad model config"):
        build_model({"kind": "mlp", "widht": 3})
    with pytest.raises(ValueError, match="predicts"):
        TimeMLP(prediction="score")


def test_build_model_rebuilds_the_same_architecture():
    for model in (TimeMLP(hidden=32, depth=2), UNet(**SMALL_UNET, num_classes=10)):
        copy = build_model(model.config)
        copy.load_state_dict(model.state_dict())  # raises if any parameter differs in name or shape
        assert count_parameters(copy) == count_parameters(model) > 0


@pytest.mark.parametrize("model, x0", [(TimeMLP(hidden=64), torch.randn(256, 2)),
                                       (UNet(**SMALL_UNET), torch.randn(16, 1, 8, 8))], ids=["mlp", "unet"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_one_training_step_decreases_the_loss_on_a_fixed_batch(model, x0, prediction):
    torch.manual_seed(0)
    schedule = NoiseSchedule.named("cosine", 1000)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def loss():  # the same t and noise each call
        return diffusion_loss(model, x0, schedule, prediction, generator=torch.Generator().manual_seed(1))

    before = loss()
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss()
    assert after < before
