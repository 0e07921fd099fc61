"""Composition helpers on top of the pipeline call: faces found in a photo, a pose taken from another photo, the
``faces=`` argument for several people (who goes where), and a face put into an existing photo (:func:`face_inpaint`,
and :func:`face_detail` for small faces). Each receives the pipeline object (never imports the pipeline module)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from faceid.face.kps import draw_kps, fit_size, scale_kps
from faceid.face.regions import crop_box, feathered_mask, kps_from_bbox, left_to_right, region_masks
from faceid.generation.defaults import (
    FACE_DETAIL_STRENGTH,
    INPAINT_SIZE,
    INPAINT_STRENGTH,
    MASK_EXPAND,
    MASK_FEATHER,
    MAX_SIDE,
    MIN_SIDE,
    REGION_SCALE,
)


def _gen_size(width: int, height: int, size: int, multiple: int = 64) -> tuple[int, int]:
    """Generation size for a crop: longer side ``size``, aspect kept, both multiples of ``multiple``."""
    ratio = size / max(width, height)
    return (
        max(multiple, int(round(width * ratio)) // multiple * multiple),
        max(multiple, int(round(height * ratio)) // multiple * multiple),
    )


def detect_faces(analyzer, image) -> list[dict]:
    """Every face ``analyzer`` (a ``faceid.face.analysis.FaceAnalyzer``) finds in ``image``, left to right, as
    ``{"bbox": [4], "kps": [5, 2], "score": float}`` in the image's pixels."""
    from faceid.face.images import load_image, to_bgr

    image = image if isinstance(image, Image.Image) else load_image(image)
    det = analyzer.detect(to_bgr(image))
    order = left_to_right(det.bboxes) if len(det.bboxes) else []
    return [{"bbox": det.bboxes[i], "kps": det.kpss[i], "score": float(det.scores[i])} for i in order]


def pose_from_image(analyzer, image, size=None, min_side: int = MIN_SIDE, max_side: int = MAX_SIDE) -> dict:
    """Pose reference: the keypoints of the largest face of ``image`` (path or PIL), in an output frame of
    ``size`` (W, H) — by default the pose image resized like the face image would be (:func:`fit_size`).

    Returns ``{"kps", "kps_image", "size", "bbox"}`` (coordinates in the output frame); raises ``ValueError``
    when no face is found."""
    from faceid.face.images import load_image

    image = load_image(image) if not isinstance(image, Image.Image) else image
    face = analyzer.analyze(image)
    if face is None:
        raise ValueError("pose image: no face found")
    frame = tuple(face.frame)
    size = tuple(size) if size else fit_size(*frame, min_side=min_side, max_side=max_side)
    sx, sy = size[0] / frame[0], size[1] / frame[1]
    kps = np.asarray(face.kps, np.float64) * [sx, sy]
    bbox = np.asarray(face.bbox, np.float64) * [sx, sy, sx, sy]
    return {"kps": kps, "kps_image": draw_kps(size, kps), "size": size, "bbox": bbox}


def people_inputs(embeddings, size, bboxes, kps=None, region_scale: float = REGION_SCALE) -> list[dict]:
    """The ``faces=`` argument for several people: person ``i`` has embedding ``embeddings[i]``, face box
    ``bboxes[i]`` and keypoints ``kps[i]`` (default: estimated from the box) in an output of ``size`` (W, H).

    Each person's region is their box grown ``region_scale`` times, split between neighbours by the nearest face
    centre (:func:`faceid.face.regions.region_masks`); their keypoint image holds only their own keypoints."""
    if len(embeddings) != len(bboxes):
        raise ValueError(
            f"{len(embeddings)} identities for {len(bboxes)} face boxes: give one box per person"
        )
    kps = kps if kps is not None else [kps_from_bbox(b) for b in bboxes]
    masks = region_masks(size, bboxes, scale=region_scale)
    return [
        {"image_embeds": e, "image": draw_kps(size, k), "mask": m, "bbox": np.asarray(b, np.float64)}
        for e, k, m, b in zip(embeddings, kps, masks, bboxes)
    ]


def face_inpaint(
    pipe,
    image,
    image_embeds,
    prompt,
    bbox=None,
    kps=None,
    analyzer=None,
    size: int = INPAINT_SIZE,
    context: float = 2.0,
    expand: float = MASK_EXPAND,
    feather: float = MASK_FEATHER,
    strength: float = INPAINT_STRENGTH,
    return_mask: bool = False,
    **call_kwargs,
):
    """Put the person of ``image_embeds`` into the photo ``image`` in place of its face.

    The face's ``bbox`` (and ``kps``) are given, or detected with ``analyzer`` (the largest face; keypoints are
    estimated from the box when only a box is given). A crop ``context`` times the face is generated at ``size``
    (longer side) from the photo (``strength`` of the schedule) with the target's keypoints, inside the face box
    grown ``expand`` times with feathered edges (``feather``); the result is pasted back with that mask, so every
    pixel outside it is the photo's. ``call_kwargs`` go to the pipeline (steps, guidance, generator, scales, ...).

    Returns the new photo (PIL), and the ``[H, W]`` mask when ``return_mask``.
    """
    from faceid.face.images import load_image

    image = image.convert("RGB") if isinstance(image, Image.Image) else load_image(image)
    if bbox is None:
        if analyzer is None:
            raise ValueError("face_inpaint: give bbox (x1, y1, x2, y2) or an analyzer to detect the face")
        face = analyzer.analyze(image)
        if face is None:
            raise ValueError("face_inpaint: no face found in the target image")
        bbox, kps = face.bbox, face.kps if kps is None else kps
    bbox = np.asarray(bbox, np.float64)
    kps = kps_from_bbox(bbox) if kps is None else np.asarray(kps, np.float64)
    x1, y1, x2, y2 = crop_box(bbox, image.size, context=max(context, expand * 1.1))
    cw, ch = x2 - x1, y2 - y1
    # Only the crop is regenerated: the mask is cut to it, so "outside the mask" really is untouched.
    mask = np.zeros((image.size[1], image.size[0]), np.float32)
    mask[y1:y2, x1:x2] = feathered_mask(image.size, bbox, expand=expand, feather=feather)[y1:y2, x1:x2]
    gw, gh = _gen_size(cw, ch, size)
    crop = image.crop((x1, y1, x2, y2)).resize((gw, gh), Image.LANCZOS)
    crop_mask = Image.fromarray(mask[y1:y2, x1:x2]).resize((gw, gh), Image.BILINEAR)
    crop_kps = (kps - [x1, y1]) * [gw / cw, gh / ch]
    out = pipe(
        prompt,
        image_embeds=image_embeds,
        image=draw_kps((gw, gh), crop_kps),
        init_image=crop,
        mask_image=np.clip(np.asarray(crop_mask, np.float32), 0, 1),
        strength=strength,
        width=gw,
        height=gh,
        output_type="pil",
        **call_kwargs,
    ).images[0]
    back = np.asarray(out.resize((cw, ch), Image.LANCZOS), np.float32)
    result = np.asarray(image, np.float32).copy()
    m = mask[y1:y2, x1:x2, None]
    result[y1:y2, x1:x2] = result[y1:y2, x1:x2] * (1 - m) + back * m
    result = Image.fromarray(np.clip(np.rint(result), 0, 255).astype(np.uint8))
    return (result, mask) if return_mask else result


def face_detail(pipe, image, image_embeds, prompt, strength=FACE_DETAIL_STRENGTH, **kwargs):
    """Face-detail pass for small faces: regenerate the face region of a generated ``image`` larger (at
    ``size``, default :data:`INPAINT_SIZE`) with the same identity and paste it back (:func:`face_inpaint`'s
    arguments, ``bbox``/``kps``/``analyzer`` included, with a lower ``strength``, so the composition stays and
    the face gains detail)."""
    return face_inpaint(pipe, image, image_embeds, prompt, strength=strength, **kwargs)


def people_from_detections(bboxes, kpss, count: int, frame, size):
    """Who goes where among the faces detected in a pose photo of ``frame`` (W, H): the ``count`` largest faces,
    ordered left to right (person 1 leftmost, as side-by-side boxes and ``--face_boxes`` are), as
    ``(boxes, kps)`` in an output of ``size``. ``ValueError`` when fewer faces than people were found."""
    b = np.asarray(bboxes, np.float64).reshape(-1, 4)
    if len(b) < count:
        raise ValueError(f"{len(b)} face(s) for {count} people")
    largest = np.argsort(-(b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), kind="stable")[:count]
    order = [int(largest[i]) for i in left_to_right(b[largest])]
    boxes = [scale_kps(b[i].reshape(2, 2), frame, size).reshape(4) for i in order]
    kps = [scale_kps(np.asarray(kpss[i], np.float64), frame, size) for i in order]
    return boxes, kps


def side_by_side_boxes(size: tuple[int, int], count: int) -> list[np.ndarray]:
    """``count`` face boxes in equal columns of a ``size`` (W, H) picture, each half the column wide (at most
    half the height), centred in its column, at 40 % of the height: where people stand side by side."""
    w, h = size
    col = w / count
    side = min(col, h) * 0.5
    cy = 0.4 * h
    return [
        np.array([(i + 0.5) * col - side / 2, cy - side / 2, (i + 0.5) * col + side / 2, cy + side / 2])
        for i in range(count)
    ]


def people_kps_image(size, bboxes, kps=None) -> Image.Image:
    """Every person's keypoints in one picture (what the user sees; each person's IdentityNet gets only theirs)."""
    kps = kps if kps is not None else [None] * len(bboxes)
    drawn = [
        np.asarray(draw_kps(size, k if k is not None else kps_from_bbox(b))) for b, k in zip(bboxes, kps)
    ]
    return Image.fromarray(np.maximum.reduce(drawn))


def condition_kps_image(size, kps, people=()) -> Image.Image:
    """The keypoint picture a generation is conditioned on: every person's with several people, else ``kps``."""
    if len(people) > 1:
        return people_kps_image(size, [p["bbox"] for p in people], [p["kps"] for p in people])
    return draw_kps(size, kps)
