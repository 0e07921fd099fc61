"""Latents and masks for the InstantID pipeline: region masks at any size, the VAE encode of an img2img/inpainting
start image, the strength rule that keeps the last part of the schedule, and the VAE decode (SDXL's fp16 upcast and
latents mean/std handled as diffusers does). Functions of a pipeline object; the pipeline's ``__call__`` uses them."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image


def mask_tensor(control_mask, height: int, width: int, mode: str = "nearest") -> torch.Tensor:
    """PIL / array / tensor mask → float ``[1, 1, H, W]`` in 0..1 at the output size."""
    if isinstance(control_mask, Image.Image):
        control_mask = np.asarray(control_mask.convert("L"), dtype=np.float32) / 255.0
    m = torch.as_tensor(
        np.asarray(control_mask) if not torch.is_tensor(control_mask) else control_mask
    ).float()
    if m.ndim == 3 and m.shape[-1] in (1, 3):  # HWC
        m = m[..., 0]
    m = m.reshape(1, 1, *m.shape[-2:])
    if m.max() > 1:
        m = m / 255.0
    if tuple(m.shape[-2:]) == (height, width):
        return m
    return F.interpolate(m, size=(height, width), mode=mode)


def as_output(processor, images: torch.Tensor, output_type: str):
    """``[B, 3, H, W]`` in 0..1 → the requested output type."""
    if output_type == "pt":
        return images
    arr = processor.pt_to_numpy(images)
    return arr if output_type == "np" else processor.numpy_to_pil(arr)


def _latents_stats(vae, latents: torch.Tensor):
    """SDXL VAEs with per-channel ``latents_mean``/``latents_std`` (None, None for the plain scaling factor)."""
    cfg = vae.config
    if getattr(cfg, "latents_mean", None) is None or getattr(cfg, "latents_std", None) is None:
        return None, None
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
    std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
    return mean, std


def encode_init_image(pipe, init_image, height, width, total, device) -> torch.Tensor:
    """VAE latents (the distribution's mode: deterministic) of the init image at the output size, one per image of
    the batch of ``total``."""
    pixels = pipe.image_processor.preprocess(init_image, height=height, width=width)
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and vae.config.force_upcast
    vae_dtype = torch.float32 if upcast else vae.dtype
    if upcast:
        vae.to(dtype=torch.float32)
    try:
        dist = vae.encode(pixels.to(device, vae_dtype)).latent_dist
    finally:
        if upcast:
            vae.to(dtype=torch.float16)
    latents = dist.mode()
    mean, std = _latents_stats(vae, latents)
    if mean is not None:
        latents = (latents - mean) * vae.config.scaling_factor / std
    else:
        latents = latents * vae.config.scaling_factor
    if latents.shape[0] != total:
        if total % latents.shape[0]:
            raise ValueError(f"init_image: {latents.shape[0]} images for a batch of {total}")
        latents = latents.repeat_interleave(total // latents.shape[0], dim=0)
    return latents


def strength_timesteps(scheduler, timesteps, num_inference_steps: int, strength: float):
    """The last ``strength`` of the schedule (diffusers' img2img rule)."""
    init = min(num_inference_steps * strength, num_inference_steps)
    start = int(max(num_inference_steps - init, 0)) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return timesteps[start:]


def decode_latents(pipe, latents: torch.Tensor, output_type: str):
    """Latents → images of ``output_type`` (``"latent"`` returns them unchanged)."""
    if output_type == "latent":
        return latents
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and vae.config.force_upcast
    if upcast:
        pipe.upcast_vae()
    latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
    mean, std = _latents_stats(vae, latents)
    if mean is not None:
        latents = latents * std / vae.config.scaling_factor + mean
    else:
        latents = latents / vae.config.scaling_factor
    image = vae.decode(latents, return_dict=False)[0]
    if upcast:
        vae.to(dtype=torch.float16)
    if pipe.watermark is not None:
        image = pipe.watermark.apply_watermark(image)
    return pipe.image_processor.postprocess(image, output_type=output_type)


def decode_output(pipe, latents, init_image, mask_image, size, output_type: str):
    """Stage 9: the images; inpainting pastes the generated pixels inside the mask over the original, so unmasked
    pixels are the original's (exactly, up to the output type's rounding)."""
    if mask_image is None or output_type == "latent":
        return decode_latents(pipe, latents, output_type)
    width, height = size
    decoded = decode_latents(pipe, latents, "pt")
    original = pipe.image_processor.preprocess(init_image, height=height, width=width)
    original = (original.to(decoded.device, decoded.dtype) / 2 + 0.5).clamp(0, 1)
    pixel_mask = mask_tensor(mask_image, height, width, mode="bilinear").to(decoded.device, decoded.dtype)
    pasted = original * (1 - pixel_mask) + decoded * pixel_mask
    return as_output(pipe.image_processor, pasted, output_type)


def prepare_start(
    pipe, init_image, mask_image, strength, timesteps, size, total, dtype, device, generator, latents
):
    """Stage 7: the starting latents (noise, or the init image noised to the first timestep) and, for
    inpainting, ``(image_latents, noise, latent_mask)`` to reset the outside at every step."""
    width, height = size
    if init_image is None:
        channels = pipe.unet.config.in_channels
        return pipe.prepare_latents(total, channels, height, width, dtype, device, generator, latents), None
    image_latents = encode_init_image(pipe, init_image, height, width, total, device).to(dtype)
    if latents is None:
        noise = randn_tensor(
            image_latents.shape, generator=generator, device=device, dtype=image_latents.dtype
        )
    else:
        noise = latents.to(device, image_latents.dtype)
    if strength >= 1.0:
        latents = noise * pipe.scheduler.init_noise_sigma
    elif len(timesteps):
        latents = pipe.scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(total))
    else:
        latents = image_latents
    if mask_image is None:
        return latents, None
    latent_mask = mask_tensor(mask_image, *image_latents.shape[-2:], mode="bilinear")
    return latents, (image_latents, noise, latent_mask.to(device, image_latents.dtype))


def keep_outside(pipe, latents, start, timesteps, step: int, total: int):
    """Stage 8.4, inpainting: outside the mask, back to the original noised to the next step's level."""
    image_latents, noise, latent_mask = start
    keep = image_latents
    if step + 1 < len(timesteps):
        keep = pipe.scheduler.add_noise(image_latents, noise, timesteps[step + 1 : step + 2].repeat(total))
    return (1 - latent_mask) * keep + latent_mask * latents
