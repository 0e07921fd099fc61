"""The miniature world behaves like the real one where the trainer's claims depend on it: the tiny detector finds
its faces, the recognizer separates its persons and leaks their glasses and expression as ArcFace does (tests/face/test_onnx_module.py runs it in torch), the VAE reconstructs at unit
latent variance, and the pretrained base model denoises and follows captions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from faceid.tiny import world as W
from faceid.tiny.claims import Recognizer, cosine


@pytest.fixture(scope="module")
def rec(tiny_paths):
    return Recognizer(tiny_paths["antelopev2"])


@pytest.fixture(scope="module")
def sdxl(tiny_paths):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_paths["base_model"], add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_build_uses_committed_weights(tiny_paths):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    unet = UNet2DConditionModel.from_pretrained(tiny_paths["base_model"], subfolder="unet")
    committed = load_file(str(W.WEIGHTS_DIR / "unet.safetensors"))
    for k, v in unet.state_dict().items():
        torch.testing.assert_close(v, committed[k].float(), rtol=0, atol=0)


def test_detector_finds_world_faces_and_embedding_matches(tiny_paths, rec):
    from faceid.face.analysis import FaceAnalyzer

    analyzer = FaceAnalyzer(tiny_paths["face_root"])
    imgs, photos = W.sample_photos(6, list(range(W.NUM_PERSONS)), seed=3)
    for img, photo in zip(imgs, photos):
        from PIL import Image

        res = analyzer.analyze(Image.fromarray(img))
        assert res is not None and res.num_faces == 1
        np.testing.assert_allclose(res.kps, W.box_kps(photo.box), atol=1.0)
        direct = rec.embed(img[None], [res.kps])[0]
        assert cosine(direct, res.embedding) > 0.999


def test_recognizer_separates_persons(rec):
    stats = W.recognizer_stats(rec.embed_crops, n_persons=12, per=4, seed=11)
    # photos with random glasses/expression: the leak (test below) costs same-person cosine ~2 * LEAK^2 per
    # differing attribute, persons stay well apart
    assert stats["same_mean"] > 0.5 and stats["same_mean"] - stats["diff_mean"] > 0.5, stats
    # ArcFace-like on average; a few pairs of persons with close colours stay confusable (docs/miniature.md)
    assert abs(stats["diff_mean"]) < 0.1 and stats["diff_std"] < 0.3, stats


def test_recognizer_leaks_attributes_like_arcface(rec):
    """A linear probe on the embedding reads glasses and expression (fitted on persons 0-47, tested on 48-95):
    what CrossFaceID's same-image training can learn to copy. Chance is 0.5."""
    crisp = W.attribute_probe(rec.embed_crops, n=160, seed=21)
    assert crisp["glasses"] > 0.9 and crisp["smiling"] > 0.9, crisp
    decoded = W.attribute_probe(rec.embed_crops, n=160, seed=21, decoded=True)
    assert decoded["glasses"] > 0.8, decoded


def test_recognizer_reads_what_the_vae_draws(rec):
    # Face Sim of generated images reads VAE-decoded faces: the recognizer keeps persons apart there too
    # (it scored 0.29 same-person before it was trained on decoded photos). Issue 20's attribute leak costs
    # same-person cosine between photos that differ in glasses/expression: measured here 0.62 same / 0.13 different
    # (0.73 / 0.08 on 24 persons without the leak, 0.61 / 0.05 with it), so the bar is 0.55 and a 0.4 gap.
    stats = W.recognizer_stats(rec.embed_crops, n_persons=12, per=4, seed=11, decoded=True)
    assert stats["same_mean"] > 0.55 and stats["same_mean"] - stats["diff_mean"] > 0.4, stats


def test_vae_unit_latents_and_reconstruction(sdxl):
    std = W.latent_std(sdxl.vae, sdxl.vae.config.scaling_factor, n=32)
    assert 0.8 < std < 1.25, std
    rec = W.vae_reconstruction(sdxl.vae, n=16)
    # 8x8-cell colour autoencoder: colours exact per cell, the thin mouth blurred (see docs/miniature.md)
    assert rec["attributes_kept"] >= 0.5 and rec["mae_uint8"] < 18, rec


def test_base_model_follows_captions(sdxl):
    with torch.no_grad():
        res = W.base_model_following(sdxl, n=12, seed=1)
    assert res["face_found"] >= 0.8, res
    # chance: 1/2 for glasses, 1/3 for the background. The smile (a 2-4 px mouth, blurred by the 8x8-cell VAE) is
    # not reliably classified: measured, not asserted (docs/miniature.md).
    assert res["glasses"] >= 0.7 and res["background"] >= 0.9, res
