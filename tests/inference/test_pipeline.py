"""The InstantID pipeline on tiny weights: equality with diffusers' SDXL pipeline when the face path is off,
scales, control mask, multi-ControlNet, LCM, averaged references, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, LCMScheduler, StableDiffusionXLPipeline
from pipeline_calls import KPS, PROMPT, emb, run  # noqa: F401  (shared pipeline-test helpers)

from faceid.face.kps import draw_kps


def test_face_path_off_equals_plain_sdxl(tiny_pipe, tiny_paths):
    ours = run(tiny_pipe, ip_adapter_scale=0.0, controlnet_conditioning_scale=0.0)
    sdxl = StableDiffusionXLPipeline.from_pretrained(tiny_paths["base_model"], add_watermarker=False)
    sdxl.set_progress_bar_config(disable=True)
    ref = sdxl(
        PROMPT,
        height=64,
        width=64,
        num_inference_steps=3,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert ours.shape == ref.shape == (1, 64, 64, 3)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_each_scale_changes_output(tiny_pipe):
    off = run(tiny_pipe, ip_adapter_scale=0.0, controlnet_conditioning_scale=0.0)
    ip_only = run(tiny_pipe, ip_adapter_scale=1.0, controlnet_conditioning_scale=0.0)
    cn_only = run(tiny_pipe, ip_adapter_scale=0.0, controlnet_conditioning_scale=1.0)
    for other in (ip_only, cn_only):
        assert np.abs(other - off).max() > 1e-3
    assert np.abs(ip_only - cn_only).max() > 1e-3
    # The per-call scale does not stick.
    assert tiny_pipe._ip_scale() == 0.5


def test_zero_control_mask_is_a_no_op_for_the_face(tiny_pipe):
    off = run(tiny_pipe, ip_adapter_scale=0.0, controlnet_conditioning_scale=0.0)
    masked = run(
        tiny_pipe, ip_adapter_scale=1.0, controlnet_conditioning_scale=1.0, control_mask=np.zeros((64, 64))
    )
    np.testing.assert_allclose(masked, off, atol=1e-6)
    full = run(
        tiny_pipe, ip_adapter_scale=1.0, controlnet_conditioning_scale=1.0, control_mask=np.ones((64, 64))
    )
    unmasked = run(tiny_pipe, ip_adapter_scale=1.0, controlnet_conditioning_scale=1.0)
    np.testing.assert_allclose(full, unmasked, atol=1e-6)
    half = np.zeros((64, 64))
    half[:, 32:] = 1
    partial = run(tiny_pipe, ip_adapter_scale=1.0, controlnet_conditioning_scale=1.0, control_mask=half)
    assert np.abs(partial - off).max() > 1e-3 and np.abs(partial - unmasked).max() > 1e-3


def test_averaged_references_equal_mean_embedding(tiny_pipe):
    a, b = emb(1), emb(2)
    two = run(tiny_pipe, image_embeds=np.stack([a, b]))
    mean = run(tiny_pipe, image_embeds=(a + b) / 2)
    as_list = run(tiny_pipe, image_embeds=[a, b])
    np.testing.assert_allclose(two, mean, atol=1e-6)
    np.testing.assert_allclose(as_list, mean, atol=1e-6)
    assert np.abs(run(tiny_pipe, image_embeds=a) - mean).max() > 1e-4


def test_batched_prompts_and_images_per_prompt(tiny_pipe):
    out = run(tiny_pipe, prompt=[PROMPT, "a person at the beach"], num_images_per_prompt=2)
    assert out.shape == (4, 64, 64, 3)
    single = run(
        tiny_pipe, prompt=PROMPT, generator=torch.Generator().manual_seed(0), num_images_per_prompt=1
    )
    assert np.isfinite(out).all() and np.isfinite(single).all()


def test_wrong_embedding_size_is_named(tiny_pipe):
    with pytest.raises(ValueError, match="size 128"):
        run(tiny_pipe, image_embeds=np.zeros(128, np.float32))


def test_multi_controlnet_feeds_face_tokens_to_identitynet_only(tiny_paths):
    from pipeline_stable_diffusion_xl_instantid import load_pipeline

    pipe = load_pipeline(
        tiny_paths["base_model"],
        tiny_paths["controlnet"],
        tiny_paths["face_adapter"],
        extra_controlnets=[tiny_paths["controlnet"]],
        progress=False,
    )
    seen = []
    for k, net in enumerate(pipe.controlnet.nets):
        net.register_forward_hook(
            lambda mod, args, kwargs, out, k=k: seen.append((k, kwargs["encoder_hidden_states"].shape[1])),
            with_kwargs=True,
        )
    kps = draw_kps((64, 64), KPS)
    out = run(pipe, image=[kps, kps], controlnet_conditioning_scale=[0.8, 0.5])
    assert out.shape == (1, 64, 64, 3)
    num_face_tokens = pipe.image_proj_model.num_queries
    assert {(0, num_face_tokens), (1, 77)} == set(seen)
    with pytest.raises(ValueError, match="2 ControlNets need 2"):
        run(pipe, image=[kps])


def test_lcm_scheduler_runs(tiny_pipe):
    original = tiny_pipe.scheduler
    tiny_pipe.scheduler = LCMScheduler.from_config(original.config)
    try:
        out = run(tiny_pipe, num_inference_steps=2, guidance_scale=1.0)
    finally:
        tiny_pipe.scheduler = original
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_identitynet_is_a_full_controlnet(tiny_paths):
    net = ControlNetModel.from_pretrained(tiny_paths["controlnet"])
    assert net.config.addition_embed_type == "text_time"


def test_constant_keys_values_computed_once_per_call(tiny_pipe, monkeypatch):
    from ip_adapter.attention_processor import IPAttnProcessor

    proc = next(p for p in tiny_pipe.unet.attn_processors.values() if isinstance(p, IPAttnProcessor))
    net_attn2 = next(m for n, m in tiny_pipe.controlnet.named_modules() if n.endswith("attn2"))
    calls = {"face": 0, "identitynet": 0}
    h1 = proc.to_k_ip.register_forward_hook(lambda *a: calls.__setitem__("face", calls["face"] + 1))
    h2 = net_attn2.to_k.register_forward_hook(
        lambda *a: calls.__setitem__("identitynet", calls["identitynet"] + 1)
    )
    try:
        cached = run(tiny_pipe, num_inference_steps=3)
        assert calls == {"face": 1, "identitynet": 1}
        monkeypatch.setattr(type(tiny_pipe), "_takes_kv_cache", staticmethod(lambda model: False))
        uncached = run(tiny_pipe, num_inference_steps=3)
        assert calls == {"face": 4, "identitynet": 4}
    finally:
        h1.remove()
        h2.remove()
    np.testing.assert_array_equal(cached, uncached)


def test_step_callback_sees_and_can_replace_latents(tiny_pipe):
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append((i, tuple(tensors["latents"].shape), tuple(tensors["face_tokens"].shape)))
        return {"latents": torch.zeros_like(tensors["latents"])} if i == 2 else {}

    out = run(
        tiny_pipe,
        output_type="latent",
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "face_tokens"],
    )
    tokens = tiny_pipe.image_proj_model.num_queries
    assert seen == [(i, (1, 4, 8, 8), (2, tokens, 64)) for i in range(3)]
    assert torch.count_nonzero(out) == 0  # the last step's replacement is what came out
