"""draw_kps against a straightforward drawing of the official definition; resize rules; face-info files."""

from __future__ import annotations

import math
import pickle

import cv2
import numpy as np
import pytest
from PIL import Image

from faceid.face.face_info import FaceInfoError, load_face_info, save_face_info
from faceid.face.kps import draw_kps, fit_size, flip_kps, resize_img, scale_kps


def reference_draw_kps(w, h, kps):
    """The definition, written plainly: float64 canvas, a full copy per limb, x0.6, then dots."""
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]
    limbs = np.array([[0, 2], [1, 2], [3, 2], [4, 2]])
    kps = np.array(kps)
    out = np.zeros([h, w, 3])
    for a, b in limbs:
        x, y = kps[[a, b], 0], kps[[a, b], 1]
        length = ((x[0] - x[1]) ** 2 + (y[0] - y[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(y[0] - y[1], x[0] - x[1]))
        poly = cv2.ellipse2Poly(
            (int(np.mean(x)), int(np.mean(y))), (int(length / 2), 4), int(angle), 0, 360, 1
        )
        out = cv2.fillConvexPoly(out.copy(), poly, colors[a])
    out = (out * 0.6).astype(np.uint8)
    for i, (x, y) in enumerate(kps):
        out = cv2.circle(out.copy(), (int(x), int(y)), 10, colors[i], -1)
    return out


KPS_SETS = [
    [[100.3, 120.7], [160.2, 118.9], [130.5, 150.1], [108.8, 182.4], [155.1, 180.0]],
    [[2.0, 3.0], [30.0, 1.5], [15.2, 12.0], [0.4, 25.0], [28.0, 26.6]],  # touching the top-left border
    [[245.0, 200.0], [255.9, 210.0], [250.0, 230.0], [240.0, 255.5], [255.0, 254.0]],  # bottom-right border
    [[50, 50], [50, 50], [50, 50], [50, 50], [50, 50]],  # degenerate: all points equal
    [[-5.0, 40.0], [60.0, -3.0], [30.0, 30.0], [10.0, 70.0], [70.0, 300.0]],  # partly outside
    [
        [80.2, 60.6],
        [40.1, 100.9],
        [60.0, 90.0],
        [120.3, 140.2],
        [20.7, 150.4],
    ],  # rotated face, crossing limbs
]


@pytest.mark.parametrize("kps", KPS_SETS)
def test_draw_kps_pixel_exact(kps):
    w, h = 256, 256
    ours = np.asarray(draw_kps(Image.new("RGB", (w, h)), kps))
    np.testing.assert_array_equal(ours, reference_draw_kps(w, h, kps))


def test_draw_kps_non_square_and_random():
    rng = np.random.default_rng(0)
    for _ in range(20):
        w, h = int(rng.integers(40, 200)), int(rng.integers(40, 200))
        kps = rng.uniform(-10, [w + 10, h + 10], size=(5, 2))
        np.testing.assert_array_equal(np.asarray(draw_kps((w, h), kps)), reference_draw_kps(w, h, kps))


def test_fit_size_rules():
    for w, h in [(800, 600), (600, 800), (3000, 1000), (1024, 1024), (500, 2000), (333, 777)]:
        nw, nh = fit_size(w, h)
        assert nw % 64 == 0 and nh % 64 == 0 and max(nw, nh) <= 1280
        if max(w, h) / min(w, h) <= 1.25:
            assert min(nw, nh) == 1024
    assert fit_size(800, 600) == (1280, 960)
    assert resize_img(Image.new("RGB", (800, 600))).size == (1280, 960)


def test_scale_and_flip_kps():
    kps = np.array([[10, 20], [30, 20], [20, 30], [12, 40], [28, 40]], float)
    np.testing.assert_allclose(scale_kps(kps, (100, 50), (200, 200))[0], [20, 80])
    f = flip_kps(kps, 100)
    np.testing.assert_allclose(f[0], [70, 20])  # right eye moved to slot 0 after the swap
    np.testing.assert_allclose(f[2], [80, 30])


def test_face_info_round_trip(tmp_path):
    info = {
        "embedding": np.arange(512, dtype=np.float32),
        "kps": np.arange(10, dtype=np.float32).reshape(5, 2) * 1.5,
        "bbox": np.array([1.0, 2.0, 30.0, 40.0], np.float32),
        "frame": np.array([640, 480]),
    }
    for name in ("a.pkl", "a.npz"):
        save_face_info(tmp_path / name, info)
        back = load_face_info(tmp_path / name)
        np.testing.assert_array_equal(back["embedding"], info["embedding"])
        np.testing.assert_array_equal(back["kps"], info["kps"])
        np.testing.assert_array_equal(back["bbox"], info["bbox"])
        assert back["frame"] == (640, 480)
    # MFaceTech-style pickle (plain dict of numpy arrays, default protocol) reads too.
    with open(tmp_path / "m.pkl", "wb") as fh:
        pickle.dump({"embedding": np.ones(512, np.float32), "kps": np.zeros((5, 2), np.float32)}, fh)
    assert load_face_info(tmp_path / "m.pkl")["kps"].shape == (5, 2)


def test_face_info_refuses_code_and_names_problems(tmp_path, evil_pickle):
    marker = evil_pickle(tmp_path / "evil.pkl", "embedding", kps=np.zeros((5, 2)))
    with pytest.raises(FaceInfoError, match="evil.pkl.*posix.system|evil.pkl.*refused"):
        load_face_info(tmp_path / "evil.pkl")
    assert not marker.exists()
    with pytest.raises(FaceInfoError, match="missing.pkl.*not found"):
        load_face_info(tmp_path / "missing.pkl")
    with open(tmp_path / "short.pkl", "wb") as fh:
        pickle.dump({"embedding": np.zeros(128), "kps": np.zeros((5, 2))}, fh)
    with pytest.raises(FaceInfoError, match="short.pkl.*128 values, expected 512"):
        load_face_info(tmp_path / "short.pkl")


def test_load_image_from_bytes_and_streams(tmp_path):
    import io

    from faceid.face.images import ImageLoadError, load_image

    buf = io.BytesIO()
    Image.fromarray(np.full((6, 4), 7, np.uint8), "L").save(buf, format="PNG")
    data = buf.getvalue()
    (tmp_path / "g.png").write_bytes(data)
    from_path = np.asarray(load_image(tmp_path / "g.png"))
    np.testing.assert_array_equal(np.asarray(load_image(data)), from_path)
    np.testing.assert_array_equal(np.asarray(load_image(io.BytesIO(data))), from_path)
    assert from_path.shape == (6, 4, 3)
    with pytest.raises(ImageLoadError, match="shard-0:12.png: not an image"):
        load_image(b"not an image", name="shard-0:12.png")
    with pytest.raises(ImageLoadError, match="empty image data"):
        load_image(b"")


def test_array_conversions_equal_numpy_on_every_path():
    """to_bgr / to_rgb_array read PIL's storage through Arrow when they can (RGB in one block) and fall back
    otherwise (other modes; an image over PIL's 16 MB block, stored in several blocks): the bytes of the numpy definitions."""
    from faceid.face.images import enable_arrow, rgbx_view, to_bgr, to_rgb_array

    arrow = enable_arrow()  # True with pyarrow and Pillow ≥ 11.2 (as installed here); older Pillow: fallbacks

    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    big = Image.fromarray(
        np.broadcast_to(rng.integers(0, 256, (1, 2048, 3), dtype=np.uint8), (2100, 2048, 3))
    )
    gray = Image.fromarray(rng.integers(0, 256, (9, 7), dtype=np.uint8), "L")
    assert (rgbx_view(small) is not None) == arrow and rgbx_view(big) is None and rgbx_view(gray) is None
    for img in (small, big, gray):
        ref = np.asarray(img.convert("RGB"))
        bgr, rgb = to_bgr(img), to_rgb_array(img)
        assert bgr.flags.c_contiguous and rgb.flags.c_contiguous and rgb.flags.writeable
        np.testing.assert_array_equal(bgr, ref[:, :, ::-1])
        np.testing.assert_array_equal(rgb, ref)


def test_load_image_rows_decodes_the_top_of_a_png_only():
    """``rows``: the top rows are the full decode's; an EXIF rotation (its chunk before or after the pixels) still
    gives the whole rotated image; a stream ignores it."""
    import io
    import struct

    from faceid.face.images import load_image

    arr = np.random.default_rng(1).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    plain = buf.getvalue()
    top = np.asarray(load_image(plain, rows=25))
    assert top.shape == (40, 30, 3) and np.array_equal(top[:25], arr[:25])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", exif=exif.tobytes())
    before = buf.getvalue()
    chunks, pos = [], 8  # the same file with its eXIf chunk moved after the pixel data
    while pos < len(before):
        (n,) = struct.unpack(">I", before[pos : pos + 4])
        chunks.append(before[pos : pos + 12 + n])
        pos += 12 + n
    ex = next(c for c in chunks if c[4:8] == b"eXIf")
    rest = [c for c in chunks if c is not ex]
    after = before[:8] + b"".join(rest[:-1]) + ex + rest[-1]
    full = np.asarray(load_image(before))
    assert full.shape == (30, 40, 3)
    for data in (before, after):
        np.testing.assert_array_equal(np.asarray(load_image(data, rows=10)), full)
    np.testing.assert_array_equal(np.asarray(load_image(io.BytesIO(plain), rows=5)), arr)
