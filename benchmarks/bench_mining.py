"""Identity mining at FaceID-6M scale on this machine: time and peak memory of the kNN graph, clustering and pair
mining over synthetic 512-d embeddings with a real-like identity structure (faceid/tiny/identities.py), plus the
clusters' purity / inverse purity against the truth and the kNN's recall against exact search on a sample.

Side by side with the baseline on a subset (``--baseline_rows``): faiss's own IVF-flat index (faiss k-means +
scan) against the default numpy cell search, same nlist/nprobe, same queries.

    nice -n 10 python benchmarks/bench_mining.py --rows 1000000
    nice -n 10 python benchmarks/bench_mining.py --rows 100000 --baseline_rows 50000
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from faceid.mine import clusters as C  # noqa: E402
from faceid.mine.pairs import mine_pairs  # noqa: E402
from faceid.tiny.identities import synthetic_identities  # noqa: E402


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def recall(x, sims, ids, queries, threshold) -> float:
    """Share of the true neighbours above ``threshold`` (exact search, k large) that the graph found."""
    ex_d, ex_i = C.NumpyFlatIP(x).search(x[queries], ids.shape[1] + 1)
    found = total = 0
    for r, q in enumerate(queries):
        true = set(ex_i[r][(ex_d[r] >= threshold) & (ex_i[r] != q)].tolist())
        found += len(true & set(ids[q].tolist()))
        total += len(true)
    return found / max(total, 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--threshold", type=float, default=C.DEFAULT_THRESHOLD)
    p.add_argument("--k", type=int, default=C.DEFAULT_K)
    p.add_argument("--nprobe", type=int, default=8)
    p.add_argument("--recall_queries", type=int, default=300)
    p.add_argument("--baseline_rows", type=int, default=50_000, help="0: skip the faiss IVF comparison")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the figures here")
    a = p.parse_args(argv)
    fig: dict = {"rows": a.rows}
    t0 = time.perf_counter()
    data = synthetic_identities(a.rows, seed=a.seed)
    fig["generate_s"] = time.perf_counter() - t0
    x, truth = data.x, data.person
    sizes = np.bincount(np.unique(truth, return_inverse=True)[1])
    fig["true_persons"], fig["true_singletons"] = int(len(sizes)), int((sizes == 1).sum())
    print(f"synthetic: {a.rows} rows, {len(sizes)} persons ({(sizes == 1).sum()} singletons, max {sizes.max()} "
          f"photos), {int((data.dup_of >= 0).sum())} near-duplicates; {fig['generate_s']:.1f}s", flush=True)  # fmt: skip
    cfg = C.KnnConfig(k=a.k, nprobe=a.nprobe)
    t0 = time.perf_counter()
    sims, ids = C.knn_graph(x, cfg, progress=True)
    fig["knn_s"] = time.perf_counter() - t0
    fig["knn"] = {k: v for k, v in vars(cfg.resolved(a.rows)).items()}
    fig["peak_gb_after_knn"] = peak_gb()
    print(f"kNN graph ({fig['knn']['index']}, nlist {fig['knn']['nlist']}, nprobe {a.nprobe}, k {a.k}): "
          f"{fig['knn_s']:.1f}s, peak RSS {fig['peak_gb_after_knn']:.2f} GB", flush=True)  # fmt: skip
    res = C.cluster_embeddings(x, a.threshold, knn=(sims, ids))
    fig["cluster_s"] = res.seconds["cluster"] + res.seconds["stats"]
    fig["purity"], fig["inverse_purity"] = C.purity(res.labels, truth)
    single_true = sizes[np.unique(truth, return_inverse=True)[1]] == 1
    fig["singletons_kept"] = float((res.sizes[res.labels][single_true] == 1).mean())
    fig["clusters"] = int(len(res.sizes))
    fig["multi_photo_clusters"] = int((res.sizes > 1).sum())
    print(f"clusters: {fig['clusters']} ({fig['multi_photo_clusters']} with 2+ photos), {res.edges} edges, "
          f"{res.split} split; {fig['cluster_s']:.1f}s; purity {fig['purity']:.4f}, inverse purity "
          f"{fig['inverse_purity']:.4f}, true singletons kept alone {fig['singletons_kept']:.4f}", flush=True)  # fmt: skip
    t0 = time.perf_counter()
    pairs = mine_pairs(x, res.labels)
    fig["pairs_s"] = time.perf_counter() - t0
    fig["pairs"] = pairs.num_pairs
    fig["targets_with_pairs"] = int(sum(1 for r in pairs.refs if r))
    bad = sum(1 for i, r in enumerate(pairs.refs) for j in r if data.dup_of[i] == j or data.dup_of[j] == i)
    fig["duplicate_pairs"] = bad
    print(f"pairs: {pairs.num_pairs} for {fig['targets_with_pairs']} targets, {pairs.dup_pairs_excluded} "
          f"near-duplicate pairs excluded, {bad} planted duplicates paired; {fig['pairs_s']:.1f}s", flush=True)  # fmt: skip
    q = np.random.default_rng(1).choice(a.rows, size=min(a.recall_queries, a.rows), replace=False)
    fig["recall_at_threshold"] = recall(x, sims, ids, q, a.threshold)
    print(
        f"kNN recall of neighbours with cosine >= {a.threshold}: {fig['recall_at_threshold']:.4f}", flush=True
    )
    del sims, ids
    if a.baseline_rows:
        n = min(a.baseline_rows, a.rows)
        sub = np.ascontiguousarray(x[:n])
        rows = []
        for backend in ("faiss", "numpy"):
            c = C.KnnConfig(k=a.k, index="ivf", nprobe=a.nprobe, backend=backend)
            t0 = time.perf_counter()
            s, i = C.knn_graph(sub, c)
            el = time.perf_counter() - t0
            rows.append((backend, el, recall(sub, s, i, q[q < n][:200], a.threshold)))
        fig["baseline"] = {b: {"seconds": el, "recall": r} for b, el, r in rows}
        print(f"\nkNN on {n} rows, IVF nlist {C.KnnConfig(index='ivf', nprobe=a.nprobe).resolved(n).nlist}, "
              f"nprobe {a.nprobe}:")  # fmt: skip
        print(f"{'backend':<28}{'seconds':>10}{'recall':>10}")
        for b, el, r in rows:
            name = "faiss IndexIVFFlat (base)" if b == "faiss" else "numpy cell search (ours)"
            print(f"{name:<28}{el:>10.1f}{r:>10.4f}")
    fig["peak_gb"] = peak_gb()
    total = fig["knn_s"] + fig["cluster_s"] + fig["pairs_s"]
    print(f"\nTOTAL mining {total:.1f}s (kNN {fig['knn_s']:.1f}, clustering {fig['cluster_s']:.1f}, "
          f"pairs {fig['pairs_s']:.1f}); peak RSS {fig['peak_gb']:.2f} GB", flush=True)  # fmt: skip
    if a.json:
        Path(a.json).write_text(json.dumps(fig, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
