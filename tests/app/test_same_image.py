"""``infer_from_pkl.py`` and ``app.py`` give the same image for the same request: both build a
:class:`~faceid.generation.request.GenerationRequest` and call the one generation path. One face, several people
(the largest faces of a pose photo, left to right) and LCM (scheduler, LCM-LoRA, 5 steps, guidance 1.5)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from pipeline_calls import make_lora

import app
import infer_from_pkl
from faceid.face.analysis import FaceAnalyzer
from faceid.face.face_info import save_face_info
from faceid.generation import defaults as D

SEED = 7


@pytest.fixture(scope="module")
def faces(tiny_paths, photos, tmp_path_factory):
    """Person 1 as a face-info file (and a face photo of its frame's size), person 2 as the photo ``b`` and as
    the face-info file of that photo's analysis."""
    d = tmp_path_factory.mktemp("same_faces")
    kps = np.array([[40, 48], [88, 48], [64, 68], [44, 92], [84, 92]], np.float32)
    emb = np.random.default_rng(5).standard_normal(512).astype(np.float32) * 20
    save_face_info(d / "me.npz", {"embedding": emb, "kps": kps, "frame": np.array([128, 128])})
    Image.new("RGB", (128, 128), (90, 80, 70)).save(d / "me.png")
    b = FaceAnalyzer(tiny_paths["face_root"]).analyze(Image.open(photos["b"]).convert("RGB"))
    save_face_info(d / "b.npz", {"embedding": b.embedding, "kps": b.kps, "frame": np.array([240, 240])})
    return d


def _studio(tiny_dir, out, *flags):
    args = app.parse_args(["--tiny", str(tiny_dir), "--device", "cpu", *flags])
    args.output_dir = str(out)
    app.apply_tiny(args)
    return app.Studio(args)


def _infer(tiny_paths, faces, out, *flags):
    argv = [
        "--base_model", str(tiny_paths["base_model"]),
        "--controlnet", str(tiny_paths["controlnet"]),
        "--face_adapter", str(tiny_paths["face_adapter"]),
        "--face_root", str(tiny_paths["face_root"]),
        "--face_image", str(faces / "me.png"),
        "--face_info", str(faces / "me.npz"),
        "--prompt", "a person",
        "--seed", str(SEED),
        "--min_side", "64",
        "--max_side", "64",
        "--output_dir", str(out),
        "--device", "cpu",
        *flags,
    ]  # fmt: skip
    infer_from_pkl.main(infer_from_pkl.parse_args(argv))
    return np.asarray(Image.open(out / f"00_{SEED}.png").convert("RGB"))


def _app(studio, cond, **options):
    images, settings = studio.generate(cond, {"prompt": "a person", "seed": SEED, **options})
    return np.asarray(images[0]), settings


def test_one_face_and_several_people_give_the_same_image(tiny_dir, tiny_paths, photos, faces, tmp_path):
    studio = _studio(tiny_dir, tmp_path / "app")
    one = studio.condition(None, faces / "me.npz")
    got, settings = _app(studio, one, steps=2)
    want = _infer(tiny_paths, faces, tmp_path / "one", "--steps", "2")
    assert settings["mode"] == "single" and got.shape == want.shape == (64, 64, 3)
    np.testing.assert_array_equal(got, want)

    two = studio.condition(None, faces / "me.npz", pose=photos["two"], people=[photos["b"]])
    got, settings = _app(studio, two, steps=2)
    flags = ["--steps", "2", "--pose_image", str(photos["two"]), "--extra_face_info", str(faces / "b.npz")]
    want = _infer(tiny_paths, faces, tmp_path / "two", *flags)
    assert settings["mode"] == "people" and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_lcm_gives_the_same_image(tiny_dir, tiny_paths, faces, tmp_path):
    lcm = make_lora(tiny_paths["base_model"], tmp_path / "lcm")
    studio = _studio(tiny_dir, tmp_path / "app", "--lcm_lora", str(lcm))
    cond = studio.condition(None, faces / "me.npz")
    got, settings = _app(studio, cond, fast=True, steps=D.LCM_STEPS, guidance_scale=D.LCM_GUIDANCE)
    assert settings["scheduler_used"] == "lcm" and settings["lcm_lora"] is True
    want = _infer(tiny_paths, faces, tmp_path / "lcm_out", "--scheduler", "lcm", "--lora", str(lcm))
    np.testing.assert_array_equal(got, want)
    plain, _ = _app(studio, cond, steps=D.LCM_STEPS, guidance_scale=D.LCM_GUIDANCE)
    assert not np.array_equal(plain, got)  # the scheduler and the LoRA did change the picture


def test_the_generation_scripts_import_no_script_but_the_pipeline_module():
    """``app.py`` and ``infer_from_pkl.py`` share code through ``faceid/generation``, never through each other."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    scripts = {p.stem for p in root.glob("*.py")}
    for name in ("app.py", "infer_from_pkl.py"):
        imported = set()
        for node in ast.walk(ast.parse((root / name).read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
        assert imported & scripts == {"pipeline_stable_diffusion_xl_instantid"}, name
