"""Face conditioning from uploaded files: one or several photos of a person and/or a face-info file give the
identity (one embedding each; the pipeline averages them), an optional pose photo gives the keypoints and the
output size (its largest face), and every problem becomes a :class:`FaceInputError` whose message names the file.

:func:`arrange` adds the inference modes: a target photo (the person is inpainted into its largest face, output
size = the target's) or further people (each with their own embedding, keypoints and face box in the output,
left to right).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image

from faceid.face.face_info import FaceInfoError, load_face_info
from faceid.face.images import MAX_PIXELS, ImageLoadError, load_image, to_bgr
from faceid.face.kps import fit_size, scale_kps
from faceid.generation.composition import condition_kps_image, people_from_detections, side_by_side_boxes


class FaceInputError(ValueError):
    """An upload cannot be used; the message is meant for the person who uploaded it."""


@dataclass
class FaceCondition:
    """Everything the pipeline needs about the face, in the output frame."""

    embeddings: np.ndarray  # [N, 512]: one per reference; the pipeline averages them
    kps: np.ndarray  # [5, 2] in the output frame
    size: tuple[int, int]  # output (W, H)
    bbox: np.ndarray | None  # [4] x1, y1, x2, y2 in the output frame (None: a face-info file without one)
    sources: list[str] = field(default_factory=list)  # the references used, in order
    pose_source: str = ""
    notes: list[str] = field(default_factory=list)  # what the user should know (skipped photos, ...)
    target: Image.Image | None = None  # inpainting: the photo whose face (bbox, kps above) is replaced
    target_source: str = ""
    # Several people: one dict per person, the first being the one above:
    # {"embeddings": [N, 512], "kps": [5, 2] or None (estimated from the box), "bbox": [4], "source": str}
    people: list[dict] = field(default_factory=list)

    @property
    def mode(self) -> str:
        return "inpaint" if self.target is not None else "people" if len(self.people) > 1 else "single"

    @property
    def kps_image(self) -> Image.Image:
        return condition_kps_image(self.size, self.kps, self.people if self.mode == "people" else ())

    def face_mask(self) -> Image.Image | None:
        """White inside the face box, black elsewhere (the official demo's "enhance non-face region": IdentityNet
        and the face tokens act only on the face, the prompt has the rest)."""
        if self.bbox is None:
            return None
        w, h = self.size
        x1, y1, x2, y2 = np.clip(np.round(self.bbox), 0, [w, h, w, h]).astype(int)
        mask = np.zeros((h, w), np.uint8)
        mask[y1:y2, x1:x2] = 255
        return Image.fromarray(mask, "L")


def display_name(path) -> str:
    return os.path.basename(os.fspath(path)) if path else "upload"


def read_upload_image(path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An uploaded file as RGB, or :class:`FaceInputError` ("x.png: not an image...", "...over the limit")."""
    name = display_name(path)
    try:
        with open(os.fspath(path), "rb") as fh:
            data = fh.read()
        return load_image(data, max_pixels=max_pixels, name=name)
    except ImageLoadError as exc:
        raise FaceInputError(str(exc)) from exc
    except OSError as exc:
        raise FaceInputError(f"{name}: cannot read the upload ({exc.strerror or exc})") from exc


def _largest_face(analyzer, image: Image.Image, name: str):
    face = analyzer.analyze_full(image)
    if not face:
        reason = getattr(face, "reason", "no face detected")
        raise FaceInputError(
            f"{name}: no face found ({reason}); use a photo where the face is clearly visible"
        )
    return face


def _files(value) -> list:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [value]
    return [v for v in value if v]


def face_condition(
    face_files=None,
    face_info=None,
    pose=None,
    *,
    analyzer,
    min_side: int = 1024,
    max_side: int = 1280,
    max_pixels: int = MAX_PIXELS,
) -> FaceCondition:
    """Build the :class:`FaceCondition` from upload paths.

    ``analyzer`` is an object with ``analyze_full(image)`` (:class:`faceid.face.analysis.FaceAnalyzer`), or a
    function returning one (called only when a photo has to be analysed). A photo without a face among several is
    skipped with a note; without any usable reference, or with a pose photo without a face, nothing is generated.
    """
    photos, notes = _files(face_files), []
    if not photos and not face_info:
        raise FaceInputError("upload at least one photo of the person (or a face-info file)")
    get = analyzer if callable(analyzer) and not hasattr(analyzer, "analyze_full") else (lambda: analyzer)

    embeddings, sources, geometry = [], [], None  # geometry: (kps, bbox, frame, source)
    problems = []
    for path in photos:
        name = display_name(path)
        try:
            image = read_upload_image(path, max_pixels)
            face = _largest_face(get(), image, name)
        except FaceInputError as exc:
            problems.append(str(exc))
            continue
        embeddings.append(np.asarray(face.embedding, np.float32).reshape(-1))
        sources.append(name)
        if face.num_faces > 1:
            notes.append(f"{name}: {face.num_faces} faces, the largest one is used")
        if geometry is None:
            geometry = (face.kps, face.bbox, tuple(face.frame), name)
    if face_info:
        name = display_name(face_info)
        try:
            info = load_face_info(face_info)
        except FaceInfoError as exc:
            raise FaceInputError(str(exc).replace(os.fspath(face_info), name)) from exc
        embeddings.append(info["embedding"])
        sources.append(name)
        if geometry is None:
            if "frame" not in info:
                raise FaceInputError(
                    f"{name}: no 'frame' (image size) recorded; upload the photo too, or a pose photo"
                )
            geometry = (info["kps"], info.get("bbox"), info["frame"], name)
    if not embeddings:
        raise FaceInputError("; ".join(problems))
    notes = [f"skipped {p}" for p in problems] + notes

    if pose:
        name = display_name(pose)
        try:
            image = read_upload_image(pose, max_pixels)
        except FaceInputError as exc:
            raise FaceInputError(f"pose photo {exc}") from exc
        face = _largest_face(get(), image, f"pose photo {name}")
        geometry = (face.kps, face.bbox, tuple(face.frame), name)
    kps, bbox, frame, pose_source = geometry
    size = fit_size(*frame, min_side=min_side, max_side=max_side)
    bbox_out = None
    if bbox is not None:
        bbox_out = scale_kps(np.asarray(bbox, np.float64).reshape(2, 2), frame, size).reshape(4)
    return FaceCondition(
        embeddings=np.stack(embeddings).astype(np.float32),
        kps=scale_kps(kps, frame, size),
        size=size,
        bbox=bbox_out,
        sources=sources,
        pose_source=pose_source,
        notes=notes,
    )


def _person(path, analyzer, max_pixels: int, label: str):
    """The largest face of one upload (a path or a one-element list) → ``(face, name, image)``."""
    files = _files(path)
    name = display_name(files[0])
    try:
        image = read_upload_image(files[0], max_pixels)
    except FaceInputError as exc:
        raise FaceInputError(f"{label} {exc}") from exc
    return _largest_face(analyzer, image, f"{label} {name}"), name, image


def arrange(
    cond: FaceCondition,
    *,
    target=None,
    people_files=(),
    pose=None,
    analyzer,
    max_pixels: int = MAX_PIXELS,
) -> FaceCondition:
    """``cond`` with a target photo (inpainting) or further people (``people_files``: one upload per person,
    person 2, 3, ...). People take the largest faces of the ``pose`` photo, left to right (person 1 leftmost,
    :func:`~faceid.generation.composition.people_from_detections`) when it is given, side-by-side boxes
    otherwise. A target photo works with one person only."""
    get = analyzer if callable(analyzer) and not hasattr(analyzer, "analyze_full") else (lambda: analyzer)
    others = [f for f in people_files if _files(f)]
    if target is not None and _files(target):
        if others:
            raise FaceInputError(
                "a target photo works with one person: remove the second/third person's photo"
            )
        face, name, image = _person(target, get(), max_pixels, "target photo")
        notes = list(cond.notes)
        if pose:
            notes.append("the pose photo is not used with a target photo (the target's face gives the pose)")
        if face.num_faces > 1:
            notes.append(f"target photo {name}: {face.num_faces} faces, the largest one is replaced")
        return replace(
            cond,
            kps=np.asarray(face.kps, np.float64),
            bbox=np.asarray(face.bbox, np.float64),
            size=image.size,
            pose_source=name,
            target=image,
            target_source=name,
            notes=notes,
        )
    if not others:
        return cond
    people = [{"embeddings": cond.embeddings, "source": ", ".join(cond.sources)}]
    for k, path in enumerate(others, start=2):
        face, name, _ = _person(path, get(), max_pixels, f"person {k} photo")
        people.append({"embeddings": np.asarray(face.embedding, np.float32)[None], "source": name})
    if pose:
        image = read_upload_image(_files(pose)[0], max_pixels)
        det = get().detect(to_bgr(image))
        try:
            boxes, kps = people_from_detections(det.bboxes, det.kpss, len(people), image.size, cond.size)
        except ValueError as exc:
            raise FaceInputError(
                f"pose photo {display_name(_files(pose)[0])}: {exc}; use a photo with a face per person, or no "
                "pose photo (side by side)"
            ) from exc
    else:
        boxes, kps = side_by_side_boxes(cond.size, len(people)), [None] * len(people)
    for person, box, k in zip(people, boxes, kps):
        person["bbox"], person["kps"] = box, k
    first = people[0]
    kps = first["kps"]
    if kps is None:
        from faceid.face.regions import kps_from_bbox

        kps = kps_from_bbox(first["bbox"])
    return replace(cond, people=people, kps=np.asarray(kps, np.float64), bbox=first["bbox"])
