"""The DiT (course_lib.nets.dit): patchify against a loop, adaLN-Zero starts as the identity, conditioning reaches
the output, padding is ignored, the training loop trains it, and its FLOP count matches a count by hand."""
import math

import pytest
import torch

from course_lib.nets import DiT, DiTBlock, build_model
from course_lib.nets.dit import dit_flops, modulate, patchify, sincos_2d, unpatchify


def test_patchify_matches_a_loop_over_patches_and_unpatchify_inverts_it():
    x = torch.randn(2, 3, 8, 12)
    tokens = patchify(x, 4)
    assert tokens.shape == (2, 6, 48)
    for i in range(2):
        for j in range(3):
            patch = x[:, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4]            # (B, C, p, p)
            assert torch.equal(tokens[:, 3 * i + j], patch.permute(0, 2, 3, 1).reshape(2, -1))  # row-major, (p, p, C)
    assert torch.equal(unpatchify(tokens, 4, 3, 8, 12), x)
    with pytest.raises(ValueError, match="divisible by the patch size"):
        patchify(torch.randn(1, 1, 6, 6), 4)


def test_sincos_position_embeddings_are_distinct_and_bounded():
    pos = sincos_2d(16, 4, 4)
    assert pos.shape == (16, 16) and pos.abs().max() <= 1
    assert torch.cdist(pos, pos).add(torch.eye(16)).min() > 0.1  # every position different
    assert torch.allclose(pos[1, 8:], pos[0, 8:]) and not torch.allclose(pos[1, :8], pos[0, :8])  # same row


def test_modulate_and_a_fresh_block_is_the_identity():
    x, shift, scale = torch.randn(2, 5, 8), torch.randn(2, 8), torch.randn(2, 8)
    torch.testing.assert_close(modulate(x, shift, scale), x * (1 + scale[:, None]) + shift[:, None])
    block = DiTBlock(8, 2, context_dim=6)
    torch.testing.assert_close(block(x, torch.randn(2, 8), torch.randn(2, 3, 6), torch.ones(2, 3, dtype=torch.bool)), x)


def _random(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_a_fresh_dit_predicts_zero_and_conditioning_reaches_the_output():
    model = DiT(in_channels=1, image_size=8, patch=2, hidden=32, depth=2, heads=4, num_classes=10)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 500, 999])
    assert torch.equal(model(x, t, y=torch.tensor([0, 1, 2])), torch.zeros_like(x))  # adaLN-Zero and a zero head
    _random(model)
    with torch.no_grad():
        a = model(x, t, y=torch.tensor([0, 1, 2]))
        assert not torch.allclose(a, model(x, t, y=torch.tensor([3, 4, 5])))
        assert not torch.allclose(a, model(x, torch.tensor([2, 501, 998]), y=torch.tensor([0, 1, 2])))
        assert torch.isfinite(model(x, t)).all()  # no label: the 'no label' index
    assert build_model(model.config).config == model.config
    with pytest.raises(ValueError, match="expected inputs"):
        model(torch.randn(1, 1, 6, 6), 3)


def test_a_text_dit_ignores_padded_caption_tokens():
    model = _random(DiT(in_channels=4, image_size=8, patch=2, hidden=32, depth=2, heads=4, context_dim=16))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    ctx, mask = torch.randn(2, 5, 16), torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    with torch.no_grad():
        out = model(x, t, context=ctx, mask=mask)
        ctx2 = ctx.clone()
        ctx2[~mask] = 50 * torch.randn(int((~mask).sum()), 16)
        torch.testing.assert_close(model(x, t, context=ctx2, mask=mask), out)
        assert not torch.allclose(model(x, t, context=ctx2), out)
    with pytest.raises(ValueError, match="needs context"):
        model(x, t)


def test_the_training_loop_trains_a_dit_on_digits():
    from course_lib.train import Trainer, preset

    cfg = preset("digits", model={"kind": "dit", "image_size": 8, "patch": 2, "hidden": 64, "depth": 2, "heads": 4},
                 steps=150, batch_size=64, warmup=10)
    tr = Trainer(cfg)
    tr.train(progress=False)
    first, last = sum(tr.losses[:20]) / 20, sum(tr.losses[-20:]) / 20
    assert tr.model.config["kind"] == "dit" and last < 0.8 * first, (first, last)


def test_flop_count_matches_torch_flop_counter():
    # torch's FlopCounterMode counts every matrix product it sees (sdpa forced to its math path so the attention
    # scores are counted too); dit_flops leaves out the patch embedding and the time MLP, added back here
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    for patch, hidden, depth in ((2, 32, 3), (1, 48, 2)):
        net = DiT(in_channels=4, image_size=8, patch=patch, hidden=hidden, depth=depth, heads=4)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            net(torch.zeros(1, 4, 8, 8), torch.zeros(1, dtype=torch.long))
        n = (8 // patch) ** 2
        left_out = 2 * (n * patch * patch * 4 * hidden) + 2 * (256 * hidden + hidden * hidden)
        assert dit_flops(net.config) + left_out == counter.get_total_flops(), (patch, hidden)
    # a text DiT: cross-attention to L caption tokens of width 16, counted by hand and by the counter, in eval mode
    from course_lib.bench.arch import forward_flops

    net = DiT(in_channels=4, image_size=8, patch=2, hidden=32, depth=2, heads=4, context_dim=16).eval()
    for length in (3, 10):
        context, mask = torch.randn(1, length, 16), torch.ones(1, length, dtype=torch.bool)
        left_out = 2 * (16 * 2 * 2 * 4 * 32) + 2 * (256 * 32 + 32 * 32)
        got = forward_flops(net, shape=(4, 8, 8), context=context, mask=mask)
        assert dit_flops(net.config, context_tokens=length) + left_out == got, length
        cross = 2 * 2 * (2 * 16 * 32 * 32 + 2 * length * 16 * 32 + 2 * 16 * length * 32)  # 2 blocks, by hand
        assert dit_flops(net.config, context_tokens=length) - dit_flops(dict(net.config, context_dim=None)) == cross
    with pytest.raises(ValueError, match="context_tokens"):
        dit_flops(net.config)
    cfg = DiT(in_channels=4, image_size=8, patch=2, hidden=32, depth=3, heads=4).config
    bigger = dict(cfg, patch=1)  # patch 1: 4x the tokens, at least 4x the cost
    assert dit_flops(bigger) > 4 * dit_flops(cfg) - 1 and math.isfinite(dit_flops(bigger))


def test_lesson8_references_equal_the_library_and_torch_layers():
    # the exercises' references are written with plain tensor ops; the library's DiT uses torch's LayerNorm and
    # MultiheadAttention: loading the same weights into a DiTBlock must give the same block output
    from course_lib.exercises import EXERCISES, ref_adaln, ref_dit_block, ref_patchify, ref_unpatchify
    from course_lib.nets.dit import DiTBlock

    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        kw = EXERCISES["patchify"].make_inputs(g)
        tokens = ref_patchify(**kw)
        assert torch.equal(tokens, patchify(kw["x"], kw["p"]))
        assert torch.equal(ref_unpatchify(tokens, kw["p"], kw["x"].shape[1], *kw["x"].shape[2:]), kw["x"])
        kw = EXERCISES["adaln"].make_inputs(g)
        norm = torch.nn.LayerNorm(kw["x"].shape[-1], elementwise_affine=False, eps=1e-6).double()
        torch.testing.assert_close(ref_adaln(**kw), modulate(norm(kw["x"]), kw["shift"], kw["scale"]))
        kw = EXERCISES["dit_block"].make_inputs(g)
        d = kw["x"].shape[-1]
        block = DiTBlock(d, kw["heads"]).double()
        with torch.no_grad():
            block.ada[-1].weight.copy_(kw["ada_w"]), block.ada[-1].bias.copy_(kw["ada_b"])
            block.attn.in_proj_weight.copy_(kw["qkv_w"]), block.attn.in_proj_bias.copy_(kw["qkv_b"])
            block.attn.out_proj.weight.copy_(kw["proj_w"]), block.attn.out_proj.bias.copy_(kw["proj_b"])
            block.mlp[0].weight.copy_(kw["fc1_w"]), block.mlp[0].bias.copy_(kw["fc1_b"])
            block.mlp[2].weight.copy_(kw["fc2_w"]), block.mlp[2].bias.copy_(kw["fc2_b"])
            want = block(kw["x"], kw["c"])
        torch.testing.assert_close(ref_dit_block(**kw), want, rtol=1e-9, atol=1e-10)
