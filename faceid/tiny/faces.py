"""Synthetic "faces" for offline runs and tests: a person of the miniature world (``faceid/tiny/world.py``: four
bright quadrant colours, a mouth) on a dark background, which the tiny antelopev2 detector finds, with keypoints at
the ArcFace template positions inside it. ``seed`` picks the person (and the background noise)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from faceid.face.regions import ARCFACE_TEMPLATE


def synthetic_face_array(size=(256, 256), box=None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 image and the 5 keypoints of a bright square face at ``box`` (x1, y1, x2, y2)."""
    w, h = size
    rng = np.random.default_rng(seed)
    img = (rng.random((h, w, 3)) * 40).astype(np.uint8)
    if box is None:
        side = int(min(w, h) * 0.5)
        x1, y1 = (w - side) // 2, (h - side) // 2
        box = (x1, y1, x1 + side, y1 + side)
    x1, y1, x2, y2 = (int(v) for v in box)
    from faceid.tiny.world import draw_person, person_codes

    codes = person_codes()
    draw_person(img, (x1, y1, x2, y2), codes[seed % len(codes)])
    kps = ARCFACE_TEMPLATE / 112.0 * np.array([x2 - x1, y2 - y1], dtype=np.float32) + np.array(
        [x1, y1], np.float32
    )
    return img, kps


def write_synthetic_face(path: str | os.PathLike, size=(256, 256), seed: int = 0) -> Path:
    from faceid.files import atomic_path

    path = Path(path)
    img, _ = synthetic_face_array(size, seed=seed)
    with atomic_path(path) as tmp:
        Image.fromarray(img).save(tmp, format="PNG")
    return path
