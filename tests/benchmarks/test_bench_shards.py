"""bench_shards in miniature: every source is timed each round, and the HTTP server's byte count shows one lane per
worker streaming each shard once."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_bench_shards_runs_every_source_and_counts_bytes(capsys):
    import bench_shards

    # images large enough for the benchmark's keypoints (up to (610, 760))
    argv = "--num_images 4 --samples_per_shard 2 --repeats 1 --resolution 64 --image_size 640 800".split()
    rates, served, size = bench_shards.main(argv)
    assert set(rates) == {"local", "http", "pipe:cat", "http, 2 lanes"}
    assert all(len(r) == 1 and r[0] > 0 for r in rates.values())
    assert abs(served["http, 2 lanes"][0] - size) < 1e-9  # each shard crossed the wire exactly once
    assert "vs local" in capsys.readouterr().out
