"""Face info for one photo or a whole dataset.

One image (MFaceTech-compatible ``.pkl``, or our safe ``.npz`` by suffix)::

    python get_face_info.py --face_image me.jpg --output me.pkl [--root ./] [--resize]

A dataset (folder of images, JSONL index, an extracted FaceID-6M/70K folder, the Hub's parquet files with image
bytes, or an imagefolder with metadata.jsonl / metadata.csv) → ``index.jsonl`` (docs/design.md),
``rejects.jsonl`` and ``embeddings/shard-*.npy``, resumable, on N processes::

    python get_face_info.py --input data/ --output out/ [--faceid6m_filters]
    accelerate launch --num_processes 8 get_face_info.py --input data.jsonl --output out/
    torchrun --nproc_per_node 8 get_face_info.py --input data.jsonl --output out/

Rerunning the same command after a crash or kill continues where it stopped (nothing is done twice); rank 0 merges
when all items are committed. ``--merge_only`` merges whatever is committed. Rejected items do not fail the run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# ----------------------------------------------------------------------------------------- editable defaults
ROOT = "./"  # folder holding models/antelopev2
DET_SIZE = 640
RETRY_SIZES = "480,320,256"  # tried in order when nothing is found at DET_SIZE ("" = no retry)
DET_THRESH = 0.5
SHARD_SIZE = 1000  # items per committed part shard (what a kill can lose at most)
FLUSH_SECONDS = 120.0  # also commit at least this often
MERGE_SHARD_ROWS = 50_000  # rows per merged embeddings/shard-*.npy
BATCH_SIZE = 16  # images per batched recognition call
NUM_WORKERS = None  # decode + detect threads (None: one more than the CPU cores)
MERGE_TIMEOUT = 7200.0  # rank 0 waits this long for the other ranks after finishing its own share
SINGLE_IMAGE_SUFFIXES = (".pkl", ".npz")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--face_image", help="single-image mode: the photo")
    p.add_argument("--input", help="dataset mode: image folder, JSONL index, or FaceID-6M/70K folder")
    p.add_argument(
        "--output", help="single image: .pkl/.npz file; dataset: output folder or its index .jsonl"
    )
    p.add_argument("--root", default=ROOT, help="folder holding models/antelopev2")
    p.add_argument("--det_size", type=int, default=DET_SIZE)
    p.add_argument("--retry_sizes", default=RETRY_SIZES, help="comma-separated smaller det sizes to retry")
    p.add_argument("--det_thresh", type=float, default=DET_THRESH)
    p.add_argument("--resize", action="store_true", help="single image: resize like inference first (frame)")
    p.add_argument("--verbose", action="store_true", help="show insightface's own messages")
    g = p.add_argument_group("dataset input")
    g.add_argument(
        "--source_kind",
        default="auto",
        choices=["auto", "folder", "jsonl", "faceid6m", "parquet", "imagefolder"],
    )
    g.add_argument("--image_root", help="base folder for relative image paths of a JSONL index")
    g.add_argument("--person_from_folder", action="store_true", help="person id = image's sub-folder")
    g.add_argument("--person_column", help="person id from this column / field (parquet, metadata, JSONL)")
    g.add_argument(
        "--person_pattern",
        help="person id from the file name: a regex searched in the relative path (group 'person', or group 1)",
    )
    g.add_argument(
        "--image_column", help="parquet: the column holding the images (default: found by name/type)"
    )
    g.add_argument("--faceid6m_index_base", type=int, default=None, help="number of the first line's image")
    g.add_argument("--max_pixels", type=int, default=None, help="decompression-bomb limit (pixels)")
    f = p.add_argument_group("filters")
    f.add_argument("--max_faces", type=int, default=None)
    f.add_argument("--min_face_ratio", type=float, default=None, help="chosen face bbox area / image area")
    f.add_argument("--min_side", type=int, default=None, help="minimum shorter image side (pixels)")
    f.add_argument("--faceid6m_filters", action="store_true", help="FaceID-6M defaults: 3 faces, 4%%, 256 px")
    o = p.add_argument_group("output and scale")
    o.add_argument("--per_image_npy", action="store_true", help="one [512] .npy per image instead of shards")
    o.add_argument("--rejects", default="rejects.jsonl", help="rejects file name in the output folder")
    o.add_argument("--shard_size", type=int, default=SHARD_SIZE)
    o.add_argument("--flush_seconds", type=float, default=FLUSH_SECONDS)
    o.add_argument("--merge_shard_rows", type=int, default=MERGE_SHARD_ROWS)
    o.add_argument("--batch_size", type=int, default=BATCH_SIZE)
    o.add_argument("--num_workers", type=int, default=NUM_WORKERS)
    o.add_argument("--merge_only", action="store_true", help="only merge the committed parts")
    o.add_argument("--merge_timeout", type=float, default=MERGE_TIMEOUT)
    o.add_argument("--no_progress", action="store_true")
    args = p.parse_args(argv)
    if bool(args.face_image) == bool(args.input):
        p.error("give either --face_image (one photo) or --input (a dataset)")
    if args.input and not args.output:
        p.error("dataset mode needs --output (a folder, or the index .jsonl path)")
    args.retry_sizes = [int(s) for s in str(args.retry_sizes).replace(" ", "").split(",") if s]
    if args.person_pattern:
        import re

        try:
            re.compile(args.person_pattern)
        except re.error as exc:
            p.error(f"--person_pattern is not a valid regular expression: {exc}")
    return args


def _analyzer(args, threads: int | None = None):
    from faceid.face.analysis import FaceAnalyzer

    return FaceAnalyzer(
        args.root,
        det_size=args.det_size,
        retry_sizes=args.retry_sizes,
        det_thresh=args.det_thresh,
        verbose=args.verbose,
        rec_batch_size=max(args.batch_size, 1),
        intra_op_threads=threads,
    )


def single_image(args) -> int:
    from faceid.face.face_info import save_face_info
    from faceid.face.images import ImageLoadError, load_image
    from faceid.face.kps import resize_img

    output = Path(args.output or Path(args.face_image).with_suffix(".pkl"))
    try:
        image = load_image(args.face_image)
    except ImageLoadError as exc:
        print(f"[get_face_info] {exc}", file=sys.stderr)
        return 1
    if args.resize:
        image = resize_img(image)
    result = _analyzer(args).analyze_full(image)
    if not result:
        print(f"[get_face_info] {args.face_image}: {result.reason}", file=sys.stderr)
        return 1
    save_face_info(output, result.to_face_info())
    w, h = result.frame
    print(
        f"[get_face_info] {output}: {result.num_faces} face(s), largest bbox {[round(float(v), 1) for v in result.bbox]}"
        f" score {result.det_score:.3f}, frame {w}x{h}"
    )
    return 0


def dataset(args) -> int:
    from faceid.prep.sources import SourceError, check_parquet, detect_kind, metadata_files

    try:
        kind = detect_kind(args.input) if args.source_kind == "auto" else args.source_kind
        if kind == "parquet":
            check_parquet(args.input, args.image_column)
        if kind == "imagefolder" and not (Path(args.input).is_file() or metadata_files(args.input)):
            raise SourceError(f"{args.input}: no metadata.jsonl / metadata.csv (the imagefolder layout)")
    except (SourceError, FileNotFoundError) as exc:
        print(f"[get_face_info] {exc}", file=sys.stderr)
        return 2
    return _dataset(args)


def _dataset(args) -> int:
    from faceid.face.images import MAX_PIXELS
    from faceid.prep import engine as pp
    from faceid.prep.parts import PartStore, merge

    out = Path(args.output)
    index_name = "index.jsonl"
    if out.suffix == ".jsonl":
        out, index_name = out.parent, out.name
    out.mkdir(parents=True, exist_ok=True)
    args.max_pixels = args.max_pixels or MAX_PIXELS
    filters = pp.FACEID6M_FILTERS if args.faceid6m_filters else pp.Filters()
    filters = pp.Filters(
        max_faces=args.max_faces if args.max_faces is not None else filters.max_faces,
        min_face_ratio=args.min_face_ratio if args.min_face_ratio is not None else filters.min_face_ratio,
        min_side=args.min_side if args.min_side is not None else filters.min_side,
    )
    merge_kw = {"index_name": index_name, "rejects_name": args.rejects, "shard_rows": args.merge_shard_rows}
    store = PartStore(out)
    if args.merge_only:
        summary = merge(out, **merge_kw)
        print(pp.format_summary(summary))
        return 0
    rank, world, local_rank = pp.dist_env()
    started = time.time()
    store.check_config(pp.run_config(args, filters))
    store.marker(world, rank).unlink(missing_ok=True)
    # Throughput comes from several images in flight (one per worker), not from threads inside one image.
    import cv2

    cv2_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        return _dataset_run(args, out, index_name, filters, merge_kw, store, rank, world, started)
    finally:
        cv2.setNumThreads(cv2_threads)


def _dataset_run(args, out, index_name, filters, merge_kw, store, rank, world, started) -> int:
    from faceid.prep import engine as pp

    done = store.done_keys()
    # One thread more than cores: while one waits (for the GIL, the disk, the models loading) the cores stay busy.
    args.num_workers = args.num_workers or (os.cpu_count() or 1) + 1
    # The models load in a thread while the first images decode (the sessions of the real pack take seconds).
    from concurrent.futures import ThreadPoolExecutor

    loading = ThreadPoolExecutor(1, thread_name_prefix="models")
    analyzer = loading.submit(_analyzer, args, 1)
    loading.shutdown(wait=False)
    all_keys: set = set()

    def items():
        for item in pp.source_items(args):
            all_keys.add(item.key)
            yield item

    runner = pp.RankRunner(
        analyzer,
        out,
        rank=rank,
        world=world,
        filters=filters,
        shard_size=args.shard_size,
        flush_seconds=args.flush_seconds,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        max_pixels=args.max_pixels,
        per_image_npy=args.per_image_npy,
        progress=not args.no_progress,
    )
    counts = runner.run(items(), done)
    pp.write_marker(store, world, rank, counts)
    n = sum(counts.values())
    rate = n / runner.elapsed if runner.elapsed > 0 else 0.0
    print(
        f"[get_face_info] rank {rank}/{world}: {n} new item(s) in {runner.elapsed:.1f}s ({rate:.1f} images/s), "
        f"{len(done & all_keys)} already done; " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
    )
    if rank != 0:
        return 0
    summary = pp.wait_and_merge(store, all_keys, world, started, args.merge_timeout, **merge_kw)
    if summary is None:
        return 3
    print(f"[get_face_info] wrote {out / index_name} and {out / args.rejects}")
    print(pp.format_summary(summary))
    return 0


def main(args) -> int:
    return single_image(args) if args.face_image else dataset(args)


if __name__ == "__main__":
    from faceid import cli

    cli.run(main, parse_args)
