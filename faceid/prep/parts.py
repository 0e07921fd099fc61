"""Crash-safe part files for dataset preprocessing, and the merge into one training index.

Layout under the output folder (the index's folder)::

    parts/config.json                    arguments that shape the output (a rerun must match)
    parts/w002-r00001-000007.jsonl       committed records of rank 1 of a 2-process run, 7th shard
    parts/w002-r00001-000007.npy         their embeddings, [N, 512] float32 (row = record["row"])
    parts/done-w002-r00001.json          rank finished marker
    index.jsonl, rejects.jsonl           merged (docs/design.md format)
    embeddings/shard-00000.npy           merged embeddings in index order

A shard is committed by writing its ``.npy`` then its ``.jsonl`` to temporary names, fsync'ing and renaming them
(the ``.jsonl`` rename is the commit point); part files are never modified afterwards. A kill at any moment loses
only the shard being filled; an orphan ``.npy`` without its ``.jsonl`` is overwritten by the next commit.

Within one (world, rank) stream, shards hold increasing item indices (items are processed in order and reruns
only add later-or-skipped ones), so the merge is a streaming k-way merge over streams, not an in-memory sort.
"""

from __future__ import annotations

import heapq
import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from faceid.errors import InputError
from faceid.schema import EMBEDDING_DIM
from ip_adapter.utils import atomic_path

PART_RE = re.compile(r"^w(\d+)-r(\d+)-(\d+)\.jsonl$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def durable_write(path: Path, write) -> None:
    """``write(fh)`` into a temp file beside ``path``, fsync, rename over ``path``, fsync the folder."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
    _fsync_dir(path.parent)


def jsonl_bytes(records) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def part_stem(world: int, rank: int, seq: int) -> str:
    return f"w{world:03d}-r{rank:05d}-{seq:06d}"


class PartStore:
    """The ``parts/`` folder of one output."""

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        self.dir = self.out_dir / "parts"

    def part_files(self) -> list[tuple[tuple[int, int, int], Path]]:
        if not self.dir.is_dir():
            return []
        out = []
        for p in self.dir.iterdir():
            m = PART_RE.match(p.name)
            if m:
                out.append(((int(m[1]), int(m[2]), int(m[3])), p))
        return sorted(out)

    @staticmethod
    def read_part(path: Path) -> Iterator[dict]:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield json.loads(line)

    def done_keys(self, seen_files: set | None = None, keys: set | None = None) -> set:
        """Keys of all committed records (incrementally: files in ``seen_files`` are not reread)."""
        keys = set() if keys is None else keys
        for _, p in self.part_files():
            if seen_files is not None:
                if p.name in seen_files:
                    continue
                seen_files.add(p.name)
            keys.update(r["key"] for r in self.read_part(p))
        return keys

    def next_seq(self, world: int, rank: int) -> int:
        seqs = [s for (w, r, s), _ in self.part_files() if (w, r) == (world, rank)]
        return max(seqs) + 1 if seqs else 0

    def commit(
        self, world: int, rank: int, seq: int, records: list[dict], embeddings: list[np.ndarray]
    ) -> None:
        stem = part_stem(world, rank, seq)
        if embeddings:
            arr = np.stack(embeddings).astype(np.float32).reshape(len(embeddings), -1)
            durable_write(self.dir / f"{stem}.npy", lambda fh: np.save(fh, arr))
        durable_write(self.dir / f"{stem}.jsonl", lambda fh: fh.write(jsonl_bytes(records)))

    # ----------------------------------------------------------------------------------- config and markers
    def check_config(self, config: dict) -> None:
        """Record the output-shaping arguments; refuse a rerun whose arguments differ."""
        path = self.dir / "config.json"
        config = json.loads(json.dumps(config))
        if path.exists():
            old = json.loads(path.read_text(encoding="utf-8"))
            if old != config:
                diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
                raise InputError(
                    f"{self.out_dir}: existing parts were made with different arguments ({', '.join(diff)}); "
                    f"rerun with the same arguments to resume, or use a fresh --output"
                )
            return
        durable_write(path, lambda fh: fh.write(json.dumps(config, indent=2, sort_keys=True).encode()))

    def marker(self, world: int, rank: int) -> Path:
        return self.dir / f"done-w{world:03d}-r{rank:05d}.json"


def _stream(store: PartStore, files: list[Path]) -> Iterator[tuple[int, str, dict, Path]]:
    last = -1
    for p in files:
        for r in store.read_part(p):
            i = int(r["i"])
            if i < last:
                raise RuntimeError(f"{p}: item {i} after {last}; part files were mixed from different runs")
            last = i
            yield i, r["key"], r, p


def merged_records(store: PartStore) -> Iterator[tuple[dict, Path]]:
    """All committed records in item order, each key once."""
    streams: dict[tuple[int, int], list[Path]] = {}
    for (w, r, _), p in store.part_files():
        streams.setdefault((w, r), []).append(p)
    merged = heapq.merge(*(_stream(store, files) for files in streams.values()), key=lambda t: (t[0], t[1]))
    cur_i, cur_keys = None, set()
    for i, key, rec, path in merged:
        if i != cur_i:
            cur_i, cur_keys = i, set()
        if key in cur_keys:
            continue
        cur_keys.add(key)
        yield rec, path


def merge(
    out_dir: str | os.PathLike,
    index_name: str = "index.jsonl",
    rejects_name: str = "rejects.jsonl",
    shard_rows: int = 50_000,
) -> dict:
    """Write ``index.jsonl``, ``rejects.jsonl`` and ``embeddings/shard-*.npy`` from the committed parts.

    Deterministic: the same parts (whatever the interruptions and world sizes) give identical files. Returns
    ``{"ok": n, "rejected": m, "reasons": {reason: count}}``."""
    out_dir = Path(out_dir)
    store = PartStore(out_dir)
    emb_dir = out_dir / "embeddings"
    index_tmp = out_dir / f".{index_name}.merge.tmp"
    rejects_tmp = out_dir / f".{rejects_name}.merge.tmp"
    reasons: Counter = Counter()
    n_ok = 0
    buf = np.zeros((shard_rows, EMBEDDING_DIM), np.float32)
    fill, shard = 0, 0
    cache: dict[Path, np.ndarray] = {}

    def flush():
        nonlocal fill, shard
        if fill:
            data = buf[:fill].copy()
            durable_write(emb_dir / f"shard-{shard:05d}.npy", lambda fh: np.save(fh, data))
            shard += 1
            fill = 0

    with open(index_tmp, "w", encoding="utf-8") as idx, open(rejects_tmp, "w", encoding="utf-8") as rej:
        for rec, path in merged_records(store):
            if rec["status"] != "ok":
                reasons[rec["reason"]] += 1
                out = {k: v for k, v in rec.items() if k not in ("status", "i", "key")}
                rej.write(json.dumps({"id": rec["key"], **out}, ensure_ascii=False) + "\n")
                continue
            out = {
                "id": rec["key"],
                **{k: v for k, v in rec.items() if k not in ("status", "i", "key", "row")},
            }
            if "row" in rec:  # embedding lives in the part's .npy: copy it into the merged shard
                npy = path.with_suffix(".npy")
                if npy not in cache:
                    if len(cache) >= 64:  # streams advance file by file: a few open maps suffice
                        cache.pop(next(iter(cache)))
                    cache[npy] = np.load(npy, mmap_mode="r")
                buf[fill] = cache[npy][int(rec["row"])]
                out["embedding"] = {"file": f"embeddings/shard-{shard:05d}.npy", "row": fill}
                fill += 1
                if fill == shard_rows:
                    flush()
            idx.write(json.dumps(out, ensure_ascii=False) + "\n")
            n_ok += 1
        flush()
        for fh in (idx, rej):
            fh.flush()
            os.fsync(fh.fileno())
    cache.clear()
    # Drop stale shards from an earlier, larger merge, then commit the index (the commit point) and rejects.
    for p in emb_dir.glob("shard-*.npy") if emb_dir.is_dir() else []:
        m = re.match(r"shard-(\d+)\.npy$", p.name)
        if m and int(m[1]) >= shard:
            p.unlink()
    os.replace(rejects_tmp, out_dir / rejects_name)
    os.replace(index_tmp, out_dir / index_name)
    _fsync_dir(out_dir)
    return {"ok": n_ok, "rejected": sum(reasons.values()), "reasons": dict(sorted(reasons.items()))}
