"""Training step time on the tiny models (CPU): data time, step time and samples/s from ``train_log.jsonl``.

    python benchmarks/bench_train_step.py [--steps 20] [--resolution 64] [--batch_size 2] [--tiny DIR]

Runs ``train_instantId_sdxl.py`` in-process on a synthetic index (a few people, two images each) with
``--cross_id`` and reports medians over the steps after the first (the first includes warm-up). Variants:
plain, with gradient checkpointing, and with latent + text-embedding caching.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--tiny", default=None, help="tiny checkpoints folder (built in a temp dir if not given)")
    args = p.parse_args(argv)

    import logging

    from conftest_train import make_index_dataset, tiny_args

    import train_instantId_sdxl as train
    from faceid.tiny import build_tiny

    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tiny = Path(args.tiny) if args.tiny else tmp / "tiny"
        build_tiny(tiny, faces=False)
        index = make_index_dataset(tmp / "data", n_people=4, per_person=2, singles=0)
        variants = {
            "plain": [],
            "gradient checkpointing": ["--gradient_checkpointing"],
            "cached latents + text": ["--cache_latents", "--cache_text_embeddings"],
        }
        print(f"tiny SDXL + IdentityNet + adapter, {args.resolution}px, batch {args.batch_size}, CPU")
        for name, extra in variants.items():
            out = tmp / name.replace(" ", "_")
            argv = tiny_args(tiny, out, "--data_json_file", str(index), "--max_train_steps", str(args.steps),
                             "--checkpointing_steps", "0", "--cross_id", "--resolution", str(args.resolution),
                             "--train_batch_size", str(args.batch_size), "--no-log_samples", *extra)  # fmt: skip
            t0 = time.perf_counter()
            train.main(train.parse_args(argv))
            wall = time.perf_counter() - t0
            log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()][1:]
            step = statistics.median(e["step_time"] for e in log)
            data = statistics.median(e["data_time"] for e in log)
            sps = statistics.median(e["samples_per_sec"] for e in log)
            print(f"  {name:24s} step {step * 1000:7.1f} ms  data {data * 1000:6.1f} ms  "
                  f"{sps:6.1f} samples/s  (run incl. model load {wall:5.1f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
