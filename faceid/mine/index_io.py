"""Reading a training index for mining (its lines, keys, given person labels, embeddings) and writing the mined
index: the same lines, paths re-based to the new index's folder, plus ``person_id``, cluster statistics and fixed
``reference`` pairs (keys from :mod:`faceid.schema`)."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from faceid.files import atomic_path, resolve_path
from faceid.schema import (
    BBOX_KEY,
    EMBEDDING_DIM,
    EMBEDDING_KEYS,
    FACE_IMAGE_KEY,
    IMAGE_KEYS,
    embedding_of,
    image_of,
    kps_of,
    person_of,
)


class MiningInputError(ValueError):
    """The index or its embeddings cannot be mined; the message names the file and line."""


@dataclass
class IndexLines:
    path: str
    root: str  # folder the index's relative paths refer to
    objs: list  # parsed JSON objects (None for unusable lines)
    raw: list  # original text of every non-blank line
    keys: list
    bad: list = field(default_factory=list)  # (line number, reason)

    @property
    def rows(self) -> list[int]:
        """Positions of usable lines (those mined)."""
        return [n for n, o in enumerate(self.objs) if o is not None]


def read_index(path: str | os.PathLike, root: str | None = None) -> IndexLines:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MiningInputError(f"{path}: index not found")
    root = root or os.path.dirname(os.path.abspath(path))
    objs, raw, keys, bad = [], [], [], []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh):
            if not line.strip():
                continue
            raw.append(line.rstrip("\n"))
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                obj, why = None, f"not JSON ({exc.msg})"
            else:
                why = None if isinstance(obj, dict) else "not a JSON object"
                obj = obj if why is None else None
            if obj is not None and embedding_of(obj) is None:
                obj, why = None, f"no embedding field (one of {', '.join(EMBEDDING_KEYS)})"
            if why:
                bad.append((n + 1, why))
            objs.append(obj)
            # the trainer's fallback key for a line without "id" is its 0-based line number
            keys.append(str(obj.get("id", n)) if obj is not None else str(n))
    if not raw:
        raise MiningInputError(f"{path}: the index is empty")
    return IndexLines(path, root, objs, raw, keys, bad)


def _spec(obj: dict, root: str) -> tuple[str, int | None]:
    value = embedding_of(obj)
    if isinstance(value, dict):
        if "file" not in value:
            raise MiningInputError("embedding dict has no 'file'")
        row = value.get("row")
        return resolve_path(root, str(value["file"])), None if row is None else int(row)
    if isinstance(value, str):
        return resolve_path(root, value), None
    raise MiningInputError(f"embedding must be a path or {{'file', 'row'}}, got {type(value).__name__}")


def load_embeddings(index: IndexLines) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """``[len(index.rows), 512]`` float32 (raw, not normalised) and ``[(line position, reason)]`` for lines whose
    embedding is missing or unreadable (their rows are zero). Rows of one ``.npy`` shard are read together."""
    from faceid.train.records import load_embedding

    rows = index.rows
    out = np.zeros((len(rows), EMBEDDING_DIM), np.float32)
    errors: list[tuple[int, str]] = []
    groups: dict[str, list] = OrderedDict()
    for r, pos in enumerate(rows):
        try:
            file, row = _spec(index.objs[pos], index.root)
        except MiningInputError as exc:
            errors.append((pos, str(exc)))
            continue
        groups.setdefault(file, []).append((r, pos, row))
    for file, members in groups.items():
        if not os.path.exists(file):
            errors += [(pos, f"embedding file not found: {file}") for _, pos, _ in members]
            continue
        try:
            if file.endswith(".npy") and all(row is not None for _, _, row in members):
                arr = np.load(file, mmap_mode="r", allow_pickle=False)
                if arr.ndim != 2 or arr.shape[1] != EMBEDDING_DIM:
                    raise ValueError(f"shape {arr.shape}, expected [N, {EMBEDDING_DIM}]")
                want = np.array([row for _, _, row in members])
                if want.max() >= len(arr) or want.min() < 0:
                    raise ValueError(f"row {int(want.max())} outside its {len(arr)} rows")
                order = np.argsort(want, kind="stable")
                out[np.array([r for r, _, _ in members])[order]] = arr[want[order]]
            else:
                for r, _pos, row in members:
                    out[r] = load_embedding({"file": file, "row": row})
        except Exception as exc:  # noqa: BLE001 - any reader error names the file
            errors += [(pos, f"bad embedding file {file}: {exc}") for _, pos, _ in members]
    finite = np.isfinite(out).all(1)
    zero = ~np.any(out, axis=1)
    bad_rows = {pos for pos, _ in errors}
    for r in np.flatnonzero(~finite | zero):
        if rows[r] not in bad_rows:
            errors.append((rows[r], "embedding is zero or not finite"))
    return out, sorted(errors)


def given_labels(index: IndexLines) -> list:
    return [person_of(index.objs[p]) for p in index.rows]


def face_sources(index: IndexLines) -> list[tuple[str | None, list | None]]:
    """``(image path, bbox)`` per usable line for hashes and the contact sheet: the stored face crop
    (FaceID-6M ``face/N.png``) when there is one, else the image with its face box."""
    out = []
    for p in index.rows:
        o = index.objs[p]
        face = o.get(FACE_IMAGE_KEY)
        if isinstance(face, str):
            out.append((resolve_path(index.root, face), None))
        else:
            img = image_of(o)
            out.append((resolve_path(index.root, img) if isinstance(img, str) else None, o.get(BBOX_KEY)))
    return out


def keypoints(index: IndexLines) -> list:
    return [kps_of(index.objs[p]) for p in index.rows]


def _rebase(value: str, src_root: str, dst_dir: str) -> str:
    path = resolve_path(src_root, value)
    try:
        return os.path.relpath(path, dst_dir).replace(os.sep, "/")
    except ValueError:  # another drive
        return path


def rebased(obj: dict, src_root: str, dst_dir: str) -> dict:
    """A copy of ``obj`` whose relative paths (image, face image, embedding files) are relative to ``dst_dir``."""
    if os.path.abspath(src_root) == os.path.abspath(dst_dir):
        return dict(obj)
    out = dict(obj)
    for k in (*IMAGE_KEYS, FACE_IMAGE_KEY):
        if isinstance(out.get(k), str):
            out[k] = _rebase(out[k], src_root, dst_dir)
    for k in EMBEDDING_KEYS:
        v = out.get(k)
        if isinstance(v, str):
            out[k] = _rebase(v, src_root, dst_dir)
        elif isinstance(v, dict) and isinstance(v.get("file"), str):
            out[k] = {**v, "file": _rebase(v["file"], src_root, dst_dir)}
    ref = out.get("reference")
    if isinstance(ref, dict) and isinstance(ref.get("embedding"), dict) and "file" in ref["embedding"]:
        out["reference"] = {
            **ref,
            "embedding": {**ref["embedding"], "file": _rebase(ref["embedding"]["file"], src_root, dst_dir)},
        }
    return out


def write_index(path: str | os.PathLike, lines) -> None:
    """Write JSONL lines (dicts, or raw strings kept as they were) atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for line in lines:
                fh.write((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n")
