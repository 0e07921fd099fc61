"""The one generation path: a :class:`GenerationRequest` (the face(s), pose, target photo, several people, face
detail and the options) turned into images by :func:`generate` on a ready pipeline object. ``infer_from_pkl.py``
and ``app.py`` build a request from their inputs and call :func:`generate`; evaluation and training validation can
do the same with the pipeline they hold.

Modes (:attr:`GenerationRequest.mode`): ``"inpaint"`` (``target`` given: the person replaces the target's face,
:func:`~faceid.generation.composition.face_inpaint`), ``"people"`` (``people`` has two or more persons: each with
their own embedding, keypoints and region), ``"img2img"`` (``init_image``) and ``"single"``; ``face_detail``
regenerates the face larger afterwards (one person, no target).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from faceid.generation import defaults as D
from faceid.generation.composition import condition_kps_image, face_detail, face_inpaint, people_inputs
from faceid.generation.schedulers import set_scheduler


@dataclass
class GenerationRequest:
    prompt: str
    embeds: Any  # person 1's face embedding: [512], or [N, 512] / a list of N references (averaged)
    kps: np.ndarray  # person 1's keypoints [5, 2] in the output frame (the target photo's with a target)
    size: tuple[int, int]  # output (W, H)
    negative_prompt: str = D.NEGATIVE_PROMPT
    steps: int = D.STEPS
    guidance_scale: float = D.GUIDANCE_SCALE
    ip_adapter_scale: float = D.IP_ADAPTER_SCALE
    controlnet_conditioning_scale: float = D.CONTROLNET_SCALE
    scheduler: str = "default"  # one of faceid.generation.schedulers.SCHEDULERS ("lcm": with an LCM-LoRA)
    seed: int = D.SEED
    num_images: int = 1  # seeds seed, seed+1, ...
    face_bbox: Any = None  # person 1's face box in the output frame (default: from the keypoints)
    control_mask: Any = None  # the face acts only where this is white (the app's "enhance non-face region")
    init_image: Image.Image | None = None  # img2img: start from this picture (at the output size)
    strength: float = D.IMG2IMG_STRENGTH
    target: Image.Image | None = None  # inpainting: the photo whose face (face_bbox, kps) is replaced
    inpaint_strength: float = D.INPAINT_STRENGTH
    inpaint_size: int = D.INPAINT_SIZE
    mask_expand: float = D.MASK_EXPAND
    mask_feather: float = D.MASK_FEATHER
    # Several people: [{"embeds", "bbox", "kps" (None: estimated from the box)}, ...], person 1 first.
    people: list[dict] = field(default_factory=list)
    region_scale: float = D.REGION_SCALE
    face_detail: bool = False
    face_detail_strength: float = D.FACE_DETAIL_STRENGTH

    @property
    def mode(self) -> str:
        if self.target is not None:
            return "inpaint"
        if len(self.people) > 1:
            return "people"
        return "img2img" if self.init_image is not None else "single"

    @property
    def detail(self) -> bool:
        """Whether the face-detail pass runs (one person without a target photo)."""
        return self.face_detail and self.mode in ("single", "img2img")

    @property
    def kps_image(self) -> Image.Image:
        """The keypoints the request is generated with (every person's with several people)."""
        return condition_kps_image(self.size, self.kps, self.people if self.mode == "people" else ())

    def steps_per_image(self) -> int:
        """Denoising steps one image takes (for progress bars): strength shortens the schedule."""
        if self.mode == "inpaint":
            return max(1, int(self.steps * self.inpaint_strength))
        steps = max(1, int(self.steps * self.strength)) if self.mode == "img2img" else self.steps
        return steps + (max(1, int(self.steps * self.face_detail_strength)) if self.detail else 0)

    def seeds(self) -> list[int]:
        return [self.seed + n for n in range(self.num_images)]


def call_kwargs(request: GenerationRequest) -> dict:
    """The pipeline arguments every pass shares (no generator): prompts, steps, guidance and scales."""
    return dict(
        negative_prompt=request.negative_prompt,
        num_inference_steps=int(request.steps),
        guidance_scale=float(request.guidance_scale),
        ip_adapter_scale=float(request.ip_adapter_scale),
        controlnet_conditioning_scale=float(request.controlnet_conditioning_scale),
    )


def pipeline_kwargs(request: GenerationRequest) -> dict:
    """The main pipeline call's arguments (no generator) for the modes that call the pipeline directly."""
    kwargs = dict(call_kwargs(request), prompt=request.prompt, width=request.size[0], height=request.size[1])
    if request.mode == "people":
        people = request.people
        kps = None if all(p["kps"] is None for p in people) else [p["kps"] for p in people]
        kwargs["faces"] = people_inputs(
            [p["embeds"] for p in people],
            request.size,
            [p["bbox"] for p in people],
            kps=kps,
            region_scale=request.region_scale,
        )
        return kwargs
    kwargs.update(image_embeds=request.embeds, image=request.kps_image)
    if request.control_mask is not None:
        kwargs["control_mask"] = request.control_mask
    if request.mode == "img2img":
        kwargs.update(init_image=request.init_image, strength=float(request.strength))
    return kwargs


def _face_box(request: GenerationRequest):
    if request.face_bbox is not None:
        return request.face_bbox
    from faceid.face.regions import bbox_from_kps

    return bbox_from_kps(request.kps)


def generate_one(pipe, request: GenerationRequest, generator, **extra) -> Image.Image:
    """One image for ``request`` with ``generator`` (``extra``: e.g. ``callback_on_step_end``)."""
    shared = dict(call_kwargs(request), generator=generator, **extra)
    if request.mode == "inpaint":
        return face_inpaint(
            pipe,
            request.target,
            request.embeds,
            request.prompt,
            bbox=request.face_bbox,
            kps=request.kps,
            size=request.inpaint_size,
            expand=request.mask_expand,
            feather=request.mask_feather,
            strength=float(request.inpaint_strength),
            **shared,
        )
    image = pipe(**pipeline_kwargs(request), generator=generator, **extra).images[0]
    if request.detail:
        image = face_detail(
            pipe,
            image,
            request.embeds,
            request.prompt,
            bbox=_face_box(request),
            kps=request.kps,
            size=request.inpaint_size,
            strength=float(request.face_detail_strength),
            **shared,
        )
    return image


def generate(pipe, request: GenerationRequest, on_image=None, **extra) -> list[Image.Image]:
    """The images of ``request`` (one per seed) on ``pipe`` (a loaded ``StableDiffusionXLInstantIDPipeline``):
    the request's scheduler is set, each image gets a CPU generator seeded with its seed (the same pictures on
    every device). ``on_image(index, seed)`` is called before each image; ``extra`` goes to every pipeline call
    (e.g. ``callback_on_step_end``)."""
    import torch

    set_scheduler(pipe, request.scheduler)
    images = []
    for k, seed in enumerate(request.seeds()):
        if on_image is not None:
            on_image(k, seed)
        images.append(generate_one(pipe, request, torch.Generator(device="cpu").manual_seed(seed), **extra))
    return images
