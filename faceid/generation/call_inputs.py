"""The InstantID pipeline's argument checks: a ``ValueError`` naming the first argument that cannot work, before
any model runs (``StableDiffusionXLInstantIDPipeline.check_inputs`` calls :func:`check_call_inputs`)."""

from __future__ import annotations

from faceid.generation.conditioning import per_net


def check_call_inputs(
    pipe,
    prompt,
    prompt_2,
    image_embeds,
    image,
    height,
    width,
    num_inference_steps,
    negative_prompt=None,
    negative_prompt_2=None,
    prompt_embeds=None,
    negative_prompt_embeds=None,
    pooled_prompt_embeds=None,
    negative_pooled_prompt_embeds=None,
    controlnet_conditioning_scale=1.0,
    control_guidance_start=0.0,
    control_guidance_end=1.0,
    num_images_per_prompt=1,
    callback_on_step_end_tensor_inputs=None,
    faces=None,
    init_image=None,
    mask_image=None,
    strength=1.0,
):
    """Raise ``ValueError`` naming the first argument that cannot work (before any model runs)."""
    nets = pipe._controlnets()
    if faces is not None:
        if not isinstance(faces, (list, tuple)) or not faces:
            raise ValueError("faces must be a non-empty list of dicts with image_embeds, image and mask")
        for i, face in enumerate(faces):
            if not isinstance(face, dict) or face.get("image_embeds") is None or face.get("image") is None:
                raise ValueError(f"faces[{i}] needs 'image_embeds' and 'image' (its keypoint image)")
        if image_embeds is not None or image is not None:
            raise ValueError("faces replaces image_embeds and image: pass one or the other")
        if len(nets) > 1:
            raise ValueError("faces (several people) works with IdentityNet alone, not extra ControlNets")
    else:
        if image_embeds is None:
            raise ValueError("image_embeds (the face embedding) is required")
        if image is None:
            raise ValueError("image (the keypoint image) is required")
        if len(nets) > 1 and not isinstance(image, (list, tuple)):
            raise ValueError(f"image: {len(nets)} ControlNets need {len(nets)} control images, got 1")
        if isinstance(image, (list, tuple)) and len(nets) > 1 and len(image) != len(nets):
            raise ValueError(f"{len(nets)} ControlNets need {len(nets)} control images, got {len(image)}")
    if not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if mask_image is not None and init_image is None:
        raise ValueError("mask_image needs init_image (the photo to inpaint)")
    if prompt is None and prompt_embeds is None:
        raise ValueError("prompt or prompt_embeds is required")
    if prompt is not None and prompt_embeds is not None:
        raise ValueError("pass either prompt or prompt_embeds, not both")
    for name, value in (("prompt", prompt), ("prompt_2", prompt_2)):
        if value is not None and not isinstance(value, (str, list)):
            raise ValueError(f"{name} must be a string or a list of strings, not {type(value).__name__}")
    if prompt_embeds is not None and pooled_prompt_embeds is None:
        raise ValueError("prompt_embeds needs pooled_prompt_embeds (SDXL's second text encoder output)")
    if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
        raise ValueError("negative_prompt_embeds needs negative_pooled_prompt_embeds")
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("pass either negative_prompt or negative_prompt_embeds, not both")
    if (
        prompt_embeds is not None
        and negative_prompt_embeds is not None
        and prompt_embeds.shape != negative_prompt_embeds.shape
    ):
        raise ValueError(
            f"negative_prompt_embeds has shape {tuple(negative_prompt_embeds.shape)}, "
            f"prompt_embeds {tuple(prompt_embeds.shape)}: they must match"
        )
    for name, value in (("height", height), ("width", width)):
        if value is not None and (int(value) <= 0 or int(value) % 8):
            raise ValueError(f"{name} must be a positive multiple of 8, got {value}")
    if num_inference_steps is not None and int(num_inference_steps) < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
    if int(num_images_per_prompt) < 1:
        raise ValueError(f"num_images_per_prompt must be at least 1, got {num_images_per_prompt}")
    for name, value in (
        ("controlnet_conditioning_scale", controlnet_conditioning_scale),
        ("control_guidance_start", control_guidance_start),
        ("control_guidance_end", control_guidance_end),
    ):
        if isinstance(value, (list, tuple)) and len(value) != len(nets):
            raise ValueError(f"{name} has {len(value)} values for {len(nets)} ControlNets")
    starts = per_net(control_guidance_start, len(nets))
    ends = per_net(control_guidance_end, len(nets))
    for s, e in zip(starts, ends):
        if not 0.0 <= s < e <= 1.0:
            raise ValueError(
                f"control_guidance_start ({s}) must be below control_guidance_end ({e}), both in [0, 1]"
            )
    if callback_on_step_end_tensor_inputs is not None:
        unknown = set(callback_on_step_end_tensor_inputs) - set(pipe._callback_tensor_inputs)
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs: {sorted(unknown)} not among "
                f"{pipe._callback_tensor_inputs}"
            )
