"""Images/s of get_face_info's dataset mode vs a naive loop, on synthetic 1024-px images with the tiny antelopev2.

Naive = what the official scripts do per image: cv2.imread, FaceAnalysis (every module in the pack).get, sort by
the anchors' key, one pickle per image. Ours = ``get_face_info.py --input DIR --output OUT`` (prefetching decode
threads, recognition of the chosen face only, batched, sharded embeddings, merge included).

    python benchmarks/bench_face_info.py [--n 200] [--size 1024] [--rounds 3]

The two alternate for ``--rounds`` rounds (ours counts model loading, listing and merge; the naive loop only its
per-image loop); the table gives images/s per round, the medians and CPU time per image (process time: less
sensitive to other jobs on the machine, which slow the naive loop's spinning ONNX threads most).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from faceid.tiny.antelope import build_tiny_antelopev2, draw_face  # noqa: E402


def make_images(folder: Path, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = rng.integers(0, 90, size=(size, size, 3), dtype=np.uint8)  # dark noisy background
        faces = 1 + i % 3
        for k in range(faces):
            s = int(rng.integers(size // 8, size // 4))
            x, y = 40 + k * (size // 3), int(rng.integers(20, size - s - 20))
            draw_face(img, (x, y, x + s, y + s), pattern=i * 3 + k + 1)
        Image.fromarray(img).save(folder / f"{i:04d}.jpg", quality=92)


def naive(root: Path, folder: Path, out: Path) -> tuple[float, float]:
    import cv2
    from insightface.app import FaceAnalysis

    out.mkdir(parents=True, exist_ok=True)
    files = sorted(folder.glob("*.jpg"))
    with contextlib.redirect_stdout(io.StringIO()):
        app = FaceAnalysis(name="antelopev2", root=str(root), providers=["CPUExecutionProvider"])
        app.prepare(ctx_id=-1, det_size=(640, 640))
    t, c = time.perf_counter(), time.process_time()  # model loading not counted for the naive loop
    for f in files:
        img = cv2.imread(str(f))
        faces = app.get(img)
        if not faces:
            continue
        face = sorted(faces, key=lambda x: (x["bbox"][2] - x["bbox"][0]) * x["bbox"][3] - x["bbox"][1])[-1]
        with open(out / f"{f.stem}.pkl", "wb") as fh:
            pickle.dump({"embedding": face["embedding"], "kps": face["kps"]}, fh)
    return len(files) / (time.perf_counter() - t), (time.process_time() - c) / len(files)


def ours(root: Path, folder: Path, out: Path, workers: int, batch: int) -> tuple[float, float]:
    import get_face_info

    argv = ["--input", str(folder), "--output", str(out), "--root", str(root), "--no_progress"]
    argv += ["--num_workers", str(workers), "--batch_size", str(batch)]
    args = get_face_info.parse_args(argv)
    n = len(list(folder.glob("*.jpg")))
    t, c = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(io.StringIO()):
        assert get_face_info.main(args) == 0
    return n / (time.perf_counter() - t), (time.process_time() - c) / n


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--workers", type=int, default=0, help="0: one per CPU core")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="naive and ours alternate, this many times each")
    a = p.parse_args(argv)
    rows = {"naive": [], "ours": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # The pack as users download it: five modules (the naive loop runs them all; we load two).
        build_tiny_antelopev2(tmp / "models" / "antelopev2", full_pack=True)
        make_images(tmp / "imgs", a.n, a.size)
        naive(tmp, tmp / "imgs", tmp / "warm_naive")  # warm-up (imports, page cache)
        ours(tmp, tmp / "imgs", tmp / "warm_ours", a.workers, a.batch_size)
        for r in range(a.rounds):  # interleaved, so a change in the machine's load hits both alike
            rows["naive"].append(naive(tmp, tmp / "imgs", tmp / f"naive{r}"))
            rows["ours"].append(ours(tmp, tmp / "imgs", tmp / f"ours{r}", a.workers, a.batch_size))
    med = {k: float(np.median([x[0] for x in v])) for k, v in rows.items()}
    cpu = {k: float(np.median([x[1] for x in v])) * 1000 for k, v in rows.items()}
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"images: {a.n} x {a.size}px JPEG, cpus: {os.cpu_count()}, {a.rounds} interleaved rounds, load avg {load}"
    )
    print(f"{'':58s} {'images/s per round':>22s} {'median':>8s} {'CPU ms/image':>13s}")
    labels = {
        "naive": "naive loop (FaceAnalysis.get, 5 modules, 1 pickle/image)",
        "ours": "get_face_info dataset mode",
    }
    for k, label in labels.items():
        per = " / ".join(f"{x[0]:.1f}" for x in rows[k])
        print(f"{label:58s} {per:>22s} {med[k]:8.1f} {cpu[k]:13.1f}")
    print(
        f"speed-up (median images/s): {med['ours'] / med['naive']:.2f}x;"
        f" CPU time per image: {cpu['naive'] / cpu['ours']:.2f}x less"
    )


if __name__ == "__main__":
    main()
