"""Editability evaluation (faceid/eval/editability.py, evaluate.py with configs/editability_protocol.json): identity
to a person's other photos, copy-paste, CLIP zero-shot attribute following, head-angle change, held-out persons."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest_mine import photo

import evaluate
from faceid.eval import editability as E
from faceid.face.kps import head_pose

ROOT = Path(__file__).resolve().parents[2]
SHOTS = 4  # photos per person: shot 0 is the reference


def _persons_folder(root: Path, persons=(0, 1, 2)) -> Path:
    """The miniature world's persons, a sub-folder of photos each (``0.png`` sorts first: the reference)."""
    for p in persons:
        (root / f"person_{p}").mkdir(parents=True, exist_ok=True)
        for s in range(SHOTS):
            photo(p, s).save(root / f"person_{p}" / f"{s}.png")
    return root


@pytest.fixture(scope="module")
def world_faces(tiny_dir):
    from faceid.eval.metrics import make_face_analyzer

    return E.FaceCache(make_face_analyzer(str(tiny_dir), "antelopev2"))


# ------------------------------------------------------------------------------------------- known truth


def test_copy_and_identity_rank_pixel_copy_new_photo_and_other_person(world_faces, tmp_path):
    """Outputs whose truth is known: a pixel copy of the reference, a new photo of the same person, a photo of
    another person. Identity keeps the person (copy and new photo alike, another person far below); copy-paste
    is highest for the pixel copy, where it equals 1 − identity exactly."""
    persons = E.load_persons(_persons_folder(tmp_path / "faces"))
    assert [(p.id, Path(p.reference).name, len(p.others)) for p in persons] == [
        (f"person_{k}", "0.png", SHOTS - 1) for k in range(3)
    ]
    proto = {
        "prompts": [
            {"category": "expression", "prompt": "{subject} smiling", "attribute": "a", "opposite": "b"}
        ]
    }
    out = tmp_path / "out"
    out.mkdir()
    images = []
    for k, p in enumerate(persons):
        shutil.copy(p.reference, out / f"{k}_copy.png")
        photo(k, 9).save(out / f"{k}_new.png")  # a shot the index does not hold
        photo((k + 1) % 3, 9).save(out / f"{k}_other.png")
        for kind in ("copy", "new", "other"):
            images.append({"path": f"{k}_{kind}.png", "prompt": "a person smiling", "identity": p.key})
    (out / "settings.json").write_text(json.dumps({"images": images}))
    from faceid.eval.scoring import load_items

    rows = E.score_items(load_items(out / "settings.json"), persons, proto, world_faces)
    by = {(r["person"], Path(r["image"]).stem.split("_")[1]): r for r in rows}
    for k, p in enumerate(persons):
        copy, new, other = (by[(p.id, kind)] for kind in ("copy", "new", "other"))
        assert copy["ref_sim"] == pytest.approx(1.0, abs=1e-6)
        assert copy["copy"] == pytest.approx(1.0 - copy["identity"], abs=1e-6)
        # independent: the reference's mean cosine to the other photos, from the analyzer's normalised embeddings
        ref = world_faces.analyzer.analyze(photo(k, 0)).normed_embedding
        others = [world_faces.analyzer.analyze(photo(k, s)).normed_embedding for s in range(1, SHOTS)]
        assert copy["identity"] == pytest.approx(float(np.mean([ref @ o for o in others])), abs=1e-5)
        assert copy["copy"] > new["copy"] + 0.003
        assert min(copy["identity"], new["identity"]) > other["identity"] + 0.3
        assert copy["margin"] > 0.3 and new["margin"] > 0.3 and other["margin"] < 0
        assert all(r["d_yaw"] is not None and r["face_detected"] for r in (copy, new, other))
        assert copy["d_yaw"] == 0 and copy["d_roll"] == 0


def test_head_pose_on_known_keypoints():
    """Yaw and roll from 5 keypoints whose angles are known by construction; the change between two is absolute."""
    half = 20.0
    frontal = np.array([[-half, 0.0], [half, 0.0], [0.0, 25.0], [-15.0, 45.0], [15.0, 45.0]])
    for yaw, roll in [(0.0, 0.0), (30.0, 0.0), (-45.0, 20.0), (10.0, -35.0)]:
        k = frontal.copy()
        k[2, 0] = half * math.sin(math.radians(yaw))  # the nose off the eyes' and mouth's mid-line
        c, s = math.cos(math.radians(roll)), math.sin(math.radians(roll))
        k = k @ np.array([[c, s], [-s, c]]) + [100.0, 80.0]  # rotate by roll (image y down), then move
        assert head_pose(k) == pytest.approx((yaw, roll), abs=1e-9)
    assert E._angle_change(170.0, -170.0) == pytest.approx(20.0)


# ------------------------------------------------------------------------------------------- held-out persons


def test_holdout_split_is_deterministic_disjoint_and_matches_training(tmp_path):
    from faceid.train.records import Record, held_out_persons, index_persons, split_index_lines, split_persons

    lines = [
        {"id": f"{p}-{k}", "image": f"{p}-{k}.png", "person_id": f"p{p}"} for p in range(8) for k in range(3)
    ]
    lines += [{"id": "s", "image": "s.png", "person_id": "single"}, "raw line kept in train"]
    train, held = split_index_lines(lines, 3, seed=7)
    held_ids = {o["person_id"] for o in held}
    assert len(held_ids) == 3 and len(held) == 9 and len(train) + len(held) == len(lines)
    assert not held_ids & {o["person_id"] for o in train if isinstance(o, dict)} and "single" not in held_ids
    assert split_index_lines(list(reversed(lines)), 3, seed=7)[1] == list(reversed(held))  # order-free choice
    assert (
        len({frozenset(held_out_persons([o["person_id"] for o in lines[:24]], 3, s)) for s in range(6)}) > 1
    )
    # training's --validation_persons 3 --seed 7 holds out the same persons evaluate.py --holdout_persons picks
    recs = [Record(o["id"], o["image"], person_id=o["person_id"]) for o in lines if isinstance(o, dict)]
    assert {r.person_id for r in split_persons(recs, 3, 7)[1]} == held_ids
    index = tmp_path / "index.jsonl"
    index.write_text(
        "".join(json.dumps(dict(o, caption="c", kps=None, embedding="e.npy")) + "\n" for o in lines[:-1])
    )
    persons = E.load_persons(index, holdout_persons=3, holdout_seed=7, index_persons=index_persons)
    assert {p.id for p in persons} == held_ids
    assert all(Path(p.reference).name.endswith("-0.png") and len(p.others) == 2 for p in persons)
    with pytest.raises(E.InputError, match="--holdout_persons 9"):
        E.load_persons(index, holdout_persons=9, index_persons=index_persons)


# ------------------------------------------------------------------------------------------- end to end


def _zero_shot_reference(clip_dir: Path, image: str, texts: list[str]) -> float:
    """P(texts[0]) by CLIPModel's own forward (logits_per_image, softmax): independent of ClipScorer."""
    import torch
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(str(clip_dir)).eval()
    proc = CLIPProcessor.from_pretrained(str(clip_dir))
    batch = proc(
        text=texts, images=Image.open(image).convert("RGB"), return_tensors="pt", padding="max_length"
    )
    with torch.no_grad():
        logits = model(**batch).logits_per_image[0]
    return float(torch.softmax(logits, 0)[0])


def test_evaluate_editability_two_checkpoints_end_to_end(tiny_dir, tiny_paths, tmp_path):
    import torch

    faces = _persons_folder(tmp_path / "faces", persons=(3, 4))
    # the shipped protocol (with --tiny its world-caption prompts), two categories, one seed; the second
    # checkpoint ignores the face
    weights = torch.load(tiny_paths["face_adapter"], map_location="cpu", weights_only=True)
    weights["ip_adapter"] = {k: torch.zeros_like(v) for k, v in weights["ip_adapter"].items()}
    (tmp_path / "noface").mkdir()
    torch.save(weights, tmp_path / "noface" / "ip-adapter.bin")
    out = tmp_path / "eval"
    argv = ["--protocol", str(ROOT / "configs" / "editability_protocol.json"), "--tiny", str(tiny_dir)]
    argv += ["--persons", str(faces), "--max_prompts", "2", "--max_seeds", "1"]
    argv += [
        "--checkpoint",
        f"base={tiny_paths['face_adapter']}",
        "--checkpoint",
        f"noface={tmp_path / 'noface'}",
    ]
    argv += ["--controlnet", str(tiny_paths["controlnet"])]
    argv += [
        "--clip_model",
        str(tiny_paths["clip"]),
        "--face_root",
        str(tiny_dir),
        "--out",
        str(out),
        "--no_progress",
    ]
    summaries = evaluate.main(evaluate.parse_args(argv))

    assert list(summaries) == ["base", "noface"]
    with open(out / "editability.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 2 * 1 and not any(
        r["error"] for r in rows
    )  # checkpoints x persons x prompts x seeds
    report = json.loads((out / "editability.json").read_text())["checkpoints"]
    table = (out / "editability.md").read_text()
    for name in ("base", "noface"):
        mine = [r for r in rows if r["checkpoint"] == name]
        s = report[name]
        assert set(s["categories"]) == {"adornment", "expression"} and s["images"] == 4
        for m in ("identity", "copy", "ref_sim", "p_output"):
            vals = [float(r[m]) for r in mine if r[m]]
            assert s[m]["count"] == len(vals)
            if vals:
                assert s[m]["mean"] == pytest.approx(float(np.mean(vals)), rel=1e-9)
        follow = [r["followed"] == "True" for r in mine if r["followed"]]
        eligible = [r for r in mine if float(r["p_reference"]) < 0.5]
        assert s["follow"]["eligible"] == len(follow) == len(eligible)
        row = f"| {name} | 4 | {s['no_face']} | "
        assert row in table
        if s["identity"]["mean"] is not None:
            assert f"| {s['identity']['mean']:.3f} | {s['copy']['mean']:.3f} |" in table
    assert sum(report[n]["identity"]["count"] for n in report) > 0  # faces were found in the outputs
    # numbers against an independent computation: Face Sim from the analyzer and CLIP's own forward
    from faceid.eval.metrics import make_face_analyzer

    analyzer = make_face_analyzer(str(tiny_dir), "antelopev2")
    r = next(r for r in rows if r["identity"])
    g = analyzer.analyze(_rgb(r["image"])).normed_embedding
    ref = analyzer.analyze(_rgb(r["reference"])).normed_embedding
    others = [
        analyzer.analyze(_rgb(p)).normed_embedding
        for p in sorted(Path(r["reference"]).parent.glob("*.png"))[1:]
    ]
    assert float(r["ref_sim"]) == pytest.approx(float(g @ ref), abs=1e-5)
    assert float(r["identity"]) == pytest.approx(float(np.mean([g @ o for o in others])), abs=1e-5)
    assert float(r["copy"]) == pytest.approx(float(g @ ref) - float(r["identity"]), abs=1e-6)
    p = _zero_shot_reference(tiny_paths["clip"], r["image"], [r["attribute"], r["opposite"]])
    assert float(r["p_output"]) == pytest.approx(p, abs=1e-4)
    png = (out / "editability.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def _rgb(path):
    from PIL import Image

    return Image.open(path).convert("RGB")


def test_bad_editability_input_is_a_message_not_a_traceback(tmp_path, capsys):
    from faceid import cli

    (tmp_path / "flat").mkdir()
    photo(0, 0).save(tmp_path / "flat" / "a.png")
    proto = str(ROOT / "configs" / "editability_protocol.json")
    for argv, says in [
        (["--protocol", proto], "needs --persons"),
        (["--protocol", proto, "--persons", str(tmp_path / "nowhere")], "persons not found"),
        (["--protocol", proto, "--persons", str(tmp_path / "flat")], "one sub-folder of photos per person"),
        (["--protocol", str(tmp_path / "none.json")], "protocol not found"),
    ]:
        with pytest.raises(SystemExit) as done:
            cli.run(evaluate.main, evaluate.parse_args, argv + ["--checkpoint", "x=" + str(tmp_path)])
        err = capsys.readouterr().err
        assert done.value.code == 2 and says in err and "Traceback" not in err
