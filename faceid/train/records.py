"""Training-side readers: every supported index format → one record list, the start-up data check, and
cross-identity reference selection.

Formats (``--data_format auto`` picks by the first line's fields, or FaceID-6M for a folder):

* ``index`` — ``get_face_info.py``'s index (docs/design.md): ``image``, ``caption``, ``kps``, ``embedding``
  (``{"file", "row"}``), ``person_id``, ``width``/``height``.
* ``mfacetech`` — ``file_name``, ``additional_feature`` (caption), ``bbox``, ``landmarks``,
  ``insightface_feature_file`` (a ``torch.save``-d tensor or numpy array, read with ``weights_only=True``).
* ``seed`` — the CrossFaceID / FaceID-6M seed repos: ``image_file``, caption in ``text``/``caption``/``prompt``,
  keypoints in ``kps``/``landmarks``, embedding in ``embedding_file``/``npy``/``insightface_feature_file``.
* ``faceid6m`` — a folder of ``*.jsonl``: line N ↔ ``N.png`` (image), ``N.npy`` (embedding) and ``face/N.png``.

Fixed cross-identity pairs (any format): a ``reference`` field on a line sets where the face embedding comes
from instead of the target's own image:

* ``"reference": {"id": "000777"}`` — the embedding of the line whose ``id`` is ``000777`` (same index);
* ``"reference": {"ids": ["000777", "000778"]}`` — one of them, chosen per draw (deterministic);
* ``"reference": {"embedding": {"file": "emb/x.npy", "row": 3}}`` — an embedding file (index rules).

Paths are relative to ``root`` (default: the index file's folder); absolute paths are kept.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from faceid.face.images import oriented_size
from faceid.files import resolve_path
from faceid.schema import EMBEDDING_DIM, caption_of, embedding_of, faceid6m_index_base, kps_of, person_of
from faceid.train.errors import TrainingInputError

FORMATS = ("auto", "index", "mfacetech", "seed", "faceid6m")


class BadDataError(TrainingInputError):
    """The start-up data check found bad items; the message names the first ones."""


@dataclass
class Record:
    """One training target, normalised from any index format."""

    key: str
    image: str
    caption: str = ""
    kps: list | None = None
    bbox: list | None = None
    width: int | None = None
    height: int | None = None
    person_id: str | None = None
    embedding: dict | None = None  # {"file": abs path, "row": int | None}
    reference: dict | None = None  # {"keys": [...]} or {"embedding": {...}}
    source: str = ""  # "file:line" for reports
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# Reading


def _emb_spec(value, root: str) -> dict | None:
    if value is None:
        return None
    if isinstance(value, dict):
        if "file" not in value:
            raise ValueError("embedding dict needs a 'file'")
        row = value.get("row")
        return {"file": resolve_path(root, str(value["file"])), "row": None if row is None else int(row)}
    if isinstance(value, str):
        return {"file": resolve_path(root, value), "row": None}
    raise ValueError(f"embedding must be a path or {{'file', 'row'}}, got {type(value).__name__}")


def detect_format(path: str) -> str:
    if os.path.isdir(path):
        return "faceid6m"
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "file_name" in obj:
                return "mfacetech"
            if "image" in obj and isinstance(obj.get("embedding"), dict):
                return "index"
            if "image_file" in obj:
                return "seed"
            if "image" in obj:
                return "index"
    raise BadDataError(f"{path}: cannot detect the index format (no readable line with image fields)")


def _record_from(obj: dict, fmt: str, root: str, source: str, fallback_key: str) -> Record:
    if not isinstance(obj, dict):
        raise ValueError("line is not a JSON object")
    if fmt == "mfacetech":
        image, emb = obj.get("file_name"), obj.get("insightface_feature_file")
    elif fmt == "seed":
        image, emb = obj.get("image_file") or obj.get("image"), embedding_of(obj)
    else:
        image, emb = (
            obj.get("image") or obj.get("image_file") or obj.get("file_name"),
            embedding_of(obj),
        )
    if not image:
        raise ValueError("no image field")
    if emb is None:
        raise ValueError("no embedding field")
    ref = obj.get("reference")
    reference = None
    if ref is not None:
        if isinstance(ref, str):
            reference = {"keys": [ref]}
        elif isinstance(ref, dict) and "id" in ref:
            reference = {"keys": [str(ref["id"])]}
        elif isinstance(ref, dict) and "ids" in ref and ref["ids"]:
            reference = {"keys": [str(k) for k in ref["ids"]]}
        elif isinstance(ref, dict) and "embedding" in ref:
            reference = {"embedding": _emb_spec(ref["embedding"], root)}
        else:
            raise ValueError("reference must be {'id'}, {'ids'} or {'embedding'}")
    person = person_of(obj)
    return Record(
        key=str(obj.get("id", fallback_key)),
        image=resolve_path(root, str(image)),
        caption=caption_of(obj),
        kps=kps_of(obj),
        bbox=obj.get("bbox"),
        width=obj.get("width"),
        height=obj.get("height"),
        person_id=person,
        embedding=_emb_spec(emb, root),
        reference=reference,
        source=source,
    )


def _faceid6m_files(path: str) -> list[tuple[str, str]]:
    """(jsonl path, folder holding N.png/N.npy) pairs for a FaceID-6M folder or one of its jsonl files."""
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "**", "*.jsonl"), recursive=True))
    else:
        files = [path]
    return [(f, os.path.dirname(os.path.abspath(f))) for f in files]


def read_records(
    path: str, fmt: str = "auto", root: str | None = None, person_from_folder: bool = False
) -> tuple[list[Record], list[tuple[str, str]]]:
    """Read an index into :class:`Record` objects. Returns ``(records, bad)`` where ``bad`` lists
    ``(source, reason)`` for lines that could not be parsed at all."""
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; choose from {FORMATS}")
    records: list[Record] = []
    bad: list[tuple[str, str]] = []
    if fmt == "faceid6m":
        for jsonl, folder in _faceid6m_files(path):
            base = faceid6m_index_base(folder)
            with open(jsonl, encoding="utf-8") as f:
                for n0, line in enumerate(f):
                    n = n0 + base
                    source = f"{jsonl}:{n0 + 1}"
                    try:
                        obj = json.loads(line)
                        obj = dict(obj) if isinstance(obj, dict) else obj
                        obj["image"] = os.path.join(folder, f"{n}.png")  # paths inside the jsonl are ignored
                        obj.setdefault("embedding", os.path.join(folder, f"{n}.npy"))
                        stem = os.path.splitext(os.path.basename(jsonl))[0]
                        rec = _record_from(obj, "index", folder, source, f"{stem}/{n}")
                        rec.extra["face_image"] = os.path.join(folder, "face", f"{n}.png")
                        records.append(rec)
                    except (ValueError, TypeError, json.JSONDecodeError) as exc:
                        bad.append((source, f"malformed line: {exc}"))
    else:
        root = root or os.path.dirname(os.path.abspath(path))
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f):
                if not line.strip():
                    continue
                source = f"{path}:{n + 1}"
                try:
                    records.append(_record_from(json.loads(line), fmt, root, source, f"{n}"))
                except (ValueError, TypeError, json.JSONDecodeError) as exc:
                    bad.append((source, f"malformed line: {exc}"))
    if person_from_folder:
        for r in records:
            r.person_id = os.path.basename(os.path.dirname(r.image))
    return records, bad


# ----------------------------------------------------------------------------------------------------------
# Embeddings


_TORCH_LOAD_LOCK = threading.Lock()


@functools.lru_cache(maxsize=64)
def _npy(path: str):
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _torch_load(path: str):
    import torch

    safe = [np.ndarray, np.dtype, np.dtypes.Float32DType, np.dtypes.Float64DType, np.dtypes.Float16DType]
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            safe.append(__import__(mod, fromlist=["_reconstruct"])._reconstruct)
            break
        except (ImportError, AttributeError):
            continue
    # safe_globals edits process-wide state on enter/exit: serialise it across the check's threads.
    with _TORCH_LOAD_LOCK, torch.serialization.safe_globals(safe):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        for k in ("embedding", "face_id_embed", "feature"):
            if k in obj:
                obj = obj[k]
                break
    if hasattr(obj, "detach"):
        obj = obj.detach().float().numpy()
    return np.asarray(obj)


def load_embedding(spec: dict) -> np.ndarray:
    """Read one ``[512]`` float32 embedding from an embedding spec."""
    path, row = spec["file"], spec.get("row")
    if path.endswith(".npy"):
        arr = _npy(path)
        arr = arr[row] if row is not None else arr
    elif path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            arr = z["embedding"] if "embedding" in z else z[z.files[0]]
        arr = arr[row] if row is not None else arr
    else:
        arr = _torch_load(path)
        arr = arr[row] if row is not None else arr
    arr = np.asarray(arr, dtype=np.float32).reshape(-1)
    if arr.shape[0] != EMBEDDING_DIM:
        raise ValueError(f"embedding has {arr.shape[0]} values, expected {EMBEDDING_DIM}")
    return np.array(arr, dtype=np.float32)


# ----------------------------------------------------------------------------------------------------------
# The start-up check


def _check_one(rec: Record, keys: set[str]) -> str | None:
    if not os.path.exists(rec.image):
        return f"image not found: {rec.image}"
    try:
        w, h = oriented_size(rec.image)
    except Exception as exc:  # noqa: BLE001 - any decoder error is a bad image
        return f"unreadable image {rec.image}: {exc}"
    if rec.width and rec.height and (int(rec.width), int(rec.height)) != (w, h):
        return f"index says {rec.width}x{rec.height} but {rec.image} is {w}x{h}"
    rec.width, rec.height = w, h
    if rec.kps is None:
        return "no keypoints (run get_face_info.py to build an index)"
    try:
        kps = np.asarray(rec.kps, dtype=np.float64)
    except (TypeError, ValueError):
        return "keypoints are not numbers"
    if kps.shape != (5, 2) or not np.isfinite(kps).all():
        return f"keypoints must be 5 finite (x, y) pairs, got shape {kps.shape}"
    if (kps[:, 0] < 0).any() or (kps[:, 0] > w).any() or (kps[:, 1] < 0).any() or (kps[:, 1] > h).any():
        return f"keypoints outside the {w}x{h} image"
    rec.kps = kps.tolist()
    specs = [rec.embedding]
    if rec.reference is not None:
        if "embedding" in rec.reference:
            specs.append(rec.reference["embedding"])
        else:
            missing = [k for k in rec.reference["keys"] if k not in keys]
            if missing:
                return f"reference id {missing[0]!r} is not in the index"
    for spec in specs:
        if not os.path.exists(spec["file"]):
            return f"embedding not found: {spec['file']}"
        try:
            emb = load_embedding(spec)
        except Exception as exc:  # noqa: BLE001
            return f"bad embedding {spec['file']}: {exc}"
        if not np.isfinite(emb).all():
            return f"embedding {spec['file']} has non-finite values"
    return None


def check_records(records: list[Record], num_threads: int = 8) -> list[tuple[Record, str]]:
    """Check every record (files exist, image readable, keypoints in frame, embedding 512 finite floats,
    references resolvable). Fills ``width``/``height``. Returns ``[(record, reason)]`` for bad ones."""
    keys = {r.key for r in records}
    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        reasons = list(pool.map(lambda r: _check_one(r, keys), records, chunksize=64))
    return [(r, why) for r, why in zip(records, reasons) if why is not None]


def format_report(bad: list[tuple[str, str]], total: int, limit: int = 10) -> str:
    lines = [f"{len(bad)} of {total} training items are bad:"]
    for source, why in bad[:limit]:
        lines.append(f"  {source}: {why}")
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more")
    return "\n".join(lines)


def load_checked_records(
    path: str,
    fmt: str = "auto",
    root: str | None = None,
    person_from_folder: bool = False,
    skip_bad: bool = False,
    num_threads: int = 8,
    logger=None,
) -> tuple[list[Record], list[tuple[str, str]]]:
    """Read and check an index. Raises :class:`BadDataError` with a report unless ``skip_bad``; then the bad
    items are dropped (also those whose fixed reference points at a dropped item) and listed."""
    records, bad = read_records(path, fmt, root, person_from_folder)
    total = len(records) + len(bad)
    seen: dict[str, Record] = {}
    for r in records:
        if r.key in seen:
            bad.append((r.source, f"duplicate id {r.key!r} (first at {seen[r.key].source})"))
        else:
            seen[r.key] = r
    dup_sources = {s for s, _ in bad}
    records = [r for r in records if r.source not in dup_sources]
    bad_records = check_records(records, num_threads)
    bad += [(r.source + f" ({r.key})", why) for r, why in bad_records]
    if bad and not skip_bad:
        raise BadDataError(format_report(bad, total) + "\nFix the index or pass --skip_bad_samples.")
    drop = {id(r) for r, _ in bad_records}
    good = [r for r in records if id(r) not in drop]
    keys = {r.key for r in good}
    kept = []
    for r in good:
        if r.reference and "keys" in r.reference:
            r.reference["keys"] = [k for k in r.reference["keys"] if k in keys]
            if not r.reference["keys"]:
                bad.append((r.source, "every fixed reference was dropped"))
                continue
        kept.append(r)
    if bad and logger is not None:
        logger.warning(format_report(bad, total) + f"\nSkipping them; training on {len(kept)} items.")
    if not kept:
        raise BadDataError(f"no usable training items in {path}")
    return kept, bad


# ----------------------------------------------------------------------------------------------------------
# Persons held out of training (validation during training, evaluation after it)


def held_out_persons(person_ids, count: int, seed: int = 0) -> list[str]:
    """The ``count`` persons to hold out, from the person id of every photo (``None``: no person): persons with
    at least two photos (a reference and others), ordered by a hash of (seed, person id), so the same index and
    seed always give the same persons whatever the line order. Raises ValueError when there are too few (at
    least two eligible persons, and one person must stay for training)."""
    import zlib

    photos: dict[str, int] = {}
    for p in person_ids:
        if p is not None:
            photos[str(p)] = photos.get(str(p), 0) + 1
    eligible = sorted(
        (p for p, n in photos.items() if n >= 2), key=lambda p: (zlib.crc32(f"{seed}:{p}".encode()), p)
    )
    if len(eligible) < max(count, 2) or len(eligible) == len(photos) == count:
        raise ValueError(f"the index has {len(eligible)} persons with two or more photos (person_id)")
    return eligible[:count]


def split_index_lines(lines, count: int, seed: int = 0) -> tuple[list, list]:
    """``(train, held_out)`` of an index's lines (dicts; other lines, e.g. raw strings, stay in train): the lines of
    the :func:`held_out_persons` (``count``, ``seed``). ValueError when the index has too few persons."""
    pid = [person_of(o) if isinstance(o, dict) else None for o in lines]
    held = set(held_out_persons(pid, count, seed))
    return [o for o, p in zip(lines, pid) if p not in held], [o for o, p in zip(lines, pid) if p in held]


def split_persons(records, count: int, seed: int = 0):
    """``(train, held_out)``: the photos of the :func:`held_out_persons` (``count``, ``seed``) of ``records``."""
    if count <= 0:
        return list(records), []
    try:
        held = set(held_out_persons((r.person_id for r in records), count, seed))
    except ValueError as exc:
        raise TrainingInputError(
            f"--validation_persons {count}: {exc}; hold out fewer persons, give --validation_index, add person "
            f"ids (mine_identities.py), or turn it off with --validation_persons 0 (the launcher's "
            f"VALIDATION_PERSONS=0)"
        ) from None
    return [r for r in records if str(r.person_id) not in held], [
        r for r in records if str(r.person_id) in held
    ]


# ----------------------------------------------------------------------------------------------------------
# Deterministic randomness and cross-identity references


def sample_rng(seed: int, epoch: int, index: int, salt: int = 0) -> np.random.Generator:
    """The generator for one draw of one item: the same (seed, epoch, index) always gives the same numbers,
    whichever worker or process draws it, so resuming reproduces the data exactly."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index), int(salt)])


class ReferencePicker:
    """Chooses whose embedding conditions a target.

    Fixed pairs (a record's ``reference``) always win. Otherwise, with ``cross_id`` and probability
    ``cross_id_prob``, another image of the same person is chosen uniformly; a person with one image uses
    their own.
    """

    def __init__(self, records: list[Record], cross_id: bool = False, cross_id_prob: float = 1.0):
        self.records = records
        self.cross_id = cross_id
        self.cross_id_prob = float(cross_id_prob)
        self.index_of = {r.key: i for i, r in enumerate(records)}
        groups: dict[str, list[int]] = OrderedDict()
        for i, r in enumerate(records):
            if r.person_id is not None:
                groups.setdefault(r.person_id, []).append(i)
        self.groups = groups

    def others(self, index: int) -> list[int]:
        pid = self.records[index].person_id
        if pid is None:
            return []
        return [j for j in self.groups.get(pid, ()) if j != index]

    def pick(self, index: int, rng: np.random.Generator) -> tuple[str, int | dict]:
        """``("index", j)`` (use record j's embedding) or ``("embedding", spec)``."""
        rec = self.records[index]
        if rec.reference is not None:
            if "embedding" in rec.reference:
                return "embedding", rec.reference["embedding"]
            keys = rec.reference["keys"]
            return "index", self.index_of[keys[int(rng.integers(len(keys)))] if len(keys) > 1 else keys[0]]
        if self.cross_id:
            others = self.others(index)
            if others and (self.cross_id_prob >= 1.0 or rng.random() < self.cross_id_prob):
                return "index", others[int(rng.integers(len(others)))]
        return "index", index


@dataclass
class Person:
    person_id: str
    reference: object  # Record: its embedding, keypoints and caption make the generation
    others: list = field(default_factory=list)  # the person's other photos (Records)


def group_persons(records, max_persons: int | None = None) -> list[Person]:
    """Persons with two or more photos in index order: the first photo is the reference."""
    groups: dict[str, list] = {}
    for r in records:
        if r.person_id is not None:
            groups.setdefault(str(r.person_id), []).append(r)
    persons = [Person(p, rs[0], rs[1:]) for p, rs in groups.items() if len(rs) >= 2]
    return persons[:max_persons] if max_persons else persons


def index_persons(path, data_format: str = "auto", holdout_persons: int = 0, holdout_seed: int = 0):
    """``(persons, photos_read, bad_lines)`` of an index in any training format: :func:`group_persons` of its
    records, only the :func:`held_out_persons` (``holdout_persons``, ``holdout_seed``) when that is > 0 (training's
    ``--validation_persons N --seed S`` holds out the same persons). ValueError/OSError on an unreadable index or
    too few persons. For the editability evaluation (evaluate.py passes it to faceid.eval.editability, which
    does not import training code)."""
    records, bad = read_records(os.fspath(path), data_format)
    if holdout_persons:
        try:
            held = set(held_out_persons((r.person_id for r in records), holdout_persons, holdout_seed))
        except ValueError as exc:
            raise ValueError(f"--holdout_persons {holdout_persons}: {exc}; hold out fewer") from None
        records = [r for r in records if str(r.person_id) in held]
    return group_persons(records), len(records), len(bad)
