"""train_instantId_sdxl.py on remote shards: a run from pipe:cat killed and resumed from http://127.0.0.1 ends
bit-identical to a straight run from the same shards on disk (batches, losses, weights; 2 lanes read by 0, 1 and
2 loader workers),
and an unreadable shard stops the run naming it or, with --skip_bad_shards, is listed while the run finishes."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest_train import make_index_dataset, tiny_args

import train_instantId_sdxl as train
from faceid.train.config import TrainHooks
from faceid.train.errors import run_cli
from faceid.train.records import load_checked_records
from faceid.train.shard_io import serve_folder
from faceid.train.webdataset_shards import write_shards
from ip_adapter.weights import read_adapter

COMMON = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--cross_id", "--random_crop",
          "--random_flip", "0.5", "--shard_lanes", "2", "--dataloader_num_workers"]  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("rshards")
    records, _ = load_checked_records(str(make_index_dataset(root / "d")))
    write_shards(records, root / "site" / "s", samples_per_shard=2)  # 7 samples: 2 + 2 + 2 + 1
    return root / "site" / "s"


def run(tiny, out, *extra, hooks=None):
    return train.main(train.parse_args(tiny_args(tiny, out, *extra)), hooks=hooks)


def outcome(out):
    """Per-step (batches, loss) and the exported weights."""
    steps = {}
    for line in (out / "samples" / "rank-0.jsonl").read_text().splitlines():
        e = json.loads(line)
        steps[e["step"]] = (e["batches"], e["loss"])  # a resumed run re-does a step: the last record counts
    image_proj, ip = read_adapter(out / "ip-adapter.bin")
    cn = (out / "ControlNetModel" / "diffusion_pytorch_model.safetensors").read_bytes()
    return steps, {k: v.clone() for k, v in {**image_proj, **ip}.items()}, cn


def assert_identical(a, b):
    assert a[0] == b[0]  # same batches, same losses (floats compared exactly)
    assert a[1].keys() == b[1].keys() and all(a[1][k].equal(b[1][k]) for k in a[1])
    assert a[2] == b[2]


def test_pipe_run_killed_and_resumed_over_http_equals_local(tiny_dir, shards, tmp_path):
    run(tiny_dir, tmp_path / "local", "--train_shards", str(shards), *COMMON, "0")
    local = outcome(tmp_path / "local")
    assert sorted(local[0]) == [1, 2, 3, 4]
    out = tmp_path / "remote"
    pipe = f"pipe:cat {shards}/shard-{{000000..000003}}.tar"
    res = run(tiny_dir, out, "--train_shards", pipe, *COMMON, "2", hooks=TrainHooks(stop_after_steps=3))
    assert not res.completed  # killed after step 3; checkpoint-2 is the last complete one
    with serve_folder(shards.parent) as url:  # the same shards, now from a web server
        run(tiny_dir, out, "--train_shards", f"{url}/s/", *COMMON, "1", "--resume_from_checkpoint", "latest")
    assert_identical(local, outcome(out))


def test_unreadable_shard_stops_the_run_or_is_skipped_and_listed(tiny_dir, shards, tmp_path, capsys):
    site = tmp_path / "site"
    shutil.copytree(shards, site)
    data = (site / "shard-000001.tar").read_bytes()
    (site / "shard-000001.tar").write_bytes(data[: len(data) // 2])
    args = ["--max_train_steps", "2", "--shard_retries", "1", "--dataloader_num_workers", "1"]
    with serve_folder(site) as url:
        bad = f"{url}/shard-000001.tar"
        capsys.readouterr()
        assert run_cli(train.main, train.parse_args, tiny_args(tiny_dir, tmp_path / "o1", "--train_shards", url, *args)) == 2  # fmt: skip
        err = capsys.readouterr().err
        assert f"shard {bad} unreadable after 2 attempt(s)" in err and "--skip_bad_shards" in err, err
        assert "Traceback" not in err
        res = run(tiny_dir, tmp_path / "o2", "--train_shards", url, *args, "--skip_bad_shards")
    assert res.completed and (tmp_path / "o2" / "ip-adapter.bin").exists()
    lines = [json.loads(x) for x in (tmp_path / "o2" / "bad_shards.jsonl").read_text().splitlines()]
    assert {x["shard"] for x in lines} == {bad} and lines[0]["samples_skipped"] > 0
    trained = {i for line in (tmp_path / "o2" / "samples" / "rank-0.jsonl").read_text().splitlines()
               for b in json.loads(line)["batches"] for i in b["index"]}  # fmt: skip
    assert trained and not trained & {2, 3}  # shard 1 holds samples 2 and 3
