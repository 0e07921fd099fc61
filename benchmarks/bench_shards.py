"""Shard reader throughput: the same WebDataset shards read from local disk (random access), streamed over HTTP
(a localhost server; also with ``--shard_lanes`` = workers) and through ``pipe:cat``, side by side in one run.

    python benchmarks/bench_shards.py [--num_images 48] [--samples_per_shard 8] [--workers 2] [--resolution 512]
                                      [--repeats 3]

Writes ``num_images`` 1024×1280 photo-like PNGs (bench_dataloader.py's) into shards, serves their folder on
127.0.0.1, then times one epoch (``DataLoader``, ``workers`` processes, batch size 2, after the first batch) per
source, the sources interleaved and rotated for ``repeats`` rounds; prints samples/s per round and the median,
and the bytes the HTTP server sent per epoch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_dataloader import make_data, time_loader  # noqa: E402

from faceid.train.batch_pool import stream_loader  # noqa: E402
from faceid.train.records import load_checked_records  # noqa: E402
from faceid.train.shard_io import serve_folder  # noqa: E402
from faceid.train.webdataset_shards import ShardDataset, write_shards  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num_images", type=int, default=48)
    p.add_argument("--samples_per_shard", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--image_size", type=int, nargs=2, default=(1024, 1280), help="width height")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        index, _ = make_data(root / "data", args.num_images, tuple(args.image_size))
        records, _ = load_checked_records(str(index))
        write_shards(records, root / "site" / "shards", args.samples_per_shard)
        n = len(records) // args.samples_per_shard
        size = sum(f.stat().st_size for f in (root / "site" / "shards").glob("*.tar")) / 2**20
        print(f"{len(records)} samples in {n} shards ({size:.1f} MiB), {args.workers} workers, "
              f"batch {args.batch_size}, resolution {args.resolution}")  # fmt: skip
        sent = [0]
        with serve_folder(root / "site", sent) as url:
            lanes = max(1, args.workers)
            sources = {  # name: (--train_shards, --shard_lanes)
                "local": (str(root / "site" / "shards"), 1),
                "http": (f"{url}/shards/", 1),
                "pipe:cat": (f"pipe:cat {root}/site/shards/shard-{{000000..{n - 1:06d}}}.tar", 1),
                f"http, {lanes} lanes": (f"{url}/shards/", lanes),
            }
            rates = {name: [] for name in sources}
            served = {name: [] for name in sources if name.startswith("http")}
            for r in range(args.repeats):
                names = list(sources)
                names = names[r % len(names) :] + names[: r % len(names)]  # rotate: no source always first
                for name in names:
                    spec, n_lanes = sources[name]
                    ds = ShardDataset(
                        spec, batch_size=args.batch_size, resolution=args.resolution, lanes=n_lanes
                    )
                    loader = stream_loader(ds, args.workers)  # what the trainer iterates
                    before = sent[0]
                    rates[name].append(time_loader(loader)[0])  # samples/s (CPU ms/sample unused here)
                    if name in served:
                        served[name].append((sent[0] - before) / 2**20)
    base = statistics.median(rates["local"])
    print(f"{'source':<16} {'samples/s per round':<30} {'median':>8} {'vs local':>9}")
    for name, got in rates.items():
        med = statistics.median(got)
        print(f"{name:<16} {' '.join(f'{x:6.1f}' for x in got):<30} {med:8.1f} {med / base:8.2f}x")
    for name, mib in served.items():  # lanes=1: each worker streams a shard up to the last sample it takes
        print(f"{name}: {statistics.median(mib):.1f} MiB served per epoch for {size:.1f} MiB of shards "
              f"({statistics.median(mib) / size:.2f}x)")  # fmt: skip
    return rates, served, size


if __name__ == "__main__":
    main()
