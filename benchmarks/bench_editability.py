"""The editability metrics on outputs whose truth is known (issue 20; docs/evaluation.md, "Measured").

    python benchmarks/bench_editability.py [--tiny DIR] [--persons 3]

Persons of the miniature world (faceid/tiny/world.py), 4 photos each (photo 0 the reference). Three "outputs" per
person: a pixel copy of the reference, a new photo of the same person that is not among its photos, and a photo of
another person. Printed: identity (Face Sim to the person's other photos), copy (Face Sim to the reference −
identity), Face Sim to the reference and the margin over other persons, as evaluate.py's editability protocol
computes them (faceid/eval/editability.py) with the tiny antelopev2 recognizer. The short version, which asserts
the ordering, is tests/eval/test_editability.py.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHOTS = 4
NEW_SHOT = 9


def world_photo(person: int, shot: int, size: int = 64) -> Image.Image:
    """A photo of a world person: glasses and expression by shot, box and background drawn (tests/conftest_mine)."""
    from faceid.tiny.world import person_codes, random_photo, render

    rng = np.random.default_rng(1000 * person + shot)
    photo = random_photo(rng, person, size, attrs={"glasses": shot % 2 == 1, "smiling": shot % 4 >= 2})
    return Image.fromarray(render(photo, person_codes(), size, seed=1000 * person + shot))


def known_truth(tiny: Path, work: Path, n_persons: int = 3) -> list[dict]:
    from faceid.eval import editability as E
    from faceid.eval.metrics import make_face_analyzer
    from faceid.eval.scoring import EvalItem

    for p in range(n_persons):
        (work / "faces" / f"person_{p}").mkdir(parents=True, exist_ok=True)
        for s in range(SHOTS):
            world_photo(p, s).save(work / "faces" / f"person_{p}" / f"{s}.png")
    persons = E.load_persons(work / "faces")
    items = []
    for k, p in enumerate(persons):
        shutil.copy(p.reference, work / f"{k}_pixel-copy.png")
        world_photo(k, NEW_SHOT).save(work / f"{k}_new-photo.png")
        world_photo((k + 1) % n_persons, NEW_SHOT).save(work / f"{k}_other-person.png")
        for kind in ("pixel-copy", "new-photo", "other-person"):
            items.append(EvalItem(str(work / f"{k}_{kind}.png"), prompt="x", id=f"{p.id} {kind}",
                                  extra={"identity": p.key}))  # fmt: skip
    proto = {"prompts": [{"category": "c", "prompt": "x", "attribute": "a", "opposite": "b"}]}
    faces = E.FaceCache(make_face_analyzer(str(tiny), "antelopev2"))
    return E.score_items(items, persons, proto, faces)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--tiny", default=None, help="a built tiny layout (download.py --tiny DIR); default: a temp one"
    )
    p.add_argument("--persons", type=int, default=3)
    args = p.parse_args(argv)
    from faceid.tiny.models import build_tiny

    with tempfile.TemporaryDirectory() as tmp:
        tiny = Path(args.tiny or Path(tmp) / "tiny")
        build_tiny(tiny)
        rows = known_truth(tiny, Path(tmp) / "work", args.persons)
    print("| output | identity | copy | Face Sim (ref) | margin |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['id']} | {r['identity']:.4f} | {r['copy']:.4f} | {r['ref_sim']:.4f} | {r['margin']:.4f} |"
        )


if __name__ == "__main__":
    main()
