"""Lesson 7's networks and pieces: cross-attention against a naive loop, the text encoder's padding mask, the KL
autoencoder's shapes, CLIP's loss against a plain derivation, caption guidance at w = 0 and 1."""
import math

import pytest
import torch
import torch.nn.functional as F

from course_lib import shapes as S
from course_lib.clip import contrastive_loss
from course_lib.nets import CrossAttention, KLAutoencoder, MiniCLIP, TextEncoder, TextUNet, build_model
from course_lib.nets.autoencoder import kl_to_standard_normal, psnr
from course_lib.samplers import as_denoiser
from course_lib.schedules import NoiseSchedule
from course_lib.text2image import caption_guidance


def _randomise(module, seed=0):
    """Non-zero weights everywhere (zero-initialised output projections would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return module


def _naive_cross_attention(block: CrossAttention, x, context, mask):
    """softmax(q k / sqrt(d)) v written as loops over images, heads and pixels (Vaswani et al. 2017, eq. 1)."""
    b, c, h, w = x.shape
    heads, d = block.heads, c // block.heads
    xn = block.norm(x)
    out = torch.zeros(b, h * w, c)
    for i in range(b):
        keep = [j for j in range(context.shape[1]) if mask[i, j]]
        for head in range(heads):
            sl = slice(head * d, (head + 1) * d)
            for p in range(h * w):
                feat = xn[i, :, p // w, p % w]
                q = (block.q.weight @ feat)[sl]
                scores = torch.stack([q @ (block.k.weight @ context[i, j])[sl] / math.sqrt(d) for j in keep])
                weights = torch.softmax(scores, 0)
                out[i, p, sl] = sum(wt * (block.v.weight @ context[i, j])[sl] for wt, j in zip(weights, keep))
    out = out @ block.proj.weight.T + block.proj.bias
    return x + out.transpose(1, 2).reshape(b, c, h, w)


def test_cross_attention_matches_a_naive_loop_and_ignores_masked_tokens():
    torch.manual_seed(0)
    block = _randomise(CrossAttention(8, 6, heads=2, groups=2))
    x, ctx = torch.randn(2, 8, 3, 3), torch.randn(2, 5, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        got = block(x, ctx, mask)
        torch.testing.assert_close(got, _naive_cross_attention(block, x, ctx, mask), atol=1e-5, rtol=1e-4)
        ctx2 = ctx.clone()
        ctx2[~mask] = 100 * torch.randn(int((~mask).sum()), 6)  # garbage where the mask says 'padding'
        torch.testing.assert_close(block(x, ctx2, mask), got)
        assert not torch.allclose(block(x, ctx2), got)  # without the mask the garbage is attended to
    with pytest.raises(ValueError, match="at least one True"):
        block(x, ctx, torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="context must have shape"):
        block(x, torch.randn(2, 5, 7))


def test_a_fresh_cross_attention_block_is_the_identity():
    block = CrossAttention(8, 6, heads=2, groups=2)
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(block(x, torch.randn(2, 3, 6)), x)


def test_text_encoder_padding_changes_nothing():
    torch.manual_seed(0)
    enc = _randomise(TextEncoder(len(S.VOCAB), dim=16, depth=2, heads=2, max_len=10), seed=1).eval()
    tokens = S.tokenize(["a red circle", "a small blue square at the top left"])
    mask = tokens != 0
    with torch.no_grad():
        h, valid = enc(tokens)
        assert valid[:, 0].all() and (valid[:, 1:] == mask).all()
        garbage = torch.where(mask, tokens, torch.randint(1, len(S.VOCAB), tokens.shape))
        h2, valid2 = enc(garbage, mask)  # other tokens in the padded places, the same mask
        assert torch.equal(valid2, valid)
        torch.testing.assert_close(h2[valid], h[valid])
        torch.testing.assert_close(enc.pooled(garbage, mask), enc.pooled(tokens))
        short = tokens[:, :8]  # the same captions padded to 8 instead of 10 (the longest has 8 words)
        h3, valid3 = enc(short)
        torch.testing.assert_close(h3[valid3], h[valid])
        h4, _ = enc(garbage)  # and the garbage, unmasked, does change the states: the test can fail
        assert not torch.allclose(h4[valid], h[valid])
        assert torch.allclose(enc.pooled(tokens).norm(dim=1), torch.ones(2))
    with pytest.raises(ValueError, match="at most 10"):
        enc(torch.ones(1, 11, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        enc(torch.full((1, 3), len(S.VOCAB)))


def test_the_empty_caption_is_one_start_token():
    enc = TextEncoder(len(S.VOCAB), dim=16, depth=1, heads=2)
    h, valid = enc(torch.zeros(3, 10, dtype=torch.long))
    assert h.shape == (3, 11, 16) and valid.sum(1).tolist() == [1, 1, 1] and torch.isfinite(h[valid]).all()


def test_autoencoder_round_trip_shapes_and_factor():
    for mults, side in (([1, 2, 2], 8), ([1, 2, 2, 2], 4)):
        ae = KLAutoencoder(base=8, mults=mults, z_channels=4)
        x = torch.rand(2, 3, 32, 32) * 2 - 1
        mean, logvar = ae.encode(x)
        assert mean.shape == logvar.shape == (2, 4, side, side) and ae.factor == 32 // side
        recon, _, _ = ae(x)
        assert ae.decode(mean).shape == recon.shape == x.shape
        assert build_model(ae.config).config == ae.config
    with pytest.raises(ValueError, match="divisible by 4"):
        KLAutoencoder(base=8).encode(torch.randn(1, 3, 30, 30))
    with pytest.raises(ValueError, match="latents of shape"):
        KLAutoencoder(base=8).decode(torch.randn(1, 3, 8, 8))


def test_kl_and_psnr_against_their_closed_forms():
    mean, logvar = torch.randn(4, 4, 2, 2), torch.randn(4, 4, 2, 2)
    q, p = torch.distributions.Normal(mean, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0)
    torch.testing.assert_close(kl_to_standard_normal(mean, logvar), torch.distributions.kl_divergence(q, p).mean())
    x = torch.zeros(1, 3, 4, 4)
    assert psnr(x + 0.2, x).item() == pytest.approx(10 * math.log10(4 / 0.04), rel=1e-5)  # peak-to-peak 2 in [-1, 1]


def test_contrastive_loss_is_clip_infonce_when_captions_differ_and_counts_duplicates_as_positives():
    logits = torch.randn(4, 4)
    tokens = torch.arange(4)[:, None].repeat(1, 3)  # four different captions
    labels = torch.arange(4)
    expected = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    torch.testing.assert_close(contrastive_loss(logits, tokens), expected)
    tokens[1] = tokens[0]  # captions 0 and 1 identical: each is a positive of the other
    lp = logits.log_softmax(1)
    row0 = -(0.5 * lp[0, 0] + 0.5 * lp[0, 1])
    got_rows = -(torch.eye(4) * lp).sum(1)
    got_rows[0], got_rows[1] = row0, -(0.5 * lp[1, 0] + 0.5 * lp[1, 1])
    lpt = logits.T.log_softmax(1)
    cols = -(torch.eye(4) * lpt).sum(1)
    cols[0], cols[1] = -(0.5 * lpt[0, 0] + 0.5 * lpt[0, 1]), -(0.5 * lpt[1, 0] + 0.5 * lpt[1, 1])
    torch.testing.assert_close(contrastive_loss(logits, tokens), 0.5 * (got_rows.mean() + cols.mean()))


def test_mini_clip_scores_every_image_against_every_caption():
    clip = MiniCLIP(len(S.VOCAB), dim=16, depth=1, heads=2, embed_dim=8, image_base=4)
    logits = clip(torch.randn(3, 3, 32, 32), S.tokenize(["a red circle", "a blue square", "a green cross"]))
    assert logits.shape == (3, 3) and logits.abs().max() <= 100 + 1e-4


def _text_unet():
    torch.manual_seed(0)
    unet = _randomise(TextUNet(in_channels=4, base=16, mults=[1, 2], heads=2, groups=4, context_dim=16), 2)
    enc = TextEncoder(len(S.VOCAB), dim=16, depth=1, heads=2)
    return unet.eval(), enc.eval()


def test_text_unet_listens_to_the_caption_and_not_to_padding():
    unet, enc = _text_unet()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        ctx, mask = enc(S.tokenize(["a red circle", "a blue square"]))
        out = unet(x, t, context=ctx, mask=mask)
        assert out.shape == x.shape
        other = enc(S.tokenize(["a green cross", "a yellow triangle"]))
        assert not torch.allclose(unet(x, t, context=other[0], mask=other[1]), out)
        ctx2 = ctx.clone()
        ctx2[~mask] = torch.randn(int((~mask).sum()), 16)
        torch.testing.assert_close(unet(x, t, context=ctx2, mask=mask), out)
    with pytest.raises(ValueError, match="needs context"):
        unet(x, t)


def test_caption_guidance_at_one_is_the_conditional_model_and_at_zero_the_unconditional():
    unet, enc = _text_unet()
    den = as_denoiser(unet, NoiseSchedule.named("cosine", 1000))
    x = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        ctx, mask = enc(S.tokenize(["a red circle", "a blue square", "a small green cross at the top"]))
        null_c, null_m = enc(torch.zeros(1, 10, dtype=torch.long))
        cond = den(x, 2.0, context=ctx, mask=mask)
        uncond = den(x, 2.0, context=null_c.expand(3, -1, -1), mask=null_m.expand(3, -1))
        assert not torch.allclose(cond, uncond)
        for w in (0.0, 1.0, 4.0):
            got = caption_guidance(den, w, null_c, null_m)(x, 2.0, context=ctx, mask=mask)
            # one batch of 2B against two batches of B: float32 round-off of each half (~1e-6) weighted by |1 - w| + |w|
            tol = 1e-5 * (abs(1 - w) + abs(w) + 1)
            torch.testing.assert_close(got, uncond + w * (cond - uncond), atol=tol, rtol=1e-5)
        torch.testing.assert_close(caption_guidance(den, 1.0, null_c, null_m)(x, 2.0, context=ctx, mask=mask), cond)
    for bad in (-1, float("nan"), "3", True):
        with pytest.raises(ValueError, match="guidance scale"):
            caption_guidance(den, bad, null_c, null_m)


def test_fit_trains_keeps_an_ema_and_calls_back_without_counting_the_callback():
    from course_lib.fit import fit

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    w_true = torch.tensor([[1.0, -2.0, 0.5]])
    x = torch.randn(256, 3)
    y = x @ w_true.T
    seen = []
    ema, log = fit(net, lambda step: ((net(x) - y) ** 2).mean(), 300, lr=0.05, warmup=10, ema=0.9, progress=False,
                   callback=lambda step, m, sec: seen.append((step, m is not net)), every=100)
    assert log["losses"][-1] < 1e-3 * log["losses"][0]
    assert seen == [(100, True), (200, True)]  # the EMA copy, not the live model; none at the last step
    assert torch.allclose(ema.weight, w_true, atol=0.05) and not ema.weight.requires_grad
    with pytest.raises(FloatingPointError, match="loss became"):
        fit(net, lambda step: torch.tensor(float("nan"), requires_grad=True), 2, progress=False)
    with pytest.raises(ValueError, match="steps"):
        fit(net, lambda step: net(x).mean(), 0, progress=False)


def test_canonical_captions_name_a_pair_one_way():
    assert S.canonical_caption("a blue square right of a red circle") == "a red circle left of a blue square"
    assert S.canonical_caption("a red circle below a green cross") == "a green cross above a red circle"
    assert S.canonical_caption("a red circle above a green cross") == "a red circle above a green cross"
    assert S.canonical_caption("A small red circle at the top") == "a small red circle at the top"


def test_prompt_labels_and_adherence_read_prompts_in_canonical_order():
    from course_lib.attributes import adherence, prompt_labels

    a = prompt_labels(["a blue square right of a red circle", "a red circle"])
    assert a["shape"].tolist() == [S.SHAPES.index("circle")] * 2 and a["colour2"][0] == list(S.COLOURS).index("blue")
    assert a["relation"].tolist() == [S.RELATIONS.index("left of"), -1] and a["position"].tolist() == [-1, -1]

    class Oracle(torch.nn.Module):  # reads the attributes from the scenes we drew: the judge is exact
        def __init__(self, labels):
            super().__init__()
            self.labels = labels

        def forward(self, x):
            idx = x[:, 0, 0, 0].long()
            return {k: F.one_hot(v[idx].clamp(min=0), 9).float() for k, v in self.labels.items()}

    _, caps, scenes = S.make_shapes(40, "train", seed=2)
    images = torch.arange(40.0)[:, None, None, None].expand(40, 3, 32, 32)
    judge = Oracle(S.scene_labels(scenes))
    assert adherence(judge, images, caps)["all"] == 1.0
    flipped = [S.canonical_caption(c) for c in caps]  # the same scenes in the other wording: still right
    assert adherence(judge, images, flipped)["all"] == 1.0
    wrong = [c.replace("red", "green") if "red" in c else c.replace("green", "red") for c in caps]
    got = adherence(judge, images, wrong)
    assert got["all"] < 1.0 and got["colour"] < 1.0 and "binding" in got
