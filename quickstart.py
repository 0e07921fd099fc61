"""Offline end-to-end run of the real scripts on tiny weights (no GPU, no network; ~1-3 minutes on 2 CPU cores).

    python quickstart.py --out quickstart

1. ``download.py --tiny``            tiny SDXL, IdentityNet, ip-adapter.bin, antelopev2, CLIP
2. generated photos of 3 people      (bright textured squares the tiny detector finds; 4 photos each)
3. ``get_face_info.py``               dataset mode → training index; single-image mode → a face-info .pkl
4. ``train_instantId_sdxl.py``        a few cross-identity steps → checkpoint in the official layout
5. ``infer_from_pkl.py``              images of a held-out photo's person from the trained checkpoint
6. ``evaluate.py``                    Face Sim, CLIP-T, CLIP-I table

Each step runs as its own process, exactly as a user would type it; a failing step stops the run with its output.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent
OUT_DIR = "quickstart"
PEOPLE = 3
PHOTOS_PER_PERSON = 4
TRAIN_STEPS = 4
RESOLUTION = 64


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=OUT_DIR, help="working folder (reused: finished steps are cheap to redo)")
    p.add_argument("--train_steps", type=int, default=TRAIN_STEPS)
    p.add_argument("--quiet", action="store_true", help="only print the step lines and the result")
    return p.parse_args(argv)


def make_photos(folder: Path) -> list[Path]:
    """``folder/person_k/photo_j.png``: one texture per person (its identity), varying position, size, frame."""
    from faceid.tiny.faces import synthetic_face_array

    paths = []
    for k in range(PEOPLE):
        for j in range(PHOTOS_PER_PERSON):
            rng = np.random.default_rng(100 * k + j)
            w, h = int(rng.integers(96, 160)), int(rng.integers(96, 160))
            side = int(min(w, h) * rng.uniform(0.45, 0.7))
            x1, y1 = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
            img, _ = synthetic_face_array((w, h), box=(x1, y1, x1 + side, y1 + side), seed=k)
            path = folder / f"person_{k}" / f"photo_{j}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(path)
            path.with_suffix(".txt").write_text(f"a photo of person {k}, portrait\n")
            paths.append(path)
    return paths


def run(step: str, argv: list[str], quiet: bool) -> None:
    cmd = [sys.executable, *argv]
    print(f"[{step}] {' '.join(shlex.quote(c) for c in argv)}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=quiet, text=True)
    if proc.returncode != 0:
        if quiet:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"step '{step}' failed (exit {proc.returncode})")
    print(f"[{step}] done in {time.time() - t0:.1f}s", flush=True)


def main(args):
    out = Path(args.out).resolve()
    tiny, photos, index, train, gen, ev = (
        out / n for n in ("tiny", "photos", "index", "train", "outputs", "eval")
    )
    q = args.quiet
    t0 = time.time()
    run("1 weights", ["download.py", "--tiny", str(tiny)], q)
    all_photos = make_photos(photos)
    held_out = all_photos[PHOTOS_PER_PERSON - 1]  # person 0's last photo: the inference reference
    print(f"[2 photos] {len(all_photos)} photos of {PEOPLE} people in {photos}")
    run(
        "3 face info",
        [
            "get_face_info.py",
            "--input",
            str(photos),
            "--output",
            str(index),
            "--root",
            str(tiny),
            "--person_from_folder",
            "--no_progress",
        ],
        q,
    )
    face_pkl = out / "reference.pkl"
    run(
        "3 face info",
        ["get_face_info.py", "--face_image", str(held_out), "--output", str(face_pkl), "--root", str(tiny)],
        q,
    )
    run(
        "4 train",
        [
            "train_instantId_sdxl.py",
            "--pretrained_model_name_or_path",
            str(tiny / "stable-diffusion-xl-base-1.0"),
            "--controlnet_model_name_or_path",
            str(tiny / "checkpoints" / "ControlNetModel"),
            "--pretrained_ip_adapter_path",
            str(tiny / "checkpoints" / "ip-adapter.bin"),
            "--data_json_file",
            str(index / "index.jsonl"),
            "--cross_id",
            "--resolution",
            str(RESOLUTION),
            "--train_batch_size",
            "2",
            "--max_train_steps",
            str(args.train_steps),
            "--checkpointing_steps",
            str(max(1, args.train_steps // 2)),
            "--learning_rate",
            "1e-4",
            "--validation_steps",
            "0",
            "--report_to",
            "none",
            "--output_dir",
            str(train),
        ],
        q,
    )
    run(
        "5 generate",
        [
            "infer_from_pkl.py",
            "--base_model",
            str(tiny / "stable-diffusion-xl-base-1.0"),
            "--controlnet",
            str(train / "ControlNetModel"),
            "--face_adapter",
            str(train / "ip-adapter.bin"),
            "--face_image",
            str(held_out),
            "--face_info",
            str(face_pkl),
            "--prompt",
            "a photo of a person smiling",
            "--prompt",
            "a person wearing sunglasses, side view",
            "--num_images",
            "2",
            "--steps",
            "4",
            "--min_side",
            str(RESOLUTION),
            "--max_side",
            str(RESOLUTION),
            "--output_dir",
            str(gen),
        ],
        q,
    )
    run(
        "6 evaluate",
        [
            "evaluate.py",
            str(gen / "settings.json"),
            "--out",
            str(ev),
            "--clip_model",
            str(tiny / "models" / "clip-vit-tiny"),
            "--face_root",
            str(tiny),
            "--no_progress",
        ],
        q,
    )
    print(f"\nquickstart finished in {time.time() - t0:.0f}s")
    print(f"  training index : {index / 'index.jsonl'}")
    print(f"  trained model  : {train / 'ip-adapter.bin'}, {train / 'ControlNetModel'}")
    print(f"  images         : {gen}")
    print(f"  metrics table  : {ev / 'summary.md'}")
    table = ev / "summary.md"
    if table.is_file():
        print("\n" + table.read_text())
    return {"index": index / "index.jsonl", "train": train, "images": gen, "eval": ev}


if __name__ == "__main__":
    from faceid.cli import run as run_cli  # not `run`: that name is this script's step runner

    run_cli(main, parse_args)
