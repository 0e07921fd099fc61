"""Uploads for the app tests (importable by name: ``from app_inputs import ...``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from faceid.tiny.antelope import draw_face

BACKGROUND = (30, 40, 50)
HUGE_LIMIT = 4_000_000


def face_photo(path: Path, size=(256, 224), box=(70, 50, 190, 170), pattern: int = 2, faces=None) -> Path:
    """A PNG with one bright tiny-model "face" per box (``faces``: several boxes)."""
    w, h = size
    img = np.empty((h, w, 3), np.uint8)
    img[:] = BACKGROUND
    for k, b in enumerate(faces or [box]):
        draw_face(img, b, pattern=pattern + k)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    return path
