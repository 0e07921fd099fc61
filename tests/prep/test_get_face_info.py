"""get_face_info.py: single image, the bad-input zoo, dataset layouts, and kill/resume with 2 processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import conftest_face
import numpy as np
import pytest
from conftest_face import face_array, face_image
from PIL import Image

import get_face_info as gfi
from faceid.face.face_info import load_face_info
from faceid.face.kps import fit_size
from faceid.prep.sources import iter_source_items

tiny_face_root = conftest_face.tiny_face_root
REPO = Path(__file__).resolve().parents[2]
BOX = (120, 80, 260, 220)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _inside(points, box, tol=3.0):
    p = np.asarray(points, dtype=float)
    x1, y1, x2, y2 = box
    return bool(
        np.all((p[:, 0] >= x1 - tol) & (p[:, 0] <= x2 + tol) & (p[:, 1] >= y1 - tol) & (p[:, 1] <= y2 + tol))
    )


def test_single_image_pkl_npz_and_resize(tmp_path, tiny_face_root, capsys):
    src = tmp_path / "me.jpg"
    face_image().save(src, quality=95)
    for name, extra in (("me.pkl", []), ("me.npz", ["--resize"])):
        rc = gfi.main(
            gfi.parse_args(
                [
                    "--face_image",
                    str(src),
                    "--output",
                    str(tmp_path / name),
                    "--root",
                    str(tiny_face_root),
                    *extra,
                ]
            )
        )
        assert rc == 0
        info = load_face_info(tmp_path / name)
        assert info["embedding"].shape == (512,) and info["kps"].shape == (5, 2)
        frame = fit_size(384, 320) if extra else (384, 320)
        assert info["frame"] == frame
        scale = frame[0] / 384
        assert _inside(info["kps"], [v * scale for v in BOX])
    # MFaceTech-compatible: a plain pickle of numpy arrays with 'embedding' and 'kps'
    import pickle

    raw = pickle.loads((tmp_path / "me.pkl").read_bytes())
    assert isinstance(raw["embedding"], np.ndarray) and isinstance(raw["kps"], np.ndarray)
    dark = tmp_path / "dark.png"
    Image.new("RGB", (200, 200)).save(dark)
    rc = gfi.main(
        gfi.parse_args(
            ["--face_image", str(dark), "--output", str(tmp_path / "d.pkl"), "--root", str(tiny_face_root)]
        )
    )
    assert rc == 1 and "no face detected" in capsys.readouterr().err and not (tmp_path / "d.pkl").exists()


def _zoo(d: Path) -> tuple[list[str], dict[str, str]]:
    """Write the bad-input zoo; returns (index lines, expected outcome per image name: 'ok' or a reason)."""
    d.mkdir()
    exp: dict[str, str] = {}

    def save(name, img, outcome, **kw):
        img.save(d / name, **kw)
        exp[name] = outcome

    save("good.png", face_image(), "ok")
    (d / "random.jpg").write_bytes(np.random.default_rng(0).bytes(3000))
    exp["random.jpg"] = "not_image"
    face_image().save(d / "full.jpg", quality=95)
    data = (d / "full.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 2])
    exp["truncated.jpg"] = "corrupt_image"
    (d / "empty.jpg").write_bytes(b"")
    exp["empty.jpg"] = "empty_file"
    (d / "text.jpg").write_text("this is not a picture\n")
    exp["text.jpg"] = "not_image"
    save("cmyk.jpg", face_image().convert("CMYK"), "ok", quality=95)
    gray16 = (face_array().mean(axis=2) * 257).astype(np.uint16)
    save("gray16.png", Image.fromarray(gray16), "ok")
    rgba = np.concatenate([face_array(), np.full((320, 384, 1), 255, np.uint8)], axis=2)
    save("rgba.png", Image.fromarray(rgba, "RGBA"), "ok")
    save("gray.png", face_image().convert("L"), "ok")
    # EXIF orientation 6: stored pixels are the displayed picture rotated 90° counter-clockwise.
    exif = Image.Exif()
    exif[0x0112] = 6
    save(
        "exif.jpg",
        face_image(boxes=((30, 40, 170, 180),)).transpose(Image.Transpose.ROTATE_90),
        "ok",
        exif=exif,
        quality=95,
    )
    save("tiny.png", Image.new("RGB", (1, 1), (255, 255, 255)), "too_small")
    save("bomb.png", face_image(size=(600, 400)), "too_large")
    save("noface.png", Image.new("RGB", (300, 300), (20, 20, 20)), "no_face")
    four = ((10, 10, 90, 90), (200, 10, 280, 90), (10, 200, 90, 280), (200, 200, 280, 280))
    save("four.png", face_image(size=(320, 300), boxes=four), "too_many_faces")
    save("smallface.png", face_image(boxes=((100, 100, 130, 130),)), "face_too_small")
    exp["missing.jpg"] = "missing_file"
    lines = []
    for k, name in enumerate(exp):
        if k % 2:  # both JSONL flavours in one index
            lines.append(
                json.dumps({"file_name": name, "additional_feature": f"cap {name}", "bbox": [0, 0, 1, 1]})
            )
        else:
            lines.append(json.dumps({"image_file": name, "text": f"cap {name}"}))
    lines.insert(3, '{"image_file": "broken.jpg", "text": ')
    lines.insert(5, "")
    lines.insert(7, json.dumps({"caption": "no image key"}))
    return lines, exp


def test_bad_input_zoo_one_run(tmp_path, tiny_face_root, capsys):
    lines, exp = _zoo(tmp_path / "zoo")
    index = tmp_path / "zoo" / "index.jsonl"
    index.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    argv = ["--input", str(index), "--output", str(out), "--root", str(tiny_face_root), "--faceid6m_filters"]
    argv += ["--max_pixels", "200000", "--no_progress", "--shard_size", "4"]
    assert gfi.main(gfi.parse_args(argv)) == 0
    printed = capsys.readouterr().out
    assert "accepted: 6" in printed and "too_many_faces: 1" in printed and "malformed_line: 1" in printed
    ok, rej = _read(out / "index.jsonl"), _read(out / "rejects.jsonl")
    got = {Path(r["image"]).name: "ok" for r in ok}
    got.update({Path(r["image"]).name: r["reason"] for r in rej if "image" in r})
    assert got == exp
    line_reasons = sorted(r["reason"] for r in rej if "image" not in r)
    assert line_reasons == ["malformed_line", "missing_field"]
    assert len(ok) + len(rej) == sum(1 for line in lines if line.strip())  # every item accounted for, once
    assert all(r["detail"] for r in rej)
    by_name = {Path(r["image"]).name: r for r in ok}
    assert (
        by_name["good.png"]["caption"] == "cap good.png" and by_name["cmyk.jpg"]["caption"] == "cap cmyk.jpg"
    )
    ex = by_name["exif.jpg"]
    assert (ex["width"], ex["height"]) == (384, 320)
    assert _inside(ex["kps"], (30, 40, 170, 180)) and np.allclose(ex["bbox"], (30, 40, 170, 180), atol=4)
    emb = np.load(out / "embeddings" / "shard-00000.npy")
    assert emb.shape == (6, 512) and emb.dtype == np.float32
    assert [r["embedding"] for r in ok] == [
        {"file": "embeddings/shard-00000.npy", "row": i} for i in range(6)
    ]
    # Rerun: nothing new is done, same output.
    before = (out / "index.jsonl").read_bytes()
    assert gfi.main(gfi.parse_args(argv)) == 0
    assert (out / "index.jsonl").read_bytes() == before
    assert "0 new item(s)" in capsys.readouterr().out


def test_faceid6m_layout_and_per_image_npy(tmp_path, tiny_face_root):
    d = tmp_path / "laion_1024"
    (d / "face").mkdir(parents=True)
    recs = []
    for n in range(4):
        face_image(boxes=((40 + 10 * n, 40, 200, 200),), patterns=[n + 1]).save(d / f"{n}.png")
        face_image(size=(112, 112), boxes=((0, 0, 112, 112),)).save(d / "face" / f"{n}.png")
        np.save(d / f"{n}.npy", np.zeros(512, np.float32))
        recs.append(json.dumps({"image": f"/nonexistent/elsewhere/{n}.jpg", "caption": f"person {n}"}))
    recs[2] = "{not json"
    (d / "meta.jsonl").write_text("\n".join(recs) + "\n")
    items = list(iter_source_items(d))
    assert [i.key for i in items] == ["0", "1", "2", "3"] and items[1].caption == "person 1"
    assert items[2].error.startswith("malformed_line") and items[0].extra["embedding_npy"].endswith("0.npy")
    out = tmp_path / "out" / "train.jsonl"
    argv = [
        "--input",
        str(d),
        "--output",
        str(out),
        "--root",
        str(tiny_face_root),
        "--per_image_npy",
        "--no_progress",
    ]
    assert gfi.main(gfi.parse_args(argv)) == 0
    ok = _read(out)
    assert [r["image"] for r in ok] == ["../laion_1024/0.png", "../laion_1024/1.png", "../laion_1024/3.png"]
    assert ok[0]["caption"] == "person 0" and ok[0]["face_image"] == "../laion_1024/face/0.png"
    for r in ok:
        assert np.load(out.parent / r["embedding"]["file"]).shape == (512,)
    assert [r["reason"] for r in _read(out.parent / "rejects.jsonl")] == ["malformed_line"]


def test_folder_person_ids(tmp_path, tiny_face_root):
    for person in ("alice", "bob"):
        (tmp_path / "imgs" / person).mkdir(parents=True)
        face_image().save(tmp_path / "imgs" / person / "a.png")
    (tmp_path / "imgs" / "alice" / "a.txt").write_text("a caption\n")
    argv = ["--input", str(tmp_path / "imgs"), "--output", str(tmp_path / "o"), "--root", str(tiny_face_root)]
    assert gfi.main(gfi.parse_args([*argv, "--person_from_folder", "--no_progress"])) == 0
    ok = _read(tmp_path / "o" / "index.jsonl")
    assert [(r["person_id"], r["caption"]) for r in ok] == [("alice", "a caption"), ("bob", "")]


def _spawn(argv, rank, world, log):
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen(
        [sys.executable, str(REPO / "get_face_info.py"), *argv], env=env, stdout=log, stderr=subprocess.STDOUT
    )


def test_kill_two_processes_and_resume(tmp_path, tiny_face_root):
    data = tmp_path / "data"
    data.mkdir()
    for n in range(100):
        box = (20 + n % 50, 30, 150 + n % 50, 160) if n % 9 else (0, 0, 0, 0)
        face_image(size=(256, 256), boxes=(box,), patterns=[n + 1]).save(data / f"{n:03d}.png")
    common = [
        "--input",
        str(data),
        "--root",
        str(tiny_face_root),
        "--no_progress",
        "--batch_size",
        "2",
        "--shard_size",
        "3",
    ]
    common += ["--merge_shard_rows", "16", "--num_workers", "1"]
    # Reference: one uninterrupted process.
    ref = tmp_path / "ref"
    assert gfi.main(gfi.parse_args([*common, "--output", str(ref)])) == 0
    out = tmp_path / "run"
    argv = [*common, "--output", str(out)]
    with open(tmp_path / "log1.txt", "wb") as log:
        procs = [_spawn(argv, r, 2, log) for r in range(2)]
        parts = out / "parts"
        deadline = time.time() + 60
        while time.time() < deadline and len(list(parts.glob("w002-r*.jsonl"))) < 3:
            time.sleep(0.02)
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.wait()
    committed = sum(len(_read(p)) for p in parts.glob("w002-r*.jsonl"))
    assert 0 < committed < 100, "the kill should land midway"
    assert not (out / "index.jsonl").exists()
    with open(tmp_path / "log2.txt", "wb") as log:
        procs = [_spawn(argv, r, 2, log) for r in range(2)]
        codes = [p.wait(timeout=120) for p in procs]
    assert codes == [0, 0], (tmp_path / "log2.txt").read_text()
    keys = [r["key"] for p in parts.glob("w002-r*.jsonl") for r in _read(p)]
    assert len(keys) == len(set(keys)) == 100  # nothing processed twice
    got, want = _read(out / "index.jsonl"), _read(ref / "index.jsonl")
    assert len({r["id"] for r in got}) == len(got) == 88
    dumps = sorted(json.dumps(r, sort_keys=True) for r in got)
    assert dumps == sorted(json.dumps(r, sort_keys=True) for r in want)
    assert sorted((out / "rejects.jsonl").read_text().splitlines()) == sorted(
        (ref / "rejects.jsonl").read_text().splitlines()
    )
    for r in got:
        e = r["embedding"]
        a = np.load(out / e["file"], mmap_mode="r")[e["row"]]
        b = np.load(ref / e["file"], mmap_mode="r")[e["row"]]
        assert np.allclose(a, b, atol=1e-5)
    assert (out / "parts" / "done-w002-r00001.json").exists()


def test_library_raises_input_errors_for_rerun_and_rank(tmp_path, monkeypatch):
    """The parts store and the launcher environment raise InputError (the scripts turn it into a message)."""
    from faceid.errors import InputError
    from faceid.prep.engine import dist_env
    from faceid.prep.parts import PartStore

    store = PartStore(tmp_path / "out")
    store.dir.mkdir(parents=True)
    store.check_config({"det_size": 640, "filters": "none"})
    store.check_config({"det_size": 640, "filters": "none"})  # the same arguments resume
    with pytest.raises(InputError, match=r"different arguments \(det_size\).*fresh --output"):
        store.check_config({"det_size": 320, "filters": "none"})
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="RANK=2 is outside WORLD_SIZE=2"):
        dist_env()


def test_dataset_mode_equals_insightface_loop_bit_for_bit(tmp_path, tiny_face_root):
    """The fast path (decode threads, RGB→BGR by OpenCV from PIL's storage, sessions built once with one thread,
    batched recognition) gives what the official loop gives: cv2.imread, insightface's FaceAnalysis.get, the
    largest face — the same embedding bytes, keypoints and bbox."""
    import contextlib
    import io

    import cv2
    from insightface.app import FaceAnalysis

    d = tmp_path / "imgs"
    d.mkdir()
    shapes = [(384, 320), (320, 480), (512, 384), (400, 420), (300, 300), (640, 360)]
    for n, size in enumerate(shapes):
        boxes = [(30 + 8 * n, 40, 150 + 8 * n, 160)] + ([(200, 180, 280, 260)] if n % 2 else [])
        face_image(size=size, boxes=boxes, patterns=[n + 1, n + 7]).save(d / f"{n}.png")
    out = tmp_path / "out"
    argv = ["--input", str(d), "--output", str(out), "--root", str(tiny_face_root), "--no_progress"]
    assert gfi.main(gfi.parse_args([*argv, "--num_workers", "2", "--batch_size", "4"])) == 0
    rows = {Path(r["image"]).name: r for r in _read(out / "index.jsonl")}
    assert len(rows) == len(shapes)
    from faceid.train.records import load_embedding

    with contextlib.redirect_stdout(io.StringIO()):
        app = FaceAnalysis(name="antelopev2", root=str(tiny_face_root), providers=["CPUExecutionProvider"])
        app.prepare(ctx_id=-1, det_size=(640, 640))
    for n in range(len(shapes)):
        faces = app.get(cv2.imread(str(d / f"{n}.png")))
        face = max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
        r = rows[f"{n}.png"]
        spec = {**r["embedding"], "file": str(out / r["embedding"]["file"])}
        emb = load_embedding(spec)
        assert emb.tobytes() == face.embedding.astype(np.float32).tobytes()
        assert r["kps"] == [[round(float(x), 3), round(float(y), 3)] for x, y in face.kps]
        assert r["bbox"] == [round(float(v), 3) for v in face.bbox] and r["num_faces"] == len(faces)
