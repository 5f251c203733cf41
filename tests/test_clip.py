"""Lesson 14's CLIP score with the shipped mini-CLIP: the definition (torchmetrics' CLIPScore, 100 times the clamped
cosine) and that it prefers an image's own caption."""
import pytest
import torch


def test_clip_score_is_100_times_the_clamped_cosine_and_prefers_the_true_caption():
    import torch.nn.functional as F

    from course_lib.clip import clip_score, load_clip
    from course_lib.shapes import make_shapes, tokenize

    clip = load_clip()
    images, captions, _ = make_shapes(40, "test", 3)
    got = clip_score(clip, images, captions)
    with torch.no_grad():  # the definition, on the whole batch at once: cosine of the normalised embeddings
        img = F.normalize(clip.image(images), dim=-1)
        txt = F.normalize(clip.text.pooled(tokenize(list(captions))), dim=-1)
    assert torch.allclose(got, 100 * (img * txt).sum(1).clamp(min=0), atol=1e-4)
    assert float(got.min()) >= 0 and float(got.max()) <= 100
    shuffled = clip_score(clip, images, captions[1:] + captions[:1])  # every image with another image's caption
    assert float(got.mean()) > float(shuffled.mean()) + 10
    with pytest.raises(ValueError, match="captions"):
        clip_score(clip, images, captions[:3])
