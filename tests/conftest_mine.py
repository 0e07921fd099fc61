"""Shared helpers for the mining tests: tiny-model "photos" of persons (same face pattern, a different shot: box,
colour, background, a faint lighting ramp), near-duplicate copies, and the datasets built from them."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# The miniature world's recognizer separates its persons, and since issue 20 leaks glasses and expression as ArcFace
# does: on these photos same person 0.65-0.95, different persons up to 0.51 (two persons' shots with the same
# glasses and mouth gain 2*LEAK^2 = 0.18), so the graph's threshold sits between them (0.55 instead of ArcFace's
# 0.5). Near-duplicates are found by the perceptual hash of the face crop alone (the cosine rule off), as
# docs/mining.md describes: the tiny recognizer does not tell a re-post from a close shot reliably.
TINY_MINING = ["--threshold", "0.55", "--near_dup_cos", "1.0", "--hash", "phash"]


def photo(person: int, shot: int, size: int = 64) -> Image.Image:
    """Person ``person`` of the miniature world in shot ``shot`` (a world photo: face box and background drawn at
    random, glasses and mouth by shot, the identity colours fixed)."""
    from faceid.tiny.world import person_codes, random_photo, render

    rng = np.random.default_rng(1000 * person + shot)
    # each shot its own attributes, so no two shots of a person have the same face picture (re-posts do)
    attrs = {"glasses": shot % 2 == 1, "smiling": shot % 4 >= 2}
    photo = random_photo(rng, person, size, attrs=attrs)
    return Image.fromarray(render(photo, person_codes(), size, seed=1000 * person + shot))


def png_bytes(img: Image.Image) -> bytes:
    b = io.BytesIO()
    img.save(b, format="PNG")
    return b.getvalue()


def jpeg_copy(img: Image.Image) -> bytes:
    """The same picture re-posted: JPEG re-encoded."""
    b = io.BytesIO()
    img.save(b, format="JPEG", quality=90)
    return b.getvalue()


# 4 persons x 3 shots, one singleton (person 8), and a re-encoded copy of person 0's first shot.
PEOPLE = [(p, s) for p in range(4) for s in range(3)] + [(8, 0)]
