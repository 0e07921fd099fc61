"""Cross-identity pairs inside mined persons: for each target, references that are the same person but a
*different photo*.

Near-duplicates (the same picture re-posted, re-encoded or re-cropped) are never paired: two photos are duplicates
when their embeddings' cosine is at least ``near_dup_cos`` or the perceptual hashes of their face crops differ in at
most ``hash_max_dist`` bits; duplicates are grouped transitively and a target's references come from other groups
only. References must also verify as the same person on their own (cosine ≥ ``min_pair_cos``), not only through
the cluster's chain. With ``prefer_pose_change`` the references with the largest head-angle change (yaw/roll
estimated from the 5 keypoints) come first, as CrossFaceID wants changed attributes between input and target.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from faceid.face.kps import head_pose, head_poses  # noqa: F401  (mine_identities.py and tests use them here)

DEFAULT_NEAR_DUP_COS = 0.95
DEFAULT_HASH_MAX_DIST = 4  # of 64 bits
DEFAULT_MIN_PAIR_COS = 0.3  # ArcFace's verification threshold on LFW is ~0.28-0.32 (docs/mining.md)
DEFAULT_MAX_REFS = 8
NO_HASH = np.uint64(0)  # hash of an unreadable crop: never equal to anything (see near_duplicate_groups)


# ----------------------------------------------------------------------------------------------------------
# Perceptual hashes (64-bit, numpy only)


def _gray(image, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(image.convert("L").resize(size, Image.Resampling.LANCZOS), dtype=np.float64)


def _pack(bits: np.ndarray) -> np.uint64:
    return np.uint64(int.from_bytes(np.packbits(bits.reshape(-1).astype(np.uint8)).tobytes(), "big"))


def dhash(image, size: int = 8) -> np.uint64:
    """Difference hash: is each pixel brighter than its right neighbour, on a (size+1) x size grey thumbnail."""
    g = _gray(image, (size + 1, size))
    return _pack(g[:, 1:] > g[:, :-1])


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    m = np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


def phash(image, size: int = 8, factor: int = 4) -> np.uint64:
    """DCT hash: the ``size`` x ``size`` lowest frequencies of a 2-D DCT of a (size*factor)^2 grey thumbnail,
    each compared with their median (the DC term excluded from the median)."""
    n = size * factor
    m = _dct_matrix(n)
    low = (m @ _gray(image, (n, n)) @ m.T)[:size, :size]
    return _pack(low > np.median(low.reshape(-1)[1:]))


HASHES = {"phash": phash, "dhash": dhash}


def hamming(a, b) -> np.ndarray:
    """Bit differences between 64-bit hashes (broadcasting)."""
    v = np.bitwise_xor(np.asarray(a, np.uint64), np.asarray(b, np.uint64))
    return np.unpackbits(v[..., None].view(np.uint8), axis=-1).sum(-1)


def face_crop(image, bbox, margin: float = 0.15):
    """The face box grown by ``margin`` on each side, clipped to the image (whole image without a box): what a
    re-crop of the same picture keeps."""
    if bbox is None:
        return image
    x1, y1, x2, y2 = (float(v) for v in bbox)
    mw, mh = (x2 - x1) * margin, (y2 - y1) * margin
    w, h = image.size
    box = (
        max(0, int(x1 - mw)),
        max(0, int(y1 - mh)),
        min(w, int(math.ceil(x2 + mw))),
        min(h, int(math.ceil(y2 + mh))),
    )
    if box[2] - box[0] < 2 or box[3] - box[1] < 2:
        return image
    return image.crop(box)


def hash_images(
    items: list[tuple[str, list | None]], kind: str = "phash", threads: int = 4, progress: bool = False
) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Hash the face crop of each ``(image path, bbox)``; returns ``(hashes uint64, [(item, error)])``. An
    unreadable image gets :data:`NO_HASH` and an error entry (its pairs then rest on the cosine alone)."""
    from tqdm import tqdm

    from faceid.face.images import load_image

    fn = HASHES[kind]

    def one(item):
        path, bbox = item
        try:
            return fn(face_crop(load_image(path), bbox)), None
        except Exception as exc:  # noqa: BLE001 - any decoder error: report, go on
            return NO_HASH, f"{path}: {exc}"

    out = np.zeros(len(items), np.uint64)
    errors = []
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for n, (h, err) in enumerate(
            tqdm(pool.map(one, items), total=len(items), desc="hash", disable=not progress, mininterval=2.0)
        ):
            out[n] = h
            if err:
                errors.append((n, err))
    return out, errors


# ----------------------------------------------------------------------------------------------------------
# Pairs


@dataclass
class PairResult:
    refs: list  # per item: list of reference rows (empty: no different photo of the person)
    dup_group: np.ndarray  # per item: duplicate-group id (items sharing one are the same picture)
    photos: np.ndarray  # per cluster: distinct photos
    num_pairs: int
    dup_pairs_excluded: int


def near_duplicate_groups(
    cos: np.ndarray, hashes: np.ndarray | None, near_dup_cos: float, hash_max_dist: int
) -> np.ndarray:
    """Duplicate-group label per member of one cluster (transitive closure of "cosine ≥ near_dup_cos or hash
    distance ≤ hash_max_dist")."""
    m = len(cos)
    dup = cos >= near_dup_cos
    if hashes is not None:
        valid = hashes != NO_HASH
        close = hamming(hashes[:, None], hashes[None, :]) <= hash_max_dist
        dup |= close & valid[:, None] & valid[None, :]
    np.fill_diagonal(dup, True)
    labels = np.arange(m)
    # label propagation to the minimum: at most m rounds, usually 1-2
    for _ in range(m):
        new = np.where(dup, labels[None, :], m).min(1)
        if np.array_equal(new, labels):
            break
        labels = new
    return labels


def mine_pairs(
    x: np.ndarray,
    labels: np.ndarray,
    hashes: np.ndarray | None = None,
    poses: np.ndarray | None = None,
    near_dup_cos: float = DEFAULT_NEAR_DUP_COS,
    hash_max_dist: int = DEFAULT_HASH_MAX_DIST,
    min_pair_cos: float = DEFAULT_MIN_PAIR_COS,
    max_refs: int = DEFAULT_MAX_REFS,
    prefer_pose_change: bool = False,
    seed: int = 0,
    progress: bool = False,
) -> PairResult:
    """References for every item of every cluster of size ≥ 2 (``x``: unit embeddings, ``labels``: clusters)."""
    from tqdm import tqdm

    n = len(labels)
    refs: list = [[] for _ in range(n)]
    dup_group = np.arange(n, dtype=np.int64)
    photos = np.bincount(labels).astype(np.int64)
    order = np.argsort(labels, kind="stable")
    lab = labels[order]
    starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
    ends = np.r_[starts[1:], n]
    multi = np.flatnonzero(ends - starts > 1)
    num_pairs = excluded = 0
    for c in tqdm(multi, desc="pairs", disable=not progress, mininterval=2.0):
        members = order[starts[c] : ends[c]]
        e = x[members]
        cos = e @ e.T
        groups = near_duplicate_groups(
            cos, None if hashes is None else hashes[members], near_dup_cos, hash_max_dist
        )
        dup_group[members] = members[groups]
        photos[lab[starts[c]]] = len(np.unique(groups))
        ok = (groups[:, None] != groups[None, :]) & (cos >= min_pair_cos)
        excluded += int((groups[:, None] == groups[None, :]).sum() - len(members))
        if prefer_pose_change and poses is not None:
            pm = poses[members]
            change = np.abs(pm[:, None, 0] - pm[None, :, 0]) + 0.5 * np.abs(pm[:, None, 1] - pm[None, :, 1])
            key = -np.nan_to_num(change, nan=0.0)
        else:  # a fixed shuffle, so that truncation to max_refs does not always keep the first photos
            key = np.random.default_rng([seed, int(members[0])]).random(cos.shape)
        key = np.where(ok, key, np.inf)
        best = np.argsort(key, axis=1, kind="stable")[:, :max_refs]
        valid = np.take_along_axis(ok, best, 1)
        counts = valid.sum(1)
        num_pairs += int(counts.sum())
        picked = members[best]
        for a in np.flatnonzero(counts):
            refs[members[a]] = picked[a, : counts[a]].tolist()
    return PairResult(refs, dup_group, photos, num_pairs, excluded // 2)
