"""Lesson 10's caption data: the corpus, decoding and the validity of generated text."""

from course_lib import captions as C
from course_lib.shapes import make_shapes, parse_caption


def test_the_corpus_is_make_shapes_captions_and_the_parser_round_trips_every_one():
    tokens, texts = C.caption_corpus(3000, "train", seed=0)
    assert texts[:40] == make_shapes(40, "train", seed=0)[1]  # the same scenes, no pixels rendered
    assert tokens.shape == (3000, C.MAX_WORDS) and tokens.max() < C.MASK_ID
    assert C.decode(tokens) == texts
    assert all(C.is_valid(t) for t in texts)
    for t in texts[:500]:
        p = parse_caption(t)
        assert t.startswith("a ") and len(p["objects"]) in (1, 2)
    q = C.text_quality(tokens, training=set(texts))
    assert q["validity"] == 1.0 and q["unseen"] == 0 and q["distinct"] == len(set(texts))


def test_invalid_rows_are_caught():
    tokens, texts = C.caption_corpus(4, "test", seed=1)
    bad = tokens.clone()
    bad[0, 1] = C.MASK_ID                        # a [MASK] left in the text
    bad[1, :] = 0                                # empty
    n_words = int((tokens[2] != 0).sum())
    bad[2, n_words - 1] = 0
    bad[2, -1] = tokens[2, 1]                    # a word after the padding
    bad[3, 1], bad[3, 2] = tokens[3, 2], tokens[3, 1]   # two words swapped
    decoded = C.decode(bad)
    assert decoded[0] is None and decoded[1] is None and decoded[2] is None
    q = C.text_quality(bad)
    assert q["validity"] < 0.26 and not C.is_valid("a red circle")  # size and position missing: not a data caption
    assert C.is_valid(texts[0])
