"""Keypoint drawing, the inference resize and the head angle from the 5 keypoints, defined once for every script.

IdentityNet was trained on exactly the picture the official ``draw_kps`` makes, so :func:`draw_kps` reproduces
it pixel for pixel (same OpenCV primitives, same integer truncations, same draw order) but draws on one uint8
canvas with the limb colours pre-multiplied by 0.6 instead of float64 full-size copies per limb.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from PIL import Image

KPS_COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
# Eyes (0, 1) and mouth corners (3, 4) to the nose (2): the limb takes the colour of its first point.
LIMBS = ((0, 2), (1, 2), (3, 2), (4, 2))
STICK_WIDTH = 4
LIMB_ALPHA = 0.6
DOT_RADIUS = 10
# Left/right swap for a horizontal flip: (left eye, right eye, nose, left mouth, right mouth).
FLIP_PERMUTATION = (1, 0, 2, 4, 3)


def _size_of(image_or_size) -> tuple[int, int]:
    if isinstance(image_or_size, Image.Image):
        return image_or_size.size
    if isinstance(image_or_size, np.ndarray):
        return image_or_size.shape[1], image_or_size.shape[0]
    w, h = image_or_size
    return int(w), int(h)


def draw_kps_array(size, kps, colors=KPS_COLORS) -> np.ndarray:
    """Draw the 5-keypoint image as an ``[H, W, 3]`` uint8 RGB array. ``size`` is ``(W, H)`` or an image."""
    w, h = _size_of(size)
    kps = np.asarray(kps, dtype=np.float64).reshape(-1, 2)
    canvas = np.zeros((h, w, 3), dtype=np.uint8)
    for a, b in LIMBS:
        color = tuple(int(float(c) * LIMB_ALPHA) for c in colors[a])
        x = kps[[a, b], 0]
        y = kps[[a, b], 1]
        length = math.hypot(x[0] - x[1], y[0] - y[1])
        angle = math.degrees(math.atan2(y[0] - y[1], x[0] - x[1]))
        polygon = cv2.ellipse2Poly(
            (int(np.mean(x)), int(np.mean(y))), (int(length / 2), STICK_WIDTH), int(angle), 0, 360, 1
        )
        cv2.fillConvexPoly(canvas, polygon, color)
    for i, (x, y) in enumerate(kps):
        cv2.circle(canvas, (int(x), int(y)), DOT_RADIUS, tuple(int(c) for c in colors[i]), -1)
    return canvas


def draw_kps(image_or_size, kps, colors=KPS_COLORS) -> Image.Image:
    """The official InstantID keypoint image, as a PIL RGB image the size of ``image_or_size``."""
    return Image.fromarray(draw_kps_array(image_or_size, kps, colors))


def fit_size(
    width: int, height: int, min_side: int = 1024, max_side: int = 1280, multiple: int = 64
) -> tuple[int, int]:
    """Target size for inference: short side ``min_side``, long side at most ``max_side``, both multiples of
    ``multiple`` (rounded down, never below one multiple)."""
    ratio = min_side / min(width, height)
    if max(width, height) * ratio > max_side:
        ratio = max_side / max(width, height)
    new_w = max(multiple, int(round(width * ratio)) // multiple * multiple)
    new_h = max(multiple, int(round(height * ratio)) // multiple * multiple)
    return new_w, new_h


def resize_img(
    image: Image.Image,
    min_side: int = 1024,
    max_side: int = 1280,
    size: tuple[int, int] | None = None,
    multiple: int = 64,
    resample=Image.BILINEAR,
) -> Image.Image:
    """Resize once to :func:`fit_size` (or to ``size`` when given)."""
    target = size or fit_size(*image.size, min_side=min_side, max_side=max_side, multiple=multiple)
    if tuple(target) == image.size:
        return image
    return image.resize(tuple(target), resample)


def scale_kps(kps, from_size: tuple[int, int], to_size: tuple[int, int]) -> np.ndarray:
    """Map keypoints from a frame of ``from_size`` (W, H) to one of ``to_size`` (a plain resize)."""
    kps = np.asarray(kps, dtype=np.float64).reshape(-1, 2).copy()
    kps[:, 0] *= to_size[0] / from_size[0]
    kps[:, 1] *= to_size[1] / from_size[1]
    return kps


def flip_kps(kps, width: int) -> np.ndarray:
    """Mirror keypoints for a horizontal flip of an image ``width`` wide and swap left/right points."""
    kps = np.asarray(kps, dtype=np.float64).reshape(-1, 2).copy()
    kps[:, 0] = width - kps[:, 0]
    if len(kps) == 5:
        kps = kps[list(FLIP_PERMUTATION)]
    return kps


def head_pose(kps) -> tuple[float, float]:
    """``(yaw, roll)`` in degrees, estimated from eyes, nose and mouth corners (insightface order): roll is the
    eye line's angle; yaw from how far the nose sits from the eyes' and mouth's mid-line, relative to half the eye
    distance (0 frontal, ±90 profile; a coarse estimate, enough to rank changes of angle)."""
    k = np.asarray(kps, dtype=np.float64).reshape(5, 2)
    le, re_, nose, lm, rm = k
    d = re_ - le
    roll = math.degrees(math.atan2(d[1], d[0]))
    c, s = math.cos(-math.radians(roll)), math.sin(-math.radians(roll))
    rot = np.array([[c, -s], [s, c]])
    p = (k - le) @ rot.T
    half = max(abs(p[1, 0]) / 2.0, 1e-6)
    mid = (p[0, 0] + p[1, 0] + p[3, 0] + p[4, 0]) / 4.0
    yaw = math.degrees(math.asin(float(np.clip((p[2, 0] - mid) / half, -1.0, 1.0))))
    return yaw, roll


def head_poses(kps_list) -> np.ndarray:
    """``[n, 2]`` yaw/roll; nan rows where keypoints are missing or malformed."""
    out = np.full((len(kps_list), 2), np.nan)
    for n, k in enumerate(kps_list):
        try:
            out[n] = head_pose(k)
        except (TypeError, ValueError):
            pass
    return out
