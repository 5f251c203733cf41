"""The `shapes` captioned images (course_lib.shapes): deterministic, parseable captions, held-out combinations."""
import hashlib

import pytest
import torch

from course_lib import shapes as S


def _digest(x: torch.Tensor) -> str:
    return hashlib.sha256(x.numpy().tobytes()).hexdigest()


def test_the_same_split_and_seed_give_the_same_bytes_and_other_seeds_do_not():
    a, caps_a, _ = S.make_shapes(64, "train", seed=3)
    b, caps_b, _ = S.make_shapes(64, "train", seed=3)
    assert _digest(a) == _digest(b) and caps_a == caps_b
    assert _digest(S.make_shapes(64, "train", seed=4)[0]) != _digest(a)
    assert _digest(S.make_shapes(64, "test", seed=3)[0]) != _digest(a)
    assert a.shape == (64, 3, 32, 32) and a.dtype == torch.float32 and a.min() >= -1 and a.max() <= 1


def test_captions_parse_back_to_the_attributes_they_were_made_from():
    _, caps, scenes = S.make_shapes(400, "train", seed=0)
    for text, scene in zip(caps, scenes):
        got = S.parse_caption(text)
        assert got["relation"] == scene["relation"]
        keys = ("shape", "colour", "size", "position") if scene["relation"] is None else ("shape", "colour")
        assert got["objects"] == [{k: o[k] for k in keys} for o in scene["objects"]]
    assert {s["relation"] for s in scenes} == {None, *S.RELATIONS}  # 400 scenes: every kind occurs


def test_held_out_pairs_occur_only_in_the_heldout_split():
    def pairs(split):
        return {(o["colour"], o["shape"]) for s in S.make_shapes(300, split, seed=1)[2] for o in s["objects"]}

    assert not pairs("train") & set(S.HELD_OUT) and not pairs("test") & set(S.HELD_OUT)
    assert pairs("heldout") == set(S.HELD_OUT)
    assert len(pairs("train")) == len(S.COLOURS) * len(S.SHAPES) - len(S.HELD_OUT)


def test_the_image_shows_what_the_caption_says():
    _, _, scenes = S.make_shapes(200, "test", seed=2)
    for scene in scenes:
        img = (S.render(scene) + 1) / 2
        objs = scene["objects"]
        for o in objs:  # the pixel at each object's centre has its colour (no object covers another's centre)
            r, c = (int(v) for v in o["centre"])
            assert torch.allclose(img[:, r, c], torch.tensor(S.COLOURS[o["colour"]]), atol=1e-6), (scene, o)
        if scene["relation"] is not None:  # the relation holds between the centres
            (ra, ca), (rb, cb) = objs[0]["centre"], objs[1]["centre"]
            holds = {"left of": ca < cb - 5, "right of": ca > cb + 5, "above": ra < rb - 5, "below": ra > rb + 5}
            assert holds[scene["relation"]], scene


def test_the_four_shapes_differ_and_a_large_shape_covers_more():
    base = {"colour": "red", "centre": (16.0, 16.0), "position": "center"}
    area = {(sh, sz): float(((S.render({"objects": [{**base, "shape": sh, "size": sz}], "relation": None}) + 1) / 2)
                            [0].sum()) for sh in S.SHAPES for sz in S.SIZES}
    for sh in S.SHAPES:
        assert area[(sh, "large")] > 2 * area[(sh, "small")]
    assert len({round(area[(sh, "large")], 1) for sh in S.SHAPES}) == len(S.SHAPES)


def test_prompts_with_optional_words_parse_and_bad_ones_are_refused_with_the_vocabulary():
    assert S.parse_caption("a red circle") == {"objects": [{"colour": "red", "shape": "circle"}], "relation": None}
    assert S.parse_caption("A red circle above a blue square")["relation"] == "above"
    with pytest.raises(ValueError, match="unknown word.*'purple'.*vocabulary is: a, at, the"):
        S.parse_caption("a purple circle")
    with pytest.raises(ValueError, match="colour then a shape"):
        S.parse_caption("a circle red")
    with pytest.raises(ValueError, match="unknown position"):
        S.parse_caption("a red circle at the left top")
    with pytest.raises(ValueError, match="after the second object"):
        S.parse_caption("a red circle above a blue square a")
    with pytest.raises(TypeError, match="str"):
        S.parse_caption(3)
    with pytest.raises(ValueError, match="split must be one of"):
        S.make_shapes(4, "val")
    with pytest.raises(ValueError, match="positive int"):
        S.make_shapes(0)


def test_tokens_round_trip_pad_with_zero_and_refuse_what_the_grammar_does_not_know():
    _, caps, scenes = S.make_shapes(100, "train", seed=5)
    tok = S.tokenize(caps)
    assert tok.shape == (100, S.MAX_WORDS) and tok.dtype == torch.long
    assert S.detokenize(tok) == caps
    lengths = (tok != 0).sum(1)
    for row, n in zip(tok, lengths):  # words first, then only padding
        assert (row[:n] != 0).all() and (row[n:] == 0).all()
    assert S.tokenize("a red circle").tolist()[0][:4] == [S.VOCAB.index(w) for w in ("a", "red", "circle")] + [0]
    with pytest.raises(ValueError, match="vocabulary"):
        S.tokenize(["a red circle", "a red dodecahedron"])
    with pytest.raises(ValueError, match="max_len"):
        S.tokenize("a small red circle at the top left", max_len=5)


def test_scene_labels_match_the_scenes():
    _, caps, scenes = S.make_shapes(200, "train", seed=6)
    lab = S.scene_labels(scenes)
    assert set(lab) == set(S.LABELS) and all(v.shape == (200,) for v in lab.values())
    for i, (text, s) in enumerate(zip(caps, scenes)):
        p = S.parse_caption(text)
        if p["relation"] in ("right of", "below"):  # labels name the pair one way: left (upper) object first
            flipped = {"right of": "left of", "below": "above"}[p["relation"]]
            assert S.canonical(s)["relation"] == flipped and S.canonical(S.canonical(s)) == S.canonical(s)
            p = {"objects": p["objects"][::-1], "relation": flipped}
        assert lab["count"][i] == len(p["objects"]) - 1
        assert S.SHAPES[lab["shape"][i]] == p["objects"][0]["shape"]
        assert tuple(S.COLOURS)[lab["colour"][i]] == p["objects"][0]["colour"]
        if p["relation"] is None:
            assert tuple(S.POSITIONS)[lab["position"][i]] == p["objects"][0]["position"] and lab["relation"][i] == -1
        else:
            assert S.RELATIONS[lab["relation"][i]] == p["relation"] and lab["position"][i] == -1
            assert S.SHAPES[lab["shape2"][i]] == p["objects"][1]["shape"]
