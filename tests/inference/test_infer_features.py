"""infer_from_pkl.py's pose reference, face-inpaint, several-people, LoRA and memory flags on the tiny weights;
every flag is recorded in settings.json, and a reused pipeline is keyed by what it was loaded with."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pipeline_calls import make_lora

import infer_from_pkl
from faceid.errors import InputError
from faceid.face.kps import draw_kps, fit_size
from faceid.generation import batch
from faceid.generation.defaults import LCM_GUIDANCE
from faceid.tiny.faces import synthetic_face_array


def write_face_info(path, seed=0):
    from faceid.face.face_info import save_face_info

    _, kps = synthetic_face_array((128, 128), seed=seed)
    emb = np.random.default_rng(seed).standard_normal(512).astype(np.float32) * 20
    save_face_info(path, {"embedding": emb, "kps": kps, "frame": np.array([128, 128])})
    return path


def argv_for(tiny_paths, tmp_path, **flags):
    face = tmp_path / "face.png"
    Image.fromarray(synthetic_face_array((128, 128), seed=3)[0]).save(face)
    argv = [
        "--base_model", str(tiny_paths["base_model"]),
        "--controlnet", str(tiny_paths["controlnet"]),
        "--face_adapter", str(tiny_paths["face_adapter"]),
        "--face_root", str(tiny_paths["face_root"]),
        "--face_image", str(face),
        "--face_info", str(write_face_info(tmp_path / "face.npz")),
        "--prompt", "a person",
        "--steps", "2",
        "--min_side", "64",
        "--max_side", "64",
        "--output_dir", str(tmp_path / "out"),
        "--device", "cpu",
    ]  # fmt: skip
    for k, v in flags.items():
        if v is True:
            argv.append(f"--{k}")
        else:
            for item in v if isinstance(v, list) else [v]:
                argv += [f"--{k}", str(item)]
    return argv


def two_face_photo(path, size=(192, 128)):
    img, _ = synthetic_face_array(size, box=(16, 30, 72, 86), seed=5)
    img2, _ = synthetic_face_array(size, box=(110, 24, 176, 90), seed=6)
    img[24:90, 110:176] = img2[24:90, 110:176]
    Image.fromarray(img).save(path)
    return path


def test_pose_image_gives_keypoints_and_size(tiny_paths, tmp_path):
    from faceid.face.analysis import FaceAnalyzer

    pose = tmp_path / "pose.png"
    Image.fromarray(synthetic_face_array((160, 96), box=(80, 20, 140, 80), seed=9)[0]).save(pose)
    infer_from_pkl.main(infer_from_pkl.parse_args(argv_for(tiny_paths, tmp_path, pose_image=pose)))
    face = FaceAnalyzer(tiny_paths["face_root"]).analyze(Image.open(pose).convert("RGB"))
    size = fit_size(160, 96, min_side=64, max_side=64)
    kps = np.asarray(face.kps, np.float64) * [size[0] / 160, size[1] / 96]
    drawn = np.asarray(Image.open(tmp_path / "out" / "kps.png"))
    np.testing.assert_array_equal(drawn, np.asarray(draw_kps(size, kps)))
    settings = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert (settings["width"], settings["height"]) == size and settings["pose_image"] == str(pose)
    assert Image.open(tmp_path / "out" / "00_42.png").size == size


def test_inpaint_mode_keeps_the_photo_outside_the_mask(tiny_paths, tmp_path):
    from faceid.face.regions import feathered_mask

    target = tmp_path / "target.png"
    Image.fromarray(synthetic_face_array((96, 96), box=(28, 20, 68, 60), seed=2)[0]).save(target)
    argv = argv_for(tiny_paths, tmp_path, inpaint_image=target, inpaint_size=64)
    infer_from_pkl.main(infer_from_pkl.parse_args(argv))
    settings = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert settings["mode"] == "inpaint" and (settings["width"], settings["height"]) == (96, 96)
    out = np.asarray(Image.open(tmp_path / "out" / "00_42.png"))
    mask = feathered_mask((96, 96), settings["plan_bbox"], expand=1.3, feather=0.2)
    photo = np.asarray(Image.open(target))
    assert np.array_equal(out[mask == 0], photo[mask == 0]) and (out[mask == 1] != photo[mask == 1]).any()


def test_several_people_from_a_pose_image(tiny_paths, tmp_path):
    pose = two_face_photo(tmp_path / "two.png")
    other = write_face_info(tmp_path / "b.npz", seed=1)
    argv = argv_for(tiny_paths, tmp_path, pose_image=pose, extra_face_info=other, width=96, height=64)
    infer_from_pkl.main(infer_from_pkl.parse_args(argv))
    settings = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert settings["mode"] == "people" and len(settings["plan_boxes"]) == 2
    (b1, b2) = settings["plan_boxes"]
    assert b1[0] < b2[0]  # left to right, in output pixels
    kps = np.asarray(Image.open(tmp_path / "out" / "kps.png"))
    assert kps[:, :48].any() and kps[:, 48:].any()  # both people's keypoints drawn
    with pytest.raises(InputError, match="need --face_boxes or a --pose_image"):
        infer_from_pkl.main(infer_from_pkl.parse_args(argv_for(tiny_paths, tmp_path, extra_face_info=other)))


def test_lora_memory_and_vae_flags_run_and_are_recorded(tiny_paths, tmp_path):
    lora = make_lora(tiny_paths["base_model"], tmp_path / "lora")
    flags = dict(
        lora=f"{lora}:0.7",
        offload="model",
        vae_slicing=True,
        vae_tiling=True,
        vae=tiny_paths["base_model"] / "vae",
        scheduler="lcm",
        face_detail=True,
        inpaint_size=64,
    )
    args = infer_from_pkl.parse_args(argv_for(tiny_paths, tmp_path, **flags))
    records = infer_from_pkl.main(args)
    assert len(records) == 1
    settings = json.loads((tmp_path / "out" / "settings.json").read_text())
    every_flag = set(vars(infer_from_pkl.parse_args([])))
    assert every_flag <= set(settings), every_flag - set(settings)
    assert settings["lora"] == [f"{lora}:0.7"] and settings["offload"] == "model" and settings["face_detail"]
    assert settings["steps"] == 2 and settings["guidance_scale"] == LCM_GUIDANCE
    key = batch.pipeline_key(args)
    assert key != batch.pipeline_key(infer_from_pkl.parse_args(argv_for(tiny_paths, tmp_path)))
    with pytest.raises(InputError, match="--lora: not found"):
        infer_from_pkl.main(
            infer_from_pkl.parse_args(argv_for(tiny_paths, tmp_path, lora=tmp_path / "no.safetensors"))
        )
