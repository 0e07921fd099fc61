"""precompute_cache.py and --precomputed_cache: a cached run follows the uncached one bit for bit (index with
buckets and flips, and WebDataset shards), a cache built with other settings is refused naming the difference, and a
killed precompute resumes without recomputing committed shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest_train import env_offline, make_index_dataset, tiny_args
from safetensors.torch import load_file

import precompute_cache as pc
import train_instantId_sdxl as train
from faceid.train import config
from faceid.train.errors import TrainingInputError, run_cli

ROOT = Path(__file__).resolve().parents[2]


def precompute(tiny, data_flag, data, out, *extra):
    argv = ["--pretrained_model_name_or_path", str(tiny / "stable-diffusion-xl-base-1.0"), data_flag, str(data),
            "--resolution", "64", "--output", str(out), "--no_progress", *extra]  # fmt: skip
    assert pc.main(pc.parse_args(argv)) == 0
    return argv


def tensors(cache: Path) -> dict:
    out = {}
    for f in sorted((cache / "parts").glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def trained(out: Path):
    from ip_adapter.weights import read_adapter

    proj, ip = read_adapter(out / "ip-adapter.bin")
    cn = load_file(str(out / "ControlNetModel" / "diffusion_pytorch_model.safetensors"))
    return {**proj, **ip, **{f"cn.{k}": v for k, v in cn.items()}}


def losses(out: Path):
    return [json.loads(x)["loss"] for x in (out / "samples" / "rank-0.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def index_cache(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    index = make_index_dataset(root / "d")
    argv = precompute(tiny_dir, "--data_json_file", index, root / "cache", "--aspect_ratio_buckets",
                      "--flip", "both", "--shard_size", "1")  # fmt: skip
    return index, root / "cache", argv


def test_cached_run_equals_uncached_run_bit_for_bit(tiny_dir, index_cache, tmp_path):
    index, cache, _ = index_cache
    common = ["--data_json_file", str(index), "--max_train_steps", "3", "--aspect_ratio_buckets",
              "--random_flip", "0.5", "--cross_id", "--checkpointing_steps", "0", "--log_phase_times"]  # fmt: skip
    train.main(train.parse_args(tiny_args(tiny_dir, tmp_path / "live", *common)))
    res = train.main(
        train.parse_args(tiny_args(tiny_dir, tmp_path / "cached", *common, "--precomputed_cache", str(cache)))
    )
    assert res.completed
    assert losses(tmp_path / "live") == losses(tmp_path / "cached")  # same floats, not merely close
    a, b = trained(tmp_path / "live"), trained(tmp_path / "cached")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the cached run never ran the VAE encoder or the text encoders
    live, cached = ([json.loads(x) for x in (tmp_path / d / "train_log.jsonl").read_text().splitlines()]
                    for d in ("live", "cached"))  # fmt: skip
    assert all(e["vae_time"] > 0 and e["text_time"] > 0 and e["fwd_bwd_time"] > 0 for e in live)
    assert all(e["vae_time"] == 0 and e["text_time"] == 0 and e["optimizer_time"] > 0 for e in cached)
    # both views of every image and every caption (plus the CFG-drop "") are in the cache
    keys = set(tensors(cache))
    assert sum(k.endswith("/1") and k.startswith("lat/") for k in keys) == 7
    assert (
        sum(k.endswith("/pooled") for k in keys)
        == len({json.loads(x)["caption"] for x in index.read_text().splitlines()}) + 1
    )


def test_shards_cached_run_equals_uncached(tiny_dir, tmp_path):
    from faceid.train.records import load_checked_records
    from faceid.train.webdataset_shards import write_shards

    records, _ = load_checked_records(str(make_index_dataset(tmp_path / "d")))
    write_shards(records, tmp_path / "shards", samples_per_shard=3)
    precompute(tiny_dir, "--train_shards", tmp_path / "shards", tmp_path / "cache", "--what", "latents")
    common = ["--train_shards", str(tmp_path / "shards"), "--max_train_steps", "2", "--cross_id",
              "--checkpointing_steps", "0"]  # fmt: skip
    train.main(train.parse_args(tiny_args(tiny_dir, tmp_path / "live", *common)))
    train.main(
        train.parse_args(
            tiny_args(tiny_dir, tmp_path / "cached", *common, "--precomputed_cache", str(tmp_path / "cache"))
        )
    )
    assert losses(tmp_path / "live") == losses(tmp_path / "cached")
    a, b = trained(tmp_path / "live"), trained(tmp_path / "cached")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cache_built_otherwise_is_refused_naming_the_difference(tiny_dir, index_cache, tmp_path, capsys):
    index, cache, _ = index_cache
    # Other resolution and no buckets: the run stops with the differences and what to do, exit 2.
    argv = tiny_args(tiny_dir, tmp_path / "o", "--data_json_file", str(index), "--max_train_steps", "1",
                     "--precomputed_cache", str(cache))  # fmt: skip
    argv[argv.index("--resolution") + 1] = "128"
    assert run_cli(train.main, train.parse_args, argv) == 2
    err = capsys.readouterr().err
    assert (
        "resolution: cache 64, this run 128" in err
        and "buckets: cache" in err
        and "precompute_cache.py" in err
    )
    # Another VAE (one weight changed): the fingerprint differs.
    from faceid.train import disk_cache as dc
    from faceid.train.model import load_encoders

    args = train.parse_args(tiny_args(tiny_dir, tmp_path / "o", "--data_json_file", str(index),
                                      "--aspect_ratio_buckets", "--precomputed_cache", str(cache)))  # fmt: skip
    enc = load_encoders(args, torch.float32, "cpu")
    with torch.no_grad():
        next(enc["vae"].parameters()).view(-1)[0] += 1e-3
    source = {"kind": "index", "path": os.path.abspath(index), "items": 7}
    from faceid.train.transforms import scaled_buckets

    with pytest.raises(TrainingInputError, match=r"vae\.sha256: cache"):
        config.open_disk_cache(args, enc, source, scaled_buckets(64), [], [])
    # A flip-less cache cannot serve --random_flip.
    man = json.loads((cache / dc.MANIFEST).read_text())
    man["flip"] = "none"
    noflip = tmp_path / "noflip"
    noflip.mkdir()
    (noflip / dc.MANIFEST).write_text(json.dumps(man))
    args.precomputed_cache, args.random_flip = str(noflip), 0.5
    with pytest.raises(TrainingInputError, match=r"flip: cache \"none\", this run \"both"):
        config.open_disk_cache(
            args, load_encoders(args, torch.float32, "cpu"), source, scaled_buckets(64), [], []
        )


def test_killed_precompute_resumes_without_recomputing(tiny_dir, index_cache, tmp_path):
    index, reference, argv = index_cache
    out = tmp_path / "cache"
    argv = [*argv[: argv.index("--output")], "--output", str(out), *argv[argv.index("--output") + 2 :]]
    env = {**env_offline(), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "precompute_cache.py"), *argv]
    with open(tmp_path / "log1.txt", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while time.time() < deadline and len(list((out / "parts").glob("w001-*.jsonl"))) < 3:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    first = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "parts").glob("w001-*")}
    committed = len([n for n in first if n.endswith(".jsonl")])
    total = len(list((reference / "parts").glob("w001-*.jsonl")))
    assert 3 <= committed < total, "the kill should land midway"
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"({committed} already done)" in proc.stdout
    for name, stat in first.items():  # committed shards untouched
        if name.endswith(".jsonl"):
            p = out / "parts" / name
            assert (p.stat().st_ino, p.stat().st_mtime_ns) == stat
            st = p.with_suffix(".safetensors")
            assert (st.stat().st_ino, st.stat().st_mtime_ns) == first[st.name]
    keys = [
        json.loads(x)["key"] for p in (out / "parts").glob("w001-*.jsonl") for x in p.read_text().splitlines()
    ]
    assert len(keys) == len(set(keys)) == total  # every work item once
    got, want = tensors(out), tensors(reference)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_trainer_and_cache_builder_share_flags_and_checks(tmp_path):
    """One definition of the model/data flags and the data-source check (faceid/train/config.py): the same
    command-line words mean the same to train_instantId_sdxl.py and precompute_cache.py."""
    index = make_index_dataset(tmp_path / "d")
    shared = ["--pretrained_model_name_or_path", "m", "--revision", "r", "--no-vae_in_weight_dtype",
              "--data_json_file", str(index), "--data_format", "index", "--data_root_path", "root",
              "--skip_bad_samples", "--resolution", "96", "--aspect_ratio_buckets", "--bucket_multiple", "32"]  # fmt: skip
    a = vars(train.parse_args(shared))
    b = vars(pc.parse_args([*shared, "--output", str(tmp_path / "c")]))
    keys = {k for k in b if k in a} - {"mixed_precision"}
    assert len(keys) == 13 and {k: a[k] for k in keys} == {k: b[k] for k in keys}
    two = pc.parse_args(["--data_json_file", str(index), "--train_shards", str(tmp_path), "--output", "c"])
    with pytest.raises(TrainingInputError, match="exactly one of"):
        pc.source_items(two)
    with pytest.raises(TrainingInputError, match="exactly one of"):
        train.check_args(train.parse_args(["--data_json_file", str(index), "--train_shards", str(tmp_path)]))
