"""Short versions of the CrossFaceID and FaceID-6M claims of ``benchmarks/bench_identity.py`` (the identity claim's
short version is ``tests/train/test_learns_identity.py``): the same code paths on the miniature world with a few
training steps, so a regression in the benchmark, the trainer or the pipeline's prompt following fails CI. The
full figures (600 steps) are in docs/miniature.md."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

STEPS = 10


def test_crossfaceid_short(tiny_paths, tmp_path):
    import bench_identity as B

    from faceid.tiny import claims as C

    rec = C.Recognizer(tiny_paths["antelopev2"])
    rows = B.run_crossfaceid(tiny_paths, tmp_path, STEPS, 0, rec, ("--no-train_identitynet",))
    assert [r["training"] for r in rows] == ["start checkpoint", "same image", "--cross_id"]
    for r in rows:
        # asked for the opposite glasses/expression: an image follows the prompt or copies the reference, not both
        for key in ("glasses", "smiling"):
            assert r[f"follow_{key}"] + r[f"copy_{key}"] <= 1.0 + 1e-9, r
        assert r["follow_background"] + r["copy_background"] <= 1.0, r
        assert -1.0 <= r["face_sim"] <= 1.0
    # the base model follows the asked glasses and background (docs/miniature.md: 100 %)
    assert rows[0]["follow_glasses"] >= 0.75 and rows[0]["follow_background"] >= 0.75, rows[0]
    table = B.table(rows, "crossfaceid")
    assert table.splitlines()[1].split()[:2] == ["training", "follow_glasses"]


def test_faceid6m_short(tiny_paths, tmp_path, monkeypatch):
    import bench_identity as B

    from faceid.tiny import claims as C

    monkeypatch.setattr(C, "GEN_STEPS", 4)  # nothing here depends on image quality
    rec = C.Recognizer(tiny_paths["antelopev2"])
    rows = B.run_faceid6m(tiny_paths, tmp_path, STEPS, 0, rec, ("--no-train_identitynet",), scales=(1, 4))
    assert [(r["data"], r["photos"], r["persons"]) for r in rows] == [("1x", 8, 4), ("4x", 32, 16)]
    assert not set(range(16)) & set(B.HELD_OUT)  # evaluated on persons never trained on
    for r in rows:
        assert abs(r["margin"] - (r["held_out_same"] - r["held_out_different"])) < 1e-12
        assert (tmp_path / f"f6_{r['data'][:-1]}" / "ip-adapter.bin").is_file()
