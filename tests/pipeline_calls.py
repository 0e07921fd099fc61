"""Shared by the pipeline tests: fixed keypoints, a face embedding per seed, and one short tiny-weights call."""

from __future__ import annotations

import numpy as np
import torch

from faceid.face.kps import draw_kps

KPS = np.array([[20, 24], [44, 24], [32, 34], [22, 46], [42, 46]], dtype=np.float32)
PROMPT = "a photo of a person"


def emb(seed=0):
    return np.random.default_rng(seed).standard_normal(512).astype(np.float32) * 10


def run(pipe, **kw):
    args = dict(
        prompt=PROMPT,
        image_embeds=emb(),
        image=draw_kps((64, 64), KPS),
        num_inference_steps=3,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    args.update(kw)
    return pipe(**args).images
