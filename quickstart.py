"""Offline quickstart: train identity into the adapter in the miniature world and see it (~1-2 min on 2 CPU cores).

    python quickstart.py --out quickstart

1. ``download.py --tiny``     the miniature world's weights (tiny SDXL, IdentityNet, ip-adapter.bin, antelopev2)
2. photos                      8 persons of the world (docs/miniature.md), 4 captioned photos each, and one held-out
                               reference photo per person
3. ``get_face_info.py``        the training index (embedding, keypoints, person from the folder)
4. ``train_instantId_sdxl.py`` ``--cross_id --no-train_identitynet``: the adapter learns to use the face
5. ``evaluate.py --protocol``  images of every reference person, with the start weights ("before") and the trained
                               ones ("after"), prompts asking for other glasses / expression / background
6. ``evaluate.py``             Face Sim of those images vs the same person and vs another person

Each step runs as its own process, exactly as a user would type it; a failing step stops the run with its output.
It ends with the Face Sim table and ``OUT/quickstart.png`` (per person: reference, before, after).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
OUT_DIR = "quickstart"
PERSONS = list(range(8))
PHOTOS_PER_PERSON = 4
# The fewest steps that show a clear rise within the 2-minute budget (measured: README "Quickstart").
TRAIN_STEPS = 200
LEARNING_RATE = 3e-3
BATCH = 8
GEN_STEPS = 12
PICTURE_PERSONS = 4
# Prompts that change attributes of the reference photos (each reference shows the opposite of the first one).
PROMPTS = (
    "a photo of a person, wearing glasses, smiling, blue background",
    "a photo of a person, no glasses, serious, green background",
)
REFERENCE_ATTRS = {"glasses": False, "smiling": False, "background": "red"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=OUT_DIR, help="working folder")
    p.add_argument("--train_steps", type=int, default=TRAIN_STEPS)
    p.add_argument("--quiet", action="store_true", help="only print the step lines and the result")
    return p.parse_args(argv)


def make_photos(photos: Path, references: Path) -> None:
    """``photos/personNN/photo_j.png`` (+ ``.txt`` caption) and ``references/personNN.png`` (held out)."""
    from PIL import Image

    from faceid.tiny import world as W

    codes = W.person_codes()
    rng = np.random.default_rng(1)
    for p in PERSONS:
        for j in range(PHOTOS_PER_PERSON):
            photo = W.random_photo(rng, p)
            path = photos / f"person{p:02d}" / f"photo_{j}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(W.render(photo, codes, seed=int(rng.integers(1 << 31)))).save(path)
            path.with_suffix(".txt").write_text(photo.caption + "\n")
    references.mkdir(parents=True, exist_ok=True)
    for p in PERSONS:
        photo = W.random_photo(rng, p, attrs=REFERENCE_ATTRS)
        img = W.render(photo, codes, seed=int(rng.integers(1 << 31)))
        Image.fromarray(img).save(references / f"person{p:02d}.png")


def write_protocol(path: Path) -> None:
    """evaluate.py's protocol (configs/eval_protocol.json format) for the miniature world."""
    proto = {
        "name": "quickstart",
        "identities": "*",
        "seeds": [0],
        "prompts": [{"category": f"prompt {i}", "prompt": t} for i, t in enumerate(PROMPTS)],
        "negative_prompt": "",
        "generation": {"steps": GEN_STEPS, "guidance_scale": 5.0, "width": 64, "height": 64,
                       "ip_adapter_scale": 0.8, "controlnet_conditioning_scale": 0.8},
    }  # fmt: skip
    path.write_text(json.dumps(proto, indent=2) + "\n")


def other_person(settings: Path, out: Path) -> Path:
    """The same images with the next person's reference: Face Sim vs another person (the baseline)."""
    images = json.loads(settings.read_text())["images"]
    refs = sorted({r["face_image"] for r in images})
    with out.open("w") as f:
        for r in images:
            other = refs[(refs.index(r["face_image"]) + 1) % len(refs)]
            f.write(json.dumps({"image": r["path"], "reference": other, "prompt": r["prompt"]}) + "\n")
    return out


def run(step: str, argv: list[str], quiet: bool) -> None:
    # One thread per process: the tiny models gain nothing from more, and on a busy machine two threads per
    # process thrash (measured: 8 s instead of 0.12 s per training step with other jobs running).
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    print(f"[{step}] python {' '.join(shlex.quote(c) for c in argv)}", flush=True)
    t0 = time.time()
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=quiet, text=True, env=env)
    if proc.returncode != 0:
        if quiet:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"step '{step}' failed (exit {proc.returncode})")
    print(f"[{step}] done in {time.time() - t0:.1f}s", flush=True)


def picture(before: Path, after: Path, references: Path, path: Path, persons: int = PICTURE_PERSONS) -> None:
    """One row per person: reference photo, then before / after for each prompt (2x nearest upscale)."""
    from PIL import Image, ImageDraw

    from faceid.files import atomic_path

    b = json.loads(before.read_text())["images"]
    a = json.loads(after.read_text())["images"]
    refs = sorted({r["face_image"] for r in b})[:persons]
    cell, head, pad = 128, 48, 6
    cols = 1 + 2 * len(PROMPTS)
    sheet = Image.new("RGB", (cols * (cell + pad) + pad, head + len(refs) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    titles = [["reference photo"]]
    for t in PROMPTS:
        glasses, mouth, background = t.replace("a photo of a person, ", "").split(", ")
        titles += [
            [when, f"{glasses}, {mouth},", background] for when in ("before training", "after training")
        ]
    for c, lines in enumerate(titles):
        for k, line in enumerate(lines):
            draw.text((pad + c * (cell + pad), 2 + 14 * k), line, fill="black")
    for r, ref in enumerate(refs):
        y = head + r * (cell + pad)
        row = [ref]
        for t in PROMPTS:
            row += [next(i["path"] for i in s if i["face_image"] == ref and i["prompt"] == t) for s in (b, a)]
        for c, img in enumerate(row):
            tile = Image.open(img).convert("RGB").resize((cell, cell), Image.NEAREST)
            sheet.paste(tile, (pad + c * (cell + pad), y))
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")


def main(args):
    out = Path(args.out).resolve()
    tiny, photos, refs, index, train, gen, ev = (
        out / n for n in ("tiny", "photos", "references", "index", "train", "generations", "eval")
    )
    q = args.quiet
    t0 = time.time()
    run("1 weights", ["download.py", "--tiny", str(tiny)], q)
    make_photos(photos, refs)
    print(f"[2 photos] {len(PERSONS)} persons x {PHOTOS_PER_PERSON} photos in {photos}, references in {refs}")
    run("3 face info", ["get_face_info.py", "--input", str(photos), "--output", str(index),
                        "--root", str(tiny), "--person_from_folder", "--no_progress"], q)  # fmt: skip
    base, controlnet = tiny / "stable-diffusion-xl-base-1.0", tiny / "checkpoints" / "ControlNetModel"
    run("4 train", [
        "train_instantId_sdxl.py", "--pretrained_model_name_or_path", str(base),
        "--controlnet_model_name_or_path", str(controlnet),
        "--pretrained_ip_adapter_path", str(tiny / "checkpoints" / "ip-adapter.bin"),
        "--data_json_file", str(index / "index.jsonl"), "--cross_id", "--no-train_identitynet",
        "--resolution", "64", "--train_batch_size", str(BATCH), "--learning_rate", str(LEARNING_RATE),
        "--max_train_steps", str(args.train_steps), "--checkpointing_steps", str(max(1, args.train_steps // 2)),
        "--cache_text_embeddings",
        "--no-log_samples", "--report_to", "none", "--seed", "0", "--output_dir", str(train),
    ], q)  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    write_protocol(out / "protocol.json")
    gen_argv = [
        "evaluate.py", "--protocol", str(out / "protocol.json"), "--faces_dir", str(refs),
        "--checkpoint", f"before={tiny / 'checkpoints'}", "--checkpoint", f"after={train}",
        "--tiny", str(tiny), "--steps", str(GEN_STEPS), "--out", str(gen), "--generate_only",
    ]  # fmt: skip
    run("5 generate", gen_argv, quiet=True)  # a line per image: shown only if the step fails
    before, after = (
        gen / "generations" / "before" / "settings.json",
        gen / "generations" / "after" / "settings.json",
    )
    sets = {
        "before_same": before,
        "before_other": other_person(before, out / "before_other.jsonl"),
        "after_same": after,
        "after_other": other_person(after, out / "after_other.jsonl"),
    }
    run("6 evaluate", ["evaluate.py", *(f"{k}={v}" for k, v in sets.items()), "--out", str(ev),
                       "--face_root", str(tiny), "--no_clip", "--no_progress"], q)  # fmt: skip
    picture(before, after, refs, out / "quickstart.png")

    sim = {k: json.loads((ev / k / "summary.json").read_text())["face_sim"]["mean"] for k in sets}
    print(f"\nquickstart finished in {time.time() - t0:.0f}s ({args.train_steps} training steps)")
    print(
        "\nFace Sim (tiny recognizer) of generated images vs the reference photo's person and vs another person:"
    )
    print("|        | same person | another person | margin |")
    print("| ---    | ---         | ---            | ---    |")
    for when in ("before", "after"):
        s, o = sim[f"{when}_same"], sim[f"{when}_other"]
        print(f"| {when:6} | {s:+.3f}      | {o:+.3f}         | {s - o:+.3f} |")
    print(f"\nsame-person Face Sim rose by {sim['after_same'] - sim['before_same']:+.3f} with training")
    print(f"  picture        : {out / 'quickstart.png'}  (per person: reference, before, after)")
    print(f"  trained model  : {train / 'ip-adapter.bin'}")
    print(f"  images         : {gen / 'generations'}")
    print(f"  metrics        : {ev / 'compare.md'}")
    result = {"face_sim": sim, "picture": out / "quickstart.png", "train": train, "eval": ev}
    (out / "quickstart.json").write_text(
        json.dumps({"face_sim": sim, "train_steps": args.train_steps}) + "\n"
    )
    return result


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from faceid import cli

    cli.run(main, parse_args)
