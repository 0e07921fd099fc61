"""Remote WebDataset shards (faceid/train/shard_io.py, shard_streams.py): brace ranges, shard lists and manifests,
the same batches from local, http://, pipe: and fsspec shards (and after a resume), failures named after retries,
--skip_bad_shards recording what it left out, and the converter's upload."""

from __future__ import annotations

import importlib.util
import json
import shutil
import tarfile

import pytest
import torch
from conftest_train import make_index_dataset

from faceid.train import shard_io, shard_streams
from faceid.train.records import load_checked_records
from faceid.train.shard_io import ShardReadError, expand_braces, serve_folder
from faceid.train.webdataset_shards import ShardDataset, write_shards

KW = dict(resolution=64, seed=3, cross_id=True, random_crop=True, flip_prob=0.5)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """8 samples in 4 shards of 2."""
    root = tmp_path_factory.mktemp("shards")
    records, _ = load_checked_records(
        str(make_index_dataset(root / "d", n_people=3, per_person=2, singles=2))
    )
    write_shards(records, root / "s", samples_per_shard=2)
    return root / "s"


@pytest.fixture
def no_wait(monkeypatch):
    monkeypatch.setattr(shard_streams, "RETRY_DELAY", 0.0)


def batches(spec, workers=2, start=0, **kw):
    ds = ShardDataset(spec, batch_size=2, **KW, **kw)
    ds.set_epoch(1, start)
    return list(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers))


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if torch.is_tensor(x[k]):
                assert torch.equal(x[k], y[k]), k
            else:
                assert x[k] == y[k], k


def test_expand_braces_keeps_padding_and_multiplies_ranges():
    assert expand_braces("s-{008..011}.tar") == ["s-008.tar", "s-009.tar", "s-010.tar", "s-011.tar"]
    assert expand_braces("n{0..1}/s-{00..01}.tar") == [
        "n0/s-00.tar",
        "n0/s-01.tar",
        "n1/s-00.tar",
        "n1/s-01.tar",
    ]
    assert expand_braces("pipe:cat a.tar") == ["pipe:cat a.tar"]
    with pytest.raises(ValueError, match="empty range"):
        expand_braces("s-{3..1}.tar")


def test_resolve_lists_and_manifests(shards):
    _, _, pairs = shard_io.resolve(str(shards / "shard-{000001..000002}.tar"))
    assert [(loc, e["first"], e["count"]) for loc, e in pairs] == [
        (str(shards / "shard-000001.tar"), 2, 2),
        (str(shards / "shard-000002.tar"), 4, 2),
    ]
    man, _, pairs = shard_io.resolve(f"pipe:cat {shards}/shard-{{000000..000003}}.tar")
    assert man == f"pipe:cat {shards}/shards.json" and pairs[3][0] == f"pipe:cat {shards}/shard-000003.tar"
    with serve_folder(shards.parent) as url:
        man, manifest, pairs = shard_io.resolve(f"{url}/s/")
        assert man == f"{url}/s/shards.json" and manifest["total"] == 8
        assert [loc for loc, _ in pairs] == [f"{url}/s/shard-{i:06d}.tar" for i in range(4)]
    with pytest.raises(ShardReadError, match=r"shard-000004\.tar is not in .*shards.json"):
        shard_io.resolve(str(shards / "shard-{000003..000009}.tar"))
    with pytest.raises(ShardReadError, match="give the shard list"):
        shard_io.resolve(f"pipe:cat {shards}/shards.json")
    if importlib.util.find_spec("s3fs") is None:  # the optional package is named, not a traceback
        with pytest.raises(ShardReadError, match=r"s3://bucket/x/shards.json: .*pip install s3fs"):
            shard_io.resolve("s3://bucket/x/")


def test_remote_sources_give_the_local_batches_and_resume(shards):
    local = batches(shards)
    assert len(local) == 4
    with serve_folder(shards.parent) as url:
        assert_same(local, batches(f"{url}/s/shard-{{000000..000003}}.tar"))
        assert_same(local[1:], batches(f"{url}/s", start=1))  # resumed at batch 1, workers swap batches
    assert_same(local, batches(f"pipe:cat {shards}/shard-{{000000..000003}}.tar", workers=1))


def test_lanes_read_each_shard_once_whatever_the_workers(shards):
    local = batches(shards, workers=0, lanes=2)
    assert len(local) == 4 and sorted(i for b in local for i in b["index"]) == list(range(8))
    for r, b in enumerate(local):  # batch r from lane r % 2: shards 0 and 2, or 1 and 3 (samples 2s, 2s + 1)
        assert {i // 2 for i in b["index"]} <= ({0, 2}, {1, 3})[r % 2]
    assert_same(local, batches(shards, workers=1, lanes=2))
    size = sum(p.stat().st_size for p in shards.glob("*.tar"))
    manifest = (shards / "shards.json").stat().st_size
    sent = [0]
    with serve_folder(shards.parent, sent) as url:
        assert_same(local, batches(f"{url}/s", workers=2, lanes=2))
        assert sent[0] - manifest <= size  # a worker per lane: no shard is streamed twice
        assert_same(
            local[1:], batches(f"{url}/s", workers=2, lanes=2, start=1)
        )  # resumed: workers swap lanes
    with pytest.raises(ValueError, match="4 shards for 1 processes x 8 lanes"):
        ShardDataset(shards, lanes=8)


def test_fsspec_source(shards):
    fsspec = pytest.importorskip("fsspec")  # optional dependency (comes with huggingface_hub)
    fs = fsspec.filesystem("memory")
    for p in shards.iterdir():
        fs.pipe(f"/wds/{p.name}", p.read_bytes())
    assert_same(batches(shards, workers=0), batches("memory://wds", workers=0))


def test_stream_keeps_only_what_the_worker_needs(shards):
    reader = shard_streams.StreamReader()
    got = reader.read(f"pipe:cat {shards}/shard-000001.tar", {3}, exts=("json", "emb.npy"))
    assert list(got) == [3] and sorted(got[3]) == ["emb.npy", "json"]
    assert json.loads(got[3]["json"])["id"] == "003"


def test_failed_shards_are_named_retried_and_skipped(shards, tmp_path, no_wait):
    site = tmp_path / "site"
    shutil.copytree(shards, site)
    data = (site / "shard-000002.tar").read_bytes()
    (site / "shard-000002.tar").write_bytes(data[: len(data) // 2])  # truncated mid-member
    (site / "shard-000003.tar").unlink()  # 404
    with serve_folder(site) as url:
        with pytest.raises(ShardReadError, match=r"shard-00000[23]\.tar unreadable after"):
            batches(url, workers=0, retries=1)
        log = tmp_path / "bad.jsonl"
        got = batches(url, workers=2, retries=1, skip_bad_shards=True, bad_shards_file=log)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    by_shard = {x["shard"]: x for x in lines}
    assert set(by_shard) == {f"{url}/shard-000002.tar", f"{url}/shard-000003.tar"}
    assert by_shard[f"{url}/shard-000002.tar"]["attempts"] == 2  # retried
    assert by_shard[f"{url}/shard-000003.tar"]["attempts"] == 1  # a 404 is not
    assert "404" in by_shard[f"{url}/shard-000003.tar"]["error"]
    seen = [i for b in got for i in b["index"]]
    local = [i for b in batches(shards, workers=0) for i in b["index"]]
    # every batch still comes; samples of the bad shards (4..7) are left out, a batch of only those repeats one
    assert len(got) == 4 and {i for i in local if i < 4} == {i for i in seen if i < 4} and max(seen) < 4


def test_server_gone_and_failing_command_are_named(shards, no_wait):
    with serve_folder(shards.parent) as url:
        ds = ShardDataset(f"{url}/s", batch_size=2, retries=2, **KW)
    with pytest.raises(
        ShardReadError, match=rf"shard {url}/s/shard-0000\d\d\.tar unreadable after 3 attempt"
    ):
        next(iter(ds))
    with pytest.raises(ShardReadError, match=r"status 3.*gone"):
        shard_streams.StreamReader(retries=0).read("pipe:echo gone >&2; exit 3 # shard-000000.tar", {0})


def test_truncated_stream_in_cache_views_is_named(shards, tmp_path, no_wait):
    bad = tmp_path / "b"
    shutil.copytree(shards, bad)
    with tarfile.open(bad / "shard-000000.tar") as tar:
        cut = next(m.offset for m in tar.getmembers() if m.name.startswith("000000001"))
    data = (bad / "shard-000000.tar").read_bytes()
    (bad / "shard-000000.tar").write_bytes(data[:cut])  # ends cleanly before sample 1: it is missing
    with pytest.raises(
        ShardReadError, match=r"shard-000000\.tar unreadable.*1 sample\(s\) missing, first 000000001"
    ):
        list(ShardDataset(f"pipe:cat {bad}/shard-{{000000..000003}}.tar", retries=0).cache_views())
    ok = ShardDataset(f"pipe:cat {shards}/shard-{{000000..000003}}.tar", resolution=64)
    local = ShardDataset(shards, resolution=64)
    for (m1, v1), (m2, v2) in zip(ok.cache_views(), local.cache_views(), strict=True):
        assert m1 == m2 and torch.equal(v1(True), v2(True))


def test_converter_uploads_through_pipe_and_fsspec(tmp_path):
    from faceid.train import webdataset_shards as wds

    index = make_index_dataset(tmp_path / "d")
    dest = tmp_path / "bucket"
    dest.mkdir()
    cmd = f"pipe:cat > {dest}/{{}}"
    args = wds.parse_args(["--index", str(index), "--out", str(tmp_path / "stage"), "--samples_per_shard", "3",
                           "--upload", cmd, "--no_keep_local"])  # fmt: skip
    wds.main(args)
    assert sorted(p.name for p in dest.iterdir()) == ["shard-000000.tar", "shard-000001.tar",
                                                      "shard-000002.tar", "shards.json"]  # fmt: skip
    assert list((tmp_path / "stage").iterdir()) == []
    wds.write_shards(load_checked_records(str(index))[0], tmp_path / "ref", samples_per_shard=3)
    for p in dest.iterdir():
        assert p.read_bytes() == (tmp_path / "ref" / p.name).read_bytes()
    fsspec = pytest.importorskip("fsspec")
    wds.write_shards(load_checked_records(str(index))[0], tmp_path / "s2", 3, upload="memory://up")
    assert fsspec.filesystem("memory").cat("/up/shard-000001.tar") == (dest / "shard-000001.tar").read_bytes()
    with pytest.raises(ShardReadError, match=r"shard-000000\.tar: upload command exited with status 1"):
        wds.write_shards(load_checked_records(str(index))[0], tmp_path / "s3", 3, upload="pipe:exit 1")
