"""The shapes captions' grammar, without torch: the words, the attributes they name and the parser of a prompt.

Kept free of heavy imports so that a command line can check a prompt at once, before the model loads (course_lib.shapes
re-exports every name here).
"""
from __future__ import annotations

import random

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (1.0, 0.15, 0.15), "green": (0.2, 0.9, 0.2), "blue": (0.25, 0.4, 1.0), "yellow": (1.0, 0.9, 0.1),
           "magenta": (0.95, 0.2, 0.95), "cyan": (0.1, 0.9, 0.95)}
SIZES = {"small": 3.5, "large": 6.0}  # radius in pixels of a 32x32 image
POSITIONS = {"top left": (0, 0), "top": (0, 1), "top right": (0, 2), "left": (1, 0), "center": (1, 1),
             "right": (1, 2), "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2)}  # (row, column)
RELATIONS = ("left of", "right of", "above", "below")
HELD_OUT = (("red", "triangle"), ("blue", "circle"), ("green", "cross"), ("yellow", "square"))
SPLITS = ("train", "test", "heldout")
VOCAB = ("<pad>", "a", "at", "the", "of", "left", "right", "above", "below", "top", "bottom", "center",
         *SIZES, *COLOURS, *SHAPES)

_PUNCTUATION = ".,;:!?\"'"


def prompt_words(text: str) -> list[str]:
    """A prompt's words, lower-cased, with commas and end punctuation dropped ('a red circle.' reads as 'a red circle')."""
    return [w.strip(_PUNCTUATION) for w in text.lower().split() if w.strip(_PUNCTUATION)]


def parse_caption(text: str) -> dict:
    """The attributes a caption names: {'objects': [{'shape', 'colour', 'size'?, 'position'?}, ...], 'relation'}.
    Size and position are optional in a prompt ('a red circle'); an unknown word is a ValueError listing VOCAB."""
    if not isinstance(text, str):
        raise TypeError(f"a caption is a str, got {type(text).__name__}")
    words = prompt_words(text)
    if not words:
        raise ValueError("an empty prompt names nothing to draw; the grammar is 'a [size] colour shape [at the "
                         "position]' or 'a colour shape relation a colour shape', e.g. 'a red circle left of a blue square'")
    unknown = list(dict.fromkeys(w for w in words if w not in VOCAB or w == "<pad>"))  # each once, in order
    if unknown:
        raise ValueError(f"unknown word(s) {', '.join(map(repr, unknown))} in {text!r}; the vocabulary is: "
                         f"{', '.join(VOCAB[1:])}")
    i, objects, relation = 0, [], None

    def obj(i):
        if i >= len(words) or words[i] != "a":
            raise ValueError(f"expected 'a' at word {i + 1} of {text!r} (grammar: 'a [size] colour shape "
                             f"[at the position]' or 'a colour shape relation a colour shape')")
        o, i = {}, i + 1
        if i < len(words) and words[i] in SIZES:
            o["size"], i = words[i], i + 1
        if i + 1 >= len(words) or words[i] not in COLOURS or words[i + 1] not in SHAPES:
            raise ValueError(f"expected a colour then a shape after 'a' in {text!r}")
        o["colour"], o["shape"] = words[i], words[i + 1]
        return o, i + 2

    o, i = obj(i)
    objects.append(o)
    rest = " ".join(words[i:])
    if rest.startswith("at the "):
        pos = rest[len("at the "):]
        if pos not in POSITIONS:
            raise ValueError(f"unknown position {pos!r} in {text!r}; positions: {', '.join(POSITIONS)}")
        o["position"] = pos
    elif rest:
        relation = next((r for r in RELATIONS if rest.startswith(r + " ")), None)
        if relation is None:
            raise ValueError(f"expected 'at the <position>' or a relation ({', '.join(RELATIONS)}) in {text!r}")
        o2, j = obj(i + len(relation.split()))
        if j != len(words):
            raise ValueError(f"unexpected words after the second object in {text!r}")
        objects.append(o2)
    return {"objects": objects, "relation": relation}


def complete_prompt(text: str, rng: random.Random) -> tuple[str, list[str]]:
    """A one-object prompt with the attributes it leaves out (size, position) drawn at random, as every one-object
    training caption names them: ('a red circle', rng) -> ('a small red circle at the top left', ['size', 'position']).
    A two-object prompt is returned as it is (its captions never name size or position)."""
    scene = parse_caption(text)
    if scene["relation"] is not None:
        return " ".join(prompt_words(text)), []
    o = dict(scene["objects"][0])
    filled = [k for k in ("size", "position") if k not in o]
    o.setdefault("size", rng.choice(list(SIZES)))
    o.setdefault("position", rng.choice(list(POSITIONS)))
    return f"a {o['size']} {o['colour']} {o['shape']} at the {o['position']}", filled
