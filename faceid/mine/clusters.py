"""Person identities from face embeddings: a k-nearest-neighbour graph (FAISS, inner product on L2-normalised
embeddings = cosine), clusters as connected components of its strict variant, per-cluster statistics and the
measures a test or a user compares them with.

The graph keeps an edge ``i - j`` only when the cosine is at least ``threshold`` and (``mutual``) each is among the
other's ``k`` nearest neighbours. Plain single linkage chains two people through one wrong edge; the mutual rule
removes most hub edges, and components that still look chained (bigger than ``max_size``, or a mean within-cluster
cosine under ``min_mean_cos``, which two people merged into one cluster always have) are split again at a higher
threshold, as in linkage-based face clustering (Zhan et al., CDP, ECCV 2018; Wang et al., CVPR 2019).

Work is split for several processes by query rows: chunk ``c`` of the queries belongs to rank ``c % world``; each
chunk is committed to ``work_dir`` on its own (atomic), so a killed run resumes and rank 0 merges the chunks.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from faceid.errors import InputError
from faceid.files import atomic_path, write_json_atomic

# ArcFace-family recognizers (antelopev2's glintr100, buffalo_l's w600k_r50) give different people cosines
# around 0 (spread ~0.1) and the same person mostly 0.5-0.8; verification thresholds at best LFW accuracy lie at
# 0.28-0.45 (docs/mining.md). Clustering must be precise (one wrong edge merges two people), so the default sits
# above them.
DEFAULT_THRESHOLD = 0.5
DEFAULT_K = 32
# Two people merged into one cluster have a mean within-cluster cosine near half their own; a single person
# rarely falls under this.
DEFAULT_MIN_MEAN_COS = 0.4
DEFAULT_MAX_SIZE = 5000
SPLIT_STEP = 0.05
FLAT_MAX_ROWS = 100_000  # exact search up to this many embeddings ("auto"), IVF above
CHUNK_ROWS = 65_536  # queries per committed kNN chunk


def normalize(x: np.ndarray, chunk: int = 262_144) -> np.ndarray:
    """Rows scaled to unit L2 norm, float32, in place when ``x`` already is float32 (zero rows stay zero)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    for s in range(0, len(x), chunk):
        part = x[s : s + chunk]
        norms = np.linalg.norm(part, axis=1, keepdims=True)
        np.divide(part, np.maximum(norms, 1e-12), out=part)
    return x


# ----------------------------------------------------------------------------------------------------------
# kNN graph


@dataclass
class KnnConfig:
    k: int = DEFAULT_K
    index: str = "auto"  # auto | flat | ivf | hnsw
    nlist: int | None = None  # IVF cells (None: ~4 sqrt(n), at most 65536)
    nprobe: int = 8
    hnsw_m: int = 32
    ef_search: int = 128
    train_rows: int = 40_000  # IVF k-means sample (at least 20 per list)
    batch: int = 4096  # queries per search call
    seed: int = 1234
    backend: str = "auto"  # auto (faiss with GPUs, else numpy) | faiss | numpy

    def resolved(self, n: int) -> KnnConfig:
        cfg = KnnConfig(**asdict(self))
        if cfg.index == "auto":
            cfg.index = "flat" if n <= FLAT_MAX_ROWS else "ivf"
        if cfg.backend == "auto":
            cfg.backend = "faiss" if gpu_count() > 0 or cfg.index == "hnsw" else "numpy"
        if cfg.index == "hnsw" and cfg.backend != "faiss":
            raise ValueError("the HNSW index needs backend faiss")
        if cfg.index == "ivf" and cfg.nlist is None:
            # cost per query ~ nlist (coarse step) + nprobe * n / nlist (scan): balanced at sqrt(nprobe * n)
            cfg.nlist = int(min(65_536, max(16, np.sqrt(cfg.nprobe * n))))
        cfg.nlist = None if cfg.index != "ivf" else int(min(cfg.nlist, n))
        cfg.k = int(min(cfg.k, max(n - 1, 1)))
        return cfg


def gpu_count() -> int:
    try:
        import faiss
    except ImportError:
        return 0
    return int(faiss.get_num_gpus()) if hasattr(faiss, "index_cpu_to_all_gpus") else 0


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a requirement
        raise InputError("mining needs FAISS: pip install faiss-cpu (or faiss-gpu)") from exc
    return faiss


def build_index(x: np.ndarray, cfg: KnnConfig, use_gpu: bool | None = None):
    """An inner-product index over ``x`` (unit rows) with a ``search(q, k)``: FAISS (flat, IVF-flat, HNSW; moved to
    all GPUs when faiss sees some) or the numpy BLAS equivalents (:class:`NumpyFlatIP`, :class:`CellIndex`)."""
    faiss = _faiss()
    n, d = x.shape
    if use_gpu is None:
        use_gpu = gpu_count() > 0
    if cfg.index == "flat" and cfg.backend == "numpy":
        return NumpyFlatIP(x)
    if cfg.index == "ivf" and cfg.backend == "numpy":
        return CellIndex(x, cfg)
    if cfg.index == "flat":
        index = faiss.IndexFlatIP(d)
    elif cfg.index == "hnsw":
        index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = cfg.ef_search
    elif cfg.index == "ivf":
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, cfg.nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(cfg.seed)
        rows = np.sort(rng.choice(n, size=min(n, max(cfg.train_rows, 40 * cfg.nlist)), replace=False))
        index.cp.seed = cfg.seed
        index.train(np.ascontiguousarray(x[rows]))
        index.nprobe = cfg.nprobe
    else:
        raise ValueError(f"unknown index {cfg.index!r} (auto, flat, ivf, hnsw)")
    if use_gpu and cfg.index != "hnsw":  # no GPU HNSW in faiss
        index = faiss.index_cpu_to_all_gpus(index)
    for s in range(0, n, 262_144):
        index.add(np.ascontiguousarray(x[s : s + 262_144]))
    return index


class NumpyFlatIP:
    """Exact inner-product search with one BLAS matrix product per query batch and a partial sort: on CPU several
    times faster than faiss's IndexFlatIP here, and it does not copy the embeddings."""

    def __init__(self, x: np.ndarray, block: int = 512):
        self.x = x
        self.block = block

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, len(self.x))
        d_out = np.empty((len(q), k), np.float32)
        i_out = np.empty((len(q), k), np.int64)
        for s in range(0, len(q), self.block):
            sims = q[s : s + self.block] @ self.x.T
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            vals = np.take_along_axis(sims, top, 1)
            order = np.argsort(-vals, axis=1, kind="stable")
            d_out[s : s + self.block] = np.take_along_axis(vals, order, 1)
            i_out[s : s + self.block] = np.take_along_axis(top, order, 1)
        return d_out, i_out


def spherical_kmeans(x: np.ndarray, k: int, iters: int = 8, seed: int = 0, block: int = 8192) -> np.ndarray:
    """Unit-norm centroids by spherical k-means (cosine assignment, mean direction update), numpy BLAS."""
    rng = np.random.default_rng(seed)
    c = x[np.sort(rng.choice(len(x), size=k, replace=False))].copy()
    for _ in range(iters):
        a = _top(x, c, 1, block)[1][:, 0]
        sums = np.zeros_like(c, dtype=np.float64)
        np.add.at(sums, a, x)
        empty = np.bincount(a, minlength=k) == 0
        sums[empty] = x[rng.choice(len(x), size=int(empty.sum()), replace=False)]
        c = normalize(sums.astype(np.float32))
    return c


def _top(q: np.ndarray, c: np.ndarray, k: int, block: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    d_out = np.empty((len(q), k), np.float32)
    i_out = np.empty((len(q), k), np.int64)
    for s in range(0, len(q), block):
        sims = q[s : s + block] @ c.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < c.shape[0] else np.argsort(-sims, 1)[:, :k]
        d_out[s : s + block] = np.take_along_axis(sims, top, 1)
        i_out[s : s + block] = top
    return d_out, i_out


class CellIndex:
    """Inverted-file search done with numpy BLAS: spherical k-means cells; each query is compared exactly with the
    members of its ``nprobe`` nearest cells, one matrix product per (cell, block of queries probing it). Returns
    exact cosines (no code compression) and, on CPU, ran several times faster than faiss's own IVF scan here
    (docs/mining.md). No copy of the embeddings is made: cells are index arrays into ``x``."""

    def __init__(self, x: np.ndarray, cfg: KnnConfig):
        n = len(x)
        rng = np.random.default_rng(cfg.seed)
        rows = np.sort(rng.choice(n, size=min(n, max(cfg.train_rows, 20 * cfg.nlist)), replace=False))
        self.x = x
        self.centroids = spherical_kmeans(np.ascontiguousarray(x[rows]), cfg.nlist, iters=5, seed=cfg.seed)
        cell = np.empty(n, np.int32)
        for s in range(0, n, 131_072):
            cell[s : s + 131_072] = _top(x[s : s + 131_072], self.centroids, 1)[1][:, 0]
        self.order = np.argsort(cell, kind="stable")
        self.starts = np.searchsorted(cell[self.order], np.arange(cfg.nlist + 1))
        self.nprobe = min(cfg.nprobe, cfg.nlist)
        self.batch = CHUNK_ROWS  # many queries per cell product: few, larger matrix products

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        nq = len(q)
        _, probes = _top(q, self.centroids, self.nprobe)
        cand_d = np.full((nq, self.nprobe * k), -np.inf, np.float32)
        cand_i = np.full((nq, self.nprobe * k), -1, np.int64)
        flat = probes.reshape(-1)
        qrow = np.repeat(np.arange(nq), self.nprobe)
        slot = np.tile(np.arange(self.nprobe), nq)
        by_cell = np.argsort(flat, kind="stable")
        cells, first = np.unique(flat[by_cell], return_index=True)
        bounds = np.r_[first, len(by_cell)]
        for c, lo, hi in zip(cells, bounds[:-1], bounds[1:]):
            members = self.order[self.starts[c] : self.starts[c + 1]]
            if not len(members):
                continue
            sel = by_cell[lo:hi]
            rows, slots = qrow[sel], slot[sel]
            sims = q[rows] @ self.x[members].T
            kk = min(k, len(members))
            top = (
                np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
                if kk < len(members)
                else np.broadcast_to(np.arange(kk), (len(rows), kk))
            )
            cols = slots[:, None] * k + np.arange(kk)[None, :]
            cand_d[rows[:, None], cols] = np.take_along_axis(sims, top, 1)
            cand_i[rows[:, None], cols] = members[top]
        best = (
            np.argpartition(-cand_d, k - 1, axis=1)[:, :k] if cand_d.shape[1] > k else np.argsort(-cand_d, 1)
        )
        d = np.take_along_axis(cand_d, best, 1)
        i = np.take_along_axis(cand_i, best, 1)
        o = np.argsort(-d, axis=1, kind="stable")
        d, i = np.take_along_axis(d, o, 1), np.take_along_axis(i, o, 1)
        i[~np.isfinite(d)] = -1
        d[~np.isfinite(d)] = -1.0
        return d, i


def _fingerprint(x: np.ndarray) -> str:
    import hashlib

    h = hashlib.sha1(str(x.shape).encode())
    for rows in (x[:64], x[-64:], x[:: max(1, len(x) // 64)][:64]):
        h.update(np.ascontiguousarray(rows).tobytes())
    return h.hexdigest()


def _chunk_path(work_dir: Path, world: int, c: int) -> Path:
    return work_dir / f"knn-w{world:03d}-c{c:05d}.npz"


def knn_graph(
    x: np.ndarray,
    cfg: KnnConfig | None = None,
    rank: int = 0,
    world: int = 1,
    work_dir: str | os.PathLike | None = None,
    progress: bool = False,
    wait_timeout: float = 7200.0,
    index=None,
) -> tuple[np.ndarray, np.ndarray] | None:
    """``(sims [n, k] float32, ids [n, k] int64)``: each row's ``k`` nearest other rows (self removed; -1 pads).

    With ``world > 1`` this rank answers only its chunks of the queries and commits them to ``work_dir``; rank 0
    then waits for every chunk and returns the merged graph, other ranks return None. With ``work_dir`` set, chunks
    already committed by an earlier (killed) run with the same embeddings and settings are reused."""
    n = len(x)
    cfg = (cfg or KnnConfig()).resolved(n)
    if n < 2:
        return (np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64)) if rank == 0 else None
    if world > 1 and work_dir is None:
        raise ValueError("several processes need a shared work_dir for the kNN chunks")
    wd = Path(work_dir) if work_dir is not None else None
    chunks = list(range((n + CHUNK_ROWS - 1) // CHUNK_ROWS))
    if wd is not None:
        wd.mkdir(parents=True, exist_ok=True)
        config = {"n": n, "fingerprint": _fingerprint(x), **asdict(cfg)}
        cpath = wd / "knn-config.json"
        if cpath.exists():
            old = json.loads(cpath.read_text())
            if old != config:
                for p in wd.glob("knn-w*-c*.npz"):  # other data or settings: start over
                    p.unlink()
        if rank == 0:
            write_json_atomic(cpath, config)
    mine = [c for c in chunks if c % world == rank]
    todo = [c for c in mine if wd is None or not _chunk_path(wd, world, c).exists()]
    results: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    if todo:
        if index is None:
            index = build_index(x, cfg)
        from tqdm import tqdm

        bar = tqdm(total=sum(min(CHUNK_ROWS, n - c * CHUNK_ROWS) for c in todo), desc=f"kNN rank {rank}/{world}",
                   unit="q", disable=not progress, mininterval=2.0)  # fmt: skip
        for c in todo:
            lo, hi = c * CHUNK_ROWS, min(n, (c + 1) * CHUNK_ROWS)
            sims, ids = _search(index, x, lo, hi, cfg, bar)
            if wd is not None:
                with atomic_path(_chunk_path(wd, world, c)) as tmp:
                    with open(tmp, "wb") as fh:
                        np.savez(fh, sims=sims, ids=ids)
            if world == 1:
                results[c] = (sims, ids)
        bar.close()
    if rank != 0:
        return None
    deadline = time.monotonic() + wait_timeout
    while wd is not None and not all(_chunk_path(wd, world, c).exists() for c in chunks):
        if time.monotonic() > deadline:
            missing = [c for c in chunks if not _chunk_path(wd, world, c).exists()]
            raise TimeoutError(f"kNN chunks {missing[:5]} not committed by the other ranks; rerun to finish")
        time.sleep(1.0)
    sims = np.empty((n, cfg.k), np.float32)
    ids = np.empty((n, cfg.k), np.int64)
    for c in chunks:
        lo, hi = c * CHUNK_ROWS, min(n, (c + 1) * CHUNK_ROWS)
        if c in results:
            s, i = results.pop(c)
        else:
            with np.load(_chunk_path(wd, world, c)) as z:
                s, i = z["sims"], z["ids"]
        sims[lo:hi], ids[lo:hi] = s, i
    return sims, ids


def _search(index, x, lo: int, hi: int, cfg: KnnConfig, bar) -> tuple[np.ndarray, np.ndarray]:
    k = cfg.k
    sims = np.empty((hi - lo, k), np.float32)
    ids = np.empty((hi - lo, k), np.int32 if len(x) < 2**31 else np.int64)
    batch = getattr(index, "batch", cfg.batch)
    for s in range(lo, hi, batch):
        e = min(hi, s + batch)
        d, i = index.search(np.ascontiguousarray(x[s:e]), k + 1)
        # drop self (usually first; exact duplicates can put it anywhere), else the (k+1)-th
        keep = i != np.arange(s, e)[:, None]
        keep[keep.all(1), -1] = False
        sims[s - lo : e - lo] = d[keep].reshape(e - s, k)
        ids[s - lo : e - lo] = i[keep].reshape(e - s, k)
        bar.update(e - s)
    return sims, ids


def exact_knn(x: np.ndarray, k: int, batch: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force kNN in numpy (reference for tests and the benchmark's recall)."""
    return knn_graph(x, KnnConfig(k=k, index="flat", batch=batch))


# ----------------------------------------------------------------------------------------------------------
# Graph → clusters


def knn_edges(
    sims: np.ndarray, ids: np.ndarray, threshold: float, mutual: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Undirected edges ``(i, j, cos)`` with ``i < j``, cos ≥ ``threshold`` (and mutual kNN when asked)."""
    n = len(sims)
    rows = np.broadcast_to(np.arange(n, dtype=np.int64)[:, None], ids.shape)
    ok = (sims >= threshold) & (ids >= 0)
    i, j, w = rows[ok], ids[ok].astype(np.int64), sims[ok]
    if mutual:  # keep i -> j only when j -> i is there too
        fwd = np.sort(i * n + j)
        rev = j * n + i
        pos = np.minimum(np.searchsorted(fwd, rev), max(len(fwd) - 1, 0))
        both = fwd[pos] == rev if len(fwd) else np.zeros(0, bool)
        i, j, w = i[both], j[both], w[both]
    a, b = np.minimum(i, j), np.maximum(i, j)
    _, first = np.unique(a * n + b, return_index=True)
    return a[first], b[first], w[first]


def components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected-component label per node (labels 0.. in order of each component's first node)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    g = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n, n)).tocsr()
    _, labels = connected_components(g, directed=False)
    return relabel(labels)


def relabel(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 0.. by the first node of each cluster (deterministic ids)."""
    uniq, first, inv = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(uniq), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(uniq))
    return rank[inv.reshape(-1)]


def mean_cosines(x: np.ndarray, labels: np.ndarray, chunk_rows: int = 131_072) -> np.ndarray:
    """Mean pairwise cosine inside each cluster (``nan`` for singletons): ``(|sum|^2 - n) / (n (n - 1))`` for
    unit rows, accumulated in row chunks ordered by cluster so memory stays at one chunk."""
    sizes = np.bincount(labels)
    out = np.full(len(sizes), np.nan, np.float64)
    order = np.argsort(labels, kind="stable")
    multi = sizes[labels[order]] > 1
    order = order[multi]
    if not len(order):
        return out
    lab = labels[order]
    starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
    ends = np.r_[starts[1:], len(order)]
    s = 0
    while s < len(starts):
        e = s + 1
        while e < len(starts) and ends[e - 1] - starts[s] < chunk_rows:
            e += 1
        lo, hi = starts[s], ends[e - 1]
        sums = np.add.reduceat(x[order[lo:hi]].astype(np.float64), starts[s:e] - lo, axis=0)
        m = sizes[lab[starts[s:e]]].astype(np.float64)
        out[lab[starts[s:e]]] = ((sums * sums).sum(1) - m) / (m * (m - 1))
        s = e
    return out


def split_chained(
    x: np.ndarray,
    labels: np.ndarray,
    i: np.ndarray,
    j: np.ndarray,
    w: np.ndarray,
    threshold: float,
    max_size: int = DEFAULT_MAX_SIZE,
    min_mean_cos: float = DEFAULT_MIN_MEAN_COS,
    step: float = SPLIT_STEP,
) -> tuple[np.ndarray, int]:
    """Re-cluster components that look chained at ``threshold + step``, ``+ 2 step``... on their own edges.
    Returns the new labels and the number of components split."""
    labels = labels.copy()
    n = len(labels)
    split = 0
    thr = threshold
    while True:
        sizes = np.bincount(labels)
        cos = mean_cosines(x, labels)
        bad = (sizes > max_size) | (np.nan_to_num(cos, nan=1.0) < min_mean_cos)
        if not bad.any() or thr + step >= 1.0:
            break
        thr += step
        split += int(bad.sum())
        flagged = bad[labels]
        keep = flagged[i] & (w >= thr)
        ok_edges = ~flagged[i]
        ei = np.concatenate([i[ok_edges], i[keep]])
        ej = np.concatenate([j[ok_edges], j[keep]])
        labels = components(n, ei, ej)
        i, j, w = ei, ej, np.concatenate([w[ok_edges], w[keep]])
    return labels, split


def constrained_components(
    n: int, i: np.ndarray, j: np.ndarray, w: np.ndarray, given: np.ndarray
) -> np.ndarray:
    """Components with the labels an index already has as constraints: items sharing a label are linked
    (must-link) and no edge joins two different labels (cannot-link; edges taken strongest first).
    ``given`` holds a label number per item, -1 where there is none."""
    # must-link: chain the items of each label
    order = np.argsort(given, kind="stable")
    order = order[given[order] >= 0]
    same = given[order][1:] == given[order][:-1]
    mi, mj = order[:-1][same], order[1:][same]
    ai, aj = np.concatenate([i, mi]), np.concatenate([j, mj])
    aw = np.concatenate([w, np.full(len(mi), 2.0, np.float32)])
    labels = components(n, ai, aj)
    # only components holding two or more labels need the sequential, constraint-aware pass
    lab_given = given >= 0
    pairs = np.unique(np.stack([labels[lab_given], given[lab_given]], 1), axis=0)
    comp_count = np.bincount(pairs[:, 0], minlength=labels.max() + 1) if len(pairs) else np.zeros(1, int)
    conflicted = comp_count > 1
    if not conflicted.any():
        return labels
    sel = conflicted[labels[ai]]
    ei, ej, ew = ai[sel], aj[sel], aw[sel]
    parent = np.arange(n)
    tag = given.copy()

    def find(a):
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    for e in np.argsort(-ew, kind="stable"):
        ra, rb = find(int(ei[e])), find(int(ej[e]))
        if ra == rb:
            continue
        ta, tb = tag[ra], tag[rb]
        if ta >= 0 and tb >= 0 and ta != tb:
            continue  # cannot-link
        parent[rb] = ra
        tag[ra] = ta if ta >= 0 else tb
    out = labels.copy()
    nodes = np.flatnonzero(conflicted[labels])
    roots = np.array([find(int(a)) for a in nodes])
    out[nodes] = labels.max() + 1 + roots
    return relabel(out)


@dataclass
class ClusterResult:
    labels: np.ndarray  # cluster per item, 0.. by first item
    sizes: np.ndarray  # per cluster
    mean_cos: np.ndarray  # per cluster (nan for singletons)
    edges: int
    split: int
    threshold: float
    seconds: dict


def cluster_embeddings(
    x: np.ndarray,
    threshold: float = DEFAULT_THRESHOLD,
    knn: tuple[np.ndarray, np.ndarray] | None = None,
    cfg: KnnConfig | None = None,
    mutual: bool = True,
    max_size: int = DEFAULT_MAX_SIZE,
    min_mean_cos: float = DEFAULT_MIN_MEAN_COS,
    given: np.ndarray | None = None,
    progress: bool = False,
) -> ClusterResult:
    """Cluster unit-norm embeddings ``x`` (see the module docstring); ``given`` = label numbers to respect as
    constraints (-1: none)."""
    t = {}
    t0 = time.perf_counter()
    if knn is None:
        knn = knn_graph(x, cfg, progress=progress)
    t["knn"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sims, ids = knn
    i, j, w = knn_edges(sims, ids, threshold, mutual)
    if given is not None and (given >= 0).any():
        labels = constrained_components(len(x), i, j, w, given)
        split = 0
    else:
        labels = components(len(x), i, j)
        labels, split = split_chained(x, labels, i, j, w, threshold, max_size, min_mean_cos)
    t["cluster"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sizes = np.bincount(labels)
    cos = mean_cosines(x, labels)
    t["stats"] = time.perf_counter() - t0
    return ClusterResult(labels, sizes, cos, len(i), split, threshold, t)


# ----------------------------------------------------------------------------------------------------------
# Agreement with known identities


def purity(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """``(purity, inverse purity)``: the share of items in their cluster's majority true identity, and the share
    of items in their identity's majority cluster. Both 1.0 for a perfect clustering."""
    pred = np.asarray(pred)
    truth = np.asarray(truth)
    _, t = np.unique(truth, return_inverse=True)
    _, p = np.unique(pred, return_inverse=True)
    pairs, counts = np.unique(np.stack([p, t], 1), axis=0, return_counts=True)
    best_p = np.zeros(p.max() + 1, np.int64)
    np.maximum.at(best_p, pairs[:, 0], counts)
    best_t = np.zeros(t.max() + 1, np.int64)
    np.maximum.at(best_t, pairs[:, 1], counts)
    return float(best_p.sum() / len(p)), float(best_t.sum() / len(t))


def label_conflicts(labels: np.ndarray, given: list) -> tuple[list[tuple[int, dict]], list[tuple[str, int]]]:
    """Clusters mixing two or more given labels ``[(cluster, {label: count})]`` and labels spread over several
    clusters ``[(label, number of clusters)]``."""
    by_cluster: dict[int, dict] = {}
    by_label: dict[str, set] = {}
    for c, g in zip(labels.tolist(), given):
        if g is None:
            continue
        d = by_cluster.setdefault(c, {})
        d[g] = d.get(g, 0) + 1
        by_label.setdefault(g, set()).add(c)
    mixed = sorted(((c, d) for c, d in by_cluster.items() if len(d) > 1), key=lambda t: -sum(t[1].values()))
    spread = sorted(((g, len(cs)) for g, cs in by_label.items() if len(cs) > 1), key=lambda t: -t[1])
    return mixed, spread


def log(msg: str) -> None:
    print(f"[mine] {msg}", file=sys.stderr if msg.startswith("error") else sys.stdout, flush=True)
