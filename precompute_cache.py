"""Precompute VAE latents and text embeddings to disk, once, for training runs that read them instead of the images.

    python precompute_cache.py --pretrained_model_name_or_path SDXL --data_json_file index.jsonl \
        --resolution 1024 --aspect_ratio_buckets --flip both --output cache/
    torchrun --nproc_per_node 8 precompute_cache.py ...            # or accelerate launch --num_processes 8
    python train_instantId_sdxl.py ... --precomputed_cache cache/ [--random_flip 0.5]

Each process takes work items ``n % world == rank`` (one item = both views of an image, or one caption) and commits
shards of them; rerunning the same command after a kill continues where it stopped and never recomputes a
committed shard. Give it the same model, data, resolution and bucket flags as training: the cache records them
(``manifest.json``) and training refuses a cache built otherwise, naming the difference. What is cached and why it is
exact: docs/training.md and faceid/train/disk_cache.py.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import time
from pathlib import Path

from faceid.train import config

# ----------------------------------------------------------------------------------------- editable defaults
MODEL_NAME = config.MODEL_NAME
RESOLUTION = config.RESOLUTION
SHARD_SIZE = 256  # work items per committed shard (what a kill can lose at most)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_model_flags(p, MODEL_NAME)
    p.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"],
                   help="as training's: the text encoders' (and a given fp16-safe VAE's) dtype")  # fmt: skip
    config.add_data_flags(p, RESOLUTION)
    p.add_argument("--flip", default="none", choices=["none", "both"], help="both: also cache mirrored crops")
    p.add_argument("--what", default="latents,text", help="latents, text or latents,text")
    p.add_argument("--output", required=True, help="cache folder")
    p.add_argument("--shard_size", type=int, default=SHARD_SIZE)
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when available, else cpu")
    p.add_argument("--no_progress", action="store_true")
    return p.parse_args(argv)


def source_items(args):
    """→ (source description, items [(id, caption, view(flip) -> uint8 CHW tensor)], buckets)."""
    config.check_source(args)
    if args.train_shards:
        from faceid.train.webdataset_shards import ShardDataset

        ds = ShardDataset(args.train_shards, resolution=args.resolution)
        items = [(meta["id"], meta["caption"], view) for meta, view in ds.cache_views()]
        return config.source_entry("shards", args.train_shards, len(items)), items, None
    from faceid.train.dataset import FaceTrainDataset

    index = config.load_index_source(args)
    ds = FaceTrainDataset(index.records, resolution=args.resolution, buckets=index.buckets)
    items = [(r.key, r.caption, (lambda f, i=i: ds.cache_view(i, f))) for i, r in enumerate(index.records)]
    return index.source, items, index.buckets


def main(args) -> int:
    import torch
    from safetensors.torch import save
    from tqdm import tqdm

    from faceid.prep.engine import dist_env
    from faceid.prep.parts import PartStore, durable_write, jsonl_bytes, part_stem
    from faceid.train import disk_cache as dc
    from faceid.train.errors import TrainingInputError
    from faceid.train.model import encode_latent_params, encode_text, load_encoders
    from faceid.train.transforms import pixels_to_float, tokenize

    what = sorted({w.strip() for w in args.what.split(",") if w.strip()})
    if not what or set(what) - {"latents", "text"}:
        raise TrainingInputError(f"--what {args.what!r}: choose latents, text or latents,text")
    rank, world, local = dist_env()
    device = args.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    weight_dtype = config.weight_dtype(args.mixed_precision)
    enc = load_encoders(args, weight_dtype, device)
    source, items, buckets = source_items(args)

    # 1. The manifest: a rerun (resume) must use the same settings as the parts already written.
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    manifest = dc.expected_manifest(enc, source, args.resolution, buckets, args.flip, what)
    if (out / dc.MANIFEST).is_file():
        dc.check_manifest(dc.read_manifest(out), manifest, out,
                          "rerun with the settings it was built with to resume, or use another --output")  # fmt: skip
    else:
        from faceid.files import write_json_atomic

        write_json_atomic(out / dc.MANIFEST, manifest)  # every rank writes the same bytes

    # 2. This rank's work, minus what is already committed.
    work = [("lat", i) for i in range(len(items))] if "latents" in what else []
    if "text" in what:
        work += [("txt", c) for c in sorted({c for _, c, _ in items} | {""})]

    def key_of(w):
        return dc.latent_key(items[w[1]][0]) if w[0] == "lat" else dc.text_key(w[1])

    store = PartStore(out)
    done = store.done_keys()
    mine = [w for n, w in enumerate(work) if n % world == rank]
    todo = [w for w in mine if key_of(w) not in done]
    store.marker(world, rank).unlink(missing_ok=True)
    seq = store.next_seq(world, rank)
    flips = (False, True) if args.flip == "both" else (False,)
    tensors, keys = {}, []

    def commit():
        nonlocal seq, tensors, keys
        if keys:
            stem = part_stem(world, rank, seq)
            st = store.dir / f"{stem}.safetensors"
            data = save(tensors)
            durable_write(st, lambda fh: fh.write(data))
            durable_write(store.dir / f"{stem}.jsonl", lambda fh: fh.write(jsonl_bytes(keys)))  # commit point
            seq += 1
        tensors, keys = {}, []

    def _encode(w, key):
        if w[0] == "lat":
            view = items[w[1]][2]
            for f in flips:
                pixels = pixels_to_float(view(f)[None].to(device))
                tensors[f"{key}/{int(f)}"] = encode_latent_params(enc["vae"], pixels)[0].cpu().contiguous()
        else:
            ids = [tokenize(t, w[1]) for t in (enc["tokenizer"], enc["tokenizer_2"])]
            embeds, pooled = encode_text([enc["text_encoder"], enc["text_encoder_2"]], ids)
            tensors[f"{key}/embeds"] = embeds[0].cpu().contiguous()
            tensors[f"{key}/pooled"] = pooled[0].cpu().contiguous()

    print(f"[precompute] rank {rank}/{world}: {len(todo)} of {len(mine)} work items to do "
          f"({len(mine) - len(todo)} already done) on {device}", flush=True)  # fmt: skip
    old_term = signal.signal(signal.SIGTERM, _interrupt)
    t0 = time.monotonic()
    # Training encodes under accelerate's autocast: the cache must be encoded the same way.
    autocast = (
        torch.autocast(torch.device(device).type, dtype=weight_dtype)
        if weight_dtype != torch.float32
        else contextlib.nullcontext()
    )
    try:
        for w in tqdm(
            todo, desc=f"rank {rank}/{world}", unit="item", disable=args.no_progress, mininterval=1.0
        ):
            key = key_of(w)
            with autocast:
                _encode(w, key)
            keys.append({"key": key})
            if len(keys) >= args.shard_size:
                commit()
    finally:
        commit()  # finished items survive Ctrl-C / SIGTERM
        signal.signal(signal.SIGTERM, old_term)
    store.marker(world, rank).write_text('{"done": true}\n')
    dt = time.monotonic() - t0
    print(f"[precompute] rank {rank}/{world}: {len(todo)} item(s) in {dt:.1f}s "
          f"({len(todo) / dt if dt > 0 else 0:.1f}/s); cache: {out}", flush=True)  # fmt: skip
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    from faceid import cli

    cli.run(main, parse_args)
