"""Training set-up shared by ``train_instantId_sdxl.py`` and ``precompute_cache.py``: the model and data flags,
the data-source checks, the records/buckets of an index, the weight dtype — written once, so a cache built by one
matches the run of the other — and :class:`TrainHooks`, the explicit seams the trainer's ``main`` accepts."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass

from faceid.train.errors import TrainingInputError

MODEL_NAME = "stabilityai/stable-diffusion-xl-base-1.0"
RESOLUTION = 1024
DATA_FORMATS = ("auto", "index", "mfacetech", "seed", "faceid6m")


def add_model_flags(p, model_name: str = MODEL_NAME) -> None:
    """The frozen SDXL the run encodes with (a cache records them: trainer and cache must agree)."""
    B = argparse.BooleanOptionalAction
    p.add_argument(
        "--pretrained_model_name_or_path", default=model_name, help="SDXL diffusers folder or hub id"
    )
    p.add_argument("--revision", default=None)
    p.add_argument("--pretrained_vae_model_name_or_path", default=None, help="e.g. a fp16-safe SDXL VAE")
    p.add_argument(
        "--vae_in_weight_dtype", action=B, default=True, help="keep a given VAE in the weight dtype"
    )


def add_data_flags(p, resolution: int = RESOLUTION) -> None:
    """Where the data is and how it is cut into training views."""
    p.add_argument(
        "--data_json_file", default=None, help="index JSONL (get_face_info / MFaceTech / seed format)"
    )
    p.add_argument("--train_data_dir", default=None, help="FaceID-6M folder (N.png, N.npy, *.jsonl)")
    p.add_argument(
        "--train_shards",
        default=None,
        help="WebDataset shards (python -m faceid.train.webdataset_shards): folder, shards.json or shard list, "
        "local or remote (http(s)://, pipe:COMMAND, s3://, gs://; brace ranges shard-{000000..000335}.tar)",
    )
    p.add_argument("--data_format", default="auto", choices=DATA_FORMATS)
    p.add_argument(
        "--data_root_path", default=None, help="root for relative paths (default: the index's folder)"
    )
    p.add_argument("--skip_bad_samples", action="store_true")
    p.add_argument("--resolution", type=int, default=resolution)
    p.add_argument("--aspect_ratio_buckets", action="store_true", help="SDXL buckets scaled to --resolution")
    p.add_argument("--bucket_multiple", type=int, default=None)


def check_source(args) -> str:
    """The one data source the flags name (a :class:`TrainingInputError` naming the flags otherwise)."""
    sources = [x for x in (args.data_json_file, args.train_data_dir, args.train_shards) if x]
    if len(sources) != 1:
        raise TrainingInputError("give exactly one of --data_json_file, --train_data_dir, --train_shards")
    from faceid.train.shard_io import exists_or_remote

    if not exists_or_remote(sources[0]):
        raise TrainingInputError(f"{sources[0]}: no such file or folder (check the data flag)")
    if args.train_shards and args.aspect_ratio_buckets:
        raise TrainingInputError("--train_shards streams fixed-size samples: no --aspect_ratio_buckets")
    return sources[0]


def weight_dtype(mixed_precision: str | None):
    """The frozen weights' dtype for ``--mixed_precision`` (fp32 for ``no``/None); trained weights stay fp32."""
    import torch

    from faceid.runtime import DTYPES

    return DTYPES.get(mixed_precision or "no", torch.float32)


def source_entry(kind: str, path: str, items: int) -> dict:
    """The data source as a cache manifest records it."""
    from faceid.train.shard_io import is_remote

    return {"kind": kind, "path": path if is_remote(path) else os.path.abspath(path), "items": items}


@dataclass
class IndexSource:
    """An index (``--data_json_file`` / ``--train_data_dir``) read and checked: its records, the bad lines
    skipped with ``--skip_bad_samples``, the buckets and the manifest entry."""

    records: list
    bad: list
    buckets: list | None
    source: dict


def load_index_source(args, person_id_from_folder: bool = False, logger=None) -> IndexSource:
    from faceid.train.records import load_checked_records
    from faceid.train.transforms import scaled_buckets

    path = args.data_json_file or args.train_data_dir
    fmt = "faceid6m" if args.train_data_dir and args.data_format == "auto" else args.data_format
    records, bad = load_checked_records(
        path, fmt, args.data_root_path, person_id_from_folder, args.skip_bad_samples, logger=logger
    )
    buckets = scaled_buckets(args.resolution, args.bucket_multiple) if args.aspect_ratio_buckets else None
    return IndexSource(records, bad, buckets, source_entry("index", path, len(records)))


@dataclass
class TrainHooks:
    """Seams into the trainer, passed explicitly: ``main(args, hooks=TrainHooks(...))``. The defaults are the
    trainer as shipped; tests and the miniature benchmarks (deliberately broken trainers) set them.

    - ``compute_loss``: replaces :func:`faceid.train.model.compute_loss` (same signature);
    - ``trainable_parameters``: ``model -> parameters`` the optimizer updates;
    - ``batch``: ``batch -> batch``, applied to every collated batch before its step;
    - ``stop_after_steps``: return after this many steps as a killed run would (checkpoints kept, no export)."""

    compute_loss: Callable | None = None
    trainable_parameters: Callable | None = None
    batch: Callable[[dict], dict] | None = None
    stop_after_steps: int | None = None


# ---------------------------------------------------------------------------------------------------------------
# The data of a training run


def open_disk_cache(args, enc: dict, source: dict, buckets, item_ids, captions):
    """The ``--precomputed_cache``, checked against this run's settings and data (or a message naming the
    difference); ``None`` without the flag."""
    if not args.precomputed_cache:
        return None
    from faceid.train import disk_cache as dc

    cache = dc.DiskCache(args.precomputed_cache)
    built = cache.manifest
    flip = built["flip"]
    if args.random_flip > 0 and flip != "both":
        flip = f"both (for --random_flip {args.random_flip})"
    wanted = dc.expected_manifest(enc, source, args.resolution, buckets, flip, built["what"])
    hint = "Rebuild it with precompute_cache.py and this run's model/data/resolution/bucket/flip flags."
    dc.check_manifest(built, wanted, args.precomputed_cache, hint)
    cache.check_complete(item_ids, captions)
    return cache


@dataclass
class TrainData:
    """What the loop reads: the dataset, the index records (None for shards), ``loader(epoch, start_batch)`` and
    the batches per epoch of this process."""

    dataset: object
    records: list | None
    loader: Callable
    batches_per_epoch: int


def build_data(args, tokenizers, rank: int, world: int, log, enc=None) -> TrainData:
    """Every rank reads its own deterministic share (a function of seed, epoch, batch). ``enc`` (the loaded
    encoders) is needed to check a ``--precomputed_cache``."""

    from faceid.train.batch_pool import map_loader, stream_loader
    from faceid.train.dataset import EpochBatchSampler, FaceTrainDataset

    common = dict(
        resolution=args.resolution,
        seed=args.seed,
        random_crop=args.random_crop,
        flip_prob=args.random_flip,
        cross_id=args.cross_id,
        cross_id_prob=args.cross_id_prob,
        text_drop=args.text_drop_rate,
        face_drop=args.face_drop_rate,
        both_drop=args.both_drop_rate,
    )
    workers = args.dataloader_num_workers
    if args.train_shards:
        from faceid.train.webdataset_shards import ShardDataset

        ds = ShardDataset(
            args.train_shards,
            tokenizers,
            batch_size=args.train_batch_size,
            rank=rank,
            world_size=world,
            lanes=getattr(args, "shard_lanes", 1),
            retries=getattr(args, "shard_retries", 3),
            skip_bad_shards=getattr(args, "skip_bad_shards", False),
            bad_shards_file=os.path.join(args.output_dir, "bad_shards.jsonl"),
            **common,
        )
        if args.precomputed_cache:
            metas = [meta for meta, _ in ds.cache_views()]
            source = source_entry("shards", args.train_shards, len(metas))
            ds.disk_cache = open_disk_cache(
                args, enc, source, None, [m["id"] for m in metas], [m["caption"] for m in metas]
            )

        def shard_loader(epoch, start):
            ds.set_epoch(epoch, start)
            return stream_loader(ds, workers)

        return TrainData(ds, None, shard_loader, ds.num_batches())

    index = load_index_source(args, args.person_id_from_folder, logger=log)
    records, held_out = index.records, []
    if getattr(args, "validation_persons", 0) and args.validation_steps and not args.validation_index:
        # Persons held out of training for identity validation (faceid/train/monitor.py); the cache manifest
        # still names the whole index, so one precomputed cache serves runs with and without a hold-out.
        from faceid.train.monitor import split_persons

        records, held_out = split_persons(records, args.validation_persons, args.seed)
    cache = open_disk_cache(
        args, enc, index.source, index.buckets, [r.key for r in records], [r.caption for r in records]
    )
    ds = FaceTrainDataset(records, tokenizers, buckets=index.buckets, disk_cache=cache, **common)
    sampler = EpochBatchSampler(ds.bucket_groups(), args.train_batch_size, args.seed, rank, world)

    def index_loader(epoch, start):
        sampler.set_epoch(epoch, start)
        return map_loader(ds, sampler, workers)

    ds.num_bad = len(index.bad)
    ds.held_out = held_out
    return TrainData(ds, records, index_loader, sampler.num_batches())
