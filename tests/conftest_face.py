"""Shared fixtures for the face-analysis tests (imported explicitly by those test files).

The tiny antelopev2 pack is built once per session into a temp dir; a "face" is a bright rectangle
(:func:`faceid.tiny.antelope.draw_face`) on a dark background.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from faceid.tiny.antelope import build_tiny_antelopev2, draw_face

BACKGROUND = (30, 40, 50)


@pytest.fixture(scope="session")
def tiny_face_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_antelope")
    build_tiny_antelopev2(root / "models" / "antelopev2")
    return root


@pytest.fixture(scope="session")
def analyzer(tiny_face_root):
    from faceid.face.analysis import FaceAnalyzer

    return FaceAnalyzer(tiny_face_root)


def face_array(size=(384, 320), boxes=((120, 80, 260, 220),), patterns=None, colors=None) -> np.ndarray:
    """RGB uint8 array ``size`` (W, H) with one bright "face" per box."""
    w, h = size
    img = np.empty((h, w, 3), np.uint8)
    img[:] = BACKGROUND
    for k, box in enumerate(boxes):
        color = colors[k] if colors else (230, 220, 200)
        draw_face(img, box, color=color, pattern=(patterns[k] if patterns else k + 1))
    return img


def face_image(size=(384, 320), boxes=((120, 80, 260, 220),), patterns=None, colors=None) -> Image.Image:
    return Image.fromarray(face_array(size, boxes, patterns, colors))
