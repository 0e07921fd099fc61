"""Inference beyond text-to-image on the tiny weights: img2img/inpainting and the face-inpaint helper, several
people, weighted and long prompts, LoRA, memory presets, the Resampler following the pipeline (dtype, cuda(),
offload, save/load). Runs are compared with each other, never with fixed pixel values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from pipeline_calls import KPS, PROMPT, emb, make_lora, run  # noqa: F401  (shared pipeline-test helpers)

import pipeline_stable_diffusion_xl_instantid as P
from faceid.face.kps import draw_kps
from faceid.generation.prompts import _token_count


def photo(size=(64, 64), seed=1):
    return Image.fromarray((np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8))


@pytest.fixture()
def fresh_pipe(tiny_paths):
    """A pipeline of its own, for tests that change dtypes, devices, hooks or weights."""
    return P.load_pipeline(
        tiny_paths["base_model"],
        tiny_paths["controlnet"],
        tiny_paths["face_adapter"],
        device="cpu",
        progress=False,
    )


# ---- img2img and inpainting -------------------------------------------------------------------------
def test_strength_zero_img2img_returns_the_vae_round_trip(tiny_pipe):
    init = photo()
    out = run(tiny_pipe, init_image=init, strength=0.0, output_type="pt")
    vae = tiny_pipe.vae
    x = tiny_pipe.image_processor.preprocess(init, height=64, width=64)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
        ref = (vae.decode(z / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    half = run(tiny_pipe, init_image=init, strength=0.5, output_type="pt")
    assert (half - out).abs().max() > 1e-3


def test_inpainting_keeps_pixels_outside_the_mask(tiny_pipe):
    init = photo()
    mask = np.zeros((64, 64), np.float32)
    mask[16:48, 20:52] = 1
    out = np.asarray(run(tiny_pipe, init_image=init, mask_image=mask, strength=0.9, output_type="pil")[0])
    target = np.asarray(init)
    assert np.array_equal(out[mask == 0], target[mask == 0])
    assert np.abs(out[mask == 1].astype(int) - target[mask == 1]).mean() > 5


def test_face_inpaint_pastes_back_outside_the_feathered_mask(tiny_pipe):
    target = photo((96, 80), seed=4)
    bbox = (30, 20, 62, 56)
    out, mask = P.face_inpaint(
        tiny_pipe,
        target,
        emb(2),
        PROMPT,
        bbox=bbox,
        size=64,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
        return_mask=True,
    )
    a, t = np.asarray(out), np.asarray(target)
    assert out.size == target.size and mask.shape == (80, 96)
    assert 0 < mask.min() + 1 and mask.max() == 1.0 and 0 < mask[mask > 0].min() < 1  # feathered edge
    assert np.array_equal(a[mask == 0], t[mask == 0])
    assert np.abs(a[mask == 1].astype(int) - t[mask == 1]).mean() > 5
    # The face box (grown) is what the mask covers; far corners are outside.
    assert mask[38, 46] == 1.0 and mask[0, 0] == 0 and mask[79, 95] == 0


def test_feathered_mask_is_zero_outside_the_grown_box():
    from faceid.face.regions import expand_bbox, feathered_mask

    m = feathered_mask((100, 80), (40, 30, 60, 50), expand=1.5, feather=0.25)
    x1, y1, x2, y2 = expand_bbox((40, 30, 60, 50), 1.5)
    ys, xs = np.mgrid[0:80, 0:100] + 0.5
    outside = (xs < x1) | (xs > x2) | (ys < y1) | (ys > y2)
    assert m[outside].max() == 0 and m[40, 50] == 1 and ((m > 0) & (m < 1)).sum() > 0


# ---- several people ------------------------------------------------------------------------------------
def test_several_people_each_acts_only_in_its_region(tiny_pipe):
    left = np.zeros((64, 64), np.float32)
    left[:, :32] = 1
    a = {"image_embeds": emb(1), "image": draw_kps((64, 64), KPS - [8, 0]), "mask": left}
    b = {"image_embeds": emb(2), "image": draw_kps((64, 64), KPS + [8, 0]), "mask": np.zeros((64, 64))}
    kw = dict(image_embeds=None, image=None, ip_adapter_scale=1.0, controlnet_conditioning_scale=1.0)
    alone = run(tiny_pipe, faces=[a], **kw)
    # One person in `faces` is the control_mask path of a single face.
    np.testing.assert_array_equal(
        alone,
        run(
            tiny_pipe,
            image_embeds=a["image_embeds"],
            image=a["image"],
            control_mask=left,
            ip_adapter_scale=1.0,
            controlnet_conditioning_scale=1.0,
        ),
    )
    # b's region is empty: its IdentityNet residuals and face tokens change nothing.
    np.testing.assert_allclose(run(tiny_pipe, faces=[a, b], **kw), alone, atol=1e-6)
    both = run(tiny_pipe, faces=[a, dict(b, mask=1 - left)], **kw)
    assert np.abs(both - alone).max() > 1e-3
    swapped = run(tiny_pipe, faces=[dict(a, mask=1 - left), dict(b, mask=left)], **kw)
    assert np.abs(swapped - both).max() > 1e-3


def test_people_inputs_regions_do_not_overlap():
    from faceid.face.regions import region_masks

    masks = region_masks((128, 64), [(10, 10, 40, 40), (50, 10, 80, 40), (90, 20, 120, 50)], scale=2.0)
    stack = np.stack(masks)
    assert stack.sum(axis=0).max() == 1 and all(m.sum() > 0 for m in masks)
    faces = P.people_inputs([emb(1), emb(2)], (128, 64), [(10, 10, 40, 40), (70, 10, 100, 40)])
    assert [f["image"].size for f in faces] == [(128, 64)] * 2
    assert faces[0]["mask"][:, :40].sum() > 0 and faces[0]["mask"][:, 90:].sum() == 0
    with pytest.raises(ValueError, match="2 identities for 1 face boxes"):
        P.people_inputs([emb(1), emb(2)], (128, 64), [(10, 10, 40, 40)])


# ---- prompt weighting --------------------------------------------------------------------------------
def test_prompt_weights_parse():
    from faceid.generation.prompts import parse_weights

    assert parse_weights("a (red:1.5) car") == [("a ", 1.0), ("red", 1.5), (" car", 1.0)]
    assert parse_weights("((big)) [dog]") == [
        ("big", pytest.approx(1.21)),
        (" ", 1.0),
        ("dog", pytest.approx(1 / 1.1)),
    ]
    assert parse_weights(r"\(literal\) x") == [("(literal) x", 1.0)]
    assert parse_weights("(a, b:0.5), c") == [("a, b", 0.5), (", c", 1.0)]


def test_weighted_prompts(tiny_pipe):
    plain = run(tiny_pipe)
    np.testing.assert_array_equal(run(tiny_pipe, prompt="a photo of a (person:1.0)"), plain)
    assert np.abs(run(tiny_pipe, prompt="a photo of a (person:1.5)") - plain).max() > 1e-4
    # The windowed encoder equals diffusers' encode_prompt on a plain prompt, negative included.
    ref = tiny_pipe.encode_prompt(
        PROMPT, device="cpu", do_classifier_free_guidance=True, negative_prompt="ugly"
    )
    ours = tiny_pipe.encode_weighted_prompt(PROMPT, device="cpu", negative_prompt="ugly")
    for a, b in zip(ref, ours):
        assert torch.equal(a, b)


def test_long_prompt_runs_with_every_token(tiny_pipe):
    words = " ".join(f"w{i}" for i in range(100))  # ~200+ tokens
    assert _token_count(tiny_pipe.tokenizer, words) > 200
    embeds = tiny_pipe.encode_weighted_prompt(words, device="cpu", negative_prompt="(ugly:1.2)")
    assert embeds[0].shape[1] % 77 == 0 and embeds[0].shape[1] > 77 and embeds[0].shape == embeds[1].shape
    out = run(tiny_pipe, prompt=words, negative_prompt="(ugly:1.2)")
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    # The tail matters: it is not truncated.
    assert np.abs(run(tiny_pipe, prompt=words + " w7 w7 w7 red") - out).max() > 1e-5


# ---- LoRA --------------------------------------------------------------------------------------------
def test_lora_changes_output_and_unloading_restores_it(tiny_pipe, tiny_paths, tmp_path):
    lora = make_lora(tiny_paths["base_model"], tmp_path)
    before = run(tiny_pipe)
    try:
        assert P.load_loras(tiny_pipe, [f"{lora}:0.8"]) == ["lora0"]
        with_lora = run(tiny_pipe)
    finally:
        P.unload_loras(tiny_pipe)
    assert np.abs(with_lora - before).max() > 1e-4
    np.testing.assert_array_equal(run(tiny_pipe), before)
    assert P.parse_lora_spec("C:/x/y.safetensors:0.5") == ("C:/x/y.safetensors", 0.5)
    assert P.parse_lora_spec("folder") == ("folder", 1.0)


# ---- the Resampler follows the pipeline ----------------------------------------------------------------
def test_bf16_moves_every_module_resampler_included(fresh_pipe):
    fresh_pipe.to(torch.bfloat16)
    dtypes = {n: m.dtype for n, m in fresh_pipe.components.items() if isinstance(m, torch.nn.Module)}
    assert "image_proj_model" in dtypes and set(dtypes.values()) == {torch.bfloat16}, dtypes
    out = run(fresh_pipe, num_inference_steps=2)
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_official_infer_sequence_with_cuda_on_the_cpu(tiny_paths, monkeypatch):
    from diffusers import ControlNetModel

    monkeypatch.setattr(P, "CUDA_DEVICE", "cpu")
    controlnet = ControlNetModel.from_pretrained(tiny_paths["controlnet"], torch_dtype=torch.float16)
    pipe = P.StableDiffusionXLInstantIDPipeline.from_pretrained(
        tiny_paths["base_model"], controlnet=controlnet, torch_dtype=torch.float16
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.cuda()
    pipe.load_ip_adapter_instantid(tiny_paths["face_adapter"])
    assert pipe.image_proj_model.dtype == torch.float16 and pipe.image_proj_model.device.type == "cpu"
    image = pipe(
        PROMPT,
        image_embeds=emb(),
        image=draw_kps((64, 64), KPS),
        controlnet_conditioning_scale=0.8,
        ip_adapter_scale=0.8,
        num_inference_steps=2,
        guidance_scale=5,
        output_type="latent",
    ).images
    assert image.dtype == torch.float16 and torch.isfinite(image).all()


def test_model_offload_runs_and_hooks_the_resampler(fresh_pipe):
    base = run(fresh_pipe, num_inference_steps=2)
    P.apply_memory_options(fresh_pipe, offload="model", vae_slicing=True, vae_tiling=True, device="cpu")
    assert hasattr(fresh_pipe.image_proj_model, "_hf_hook")
    assert fresh_pipe.vae.use_slicing and fresh_pipe.vae.use_tiling
    np.testing.assert_allclose(run(fresh_pipe, num_inference_steps=2), base, atol=1e-5)


def test_sequential_offload_hooks_every_component(fresh_pipe):
    # On the CPU accelerate's per-layer hooks cannot run (transformers 5 gives back a plain tensor on the way
    # to the meta device): only the placement is checked here.
    P.apply_memory_options(fresh_pipe, offload="sequential", device="cpu")
    for name in ("unet", "controlnet", "vae", "text_encoder", "text_encoder_2", "image_proj_model"):
        module = getattr(fresh_pipe, name)
        assert any(hasattr(m, "_hf_hook") for m in module.modules()), name
    with pytest.raises(ValueError, match="offload"):
        P.apply_memory_options(fresh_pipe, offload="half")


def test_save_and_load_the_whole_pipeline(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / P.ADAPTER_FILENAME).is_file()
    loaded = P.StableDiffusionXLInstantIDPipeline.from_pretrained(tmp_path / "saved")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.image_proj_model, torch.nn.Module)
    np.testing.assert_array_equal(run(loaded), run(tiny_pipe))
    # The saved UNet is a plain SDXL UNet (the face layers live in the adapter file only).
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel.from_pretrained(tmp_path / "saved", subfolder="unet")
