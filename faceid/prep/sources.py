"""Readers of the dataset layouts we preprocess (and train from): one :class:`SourceItem` per image.

* :func:`iter_folder` — a folder of images, recursive, sorted; optional ``<stem>.txt`` caption next to an image;
  ``person_from_folder`` takes the person id from the sub-folder (path relative to the root).
* :func:`iter_jsonl` — a JSONL index (or a JSON list): MFaceTech records (``file_name``, ``additional_feature``
  = caption, ``bbox``, ``landmarks``, ``insightface_feature_file``), seed-repo records (``image_file``, ``text``),
  or ``image``/``caption``. Relative image paths resolve against ``image_root`` (default: the index's folder).
* :func:`iter_faceid6m` — an extracted FaceID-6M / FaceID-70K folder: line N of its ``.jsonl`` is image ``N.png``
  (with ``N.npy`` and ``face/N.png`` beside it); the paths written inside the jsonl are ignored.
* :func:`iter_parquet` — the Hub's parquet layout (what ``datasets`` writes and the Hub converts datasets to): one
  or more ``.parquet`` files (a folder is searched 3 levels deep, e.g. ``data/train-00000-of-00004.parquet``) with an
  image column (``{"bytes", "path"}`` structs, or plain binary) and metadata columns (caption, person...). Items
  carry the encoded image bytes (:attr:`SourceItem.data`); preprocessing writes accepted ones under ``OUT/images/``.
* :func:`iter_imagefolder` — the ``imagefolder`` layout: images with a ``metadata.jsonl`` or ``metadata.csv`` (in the
  root or any sub-folder, e.g. ``train/metadata.csv``) whose ``file_name`` column names each image relative to the
  metadata file; other columns are metadata (``text``/``caption``, a person column...).

The person of an item comes, in this order, from ``person_column`` (any reader with columns), the index's own person
field (``person_id``, ``identity``...), ``person_pattern`` (a regular expression searched in the item's file name /
relative path: its group ``person``, or group 1, or the whole match), or ``person_from_folder`` (the parent folder).

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
    data: bytes | None = None  # encoded image bytes (parquet sources), instead of a file
    name: str | None = None  # file name / relative path as the source writes it (person patterns, suffix)


class SourceError(ValueError):
    """The dataset cannot be read at all (not found, not parquet, no image column...); the message says why."""


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


def iter_jsonl(
    path: str | os.PathLike, image_root: str | os.PathLike | None = None, person_column: str | None = None
) -> Iterator[SourceItem]:
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
                item.image, item.name = resolve_path(base, image), image
            _fill(item, rec, person_column)
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


PARQUET_IMAGE_COLUMNS = ("image", "img", "jpg", "png", "picture", "face_image")
METADATA_NAMES = ("metadata.jsonl", "metadata.csv")


# Hub layouts keep parquet / metadata files at most this deep (``data/x.parquet``, ``config/split/x.parquet``,
# ``train/metadata.csv``); not walking deeper keeps detection fast on folders of millions of images.
LAYOUT_DEPTH = 3


def _shallow(root: Path, name: str) -> list[Path]:
    found = []
    for depth in range(LAYOUT_DEPTH):
        found += root.glob("/".join(["*"] * depth + [name]))
    return sorted(
        p for p in found if p.is_file() and not any(x.startswith(".") for x in p.relative_to(root).parts)
    )


def parquet_files(path: str | os.PathLike) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    return _shallow(path, "*.parquet")


def _image_column(schema, wanted: str | None, where: str) -> str:
    import pyarrow as pa

    names = schema.names
    if wanted:
        if wanted not in names:
            raise SourceError(f"{where}: no column {wanted!r} (columns: {', '.join(names)})")
        return wanted
    for name in PARQUET_IMAGE_COLUMNS:
        if name in names:
            return name
    for field_ in schema:  # the datasets Image feature: struct<bytes: binary, path: string>
        t = field_.type
        if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
            return field_.name
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return field_.name
    raise SourceError(f"{where}: no image column (one of {', '.join(PARQUET_IMAGE_COLUMNS)}, or a bytes column); "
                      f"columns: {', '.join(names)}; pass --image_column")  # fmt: skip


def check_parquet(path: str | os.PathLike, image_column: str | None = None) -> list[Path]:
    """The parquet files of ``path``, each opened and its image column found: a missing, empty or corrupt file is a
    :class:`SourceError` naming it, before any work starts."""
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - pyarrow is a requirement
        raise SourceError("reading parquet needs pyarrow: pip install pyarrow") from exc
    files = parquet_files(path)
    if not files:
        raise SourceError(f"{path}: no .parquet files found")
    for f in files:
        try:
            schema = pq.ParquetFile(f).schema_arrow
        except Exception as exc:  # noqa: BLE001 - ArrowInvalid, OSError...: not a readable parquet file
            raise SourceError(f"{f}: not a readable parquet file ({type(exc).__name__}: {exc})") from None
        _image_column(schema, image_column, str(f))
    return files


def _row_image(value) -> tuple[bytes | None, str | None]:
    if isinstance(value, dict):
        return value.get("bytes"), value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), None
    if isinstance(value, str):
        return None, value
    return None, None


def iter_parquet(
    path: str | os.PathLike,
    image_column: str | None = None,
    person_column: str | None = None,
    batch_rows: int = 64,
) -> Iterator[SourceItem]:
    """Rows of the parquet files of ``path`` (sorted); key ``<file relative to the root>:<row>``. A row group that
    cannot be decoded becomes one ``malformed_line`` item per row, and the rest is read."""
    import pyarrow.parquet as pq

    root = Path(path) if Path(path).is_dir() else Path(path).parent
    index = 0
    for f in check_parquet(path, image_column):
        rel = f.relative_to(root).as_posix()
        pf = pq.ParquetFile(f)
        col = _image_column(pf.schema_arrow, image_column, str(f))
        row = 0
        for g in range(pf.num_row_groups):
            n_rows = pf.metadata.row_group(g).num_rows
            try:
                table = pf.read_row_group(g)
            except Exception as exc:  # noqa: BLE001
                for r in range(n_rows):
                    yield SourceItem(index=index, key=f"{rel}:{row + r}", image=None, line=row + r + 1,
                                     error=f"malformed_line: {rel} row group {g}: {type(exc).__name__}: {exc}")  # fmt: skip
                    index += 1
                row += n_rows
                continue
            for batch in table.to_batches(max_chunksize=batch_rows):
                for rec in batch.to_pylist():
                    data, name = _row_image(rec.pop(col, None))
                    item = SourceItem(index=index, key=f"{rel}:{row}", image=None, line=row + 1, name=name)
                    if data:
                        item.data = data
                    elif name and (root / name).is_file():
                        item.image = str(root / name)
                    else:
                        item.error = f"missing_field: {rel} row {row}: no image bytes in column {col!r}"
                    _fill(item, rec, person_column)
                    yield item
                    index += 1
                    row += 1


def _fill(item: SourceItem, rec: dict, person_column: str | None) -> None:
    item.caption = caption_of(rec)
    person = rec.get(person_column) if person_column else person_of(rec)
    item.person_id = None if person is None or person == "" else str(person)
    for k in ("bbox", "landmarks", "insightface_feature_file"):
        if k in rec:
            item.extra[k] = rec[k]


def _metadata_rows(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    if path.suffix == ".csv":
        import csv

        with open(path, encoding="utf-8", errors="replace", newline="") as fh:
            for n, rec in enumerate(csv.DictReader(fh), 2):  # line 1 is the header
                yield n, rec, None
        return
    for n, line in _read_lines(path):
        if line.strip():
            rec, err = _parse(line, n, path)
            yield n, rec, err


def metadata_files(root: str | os.PathLike) -> list[Path]:
    root = Path(root)
    return sorted(p for name in METADATA_NAMES for p in _shallow(root, name))


def iter_imagefolder(root: str | os.PathLike, person_column: str | None = None) -> Iterator[SourceItem]:
    """Images listed in the ``metadata.jsonl`` / ``metadata.csv`` files under ``root``; key = the image's path
    relative to ``root``. A row without ``file_name`` is a ``missing_field`` item."""
    root = Path(root)
    if root.is_file():  # the metadata file itself
        files, root = [root], root.parent
    else:
        files = metadata_files(root)
    if not files:
        raise SourceError(f"{root}: no metadata.jsonl / metadata.csv (the imagefolder layout)")
    index = 0
    for meta in files:
        base = meta.parent
        rel_meta = meta.relative_to(root).as_posix()
        for n, rec, err in _metadata_rows(meta):
            item = SourceItem(index=index, key=f"{rel_meta}:{n}", image=None, line=n, error=err)
            index += 1
            if rec is not None:
                name = rec.get("file_name")
                if not name:
                    item.error = f"missing_field: {rel_meta}:{n}: no file_name"
                else:
                    path = base / str(name)
                    item.key = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
                    item.image, item.name = str(path), item.key
                _fill(item, rec, person_column)
            yield item


def detect_kind(path: str | os.PathLike) -> str:
    """``"parquet"`` for a .parquet file or a folder of them (no images), ``"imagefolder"`` for a metadata file or a
    folder holding ``metadata.jsonl``/``metadata.csv``, ``"jsonl"`` for another file, ``"faceid6m"`` for a folder
    holding one .jsonl and numbered .png files, else ``"folder"``."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".parquet":
            return "parquet"
        if path.name in METADATA_NAMES:
            return "imagefolder"
        return "jsonl"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: input not found")
    if metadata_files(path):
        return "imagefolder"
    if parquet_files(path) and not any(p.suffix.lower() in IMAGE_EXTS for p in path.iterdir()):
        return "parquet"
    if len(list(path.glob("*.jsonl"))) == 1 and any(
        re.fullmatch(r"\d+\.png", p.name) for p in path.iterdir()
    ):
        return "faceid6m"
    return "folder"


KINDS = ("auto", "folder", "jsonl", "faceid6m", "parquet", "imagefolder")


def person_from_name(name: str | None, pattern: re.Pattern) -> str | None:
    """The person a file name / relative path names: ``pattern``'s group ``person``, else group 1, else the match."""
    if not name:
        return None
    m = pattern.search(name)
    if not m:
        return None
    if "person" in m.re.groupindex:
        return m.group("person")
    return m.group(1) if m.re.groups else m.group(0)


def iter_source_items(
    path: str | os.PathLike,
    kind: str = "auto",
    image_root: str | os.PathLike | None = None,
    person_from_folder: bool = False,
    index_base: int | None = None,
    person_column: str | None = None,
    person_pattern: str | None = None,
    image_column: str | None = None,
) -> Iterator[SourceItem]:
    """Items of any supported source (``kind``: see :data:`KINDS`), with the person rules of the module doc."""
    kind = detect_kind(path) if kind == "auto" else kind
    if kind == "folder":
        items = iter_folder(path, person_from_folder=person_from_folder)
    elif kind == "jsonl":
        items = iter_jsonl(path, image_root=image_root, person_column=person_column)
    elif kind == "faceid6m":
        p = Path(path)
        items = iter_faceid6m(
            p.parent if p.is_file() else p, jsonl=p if p.is_file() else None, index_base=index_base
        )
    elif kind == "parquet":
        items = iter_parquet(path, image_column=image_column, person_column=person_column)
    elif kind == "imagefolder":
        items = iter_imagefolder(path, person_column=person_column)
    else:
        raise ValueError(f"unknown source kind {kind!r} ({', '.join(KINDS[1:])})")
    if kind == "parquet":
        check_parquet(path, image_column)  # fail before the first item, not inside the run
    if not (person_pattern or (person_from_folder and kind != "folder")):
        return items
    pattern = re.compile(person_pattern) if person_pattern else None
    return _with_persons(items, pattern, person_from_folder)


def _with_persons(items, pattern, from_folder: bool) -> Iterator[SourceItem]:
    for item in items:
        name = item.name or item.key
        if item.person_id is None and pattern is not None:
            item.person_id = person_from_name(name, pattern)
        if item.person_id is None and from_folder and "/" in (name or ""):
            item.person_id = name.rsplit("/", 1)[0]
        yield item
