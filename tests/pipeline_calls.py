"""Shared by the pipeline, inference and app tests: fixed keypoints, a face embedding per seed, one short
tiny-weights call, and a tiny LoRA."""

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


def make_lora(base_model, path):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(base_model, subfolder="unet")
    torch.manual_seed(0)
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    )
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionXLPipeline.save_lora_weights(path, unet_lora_layers=state, safe_serialization=True)
    return path / "pytorch_lora_weights.safetensors"
