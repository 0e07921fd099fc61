"""Face-box geometry for inference: expanded boxes, feathered masks, crops around a face, per-person regions and
keypoints estimated from a box. Pure numpy; coordinates are pixels ``(x1, y1, x2, y2)`` of an image ``(W, H)``."""

from __future__ import annotations

import numpy as np

# insightface.utils.face_align.arcface_dst: the five keypoints (eyes, nose, mouth corners) in a 112x112 aligned face,
# in its dtype. The one definition in the repository (importing insightface for five numbers costs seconds).
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)


def as_bbox(bbox) -> np.ndarray:
    b = np.asarray(bbox, dtype=np.float64).reshape(-1)
    if b.shape != (4,) or not (b[2] > b[0] and b[3] > b[1]):
        raise ValueError(f"bbox must be (x1, y1, x2, y2) with x2 > x1 and y2 > y1, got {bbox!r}")
    return b


def expand_bbox(bbox, scale: float, size: tuple[int, int] | None = None) -> np.ndarray:
    """``bbox`` grown ``scale`` times about its centre (clipped to ``size`` = (W, H) when given)."""
    x1, y1, x2, y2 = as_bbox(bbox)
    cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) * scale / 2, (y2 - y1) * scale / 2
    out = np.array([cx - hw, cy - hh, cx + hw, cy + hh])
    if size is not None:
        out = np.clip(out, 0, [size[0], size[1], size[0], size[1]])
    return out


def feathered_mask(size: tuple[int, int], bbox, expand: float = 1.3, feather: float = 0.2) -> np.ndarray:
    """``[H, W]`` float32 mask: 1 inside ``bbox`` grown ``expand`` times, ramping smoothly to 0 at its border.

    The ramp lies *inside* the expanded box (``feather`` is its width as a fraction of the box's shorter side),
    so every pixel outside the expanded box is exactly 0: pasting with this mask keeps them untouched.
    """
    w, h = int(size[0]), int(size[1])
    x1, y1, x2, y2 = expand_bbox(bbox, expand, (w, h))
    ramp = max(1e-6, feather * min(x2 - x1, y2 - y1))
    xs, ys = np.arange(w) + 0.5, np.arange(h) + 0.5  # pixel centres
    dx = np.clip(np.minimum(xs - x1, x2 - xs) / ramp, 0, 1)
    dy = np.clip(np.minimum(ys - y1, y2 - ys) / ramp, 0, 1)
    m = np.minimum(dy[:, None], dx[None, :])
    return (m * m * (3 - 2 * m)).astype(np.float32)  # smoothstep: no visible edge at either end


def crop_box(
    bbox, size: tuple[int, int], context: float = 2.0, multiple: int = 8
) -> tuple[int, int, int, int]:
    """Integer box around ``bbox`` (``context`` times its longer side, square where the image allows), kept
    inside the image and with sides that are multiples of ``multiple`` pixels when the image allows."""
    w, h = int(size[0]), int(size[1])
    x1, y1, x2, y2 = as_bbox(bbox)
    side = max(x2 - x1, y2 - y1) * context
    cw, ch = min(w, side), min(h, side)
    cw = max(multiple, int(cw) // multiple * multiple) if w >= multiple else w
    ch = max(multiple, int(ch) // multiple * multiple) if h >= multiple else h
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left = int(round(min(max(cx - cw / 2, 0), w - cw)))
    top = int(round(min(max(cy - ch / 2, 0), h - ch)))
    return left, top, left + int(cw), top + int(ch)


def kps_from_bbox(bbox) -> np.ndarray:
    """Five keypoints (eyes, nose, mouth corners) at the ArcFace template positions inside ``bbox``: for faces
    given as boxes only."""
    x1, y1, x2, y2 = as_bbox(bbox)
    return (ARCFACE_TEMPLATE / 112.0 * [x2 - x1, y2 - y1] + [x1, y1]).astype(np.float32)


def region_masks(size: tuple[int, int], bboxes, scale: float = 2.0) -> list[np.ndarray]:
    """One binary ``[H, W]`` float32 region per face: its box grown ``scale`` times; where grown boxes overlap a
    pixel goes to the face whose centre is nearest, so the regions never overlap."""
    w, h = int(size[0]), int(size[1])
    boxes = [expand_bbox(b, scale, (w, h)) for b in bboxes]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    inside, dist = [], []
    for raw, (x1, y1, x2, y2) in zip(bboxes, boxes):
        b = as_bbox(raw)
        cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
        inside.append((xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2))
        dist.append(np.where(inside[-1], np.hypot(xs - cx, ys - cy), np.inf))
    if not boxes:
        return []
    nearest = np.argmin(np.stack(dist), axis=0)
    return [(inside[i] & (nearest == i)).astype(np.float32) for i in range(len(boxes))]


def left_to_right(bboxes) -> list[int]:
    """Indices of ``bboxes`` ordered by their centre's x (how several people are matched to identities)."""
    b = np.asarray(bboxes, dtype=np.float64).reshape(-1, 4)
    return [int(i) for i in np.argsort((b[:, 0] + b[:, 2]) / 2, kind="stable")]


def bbox_from_kps(kps) -> np.ndarray:
    """The face box whose ArcFace-template keypoints best fit ``kps`` (least squares per axis): the inverse of
    :func:`kps_from_bbox`, for faces known only by their keypoints."""
    t = ARCFACE_TEMPLATE / 112.0
    k = np.asarray(kps, np.float64).reshape(-1, 2)
    box = []
    for axis in (0, 1):
        a = np.stack([np.ones(len(t)), t[:, axis]], axis=1)
        (origin, extent), *_ = np.linalg.lstsq(a, k[:, axis], rcond=None)
        box.append((origin, origin + max(extent, 1e-3)))
    (x1, x2), (y1, y2) = box
    return np.array([x1, y1, x2, y2])
