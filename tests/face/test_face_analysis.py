"""FaceAnalyzer through insightface's real FaceAnalysis with the tiny antelopev2 pack."""

from __future__ import annotations

import os
import subprocess
import sys

import conftest_face
import numpy as np
import pytest
from conftest_face import face_image
from PIL import Image

from faceid.face.analysis import (
    FaceAnalyzer,
    FaceResult,
    NoFace,
    NoFaceModelError,
    choose_providers,
    largest_face_index,
)
from faceid.face.images import to_bgr
from faceid.tiny.antelope import DETECTOR_FILE, RECOGNIZER_FILE, build_tiny_antelopev2

# Shared session fixtures (tests/conftest.py belongs to the core suite).
tiny_face_root = conftest_face.tiny_face_root
analyzer = conftest_face.analyzer


def _official_buggy_key(face):
    # The anchors' key, operator precedence and all: w * y2 - y1 instead of w * h.
    return (face["bbox"][2] - face["bbox"][0]) * face["bbox"][3] - face["bbox"][1]


def _inside(points, box, tol=2.0):
    x1, y1, x2, y2 = box
    p = np.asarray(points).reshape(-1, 2)
    return bool(
        np.all((p[:, 0] >= x1 - tol) & (p[:, 0] <= x2 + tol) & (p[:, 1] >= y1 - tol) & (p[:, 1] <= y2 + tol))
    )


def test_tiny_pack_is_small_deterministic_and_routed(tmp_path, tiny_face_root):
    d = build_tiny_antelopev2(tmp_path / "a")
    ref = tiny_face_root / "models" / "antelopev2"
    for f in (DETECTOR_FILE, RECOGNIZER_FILE):
        assert (d / f).read_bytes() == (ref / f).read_bytes()
        assert (d / f).stat().st_size < 3_000_000
    from insightface.model_zoo import model_zoo

    det = model_zoo.get_model(str(d / DETECTOR_FILE), providers=["CPUExecutionProvider"])
    rec = model_zoo.get_model(str(d / RECOGNIZER_FILE), providers=["CPUExecutionProvider"])
    assert det.taskname == "detection" and det.use_kps and det.fmc == 3 and det.input_size is None
    assert rec.taskname == "recognition" and rec.input_size == (112, 112) and rec.input_mean == 127.5


def test_router_task_predicts_insightface_routing_and_unused_files_get_no_session(tmp_path, monkeypatch):
    """Each file's parsed interface routes as insightface's ModelRouter routes it (same kind of model); the
    analyzer opens sessions only for the files its modules need, and asking for a landmark model still loads it."""
    from insightface.model_zoo import model_zoo

    from faceid.face.analysis import router_task
    from faceid.weight_files import check_onnx

    d = build_tiny_antelopev2(tmp_path / "models" / "antelopev2", full_pack=True)
    kinds = {"RetinaFace": "detection", "ArcFaceONNX": "recognition", "Landmark": "landmark",
             "Attribute": "attribute"}  # fmt: skip
    for f in sorted(d.glob("*.onnx")):
        model = model_zoo.ModelRouter(str(f)).get_model(providers=["CPUExecutionProvider"])
        assert router_task(*check_onnx(f)) == kinds[type(model).__name__], f.name
    opened = []
    real = model_zoo.ModelRouter.get_model
    monkeypatch.setattr(
        model_zoo.ModelRouter,
        "get_model",
        lambda self, **kw: opened.append(self.onnx_file) or real(self, **kw),
    )
    assert sorted(FaceAnalyzer(tmp_path).models) == ["detection", "recognition"]
    assert sorted(os.path.basename(f) for f in opened) == [RECOGNIZER_FILE, DETECTOR_FILE]
    opened.clear()
    both = FaceAnalyzer(tmp_path, allowed_modules=("detection", "landmark_2d_106"))
    assert (
        sorted(both.models) == ["detection", "landmark_2d_106"] and len(opened) == 3
    )  # 1k3d68: a landmark too


def test_detector_equals_insightface_detect_bit_for_bit(analyzer, monkeypatch):
    """faceid.face.detection.Detector (network input by table look-up, outputs decoded for the candidates only)
    gives insightface's detect byte for byte: boxes, scores and keypoints, at every size tried, on square, wide and
    tall images with one to three faces or none. A table that is not one function of the byte is not used."""
    from faceid.face.detection import Detector

    det = analyzer.detector
    images = [np.zeros((300, 300, 3), np.uint8)]
    for n, size in enumerate([(640, 640), (900, 400), (360, 700), (512, 384), (1000, 1000)]):
        w, h = size
        boxes = [
            (30 + 40 * k + 5 * n, 40 + 90 * k, 150 + 40 * k + 5 * n, 160 + 90 * k) for k in range(1 + n % 3)
        ]
        boxes = [b for b in boxes if b[2] < w and b[3] < h]
        images.append(
            conftest_face.face_array(size=size, boxes=boxes, patterns=[n + 1, n + 3, n + 5][: len(boxes)])
        )
    found = 0
    for bgr in images:
        for size in (640, 480, 320, 256):
            ref_det, ref_kps = analyzer.det_model.detect(bgr, input_size=(size, size), max_num=0)
            got_det, got_kps = det.detect(bgr, size)
            assert got_det.dtype == ref_det.dtype and got_det.tobytes() == ref_det.tobytes()
            assert got_kps.shape == ref_kps.shape and got_kps.tobytes() == ref_kps.tobytes()
            found += len(ref_det)
    assert found >= 20 and all(det.blob_table(s, s) is not None for s in (640, 480, 320, 256))
    other = Detector(analyzer.det_model)
    real = other._blob_reference

    def position_dependent(img):
        out = real(img)
        out[0, 0, -1, -1] += 1.0
        return out

    monkeypatch.setattr(other, "_blob_reference", position_dependent)
    img = images[1][:64, :64].copy()
    assert other.blob_table(64, 64) is None
    np.testing.assert_array_equal(other.blob(img), position_dependent(img))


def test_providers_cpu_only_without_gpu():
    providers, options, ctx = choose_providers()
    import torch

    if not torch.cuda.is_available():
        assert providers == ["CPUExecutionProvider"] and ctx == -1


def test_one_face(analyzer):
    box = (120, 80, 260, 220)
    res = analyzer.analyze(face_image(boxes=(box,)))
    assert isinstance(res, FaceResult)
    assert res.num_faces == 1 and res.frame == (384, 320)
    assert res.embedding.shape == (512,) and res.embedding.dtype == np.float32
    assert abs(np.linalg.norm(res.normed_embedding) - 1) < 1e-5
    assert not np.isclose(np.linalg.norm(res.embedding), 1.0)  # raw, not normalised
    assert np.allclose(res.bbox, box, atol=3)
    assert res.kps.shape == (5, 2) and _inside(res.kps, box)
    assert 0.5 < res.det_score <= 1.0


def _insightface_app(root):
    """insightface's own FaceAnalysis on the same pack (the official scripts' path), as a reference."""
    import contextlib
    import io

    from insightface.app import FaceAnalysis

    with contextlib.redirect_stdout(io.StringIO()):
        app = FaceAnalysis(name="antelopev2", root=str(root), providers=["CPUExecutionProvider"])
        app.prepare(ctx_id=-1, det_size=(640, 640))
    return app


def test_input_kinds_agree_and_match_official_get(analyzer, tiny_face_root, tmp_path):
    img = face_image()
    path = tmp_path / "f.png"
    img.save(path)
    a = analyzer.analyze(img)
    b = analyzer.analyze(to_bgr(img))
    c = analyzer.analyze(str(path))
    for r in (b, c):
        assert np.allclose(r.embedding, a.embedding, atol=1e-5) and np.allclose(r.kps, a.kps)
    # Same numbers as insightface's own FaceAnalysis.get (per-face recognition path).
    faces = _insightface_app(tiny_face_root).get(to_bgr(img))
    assert len(faces) == 1
    assert np.allclose(faces[0].embedding, a.embedding, atol=1e-4)
    assert np.allclose(faces[0].kps, a.kps)


def test_two_faces_largest_by_area_not_buggy_key(analyzer):
    big, small = (20, 20, 150, 150), (240, 300, 330, 390)  # big is high in the image, small is low
    res = analyzer.analyze(face_image(size=(400, 420), boxes=(big, small)))
    assert res.num_faces == 2 and res.all_bboxes.shape == (2, 4)
    assert np.allclose(res.bbox, big, atol=3)
    faces = [{"bbox": b} for b in res.all_bboxes]
    buggy = sorted(faces, key=_official_buggy_key)[-1]
    assert np.allclose(buggy["bbox"], small, atol=3)  # the anchors' key picks the other face
    assert largest_face_index(res.all_bboxes) == int(
        np.argmax([(b[2] - b[0]) * (b[3] - b[1]) for b in res.all_bboxes])
    )


def test_same_face_same_embedding_different_faces_differ(analyzer):
    a1 = analyzer.analyze(face_image(size=(384, 320), boxes=((40, 40, 200, 200),), patterns=[3]))
    a2 = analyzer.analyze(face_image(size=(512, 400), boxes=((250, 150, 410, 310),), patterns=[3]))
    b = analyzer.analyze(face_image(size=(384, 320), boxes=((40, 40, 200, 200),), patterns=[4]))
    assert float(a1.normed_embedding @ a2.normed_embedding) > 0.98
    assert float(a1.normed_embedding @ b.normed_embedding) < 0.95


def test_no_face_retries_then_clear_reason(analyzer):
    dark = np.full((256, 256, 3), 20, np.uint8)
    assert analyzer.analyze(dark) is None
    full = analyzer.analyze_full(dark)
    assert isinstance(full, NoFace) and not full
    assert full.tried_sizes == (640, 480, 320, 256)
    assert "no face" in full.reason and "256" in full.reason


def test_close_crop_found_only_after_retry(analyzer, tiny_face_root):
    # The face fills 90% of the frame: too big for the detector at 640, found at a smaller size.
    img = face_image(size=(400, 400), boxes=((20, 20, 380, 380),))
    no_retry = FaceAnalyzer(tiny_face_root, retry_sizes=())
    assert no_retry.analyze(img) is None
    res = analyzer.analyze(img)
    assert res is not None and res.det_size < 640
    assert np.allclose(res.bbox, (20, 20, 380, 380), atol=4)


def test_batched_recognition_equals_single(analyzer):
    imgs = [face_image(boxes=((30 + 10 * k, 40, 190 + 10 * k, 200),), patterns=[k + 1]) for k in range(5)]
    imgs.insert(2, Image.new("RGB", (200, 200)))
    many = analyzer.analyze_many(imgs)
    assert [bool(r) for r in many] == [True, True, False, True, True, True]
    for img, r in zip(imgs, many):
        if r:
            assert np.allclose(analyzer.analyze(img).embedding, r.embedding, atol=1e-4)


def test_result_as_face_info(analyzer):
    """The dict save_face_info writes (its file round trip: tests/face/test_kps_and_face_info.py)."""
    res = analyzer.analyze(face_image())
    info = res.to_face_info()
    assert np.allclose(info["embedding"], res.embedding) and np.allclose(info["kps"], res.kps)
    assert np.allclose(info["bbox"], res.bbox) and tuple(info["frame"]) == (384, 320)


def test_missing_pack_has_clear_error(tmp_path):
    with pytest.raises(NoFaceModelError, match="download.py"):
        FaceAnalyzer(tmp_path)


def test_quiet_by_default(tiny_face_root):
    code = (
        "from faceid.face.analysis import FaceAnalyzer; import numpy as np;"
        f"FaceAnalyzer({str(tiny_face_root)!r}).analyze(np.zeros((64, 64, 3), np.uint8))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=os.getcwd(), timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "find model" not in out.stdout and "set det-size" not in out.stdout
    assert "Applied providers" not in out.stdout and "CUDA" not in out.stderr
