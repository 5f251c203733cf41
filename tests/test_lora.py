"""LoRA through peft (course_lib.lora): the layer's formula against peft's own layer, the adapter's start, its files
in peft's and diffusers' formats read back by those libraries, merging, and the refusals."""
import copy

import pytest
import torch
from torch import nn

from course_lib import lora
from course_lib.nets import TextUNet


def _unet(seed=0):
    torch.manual_seed(seed)
    u = TextUNet(in_channels=4, base=16, mults=(1, 2), context_dim=8, heads=2, groups=4)
    with torch.no_grad():  # zero-initialised projections would hide the adapters' effect
        for p in u.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return u.eval()


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(3, 4, 8, 8, generator=g), torch.tensor([10, 400, 900]),
            {"context": torch.randn(3, 5, 8, generator=g), "mask": torch.tensor([[1, 1, 1, 0, 0]] * 3).bool()})


def _perturb(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.lora_parameters(model):
            p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("rank,alpha", [(1, 1.0), (4, 8.0), (8, 2.0)])
def test_lora_linear_is_peft_layer_output(rank, alpha):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(rank)
    net = nn.Sequential(nn.Linear(6, 5))
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=["0"]), net)
    layer = net[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(7, 6)
    got = lora.lora_linear(x, layer.base_layer.weight, layer.base_layer.bias, layer.lora_A["default"].weight,
                           layer.lora_B["default"].weight, alpha)
    torch.testing.assert_close(got, net(x))


def test_a_fresh_adapter_changes_nothing_and_only_it_trains():
    u = _unet()
    x, t, kw = _inputs()
    with torch.no_grad():
        before = u(x, t, **kw)
        v = lora.add_lora(copy.deepcopy(u), rank=2)
        torch.testing.assert_close(v(x, t, **kw), before, rtol=0, atol=0)
    trainable = {n for n, p in v.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    # every attention projection, cross and self, is adapted; nothing else
    adapted = {n.rsplit(".lora_", 1)[0] for n in trainable}
    expected = {n for n, m in u.named_modules() if n.rsplit(".", 1)[-1] in ("q", "k", "v", "qkv", "proj")}
    assert adapted == expected
    counts = lora.parameter_counts(v)
    assert counts["base"] == sum(p.numel() for p in u.parameters())
    # rank r on a (out x in) layer adds r (in + out) numbers (a 1x1 conv counts as a Linear)
    per_layer = 0
    for name in expected:
        w = u.get_submodule(name).weight
        per_layer += 2 * (w.shape[0] + w.shape[1])
    assert counts["lora"] == per_layer


def test_the_adapter_trains_and_round_trips_through_peft_files(tmp_path):
    from peft import PeftModel

    u = _unet()
    x, t, kw = _inputs()
    v = lora.add_lora(copy.deepcopy(u), rank=4, alpha=8)
    opt = torch.optim.Adam(lora.lora_parameters(v), lr=1e-2)
    target = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    losses = []
    for _ in range(30):
        loss = (v(x, t, **kw) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    with torch.no_grad():
        out = v(x, t, **kw)
        lora.save_lora(v, tmp_path / "a", card={"steps": 30})
        assert lora.read_card(tmp_path / "a") == {"steps": 30}
        reloaded = lora.load_lora(copy.deepcopy(u), tmp_path / "a")
        torch.testing.assert_close(reloaded(x, t, **kw), out, atol=1e-5, rtol=1e-5)
        peft_model = PeftModel.from_pretrained(copy.deepcopy(u), str(tmp_path / "a"))
        torch.testing.assert_close(peft_model(x, t, **kw), out, atol=1e-5, rtol=1e-5)
        merged = lora.merge_lora(reloaded)
        assert not lora.lora_parameters(merged) and type(merged.mid[2].q) is nn.Linear
        torch.testing.assert_close(merged(x, t, **kw), out, atol=1e-5, rtol=1e-5)
        assert set(merged.state_dict()) == set(u.state_dict())


def test_saving_never_replaces_an_adapter_without_force(tmp_path):
    v = lora.add_lora(_unet(), rank=1)
    lora.save_lora(v, tmp_path)
    before = (tmp_path / lora.WEIGHTS_NAME).read_bytes()
    _perturb(v)
    with pytest.raises(FileExistsError, match="force=True"):
        lora.save_lora(v, tmp_path)
    assert (tmp_path / lora.WEIGHTS_NAME).read_bytes() == before
    lora.save_lora(v, tmp_path, force=True)
    assert (tmp_path / lora.WEIGHTS_NAME).read_bytes() != before


def test_refusals(tmp_path):
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="rank"):
            lora.add_lora(_unet(), rank=bad)
    with pytest.raises(ValueError, match="alpha"):
        lora.add_lora(_unet(), rank=2, alpha=0)
    v = lora.add_lora(_unet(), rank=2)
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.add_lora(v)
    with pytest.raises(ValueError, match="no layer"):
        lora.add_lora(_unet(), targets=["nothing_here"])
    with pytest.raises(ValueError, match="no LoRA adapter"):
        lora.save_lora(_unet(), tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lora.load_lora(_unet(), tmp_path / "empty")
    other = TextUNet(in_channels=4, base=8, mults=(1,), context_dim=8, heads=2, groups=4)
    lora.save_lora(lora.add_lora(other, rank=2), tmp_path / "other")
    with pytest.raises(ValueError, match="does not fit this model"):  # another architecture's adapter
        lora.load_lora(_unet(), tmp_path / "other")


def test_stable_diffusion_lora_round_trip_through_diffusers(tmp_path):
    """The Stable Diffusion path on the tiny pipeline of SD 1.5's architecture (no download): an adapter added as
    diffusers' LoRA script adds it, saved by the pipeline's save_lora_weights, loaded by load_lora_weights into a
    fresh pipeline, predicts what the adapted UNet predicted."""
    from course_lib.pretrained import tiny_pipeline

    pipe = tiny_pipeline(0)
    lora.add_sd_lora(pipe.unet, rank=4)
    assert all(("lora_" in n) == p.requires_grad for n, p in pipe.unet.named_parameters())
    _perturb(pipe.unet)
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)
    with torch.no_grad():
        adapted = pipe.unet(x, 500, encoder_hidden_states=ctx).sample
        lora.save_sd_lora(pipe.unet, tmp_path)
        fresh = tiny_pipeline(0)
        plain = fresh.unet(x, 500, encoder_hidden_states=ctx).sample
        fresh.load_lora_weights(str(tmp_path))
        loaded = fresh.unet(x, 500, encoder_hidden_states=ctx).sample
    assert (adapted - plain).abs().max() > 1e-2  # the adapter matters ...
    torch.testing.assert_close(loaded, adapted, atol=1e-5, rtol=1e-5)  # ... and comes back exactly
    with pytest.raises(FileExistsError):
        lora.save_sd_lora(pipe.unet, tmp_path)


def test_stable_diffusion_lora_training_runs_on_the_tiny_pipeline(tmp_path):
    """The Colab section's code path, offline: a few steps on two images lower the loss on them, only the adapters
    change, and the result saves and loads through diffusers."""
    from course_lib.pretrained import tiny_pipeline

    pipe = tiny_pipeline(0)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    log = lora.train_sd_lora(pipe, images, "a photo of sks", rank=4, steps=60, lr=1e-2, batch_size=2, progress=False)
    assert log["trainable"] > 0 and len(log["losses"]) == 60
    first, last = sum(log["losses"][:15]) / 15, sum(log["losses"][-15:]) / 15
    assert last < first, (first, last)
    after = pipe.unet.state_dict()
    for k, v in before.items():
        torch.testing.assert_close(after[k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")]
                                   if k not in after else after[k], v, rtol=0, atol=0)
    lora.save_sd_lora(pipe.unet, tmp_path)
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    with pytest.raises(ValueError, match="prompts"):
        lora.train_sd_lora(tiny_pipeline(0), images, ["one"] * 3, steps=1, progress=False)
