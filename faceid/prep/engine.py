"""Dataset preprocessing engine behind ``get_face_info.py``: sharded, resumable, crash-safe.

Each process (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` from torchrun or ``accelerate launch``) takes items
``index % world == rank`` of the source, skips those already committed in ``parts/`` (by stable key), decodes images
in a thread pool ahead of the detector, recognises faces in batches, and commits shards with
:class:`faceid.prep.parts.PartStore`. Rank 0 then waits for every item to be committed and merges one index + rejects
file (:func:`faceid.prep.parts.merge`). Every item ends either in the index or in the rejects with a reason code:

``missing_file, empty_file, not_image, corrupt_image, too_large, too_small, no_face, too_many_faces,
face_too_small, malformed_line, missing_field, analysis_error``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sys
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from faceid.errors import InputError
from faceid.face.images import MAX_PIXELS, ImageLoadError, enable_arrow, load_image, to_bgr
from faceid.prep.parts import PartStore, durable_write, merge
from faceid.prep.sources import SourceItem, iter_source_items


@dataclass
class Filters:
    max_faces: int | None = None  # reject images with more faces
    min_face_ratio: float | None = None  # reject when the chosen face's bbox is a smaller share of the image
    min_side: int | None = None  # reject images whose shorter side is smaller (pixels)


# FaceID-6M's filtering: at most 3 faces, face at least 4% of the image, low resolution removed.
FACEID6M_FILTERS = Filters(max_faces=3, min_face_ratio=0.04, min_side=256)


def dist_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the launcher's environment (1 process when unset)."""
    rank = int(os.environ.get("RANK", "0") or 0)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    local = int(os.environ.get("LOCAL_RANK", str(rank)) or 0)
    if not 0 <= rank < world:
        raise InputError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world, local


_LOAD_REASONS = (
    ("file not found", "missing_file"),
    ("empty file", "empty_file"),
    ("pixel limit", "too_large"),
    ("too large", "too_large"),
    ("not an image", "not_image"),
)


def classify_load_error(message: str) -> str:
    for needle, code in _LOAD_REASONS:
        if needle in message:
            return code
    return "corrupt_image"


def _rel(path: str, base: Path) -> str:
    try:
        return Path(os.path.relpath(os.path.abspath(path), base)).as_posix()
    except ValueError:  # other drive (Windows)
        return os.path.abspath(path)


def _safe_name(key: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", key)[-80:].strip("._") or "item"
    return f"{stem}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def _suffix(item: SourceItem) -> str:
    """The stored file's suffix: from the row's own file name, else sniffed from the bytes."""
    from faceid.prep.sources import IMAGE_EXTS

    ext = os.path.splitext(item.name or "")[1].lower()
    if ext in IMAGE_EXTS:
        return ext
    head = (item.data or b"")[:16]
    for magic, ext in (
        (b"\x89PNG", ".png"),
        (b"\xff\xd8", ".jpg"),
        (b"RIFF", ".webp"),
        (b"GIF8", ".gif"),
        (b"BM", ".bmp"),
    ):
        if head.startswith(magic):
            return ext
    return ".img"


@dataclass
class Loaded:
    item: SourceItem
    bgr: np.ndarray | None = None
    size: tuple[int, int] = (0, 0)
    reason: str | None = None
    detail: str = ""
    prepared: object = None  # FaceAnalyzer.prepare result (or the exception it raised)


def load_item(item: SourceItem, filters: Filters, max_pixels: int, analyzer=None) -> Loaded:
    """Decode one item and, with ``analyzer``, detect and align its face (runs in the worker threads); a failure
    becomes a reject reason, never an exception."""
    if item.error:
        code, _, detail = item.error.partition(": ")
        return Loaded(item, reason=code, detail=detail or item.error)
    if not item.image and item.data is None:
        return Loaded(item, reason="missing_field", detail="no image path")
    try:
        src = item.image if item.data is None else item.data
        img = load_image(src, max_pixels=max_pixels, name=item.key if item.data is not None else None)
    except ImageLoadError as exc:
        return Loaded(item, reason=classify_load_error(str(exc)), detail=str(exc))
    except Exception as exc:  # anything PIL/numpy can throw on hostile files
        return Loaded(item, reason="corrupt_image", detail=f"{item.image}: {type(exc).__name__}: {exc}")
    w, h = img.size
    if filters.min_side and min(w, h) < filters.min_side:
        return Loaded(item, size=(w, h), reason="too_small", detail=f"{w}x{h} < min side {filters.min_side}")
    loaded = Loaded(item, bgr=to_bgr(img), size=(w, h))
    if isinstance(analyzer, Future):
        # models still loading: the main thread prepares this one, decoding goes on
        analyzer = analyzer.result() if analyzer.done() else None
    if analyzer is not None:
        try:
            loaded.prepared = analyzer.prepare(loaded.bgr)
        except Exception as exc:
            loaded.prepared = exc
        loaded.bgr = None  # only the 112x112 crop is kept
    return loaded


def ready(analyzer):
    """The analyzer, waiting for it where it is still loading (a ``Future``: the sessions of the real pack take
    seconds to build, time the first images spend decoding)."""
    return analyzer.result() if isinstance(analyzer, Future) else analyzer


class RankRunner:
    """Process this rank's share of the items and commit it in shards. ``analyzer``: a
    :class:`faceid.face.analysis.FaceAnalyzer` or a ``Future`` of one."""

    def __init__(
        self,
        analyzer,
        out_dir: str | os.PathLike,
        rank: int = 0,
        world: int = 1,
        filters: Filters | None = None,
        shard_size: int = 1000,
        flush_seconds: float = 120.0,
        batch_size: int = 16,
        num_workers: int = 4,
        max_pixels: int = MAX_PIXELS,
        per_image_npy: bool = False,
        progress: bool = True,
    ):
        self.analyzer = analyzer
        self.out_dir = Path(out_dir)
        self.store = PartStore(self.out_dir)
        self.rank, self.world = rank, world
        self.filters = filters or Filters()
        self.shard_size = max(1, shard_size)
        self.flush_seconds = flush_seconds
        self.batch_size = max(1, batch_size)
        self.num_workers = max(1, num_workers)
        self.max_pixels = max_pixels
        self.per_image_npy = per_image_npy
        self.progress = progress
        self.records: list[dict] = []
        self.embs: list[np.ndarray] = []
        self.counts: Counter = Counter()
        self.seq = self.store.next_seq(world, rank)
        self.last_commit = time.monotonic()
        enable_arrow()  # RGB→BGR from PIL's storage without a copy (faceid.face.images.to_bgr)

    # ------------------------------------------------------------------------------------------ records
    def _base(self, item: SourceItem) -> dict:
        rec = {"key": item.key, "i": item.index}
        if item.image:
            rec["image"] = _rel(item.image, self.out_dir)
        if item.line is not None:
            rec["line"] = item.line
        return rec

    def _reject(self, ld: Loaded, reason: str, detail: str) -> None:
        rec = {**self._base(ld.item), "status": "reject", "reason": reason, "detail": detail}
        if ld.size != (0, 0):
            rec["width"], rec["height"] = ld.size
        self.records.append(rec)
        self.counts[reason] += 1

    def _accept(self, ld: Loaded, res) -> None:
        item = ld.item
        rec = {**self._base(item), "status": "ok", "caption": item.caption}
        rec["width"], rec["height"] = res.frame
        rec["bbox"] = [round(float(v), 3) for v in res.bbox]
        rec["kps"] = [[round(float(x), 3), round(float(y), 3)] for x, y in res.kps]
        rec["det_score"] = round(float(res.det_score), 5)
        rec["num_faces"] = int(res.num_faces)
        rec["face_ratio"] = round(res.face_area_ratio, 5)
        rec["person_id"] = item.person_id
        if "face_image" in item.extra:
            rec["face_image"] = _rel(item.extra["face_image"], self.out_dir)
        if item.data is not None:  # image bytes from a parquet row: written once, where training reads it
            rel = f"images/{_safe_name(item.key)}{_suffix(item)}"
            data = item.data
            durable_write(self.out_dir / rel, lambda fh: fh.write(data))
            rec["image"] = rel
            item.data = None
        if self.per_image_npy:
            rel = f"embeddings/per_image/{_safe_name(item.key)}.npy"
            emb = res.embedding.astype(np.float32)
            durable_write(self.out_dir / rel, lambda fh: np.save(fh, emb))
            rec["embedding"] = {"file": rel}
        else:
            rec["row"] = len(self.embs)
            self.embs.append(res.embedding.astype(np.float32))
        self.records.append(rec)
        self.counts["ok"] += 1

    def commit(self) -> None:
        if self.records:
            self.store.commit(self.world, self.rank, self.seq, self.records, self.embs)
            self.seq += 1
        self.records, self.embs = [], []
        self.last_commit = time.monotonic()

    # ------------------------------------------------------------------------------------------ analysis
    def _analyze(self, batch: list[Loaded]) -> None:
        self.analyzer = ready(self.analyzer)  # (a model that failed to load stops the run here, by its error)
        good = [ld for ld in batch if ld.reason is None]
        todo = [
            ld for ld in good if ld.prepared is None
        ]  # not prepared in the worker (no analyzer given there)
        for ld in todo:
            try:
                ld.prepared = self.analyzer.prepare(ld.bgr)
            except Exception as exc:
                ld.prepared = exc
        prepared = [ld.prepared for ld in good if not isinstance(ld.prepared, Exception)]
        try:
            finished = iter(self.analyzer.finish(prepared))
            results = [ld.prepared if isinstance(ld.prepared, Exception) else next(finished) for ld in good]
        except Exception as exc:  # recognition failed for the batch: report it on each item
            results = [exc for _ in good]
        res_of = {id(ld): r for ld, r in zip(good, results)}
        f = self.filters
        for ld in batch:  # keep item order
            if ld.reason is not None:
                self._reject(ld, ld.reason, ld.detail)
                continue
            res = res_of[id(ld)]
            ld.bgr = None
            if isinstance(res, Exception):
                self._reject(ld, "analysis_error", f"{type(res).__name__}: {res}")
            elif not res:
                self._reject(ld, "no_face", res.reason)
            elif f.max_faces is not None and res.num_faces > f.max_faces:
                self._reject(ld, "too_many_faces", f"{res.num_faces} faces > max {f.max_faces}")
            elif f.min_face_ratio is not None and res.face_area_ratio < f.min_face_ratio:
                self._reject(
                    ld,
                    "face_too_small",
                    f"face is {res.face_area_ratio:.2%} of the image < {f.min_face_ratio:.2%}",
                )
            else:
                self._accept(ld, res)
        if len(self.records) >= self.shard_size or time.monotonic() - self.last_commit >= self.flush_seconds:
            self.commit()

    def run(self, items, done: set) -> Counter:
        """Process ``items`` (an iterable of :class:`SourceItem`) that belong to this rank and are not ``done``."""
        from tqdm import tqdm

        mine = (it for it in items if it.index % self.world == self.rank and it.key not in done)
        bar = tqdm(
            desc=f"rank {self.rank}/{self.world}",
            unit="img",
            disable=not self.progress,
            position=self.rank if self.world > 1 else None,
            mininterval=1.0,
            smoothing=0.1,
        )
        prefetch = max(2 * self.batch_size, 4 * self.num_workers)
        old_term = signal.getsignal(signal.SIGTERM)
        if self._main_thread():
            signal.signal(signal.SIGTERM, _raise_interrupt)
        t0 = time.monotonic()
        try:
            with ThreadPoolExecutor(self.num_workers, thread_name_prefix="decode") as pool:
                pending: deque = deque()
                batch: list[Loaded] = []
                for item in mine:
                    pending.append(pool.submit(load_item, item, self.filters, self.max_pixels, self.analyzer))
                    while len(pending) >= prefetch:
                        batch.append(pending.popleft().result())
                        if len(batch) >= self.batch_size:
                            self._analyze(batch)
                            bar.update(len(batch))
                            batch = []
                while pending:
                    batch.append(pending.popleft().result())
                    if len(batch) >= self.batch_size or not pending:
                        self._analyze(batch)
                        bar.update(len(batch))
                        batch = []
            self.analyzer = ready(self.analyzer)  # (no items: still report a model that failed to load)
        finally:
            self.commit()  # completed items survive Ctrl-C / SIGTERM
            bar.close()
            if self._main_thread():
                signal.signal(signal.SIGTERM, old_term)
        self.elapsed = time.monotonic() - t0
        return self.counts

    @staticmethod
    def _main_thread() -> bool:
        import threading

        return threading.current_thread() is threading.main_thread()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def wait_and_merge(
    store: PartStore, all_keys: set, world: int, started: float, timeout: float, poll: float = 2.0, **merge_kw
) -> dict | None:
    """Rank 0: wait until every key is committed (or every rank reported done and some are still missing, or the
    timeout passes), then merge. Returns the merge summary, or ``None`` with a message when items are missing."""
    seen: set = set()
    done: set = set()
    deadline = time.monotonic() + timeout
    while True:
        store.done_keys(seen, done)
        missing = len(all_keys - done)
        if not missing:
            return merge(store.out_dir, **merge_kw)
        markers = [store.marker(world, r) for r in range(world)]
        finished = all(m.exists() and m.stat().st_mtime >= started - 1 for m in markers)
        if finished or time.monotonic() > deadline:
            print(
                f"[get_face_info] {missing} item(s) are not committed yet (a rank stopped early?); "
                f"rerun the same command to finish them, or --merge_only to merge what is there",
                file=sys.stderr,
            )
            return None
        time.sleep(poll)


def write_marker(store: PartStore, world: int, rank: int, counts: Counter) -> None:
    data = json.dumps({"rank": rank, "world": world, "counts": dict(counts)}).encode()
    durable_write(store.marker(world, rank), lambda fh: fh.write(data))


def run_config(args, filters: Filters) -> dict:
    """The arguments that shape the output; a resumed run must use the same."""
    return {
        "input": os.path.abspath(args.input),
        "source_kind": args.source_kind,
        "image_root": os.path.abspath(args.image_root) if args.image_root else None,
        "person_from_folder": bool(args.person_from_folder),
        "faceid6m_index_base": args.faceid6m_index_base,
        "filters": asdict(filters),
        "det_size": args.det_size,
        "retry_sizes": args.retry_sizes,
        "det_thresh": args.det_thresh,
        "max_pixels": args.max_pixels,
        "per_image_npy": bool(args.per_image_npy),
        # only when set, so that runs started before these options existed still resume
        **{
            k: getattr(args, k)
            for k in ("person_column", "person_pattern", "image_column")
            if getattr(args, k, None)
        },
    }


def source_items(args):
    return iter_source_items(
        args.input,
        kind=args.source_kind,
        image_root=args.image_root,
        person_from_folder=args.person_from_folder,
        index_base=args.faceid6m_index_base,
        person_column=getattr(args, "person_column", None),
        person_pattern=getattr(args, "person_pattern", None),
        image_column=getattr(args, "image_column", None),
    )


def format_summary(summary: dict) -> str:
    lines = [f"accepted: {summary['ok']}", f"rejected: {summary['rejected']}"]
    lines += [f"  {reason}: {n}" for reason, n in summary["reasons"].items()]
    return "\n".join(lines)
