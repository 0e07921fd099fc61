"""Conditioning inside the InstantID pipeline's call: per-ControlNet arguments, the control images and region
masks of each person, the ControlNet residuals of one step (IdentityNet once per person, with their face tokens,
keypoints and region) and SDXL's added conditioning. Functions of the pipeline object (``__call__`` stages 5, 7
and 8.1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from faceid.generation.latents import mask_tensor


def per_net(value, count: int) -> list:
    """A per-ControlNet argument as a list (a single value applies to every net)."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * count


class ResidualMask:
    """Multiplies IdentityNet residuals by the region mask resized (once per resolution) to their grid."""

    def __init__(self, mask: torch.Tensor | None):
        self.mask = mask
        self.sized: dict[tuple[int, int], torch.Tensor] = {}

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        key = tuple(t.shape[-2:])
        if key not in self.sized:
            self.sized[key] = F.interpolate(self.mask, size=key, mode="nearest").to(t.dtype)
        return t * self.sized[key]


@dataclass
class Controls:
    """What stage 5 prepares for the denoising loop."""

    images: list  # one control image per ControlNet
    person_images: list  # IdentityNet's keypoint image per person
    maskers: list  # per person: their region applied to IdentityNet's residuals
    unet_kwargs: dict
    net_kwargs: list
    net_args: list  # per ControlNet: [scales, starts, ends]


def prepare_controls(
    pipe, people, images, several, size, total, num_images, device, do_cfg, kwargs, dtype, net_args
):
    """Stage 5: control images (per person for IdentityNet), region masks and the attention kwargs (the
    keys/values of text and face tokens are the same at every step: computed once per call)."""
    width, height = size
    nets = pipe._controlnets()
    net_dtype = nets[0].dtype
    prep = lambda im: pipe.prepare_image(  # noqa: E731
        im, width, height, total, num_images, device, net_dtype, do_cfg
    )
    cond_images = [prep(im) for im in images]
    person_conds = [prep(kps) for _, kps, _ in people] if several else [cond_images[0]]
    unet_kwargs = dict(kwargs or {})
    unet_kwargs.pop("scale", None)
    kv_cache: dict = {}
    if pipe._takes_kv_cache(pipe.unet):
        unet_kwargs["kv_cache"] = kv_cache
    net_kwargs = [{"kv_cache": kv_cache} if pipe._takes_kv_cache(net) else None for net in nets]
    masks = [None if m is None else mask_tensor(m, height, width).to(device, dtype) for _, _, m in people]
    if len(people) > 1:
        unet_kwargs["region_mask"] = masks
    elif masks[0] is not None:
        unet_kwargs["region_mask"] = masks[0]
    per_nets = [per_net(v, len(nets)) for v in net_args]
    maskers = [ResidualMask(m) for m in masks]
    return Controls(cond_images, person_conds, maskers, unet_kwargs, net_kwargs, per_nets)


def added_conditions(pipe, size, micro, guidance_scale, total, prompt_embeds, pooled, device, dtype):
    """Stage 7: LCM's guidance embedding (None for other UNets) and SDXL's added text/time conditioning."""
    width, height = size
    original_size, crops_coords_top_left, target_size = micro
    timestep_cond = None
    if pipe.unet.config.time_cond_proj_dim is not None:
        w = torch.tensor(guidance_scale - 1).repeat(total)
        timestep_cond = pipe.get_guidance_scale_embedding(
            w, embedding_dim=pipe.unet.config.time_cond_proj_dim
        ).to(device=device, dtype=dtype)
    add_time_ids = pipe._get_add_time_ids(
        original_size or (height, width),
        crops_coords_top_left,
        target_size or (height, width),
        dtype=prompt_embeds.dtype,
        text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim
        if pipe.text_encoder_2 is not None
        else int(pooled.shape[-1]),
    ).to(device)
    add_time_ids = add_time_ids.repeat(prompt_embeds.shape[0], 1)
    return timestep_cond, {"text_embeds": pooled.to(device), "time_ids": add_time_ids}


def residuals(pipe, x, t, step: int, n: int, controls, person_tokens, prompt_embeds, added):
    """Stage 8.1: ControlNet residuals: IdentityNet once per person (their tokens, keypoints, region), the
    other ControlNets with the text tokens."""
    down, mid = None, None
    for k, (net, cond, s, st, en, nkw) in enumerate(
        zip(pipe._controlnets(), controls.images, *controls.net_args, controls.net_kwargs)
    ):
        if (step / n < st or (step + 1) / n > en) or s == 0:
            continue
        runs = (
            zip(person_tokens, controls.person_images, controls.maskers)
            if k == 0
            else [(prompt_embeds, cond, ResidualMask(None))]
        )
        for context, cond_k, masked in runs:
            d, m = net(
                x,
                t,
                encoder_hidden_states=context,
                controlnet_cond=cond_k,
                conditioning_scale=s,
                added_cond_kwargs=added,
                cross_attention_kwargs=nkw,
                return_dict=False,
            )
            if masked.mask is not None:
                d, m = [masked(r) for r in d], masked(m)
            down = d if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
    return down, mid
