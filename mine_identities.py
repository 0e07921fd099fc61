"""Mine person identities from a training index's face embeddings and write cross-identity pairs.

    python mine_identities.py --index out/index.jsonl --output out/mined.jsonl
    python train_instantId_sdxl.py --data_json_file out/mined.jsonl --cross_id ...

Embeddings are L2-normalised; a k-nearest-neighbour graph (FAISS, or numpy BLAS on CPU) keeps mutual neighbours
with cosine ≥ ``--threshold`` (default 0.5: above the ~0.3-0.45 at which ArcFace-family models verify the same
person on LFW, so clusters stay precise; docs/mining.md); its connected components, with chained ones split again
at a higher threshold, are the persons. The new index is the input's lines plus ``person_id``, ``cluster_size``,
``cluster_cos`` (mean within-cluster cosine), ``cluster_photos`` and, unless ``--pairs none``, fixed pairs
``reference: {"ids": [...]}`` (other photos of the person, never near-duplicates). A report (histogram, counts,
contact sheet PNG) goes to ``--report_dir``.

``--holdout_persons N`` writes N persons to ``OUTPUT_heldout.jsonl`` instead, for evaluation on people training
never saw (evaluate.py --persons; docs/evaluation.md).

Labels the index already has (``person_id`` ...): ``--labels check`` reports mined clusters that mix two labels,
``constrain`` uses them as must-link / cannot-link, ``keep`` does that and keeps their names, ``ignore``.

Several processes share the kNN queries (``torchrun --nproc_per_node N mine_identities.py ...`` or ``RANK`` /
``WORLD_SIZE``); chunks are committed to ``--work_dir``, so a killed run resumes, and rank 0 writes the result.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# ----------------------------------------------------------------------------------------- editable defaults
THRESHOLD = 0.5  # = faceid.mine.clusters.DEFAULT_THRESHOLD (ArcFace-calibrated, see docs/mining.md)
K = 32  # neighbours per photo in the graph
NEAR_DUP_COS = 0.95  # cosine at or above which two photos are the same picture
HASH = "phash"  # perceptual hash of the face crop for near-duplicates: phash | dhash | none
HASH_MAX_DIST = 4  # of 64 bits
MIN_PAIR_COS = 0.3  # a pair must verify as the same person on its own (ArcFace LFW verification threshold)
MAX_REFS = 8  # references written per target
LABELS = "check"  # check | constrain | keep | ignore
ID_PREFIX = "mined-"
CONTACT_PERSONS = 12  # rows of the contact sheet
CONTACT_PER_ROW = 8


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--index", required=True, help="training index (get_face_info.py's index.jsonl, or seed JSONL)"
    )
    p.add_argument("--output", required=True, help="the mined index to write (.jsonl)")
    p.add_argument(
        "--data_root", help="folder the index's relative paths refer to (default: the index's folder)"
    )
    g = p.add_argument_group("clustering")
    g.add_argument("--threshold", type=float, default=THRESHOLD, help="cosine for an edge of the graph")
    g.add_argument("--k", type=int, default=K)
    g.add_argument("--no_mutual", action="store_true", help="keep one-sided kNN edges too (more chaining)")
    g.add_argument("--max_cluster_size", type=int, default=5000, help="larger components are split again")
    g.add_argument(
        "--min_cluster_cos", type=float, default=0.4, help="components with a lower mean cosine are split"
    )
    g.add_argument("--labels", default=LABELS, choices=["check", "constrain", "keep", "ignore"])
    g.add_argument("--id_prefix", default=ID_PREFIX)
    g.add_argument("--knn_index", default="auto", choices=["auto", "flat", "ivf", "hnsw"])
    g.add_argument("--knn_backend", default="auto", choices=["auto", "faiss", "numpy"])
    g.add_argument("--nlist", type=int, default=None, help="IVF cells (default: sqrt(nprobe * N))")
    g.add_argument("--nprobe", type=int, default=8)
    g.add_argument("--work_dir", help="kNN chunks (resume, several processes); default OUTPUT_DIR/.mining")
    q = p.add_argument_group("pairs")
    q.add_argument(
        "--pairs", default="fixed", choices=["fixed", "none"], help="none: leave pairs to --cross_id"
    )
    q.add_argument("--max_refs", type=int, default=MAX_REFS)
    q.add_argument("--near_dup_cos", type=float, default=NEAR_DUP_COS)
    q.add_argument("--hash", default=HASH, choices=["phash", "dhash", "none"])
    q.add_argument("--hash_max_dist", type=int, default=HASH_MAX_DIST)
    q.add_argument("--min_pair_cos", type=float, default=MIN_PAIR_COS)
    q.add_argument(
        "--prefer_pose_change",
        action="store_true",
        help="references with the largest head-angle change first",
    )
    q.add_argument("--num_threads", type=int, default=4, help="image hashing threads")
    q.add_argument(
        "--holdout_persons",
        type=int,
        default=0,
        help="write N persons (2+ photos) to OUTPUT_heldout.jsonl instead of OUTPUT, for evaluation on people "
        "training never saw (evaluate.py --persons OUTPUT_heldout.jsonl)",
    )
    q.add_argument("--holdout_seed", type=int, default=0, help="which persons --holdout_persons picks")
    r = p.add_argument_group("report")
    r.add_argument("--report_dir", help="default: OUTPUT_DIR/<output stem>_report")
    r.add_argument("--contact_persons", type=int, default=CONTACT_PERSONS)
    r.add_argument("--no_progress", action="store_true")
    r.add_argument(
        "--skip_bad", action="store_true", help="mine the rest when some lines' embeddings are bad"
    )
    args = p.parse_args(argv)
    if not 0.0 < args.threshold < 1.0:
        p.error("--threshold is a cosine in (0, 1)")
    if args.k < 1 or args.max_refs < 1:
        p.error("--k and --max_refs must be at least 1")
    return args


def fail(msg: str) -> int:
    print(f"[mine_identities] error: {msg}", file=sys.stderr)
    return 2


def main(args) -> int:
    import numpy as np

    from faceid.files import write_json_atomic, write_text_atomic
    from faceid.mine import clusters as C
    from faceid.mine import index_io as io
    from faceid.mine import pairs as P
    from faceid.mine import report as R
    from faceid.prep.engine import dist_env

    started = time.perf_counter()
    out = Path(args.output)
    out_dir = out.parent if str(out.parent) else Path(".")
    rank, world, _ = dist_env()
    try:
        index = io.read_index(args.index, args.data_root)
    except (io.MiningInputError, OSError) as exc:
        return fail(str(exc))
    if os.path.abspath(args.index) == os.path.abspath(out):
        return fail("--output must differ from --index (the input is kept as it is)")
    try:
        raw, errors = io.load_embeddings(index)
    except (io.MiningInputError, OSError) as exc:
        return fail(str(exc))
    bad = [(f"line {n}", why) for n, why in index.bad] + [
        (f"id {index.keys[pos]}", why) for pos, why in errors
    ]
    if bad:
        lines = "\n".join(f"  {args.index} {where}: {why}" for where, why in bad[:10])
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        if not args.skip_bad:
            return fail(f"{len(bad)} line(s) cannot be mined:\n{lines}{more}\nfix them or pass --skip_bad")
        print(f"[mine_identities] skipping {len(bad)} line(s):\n{lines}{more}", file=sys.stderr)
    err_pos = {pos for pos, _ in errors}
    use = [r for r, pos in enumerate(index.rows) if pos not in err_pos]
    rows = [index.rows[r] for r in use]  # line positions mined
    if not rows:
        return fail(f"{args.index}: no line with a usable embedding")
    x = C.normalize(raw[use])
    del raw
    given_all = io.given_labels(index)
    given = [given_all[r] for r in use]
    names = sorted({g for g in given if g is not None})
    code = {g: i for i, g in enumerate(names)}
    given_num = np.array([code[g] if g is not None else -1 for g in given], np.int64)
    progress = not args.no_progress

    # 1. kNN graph (sharded over ranks) and clusters
    cfg = C.KnnConfig(
        k=args.k, index=args.knn_index, backend=args.knn_backend, nlist=args.nlist, nprobe=args.nprobe
    )
    work_dir = Path(args.work_dir) if args.work_dir else out_dir / ".mining"
    try:
        knn = C.knn_graph(x, cfg, rank=rank, world=world, work_dir=work_dir if world > 1 or len(x) > C.CHUNK_ROWS else None,
                          progress=progress)  # fmt: skip
    except (TimeoutError, ValueError) as exc:
        return fail(str(exc))
    if knn is None:
        print(f"[mine_identities] rank {rank}/{world}: kNN chunks committed; rank 0 writes {out}")
        return 0
    constrain = args.labels in ("constrain", "keep") and names
    res = C.cluster_embeddings(x, args.threshold, knn=knn, mutual=not args.no_mutual, max_size=args.max_cluster_size,
                               min_mean_cos=args.min_cluster_cos, given=given_num if constrain else None)  # fmt: skip
    labels = res.labels
    mixed, spread = C.label_conflicts(labels, given) if names and args.labels != "ignore" else ([], [])

    # 2. pairs: different photos of the same person
    hashes = None
    hash_errors = []
    if args.hash != "none" and args.pairs == "fixed":
        multi = np.flatnonzero(res.sizes[labels] > 1)
        faces = io.face_sources(index)
        faces = [faces[r] for r in use]
        hashes = np.zeros(len(x), np.uint64)
        todo = [(faces[i][0], faces[i][1]) for i in multi]
        h, hash_errors = P.hash_images(todo, args.hash, args.num_threads, progress)
        hashes[multi] = h
    poses = None
    if args.prefer_pose_change:
        kps = io.keypoints(index)
        poses = P.head_poses([kps[r] for r in use])
    pr = P.mine_pairs(x, labels, hashes, poses, args.near_dup_cos, args.hash_max_dist, args.min_pair_cos,
                      args.max_refs, args.prefer_pose_change, progress=progress)  # fmt: skip

    # 3. names: mined ids, or (keep) the label a cluster holds
    cluster_name = [f"{args.id_prefix}{c:07d}" for c in range(len(res.sizes))]
    if args.labels == "keep" and names:
        for c, g in zip(labels.tolist(), given):
            if g is not None:
                cluster_name[c] = g

    # 4. the new index (atomic), same line order; lines not mined are copied unchanged
    written = mined_lines(args, index, out_dir, rows, labels, given, res, pr, cluster_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.holdout_persons:  # whole persons, chosen as training's --validation_persons chooses them
        from faceid.train.records import split_index_lines

        try:
            written, held = split_index_lines(written, args.holdout_persons, args.holdout_seed)
        except ValueError as exc:
            return fail(f"--holdout_persons {args.holdout_persons}: {exc}; hold out fewer")
        io.write_index(out.with_name(f"{out.stem}_heldout.jsonl"), held)
        print(
            f"[mine_identities] {args.holdout_persons} persons ({len(held)} photos) held out: {out.stem}_heldout.jsonl"
        )
    io.write_index(out, written)

    # 5. report
    report_dir = Path(args.report_dir) if args.report_dir else out_dir / f"{out.stem}_report"
    report_dir.mkdir(parents=True, exist_ok=True)
    hist = R.size_histogram(res.sizes)
    persons_multi = int((pr.photos >= 2).sum())
    summary = {
        "index": os.path.abspath(args.index),
        "output": os.path.abspath(out),
        "photos": len(x),
        "persons": int(len(res.sizes)),
        "persons_with_2_plus_photos": persons_multi,
        "singletons": int((res.sizes == 1).sum()),
        "pairs": pr.num_pairs,
        "targets_with_pairs": int(sum(1 for r in pr.refs if r)),
        "near_duplicate_pairs_excluded": pr.dup_pairs_excluded,
        "edges": res.edges,
        "split_components": res.split,
        "threshold": args.threshold,
        "histogram": hist,
        "label_mode": args.labels,
        "mixed_clusters": [{"cluster": cluster_name[c], "labels": d} for c, d in mixed[:100]],
        "labels_split": [{"label": g, "clusters": n} for g, n in spread[:100]],
        "skipped_lines": len(bad),
        "hash_errors": [e for _, e in hash_errors[:20]],
        "seconds": round(time.perf_counter() - started, 2),
    }
    if names:  # agreement with the given labels, over the labelled photos
        lab = np.flatnonzero(given_num >= 0)
        summary["purity"], summary["inverse_purity"] = C.purity(labels[lab], given_num[lab])
    summary["contact_sheet"] = contact_sheet(args, index, use, labels, res, cluster_name, report_dir)
    write_json_atomic(report_dir / "report.json", summary)
    text = R.format_histogram(hist)
    write_text_atomic(report_dir / "histogram.txt", text + "\n")
    print(text)
    print(f"[mine_identities] {len(x)} photos -> {summary['persons']} persons ({persons_multi} with 2+ different "
          f"photos, {summary['singletons']} singletons); {pr.num_pairs} pairs for {summary['targets_with_pairs']} "
          f"targets, {pr.dup_pairs_excluded} near-duplicate pairs excluded")  # fmt: skip
    if names:
        print(f"[mine_identities] against the given labels ({int((given_num >= 0).sum())} photos): purity {summary['purity']:.4f}, inverse purity "
              f"{summary['inverse_purity']:.4f}; {len(mixed)} cluster(s) mix labels, {len(spread)} label(s) split")  # fmt: skip
        for c, d in mixed[:5]:
            print(f"  {cluster_name[c]} mixes " + ", ".join(f"{g} x{n}" for g, n in d.items()))
    print(f"[mine_identities] wrote {out} and {report_dir}/ (report.json, histogram.txt, contact_sheet.png)")
    return 0


def mined_lines(args, index, out_dir, rows, labels, given, res, pr, cluster_name) -> list:
    """The new index's lines, in the input's order: mined lines get person, cluster figures and references;
    lines not mined are copied unchanged."""
    import numpy as np

    from faceid.mine import index_io as io
    from faceid.schema import (
        CLUSTER_COS_KEY,
        CLUSTER_PHOTOS_KEY,
        CLUSTER_SIZE_KEY,
        GIVEN_PERSON_KEY,
        PERSON_KEY,
        REFERENCE_KEY,
    )

    keys = index.keys
    at = {pos: i for i, pos in enumerate(rows)}
    written = []
    for pos, obj in enumerate(index.objs):
        i = at.get(pos)
        if obj is None or i is None:
            written.append(index.raw[pos])
            continue
        o = io.rebased(obj, index.root, str(out_dir))
        c = int(labels[i])
        name = cluster_name[c]
        if given[i] is not None and given[i] != name:
            o[GIVEN_PERSON_KEY] = given[i]
        o[PERSON_KEY] = name
        o[CLUSTER_SIZE_KEY] = int(res.sizes[c])
        o[CLUSTER_COS_KEY] = None if np.isnan(res.mean_cos[c]) else round(float(res.mean_cos[c]), 4)
        o[CLUSTER_PHOTOS_KEY] = int(pr.photos[c])
        if args.pairs == "fixed":
            if pr.refs[i]:
                o[REFERENCE_KEY] = {"ids": [keys[rows[j]] for j in pr.refs[i]]}
            elif res.sizes[c] > 1:
                # only near-duplicates of itself: its own embedding, so --cross_id cannot pick a duplicate
                o[REFERENCE_KEY] = {"id": keys[pos]}
            else:
                o.pop(REFERENCE_KEY, None)
        written.append(o)
    return written


def contact_sheet(args, index, use, labels, res, cluster_name, report_dir):
    """The largest persons, a few photos each, as one image (the report's contact_sheet.png)."""
    import numpy as np

    from faceid.mine import index_io as io
    from faceid.mine import report as R

    order = np.argsort(-res.sizes, kind="stable")[: args.contact_persons]
    faces = io.face_sources(index)
    faces = [faces[r] for r in use]
    members = {int(c): [] for c in order}
    for i, c in enumerate(labels.tolist()):
        if c in members and len(members[c]) < CONTACT_PER_ROW:
            members[c].append(faces[i])
    sheet_rows = []
    for c in order:
        cos = "" if np.isnan(res.mean_cos[c]) else f"cos {res.mean_cos[c]:.2f}"
        sheet_rows.append((f"{cluster_name[c]}\n{res.sizes[c]} photos\n{cos}", members[int(c)]))
    return R.contact_sheet(sheet_rows, report_dir / "contact_sheet.png", per_row=CONTACT_PER_ROW)


if __name__ == "__main__":
    from faceid import cli

    cli.run(main, parse_args)
