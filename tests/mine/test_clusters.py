"""Clusters from synthetic embeddings with known identities: purity, singletons, chaining, label constraints, the
kNN backends and the rank-sharded, resumable kNN graph."""

from __future__ import annotations

import numpy as np
import pytest

from faceid.mine import clusters as C
from faceid.mine.pairs import mine_pairs
from faceid.tiny.identities import synthetic_identities


@pytest.fixture(scope="module")
def synth():
    return synthetic_identities(3000, seed=3)


@pytest.fixture(scope="module")
def mined(synth):
    return C.cluster_embeddings(synth.x)


def test_synthetic_structure_is_arcface_like(synth):
    x, p = synth.x, synth.person
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, len(x), (2, 20000))
    cos = (x[a] * x[b]).sum(1)
    diff = cos[p[a] != p[b]]
    assert abs(diff.mean()) < 0.02 and 0.05 < diff.std() < 0.1
    order = np.argsort(p, kind="stable")
    same = np.flatnonzero(p[order][1:] == p[order][:-1])
    orig = (synth.dup_of[order[same]] < 0) & (synth.dup_of[order[same + 1]] < 0)
    g = (x[order[same]] * x[order[same + 1]]).sum(1)[orig]
    assert 0.6 < g.mean() < 0.75 and np.percentile(g, 5) > 0.5
    sizes = np.bincount(np.unique(p, return_inverse=True)[1])
    assert sizes.max() <= 51 and (sizes == 1).mean() > 0.3  # long tail of singletons


def test_clusters_match_known_identities(synth, mined):
    pur, inv = C.purity(mined.labels, synth.person)
    print(f"purity {pur:.4f}, inverse purity {inv:.4f}, {len(mined.sizes)} clusters")
    assert pur >= 0.999 and inv >= 0.98
    _, t = np.unique(synth.person, return_inverse=True)
    true_single = np.bincount(t)[t] == 1
    assert true_single.sum() > 100
    assert (mined.sizes[mined.labels][true_single] == 1).all()  # singletons stay singletons
    # statistics: sizes and mean cosines recomputed independently
    c = int(np.argmax(mined.sizes))
    members = np.flatnonzero(mined.labels == c)
    s = synth.x[members] @ synth.x[members].T
    want = (s.sum() - len(members)) / (len(members) * (len(members) - 1))
    assert mined.sizes[c] == len(members) and abs(mined.mean_cos[c] - want) < 1e-5
    assert np.isnan(mined.mean_cos[mined.sizes == 1]).all()


def test_near_duplicates_never_pair(synth, mined):
    pr = mine_pairs(synth.x, mined.labels, max_refs=100)
    dups = np.flatnonzero(synth.dup_of >= 0)
    assert len(dups) > 30
    for i in dups:
        src = synth.dup_of[i]
        assert src not in pr.refs[i] and i not in pr.refs[src]
    assert pr.dup_pairs_excluded >= len(dups)
    x = synth.x
    for i, refs in enumerate(pr.refs):
        for j in refs:
            assert mined.labels[j] == mined.labels[i] and j != i and 0.3 <= float(x[i] @ x[j]) < 0.95
    # a person with one photo and its re-post: a cluster of 2, one photo, no pairs
    single_dup = [i for i in dups if mined.sizes[mined.labels[i]] == 2]
    assert single_dup and all(pr.refs[i] == [] and pr.photos[mined.labels[i]] == 1 for i in single_dup)


def _cloud(rng, centre, n, r=0.7):
    v = centre + r * rng.standard_normal((n, len(centre))).astype(np.float32) / np.sqrt(len(centre))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_chained_component_is_split():
    rng = np.random.default_rng(5)
    d = 512
    ca, cb = (rng.standard_normal(d).astype(np.float32) for _ in range(2))
    ca, cb = ca / np.linalg.norm(ca), cb / np.linalg.norm(cb)
    xa, xb = _cloud(rng, ca, 30, 0.6), _cloud(rng, cb, 30, 0.6)
    # one look-alike: a photo of B close to a photo of A (0.6), still B (0.6-0.7 to B's photos)
    look = 0.6 * xa[0] + 0.75 * cb
    xb[0] = look / np.linalg.norm(look)
    x = np.concatenate([xa, xb]).astype(np.float32)
    assert 0.55 < float(x[0] @ x[30]) < 0.7
    plain = C.cluster_embeddings(x, 0.5, mutual=False, min_mean_cos=0.0)
    assert len(np.unique(plain.labels)) == 1  # single linkage chains A and B
    res = C.cluster_embeddings(x, 0.5, mutual=False)
    assert res.split >= 1
    for part, other in ((slice(0, 30), slice(30, 60)), (slice(30, 60), slice(0, 30))):
        main = np.bincount(res.labels[part]).argmax()
        assert (res.labels[part] == main).mean() >= 0.8 and not (res.labels[other] == main).any()
    assert C.purity(res.labels, np.r_[np.zeros(30), np.ones(30)])[0] == 1.0


def test_labels_as_constraints_and_check():
    rng = np.random.default_rng(6)
    d = 512
    a = rng.standard_normal(d).astype(np.float32)
    b = 0.75 * a + 0.66 * np.linalg.norm(a) * rng.standard_normal(d).astype(np.float32) / np.sqrt(d)
    x = np.concatenate(
        [_cloud(rng, a / np.linalg.norm(a), 12, 0.4), _cloud(rng, b / np.linalg.norm(b), 12, 0.4)]
    )
    truth = np.r_[np.zeros(12, int), np.ones(12, int)]
    free = C.cluster_embeddings(x, 0.5, mutual=False, min_mean_cos=0.0)
    assert len(np.unique(free.labels)) == 1  # two look-alike people merge
    given = [None] * 24
    given[0], given[1], given[12], given[13] = "ann", "ann", "bea", "bea"
    mixed, spread = C.label_conflicts(free.labels, given)
    assert mixed == [(0, {"ann": 2, "bea": 2})] and spread == []
    num = np.array([{"ann": 0, "bea": 1}.get(g, -1) for g in given])
    res = C.cluster_embeddings(x, 0.5, mutual=False, given=num)
    assert res.labels[0] != res.labels[12] and res.labels[0] == res.labels[1]
    assert C.purity(res.labels, truth)[0] >= 0.9 and C.label_conflicts(res.labels, given)[0] == []


def test_purity_by_hand():
    assert C.purity([0, 0, 1, 1], [5, 5, 6, 6]) == (1.0, 1.0)
    assert C.purity([0, 0, 0, 0], [5, 5, 6, 6]) == (0.5, 1.0)
    assert C.purity([0, 1, 2, 3], [5, 5, 6, 6]) == (1.0, 0.5)


@pytest.mark.parametrize("index,backend", [("flat", "faiss"), ("ivf", "numpy"), ("ivf", "faiss")])
def test_knn_backends_agree_with_exact(synth, index, backend):
    x = synth.x[:1500]
    es, ei = C.exact_knn(x, 8)
    assert (ei != np.arange(len(x))[:, None]).all()  # self excluded
    s, i = C.knn_graph(x, C.KnnConfig(k=8, index=index, backend=backend, nlist=16, nprobe=4, train_rows=1000))
    strong = es > 0.5  # the neighbours that become edges
    found = np.mean([set(ei[r][strong[r]]) <= set(i[r]) for r in range(len(x)) if strong[r].any()])
    assert found >= (1.0 if index == "flat" else 0.9)
    if index == "flat":
        assert np.allclose(s, es, atol=1e-4)


def test_knn_sharded_over_ranks_and_resumed(synth, tmp_path, monkeypatch):
    monkeypatch.setattr(C, "CHUNK_ROWS", 400)
    x = synth.x[:1500]
    cfg = C.KnnConfig(k=8)
    want = C.knn_graph(x, cfg)
    assert C.knn_graph(x, cfg, rank=1, world=2, work_dir=tmp_path) is None  # rank 1 commits chunks 1, 3
    assert sorted(p.name for p in tmp_path.glob("knn-*.npz")) == [
        "knn-w002-c00001.npz",
        "knn-w002-c00003.npz",
    ]
    got = C.knn_graph(x, cfg, rank=0, world=2, work_dir=tmp_path)  # rank 0: its chunks, then the merge
    assert np.array_equal(got[1], want[1]) and np.allclose(got[0], want[0])
    # killed run: a missing chunk is redone, the others are reused
    stamp = (tmp_path / "knn-w002-c00001.npz").stat().st_mtime_ns
    (tmp_path / "knn-w002-c00002.npz").unlink()
    again = C.knn_graph(x, cfg, rank=0, world=2, work_dir=tmp_path, wait_timeout=5)
    assert (
        np.array_equal(again[1], want[1]) and (tmp_path / "knn-w002-c00001.npz").stat().st_mtime_ns == stamp
    )
