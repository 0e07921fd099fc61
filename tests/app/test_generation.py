"""The app's logic without a server: face conditioning from uploads, styles, run checkpoints, the pipeline cache
(base SDXL loaded once, checkpoints swapped) and the one generate function."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from app_inputs import HUGE_LIMIT
from PIL import Image
from pipeline_calls import make_lora

import app
from faceid.face.analysis import FaceAnalyzer
from faceid.face.face_info import save_face_info
from faceid.face.kps import fit_size, scale_kps
from faceid.generation.defaults import FACE_DETAIL_STRENGTH
from faceid.generation.faces import FaceInputError, face_condition
from faceid.generation.request import generate, pipeline_kwargs
from faceid.generation.runs import BASE_LABEL, Weights, run_weights
from faceid.generation.studio import check_options, request_for
from faceid.generation.styles import NO_STYLE, STYLES, apply_style
from pipeline_stable_diffusion_xl_instantid import load_pipeline


@pytest.fixture(scope="module")
def analyzer(tiny_paths):
    return FaceAnalyzer(tiny_paths["face_root"])


@pytest.fixture(scope="module")
def studio(tiny_dir, tiny_run, tmp_path_factory):
    """A Studio on the tiny weights whose base loads are counted by the loader it is given."""
    args = app.parse_args(["--tiny", str(tiny_dir), "--run_dir", str(tiny_run)])
    args.output_dir = str(tmp_path_factory.mktemp("app_out"))
    app.apply_tiny(args)
    loads = []

    def counting_loader(base_model, weights, device, dtype):
        loads.append(weights.label)
        return load_pipeline(
            base_model, weights.controlnet, weights.face_adapter, device, dtype, progress=False
        )

    s = app.Studio(args, load_pipeline_fn=counting_loader)
    s.base_loads_seen = loads
    return s


def _opts(**kw):
    return {"prompt": "a person", "negative_prompt": "", "steps": 2, "seed": 7, **kw}


# ---------------------------------------------------------------------------------------------- face inputs


def test_several_photos_give_one_embedding_each_and_the_first_photos_geometry(analyzer, photos):
    cond = face_condition([photos["a"], photos["b"]], analyzer=analyzer, min_side=64, max_side=128)
    fa, fb = (
        analyzer.analyze(Image.open(photos["a"]).convert("RGB")),
        analyzer.analyze(Image.open(photos["b"]).convert("RGB")),
    )
    assert cond.embeddings.shape == (2, 512)
    np.testing.assert_allclose(cond.embeddings[0], fa.embedding, rtol=1e-5)
    np.testing.assert_allclose(cond.embeddings[1], fb.embedding, rtol=1e-5)
    assert not np.allclose(cond.embeddings[0], cond.embeddings[1])
    assert cond.size == fit_size(256, 224, min_side=64, max_side=128) == (64, 64)
    np.testing.assert_allclose(cond.kps, scale_kps(fa.kps, (256, 224), cond.size), rtol=1e-5)
    assert cond.sources == ["a.png", "b.png"] and cond.pose_source == "a.png"
    assert cond.kps_image.size == cond.size and np.asarray(cond.kps_image).max() > 0


def test_pose_photo_gives_keypoints_size_and_face_box(analyzer, photos):
    cond = face_condition([photos["a"]], pose=photos["pose"], analyzer=analyzer, min_side=128, max_side=256)
    fp = analyzer.analyze(Image.open(photos["pose"]).convert("RGB"))
    assert cond.size == fit_size(320, 192, min_side=128, max_side=256) == (192, 128)
    np.testing.assert_allclose(cond.kps, scale_kps(fp.kps, (320, 192), (192, 128)), rtol=1e-5)
    mask = np.asarray(cond.face_mask())
    box = scale_kps(fp.bbox.reshape(2, 2), (320, 192), (192, 128)).reshape(4)
    inside = mask[int(box[1]) + 2 : int(box[3]) - 2, int(box[0]) + 2 : int(box[2]) - 2]
    assert inside.min() == 255 and mask[:, : int(box[0]) - 2].max() == 0
    assert cond.pose_source == "pose.png" and cond.embeddings.shape == (1, 512)


def test_face_info_file_alone_and_with_photos(analyzer, photos, tmp_path):
    emb = np.random.default_rng(3).standard_normal(512).astype(np.float32)
    kps = np.array([[20, 24], [44, 24], [32, 34], [22, 46], [42, 46]], np.float32)
    save_face_info(tmp_path / "me.npz", {"embedding": emb, "kps": kps, "frame": np.array([128, 128])})
    cond = face_condition(None, tmp_path / "me.npz", analyzer=analyzer, min_side=64, max_side=64)
    np.testing.assert_array_equal(cond.embeddings, emb[None])
    np.testing.assert_allclose(cond.kps, kps / 2)
    assert cond.bbox is None and cond.face_mask() is None
    both = face_condition([photos["a"]], tmp_path / "me.npz", analyzer=analyzer, min_side=64, max_side=64)
    assert both.embeddings.shape == (2, 512) and both.sources == ["a.png", "me.npz"]
    save_face_info(tmp_path / "noframe.npz", {"embedding": emb, "kps": kps})
    with pytest.raises(FaceInputError, match=r"noframe\.npz: no 'frame'"):
        face_condition(None, tmp_path / "noframe.npz", analyzer=analyzer)


@pytest.mark.parametrize(
    "key, message",
    [
        ("no_face", r"blank\.png: no face found"),
        ("not_image", r"notes\.png: not an image"),
        ("huge", r"huge\.png: 2600x1600 is over the 4000000-pixel limit"),
    ],
)
def test_bad_uploads_are_refused_with_the_files_name(analyzer, photos, key, message):
    with pytest.raises(FaceInputError, match=message):
        face_condition([photos[key]], analyzer=analyzer, max_pixels=HUGE_LIMIT)
    with pytest.raises(FaceInputError, match="pose photo " + message.replace("no face found", "no face")):
        face_condition([photos["a"]], pose=photos[key], analyzer=analyzer, max_pixels=HUGE_LIMIT)


def test_a_photo_without_face_among_several_is_skipped_with_a_note(analyzer, photos, tmp_path, evil_pickle):
    cond = face_condition([photos["no_face"], photos["a"]], analyzer=analyzer)
    assert cond.sources == ["a.png"] and cond.embeddings.shape == (1, 512)
    assert any("blank.png: no face found" in n for n in cond.notes)
    two = face_condition([photos["two"]], analyzer=analyzer, min_side=200, max_side=320)
    assert two.notes == ["two.png: 2 faces, the largest one is used"]
    assert two.size == (320, 192)
    np.testing.assert_allclose(
        two.bbox, [150, 30 * 0.96, 290, 170 * 0.96], atol=1
    )  # the larger face, y * 192/200
    with pytest.raises(FaceInputError, match="at least one photo"):
        face_condition([], None, analyzer=analyzer)
    marker = evil_pickle(tmp_path / "evil.pkl", "embedding", kps=np.zeros((5, 2)))
    with pytest.raises(FaceInputError, match=r"evil\.pkl: unsafe or invalid pickle"):
        face_condition(None, tmp_path / "evil.pkl", analyzer=analyzer)
    assert not marker.exists()


def test_styles():
    assert apply_style(NO_STYLE, "a knight", "blurry") == ("a knight", "blurry")
    p, n = apply_style("Watercolor", "a knight", "blurry")
    assert p.startswith("watercolor painting of a knight") and n.endswith(", blurry") and "photograph" in n
    assert all("{prompt}" in t for t, _ in STYLES.values())
    with pytest.raises(ValueError, match="unknown style"):
        apply_style("Nope", "x")


# ------------------------------------------------------------------------------------------ run checkpoints


def test_run_weights_lists_complete_checkpoints_and_the_final_export(tiny_run):
    base = Weights(BASE_LABEL, "a.bin", "cn")
    found = run_weights(tiny_run, base)
    assert [w.label for w in found] == ["base", "checkpoint-1", "checkpoint-2", "final"]
    assert found[1].face_adapter == str(tiny_run / "checkpoint-1" / "ip-adapter.bin")
    assert found[1].controlnet == str(tiny_run / "checkpoint-1" / "ControlNetModel")
    assert found[3].face_adapter == str(tiny_run / "ip-adapter.bin")
    assert run_weights(None, base) == [base]


# ----------------------------------------------------------------------------------- cache and generation


def test_switching_checkpoints_does_not_reload_the_base_and_matches_a_fresh_load(studio, analyzer, photos):
    cond = studio.condition([photos["a"]])
    by = {w.label: w for w in studio.weights_choices()}
    first = studio.cache.get(by["base"])
    shared = (first.unet, first.vae, first.text_encoder, first.text_encoder_2)
    items, settings = studio.compare(cond, _opts(), [by["base"], by["checkpoint-1"], by["final"]])
    items2, _ = studio.compare(cond, _opts(), [by["checkpoint-1"], by["base"]])
    assert studio.base_loads_seen == ["base"] and studio.cache.base_loads == 1
    # IdentityNets read: base, checkpoint-1, final, then base again (the two most recent stay in memory, so
    # checkpoint-1 came back from memory and base, evicted by final, from disk).
    assert studio.cache.controlnet_loads == 4 and studio.cache.swaps == 4
    pipe = studio.cache.pipe
    assert (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2) == shared
    assert [label for label, _ in items] == ["base", "checkpoint-1", "final"]
    arrays = {label: np.asarray(im) for label, im in items}
    assert not np.array_equal(arrays["base"], arrays["checkpoint-1"])
    # Back and forth gives the same pictures as the first time...
    np.testing.assert_array_equal(np.asarray(items2[0][1]), arrays["checkpoint-1"])
    np.testing.assert_array_equal(np.asarray(items2[1][1]), arrays["base"])
    # ... and as a pipeline loaded from scratch with that checkpoint.
    ck = by["checkpoint-1"]
    fresh = load_pipeline(studio.args.base_model, ck.controlnet, ck.face_adapter, "cpu", progress=False)
    ref = generate(fresh, request_for(cond, check_options(_opts())))[0]
    np.testing.assert_allclose(np.asarray(ref, np.float32), arrays["checkpoint-1"].astype(np.float32), atol=1)
    assert settings["loads"]["base_loads"] == 1 and [w["label"] for w in settings["weights"]] == [
        "base",
        "checkpoint-1",
        "final",
    ]


def test_generate_writes_pngs_with_their_settings_and_reports_progress(studio, photos):
    cond = studio.condition([photos["a"], photos["b"]])
    seen = []
    images, settings = studio.generate(
        cond,
        _opts(num_images=2, style="Neon", steps=3),
        progress=lambda done, total, desc: seen.append((done, total)),
    )
    assert len(images) == 2 and images[0].size == cond.size
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))  # seeds 7 and 8
    assert seen[-1] == (6, 6) and [d for d, _ in seen if d] == [1, 2, 3, 4, 5, 6]
    assert settings["styled_prompt"].startswith("a person, neon-lit") and settings["references"] == [
        "a.png",
        "b.png",
    ]
    out = Path(settings["output_dir"])
    assert [r["file"] for r in settings["images"]] == ["base_7.png", "base_8.png"]
    png = Image.open(out / "base_8.png")
    assert json.loads(png.info["parameters"])["seed"] == 8
    np.testing.assert_array_equal(np.asarray(png.convert("RGB")), np.asarray(images[1]))
    assert json.loads((out / "settings.json").read_text())["steps"] == 3


def test_face_region_mask_and_fast_mode_change_the_call(studio, photos):
    cond = studio.condition([photos["a"]], pose=photos["pose"])
    plain, _ = studio.generate(cond, _opts())
    masked, _ = studio.generate(cond, _opts(enhance_face_region=True))
    assert not np.array_equal(np.asarray(plain[0]), np.asarray(masked[0]))
    fast, settings = studio.generate(cond, _opts(fast=True))
    assert (
        settings["scheduler_used"] == "lcm" and type(studio.cache.pipe.scheduler).__name__ == "LCMScheduler"
    )
    assert settings["lcm_lora"] is False and any("no LCM-LoRA" in n for n in settings["notes"])
    _, settings = studio.generate(cond, _opts(scheduler="default"))
    assert type(studio.cache.pipe.scheduler).__name__ == "EulerDiscreteScheduler"  # the tiny model's own
    with pytest.raises(FaceInputError, match="steps must be between"):
        studio.generate(cond, _opts(steps=0))


class LoraRecorder:
    """Records the LoRA calls fast mode makes (the LoRA itself needs peft, which this suite does not install)."""

    def __init__(self, fail: Exception | None = None):
        self.calls, self.fail = [], fail

    def load_lora_weights(self, path, adapter_name):
        self.calls.append(("load", path, adapter_name))
        if self.fail:
            raise self.fail

    def enable_lora(self):
        self.calls.append("on")

    def disable_lora(self):
        self.calls.append("off")


def test_fast_mode_loads_the_lcm_lora_once_then_switches_it_on_and_off(tmp_path):
    lora = tmp_path / "pytorch_lora_weights.safetensors"
    lora.write_bytes(b"0")
    studio = app.Studio(app.parse_args(["--lcm_lora", str(lora)]))  # loads nothing until used
    pipe = LoraRecorder()
    assert [studio._set_fast(pipe, f) for f in (False, True, False, True)] == [None] * 4
    assert pipe.calls == [("load", str(lora), "lcm"), "on", "off", "on"] and studio.lcm is True

    broken = app.Studio(app.parse_args(["--lcm_lora", str(lora)]))
    pipe = LoraRecorder(fail=ValueError("PEFT backend is required for this method."))
    note = broken._set_fast(pipe, True)
    assert note == f"LCM-LoRA {lora} not loaded (ValueError: PEFT backend is required for this method.)"
    assert broken._set_fast(pipe, True) == note and broken._set_fast(pipe, False) is None
    assert pipe.calls == [("load", str(lora), "lcm")]  # tried once, never switched
    missing = app.Studio(app.parse_args(["--lcm_lora", str(tmp_path / "none.safetensors")]))
    assert missing._set_fast(LoraRecorder(), True).startswith("no LCM-LoRA at ")


# ------------------------------------------------------------------------ target photo, people, LoRA, detail


def test_target_photo_inpaints_its_face_and_keeps_every_pixel_outside(studio, analyzer, photos):
    from faceid.face.regions import expand_bbox

    target = Image.open(photos["pose"]).convert("RGB")
    cond = studio.condition([photos["a"]], target=photos["pose"], pose=photos["two"])
    assert cond.mode == "inpaint" and cond.size == target.size == (320, 192)
    assert any("pose photo is not used" in n for n in cond.notes)
    face = analyzer.analyze(target)
    np.testing.assert_allclose(cond.bbox, face.bbox, atol=1e-4)
    images, settings = studio.generate(cond, _opts(steps=3, inpaint_strength=0.9))
    out, ref = np.asarray(images[0]).astype(int), np.asarray(target).astype(int)
    assert out.shape == ref.shape
    # Every pixel outside the face box grown 1.3x (where face_inpaint's feathered mask is 0) is the target's;
    # the face itself was regenerated.
    x1, y1, x2, y2 = expand_bbox(face.bbox, 1.3, target.size)
    outside = np.ones(ref.shape[:2], bool)
    outside[int(y1) : int(np.ceil(y2)), int(x1) : int(np.ceil(x2))] = False
    assert outside.sum() > 0.4 * outside.size
    np.testing.assert_array_equal(out[outside], ref[outside])
    fx1, fy1, fx2, fy2 = face.bbox.astype(int)
    assert (
        np.abs(
            out[fy1 + 10 : fy2 - 10, fx1 + 10 : fx2 - 10] - ref[fy1 + 10 : fy2 - 10, fx1 + 10 : fx2 - 10]
        ).mean()
        > 2
    )
    saved = json.loads((Path(settings["output_dir"]) / "settings.json").read_text())
    assert saved["mode"] == "inpaint" and saved["target"] == "pose.png" and saved["inpaint_strength"] == 0.9
    assert saved["width"] == 320 and saved["height"] == 192
    assert saved["target_face_bbox"] == [round(float(v), 1) for v in face.bbox]
    for key in ("face_detail", "lora", "offload", "vae_slicing", "vae_tiling", "people", "inpaint_size"):
        assert key in saved, key


def test_two_people_differ_from_one_and_from_the_swapped_order(studio, analyzer, photos):
    one = studio.condition([photos["a"]], pose=photos["two"])
    two = studio.condition([photos["a"]], pose=photos["two"], people=[photos["b"], None])
    swapped = studio.condition([photos["b"]], pose=photos["two"], people=[photos["a"]])
    assert (one.mode, two.mode, swapped.mode) == ("single", "people", "people")
    # People go left to right on the largest faces of two.png: person 1 on the left face (20..100 x 40..120,
    # scaled to the output), person 2 on the right one (150..290 x 30..170).
    sx, sy = two.size[0] / 320, two.size[1] / 200
    np.testing.assert_allclose(two.people[0]["bbox"], [20 * sx, 40 * sy, 100 * sx, 120 * sy], atol=2)
    np.testing.assert_allclose(two.people[1]["bbox"], [150 * sx, 30 * sy, 290 * sx, 170 * sy], atol=2)
    fb = analyzer.analyze(Image.open(photos["b"]).convert("RGB"))
    np.testing.assert_allclose(two.people[1]["embeddings"][0], fb.embedding, rtol=1e-5)
    np.testing.assert_array_equal(two.people[0]["embeddings"], one.embeddings)
    kwargs = pipeline_kwargs(request_for(two, check_options(_opts())))
    assert len(kwargs["faces"]) == 2 and "image_embeds" not in kwargs
    assert np.asarray(kwargs["faces"][0]["mask"]).shape == (two.size[1], two.size[0])
    out = {}
    for name, cond in (("one", one), ("two", two), ("swapped", swapped)):
        images, settings = studio.generate(cond, _opts(steps=3, face_detail=True))
        out[name] = np.asarray(images[0]).astype(int)
        assert images[0].size == cond.size
    assert settings["mode"] == "people" and [p["references"] for p in settings["people"]] == [
        "b.png",
        "a.png",
    ]
    assert any("face detail is not used with several people" in n for n in settings["notes"])
    assert np.abs(out["one"] - out["two"]).mean() > 0.5
    assert np.abs(out["two"] - out["swapped"]).mean() > 0.5
    # No pose photo: side by side, person 1 on the left.
    side = studio.condition([photos["a"]], people=[photos["b"]])
    (l1, _, r1, _), (l2, _, r2, _) = (p["bbox"] for p in side.people)
    assert r1 <= side.size[0] / 2 <= l2 and side.people[0]["kps"] is None
    images, _ = studio.generate(side, _opts(steps=2))
    assert images[0].size == side.size


@pytest.mark.parametrize(
    "kind, message",
    [
        ("target_not_image", r"target photo notes\.png: not an image"),
        ("target_no_face", r"target photo blank\.png: no face found"),
        ("person_not_image", r"person 2 photo notes\.png: not an image"),
        ("person_no_face", r"person 3 photo blank\.png: no face found"),
        ("target_and_people", r"a target photo works with one person"),
        ("pose_too_few_faces", r"pose photo pose\.png: 1 face\(s\) for 2 people"),
    ],
)
def test_bad_uploads_for_the_new_inputs_are_refused_with_a_message(studio, photos, kind, message):
    p = photos
    calls = {
        "target_not_image": dict(target=p["not_image"]),
        "target_no_face": dict(target=p["no_face"]),
        "person_not_image": dict(people=[p["not_image"]]),
        "person_no_face": dict(people=[p["b"], p["no_face"]]),
        "target_and_people": dict(target=p["pose"], people=[p["b"]]),
        "pose_too_few_faces": dict(pose=p["pose"], people=[p["b"]]),
    }
    with pytest.raises(FaceInputError, match=message):
        studio.condition([p["a"]], **calls[kind])


def test_lora_is_loaded_once_per_spec_and_unloaded_without_reloading_the_base(
    studio, photos, tiny_paths, tmp_path
):
    lora = make_lora(tiny_paths["base_model"], tmp_path / "lora")
    cond = studio.condition([photos["a"]])
    base_before = studio.cache.base_loads
    plain, _ = studio.generate(cond, _opts())
    with_lora, settings = studio.generate(cond, _opts(lora=f"{lora}:0.9"))
    again, _ = studio.generate(cond, _opts(lora=f"{lora}:0.9"))
    assert studio.lora_loads == 1 and settings["lora"] == f"{lora}:0.9" and settings["lora_loaded"]
    assert settings["loads"]["lora_loads"] == 1
    assert np.abs(np.asarray(plain[0]).astype(int) - np.asarray(with_lora[0]).astype(int)).max() > 0
    np.testing.assert_array_equal(np.asarray(again[0]), np.asarray(with_lora[0]))
    weaker, _ = studio.generate(cond, _opts(lora=f"{lora}:0.3"))
    assert studio.lora_loads == 2 and not np.array_equal(np.asarray(weaker[0]), np.asarray(with_lora[0]))
    cleared, settings = studio.generate(cond, _opts(lora=""))
    assert studio.lora == "" and settings["lora_loaded"] is None
    np.testing.assert_allclose(np.asarray(cleared[0], np.float32), np.asarray(plain[0], np.float32), atol=1)
    with pytest.raises(FaceInputError, match="LoRA not found"):
        studio.generate(cond, _opts(lora=str(tmp_path / "none.safetensors")))
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FaceInputError, match="broken.safetensors not loaded"):
        studio.generate(cond, _opts(lora=str(tmp_path / "broken.safetensors")))
    after, _ = studio.generate(cond, _opts())
    np.testing.assert_allclose(np.asarray(after[0], np.float32), np.asarray(plain[0], np.float32), atol=1)
    assert studio.cache.base_loads == base_before == 1 and studio.base_loads_seen == ["base"]


def test_face_detail_regenerates_the_face_and_keeps_the_size(studio, photos):
    cond = studio.condition([photos["a"]], pose=photos["pose"])
    seen = []
    plain, _ = studio.generate(cond, _opts(steps=4))
    detail, settings = studio.generate(
        cond, _opts(steps=4, face_detail=True), progress=lambda d, t, _: seen.append((d, t))
    )
    assert detail[0].size == plain[0].size == cond.size
    assert not np.array_equal(np.asarray(detail[0]), np.asarray(plain[0]))
    assert settings["face_detail"] is True and settings["face_detail_strength"] == FACE_DETAIL_STRENGTH
    assert seen[-1][0] == seen[-1][1] == 4 + int(4 * FACE_DETAIL_STRENGTH)


def test_memory_presets_are_applied_at_load_and_recorded(tiny_dir, photos, tmp_path):
    args = app.parse_args(["--tiny", str(tiny_dir), "--offload", "model", "--vae_slicing", "--vae_tiling"])
    args.output_dir = str(tmp_path)
    app.apply_tiny(args)
    studio = app.Studio(args)
    images, settings = studio.generate(studio.condition([photos["a"]]), _opts())
    pipe = studio.cache.pipe
    assert pipe.vae.use_slicing and pipe.vae.use_tiling and hasattr(pipe.unet, "_hf_hook")
    assert (settings["offload"], settings["vae_slicing"], settings["vae_tiling"]) == ("model", True, True)
    assert images[0].size == (64, 64) and np.asarray(images[0]).std() > 0


def test_user_lora_and_the_lcm_lora_are_active_together_only_in_fast_mode(
    tiny_dir, photos, tiny_paths, tmp_path
):
    user = make_lora(tiny_paths["base_model"], tmp_path / "user")
    lcm = make_lora(tiny_paths["base_model"], tmp_path / "lcm")
    args = app.parse_args(["--tiny", str(tiny_dir), "--lcm_lora", str(lcm)])
    args.output_dir = str(tmp_path / "out")
    app.apply_tiny(args)
    studio = app.Studio(args)
    cond = studio.condition([photos["a"]])
    _, settings = studio.generate(cond, _opts(fast=True, lora=f"{user}:0.5"))
    pipe = studio.cache.pipe
    assert settings["lcm_lora"] is True and sorted(pipe.get_active_adapters()) == ["lcm", "lora0"]
    studio.generate(cond, _opts(fast=False, lora=f"{user}:0.5"))
    assert pipe.get_active_adapters() == ["lora0"]
    # Clearing the user's LoRA unloads every LoRA; fast mode loads the LCM-LoRA again when next used.
    studio.generate(cond, _opts(fast=False, lora=""))
    assert studio.lcm is None and not pipe.get_list_adapters()
    _, settings = studio.generate(cond, _opts(fast=True))
    assert settings["lcm_lora"] is True and pipe.get_active_adapters() == ["lcm"]
    assert studio.cache.base_loads == 1
