"""Readers of the dataset layouts we preprocess (and train from): one :class:`SourceItem` per image.

* :func:`iter_folder` — a folder of images, recursive, sorted; optional ``<stem>.txt`` caption next to an image;
  ``person_from_folder`` takes the person id from the sub-folder (path relative to the root).
* :func:`iter_jsonl` — a JSONL index (or a JSON list): MFaceTech records (``file_name``, ``additional_feature``
  = caption, ``bbox``, ``landmarks``, ``insightface_feature_file``), seed-repo records (``image_file``, ``text``),
  or ``image``/``caption``. Relative image paths resolve against ``image_root`` (default: the index's folder).
* :func:`iter_faceid6m` — an extracted FaceID-6M / FaceID-70K folder: line N of its ``.jsonl`` is image ``N.png``
  (with ``N.npy`` and ``face/N.png`` beside it); the paths written inside the jsonl are ignored.

Every reader yields items in a deterministic order with a stable ``key`` (used to resume) and ``index`` (position,
used to shard: item ``index`` belongs to rank ``index % world``). An unreadable index line is still an item, with
``error`` set, so it can be reported instead of silently dropped. :func:`iter_source_items` picks the reader.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from faceid.files import resolve_path
from faceid.schema import IMAGE_KEYS, caption_of, faceid6m_index_base, image_of, person_of

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


@dataclass
class SourceItem:
    index: int  # position in the source (sharding and output order)
    key: str  # stable identifier (resume); unique within a source
    image: str | None  # path of the image (absolute, or relative to the working directory)
    caption: str = ""
    person_id: str | None = None
    line: int | None = None  # 1-based line in the index file, when there is one
    extra: dict = field(
        default_factory=dict
    )  # e.g. FaceID-6M ``face_image`` / ``embedding_npy``, record fields
    error: str | None = None  # "malformed_line: ..." / "missing_field: ..." for unusable index lines


def iter_folder(
    root: str | os.PathLike, person_from_folder: bool = False, exts=IMAGE_EXTS
) -> Iterator[SourceItem]:
    """Images under ``root`` (recursive, sorted by relative path); key = the relative POSIX path."""
    root = Path(root)
    exts = tuple(e.lower() for e in exts)
    index = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(root)
        for name in sorted(filenames):
            if not name.lower().endswith(exts) or name.startswith("."):
                continue
            path = Path(dirpath) / name
            rel = (rel_dir / name).as_posix()
            caption = ""
            side = path.with_suffix(".txt")
            if side.is_file():
                caption = side.read_text(encoding="utf-8", errors="replace").strip()
            person = rel_dir.as_posix() if person_from_folder and rel_dir.parts else None
            yield SourceItem(index=index, key=rel, image=str(path), caption=caption, person_id=person)
            index += 1


def _read_lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8", errors="replace") as fh:
        head = fh.read(1)
        while head and head.isspace():
            head = fh.read(1)
        fh.seek(0)
        if head == "[":  # a JSON list instead of JSON lines
            data = json.load(fh)
            for n, rec in enumerate(data, 1):
                yield n, json.dumps(rec)
            return
        for n, line in enumerate(fh, 1):
            yield n, line


def _parse(line: str, n: int, path: Path) -> tuple[dict | None, str | None]:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        return None, f"malformed_line: {path.name}:{n}: {exc.msg}"
    if not isinstance(rec, dict):
        return None, f"malformed_line: {path.name}:{n}: expected a JSON object, got {type(rec).__name__}"
    return rec, None


def iter_jsonl(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> Iterator[SourceItem]:
    """Records of a JSONL (or JSON list) index; key ``L<line>``. Blank lines are skipped (and keep numbering)."""
    path = Path(path)
    base = Path(image_root) if image_root else path.parent
    index = 0
    for n, line in _read_lines(path):
        if not line.strip():
            continue
        rec, err = _parse(line, n, path)
        item = SourceItem(index=index, key=f"L{n}", image=None, line=n, error=err)
        index += 1
        if rec is not None:
            image = image_of(rec)
            if not isinstance(image, str):
                item.error = f"missing_field: {path.name}:{n}: no image path (one of {', '.join(IMAGE_KEYS)})"
            else:
                item.image = resolve_path(base, image)
            item.caption = caption_of(rec)
            person = person_of(rec)
            item.person_id = None if person is None else str(person)
            for k in ("bbox", "landmarks", "insightface_feature_file"):
                if k in rec:
                    item.extra[k] = rec[k]
        yield item


def find_faceid6m_jsonl(folder: str | os.PathLike) -> Path:
    found = sorted(Path(folder).glob("*.jsonl"))
    if len(found) != 1:
        raise FileNotFoundError(
            f"{folder}: expected exactly one .jsonl in a FaceID-6M/70K folder, found {len(found)}; pass it explicitly"
        )
    return found[0]


def iter_faceid6m(
    folder: str | os.PathLike, jsonl: str | os.PathLike | None = None, index_base: int | None = None
) -> Iterator[SourceItem]:
    """Extracted FaceID-6M/70K: line N ↔ ``N.png``, ``N.npy``, ``face/N.png`` (N counts from ``index_base``:
    0 if ``0.png`` exists, else 1, unless given). Key = ``N``. Paths inside the jsonl are ignored."""
    folder = Path(folder)
    jsonl = Path(jsonl) if jsonl else find_faceid6m_jsonl(folder)
    if index_base is None:
        index_base = faceid6m_index_base(folder)
    with open(jsonl, encoding="utf-8", errors="replace") as fh:
        yield from _faceid6m_lines(folder, jsonl, fh, index_base)


def _faceid6m_lines(folder: Path, jsonl: Path, fh, index_base: int) -> Iterator[SourceItem]:
    index = 0
    for n, line in enumerate(fh):
        num = n + index_base
        if not line.strip():
            continue
        rec, err = _parse(line, n + 1, jsonl)
        item = SourceItem(index=index, key=str(num), image=str(folder / f"{num}.png"), line=n + 1, error=err)
        index += 1
        if rec is not None:
            item.caption = caption_of(rec)
            person = person_of(rec)
            item.person_id = None if person is None else str(person)
        for k, p in (
            ("embedding_npy", folder / f"{num}.npy"),
            ("face_image", folder / "face" / f"{num}.png"),
        ):
            if p.exists():
                item.extra[k] = str(p)
        yield item


def detect_kind(path: str | os.PathLike) -> str:
    """``"jsonl"`` for a file, ``"faceid6m"`` for a folder holding one .jsonl and numbered .png files, else
    ``"folder"``."""
    path = Path(path)
    if path.is_file():
        return "jsonl"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: input not found")
    if len(list(path.glob("*.jsonl"))) == 1 and any(
        re.fullmatch(r"\d+\.png", p.name) for p in path.iterdir()
    ):
        return "faceid6m"
    return "folder"


def iter_source_items(
    path: str | os.PathLike,
    kind: str = "auto",
    image_root: str | os.PathLike | None = None,
    person_from_folder: bool = False,
    index_base: int | None = None,
) -> Iterator[SourceItem]:
    """Items of any supported source (``kind``: auto, folder, jsonl, faceid6m)."""
    kind = detect_kind(path) if kind == "auto" else kind
    if kind == "folder":
        return iter_folder(path, person_from_folder=person_from_folder)
    if kind == "jsonl":
        return iter_jsonl(path, image_root=image_root)
    if kind == "faceid6m":
        p = Path(path)
        return iter_faceid6m(
            p.parent if p.is_file() else p, jsonl=p if p.is_file() else None, index_base=index_base
        )
    raise ValueError(f"unknown source kind {kind!r} (auto, folder, jsonl, faceid6m)")
