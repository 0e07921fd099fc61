"""Shared helpers for the mining tests: tiny-model "photos" of persons (same face pattern, a different shot: box,
colour, background, a faint lighting ramp), near-duplicate copies, and the datasets built from them."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from faceid.tiny.antelope import draw_face

# The tiny recognizer (8x8 pooling + a random projection) puts every bright face above cosine 0.9: different shots
# of one pattern land at 0.986-0.997, different patterns at <= 0.95, a re-encoded copy at > 0.9999. Mining the
# tiny world uses the same rules at that scale.
TINY_MINING = ["--threshold", "0.97", "--min_pair_cos", "0.97", "--near_dup_cos", "0.999", "--hash", "none"]


def photo(person: int, shot: int, size=(256, 256)) -> Image.Image:
    rng = np.random.default_rng(1000 * person + shot)
    a = np.empty((size[1], size[0], 3), np.uint8)
    a[:] = (30 + 5 * shot, 40, 50)
    side = 110 + (23 * shot) % 60
    x1 = 20 + (37 * shot) % (size[0] - side - 40)
    y1 = 20 + (29 * shot) % (size[1] - side - 40)
    draw_face(a, (x1, y1, x1 + side, y1 + side), color=tuple(int(c + rng.integers(-8, 9)) for c in (228, 218, 200)),
              pattern=person + 1)  # fmt: skip
    g = 0.02 + 0.01 * (shot % 3)
    ang = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:side, 0:side] / side - 0.5
    ramp = 1 + 2 * g * (np.cos(ang) * xx + np.sin(ang) * yy)
    face = a[y1 : y1 + side, x1 : x1 + side].astype(np.float64) * ramp[..., None]
    a[y1 : y1 + side, x1 : x1 + side] = np.clip(face, 150, 255).astype(np.uint8)
    return Image.fromarray(a)


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
