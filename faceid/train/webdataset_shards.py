"""WebDataset-format tar shards for FaceID-6M-scale training: a converter from any checked index and a
streaming reader split across ranks and DataLoader workers (plain ``tarfile``; the ``webdataset`` package is
not needed, but the shards are ordinary WebDataset tars it can read).

One sample = members sharing a key ``NNNNNNNNN``:

* ``KEY.jpg|png|webp`` — the image, original bytes when they already decode to what ``load_image`` gives
  (8-bit RGB, no EXIF rotation), else re-encoded as PNG from ``load_image``;
* ``KEY.json`` — ``id``, ``caption``, ``kps`` (image frame), ``bbox``, ``width``, ``height``, ``person_id``,
  ``ref_kind`` (``"fixed"``, ``"cross"`` or ``null``) and ``ref_ids`` (global sample numbers of the refs);
* ``KEY.emb.npy`` — the image's own ``[512]`` float32 embedding;
* ``KEY.refs.npy`` — ``[K, 512]`` reference embeddings: the fixed pair(s), or up to ``max_refs`` other images
  of the same person (cross-identity without random access to the whole index).

``shards.json`` lists the shards and their sample counts. Shards are dealt to ranks ``shard_i % world`` (fixed,
so every rank has a fixed number of batches: the minimum over ranks), each rank's shards and their samples are
shuffled per ``(seed, epoch)``, and batch ``r`` of a rank goes to worker ``r % num_workers`` — the DataLoader's
round-robin then yields batches in order, so resuming at batch k is exact.

    python -m faceid.train.webdataset_shards --data_json_file index.jsonl --out shards/ --samples_per_shard 1000
    # then optionally: --upload 'pipe:aws s3 cp - s3://bucket/shards/{}' --no_keep_local

Shards can be read from object storage or a web server (``shard_io.py``: URLs, ``pipe:``, brace ranges) as
streams (``shard_streams.py``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from faceid.face.images import enable_arrow, exif_orientation, load_image
from faceid.files import atomic_path, write_json_atomic
from faceid.train import shard_io
from faceid.train import shard_streams as streams
from faceid.train.dataset import SALT_CROP, SALT_DROP, SALT_REF, collate
from faceid.train.records import Record, load_embedding, sample_rng
from faceid.train.shard_io import FORMAT, MANIFEST
from faceid.train.transforms import (
    apply_image,
    cfg_drop,
    kps_image,
    plan_crop,
    to_chw_uint8,
    tokenize,
    transform_kps,
)

# ----------------------------------------------------------------------------------------------------------
# Writing


def _image_bytes(path: str) -> tuple[bytes, str]:
    with Image.open(path) as img:
        fmt = (img.format or "").upper()
        clean = img.mode == "RGB" and exif_orientation(img) == 1
    if clean and fmt in ("JPEG", "PNG", "WEBP"):
        return Path(path).read_bytes(), {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
    buf = io.BytesIO()
    load_image(path).save(buf, format="PNG")
    return buf.getvalue(), "png"


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def _refs_for(i: int, records: list[Record], groups: dict, index_of: dict, max_refs: int, seed: int):
    rec = records[i]
    if rec.reference is not None:
        if "embedding" in rec.reference:
            return "fixed", [], [load_embedding(rec.reference["embedding"])]
        ids = [index_of[k] for k in rec.reference["keys"]]
        return "fixed", ids, [load_embedding(records[j].embedding) for j in ids]
    others = [j for j in groups.get(rec.person_id, ()) if j != i] if rec.person_id is not None else []
    if not others:
        return None, [], []
    if len(others) > max_refs:
        rng = np.random.default_rng([seed & 0xFFFFFFFF, i, 0xEF])
        others = sorted(rng.choice(others, size=max_refs, replace=False).tolist())
    return "cross", others, [load_embedding(records[j].embedding) for j in others]


def write_shards(
    records: list[Record],
    out_dir: str | os.PathLike,
    samples_per_shard: int = 1000,
    max_refs: int = 8,
    seed: int = 0,
    upload: str | None = None,
    keep_local: bool = True,
) -> Path:
    """Write ``shard-NNNNNN.tar`` files and ``shards.json``; each tar is written atomically. With ``upload``
    (``pipe:COMMAND`` where ``{}`` is the file name, or an fsspec folder URL) each finished file is uploaded, and
    without ``keep_local`` removed (local disk: one shard)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index_of = {r.key: i for i, r in enumerate(records)}
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        if r.person_id is not None:
            groups.setdefault(r.person_id, []).append(i)
    shards = []
    for s, start in enumerate(range(0, len(records), samples_per_shard)):
        name = f"shard-{s:06d}.tar"
        chunk = range(start, min(len(records), start + samples_per_shard))
        with atomic_path(out_dir / name) as tmp, tarfile.open(tmp, "w") as tar:
            for i in chunk:
                rec = records[i]
                key = f"{i:09d}"
                data, ext = _image_bytes(rec.image)
                kind, ids, refs = _refs_for(i, records, groups, index_of, max_refs, seed)
                meta = {
                    "id": rec.key,
                    "caption": rec.caption,
                    "kps": np.asarray(rec.kps, dtype=np.float64).tolist(),
                    "bbox": rec.bbox,
                    "width": rec.width,
                    "height": rec.height,
                    "person_id": rec.person_id,
                    "ref_kind": kind,
                    "ref_ids": ids,
                }
                _add(tar, f"{key}.{ext}", data)
                _add(tar, f"{key}.json", json.dumps(meta).encode("utf-8"))
                _add(tar, f"{key}.emb.npy", _npy_bytes(load_embedding(rec.embedding)))
                if refs:
                    _add(tar, f"{key}.refs.npy", _npy_bytes(np.stack(refs)))
        shards.append({"file": name, "count": len(chunk), "first": start})
        if upload:
            _send(upload, out_dir / name, keep_local)
    write_json_atomic(out_dir / MANIFEST, {"format": FORMAT, "total": len(records), "shards": shards})
    if upload:  # last: a manifest that exists names only shards already uploaded
        _send(upload, out_dir / MANIFEST, keep_local)
    return out_dir / MANIFEST


def _send(dest: str, path: Path, keep_local: bool) -> None:
    shard_io.upload(dest, str(path))
    if not keep_local:
        path.unlink()


# ----------------------------------------------------------------------------------------------------------
# Reading


class _TarCache:
    """A few open local shards per worker with their member index ``{key: {ext: TarInfo}}`` (random access)."""

    def __init__(self, size: int = 4):
        self.size = size
        self.open: OrderedDict[str, tuple[tarfile.TarFile, dict]] = OrderedDict()

    def get(self, path: str):
        if path in self.open:
            self.open.move_to_end(path)
            return self.open[path]
        tar = tarfile.open(path, "r")
        members: dict[str, dict[str, tarfile.TarInfo]] = {}
        for m in tar.getmembers():
            if m.isfile():
                base = os.path.basename(m.name)
                key, _, ext = base.partition(".")
                members.setdefault(key, {})[ext] = m
        self.open[path] = (tar, members)
        while len(self.open) > self.size:
            self.open.popitem(last=False)[1][0].close()
        return self.open[path]


class ShardDataset(torch.utils.data.IterableDataset):
    """Yields collated batches (use ``DataLoader(ds, batch_size=None, num_workers=W)``).

    ``shards``: a folder, ``shards.json`` or shard list, local or remote (see :func:`shard_io.resolve`). Local
    shards are read randomly; remote ones as streams (:mod:`faceid.train.shard_streams`), retried ``retries``
    times; then the shard is named and the run stops, or with ``skip_bad_shards`` its samples are left out and it
    is recorded (``bad_shards_file``, a warning).

    ``lanes`` (1: every worker may take samples of every shard of its rank) deals a rank's shards to that many
    fixed streams and batch ``r`` to stream ``r % lanes``; with ``lanes`` = DataLoader workers each remote shard
    is read by one worker only. The order depends on ``lanes``, never on the number of workers."""

    def __init__(
        self,
        shards: str | os.PathLike,
        tokenizers=(),
        batch_size: int = 1,
        rank: int = 0,
        world_size: int = 1,
        resolution: int = 1024,
        seed: int = 0,
        random_crop: bool = False,
        flip_prob: float = 0.0,
        cross_id: bool = False,
        cross_id_prob: float = 1.0,
        text_drop: float = 0.05,
        face_drop: float = 0.05,
        both_drop: float = 0.05,
        disk_cache=None,
        lanes: int = 1,
        retries: int = streams.RETRIES,
        skip_bad_shards: bool = False,
        bad_shards_file: str | os.PathLike | None = None,
    ):
        super().__init__()
        self.source = str(shards)
        self.manifest_loc, _, pairs = shard_io.resolve(self.source)
        self.shards = [dict(entry, loc=loc) for loc, entry in pairs]
        self.total = sum(int(e["count"]) for e in self.shards)
        self.tokenizers = list(tokenizers)
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        self.resolution, self.seed = resolution, seed
        self.random_crop, self.flip_prob = random_crop, flip_prob
        self.cross_id, self.cross_id_prob = cross_id, cross_id_prob
        self.drops = (text_drop, face_drop, both_drop)
        self.epoch, self.start_batch = 0, 0
        self._cache = None
        self.collate_fn = collate  # (faceid.train.batch_pool.PooledLoader sets its pool's)
        enable_arrow()  # zero-copy pixel reads (faceid.face.images.rgbx_view), imported before workers fork
        self.disk_cache = disk_cache  # faceid.train.disk_cache.DiskCache: no image decoding, no encoders
        self.reader = streams.StreamReader(retries, skip_bad_shards, bad_shards_file)
        self.lanes = max(1, int(lanes))
        if len(self.shards) < self.world_size * self.lanes:
            raise ValueError(
                f"{len(self.shards)} shards for {self.world_size} processes x {self.lanes} lanes: "
                "write more, smaller shards"
            )

    def __len__(self) -> int:
        return self.total

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = None  # open tar files stay in the process that opened them
        return state

    def __setstate__(self, state):  # a worker started by spawn / forkserver (Python 3.14's default on Linux)
        self.__dict__.update(state)
        enable_arrow()

    def _rank_shards(self, rank: int) -> list[int]:
        return list(range(rank, len(self.shards), self.world_size))

    def _lanes(self, rank: int) -> list[list[int]]:
        """A rank's shards dealt to ``lanes`` fixed streams (one per DataLoader worker when ``lanes`` = workers)."""
        mine = self._rank_shards(rank)
        return [mine[lane :: self.lanes] for lane in range(self.lanes)]

    def num_batches(self) -> int:
        """Batches per epoch on every rank (the minimum over ranks, and over lanes; the rest of the samples wait)."""
        counts = [
            sum(self.shards[s]["count"] for s in lane) // self.batch_size
            for r in range(self.world_size)
            for lane in self._lanes(r)
        ]
        return min(counts) * self.lanes

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def _order(self, rng, shards: list[int]) -> list[tuple[int, int]]:
        out = []
        for s in (shards[i] for i in rng.permutation(len(shards))):
            first, count = self.shards[s]["first"], self.shards[s]["count"]
            out += [(s, first + int(j)) for j in rng.permutation(count)]
        return out

    def epoch_samples(self, epoch: int) -> list[tuple[int, int]]:
        """This rank's ``(shard, global sample number)`` order for ``epoch``, batch after batch."""
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, int(epoch), self.rank, 0x5D])
        if self.lanes == 1:
            return self._order(rng, self._rank_shards(self.rank))
        # Batch r comes from lane r % lanes: a worker that owns a lane streams only that lane's shards.
        bs, per_lane = self.batch_size, self.num_batches() // self.lanes
        seqs = [self._order(rng, lane) for lane in self._lanes(self.rank)]
        return [x for j in range(per_lane) for seq in seqs for x in seq[j * bs : (j + 1) * bs]]

    def bad_shards(self) -> list[str]:
        """Shards skipped so far (any process writing to ``bad_shards_file``)."""
        return self.reader.recorded()

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
        if self._cache is None:
            self._cache = _TarCache()
        seq = self.epoch_samples(self.epoch)
        bs = self.batch_size
        mine = [b for r, b in enumerate(range(self.start_batch, self.num_batches())) if r % nworkers == wid]
        batches = [seq[b * bs : (b + 1) * bs] for b in mine]
        if not any(shard_io.is_remote(s["loc"]) for s in self.shards):
            for batch in batches:
                yield self.collate_fn([self._item(*self._sample(s, g), g) for s, g in batch])
            return
        # Streams: a shard is read once per worker, keeping only the samples this worker's batches take, and
        # dropped after its last use; the next one is read meanwhile (memory: this worker's share of ~3 shards).
        store = streams.WorkerStore(self.reader, self.shards, batches, context=(self.rank, self.epoch, wid))
        last = None
        for n in range(len(batches)):
            items = [self._item(*self._unpack(s, g, files), g) for s, g, files in store.take(n)]
            if not items:  # every sample in skipped shards: the trainer still needs a batch here
                last = last or self._stand_in(store, n, mine)
                streams.log.warning(f"batch {mine[n]}: all samples in skipped shards; batch {last[0]} again")
                items = last[1]
            last = (mine[n], items)
            yield self.collate_fn(items)

    def _stand_in(self, store, n: int, mine: list[int]):
        """This worker's next batch with readable samples (read ahead, not consumed), for a first batch left empty."""
        for m in range(n + 1, len(mine)):
            items = [self._item(*self._unpack(s, g, files), g) for s, g, files in store.take(m, keep=True)]
            if items:
                return mine[m], items
        raise shard_io.ShardReadError(
            f"rank {self.rank}: every sample of its batches is in unreadable shards {store.bad_names()}"
        )

    def _sample(self, shard: int, g: int):
        tar, members = self._cache.get(shard_io.local_path(self.shards[shard]["loc"]))
        files = members[f"{g:09d}"]
        return self._unpack(
            shard, g, {ext: (lambda m=m: tar.extractfile(m).read()) for ext, m in files.items()}
        )

    def _unpack(self, shard: int, g: int, files: dict):
        """``files``: ``{ext: bytes or a reader}`` → (meta, exts, read(ext), image())."""

        def read(ext):
            data = files[ext]
            return data if isinstance(data, bytes) else data()

        def image():
            ext = next(e for e in ("jpg", "png", "webp", "jpeg") if e in files)
            return load_image(read(ext), name=f"{self.shards[shard]['file']}:{g:09d}.{ext}")

        return json.loads(read("json")), files, read, image

    def cache_views(self):
        """``(meta, view(flip))`` for every sample of every shard, in order (what ``precompute_cache.py``
        encodes: the centre crop at ``resolution``, mirrored or not). A remote shard is streamed for the metas and
        again, once, when the first of its views is called (one shard in memory)."""
        from dataclasses import replace

        if self._cache is None:
            self._cache = _TarCache()
        held = {}

        def sample(s, g):
            if not shard_io.is_remote(self.shards[s]["loc"]):
                return self._sample(s, g)
            if s not in held:
                held.clear()
                first, count = self.shards[s]["first"], self.shards[s]["count"]
                held[s] = self.reader.read(
                    self.shards[s]["loc"], set(range(first, first + count)), strict=True
                )
            return self._unpack(s, g, held[s][g])

        for s, info in enumerate(self.shards):
            if shard_io.is_remote(info["loc"]):
                keys = set(range(info["first"], info["first"] + info["count"]))
                metas = self.reader.read(info["loc"], keys, exts=("json",), strict=True)
            for g in range(info["first"], info["first"] + info["count"]):
                meta = json.loads(metas[g]["json"]) if shard_io.is_remote(info["loc"]) else sample(s, g)[0]

                def view(flip, s=s, g=g):
                    img = sample(s, g)[3]()  # reopened lazily: the tar may have left the cache
                    plan = plan_crop(img.width, img.height, (self.resolution, self.resolution))
                    return to_chw_uint8(apply_image(img, replace(plan, flip=bool(flip))))

                yield meta, view

    def _item(self, meta: dict, files: dict, read, load, g: int) -> dict:
        cache = self.disk_cache
        image = None if cache is not None and cache.has_latents else load()
        width, height = (meta["width"], meta["height"]) if image is None else image.size
        plan = plan_crop(
            width,
            height,
            (self.resolution, self.resolution),
            self.random_crop,
            self.flip_prob,
            sample_rng(self.seed, self.epoch, g, SALT_CROP),
        )
        kps = transform_kps(meta["kps"], plan)
        rng = sample_rng(self.seed, self.epoch, g, SALT_REF)
        ref_index, emb_src = g, "emb.npy"
        if "refs.npy" in files and (
            meta["ref_kind"] == "fixed"
            or (self.cross_id and (self.cross_id_prob >= 1.0 or rng.random() < self.cross_id_prob))
        ):
            refs = np.load(io.BytesIO(read("refs.npy")), allow_pickle=False)
            k = int(rng.integers(len(refs))) if len(refs) > 1 else 0
            emb = refs[k]
            ref_index = meta["ref_ids"][k] if meta["ref_ids"] else -1
            emb_src = None
        drop_text, drop_face = cfg_drop(sample_rng(self.seed, self.epoch, g, SALT_DROP), *self.drops)
        if drop_face:
            emb = np.zeros(512, np.float32)
        elif emb_src:
            emb = np.load(io.BytesIO(read(emb_src)), allow_pickle=False)
        caption = "" if drop_text else meta["caption"]
        out = {}
        if image is None:
            out["latent_params"] = cache.latent(meta["id"], plan.flip)
        else:
            out["pixel_values"] = to_chw_uint8(apply_image(image, plan))
        if cache is not None and cache.has_text:
            out["prompt_embeds"], out["pooled_prompt_embeds"] = cache.text(caption)
        out |= {
            "kps_image": to_chw_uint8(kps_image(kps, plan)),
            "face_embeds": torch.from_numpy(np.array(emb, dtype=np.float32).reshape(512)),
            "caption": caption,
            "index": g,
            "ref_index": ref_index,
            "epoch": self.epoch,
            "drop_text": drop_text,
            "drop_face": drop_face,
            "original_size": torch.tensor([plan.height, plan.width]),
            "crop_top_left": torch.tensor([plan.top, plan.left]),
            "target_size": torch.tensor([plan.target[1], plan.target[0]]),
            "kps": torch.from_numpy(kps.astype(np.float32)),
        }
        for n, tok in enumerate(self.tokenizers):
            out["input_ids" if n == 0 else f"input_ids_{n + 1}"] = tokenize(tok, caption)[0]
        return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Convert a training index to WebDataset tar shards.")
    p.add_argument(
        "--data_json_file", "--index", dest="index", required=True, help="index JSONL or FaceID-6M folder"
    )
    p.add_argument("--out", required=True)
    p.add_argument("--data_format", default="auto")
    p.add_argument("--data_root_path", default=None)
    p.add_argument("--person_id_from_folder", action="store_true")
    p.add_argument("--samples_per_shard", type=int, default=1000)
    p.add_argument("--max_refs", type=int, default=8, help="cross-identity references stored per sample")
    p.add_argument("--skip_bad_samples", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--upload",
        default=None,
        help="also send each finished shard and shards.json to 'pipe:COMMAND' ({} = file name, read from stdin, "
        "e.g. 'pipe:aws s3 cp - s3://bucket/shards/{}') or an fsspec folder URL (s3://bucket/shards with s3fs)",
    )
    p.add_argument("--no_keep_local", action="store_true", help="with --upload: delete each file once sent")
    return p.parse_args(argv)


def main(args) -> Path:
    import logging

    from faceid.train.records import load_checked_records

    logging.basicConfig(level=logging.INFO)
    records, bad = load_checked_records(
        args.index,
        args.data_format,
        args.data_root_path,
        args.person_id_from_folder,
        args.skip_bad_samples,
        logger=logging.getLogger("shards"),
    )
    path = write_shards(
        records,
        args.out,
        args.samples_per_shard,
        args.max_refs,
        args.seed,
        args.upload,
        not args.no_keep_local,
    )
    where = f"{path.parent} and {args.upload}" if args.upload else path.parent
    print(f"wrote {len(records)} samples ({len(bad)} bad skipped) to {where}")
    return path


if __name__ == "__main__":
    main(parse_args())
