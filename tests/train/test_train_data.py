"""Training data: every index format, the bad-data check, cross-identity pairing, transforms, the sampler and
the WebDataset shards (no models needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest_train import (
    KPS,
    make_faceid6m_dataset,
    make_index_dataset,
    make_mfacetech_dataset,
    make_seed_dataset,
)
from PIL import Image

from faceid.face.kps import draw_kps_array
from faceid.train.dataset import EpochBatchSampler, FaceTrainDataset, collate
from faceid.train.records import BadDataError, load_checked_records, load_embedding, read_records
from faceid.train.transforms import plan_crop, scaled_buckets, transform_kps


@pytest.mark.parametrize(
    "maker, fmt", [(make_index_dataset, "index"), (make_mfacetech_dataset, "mfacetech"),
                   (make_seed_dataset, "seed"), (make_faceid6m_dataset, "faceid6m")],
)  # fmt: skip
def test_every_format_reads_and_loads(tmp_path, maker, fmt):
    path = maker(tmp_path / fmt)
    records, bad = load_checked_records(str(path))
    assert not bad and len(records) >= 4
    for r in records:
        assert r.width and r.height and np.asarray(r.kps).shape == (5, 2)
        assert load_embedding(r.embedding).shape == (512,)
    ds = FaceTrainDataset(records, resolution=64)
    item = ds[0]
    assert item["pixel_values"].shape == (3, 64, 64) and item["kps_image"].shape == (3, 64, 64)
    if fmt == "faceid6m":
        assert records[2].image.endswith("2.png") and records[2].embedding["file"].endswith("2.npy")
        assert records[2].extra["face_image"].endswith("face/2.png")
    if fmt == "mfacetech":
        assert records[0].caption.startswith("myolv1")


def test_bad_data_report_names_items_and_skip(tmp_path):
    path = make_index_dataset(tmp_path)
    lines = path.read_text().splitlines()
    objs = [json.loads(x) for x in lines]
    objs[1]["image"] = "imgs/missing.png"
    objs[2]["embedding"] = {"file": "emb/nope.npy"}
    objs[3]["kps"] = [[500, 10]] + KPS[1:]
    np.save(tmp_path / "emb" / "short.npy", np.zeros(128, np.float32))
    objs[4]["embedding"] = {"file": "emb/short.npy"}
    text = "\n".join(json.dumps(o) for o in objs) + "\n{not json\n"
    path.write_text(text)
    with pytest.raises(BadDataError) as err:
        load_checked_records(str(path))
    msg = str(err.value)
    assert "5 of 8" in msg
    for needle in ("missing.png", "nope.npy", "outside", "128 values", "malformed", f"{path}:8"):
        assert needle in msg, needle
    records, bad = load_checked_records(str(path), skip_bad=True)
    assert len(records) == 3 and len(bad) == 5
    assert {r.key for r in records} == {"000", "005", "006"}


def test_cross_id_never_pairs_with_itself_when_possible(tmp_path):
    records, _ = load_checked_records(str(make_index_dataset(tmp_path, n_people=3, per_person=3, singles=2)))
    ds = FaceTrainDataset(
        records, resolution=64, cross_id=True, seed=3, face_drop=0, text_drop=0, both_drop=0
    )
    seen = set()
    for epoch in range(4):
        for i in range(len(records)):
            item = ds[(i, epoch)]
            j = item["ref_index"]
            assert records[j].person_id == records[i].person_id
            if len(ds.picker.groups[records[i].person_id]) > 1:
                assert j != i
                seen.add((i, j))
            else:
                assert j == i  # one-image person: their own
            np.testing.assert_array_equal(item["face_embeds"].numpy(), load_embedding(records[j].embedding))
            assert ds[(i, epoch)]["ref_index"] == j  # deterministic
    assert len(seen) > len(records) - 2  # not always the same partner
    no_cross = FaceTrainDataset(records, resolution=64)
    assert all(no_cross[i]["ref_index"] == i for i in range(len(records)))
    half = FaceTrainDataset(records, resolution=64, cross_id=True, cross_id_prob=0.5)
    refs = [half[(i, e)]["ref_index"] == i for e in range(6) for i in range(6)]
    assert 0 < sum(refs) < len(refs)


def test_fixed_pairs_are_honoured(tmp_path):
    path = make_index_dataset(tmp_path, refs=True)
    objs = [json.loads(x) for x in path.read_text().splitlines()]
    objs[1]["reference"] = {"embedding": {"file": "emb/shard-00000.npy", "row": 5}}
    objs[2]["reference"] = {"ids": ["003", "004"]}
    path.write_text("\n".join(json.dumps(o) for o in objs) + "\n")
    records, _ = load_checked_records(str(path))
    ds = FaceTrainDataset(records, resolution=64, cross_id=True, face_drop=0, text_drop=0, both_drop=0)
    last = len(records) - 1
    for e in range(3):
        assert ds[(0, e)]["ref_index"] == last
        np.testing.assert_array_equal(ds[(0, e)]["face_embeds"], load_embedding(records[last].embedding))
        np.testing.assert_array_equal(
            ds[(1, e)]["face_embeds"], np.load(tmp_path / "emb" / "shard-00000.npy")[5]
        )
    assert {ds[(2, e)]["ref_index"] for e in range(12)} == {3, 4}
    objs[0]["reference"] = {"id": "nobody"}
    path.write_text("\n".join(json.dumps(o) for o in objs) + "\n")
    with pytest.raises(BadDataError, match="nobody"):
        load_checked_records(str(path))


def _by_hand(kps, w, h, tw, th, top, left, flip):
    s = max(tw / w, th / h)
    rw, rh = max(tw, round(w * s)), max(th, round(h * s))
    out = np.array(kps, np.float64)
    out[:, 0] = out[:, 0] * rw / w - left
    out[:, 1] = out[:, 1] * rh / h - top
    if flip:
        out[:, 0] = tw - out[:, 0]
        out = out[[1, 0, 2, 4, 3]]
    return out


@pytest.mark.parametrize("buckets", [False, True])
def test_kps_image_matches_hand_transformed_keypoints(tmp_path, buckets):
    records, _ = load_checked_records(str(make_index_dataset(tmp_path)))
    bks = scaled_buckets(64) if buckets else None
    ds = FaceTrainDataset(records, resolution=64, random_crop=True, flip_prob=0.5, buckets=bks, seed=5)
    flips = 0
    for e in range(3):
        for i, r in enumerate(records):
            item = ds[(i, e)]
            th, tw = item["target_size"].tolist()
            top, left = item["crop_top_left"].tolist()
            assert item["original_size"].tolist() == [r.height, r.width]
            plan = ds.plan(i, e)
            flips += plan.flip
            hand = _by_hand(r.kps, r.width, r.height, tw, th, top, left, plan.flip)
            np.testing.assert_allclose(item["kps"].numpy(), hand, atol=1e-4)
            expect = draw_kps_array((tw, th), hand)
            assert item["kps_image"].dtype == torch.uint8
            np.testing.assert_array_equal(item["kps_image"].permute(1, 2, 0).numpy(), expect)
            if buckets:
                assert (tw, th) in bks and item["pixel_values"].shape[1:] == (th, tw)
    assert flips > 0


def test_crop_flip_moves_pixels_like_keypoints(tmp_path):
    """A bright dot at a keypoint lands where the transformed keypoint says."""
    w, h = 120, 90
    arr = np.zeros((h, w, 3), np.uint8)
    arr[40:44, 30:34] = 255  # dot centre (32, 42)
    img = Image.fromarray(arr)
    from faceid.train.transforms import apply_image

    rng = np.random.default_rng(0)
    for _ in range(5):
        plan = plan_crop(w, h, (48, 48), random_crop=True, flip_prob=0.5, rng=rng)
        out = apply_image(img, plan).astype(np.float32).mean(-1)
        kp = transform_kps([[32, 42]] * 5, plan)[0]
        if out.max() > 0:
            ys, xs = np.nonzero(out > out.max() / 2)
            assert abs(xs.mean() + 0.5 - kp[0]) < 1.0 and abs(ys.mean() + 0.5 - kp[1]) < 1.0


def test_cfg_drops_zero_face_and_blank_text(tmp_path):
    records, _ = load_checked_records(str(make_index_dataset(tmp_path)))
    ds = FaceTrainDataset(records, resolution=64, face_drop=0.3, text_drop=0.3, both_drop=0.3)
    items = [ds[(i, e)] for e in range(8) for i in range(len(records))]
    for it in items:
        assert (it["caption"] == "") == it["drop_text"]
        assert (it["face_embeds"].abs().sum() == 0).item() == it["drop_face"]
    kinds = {(it["drop_text"], it["drop_face"]) for it in items}
    assert kinds == {(False, False), (True, False), (False, True), (True, True)}


def test_sampler_is_deterministic_split_and_resumable():
    groups = [list(range(0, 7)), list(range(7, 12))]
    full = EpochBatchSampler(groups, 2, seed=1)
    full.set_epoch(3)
    seq = list(full)
    assert all(len(b) == 2 for b in seq) and len(seq) == full.num_batches()
    for b in seq:  # one bucket per batch
        assert len({i < 7 for i, _ in b}) == 1
    again = EpochBatchSampler(groups, 2, seed=1)
    again.set_epoch(3, start_batch=2)
    assert list(again) == seq[2:]
    other = EpochBatchSampler(groups, 2, seed=1)
    other.set_epoch(4)
    assert list(other) != seq
    ranks = [EpochBatchSampler(groups, 2, seed=1, rank=r, world_size=2) for r in range(2)]
    for s in ranks:
        s.set_epoch(3)
    r0, r1 = list(ranks[0]), list(ranks[1])
    assert len(r0) == len(r1)
    covered = {i for b in r0 + r1 for i, _ in b}
    assert covered == set(range(12))


def test_shards_round_trip_and_split(tmp_path):
    from faceid.train.webdataset_shards import ShardDataset, write_shards

    records, _ = load_checked_records(
        str(make_index_dataset(tmp_path / "d", n_people=3, per_person=2, singles=2))
    )
    write_shards(records, tmp_path / "s", samples_per_shard=2)
    kw = dict(resolution=64, seed=2, cross_id=True, face_drop=0, text_drop=0, both_drop=0)
    ds = ShardDataset(tmp_path / "s", batch_size=2, **kw)
    ds.set_epoch(1)
    batches = list(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2))
    assert len(batches) == ds.num_batches() == 4
    seen = [i for b in batches for i in b["index"]]
    assert sorted(seen) == list(range(8))
    for b in batches:
        for i, j, emb in zip(b["index"], b["ref_index"], b["face_embeds"]):
            if records[i].person_id.startswith("p"):
                assert j != i and records[j].person_id == records[i].person_id
            np.testing.assert_array_equal(emb.numpy(), load_embedding(records[j].embedding))
    ds.set_epoch(1, start_batch=1)
    resumed = list(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2))
    assert [b["index"] for b in resumed] == [b["index"] for b in batches[1:]]
    torch.testing.assert_close(resumed[0]["pixel_values"], batches[1]["pixel_values"])
    ranks = [ShardDataset(tmp_path / "s", batch_size=2, rank=r, world_size=2, **kw) for r in range(2)]
    got = [[i for b in r for i in b["index"]] for r in ranks]
    assert not set(got[0]) & set(got[1]) and len(got[0]) == len(got[1]) == 4


def test_collate_and_read_records_report_parse_errors(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"image": "a.png", "embedding": {"file": "e.npy"}}\n[1, 2]\n')
    records, bad = read_records(str(path))
    assert len(records) == 1 and bad and "x.jsonl:2" in bad[0][0]
    out = collate([{"a": torch.zeros(2), "b": "s"}, {"a": torch.ones(2), "b": "t"}])
    assert out["a"].shape == (2, 2) and out["b"] == ["s", "t"]


def test_loader_batches_equal_an_independent_computation(tmp_path):
    """What the trainer consumes, through a worker process (batches written into the shared-memory slots of
    faceid.train.batch_pool, or torch's shared memory when no slot is free; planes split by OpenCV, crop at scale 1
    without resampling, pixels read from PIL's storage), equals PIL's resize of the crop box, mirrored and made
    channel-first with numpy: contiguous uint8 [B, 3, H, W], the same bytes. A slot is reused once the last view
    of its batch is gone."""
    import gc

    from faceid.face.images import load_image
    from faceid.train.batch_pool import map_loader

    records, _ = load_checked_records(str(make_index_dataset(tmp_path)))  # 64×80 / 80×64: scale 1 at 64 px
    ds = FaceTrainDataset(records, resolution=64, random_crop=True, flip_prob=0.5, seed=3)
    batches = [[(i, e), (j, e)] for e in range(3) for i, j in ((0, 1), (2, 3), (4, 5))]

    class Sampler(list):
        batch_size = 2

    loader = map_loader(ds, Sampler(batches), num_workers=1)
    held = list(loader)  # all nine held: the worker's four slots, then torch's way
    assert loader.pool.fallbacks == 5 and loader.pool.busy.tolist() == [1] * 4
    scale_one = flips = 0
    for pairs, batch in zip(batches, held):
        assert batch["pixel_values"].is_contiguous() and batch["pixel_values"].dtype == torch.uint8
        for b, (i, e) in enumerate(pairs):
            plan, r = ds.plan(i, e), records[i]
            sx, sy = plan.width / plan.resized[0], plan.height / plan.resized[1]
            box = (plan.left * sx, plan.top * sy, (plan.left + 64) * sx, (plan.top + 64) * sy)
            img = np.array(load_image(r.image).resize((64, 64), Image.BILINEAR, box=box, reducing_gap=3.0))
            kps = draw_kps_array((64, 64), transform_kps(r.kps, plan))
            if plan.flip:
                img = img[:, ::-1]
            np.testing.assert_array_equal(batch["pixel_values"][b].numpy(), img.transpose(2, 0, 1))
            np.testing.assert_array_equal(batch["kps_image"][b].numpy(), kps.transpose(2, 0, 1))
            scale_one += plan.resized == (r.width, r.height)
            flips += plan.flip
    assert scale_one >= 6 and 0 < flips < 18
    pixels = held[0]["pixel_values"][1]  # a view outlives its batch: the slot stays taken
    pool = loader.pool
    del held, batch
    gc.collect()
    assert pool.busy.tolist() == [1, 0, 0, 0]
    del pixels
    assert pool.busy.tolist() == [0] * 4
    streamed = [
        b["pixel_values"].sum().item() for b in loader
    ]  # one batch at a time: every one through a slot
    assert loader.pool.fallbacks == 0 and loader.pool is not pool
    assert streamed == [ds[pairs[0]]["pixel_values"].sum().item() + ds[pairs[1]]["pixel_values"].sum().item()
                        for pairs in batches]  # fmt: skip
