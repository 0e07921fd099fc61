"""Pair rules: perceptual hashes of face crops, head pose from keypoints, near-duplicates by hash, pose preference."""

from __future__ import annotations

import io
import math

import numpy as np
from conftest_mine import photo
from PIL import Image

from faceid.face.regions import ARCFACE_TEMPLATE
from faceid.mine import pairs as P


def _natural(seed: int, size=(160, 128)) -> Image.Image:
    """A smooth random picture (low-frequency content, like a photo)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (6, 8, 3)).astype(np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def test_hashes_survive_reencoding_and_resizing_but_separate_pictures():
    for fn in (P.phash, P.dhash):
        a = _natural(1)
        b = io.BytesIO()
        a.save(b, format="JPEG", quality=70)
        copies = [Image.open(io.BytesIO(b.getvalue())), a.resize((80, 64)), a.resize((320, 256))]
        base = fn(a)
        assert all(P.hamming(base, fn(c)) <= P.DEFAULT_HASH_MAX_DIST for c in copies)
        others = [fn(_natural(s)) for s in range(2, 12)]
        assert min(int(P.hamming(base, o)) for o in others) > 12


def test_face_crop_hash_ignores_what_is_around_the_face():
    from faceid.tiny.world import find_face_box

    img = photo(0, 0, size=256)
    # the same face pasted onto another background (a re-crop / re-post with a border)
    wide = Image.new("RGB", (400, 360), (90, 10, 10))
    wide.paste(img, (70, 50))
    box_a = find_face_box(np.asarray(img))
    box_b = (box_a[0] + 70, box_a[1] + 50, box_a[2] + 70, box_a[3] + 50)
    assert P.hamming(P.phash(P.face_crop(img, box_a)), P.phash(P.face_crop(wide, box_b))) <= 2


def test_head_pose_from_keypoints():
    kps = ARCFACE_TEMPLATE.astype(np.float64)
    yaw, roll = P.head_pose(kps)
    assert abs(yaw) < 3 and abs(roll) < 1
    c, s = math.cos(math.radians(20)), math.sin(math.radians(20))
    rotated = (kps - kps.mean(0)) @ np.array([[c, s], [-s, c]]) + 100
    assert abs(P.head_pose(rotated)[1] - 20) < 1 and abs(P.head_pose(rotated)[0]) < 3
    turned = kps.copy()
    turned[2, 0] += 12  # nose towards one eye: the head turned
    assert P.head_pose(turned)[0] > 25
    assert np.isnan(P.head_poses([None, [[1, 2]]])).all()


def _person(rng, n, d=512):
    c = rng.standard_normal(d).astype(np.float32)
    v = c / np.linalg.norm(c) + 0.7 * rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(d)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_equal_hash_is_a_duplicate_even_when_the_embeddings_differ():
    rng = np.random.default_rng(0)
    x = _person(rng, 5)
    labels = np.zeros(5, np.int64)
    hashes = np.array([0x0123456789ABCDEF, 0xFEDCBA9876543210, 0x00FF00FF00FF00FF, 0xF0F0F0F0F0F0F0F0,
                       0x0123456789ABCDEF ^ 1], np.uint64)  # fmt: skip  # item 4 re-crops item 0: one bit off
    pr = P.mine_pairs(x, labels, hashes)
    assert 4 not in pr.refs[0] and 0 not in pr.refs[4]
    assert sorted(pr.refs[1]) == [0, 2, 3, 4] and pr.photos[0] == 4 and pr.dup_group[4] == pr.dup_group[0]
    # transitive: 0 ~ 4 by hash, 4 ~ 3 by cosine  ->  0 and 3 are the same picture too
    x[3] = x[4]
    pr = P.mine_pairs(x, labels, hashes)
    assert 3 not in pr.refs[0] and pr.photos[0] == 3
    # an unreadable image (NO_HASH) is never a duplicate by hash
    pr = P.mine_pairs(_person(rng, 3), np.zeros(3, np.int64), np.array([0, 0, 0xFFFF0000FFFF], np.uint64))
    assert sorted(pr.refs[0]) == [1, 2]


def test_pose_change_preferred_and_refs_capped():
    rng = np.random.default_rng(1)
    x = _person(rng, 6)
    poses = np.array([[0, 0], [5, 0], [40, 0], [-30, 0], [10, 15], [2, 1]], np.float64)
    pr = P.mine_pairs(x, np.zeros(6, np.int64), poses=poses, prefer_pose_change=True, max_refs=2)
    assert pr.refs[0] == [2, 3]  # the largest yaw changes first
    assert all(len(r) == 2 for r in pr.refs) and pr.num_pairs == 12
    # below min_pair_cos: not the same person on its own, never a pair
    x2 = np.concatenate([x[:2], -x[2:3]])
    pr = P.mine_pairs(x2, np.zeros(3, np.int64))
    assert 2 not in pr.refs[0] and pr.refs[2] == []
