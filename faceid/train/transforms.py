"""Training transforms: resize-and-crop (centre or random) of the target image, the same mapping applied to its
keypoints, an optional mirror, SDXL aspect-ratio buckets, CFG drops and SDXL tokenisation.

The image is resized once, only over the crop box (``PIL.Image.resize(box=...)``), and the keypoint image is
drawn at the target resolution from the transformed keypoints with :func:`faceid.face.kps.draw_kps_array` — exact
(no resampling of a drawn picture) and cheap (a canvas the size of the crop, not of the source image).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from faceid.face.images import rgbx_view
from faceid.face.kps import draw_kps_array, flip_kps, scale_kps

# SDXL's standard ~1 MP bucket set (width, height), for 1024 px training.
SDXL_BUCKETS_1024 = (
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
    (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
    (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896),
    (1152, 896), (1152, 832), (1216, 832), (1280, 768), (1344, 768), (1344, 704), (1408, 704), (1472, 704),
    (1536, 640), (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512),
    (2048, 512),
)  # fmt: skip


def scaled_buckets(
    resolution: int, multiple: int | None = None, max_ratio: float = 4.0
) -> list[tuple[int, int]]:
    """The SDXL bucket set scaled to ``resolution`` (the 1024 entry becomes ``resolution``²), sides rounded to
    ``multiple`` (default: 64 at 1024 px, proportionally less, at least 16), duplicates removed."""
    if multiple is None:
        multiple = max(16, 64 * resolution // 1024 // 8 * 8)
    out: list[tuple[int, int]] = []
    for w, h in SDXL_BUCKETS_1024:
        if max(w / h, h / w) > max_ratio:
            continue
        sw = max(multiple, int(round(w * resolution / 1024 / multiple)) * multiple)
        sh = max(multiple, int(round(h * resolution / 1024 / multiple)) * multiple)
        if (sw, sh) not in out:
            out.append((sw, sh))
    return out


def nearest_bucket(width: int, height: int, buckets) -> int:
    """Index of the bucket whose aspect ratio is closest (in log space) to ``width/height``."""
    ratio = np.log(width / height)
    ratios = np.log([w / h for w, h in buckets])
    return int(np.argmin(np.abs(ratios - ratio)))


@dataclass(frozen=True)
class CropPlan:
    """Resize ``(width, height)`` → ``resized`` then crop ``target`` at ``(top, left)``; then mirror if ``flip``."""

    width: int
    height: int
    resized: tuple[int, int]
    top: int
    left: int
    target: tuple[int, int]
    flip: bool = False


def plan_crop(
    width: int,
    height: int,
    target: tuple[int, int],
    random_crop: bool = False,
    flip_prob: float = 0.0,
    rng: np.random.Generator | None = None,
) -> CropPlan:
    """Cover ``target`` (W, H) with the short side (the smallest scale that fills both sides), then crop."""
    tw, th = target
    scale = max(tw / width, th / height)
    rw = max(tw, int(round(width * scale)))
    rh = max(th, int(round(height * scale)))
    if random_crop:
        top = int(rng.integers(0, rh - th + 1))
        left = int(rng.integers(0, rw - tw + 1))
    else:
        top, left = (rh - th) // 2, (rw - tw) // 2
    flip = bool(flip_prob > 0 and rng.random() < flip_prob)
    return CropPlan(width, height, (rw, rh), top, left, (tw, th), flip)


def transform_kps(kps, plan: CropPlan) -> np.ndarray:
    """Keypoints of the source frame → keypoints of the transformed (resized, cropped, mirrored) image."""
    out = scale_kps(kps, (plan.width, plan.height), plan.resized)
    out[:, 0] -= plan.left
    out[:, 1] -= plan.top
    if plan.flip:
        out = flip_kps(out, plan.target[0])
    return out


def apply_image(image: Image.Image, plan: CropPlan, reducing_gap: float | None = 3.0) -> np.ndarray:
    """Resize only the crop box straight to the target size (same mapping as resize-then-crop); contiguous
    ``[H, W, 3]`` uint8.

    At scale 1 (the source's short side is already the target's) the bilinear weights are exactly 1 at integer
    offsets, so the result is the crop itself: taken from the pixels without a resampling pass. The pixels are read
    from PIL's own storage when it allows (:func:`faceid.face.images.rgbx_view`), not through ``np.array``."""
    import cv2

    if image.size != (plan.width, plan.height):
        raise ValueError(f"image is {image.size}, plan expects {(plan.width, plan.height)}")
    tw, th = plan.target
    if plan.resized == (plan.width, plan.height):
        src, rows, cols = image, slice(plan.top, plan.top + th), slice(plan.left, plan.left + tw)
    else:
        sx = plan.width / plan.resized[0]
        sy = plan.height / plan.resized[1]
        box = (plan.left * sx, plan.top * sy, (plan.left + tw) * sx, (plan.top + th) * sy)
        src = image.resize((tw, th), Image.BILINEAR, box=box, reducing_gap=reducing_gap)
        rows, cols = slice(None), slice(None)
    view = rgbx_view(src)
    if view is not None:
        arr = cv2.cvtColor(view[rows, cols], cv2.COLOR_RGBA2RGB)
    else:
        arr = np.ascontiguousarray(np.asarray(src)[rows, cols])
    return cv2.flip(arr, 1) if plan.flip else arr


def kps_image(kps_transformed, plan: CropPlan) -> np.ndarray:
    """The IdentityNet condition for the transformed target: ``[H, W, 3]`` uint8."""
    return draw_kps_array(plan.target, kps_transformed)


def cfg_drop(
    rng: np.random.Generator, text_rate: float = 0.05, face_rate: float = 0.05, both_rate: float = 0.05
) -> tuple[bool, bool]:
    """``(drop_text, drop_face)``: one uniform draw split into face-only, text-only and both bands."""
    r = rng.random()
    if r < face_rate:
        return False, True
    if r < face_rate + text_rate:
        return True, False
    if r < face_rate + text_rate + both_rate:
        return True, True
    return False, False


def tokenize(tokenizer, text: str | list[str]):
    """Pad/truncate to the tokenizer's ``model_max_length`` (77 for SDXL's two CLIP tokenizers)."""
    return tokenizer(
        text,
        max_length=tokenizer.model_max_length,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    ).input_ids


def to_chw_uint8(arr: np.ndarray):
    """uint8 ``[H, W, 3]`` → uint8 ``[3, H, W]`` tensor (a view). Loaders hand over uint8 — 4× less to move
    between worker processes than float32 — and :func:`pixels_to_float`/:func:`cond_to_float` convert on the
    training device. :func:`faceid.train.dataset.collate` writes the planes of such views straight into the batch."""
    return torch.from_numpy(arr).permute(2, 0, 1)


def pixels_to_float(t):
    """uint8 image tensor → float in [-1, 1] (the VAE's input range); float input is returned unchanged."""
    return t.float().div_(127.5).sub_(1.0) if t.dtype == torch.uint8 else t


def cond_to_float(t):
    """uint8 keypoint image tensor → float in [0, 1] (what the pipeline feeds IdentityNet)."""
    return t.float().div_(255.0) if t.dtype == torch.uint8 else t
